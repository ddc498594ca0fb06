"""Each strategy as a list of launches (:class:`~apo_kernels.costmodel.launch.Launch`).

``STRATEGIES`` maps a name to a :class:`Strategy`: how to build its launches for a problem,
whether the backward pre-skip applies to it, and one line saying what it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..launch import Launch
from ..problem import Options, Problem
from ..rates import DeviceRates
from . import chunked, fused_atomic, fused_owner, ordinary

Builder = Callable[[Problem, DeviceRates, Options], list[Launch]]


@dataclass(frozen=True)
class Strategy:
    name: str
    build: Builder
    skips: bool  # the pre-skip removes work (fused kernels); otherwise the skip fraction is ignored
    summary: str


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("ordinary", ordinary.launches, False,
             "PyTorch: full bf16 logits, .float(), log_softmax, gather; autograd backward"),
    Strategy("fused-atomic", fused_atomic.launches, True,
             "today's Triton kernels: fwd 64x128, bwd 64x64 tiles with acq_rel fp32 atomics"),
    Strategy("fused-atomic-relaxed", partial(fused_atomic.launches, relaxed=True), True,
             "today's kernels with relaxed atomics only (issue 11 item 2 alone)"),
    Strategy("fused-owner", fused_owner.launches, True,
             "issue 11 rebuild: 128x128 tiles, vocab-chunked owner backward, no tile atomics"),
    Strategy("chunked-cublas-f32", partial(chunked.launches, out_bytes=4), False,
             "issue 12: cuBLAS logits [C, V] fp32 + Triton epilogue, recompute in the backward"),
    Strategy("chunked-cublas-bf16", partial(chunked.launches, out_bytes=2), False,
             "issue 12 with a bf16 logits buffer"),
    Strategy("chunked-fwdgrad", partial(chunked.launches, out_bytes=4, fwdgrad=True), False,
             "issue 12 preference path: gradients formed in the forward (6NDV, fp32 buffer)"),
)}
DEFAULT_STRATEGIES = tuple(STRATEGIES)


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
