"""``generate`` with a tiny local HF model built from a config, tokenizer built offline."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tiny_model import tiny_model_dir

from apo_kernels.clair.backends import LocalBackend
from apo_kernels.clair.io import read_records
from apo_kernels.clair.local import LocalGenerator
from apo_kernels.clair.pipeline import generate

MAX_NEW = 3
PROMPTS = [
    "what is the sum of two and three",
    [{"role": "system", "content": "yes"}, {"role": "user", "content": "a cat runs fast"}],
    "red",
    "the big dog runs slow and the small cat runs fast it is blue",
    "four five",
]


def test_local_generate_batched_matches_one_by_one(tmp_path):
    d = tiny_model_dir(tmp_path / "tiny")
    gen = LocalGenerator(str(d), batch_size=3, max_new_tokens=MAX_NEW, device="cpu")
    out = tmp_path / "out"
    stats = generate([{"prompt": p} for p in PROMPTS], out, LocalBackend(gen), progress=False)
    assert (stats.ok, stats.failed, stats.ran) == (len(PROMPTS), 0, len(PROMPTS))
    rows = read_records(out / "generations.jsonl")
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["source"] == "model" for r in rows)

    # Reference: each prompt alone, no padding, plain greedy generate.
    model, tok = gen.model, gen.tokenizer
    for p, row in zip(PROMPTS, rows, strict=True):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 3 in seq:
            seq = seq[: seq.index(3)]
            assert row["finish_reason"] == "stop"
        else:
            assert row["finish_reason"] == "length"
        assert row["response"] == tok.decode(seq, skip_special_tokens=True)
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    assert len({r["response"] for r in rows}) >= 4
    # Usage counted from real token counts.
    assert stats.usage["completion_tokens"] > 0
    assert stats.usage["prompt_tokens"] == sum(
        len(tok(tok.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str)
                                        else p, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]) for p in PROMPTS)

    # Resumable like the server path: a rerun generates nothing.
    again = generate([{"prompt": p} for p in PROMPTS], out, LocalBackend(gen), progress=False)
    assert (again.ran, again.cached) == (0, len(PROMPTS))
