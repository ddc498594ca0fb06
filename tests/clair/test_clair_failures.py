"""Inputs with nothing to do, an unreachable server, and transient vs permanent failures."""

from __future__ import annotations

import json
import time

import pytest
from clair_testlib import student_answer

from apo_kernels.clair.backends import OpenAIBackend
from apo_kernels.clair.cli import main
from apo_kernels.clair.client import RetryPolicy, ServerUnreachableError
from apo_kernels.clair.io import ClairInputError, read_records
from apo_kernels.clair.pipeline import build, generate, is_transient, revise

FAST = ["--timeout", "2", "--max-retries", "2", "--backoff-base", "0.02", "--backoff-max",
        "0.05", "--no-progress"]


def prompt_text(n: int) -> str:
    return f"Q{n}: what is {n} plus nothing?"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def step_args(step: str, inp: str, out: str, url: str) -> list[str]:
    args = ["clair", step, "-i", inp, "-o", out]
    if step in ("generate", "run"):
        args += ["--model", "student", "--base-url", url]
    if step in ("revise", "run"):
        args += ["--reviser-model", "teacher", "--reviser-base-url", url]
    return args + (FAST if step != "build" else [])


def fast_backend(url: str, model: str, concurrency: int = 2, max_retries: int = 2):
    return OpenAIBackend(url, model, concurrency=concurrency, timeout=2.0, seed=0,
                         retry=RetryPolicy(max_retries=max_retries, backoff_base=0.02,
                                           backoff_max=0.05))


# ----------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("step", ["generate", "revise", "build", "run"])
@pytest.mark.parametrize("kind", ["empty", "blank_lines", "empty_json_list", "no_prompt_field"])
def test_cli_refuses_input_with_nothing_to_do(step, kind, tmp_path, chat_server, capsys):
    inp = tmp_path / ("in.json" if kind == "empty_json_list" else "in.jsonl")
    content = {"empty": "", "blank_lines": "\n  \n", "empty_json_list": "[]",
               "no_prompt_field": json.dumps({"question": prompt_text(1), "response": "a"})
               + "\n"}[kind]
    inp.write_text(content)
    rc = main(step_args(step, str(inp), str(tmp_path / "o"), chat_server.base_url))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"apo-kernels clair {step}: error: {inp}: " in err
    if kind == "no_prompt_field":
        assert "no field 'prompt' in any record (set it with --prompt-field)" in err
        assert "['question', 'response']" in err
    else:
        assert "no records (the input is empty)" in err
    assert chat_server.calls == []  # refused before any request
    assert not (tmp_path / "o").exists()


def test_cli_limit_must_leave_records(tmp_path, chat_server, capsys):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt_text(1)}])
    rc = main([*step_args("generate", inp, str(tmp_path / "o"), chat_server.base_url),
               "--limit", "0"])
    assert rc == 2 and "--limit: must be at least 1" in capsys.readouterr().err


def test_api_refuses_input_with_nothing_to_do(tmp_path, chat_server):
    be = fast_backend(chat_server.base_url, "student")
    with pytest.raises(ClairInputError, match=r"^input records: no records"):
        generate([], tmp_path, be, progress=False)
    with pytest.raises(ClairInputError, match=r"^prompts\.jsonl: no records"):
        revise([], tmp_path, be, progress=False, source="prompts.jsonl")
    with pytest.raises(ClairInputError, match=r"^input records: no records"):
        build([], tmp_path)
    no_field = [{"question": "x"}, {"text": "y"}]
    for call in (lambda: generate(no_field, tmp_path, be, progress=False),
                 lambda: revise(no_field, tmp_path, be, progress=False),
                 lambda: build(no_field, tmp_path)):
        with pytest.raises(ClairInputError,
                           match=r"no field 'prompt' in any record.*\['question', 'text'\]"):
            call()
    assert chat_server.calls == []


# ----------------------------------------------------------------------------- unreachable


def test_cli_unreachable_server_fails_fast_then_rerun_retries(tmp_path, dead_url, chat_server,
                                                              capsys):
    n = 30
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt_text(i)} for i in range(n)])
    out = tmp_path / "o"
    t0 = time.monotonic()
    rc = main([*step_args("generate", inp, str(out), dead_url), "--concurrency", "2"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1
    # Without failing fast this would be 15 rounds of 3 attempts with backoff.
    assert elapsed < 5, elapsed
    assert f"error: cannot reach the server at {dead_url}: connection error: ConnectError" in err
    assert "stopped early" in err and "rerun the same command" in err
    assert "generate failures by reason" in err and "not attempted" in err
    # At most the in-flight items were tried; each failure is recorded as transient.
    stored = [json.loads(line) for line in (out / "generate.store.jsonl").read_text().splitlines()]
    assert 1 <= len(stored) <= 2 and all(r["transient"] for r in stored)
    fails = read_records(out / "generate.failures.jsonl")
    assert len(fails) == n and all(f["transient"] for f in fails)
    assert sum(f["error"].startswith("not attempted") for f in fails) == n - len(stored)
    summary = json.loads((out / "generate.summary.json").read_text())
    assert (summary["failed"], summary["transient"], summary["ok"]) == (n, n, 0)

    # The server is back (at another address: the URL is not part of an item's key). The same
    # command, no --retry-failed, does every item.
    rc = main([*step_args("generate", inp, str(out), chat_server.base_url), "--concurrency", "2"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(c["n"] for c in chat_server.calls) == list(range(n))
    assert [g["response"] for g in read_records(out / "generations.jsonl")] == [
        student_answer(i) for i in range(n)]
    assert read_records(out / "generate.failures.jsonl") == []


def test_cli_run_unreachable_reviser(tmp_path, dead_url, chat_server, capsys):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt_text(i)} for i in range(4)])
    args = step_args("run", inp, str(tmp_path / "o"), chat_server.base_url)
    args[args.index("--reviser-base-url") + 1] = dead_url
    rc = main([*args, "--no-hf-dataset"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"clair run: error: revise: cannot reach the server at {dead_url}" in err
    assert not (tmp_path / "o" / "pairs.jsonl").exists()  # build never ran


def test_api_unreachable_raises_with_stats(tmp_path, dead_url):
    recs = [{"prompt": prompt_text(i)} for i in range(20)]
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError) as info:
        generate(recs, tmp_path, fast_backend(dead_url, "student", concurrency=4),
                 progress=False)
    assert time.monotonic() - t0 < 5
    e = info.value
    assert e.base_url == dead_url and "ConnectError" in e.last_error
    assert dead_url in str(e)
    assert e.stats.failed == e.stats.transient == 20 and e.stats.ok == 0
    assert 1 <= e.stats.ran <= 4 and e.stats.usage["requests"] >= 3
    assert (tmp_path / "generate.failures.jsonl").exists()


# ----------------------------------------------------------------------------- transient


def test_transient_failures_are_retried_by_a_plain_rerun(tmp_path, chat_server, capsys):
    s = chat_server
    s.always[("student", 1)] = "500"  # transient (server error)
    s.always[("student", 2)] = "400"  # permanent (bad request)
    s.always[("student", 3)] = "429:0"  # transient (rate limited)
    s.always[("student", 4)] = "badjson"  # permanent once retries are spent
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt_text(i)} for i in range(6)])
    out = tmp_path / "o"
    args = [*step_args("generate", inp, str(out), s.base_url), "--max-retries", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    # The terminal shows the reasons, the transient count and what to do.
    assert "generate failures by reason (4 items):" in err
    assert "1 x HTTP 500 (gave up after 2 attempts)" in err
    assert "1 x HTTP 400" in err and "1 x HTTP 429 (gave up after 2 attempts)" in err
    assert "2 transient (connection, timeout, 429/5xx): rerun the same command" in err
    assert "2 other(s) are kept as done, --retry-failed redoes them" in err
    fails = {f["index"]: f["transient"] for f in read_records(out / "generate.failures.jsonl")}
    assert fails == {1: True, 2: False, 3: True, 4: False}

    # The server recovers; a plain rerun redoes exactly the transient failures.
    s.always.clear()
    n_calls = len(s.calls)
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(c["n"] for c in s.calls[n_calls:]) == [1, 3]
    gens = {g["index"]: g["response"] for g in read_records(out / "generations.jsonl")}
    assert gens == {i: student_answer(i) for i in (0, 1, 3, 5)}
    # --retry-failed then redoes the permanent ones.
    n_calls = len(s.calls)
    assert main([*args, "--retry-failed"]) == 0
    assert sorted(c["n"] for c in s.calls[n_calls:]) == [2, 4]
    assert read_records(out / "generate.failures.jsonl") == []


def test_revise_transient_failure_retried(tmp_path, chat_server):
    s = chat_server
    s.always[("teacher", 1)] = "drop"  # connection closed without a reply: transient
    recs = [{"prompt": prompt_text(i), "response": student_answer(i)} for i in range(3)]
    r = revise(recs, tmp_path, fast_backend(s.base_url, "teacher", max_retries=1),
               progress=False)
    assert (r.ok, r.failed, r.transient) == (2, 1, 1)  # a dropped connection: not unreachable
    s.always.clear()
    r = revise(recs, tmp_path, fast_backend(s.base_url, "teacher"), progress=False)
    assert (r.ok, r.failed, r.cached, r.ran) == (3, 0, 2, 1)


def test_is_transient_reads_old_stores():
    assert is_transient({"error": "connection error: ConnectError: x (gave up after 7 attempts)"})
    assert is_transient({"error": "HTTP 503 (gave up after 7 attempts)", "status": 503})
    assert not is_transient({"error": "malformed reply (not a chat-completions JSON body) "
                                      "(gave up after 7 attempts)"})
    assert not is_transient({"error": "HTTP 400", "status": 400})
    assert not is_transient({"error": None, "text": "ok"})
    assert not is_transient({"error": "HTTP 500 (gave up after 2 attempts)", "transient": False})
