"""Timing, peak memory and the matmul rate, in the current process.

Time: ``triton.testing.do_bench`` (median, 20th and 80th percentiles, CUDA events, L2 flushed
between runs) on a GPU; on CPU the median and quantiles of ``reps`` ``perf_counter`` runs after
a warm-up.

Peak memory above the inputs, from one extra run after the warm-up, with every gradient of the
previous run released first: ``torch.cuda.max_memory_allocated`` minus the allocation before the
run on a GPU; on Linux CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) minus its resident set before the run, with freed heap pages handed
back to the OS first (``malloc_trim``), else ``ru_maxrss`` growth (needs a fresh process).
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable

import torch

from .inputs import Inputs, make_bench_inputs
from .providers import Provider, ordinary_logprobs
from .specs import BenchRow, Spec, row_for

MiB = 2**20
CHECK_TOKENS = 256  # forward modes: tokens compared against fp32 ordinary log-probs


def quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of a list of times."""
    ts = sorted(times_ms)
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=5, method="inclusive")
    return statistics.median(ts), q[0], q[-1]


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_above(fn: Callable[[], object]) -> float:
    """Peak resident memory (MiB) of one ``fn()`` above the resident memory before it."""
    gc.collect()
    _trim_heap()
    base = _status_kib("VmRSS")
    if base is not None and _reset_peak_rss():
        fn()
        return max((_status_kib("VmHWM") or base) - base, 0) / 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024


def cuda_peak_above(fn: Callable[[], object]) -> float:
    """Peak allocated CUDA memory (MiB) of one ``fn()`` above the allocation before it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def time_ms(fn: Callable[[], object], cuda: bool, reps: int, estimate_ms: float) -> tuple[list[float], int]:
    """Times of ``fn`` (already warm): ``(median, p20, p80)`` and the number of runs behind them."""
    if cuda:
        import triton.testing

        # At least ~5 timed runs even for steps of hundreds of ms (do_bench sizes by time).
        rep = max(100.0, 5 * estimate_ms)
        q = triton.testing.do_bench(fn, warmup=max(25.0, estimate_ms), rep=rep,
                                    quantiles=[0.5, 0.2, 0.8])
        return list(q), max(1, int(rep / max(estimate_ms, 1e-3)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return list(quantiles(times)), reps


def gemm_tflops(cuda: bool, dtype: torch.dtype) -> float:
    """Measured matmul rate (TFLOP/s) of a large square GEMM on random data in ``dtype``."""
    device = "cuda" if cuda else "cpu"
    size = 8192 if cuda else 2048
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    fn = lambda: a @ b
    fn()
    if cuda:
        torch.cuda.synchronize()
    (median, _, _), _ = time_ms(fn, cuda, reps=5, estimate_ms=1.0)
    return 2 * size**3 / (median * 1e-3) / 1e12


def make_step(provider: Provider, spec: Spec, inp: Inputs) -> Callable[[], torch.Tensor]:
    """A closure running one ``spec.mode`` step and returning its output (detached)."""
    cap = spec.softcap
    leaves = (inp.hidden, inp.weight)
    if spec.mode == "forward":
        def step():
            with torch.no_grad():
                return provider.logprobs(inp.hidden, inp.weight, inp.labels, cap)
        return step
    for t in leaves:
        t.requires_grad_(True)
    if spec.mode == "forward+backward":
        def step():
            for t in leaves:
                t.grad = None
            out = provider.logprobs(inp.hidden, inp.weight, inp.labels, cap)
            out.sum().backward()
            return out.detach()
        return step

    def pref_step():
        for t in leaves:
            t.grad = None
        loss = provider.preference(inp, cap)
        loss.backward()
        return loss.detach()
    return pref_step


def check_error(out: torch.Tensor, spec: Spec, inp: Inputs) -> float:
    """Max |log-prob - fp32 ordinary log-prob| over the first tokens (forward modes only)."""
    if spec.mode == "preference":
        return float("nan")
    k = min(CHECK_TOKENS, spec.n)
    with torch.no_grad():
        ref = ordinary_logprobs(inp.hidden[:k].float(), inp.weight.float(), inp.labels[:k], spec.softcap)
    return float((out[:k].float() - ref).abs().max())


def measure(spec: Spec, provider: Provider, env: dict[str, str], gemm: float) -> BenchRow:
    """Run ``spec`` with ``provider`` here; errors propagate (the worker turns them into rows)."""
    cuda = env["device_kind"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    inp = make_bench_inputs(spec, device)
    step = make_step(provider, spec, inp)
    out = step()  # warm-up: imports, compilation, autotuning
    if cuda:
        torch.cuda.synchronize()
    err = check_error(out, spec, inp)
    del out
    for t in (inp.hidden, inp.weight):
        t.grad = None
    t0 = time.perf_counter()
    peak = (cuda_peak_above if cuda else cpu_peak_above)(step)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    (median, p20, p80), reps = time_ms(step, cuda, spec.reps, estimate_ms)
    tflops = spec.flops / (median * 1e-3) / 1e12
    inputs_mib = inp.nbytes / MiB
    floor = inputs_mib + (inp.grad_nbytes / MiB if spec.mode != "forward" else 0.0)
    row = row_for(spec, env, "ok", median_ms=median, p20_ms=p20, p80_ms=p80, reps=reps,
                  tflops=tflops, gemm_tflops=gemm,
                  pct_of_gemm=100 * tflops / gemm if gemm and not math.isnan(gemm) else float("nan"),
                  input_mib=inputs_mib, peak_above_inputs_mib=peak, peak_total_mib=inputs_mib + peak,
                  mem_floor_mib=floor, mem_vs_floor=(inputs_mib + peak) / floor, max_abs_err=err)
    return row
