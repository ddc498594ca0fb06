"""Kill-and-resume: a CLI run killed with SIGKILL mid-way, then rerun, loses and repeats
nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from clair_testlib import ChatServer, student_answer

from apo_kernels.clair.io import read_records

REPO = Path(__file__).resolve().parents[2]
N = 40
CONCURRENCY = 2


def _cmd(inp: Path, out: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "apo_kernels.clair.cli", "clair", "run", "-i", str(inp),
            "-o", str(out), "--model", "student", "--base-url", url,
            "--reviser-model", "teacher", "--reviser-base-url", url,
            "--concurrency", str(CONCURRENCY), "--timeout", "10", "--max-retries", "1",
            "--backoff-base", "0.01", "--no-progress", "--format", "string", "--no-hf-dataset"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _store_keys(path: Path) -> list[str]:
    keys = []
    for line in path.read_bytes().splitlines():
        keys.append(json.loads(line)["key"])
    return keys


def test_kill_and_resume(tmp_path):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"Q{n}: what is {n} plus nothing?"}) + "\n"
                           for n in range(N)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OPENAI_API_KEY", None)
    with ChatServer(delay=0.03) as s:
        proc = subprocess.Popen(_cmd(inp, out, s.base_url), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        store = out / "revise.store.jsonl"
        deadline = time.monotonic() + 60
        try:
            while _lines(store) < 6:  # kill part way through the revise step
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the run never got to the revise step"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert not (out / "pairs.jsonl").exists()
        done_before = set(_store_keys(store)) if _lines(store) else set()
        assert 6 <= len(done_before) < N
        calls_before = Counter((c["model"], c["n"]) for c in s.calls)

        s.delay = 0.0
        res = subprocess.run(_cmd(inp, out, s.base_url), cwd=tmp_path, env=env,
                             capture_output=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr.decode()
        calls = Counter((c["model"], c["n"]) for c in s.calls)

    # Every item exactly once, in input order, with the expected contents.
    pairs = read_records(out / "pairs.jsonl")
    assert [p["prompt"] for p in pairs] == [f"Q{n}: what is {n} plus nothing?" for n in range(N)]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (f"Q{n} answer: the total is {n}.", student_answer(n)) for n in range(N)]
    # The stores hold each key once: finished items were not redone.
    for name in ("generate.store.jsonl", "revise.store.jsonl"):
        keys = _store_keys(out / name)
        assert len(keys) == len(set(keys)) == N, name
    # The answers were all generated before the kill: none was requested again.
    assert all(calls[("student", n)] == 1 for n in range(N))
    # Revisions: one call each, except the ones in flight at the kill (at most the concurrency).
    revise_index = {json.loads(line)["key"]: json.loads(line)["index"]
                    for line in (out / "revise.store.jsonl").read_bytes().splitlines()}
    finished_before = {revise_index[k] for k in done_before}
    assert all(calls_before[("teacher", n)] == 1 for n in finished_before)
    assert all(calls[("teacher", n)] == 1 for n in finished_before)
    repeated = [n for n in range(N) if calls[("teacher", n)] > 1]
    assert all(calls[("teacher", n)] == 2 for n in repeated)
    assert len(repeated) <= CONCURRENCY
