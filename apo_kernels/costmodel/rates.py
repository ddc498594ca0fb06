"""Device rates and kernel assumptions of the cost model: one frozen config object per device.

Every number here is either a published specification (with its source), a measured rate that
someone published (with its source), or a guess; ``assumption_lines`` prints each with its label,
under every table the model prints. Change a number with ``dataclasses.replace``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

# Fraction of the *measured* dense bf16 GEMM rate that a GEMM of this kind reaches. "cublas" is
# the reference (1.0 by definition); the Triton tile classes are guesses to replace with
# measurements (see docs/cost_model.md). Liger-Kernel's fused CuTe kernel reaches 787 TFLOP/s on
# an H200 forward (Liger-Kernel#1422), so a fused kernel *can* reach the cuBLAS rate.
TC_EFFICIENCY: Mapping[str, float] = MappingProxyType({
    "cublas": 1.0,          # cuBLAS on large bf16 GEMMs: the measured rate itself
    "triton-128x128": 0.85,  # pipelined wgmma m64n128 per warp group (GUESS)
    "triton-64x128": 0.70,   # 64-row tiles, BLOCK_D=32: two k16 wgmmas per stage (GUESS)
    "triton-64x64": 0.50,    # the backward's 64x64x32 recompute tile (GUESS)
    "triton-narrow": 0.30,   # gradient GEMMs with n=32 wgmma (dz @ W[:, 32], dz.T @ h[:, 32]) (GUESS)
})


@dataclass(frozen=True)
class DeviceRates:
    """Rates of one GPU plus the kernel-level assumptions the predictions use.

    Units: TFLOP/s and T ops/s are 1e12 per second; TB/s is 1e12 bytes per second.
    """

    key: str
    name: str
    sms: int = 132
    bf16_peak_tflops: float = 989.0       # NVIDIA H100/H200 SXM datasheet, dense bf16
    bf16_measured_tflops: float = 790.0   # measured cuBLAS rate on H100 SXM (DESIGN.md, about 790)
    hbm_tbps: float = 3.35                # datasheet peak
    hbm_efficiency: float = 0.90          # achievable fraction of peak HBM bandwidth (GUESS)
    l2_bytes: float = 50e6                # datasheet
    l2_usable_fraction: float = 0.5       # of L2 that holds re-used data while others stream (GUESS)
    fp32_alu_tops: float = 33.5           # fp32 lane ops/s: 67 TFLOP/s datasheet, an FMA = 2 FLOPs
    sfu_tops: float = 3.9                 # MUFU (exp2, rcp, lg2): FlashAttention-3 paper, H100 SXM5
    atomic_tadds: float = 1.0             # fp32 adds resolved in L2, 1e12/s (GUESS, see docs)
    fence_us: float = 0.25                # stall of one acq_rel (MEMBAR.ALL.GPU) atomic (GUESS)
    launch_us: float = 4.0                # fixed cost per kernel launch, incl. ramp-up/tail (GUESS)
    tc_efficiency: Mapping[str, float] = field(default_factory=lambda: TC_EFFICIENCY)

    @property
    def gemm_flops(self) -> float:
        """Dense bf16 FLOP/s the predictions use (the measured rate, not the peak)."""
        return self.bf16_measured_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12 * self.hbm_efficiency

    @property
    def l2_usable(self) -> float:
        return self.l2_bytes * self.l2_usable_fraction

    def efficiency(self, kind: str) -> float:
        try:
            return self.tc_efficiency[kind]
        except KeyError:
            raise ValueError(f"unknown tensor-core GEMM kind {kind!r}; known: "
                             f"{sorted(self.tc_efficiency)}") from None


H100 = DeviceRates(key="h100", name="H100 SXM (80 GB HBM3)", hbm_tbps=3.35)
# H200: the same GH100 compute (132 SMs, 989 TFLOP/s dense bf16, 50 MB L2), faster HBM3e.
H200 = DeviceRates(key="h200", name="H200 SXM (141 GB HBM3e)", hbm_tbps=4.8)
DEVICES: dict[str, DeviceRates] = {"h100": H100, "h200": H200}


def device(key: str, **overrides) -> DeviceRates:
    """The rates of ``key`` (``h100`` | ``h200``), with optional field overrides."""
    try:
        base = DEVICES[key.lower()]
    except KeyError:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {key!r}") from None
    return replace(base, **overrides) if overrides else base


def assumption_lines(rates: DeviceRates) -> list[str]:
    """One line per rate and assumption, each saying where its number comes from."""
    eff = ", ".join(f"{k} {v:.2f}" for k, v in rates.tc_efficiency.items())
    return [
        f"device: {rates.name}, {rates.sms} SMs, L2 {rates.l2_bytes / 1e6:.0f} MB (datasheet)",
        (f"bf16 dense GEMM: {rates.bf16_peak_tflops:.0f} TFLOP/s peak (datasheet), "
         f"{rates.bf16_measured_tflops:.0f} TFLOP/s used (measured cuBLAS rate on H100 SXM; "
         "assumed the same on H200, same compute)"),
        (f"tensor-core efficiency vs the measured rate, per GEMM kind: {eff} "
         "(cuBLAS = 1 by definition; the Triton tile classes are GUESSES)"),
        (f"HBM: {rates.hbm_tbps:.2f} TB/s peak (datasheet) x {rates.hbm_efficiency:.2f} achievable "
         "(GUESS)"),
        (f"L2 reuse: {rates.l2_usable_fraction:.0%} of L2 holds re-used tiles; a re-read working "
         "set W larger than that hits L2 for a fraction usable/W, misses go to HBM (ASSUMED); "
         "the L2->SM bandwidth is not a separate roofline (its cost is in the tile efficiencies)"),
        (f"fp32 epilogue math: {rates.fp32_alu_tops:.1f} T lane-ops/s (67 TFLOP/s fp32 datasheet, "
         f"FMA = 2 FLOPs), MUFU {rates.sfu_tops:.1f} T ops/s (FlashAttention-3 paper); per-logit op "
         "counts read off the kernels (docs/cost_model.md)"),
        (f"fp32 atomic adds resolved in L2: {rates.atomic_tadds:.1f}e12/s (GUESS: about one "
         "atomic per L2 slice per clock, x4 for sm_90's vector REDG.F32x4; uncertain 2-3x)"),
        (f"acq_rel atomics: each fenced atomic instruction stalls its program {rates.fence_us:.2f} "
         "us (one loaded L2 round trip, GUESS); relaxed atomics (REDG) do not stall"),
        (f"per launch: time = max(compute, HBM bytes / bandwidth, atomics / atomic rate) + fence "
         f"stalls + {rates.launch_us:.0f} us fixed launch overhead (GUESS); compute = tensor-core "
         "time / wave efficiency + epilogue math (serial inside a fused Triton kernel)"),
    ]
