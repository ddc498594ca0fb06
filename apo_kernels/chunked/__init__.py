"""The chunked strategy for ``linear_logprobs`` (``backend="torch"``): vendor GEMMs (MKL/oneDNN on
CPU, cuBLAS on CUDA) on blocks of logits, each followed by one fused epilogue pass (C++ on CPU,
Triton on CUDA, plain torch ops as the fallback). See ``strategy.py`` for the loop order and
``epilogue.py`` for the chunk-epilogue API the single-pass preference path reuses."""

from .epilogue import (
    CPU_EPILOGUES,
    chunk_forward_epilogue,
    chunk_forward_partials,
    chunk_grad_inplace,
    finalize_partials,
    merge_partials,
    resolve_epilogue,
    set_cpu_epilogue,
)
from .native import native_available
from .strategy import (
    backward_blocks,
    chunked_backward,
    chunked_forward,
    logits_into,
)

__all__ = [
    "CPU_EPILOGUES",
    "backward_blocks",
    "chunk_forward_epilogue",
    "chunk_forward_partials",
    "chunk_grad_inplace",
    "chunked_backward",
    "chunked_forward",
    "finalize_partials",
    "logits_into",
    "merge_partials",
    "native_available",
    "resolve_epilogue",
    "set_cpu_epilogue",
]
