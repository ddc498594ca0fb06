"""A server that dies in the middle of a step, after answering some requests, stops the run as
an unreachable server does, and what was finished before the death is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from clair_testlib import student_answer

from apo_kernels.clair.cli import main
from apo_kernels.clair.io import read_records

TESTLIB = Path(__file__).with_name("clair_testlib.py")
N_FAST, N_SLOW = 3, 3
# One retry schedule: 6 retries, waits of at least 0.25 + 0.5 + 1 + 2 + 2 + 2 = 7.75 s (at most
# twice that). A gone server is recognised after two failed connection attempts per request.
RETRY = ["--timeout", "5", "--max-retries", "6", "--backoff-base", "0.5", "--backoff-max",
         "4", "--no-progress"]
SCHEDULE_MIN = 7.75


def prompt_text(n: int) -> str:
    return f"Q{n}: what is {n} plus nothing?"


class ServerProcess:
    """The test server in its own process, so it can be killed like a real one."""

    def __init__(self, config: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, str(TESTLIB), json.dumps(config)],
                                     stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()
        assert self.base_url.startswith("http://127.0.0.1:"), self.base_url

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server_process():
    # Items N_FAST.. hang in the server until it is killed (or 60 s pass).
    s = ServerProcess({"always": {f"student:{n}": "slow:60"
                                  for n in range(N_FAST, N_FAST + N_SLOW)}})
    try:
        yield s
    finally:
        s.kill()


def kill_when_stored(server: ServerProcess, store: Path, n: int, killed: dict) -> None:
    """Kill the server once ``n`` items are in the store (the others are then in flight)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if store.exists() and len(store.read_text().splitlines()) >= n:
            break
        time.sleep(0.02)
    time.sleep(0.2)  # the slow requests are all inside the server by now
    server.kill()
    killed["t"] = time.monotonic()


def test_server_killed_mid_step_stops_the_run(tmp_path, server_process, capsys):
    n = N_FAST + N_SLOW
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"prompt": prompt_text(i)}) + "\n" for i in range(n)))
    out = tmp_path / "o"
    url = server_process.base_url
    args = ["clair", "run", "-i", str(inp), "-o", str(out), "--model", "student",
            "--base-url", url, "--reviser-model", "teacher", "--reviser-base-url", url,
            "--concurrency", str(n), "--no-hf-dataset", *RETRY]
    killed: dict = {}
    killer = threading.Thread(target=kill_when_stored,
                              args=(server_process, out / "generate.store.jsonl", N_FAST, killed))
    killer.start()
    rc = main(args)
    stopped = time.monotonic()
    killer.join()
    err = capsys.readouterr().err

    # Stopped as an unreachable server: same message, same exit code, in the generate step.
    assert rc == 1
    assert f"clair run: error: generate: cannot reach the server at {url}: connection error" in err
    assert "stopped early" in err and "rerun the same command" in err
    # It did not go on to revise against the dead server (that cost a second retry schedule).
    assert not (out / "revise.store.jsonl").exists()
    assert "revise:" not in err
    # Well within one retry schedule of the death (before: two of them, and a step more).
    assert stopped - killed["t"] < SCHEDULE_MIN - 2.5
    assert "the server is not answering" in err

    # What finished before the death is kept; the in-flight items are transient failures.
    gens = read_records(out / "generations.jsonl")
    assert [g["response"] for g in gens] == [student_answer(i) for i in range(N_FAST)]
    fails = read_records(out / "generate.failures.jsonl")
    assert sorted(f["index"] for f in fails) == list(range(N_FAST, n))
    assert all(f["transient"] for f in fails)

    # Resumable: with a server back (another one, another port), the same command sends only
    # the items that were in flight, then goes on.
    with_server = ServerProcess({})
    try:
        args[args.index("--base-url") + 1] = with_server.base_url
        args[args.index("--reviser-base-url") + 1] = with_server.base_url
        assert main(args) == 0, capsys.readouterr().err
    finally:
        with_server.kill()
    gen_store = [json.loads(line) for line in
                 (out / "generate.store.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in gen_store if r["error"] is None) == list(range(n))
    assert len(read_records(out / "pairs.jsonl")) == n


def test_a_server_still_answering_a_request_is_not_gone(chat_server):
    """The server stops taking connections while one request is still being answered: the
    other request fails to connect, but the server is not declared gone (it is busy, and the
    slow reply does arrive)."""
    import asyncio

    from apo_kernels.clair.client import ChatClient, RetryPolicy

    s = chat_server
    s.always[("student", 1)] = "slow:1.5"

    async def scenario():
        retry = RetryPolicy(max_retries=3, backoff_base=0.05, backoff_max=0.1)
        async with ChatClient(s.base_url, "student", retry=retry, timeout=5) as c:
            slow = asyncio.create_task(c.chat([{"role": "user", "content": prompt_text(1)}]))
            while not s.inflight:  # the slow request is inside the server
                await asyncio.sleep(0.01)
            s.httpd.shutdown()  # stop accepting: new connections are refused
            s.httpd.socket.close()
            refused = await c.chat([{"role": "user", "content": prompt_text(2)}])
            return await slow, refused

    slow, refused = asyncio.run(scenario())
    assert refused.attempts == 4 and "ConnectError" in refused.error
    assert refused.transient and not refused.unreachable
    assert slow.ok and slow.text == student_answer(1)
