"""Run a test script under ``torchrun --standalone --nproc_per_node=N`` (gloo, CPU) from pytest.

Each script in this folder is a self-contained worker: it builds its inputs from a fixed seed,
computes the one-process result on every rank (the ground truth), runs the distributed layout,
compares, and exits non-zero with a message on any mismatch. ``run_torchrun`` fails the calling
test with the workers' output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> str:
    """Launch ``tests/distributed/<script>`` on ``nproc`` CPU processes; return its output.

    Raises AssertionError (with the last 6000 characters of output) when any worker fails.
    """
    full_env = dict(os.environ)
    full_env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TRITON_INTERPRET": "1",
        # One thread per worker: the CI machine has 2 cores and 2 workers.
        "OMP_NUM_THREADS": "1",
    })
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HERE / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def run_cases(script: str, cases: tuple[str, ...], *, nproc: int, results: Path, results_env: str,
              timeout: float = 600.0) -> str:
    """One launch of a worker that writes a ``CASE <name> ok|FAIL ...`` line per case to the file
    named by the environment variable ``results_env``; returns those verdicts and the output's
    tail, also when the launch fails (each case's test then reports its own verdict)."""
    try:
        output = run_torchrun(script, *cases, nproc=nproc, timeout=timeout,
                              env={results_env: str(results)})
    except AssertionError as err:
        output = str(err)
    verdicts = results.read_text() if results.exists() else ""
    return f"{verdicts}\n--- worker output (tail) ---\n{output[-3000:]}"


def expect_case_ok(report: str, case: str, what: str) -> None:
    """Fail the calling test unless ``report`` (from :func:`run_cases`) says ``case`` passed."""
    import pytest

    lines = report.splitlines()
    verdict = [i for i, line in enumerate(lines) if line.startswith(f"CASE {case} ")]
    if not verdict or not lines[verdict[0]].startswith(f"CASE {case} ok"):
        detail = lines[verdict[0]: verdict[0] + 9] if verdict else ["no verdict"]
        pytest.fail(f"{what} case {case}:\n" + "\n".join(detail) + "\n" + report[-3000:])
