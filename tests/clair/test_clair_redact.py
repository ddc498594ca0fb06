"""An API key echoed back by a server (OpenAI's 401 body quotes it) never reaches a file, a
message or an exception."""

from __future__ import annotations

import json
import logging

import pytest
from clair_testlib import student_answer

from apo_kernels.clair.backends import OpenAIBackend
from apo_kernels.clair.cli import main
from apo_kernels.clair.client import RetryPolicy, ServerUnreachableError
from apo_kernels.clair.io import read_records
from apo_kernels.clair.pipeline import revise
from apo_kernels.clair.redact import REDACTED, Redactor, safe_url

KEY = "sk-proj-Zq8TESTKEYx3lK9vW2mN7bR4tY6uI0oP"
FAST = ["--timeout", "2", "--max-retries", "1", "--backoff-base", "0.02", "--backoff-max",
        "0.05"]


def prompt_text(n: int) -> str:
    return f"Q{n}: what is {n} plus nothing?"


def files_holding(root, needle: str) -> list[str]:
    """Every file under ``root`` (binary ones too: HF datasets) whose bytes contain
    ``needle``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.parametrize("command", ["generate", "revise", "run"])
def test_echoed_key_is_in_no_file_and_no_output(command, tmp_path, chat_server, monkeypatch,
                                                capfd, caplog):
    s = chat_server
    s.always[("student", 1)] = "401echo"
    s.always[("teacher", 2)] = "401echo"
    monkeypatch.setenv("MY_KEY", KEY)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": prompt_text(i), "response": student_answer(i)})
                           + "\n" for i in range(4)))
    out = tmp_path / "o"
    args = ["clair", command, "-i", str(inp), "-o", str(out), *FAST]
    if command in ("generate", "run"):
        args += ["--model", "student", "--base-url", s.base_url, "--api-key-env", "MY_KEY"]
    if command in ("revise", "run"):
        args += ["--reviser-model", "teacher", "--reviser-base-url", s.base_url,
                 "--reviser-api-key-env", "MY_KEY"]
    caplog.set_level(logging.DEBUG)  # httpx and anything else that logs
    assert main(args) == 0
    captured = capfd.readouterr()
    # The key was sent, and the server did quote it back.
    assert {c["auth"] for c in s.calls} == {f"Bearer {KEY}"}
    step = "revise" if command == "revise" else "generate"
    fails = read_records(out / f"{step}.failures.jsonl")
    assert len(fails) == 1 and fails[0]["status"] == 401
    assert f"Incorrect API key provided: {REDACTED}" in fails[0]["raw"]
    # Nowhere: no file under the output dir, no byte of stdout/stderr, no log record.
    assert files_holding(out, KEY) == []
    assert files_holding(out, KEY[8:24]) == []  # not even a piece of it
    assert KEY not in captured.out and KEY not in captured.err
    assert KEY not in caplog.text
    assert "1 x HTTP 401" in captured.err  # the failure is still reported


def test_key_in_transport_errors_and_exceptions(tmp_path, chat_server, dead_url):
    """httpx quotes an illegal header value (a key read with its newline) in its error; a URL
    may carry a password. Neither may come through in the store, the failures or the raised
    exception."""
    bad_key = KEY + "\n"
    retry = RetryPolicy(max_retries=0, backoff_base=0.01, backoff_max=0.01)
    recs = [{"prompt": prompt_text(0), "response": student_answer(0)}]
    be = OpenAIBackend(chat_server.base_url, "teacher", api_key=bad_key, concurrency=1,
                       timeout=2.0, retry=retry)
    revise(recs, tmp_path / "a", be, progress=False, structured="off")
    err = read_records(tmp_path / "a" / "revise.failures.jsonl")[0]["error"]
    assert err.startswith("connection error: LocalProtocolError: Illegal header value")
    assert f"Bearer {REDACTED}" in err and chat_server.calls == []  # never sent
    assert files_holding(tmp_path / "a", KEY) == []

    url = dead_url.replace("http://", "http://user:hunter2pass@")
    be = OpenAIBackend(url, "teacher", api_key=KEY, concurrency=1, timeout=2.0, retry=retry)
    with pytest.raises(ServerUnreachableError) as info:
        revise(recs, tmp_path / "b", be, progress=False, structured="off")
    assert "hunter2pass" not in str(info.value) and f"user:{REDACTED}@" in str(info.value)
    assert files_holding(tmp_path / "b", "hunter2pass") == []


def test_redactor():
    r = Redactor([KEY])
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}."}})
    assert KEY not in r(body) and REDACTED in r(body)
    odd = Redactor(["k+y/z=9\"q"])  # its URL-encoded and JSON-escaped forms too
    assert odd("u?key=k%2By%2Fz%3D9%22q") == f"u?key={REDACTED}"
    assert odd(json.dumps({"m": 'k+y/z=9"q'})) == json.dumps({"m": REDACTED})
    assert KEY not in r(f"headers: {{'Authorization': 'Bearer {KEY}'}}")
    assert r("Authorization: Basic dXNlcjpwYXNz") == f"Authorization: {REDACTED}"
    assert r("x-api-key: abc123secret") == f"x-api-key: {REDACTED}"
    assert r("Bearer abc.def.ghi") == f"Bearer {REDACTED}"
    # A key the server masked, or someone else's key: still key-shaped.
    assert r("Incorrect API key provided: sk-proj-****abcd") == (
        f"Incorrect API key provided: {REDACTED}")
    # Nested records, keys and values.
    assert r({"raw": [KEY, {"k": KEY}], KEY: 1}) == {"raw": [REDACTED, {"k": REDACTED}],
                                                     REDACTED: 1}
    assert r(None) is None and r(3) == 3
    # Reply text keeps earnest talk about tokens; only the real key goes.
    assert r.known("Send it as a Bearer token: sk-your-key-here") == (
        "Send it as a Bearer token: sk-your-key-here")
    assert r.known(f"the key is {KEY}") == f"the key is {REDACTED}"
    # Ordinary words are left alone.
    assert r("a task-oriented risk-averse desk") == "a task-oriented risk-averse desk"
    assert safe_url("https://me:secret@host/v1") == f"https://me:{REDACTED}@host/v1"
    assert safe_url("http://localhost:8000/v1") == "http://localhost:8000/v1"
