"""Put kernel operands in the layout the fast code needs: contiguous, 16-byte-aligned rows.

Triton's launcher specialises a kernel for 16-byte-aligned pointers and integer arguments
divisible by 16 (``tt.divisibility=16``); only with that are 16-bit operand loads vectorised
and the K loops software-pipelined with ``cp.async`` (see ``launch_specs``). The kernels
therefore read the kept hidden rows from one compacted ``[M, D]`` copy (contiguous, so row
``i`` is ``i * D`` elements from the base) rather than gathering rows by index, and a weight
that breaks the fast path's layout is copied or zero-padded by ``fast_path``, with a debug log.
"""

from __future__ import annotations

import torch


def compact_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` as a contiguous tensor (``x`` itself when it already is exactly that).

    x: ``[N, ...]``; rows: ``[M]`` int64 sorted kept indices. Costs one ``M x row`` copy.
    """
    if rows.numel() == x.shape[0] and x.is_contiguous():
        return x  # every row kept (rows is the sorted nonzero of a mask, so rows == arange)
    return x.index_select(0, rows).contiguous()
