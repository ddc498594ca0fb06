"""Published numbers of peer implementations (bf16), to stand beside our predictions.

These are the peers' own measurements as published (sources named); nothing here was run by
this project. ``phase`` says which of our predicted phases a number compares with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerResult:
    peer: str
    device: str  # a key of rates.DEVICES
    n: int
    d: int
    v: int
    phase: str  # forward | backward | forward+backward
    ms: float | None
    tflops: float | None
    memory_gib: float | None
    source: str
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.d}x{self.v}"


_LIGER = "Liger-Kernel#1422"
_TRL = "TRL#7244"
PEERS: tuple[PeerResult, ...] = (
    PeerResult("Liger CuTe DSL fused scaled CE", "h200", 8192, 4096, 131072, "forward", 11.18, 787,
               None, _LIGER, "per-token + entropy, sm90 bf16 only, dW kept in bf16"),
    PeerResult("Liger CuTe DSL fused scaled CE", "h200", 8192, 4096, 131072, "backward",
               4 * 8192 * 4096 * 131072 / 763e12 * 1e3, 763, None, _LIGER,
               "ms derived here from ~763 TFLOP/s at 4NDV"),
    PeerResult("QuACK 0.6.1 fused linear CE", "h200", 4096, 4096, 128256, "forward+backward", 17.33,
               None, None, "QuACK 0.6.1 (issue 11)", "mean only, gradients formed in the forward"),
    PeerResult("bare lm_head GEMM fwd+bwd", "h100", 8192, 4096, 151936, "forward+backward", 42.0,
               None, None, _TRL, "the 6NDV of cuBLAS alone: compare with the floor"),
    PeerResult("naive CE (full logits)", "h100", 8192, 4096, 151936, "forward+backward", 59.0, None,
               19.9, _TRL, "compare with our 'ordinary'"),
    PeerResult("Liger FLCE", "h100", 8192, 4096, 151936, "forward+backward", 192.0, None, 6.1, _TRL),
    PeerResult("TRL chunked_nll", "h100", 8192, 4096, 151936, "forward+backward", 167.0, None, 13.1,
               _TRL, "cuBLAS chunks + a fold, like chunked-cublas"),
)
