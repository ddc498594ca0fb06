"""Op-level benchmark of ``linear_logprobs`` against the ordinary way, on this device.

Each measurement runs in a fresh subprocess (``python -m apo_kernels.benchmark --worker``) so
that peak memory is its own: ``torch.cuda.max_memory_allocated`` above the inputs on a GPU,
peak resident memory (``ru_maxrss``) above the inputs on CPU. Times are medians (with 20th and
80th percentiles) of repeated runs: ``triton.testing.do_bench`` on a GPU, a repeat-and-median
timer on CPU. FLOPs counted: 2NDV forward, 6NDV forward+backward.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

PROVIDERS = ("ours", "ours-torch", "ordinary")
MODES = ("forward", "forward+backward")


@dataclass
class BenchRow:
    device: str
    torch_version: str
    triton_version: str
    provider: str
    mode: str
    dtype: str
    n: int
    d: int
    v: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mib: float  # above the inputs
    tflops: float
    error: str = ""


def ordinary_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What people write: full logits, fp32 log-softmax, gather (no ignored tokens here)."""
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def _provider_fn(provider: str) -> Callable:
    from .ops import linear_logprobs

    if provider == "ours":
        return lambda h, w, y: linear_logprobs(h, w, y)
    if provider == "ours-torch":
        return lambda h, w, y: linear_logprobs(h, w, y, backend="torch")
    if provider == "ordinary":
        return ordinary_logprobs
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _versions() -> tuple[str, str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    return device, torch.__version__, triton_version


def _cpu_timer(fn: Callable[[], None], reps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _quantiles(times: Iterable[float]) -> tuple[float, float, float]:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[-1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(provider: str, mode: str, n: int, d: int, v: int, dtype: torch.dtype, reps: int) -> BenchRow:
    """One measurement in this process (call in a fresh process for honest peak memory)."""
    from .verify import make_inputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden, weight, labels, _ = make_inputs(n, d, v, dtype, peaked=True,
                                            generator=torch.Generator().manual_seed(0))
    hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
    backward = mode == "forward+backward"
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    fn = _provider_fn(provider)
    grad = torch.ones(n, device=device)
    # A tiny call first, so lazily imported machinery (custom-op dispatch, triton) is loaded
    # before the memory baseline is taken and does not count as the provider's memory.
    tiny = [t[:2].detach().requires_grad_(backward) for t in (hidden, weight)]
    fn(tiny[0], tiny[1], labels[:2].clamp(max=1)).sum().backward() if backward else fn(
        tiny[0].detach(), tiny[1].detach(), labels[:2].clamp(max=1))

    def step() -> None:
        if backward:
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels).backward(grad)
        else:
            with torch.no_grad():
                fn(hidden, weight, labels)

    if device.type == "cuda":
        import triton.testing

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        q = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], rep=200)
        median, p20, p80 = q
    else:
        base = _rss_mib()
        times = _cpu_timer(step, reps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        median, p20, p80 = _quantiles(times)
    flops = (6 if backward else 2) * n * d * v
    dev, tv, trv = _versions()
    return BenchRow(dev, tv, trv, provider, mode, str(dtype).removeprefix("torch."), n, d, v,
                    median, p20, p80, max(peak, 0.0), flops / (median * 1e-3) / 1e12)


def run_isolated(provider: str, mode: str, n: int, d: int, v: int, dtype: str, reps: int,
                 timeout: float = 600) -> BenchRow:
    spec = json.dumps(dict(provider=provider, mode=mode, n=n, d=d, v=v, dtype=dtype, reps=reps))
    proc = subprocess.run([sys.executable, "-m", "apo_kernels.benchmark", "--worker", spec],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "OutOfMemoryError" in proc.stderr:
            reason = "out of memory"
        dev, tv, trv = _versions()
        nan = float("nan")
        return BenchRow(dev, tv, trv, provider, mode, dtype, n, d, v, nan, nan, nan, nan, nan, reason)
    return BenchRow(**json.loads(lines[-1]))


def write_csv(rows: list[BenchRow], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def _worker(spec: str) -> None:
    args = json.loads(spec)
    row = measure(args["provider"], args["mode"], args["n"], args["d"], args["v"],
                  getattr(torch, args["dtype"]), args["reps"])
    print(json.dumps(asdict(row)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", required=True, help="JSON spec of one measurement")
    _worker(parser.parse_args().worker)
