"""Put kernel operands in the layout the fast code needs: contiguous, 16-byte-aligned rows.

Triton's launcher specialises a kernel for 16-byte-aligned pointers and integer arguments
divisible by 16 (``tt.divisibility=16``); only with that are 16-bit operand loads vectorised
and the K loops software-pipelined with ``cp.async`` (see ``launch_specs``). The kernels
therefore read the kept hidden rows from one compacted ``[M, D]`` copy (contiguous, so row
``i`` is ``i * D`` elements from the base) rather than gathering rows by index, and a weight
whose last dimension is strided is copied once. When an input still breaks the assumption
(``D`` not a multiple of 16 elements, a base pointer not 16-byte aligned) the kernels stay
correct but unpipelined; that is logged at debug level, never silent.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def compact_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` as a contiguous tensor (``x`` itself when it already is exactly that).

    x: ``[N, ...]``; rows: ``[M]`` int64 sorted kept indices. Costs one ``M x row`` copy.
    """
    if rows.numel() == x.shape[0] and x.is_contiguous():
        return x  # every row kept (rows is the sorted nonzero of a mask, so rows == arange)
    return x.index_select(0, rows).contiguous()


def unit_stride_last(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` with a contiguous last dimension (copied, with a debug log, when it is not)."""
    if x.stride(-1) == 1:
        return x
    log.debug("%s has last-dimension stride %d: copying it to a contiguous buffer", name, x.stride(-1))
    return x.contiguous()


def note_alignment(kernel: str, *tensors: torch.Tensor) -> None:
    """Log (debug) when a tensor's rows are not 16-byte aligned: the launcher then cannot
    specialise for alignment and the kernel runs without pipelined/vectorised loads."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    for t in tensors:
        row_bytes = t.stride(0) * t.element_size() if t.dim() > 1 else 16
        if t.data_ptr() % 16 or row_bytes % 16:
            log.debug("%s: operand %s (row stride %d B, base %% 16 = %d) is not 16-byte aligned; "
                      "its loads are not pipelined", kernel, tuple(t.shape), row_bytes,
                      t.data_ptr() % 16)
