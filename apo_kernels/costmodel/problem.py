"""What is being predicted: one LM-head shape (:class:`Problem`) and the strategy options."""

from __future__ import annotations

import re
from dataclasses import dataclass

# lm_head shapes of real models (DESIGN.md "Shapes that matter"): name -> (D, V, softcap)
HEADS: dict[str, tuple[int, int, float | None]] = {
    "qwen2.5-0.5b": (896, 151936, None),
    "llama-3.2-1b": (2048, 128256, None),
    "gemma-2-2b": (2304, 256000, 30.0),
    "llama-3-8b": (4096, 128256, None),
}
DEFAULT_TOKENS = 16384


@dataclass(frozen=True)
class Problem:
    """One shape: N kept tokens (ignored ones are compacted away first), hidden D, vocab V.

    ``skip`` is the fraction of backward logit tiles the pre-skip proves negligible before the
    recompute (0 = exact/flat logits). ``in_bytes`` = 2 for bf16 inputs.
    """

    n: int
    d: int
    v: int
    name: str = "custom"
    softcap: float | None = None
    skip: float = 0.0
    in_bytes: int = 2

    def __post_init__(self) -> None:
        if min(self.n, self.d, self.v) < 1:
            raise ValueError(f"shape sizes must be positive, got N={self.n} D={self.d} V={self.v}")
        if not 0.0 <= self.skip < 1.0:
            raise ValueError(f"skip fraction must be in [0, 1), got {self.skip}")

    @property
    def ndv(self) -> float:
        return float(self.n) * self.d * self.v

    @property
    def floor_flops(self) -> float:
        """6 N D V: forward 2NDV, dH 2NDV, dW 2NDV, no recompute."""
        return 6.0 * self.ndv

    @property
    def label(self) -> str:
        return f"{self.name} ({self.n}x{self.d}x{self.v})"


@dataclass(frozen=True)
class Options:
    """Knobs of the strategies (defaults: what the designs in issues 11 and 12 describe)."""

    owner_dz_budget_mib: float = 512.0     # fused-owner: 16-bit dz buffer [M, Vc]
    chunk_logits_budget_mib: float = 2048.0  # chunked-cublas: logits buffer [C, V]
    dw_accum: str = "gemm"  # chunked-cublas dW += dz.T @ h: "gemm" (fp32 C in cuBLAS) | "pass"
    with_entropy: bool = False

    def __post_init__(self) -> None:
        if self.dw_accum not in ("gemm", "pass"):
            raise ValueError(f"dw_accum must be 'gemm' or 'pass', got {self.dw_accum!r}")
        if self.owner_dz_budget_mib <= 0 or self.chunk_logits_budget_mib <= 0:
            raise ValueError("buffer budgets must be positive")


def parse_shape(text: str, tokens: int = DEFAULT_TOKENS) -> Problem:
    """``llama-3-8b`` (a head name, N = ``tokens``), ``DxV`` or ``NxDxV`` (optional softcap
    suffix ``:sc30``) -> :class:`Problem`."""
    raw = text.strip().lower()
    softcap = None
    m = re.fullmatch(r"(.*):sc([0-9.]+)", raw)
    if m:
        raw, softcap = m.group(1), float(m.group(2))
    if raw in HEADS:
        d, v, cap = HEADS[raw]
        return Problem(n=tokens, d=d, v=v, name=raw, softcap=softcap if softcap is not None else cap)
    parts = raw.split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 2:
        return Problem(n=tokens, d=sizes[0], v=sizes[1], softcap=softcap)
    if len(sizes) == 3:
        return Problem(n=sizes[0], d=sizes[1], v=sizes[2], softcap=softcap)
    raise ValueError(f"shape must be a head name ({', '.join(HEADS)}), DxV or NxDxV, got {text!r}")
