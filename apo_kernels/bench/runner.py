"""Run benchmark specs in worker subprocesses, so that each measurement's memory is its own.

Isolation: on CPU each spec gets a fresh process (peak resident memory is per process); on a GPU
one process runs a provider's specs one after another (peak memory is reset per spec, and
``torch.compile`` caches survive between shapes), and is restarted after a crash. ``shared``
runs everything in one worker (fast start; for tests and smoke runs). A spec whose
worker dies (e.g. a CUDA fault) or exceeds ``timeout_s`` becomes an ``error`` row; specs left
when the time budget runs out become ``skipped`` rows. Rows arrive through ``on_row`` as soon as
each is measured, so a caller can write its CSV progressively.

Worker protocol: ``python -m apo_kernels.bench.runner`` reads one JSON job on stdin and prints
``@@ENV {...}`` / ``@@ROW {...}`` lines on stdout.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .specs import BenchRow, Spec, row_for

ROW, ENV = "@@ROW ", "@@ENV "


@dataclass
class Probe:
    """What the first worker reports about the machine: environment and matmul rate."""

    env: dict[str, str]
    gemm_tflops: float
    gemm_dtype: str


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # never benchmark the interpreter
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class _Worker:
    job: dict
    timeout_s: float
    proc: subprocess.Popen = field(init=False)
    lines: queue.Queue = field(init=False, default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "apo_kernels.bench.runner"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=_worker_env())
        self.proc.stdin.write(json.dumps(self.job))
        self.proc.stdin.close()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_message(self) -> tuple[str, dict] | None:
        """Next ``(kind, payload)``; ``None`` when the worker ended; raises TimeoutError."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"no result within {self.timeout_s:.0f} s") from None
            if line is None:
                self.proc.wait()
                return None
            for tag in (ROW, ENV):
                if line.startswith(tag):
                    return tag, json.loads(line[len(tag):])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def failure(self) -> str:
        """A one-line reason from the worker's stderr."""
        self.stderr.seek(0)
        text = self.stderr.read()
        if "OutOfMemoryError" in text or "out of memory" in text.lower():
            return "out of memory"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return (lines[-1] if lines else f"worker exited with code {self.proc.returncode}")[:300]


def probe(dtype: str, timeout_s: float = 300) -> Probe:
    """Environment and matmul rate, measured in a worker (the parent never touches the GPU)."""
    w = _Worker({"probe": dtype}, timeout_s)
    msg = w.next_message()
    if msg is None:
        raise RuntimeError(f"benchmark worker failed: {w.failure()}")
    payload = msg[1]
    return Probe(payload["env"], payload["gemm_tflops"], payload["gemm_dtype"])


def run_specs(specs: Sequence[Spec], probe_result: Probe, *, isolate: str = "auto",
              timeout_s: float = 900, budget_s: float | None = None,
              on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Measure every spec, in order, and return the rows in the order of ``specs``."""
    from .providers import all_providers

    env, gemm = probe_result.env, probe_result.gemm_tflops
    cuda = env["device_kind"] == "cuda"
    if isolate == "auto":
        isolate = "batch" if cuda else "process"
    if isolate not in ("batch", "process", "shared"):
        raise ValueError(f"isolate must be 'auto', 'batch', 'process' or 'shared', got {isolate!r}")
    providers = all_providers()
    deadline = None if budget_s is None else time.monotonic() + budget_s
    rows: dict[int, BenchRow] = {}

    def emit(i: int, row: BenchRow) -> None:
        rows[i] = row
        if on_row:
            on_row(row)

    todo: list[int] = []
    for i, spec in enumerate(specs):
        if spec.provider not in providers:
            raise ValueError(f"unknown provider {spec.provider!r}; choose from {list(providers)}")
        reason = providers[spec.provider].skip_reason(spec, cuda)
        if reason:
            emit(i, row_for(spec, env, "skipped", reason))
        else:
            todo.append(i)
    groups: list[list[int]] = []
    for i in todo:  # batch mode: consecutive specs of one provider share a worker
        same = groups and specs[groups[-1][-1]].provider == specs[i].provider
        if groups and (isolate == "shared" or (isolate == "batch" and same)):
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        pending = list(group)
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                for i in pending:
                    emit(i, row_for(specs[i], env, "skipped", "time budget of the run used up"))
                break
            job = {"gemm": gemm, "specs": [specs[i].to_json() for i in pending],
                   "deadline_s": None if deadline is None else deadline - time.monotonic()}
            w = _Worker(job, timeout_s)
            while pending:
                try:
                    msg = w.next_message()
                except TimeoutError as exc:  # a fresh worker takes the rest
                    i = pending.pop(0)
                    emit(i, row_for(specs[i], env, "error", str(exc)))
                    break
                if msg is None:  # the worker died on pending[0]
                    i = pending.pop(0)
                    emit(i, row_for(specs[i], env, "error", w.failure()))
                    break
                emit(pending.pop(0), BenchRow(**msg[1]))
            w.kill()
    return [rows[i] for i in range(len(specs))]


# ---------------------------------------------------------------------------------- worker side
def _error_reason(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def _worker_main() -> None:
    import gc

    import torch

    from .env import environment
    from .measure import gemm_tflops, measure
    from .providers import all_providers

    job = json.loads(sys.stdin.read())
    env = environment()
    cuda = env["device_kind"] == "cuda"
    if "probe" in job:
        dtype = "bfloat16" if cuda else job["probe"]
        rate = gemm_tflops(cuda, getattr(torch, dtype))
        print(ENV + json.dumps({"env": env, "gemm_tflops": rate, "gemm_dtype": dtype}), flush=True)
        return
    start = time.monotonic()
    providers = all_providers()
    for raw in job["specs"]:
        spec = Spec(**raw)
        if job.get("deadline_s") is not None and time.monotonic() - start > job["deadline_s"]:
            row = row_for(spec, env, "skipped", "time budget of the run used up")
        else:
            try:
                row = measure(spec, providers[spec.provider], env, job["gemm"])
            except Exception as exc:  # one failing provider must not stop the suite
                row = row_for(spec, env, "error", _error_reason(exc))
        print(ROW + json.dumps(row.to_csv()), flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    _worker_main()
