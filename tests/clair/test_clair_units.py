"""Unit tests: parsing, templates, store, inputs, report, CLI."""

from __future__ import annotations

import json
import random

import pytest

from apo_kernels.clair.client import RetryPolicy, chat_url, parse_retry_after
from apo_kernels.clair.io import ClairInputError, read_records, render_conversation
from apo_kernels.clair.parse import parse_revision
from apo_kernels.clair.prompts import DEFAULT_TEMPLATE, load_template
from apo_kernels.clair.report import contrastiveness_report, pair_metrics, tokenize
from apo_kernels.clair.store import JsonlStore, item_key

# ----------------------------------------------------------------------------- parse


@pytest.mark.parametrize("raw, revision, rationale", [
    ("<reasoning>\nwhy\n</reasoning>\n<revised_answer>\nFixed text.\n</revised_answer>",
     "Fixed text.", "why"),
    # case, spaces in tags, CRLF
    ("<Reasoning>why</Reasoning>\r\n< Revised_Answer >\r\nA\r\n  B\r\n</ REVISED_ANSWER >",
     "A\n  B", "why"),
    # missing closing tag but the model stopped normally
    ("<reasoning>r</reasoning><revised_answer>\nAll of it.\n", "All of it.", "r"),
    # unclosed reasoning followed by the answer block
    ("<reasoning>r\n<revised_answer>x</revised_answer>", "x", "r"),
    # whole reply fenced
    ("```xml\n<reasoning>r</reasoning>\n<revised_answer>\ny\n</revised_answer>\n```", "y", "r"),
    # a repeated label inside the block is dropped; code fences inside are kept
    ("<revised_answer>\nRevised answer:\n```py\nprint(1)\n```\n</revised_answer>",
     "```py\nprint(1)\n```", ""),
    # last block wins (a draft, then the final version)
    ("<revised_answer>draft</revised_answer> hmm <revised_answer>final</revised_answer>",
     "final", ""),
    # headings instead of tags
    ("**Reasoning:**\nThe sum is off.\n\n**Revised answer:**\nThe sum is 4.", "The sum is 4.",
     "The sum is off."),
    ("## Reasoning\nbad\n## Corrected answer\nGood.\n", "Good.", "bad"),
    # indentation of the first line kept, blank lines around removed
    ("<revised_answer>\n  \n    indented\n\n</revised_answer>", "    indented", ""),
])
def test_parse_ok(raw, revision, rationale):
    r = parse_revision(raw, "stop")
    assert r.ok, r.error
    assert (r.revision, r.rationale) == (revision, rationale)


@pytest.mark.parametrize("raw, finish, error", [
    ("", "stop", "empty reply"),
    (None, "stop", "empty reply"),
    ("The answer is fine.", "stop", "no <revised_answer>"),
    ("<reasoning>r</reasoning><revised_answer>\nThe ans", "length", "truncated"),
    ("Revised answer:\nThe ans", "length", "truncated"),
    ("<revised_answer>\n \n</revised_answer>", "stop", "empty revised answer"),
    ("<revised_answer>Here is the corrected version: 4</revised_answer>", "stop", "refers"),
    ("<revised_answer>The student's answer was close; it is 4.</revised_answer>", "stop",
     "refers"),
    ("<revised_answer>Unlike the original answer, 4.</revised_answer>", "stop", "refers"),
])
def test_parse_failures(raw, finish, error):
    r = parse_revision(raw, finish)
    assert not r.ok and r.revision is None
    assert error in r.error


def test_parse_meta_check_can_be_disabled_and_is_narrow():
    raw = "<revised_answer>I have revised the plan: 4</revised_answer>"
    assert not parse_revision(raw).ok
    assert parse_revision(raw, check_meta=False).revision == "I have revised the plan: 4"
    # Ordinary words are fine.
    ok = "<revised_answer>Correct: the improved engine revises its schedule.</revised_answer>"
    assert parse_revision(ok).ok
    # Phrases the task or the original answer use themselves are not self-reference.
    edu = "<revised_answer>Ask the student to explain the previous answer.</revised_answer>"
    assert not parse_revision(edu).ok
    assert parse_revision(edu, context="How do I check a student's previous answer?").ok
    assert not parse_revision(edu, context="How do I check a student's work?").ok


# ----------------------------------------------------------------------------- prompts


def test_template_render_and_override(tmp_path):
    t = load_template()
    assert t.text == DEFAULT_TEMPLATE and t.source == "builtin"
    # User text containing the placeholders is never substituted again.
    msg = t.render("say {{response}}", "I said {{prompt}}")
    assert "<task>\nsay {{response}}\n</task>" in msg
    assert "<student_answer>\nI said {{prompt}}\n</student_answer>" in msg
    f = tmp_path / "t.txt"
    f.write_text("P={{prompt}} R={{response}} {json: 1}")
    t2 = load_template(f)
    assert t2.render("a", "b") == "P=a R=b {json: 1}"
    assert t2.sha256 != t.sha256
    f.write_text("only {{prompt}}")
    with pytest.raises(ClairInputError, match=r"\{\{response\}\} must appear exactly once"):
        load_template(f)
    with pytest.raises(ClairInputError, match="--template: no file"):
        load_template(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- store


def test_store_tolerates_truncated_last_line(tmp_path):
    p = tmp_path / "s.jsonl"
    with JsonlStore(p) as s:
        s.append({"key": "a", "v": 1})
        s.append({"key": "b", "v": 2})
    with p.open("ab") as f:  # what a SIGKILL mid-write leaves
        f.write(b'{"key": "c", "v"')
    s = JsonlStore(p)
    assert set(s.records) == {"a", "b"}
    s.append({"key": "c", "v": 3})
    s.append({"key": "a", "v": 4})  # a later record of a key wins (retry-failed)
    s.close()
    lines = p.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c", "a"]
    assert JsonlStore(p).get("a") == {"key": "a", "v": 4}


def test_item_key_canonical():
    assert item_key({"a": 1, "b": [1, 2]}) == item_key({"b": [1, 2], "a": 1})
    assert item_key({"a": 1}) != item_key({"a": 2})
    assert len(item_key({})) == 64


# ----------------------------------------------------------------------------- client helpers


def test_retry_after_and_backoff():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "garbage"}) is None
    import email.utils
    import time

    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": date}) <= 30
    pol = RetryPolicy(backoff_base=1.0, backoff_max=5.0)
    rng = random.Random(0)
    for attempt, d in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (10, 5.0)]:
        delays = [pol.delay(attempt, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in delays)
        assert max(delays) - min(delays) > 0  # jittered
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


# ----------------------------------------------------------------------------- inputs


def test_read_formats(tmp_path):
    rows = [{"prompt": "a", "n": 1}, {"prompt": [{"role": "user", "content": "b"}], "n": 2}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
    assert read_records(tmp_path / "x.jsonl") == rows
    assert read_records(tmp_path / "x.json") == rows
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2}]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "x.parquet")
    assert read_records(tmp_path / "x.parquet") == flat
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(flat),
                               "test": datasets.Dataset.from_list(flat[:1])})
    dd.save_to_disk(str(tmp_path / "hf"))
    assert read_records(tmp_path / "hf") == flat
    assert read_records(tmp_path / "hf", split="test") == flat[:1]
    with pytest.raises(ClairInputError, match=r"no split 'dev' \(splits: \['test', 'train'\]\)"):
        read_records(tmp_path / "hf", split="dev")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ClairInputError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(ClairInputError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ClairInputError, match="unknown input format '.csv'"):
        read_records(tmp_path / "x.csv")


def test_render_conversation():
    assert render_conversation("hi") == "hi"
    assert render_conversation([{"role": "user", "content": "hi"}]) == "hi"
    assert render_conversation([{"role": "system", "content": "s"},
                                {"role": "user", "content": "u"}]) == "System: s\n\nUser: u"


# ----------------------------------------------------------------------------- report


def test_pair_metrics_exact():
    m = pair_metrics("a b c", "a b d")
    assert m["token_jaccard"] == pytest.approx(2 / 4)
    assert m["char_levenshtein"] == 1
    assert m["char_levenshtein_norm"] == pytest.approx(1 / 5)
    assert m["token_levenshtein_norm"] == pytest.approx(1 / 3)
    assert m["length_change"] == 0 and m["length_change_rel"] == 0
    m = pair_metrics("Hello, world!", "Hello")
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    assert m["token_jaccard"] == pytest.approx(1 / 4)
    assert m["char_levenshtein"] == 8
    assert m["length_change"] == 8 and m["length_change_rel"] == pytest.approx(8 / 5)
    same = pair_metrics("", "")
    assert same["token_jaccard"] == 1.0 and same["char_levenshtein_norm"] == 0.0
    rep = contrastiveness_report([("a b c", "a b d"), ("x", "x")])
    assert rep["n_pairs"] == 2 and rep["identical_fraction"] == 0.5
    assert rep["aggregate"]["token_jaccard"]["mean"] == pytest.approx(0.75)
    assert rep["aggregate"]["char_levenshtein"]["max"] == 1.0


def test_report_cli_compares_datasets(tmp_path, capsys):
    from apo_kernels.clair.cli import main

    clair = [{"prompt": "p", "chosen": "The sum is 4.", "rejected": "Teh sum is 5."}]
    judged = [{"prompt": [{"role": "user", "content": "p"}],
               "chosen": [{"role": "user", "content": "p"},
                          {"role": "assistant", "content": "Four, since two and two make four."}],
               "rejected": [{"role": "assistant", "content": "5"}]}]
    (tmp_path / "clair.jsonl").write_text(json.dumps(clair[0]) + "\n")
    (tmp_path / "judged.json").write_text(json.dumps(judged))
    rc = main(["clair", "report", str(tmp_path / "clair.jsonl"), str(tmp_path / "judged.json"),
               "--json", str(tmp_path / "r.json"), "--plots-dir", str(tmp_path / "plots")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "token_jaccard" in out and "clair (n=1)" in out and "judged (n=1)" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["clair"]["pairs"][0] == {"index": 0, **pair_metrics("The sum is 4.",
                                                                   "Teh sum is 5.")}
    assert rep["judged"]["pairs"][0]["length_change"] == len(
        "Four, since two and two make four.") - 1
    for m in ("token_jaccard", "char_levenshtein_norm", "length_change_rel"):
        assert (tmp_path / "plots" / f"hist_{m}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A missing field is named, with the fields found, and exits 2 without a traceback.
    rc = main(["clair", "report", str(tmp_path / "clair.jsonl"), "--chosen-field", "good"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no field 'good' (set it with --chosen-field)" in err
    assert "['chosen', 'prompt', 'rejected']" in err


def test_build_cli(tmp_path):
    from apo_kernels.clair.cli import main

    rows = [{"prompt": "p1", "original": "a", "revision": "b", "rationale": "r"},
            {"prompt": "p2", "original": "same", "revision": "same", "rationale": ""}]
    (tmp_path / "rev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["clair", "build", "-i", str(tmp_path / "rev.jsonl"), "-o", str(tmp_path / "o"),
               "--format", "messages", "--no-hf-dataset"])
    assert rc == 0
    assert read_records(tmp_path / "o" / "pairs.messages.jsonl") == [
        {"prompt": [{"role": "user", "content": "p1"}],
         "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "a"}], "rationale": "r"}]
    assert not (tmp_path / "o" / "pairs.jsonl").exists()
    rc = main(["clair", "build", "-i", str(tmp_path / "rev.jsonl"), "-o", str(tmp_path / "o2"),
               "--keep-identical", "--format", "string"])
    assert rc == 0
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "o2" / "dataset"))["chosen"] == ["b", "same"]


def test_cli_help_is_light():
    import subprocess
    import sys

    code = ("import sys, argparse; from apo_kernels.clair import cli; "
            "p = argparse.ArgumentParser(); cli.register(p.add_subparsers()); "
            "heavy = [m for m in ('httpx', 'datasets', 'transformers', 'matplotlib', "
            "'rapidfuzz') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_example_prompts_file_is_valid():
    from pathlib import Path

    from apo_kernels import clair
    from apo_kernels.clair.io import validate_prompt

    recs = read_records(Path(clair.__file__).parent / "data" / "example_prompts.jsonl")
    assert len(recs) == 5
    kinds = {type(validate_prompt(r["prompt"], "example")).__name__ for r in recs}
    assert kinds == {"str", "list"}
