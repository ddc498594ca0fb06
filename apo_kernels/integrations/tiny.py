"""A tiny causal LM and tokenizer built entirely in code (no hub, no network).

For tests, demos and ``apo-kernels train`` without arguments: a word-level tokenizer whose
vocabulary comes from the texts it will see (plus chat-role tokens and a few specials), wrapped
in ``PreTrainedTokenizerFast`` with a chat template, and a small random ``LlamaForCausalLM``
(or Qwen2 / Gemma2) sized to it. Both save and load with ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_model", "build_tiny_tokenizer", "words_of"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, *ROLE_TOKENS)

# Role markers and the end-of-turn token are special tokens, matched before word splitting;
# `generation` marks assistant turns for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|> {% generation %}{{ message['content'] }} <|end|>"
    "{% endgeneration %}{% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

_WORD = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    """The tokenizer's pre-tokenisation: lower-cased runs of word characters or single symbols."""
    return _WORD.findall(text.lower())


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # a chat message, or a record: every field's text
        yield from _texts(value["content"] if "content" in value else list(value.values()))
    elif value is not None and not isinstance(value, (bytes, int, float)):
        for item in value:  # lists, tuples, dataset columns
            yield from _texts(item)


def build_tiny_tokenizer(texts: Iterable[Any] = (), *, max_vocab: int = 4096, min_count: int = 1) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``.

    Args:
        texts: strings, chat messages or records (dicts / lists of them) whose words form the
            vocabulary; unknown words map to ``<unk>``.
        max_vocab: most frequent words kept (after the special tokens).
        min_count: words seen fewer times are dropped.

    Returns:
        a tokenizer with ``pad/unk/bos/eos`` tokens, the chat template above, left-to-right
        ids ``0..len(SPECIAL_TOKENS)-1`` for the specials, lower-casing normaliser.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if max_vocab < 1:
        raise ValueError(f"`max_vocab` must be >= 1, got {max_vocab}")
    counts: Counter[str] = Counter()
    for text in _texts(list(texts)):
        counts.update(words_of(text))
    words = [w for w, c in counts.most_common() if c >= min_count and w not in SPECIAL_TOKENS][:max_vocab]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):  # sorted: the same texts give the same ids on every machine
        vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), tok.pre_tokenizer])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        model_max_length=4096, padding_side="right",
    )


def build_tiny_model(
    tokenizer: Any,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **config_kwargs: Any,
) -> Any:
    """A randomly initialised causal LM sized to ``tokenizer`` (fp32, eval mode off).

    Args:
        tokenizer: gives the vocabulary size and the pad/bos/eos ids.
        arch: ``"llama"``, ``"qwen2"`` or ``"gemma2"`` (softcap 30 unless overridden).
        hidden_size, num_layers, num_heads, intermediate_size: the dimensions.
        tie_word_embeddings: share the input and output embeddings.
        seed: torch seed for the initialisation.
        config_kwargs: anything else for the config.
    """
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    archs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
             "gemma2": (Gemma2Config, Gemma2ForCausalLM)}
    if arch not in archs:
        raise ValueError(f"`arch` must be one of {sorted(archs)}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads})")
    config_cls, model_cls = archs[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "gemma2":
        kwargs.update(head_dim=hidden_size // num_heads, final_logit_softcapping=30.0,
                      query_pre_attn_scalar=hidden_size // num_heads)
    kwargs.update(config_kwargs)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    return model_cls(config)
