"""One kernel launch as data: what it computes, moves and fights over, and why (L2 note)."""

from __future__ import annotations

import math
from dataclasses import dataclass

PHASES = ("forward", "backward")


@dataclass(frozen=True)
class Launch:
    """Counts for ONE launch; ``count`` identical launches are issued (e.g. one per chunk).

    tc: tensor-core GEMM work as ``((flops, kind), ...)``; ``kind`` names a
        ``DeviceRates.tc_efficiency`` class (``cublas``, ``triton-128x128``, ...).
    alu_ops / sfu_ops: fp32 non-tensor-core lane operations (FMA, add, max, select, convert)
        and MUFU operations (exp2, rcp) of the epilogue math.
    hbm_read / hbm_write: bytes moved to/from HBM under the ``l2`` reuse assumption.
    atomics: fp32 atomic adds (each resolved in L2).
    fences_per_program: acq_rel atomic instructions one program issues in sequence (each
        stalls it, see ``DeviceRates.fence_us``); 0 for relaxed atomics.
    grid, resident: programs per launch and per SM at once (wave quantisation); grid 0 for a
        library kernel whose rate already includes it (cuBLAS, torch elementwise).
    serial_epilogue: epilogue math runs after each tile's MMAs in the same program (a fused
        Triton kernel without warp specialisation), so its time adds to the tensor-core time.
    """

    name: str
    phase: str
    engine: str
    tc: tuple[tuple[float, str], ...] = ()
    alu_ops: float = 0.0
    sfu_ops: float = 0.0
    hbm_read: float = 0.0
    hbm_write: float = 0.0
    atomics: float = 0.0
    fences_per_program: float = 0.0
    grid: int = 0
    resident: int = 1
    count: int = 1
    serial_epilogue: bool = True
    l2: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.count < 1 or self.resident < 1 or self.grid < 0:
            raise ValueError(f"{self.name}: count and resident must be >= 1, grid >= 0")

    @property
    def tc_flops(self) -> float:
        return sum(f for f, _ in self.tc)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_read + self.hbm_write


def cdiv(a: float, b: float) -> int:
    return math.ceil(a / b)


def l2_hit(working_set: float, usable: float) -> float:
    """Fraction of re-reads served by L2 when ``working_set`` bytes are re-read concurrently."""
    return 1.0 if working_set <= usable else usable / working_set


def gemm_hbm(m: int, n: int, a_bytes: float, b_bytes: float, *, sms: int, l2_usable: float,
             tile: int = 128, resident: int = 1) -> tuple[float, str]:
    """HBM bytes read for the operands of ``C[m, n] = A[m, k] @ B[k, n]`` (A, B bytes given).

    L2 assumption: when the smaller operand fits the usable L2 it stays there while the other
    streams through once (both read once). Otherwise the programs of one wave cover a square
    super-tile of about ``sqrt(sms * resident) * tile`` outputs per side and step through K
    together, so each wave reads its A and B panels from HBM once: A is read ``ceil(n / side)``
    times and B ``ceil(m / side)`` times (grouped launch order, as cuBLAS and Triton's tutorial).
    """
    if min(a_bytes, b_bytes) <= l2_usable:
        return a_bytes + b_bytes, (f"smaller operand ({min(a_bytes, b_bytes) / 1e6:.0f} MB) stays in "
                                   "L2, both read once")
    side = max(tile, int(math.sqrt(sms * resident)) * tile)
    reads = a_bytes * cdiv(n, side) + b_bytes * cdiv(m, side)
    note = (f"GEMM panels re-read once per {side}x{side} output super-tile "
            f"(A x{cdiv(n, side)}, B x{cdiv(m, side)})")
    return reads, note
