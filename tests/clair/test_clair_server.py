"""End-to-end CLAIR pipeline against a real HTTP server with injected faults."""

from __future__ import annotations

import json

import pytest
from clair_testlib import USAGE, student_answer, teacher_reply

from apo_kernels.clair.backends import OpenAIBackend
from apo_kernels.clair.client import RetryPolicy
from apo_kernels.clair.io import read_records
from apo_kernels.clair.pipeline import build, generate, revise

N = 13
MAX_RETRIES = 2
CONCURRENCY = 4
SYSTEM = "Be brief."


def prompt_text(n: int) -> str:
    return f"Q{n}: what is {n} plus nothing?"


def make_records() -> list[dict]:
    recs = []
    for n in range(N):
        r: dict = {"prompt": prompt_text(n)}
        if n == 10:  # an existing answer: used as is, never sent to the student
            r["response"] = student_answer(10)
        if n == 11:  # chat-messages prompt
            r["prompt"] = [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": prompt_text(11)}]
        recs.append(r)
    return recs


def backend(server, model: str) -> OpenAIBackend:
    return OpenAIBackend(server.base_url, model, api_key="sk-test", concurrency=CONCURRENCY,
                         timeout=0.5, seed=0,
                         retry=RetryPolicy(max_retries=MAX_RETRIES, backoff_base=0.01,
                                           backoff_max=0.05),
                         params={"max_tokens": 64, "temperature": 0.0})


def script_faults(s) -> None:
    s.faults[("student", 0)] = ["drop"]  # connection closed without a response
    s.faults[("student", 1)] = ["500", "500"]
    s.faults[("student", 2)] = ["429:0.3"]
    s.always[("student", 5)] = "500"  # never recovers
    s.faults[("teacher", 3)] = ["slow:1.5"]  # past the 0.5 s timeout once
    s.always[("teacher", 4)] = ("content", "I think the answer is fine as it is.", "stop")
    s.faults[("teacher", 6)] = ["badjson"]
    truncated = "<reasoning>\nFix it.\n</reasoning>\n<revised_answer>\nQ7 answer: the tot"
    s.always[("teacher", 7)] = ("content", truncated, "length")
    meta = ("<reasoning>x</reasoning>\n<revised_answer>\nHere is the corrected answer: "
            "Q8 answer: the total is 8.\n</revised_answer>")
    s.always[("teacher", 8)] = ("content", meta, "stop")
    s.always[("teacher", 9)] = ("content", teacher_reply(student_answer(9), 9), "stop")
    s.always[("teacher", 12)] = "400"


def run_all(server, out, retry_failed=False):
    g = generate(make_records(), out, backend(server, "student"), response_field="response",
                 retry_failed=retry_failed, progress=False)
    r = revise(read_records(out / "generations.jsonl"), out, backend(server, "teacher"),
               retry_failed=retry_failed, progress=False)
    b = build(read_records(out / "revisions.jsonl"), out)
    return g, r, b


def expected_string_pairs() -> list[dict]:
    rows = []
    for n in (0, 1, 2, 3, 6, 10, 11):
        prompt = prompt_text(n) if n != 11 else f"System: {SYSTEM}\n\nUser: {prompt_text(11)}"
        rows.append({"prompt": prompt, "chosen": f"Q{n} answer: the total is {n}.",
                     "rejected": student_answer(n),
                     "rationale": f"Fix the spelling and the total for Q{n}."})
    return rows


def snapshot(out) -> dict:
    return {name: (out / name).read_text() for name in
            ("generations.jsonl", "revisions.jsonl", "pairs.jsonl", "pairs.messages.jsonl",
             "generate.failures.jsonl", "revise.failures.jsonl", "build.skipped.jsonl")}


def test_pipeline_with_faults(chat_server, tmp_path):
    s = chat_server
    script_faults(s)
    out = tmp_path / "out"
    g, r, b = run_all(s, out)

    # Exactly the expected pairs, in input order, in both forms.
    pairs = read_records(out / "pairs.jsonl")
    assert pairs == expected_string_pairs()
    msg_pairs = read_records(out / "pairs.messages.jsonl")
    assert [p["chosen"] for p in msg_pairs] == [
        [{"role": "assistant", "content": p["chosen"]}] for p in pairs]
    assert msg_pairs[-1]["prompt"] == [{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": prompt_text(11)}]
    assert msg_pairs[0]["prompt"] == [{"role": "user", "content": prompt_text(0)}]
    import datasets

    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.column_names == ["prompt", "chosen", "rejected", "rationale"]
    assert ds.to_list() == pairs
    assert datasets.load_from_disk(str(out / "dataset.messages")).to_list() == msg_pairs

    # Generate failures: item 5 gave up after 1 + MAX_RETRIES attempts of HTTP 500.
    gfail = read_records(out / "generate.failures.jsonl")
    assert [(f["index"], f["status"], f["attempts"]) for f in gfail] == [
        (5, 500, MAX_RETRIES + 1)]
    assert gfail[0]["error"] == f"HTTP 500 (gave up after {MAX_RETRIES + 1} attempts)"
    assert gfail[0]["raw"] == '{"error": "scripted 500"}'
    assert gfail[0]["prompt"] == prompt_text(5)

    # Revise failures: unparseable, truncated, self-referring, and a non-retried 400.
    rfail = {f["index"]: f for f in read_records(out / "revise.failures.jsonl")}
    assert sorted(rfail) == [4, 7, 8, 12]
    assert rfail[4]["kind"] == "parse" and rfail[4]["raw"] == "I think the answer is fine as it is."
    assert rfail[4]["error"].startswith("no <revised_answer> block")
    assert rfail[7]["kind"] == "parse" and "truncated" in rfail[7]["error"]
    assert rfail[7]["raw"].endswith("the tot") and rfail[7]["finish_reason"] == "length"
    assert rfail[8]["kind"] == "parse" and "refers to itself" in rfail[8]["error"]
    assert rfail[12]["kind"] == "request" and rfail[12]["status"] == 400
    assert rfail[12]["attempts"] == 1 and rfail[12]["raw"] == '{"error": "scripted 400"}'
    for i, f in rfail.items():
        assert f["original"] == student_answer(i)

    # Identical revision: not a pair, listed as skipped.
    skipped = read_records(out / "build.skipped.jsonl")
    assert [(x["index"], x["response"]) for x in skipped] == [(9, student_answer(9))]

    # Attempts per item: retries happened exactly where faults were injected.
    assert s.count("student", 0) == 2
    assert s.count("student", 1) == 3
    assert s.count("student", 2) == 2
    assert s.count("student", 5) == MAX_RETRIES + 1
    assert s.count("student", 10) == 0  # existing answer used
    assert s.count("teacher", 3) == 2 and s.count("teacher", 6) == 2
    assert s.count("teacher", 12) == 1 and s.count("teacher", 5) == 0
    # Retry-After was honoured (backoff alone would have waited <= 0.05 s).
    t = [c["t"] for c in s.calls if c["model"] == "student" and c["n"] == 2]
    assert t[1] - t[0] >= 0.29
    # Requests carried model, key, parameters and the chat messages as given.
    c11 = next(c for c in s.calls if c["model"] == "student" and c["n"] == 11)
    assert c11["messages"] == make_records()[11]["prompt"]
    assert c11["body"]["max_tokens"] == 64 and c11["body"]["temperature"] == 0.0
    assert c11["body"]["model"] == "student" and c11["auth"] == "Bearer sk-test"
    c10 = next(c for c in s.calls if c["model"] == "teacher" and c["n"] == 10)
    assert f"<student_answer>\n{student_answer(10)}\n</student_answer>" in c10["messages"][0][
        "content"]
    assert 1 < s.max_inflight <= CONCURRENCY

    # Counts and token usage totals (successful replies only).
    assert (g.total, g.ok, g.failed, g.skipped, g.ran) == (N, N - 1, 1, 1, N - 1)
    assert g.usage["prompt_tokens"] == USAGE["prompt_tokens"] * (N - 2)
    assert g.usage["total_tokens"] == USAGE["total_tokens"] * (N - 2)
    assert g.usage["retries"] == 1 + 2 + 1 + MAX_RETRIES
    assert (r.total, r.ok, r.failed, r.ran) == (N - 1, 8, 4, N - 1)  # 8 = 7 pairs + identical
    assert r.usage["completion_tokens"] == USAGE["completion_tokens"] * (N - 2)
    assert (b.ok, b.skipped) == (7, 1)
    summary = json.loads((out / "revise.summary.json").read_text())
    assert summary["ok"] == 8

    # Item 5's HTTP 500s are transient: recorded, not done. The other failures are permanent.
    assert gfail[0]["transient"] is True and g.transient == 1
    assert not any(f["transient"] for f in rfail.values()) and r.transient == 0
    assert g.failure_reasons == {gfail[0]["error"]: 1}

    # A rerun of the same command retries only the transient failure (still failing here) and
    # writes the same files.
    before = snapshot(out)
    n_calls = len(s.calls)
    g2, r2, _ = run_all(s, out)
    assert [(c["model"], c["n"]) for c in s.calls[n_calls:]] == [("student", 5)] * (
        MAX_RETRIES + 1)
    assert g2.ran == 1 and r2.ran == 0
    assert (g2.cached, r2.cached) == (N - 2, N - 1)
    assert snapshot(out) == before
    n_calls = len(s.calls)

    # --retry-failed redoes exactly the failed items (and nothing else).
    run_all(s, out, retry_failed=True)
    redone = sorted({(c["model"], c["n"]) for c in s.calls[n_calls:]})
    assert redone == [("student", 5), ("teacher", 4), ("teacher", 7), ("teacher", 8),
                      ("teacher", 12)]
    assert read_records(out / "pairs.jsonl") == expected_string_pairs()


def test_changing_template_or_model_does_not_reuse(chat_server, tmp_path):
    s = chat_server
    out = tmp_path / "o"
    recs = [{"prompt": prompt_text(n), "response": student_answer(n)} for n in range(3)]
    revise(recs, out, backend(s, "teacher"), progress=False)
    assert len(s.calls) == 3
    tpl = tmp_path / "t.txt"
    tpl.write_text("Task: {{prompt}}\n<student_answer>\n{{response}}\n</student_answer>\n"
                   "Reply with <reasoning> and <revised_answer> {braces ok}.")
    from apo_kernels.clair.prompts import load_template

    revise(recs, out, backend(s, "teacher"), template=load_template(tpl), progress=False)
    assert len(s.calls) == 6
    assert s.calls[-1]["messages"][0]["content"].startswith("Task: Q")
    assert "{braces ok}" in s.calls[-1]["messages"][0]["content"]
    assert [r["revision"] for r in read_records(out / "revisions.jsonl")] == [
        f"Q{n} answer: the total is {n}." for n in range(3)]


def test_cli_api_key_from_named_env_only(chat_server, tmp_path, monkeypatch, capsys):
    from apo_kernels.clair.cli import main

    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": prompt_text(1)}) + "\n")
    base = ["clair", "generate", "-i", str(inp), "-o", str(tmp_path / "o"), "--model", "student",
            "--base-url", chat_server.base_url, "--no-progress"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-server")
    monkeypatch.delenv("MY_KEY", raising=False)
    assert main([*base, "--api-key-env", "MY_KEY"]) == 2
    assert "--api-key-env: environment variable MY_KEY is not set" in capsys.readouterr().err
    assert main(base) == 0  # no key named: none sent, even though OPENAI_API_KEY is set
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert main([*base, "--api-key-env", "MY_KEY", "--seed", "3"]) == 0
    assert [c["auth"] for c in chat_server.calls] == [None, "Bearer sk-mine"]
    assert read_records(tmp_path / "o" / "generations.jsonl")[0]["response"] == student_answer(1)


def test_missing_prompt_field_names_fields(tmp_path, chat_server):
    from apo_kernels.clair.io import ClairInputError

    with pytest.raises(ClairInputError, match=r"no field 'prompt'.*--prompt-field.*"
                                              r"\['question', 'x'\]"):
        generate([{"question": "Q1", "x": 1}], tmp_path, backend(chat_server, "student"),
                 progress=False)
