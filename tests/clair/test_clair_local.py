"""``generate`` with a tiny local HF model built from a config, tokenizer built offline."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from apo_kernels.clair.backends import LocalBackend
from apo_kernels.clair.io import read_records
from apo_kernels.clair.local import LocalGenerator
from apo_kernels.clair.pipeline import generate

WORDS = ["what", "is", "the", "sum", "of", "two", "and", "three", "four", "five", "six", "seven",
         "eight", "nine", "a", "cat", "dog", "runs", "fast", "slow", "big", "small", "red",
         "blue", "green", "it", "yes", "no"]
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIAL[4:])
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False, initializer_range=0.5)
    model = LlamaForCausalLM(cfg)
    # Random weights this large make the answers depend on the prompt (a padding bug shows).
    # Never emit the other special tokens (they decode to nothing), and give "</s>" the row of
    # a word so some answers stop early and others run to the length limit.
    with torch.no_grad():
        model.lm_head.weight[:7] = 0.0
        model.lm_head.weight[3] = model.lm_head.weight[10]
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


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
