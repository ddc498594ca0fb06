"""Time per launch from counts and rates: a roofline plus fixed costs.

Per launch: ``time = max(compute, memory, atomics) + fence stalls + launch overhead`` where
``compute = sum(tc_flops_k / (measured GEMM rate * efficiency_k)) / wave_eff + epilogue``
(epilogue = fp32 lane ops / ALU rate + MUFU ops / SFU rate; it adds to the tensor-core time
inside a fused kernel and overlaps nothing else), ``memory = HBM bytes / achievable bandwidth``,
``atomics = fp32 atomic adds / atomic rate`` and the stalls of fenced (acq_rel) atomics
``waves * fences per program * fence latency``. ``count`` identical launches multiply it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .launch import Launch, cdiv
from .problem import Options, Problem
from .rates import DeviceRates
from .strategies import Strategy

BOUNDS = ("compute", "memory", "atomics", "fences", "overhead")


@dataclass(frozen=True)
class LaunchTime:
    """Seconds for all ``count`` launches of one :class:`Launch`, by resource."""

    launch: Launch
    compute_s: float
    memory_s: float
    atomics_s: float
    stall_s: float
    overhead_s: float
    total_s: float

    @property
    def bound(self) -> str:
        parts = dict(zip(BOUNDS, (self.compute_s, self.memory_s, self.atomics_s, self.stall_s,
                                  self.overhead_s)))
        return max(parts, key=parts.get)


def wave_efficiency(grid: int, resident: int, sms: int) -> float:
    """Fraction of SM slots busy over the launch's waves (1 for library kernels, grid 0)."""
    if grid <= 0:
        return 1.0
    slots = sms * resident
    return grid / (cdiv(grid, slots) * slots)


def time_launch(launch: Launch, rates: DeviceRates) -> LaunchTime:
    wave = wave_efficiency(launch.grid, launch.resident, rates.sms)
    tc_s = sum(f / (rates.gemm_flops * rates.efficiency(kind)) for f, kind in launch.tc) / wave
    epi_s = (launch.alu_ops / (rates.fp32_alu_tops * 1e12)
             + launch.sfu_ops / (rates.sfu_tops * 1e12)) / wave
    compute = tc_s + epi_s if launch.serial_epilogue or not launch.tc else max(tc_s, epi_s)
    memory = launch.hbm_bytes / rates.hbm_bytes_per_s
    atomics = launch.atomics / (rates.atomic_tadds * 1e12)
    stall = 0.0
    if launch.fences_per_program and launch.grid:
        waves = launch.grid / (rates.sms * launch.resident)
        stall = waves * launch.fences_per_program * rates.fence_us * 1e-6
    overhead = rates.launch_us * 1e-6
    one = max(compute, memory, atomics) + stall + overhead
    c = launch.count
    return LaunchTime(launch, compute * c, memory * c, atomics * c, stall * c, overhead * c, one * c)


@dataclass(frozen=True)
class Prediction:
    """All launches of one strategy on one problem and device."""

    strategy: str
    problem: Problem
    rates: DeviceRates
    times: tuple[LaunchTime, ...]

    def phase_s(self, phase: str) -> float:
        return sum(t.total_s for t in self.times if t.launch.phase == phase)

    @property
    def forward_s(self) -> float:
        return self.phase_s("forward")

    @property
    def backward_s(self) -> float:
        return self.phase_s("backward")

    @property
    def total_s(self) -> float:
        return sum(t.total_s for t in self.times)

    @property
    def floor_s(self) -> float:
        """6NDV at the measured GEMM rate."""
        return self.problem.floor_flops / self.rates.gemm_flops

    @property
    def floor_fraction(self) -> float:
        return self.floor_s / self.total_s

    @property
    def tflops(self) -> float:
        """6NDV / predicted time (the useful work rate, not what the hardware executes)."""
        return self.problem.floor_flops / self.total_s / 1e12

    def totals(self) -> dict[str, float]:
        """Sums over launches: FLOPs, bytes, atomics, and seconds per resource."""
        out = {"tc_flops": 0.0, "hbm_bytes": 0.0, "atomics": 0.0, "launches": 0}
        for t in self.times:
            c = t.launch.count
            out["tc_flops"] += t.launch.tc_flops * c
            out["hbm_bytes"] += t.launch.hbm_bytes * c
            out["atomics"] += t.launch.atomics * c
            out["launches"] += c
        return out

    @property
    def dominant(self) -> str:
        """The resource that bounds most of the predicted time."""
        share: dict[str, float] = {}
        for t in self.times:
            share[t.bound] = share.get(t.bound, 0.0) + t.total_s
        return max(share, key=share.get)


def predict(strategy: Strategy, problem: Problem, rates: DeviceRates,
            options: Options | None = None) -> Prediction:
    options = options or Options()
    if not strategy.skips and problem.skip:
        from dataclasses import replace
        problem = replace(problem, skip=0.0)
    launches = strategy.build(problem, rates, options)
    return Prediction(strategy.name, problem, rates, tuple(time_launch(l, rates) for l in launches))


def skip_to_reach_floor(strategy: Strategy, problem: Problem, rates: DeviceRates,
                        options: Options | None = None) -> float | None:
    """The smallest pre-skip fraction at which the prediction reaches the 6NDV floor (fraction
    >= 1), or None when no fraction below 0.999 does (or the strategy cannot skip)."""
    from dataclasses import replace

    if not strategy.skips:
        return None

    def fraction(f: float) -> float:
        return predict(strategy, replace(problem, skip=f), rates, options).floor_fraction

    lo, hi = 0.0, 0.999
    if fraction(lo) >= 1.0:
        return 0.0
    if fraction(hi) < 1.0:
        return None
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fraction(mid) >= 1.0 else (mid, hi)
    return hi
