"""Structured reviser output: JSON schema through ``response_format``, tagged fallback."""

from __future__ import annotations

import json

import pytest
from clair_testlib import ChatServer, student_answer, teacher_json_reply, teacher_revision

from apo_kernels.clair.backends import OpenAIBackend
from apo_kernels.clair.cli import main
from apo_kernels.clair.client import RetryPolicy
from apo_kernels.clair.io import read_records
from apo_kernels.clair.pipeline import revise
from apo_kernels.clair.prompts import DEFAULT_TEMPLATE, load_template
from apo_kernels.clair.structured import (
    RESPONSE_FORMAT,
    SCHEMA,
    json_template,
    parse_json_revision,
    parse_reply,
)

N = 6


def prompt_text(n: int) -> str:
    return f"Q{n}: what is {n} plus nothing?"


def records(n: int = N) -> list[dict]:
    return [{"prompt": prompt_text(i), "response": student_answer(i)} for i in range(n)]


def backend(url: str, concurrency: int = 2) -> OpenAIBackend:
    return OpenAIBackend(url, "teacher", concurrency=concurrency, timeout=2.0, seed=0,
                         retry=RetryPolicy(max_retries=1, backoff_base=0.01, backoff_max=0.02))


def expected_revisions(n: int = N) -> list[str]:
    return [teacher_revision(student_answer(i), i) for i in range(n)]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("raw, revision, rationale", [
    ('{"reasoning": "why", "revised_answer": "Fixed."}', "Fixed.", "why"),
    # a fence, and words around the object (nothing enforced the schema)
    ('```json\n{"reasoning": "r", "revised_answer": "A\\n  B"}\n```', "A\n  B", "r"),
    ('Sure! {"revised_answer": "x", "reasoning": "r"} Hope that helps.', "x", "r"),
    # reasoning is optional when parsing; braces inside strings are fine
    ('{"revised_answer": "use {braces} here"}', "use {braces} here", ""),
])
def test_parse_json_ok(raw, revision, rationale):
    r = parse_json_revision(raw, "stop")
    assert r.ok, r.error
    assert (r.revision, r.rationale) == (revision, rationale)


@pytest.mark.parametrize("raw, finish, error", [
    ("", "stop", "empty reply"),
    ("I think it is fine.", "stop", "not a JSON object"),
    ('{"reasoning": "r", "revised_answer": "cut o', "length", "truncated"),
    ('{"reasoning": "r"}', "stop", "must be strings"),
    ('{"reasoning": 3, "revised_answer": "x"}', "stop", "must be strings"),
    ('{"reasoning": "r", "revised_answer": "  "}', "stop", "empty revised answer"),
    ('{"revised_answer": "Here is the corrected version: 4"}', "stop", "refers"),
    ("[1, 2]", "stop", "not a JSON object"),
])
def test_parse_json_failures(raw, finish, error):
    r = parse_json_revision(raw, finish)
    assert not r.ok and error in r.error


def test_parse_reply_tries_the_other_format():
    tagged = "<reasoning>r</reasoning>\n<revised_answer>\nT\n</revised_answer>"
    js = '{"reasoning": "r", "revised_answer": "J"}'
    assert parse_reply(js, "json").revision == "J"
    assert parse_reply(tagged, "json").revision == "T"  # asked for JSON, wrote tags
    assert parse_reply(tagged, None).revision == "T"  # stores from before structured output
    assert parse_reply(js, "tagged").revision == "J"
    # Neither: the error of the format that was asked for.
    assert parse_reply("fine as is", "json").error.startswith("reply is not a JSON object")
    assert parse_reply("fine as is", "tagged").error.startswith("no <revised_answer>")
    # A content refusal in the asked format is final (not rescued by the other parser).
    meta = '{"revised_answer": "I have revised it: 4"}'
    assert "refers" in parse_reply(meta, "json").error


def test_json_template_and_schema():
    tpl = load_template()
    jt = json_template(tpl)
    assert "<revised_answer>" not in jt.text and '"revised_answer"' in jt.text
    assert jt.text.startswith(DEFAULT_TEMPLATE[:200])
    assert "{{prompt}}" in jt.text and "{{response}}" in jt.text
    assert list(SCHEMA["properties"]) == ["reasoning", "revised_answer"]  # reasoning first
    assert RESPONSE_FORMAT["type"] == "json_schema"
    assert RESPONSE_FORMAT["json_schema"]["schema"] is SCHEMA


# ----------------------------------------------------------------------------- fake servers


def test_schema_reply_is_parsed_into_revisions(tmp_path):
    """A server that honours response_format (vLLM, llama.cpp, OpenAI): every request carries
    the schema and the JSON prompt, and the JSON replies become revisions."""
    with ChatServer(schema="honour") as s:
        st = revise(records(), tmp_path, backend(s.base_url), progress=False, structured="on")
    assert (st.ok, st.failed) == (N, 0)
    assert st.structured == {"requested": "on", "used": "json"}
    rows = read_records(tmp_path / "revisions.jsonl")
    assert [r["revision"] for r in rows] == expected_revisions()
    assert rows[0]["rationale"] == "Fix the spelling and the total for Q0."
    assert all(c["body"]["response_format"] == RESPONSE_FORMAT for c in s.calls)
    assert all('"revised_answer"' in c["messages"][0]["content"]
               and "<revised_answer>" not in c["messages"][0]["content"] for c in s.calls)
    store = [json.loads(x) for x in (tmp_path / "revise.store.jsonl").read_text().splitlines()]
    assert {r["format"] for r in store} == {"json"}
    assert json.loads(store[0]["text"]) == json.loads(teacher_json_reply(expected_revisions()[
        store[0]["index"]], store[0]["index"]))


@pytest.mark.parametrize("schema", ["reject", "ignore"])
def test_auto_falls_back_to_tags_for_the_rest_of_the_run(schema, tmp_path):
    """A server that rejects response_format (HTTP 400) or ignores it (answers in tags): auto
    switches to the tagged prompt without response_format after the first reply, and no item is
    lost to the probe."""
    with ChatServer(schema=schema) as s:
        st = revise(records(), tmp_path, backend(s.base_url, concurrency=1), progress=False,
                    structured="auto")
    assert (st.ok, st.failed) == (N, 0)
    assert [r["revision"] for r in read_records(tmp_path / "revisions.jsonl")] == (
        expected_revisions())
    asked = ["response_format" in c["body"] for c in s.calls]
    assert asked[0] and not any(asked[1:])  # one probe, then tags only
    assert "<revised_answer>" in s.calls[-1]["messages"][0]["content"]
    # Rejected: the probed item is sent again in the tagged format; ignored: its tagged reply
    # is used as it is.
    assert len(s.calls) == N + (schema == "reject")
    assert st.structured["used"] == "tagged"
    reason = {"reject": "the server rejected response_format (HTTP 400)",
              "ignore": "a reply did not follow the JSON schema"}[schema]
    assert st.structured["fallback"].startswith(reason)


def test_on_and_off(tmp_path):
    with ChatServer(schema="reject") as s:  # on: never falls back, the 400s are failures
        st = revise(records(2), tmp_path / "on", backend(s.base_url), progress=False,
                    structured="on")
        assert (st.ok, st.failed) == (0, 2)
        fails = read_records(tmp_path / "on" / "revise.failures.jsonl")
        assert {f["status"] for f in fails} == {400}
        n = len(s.calls)
        st = revise(records(2), tmp_path / "off", backend(s.base_url), progress=False,
                    structured="off")
        assert (st.ok, st.failed) == (2, 0)
        assert not any("response_format" in c["body"] for c in s.calls[n:])


def test_auth_errors_do_not_switch_format(tmp_path, chat_server):
    chat_server.always[("teacher", 0)] = "401echo"
    st = revise(records(3), tmp_path, backend(chat_server.base_url, concurrency=1),
                progress=False, structured="auto")
    assert chat_server.count("teacher", 0) == 1  # not resent in another format
    assert st.failed == 1 and st.ok == 2


def test_cli_structured_flag(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    with ChatServer(schema="reject") as s:
        args = ["clair", "revise", "-i", str(inp), "-o", str(tmp_path / "o"), "--no-progress",
                "--reviser-model", "teacher", "--reviser-base-url", s.base_url,
                "--max-retries", "0"]
        assert main(args) == 0
        err = capsys.readouterr().err
        assert ("reply format: tagged (<revised_answer>) (--structured auto; fell back: the "
                "server rejected response_format (HTTP 400))") in err
        summary = json.loads((tmp_path / "o" / "revise.summary.json").read_text())
        assert summary["structured"]["used"] == "tagged"
        with pytest.raises(SystemExit) as info:  # argparse refuses
            main([*args, "--structured", "sometimes"])
    assert info.value.code == 2
    assert "--structured: invalid choice: 'sometimes'" in capsys.readouterr().err
