"""Preference data -> token ids -> padded or packed batches, without TRL.

A record has ``prompt``, ``chosen`` and ``rejected``, each a string or chat messages
(``[{"role": ..., "content": ...}]``); chosen/rejected may also be a single assistant string
under a messages prompt. Without ``prompt``, chosen and rejected may be whole conversations that
share everything but their last message (the shared part is the prompt). Records already holding
``prompt_input_ids``/``chosen_input_ids``/``rejected_input_ids`` are used as they are.

Chat messages go through the tokenizer's chat template: the prompt is rendered with
``add_generation_prompt=True`` and the completion is what the full conversation adds after it.
Plain strings are tokenised as they are, with the EOS token appended to each completion.

Batches follow TRL's order: rows ``0..B-1`` chosen, rows ``B..2B-1`` rejected, each row
``prompt + completion``. Labels are *unshifted* (as for a Hugging Face ``labels`` argument):
``labels[i, t] = input_ids[i, t]`` on completion tokens, ``-100`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["REQUIRED_FIELDS", "PreferenceCollator", "tokenize_preference"]

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
_TOKENIZED = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in x) and len(x) > 0


def _as_messages(x: Any, role: str) -> list[dict]:
    return [dict(m) for m in x] if _is_messages(x) else [{"role": role, "content": str(x)}]


def _split_implicit_prompt(example: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    chosen, rejected = example.get("chosen"), example.get("rejected")
    if _is_messages(chosen) and _is_messages(rejected) and len(chosen) > 1 and list(chosen[:-1]) == list(rejected[:-1]):
        return list(chosen[:-1]), [chosen[-1]], [rejected[-1]]
    raise ValueError(
        "a preference record needs the fields `prompt`, `chosen` and `rejected` (strings or chat "
        f"messages); got fields {sorted(example)}"
    )


def _fields(example: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    if not isinstance(example, Mapping):
        raise TypeError(f"a preference record must be a mapping, got {type(example).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in example or example[f] is None]
    if missing == ["prompt"]:
        return _split_implicit_prompt(example)
    if missing:
        raise ValueError(
            f"a preference record is missing the field(s) {missing}: it needs `prompt`, `chosen` and "
            f"`rejected` (strings or chat messages); got fields {sorted(example)}"
        )
    return example["prompt"], example["chosen"], example["rejected"]


def _render_chat(tokenizer: Any, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the record holds chat messages but the tokenizer has no chat template: set "
            "`tokenizer.chat_template` or give plain strings"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently on its own and inside the full "
            "conversation, so the completion cannot be separated from it"
        )
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    # The template already holds BOS and role markers: add no special tokens twice.
    return encode(prompt_text), encode(full_text[len(prompt_text):])


def _render_plain(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[int], list[int], list[int]]:
    # Prompts lose their beginning (the question is usually at the end), completions their end.
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    if max_length is not None:
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > max_length:
            keep = min(len(prompt), max(max_length - longest, max_length // 2))
            prompt = prompt[len(prompt) - keep:]
            room = max_length - len(prompt)
            chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


def tokenize_preference(
    example: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, list[int]]:
    """One record -> ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (int lists).

    Args:
        example: a record (see the module docstring).
        tokenizer: a transformers tokenizer (a chat template is needed for messages).
        max_length: longest ``prompt + completion``; the prompt is cut from the left (keeping at
            least half of ``max_length`` when completions are long), then completions from the right.
        max_prompt_length: longest prompt, cut from the left.

    Raises:
        ValueError: a field is missing, or the chat template cannot be split.
    """
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 2:
            raise ValueError(f"`{name}` must be >= 2 (or None), got {value}")
    if all(k in example for k in _TOKENIZED):
        ids = [list(map(int, example[k])) for k in _TOKENIZED]
    else:
        prompt, chosen, rejected = _fields(example)
        if _is_messages(prompt) or _is_messages(chosen) or _is_messages(rejected):
            p = _as_messages(prompt, "user")
            c_prompt, c = _render_chat(tokenizer, p, _as_messages(chosen, "assistant"))
            _, r = _render_chat(tokenizer, p, _as_messages(rejected, "assistant"))
        else:
            c_prompt, c = _render_plain(tokenizer, str(prompt), str(chosen))
            _, r = _render_plain(tokenizer, str(prompt), str(rejected))
        ids = [c_prompt, c, r]
    prompt_ids, chosen_ids, rejected_ids = _truncate(*ids, max_length, max_prompt_length)
    return {"prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids, "rejected_input_ids": rejected_ids}


@dataclass
class PreferenceCollator:
    """Collate preference records into one batch of ``2B`` sequences (chosen first).

    Args:
        tokenizer: used for raw records (strings or messages) and for the pad id.
        max_length, max_prompt_length: truncation, see :func:`tokenize_preference`.
        padding_free: pack all ``2B`` sequences into one row (no padding) instead of padding.
        pad_to_multiple_of: round the padded length up (padded batches only).

    Returns (``__call__``), padded:
        ``input_ids``, ``attention_mask``, ``completion_mask`` (int64/long ``[2B, T]``), ``labels``
        (int64 ``[2B, T]``, -100 off the completion), and ``ref_chosen_logps`` /
        ``ref_rejected_logps`` (fp32 ``[B]``) when every record carries them.
    Packed (``padding_free=True``): ``input_ids``, ``position_ids`` (restarting at 0 for each
        sequence), ``completion_mask``, ``labels`` (``[1, N]``) and ``cu_seqlens`` (int64
        ``[2B + 1]``); the first token of every sequence has label -100, so a shifted label never
        crosses into the next sequence.
    """

    tokenizer: Any
    max_length: int | None = None
    max_prompt_length: int | None = None
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of preference records")
        rows: list[tuple[list[int], list[int]]] = []
        chosen_rows, rejected_rows = [], []
        for ex in examples:
            tok = tokenize_preference(ex, self.tokenizer, max_length=self.max_length,
                                      max_prompt_length=self.max_prompt_length)
            chosen_rows.append((tok["prompt_input_ids"], tok["chosen_input_ids"]))
            rejected_rows.append((tok["prompt_input_ids"], tok["rejected_input_ids"]))
        rows = chosen_rows + rejected_rows
        batch = self._packed(rows) if self.padding_free else self._padded(rows)
        refs = [(ex.get("ref_chosen_logps"), ex.get("ref_rejected_logps")) for ex in examples]
        if all(c is not None and r is not None for c, r in refs):
            batch["ref_chosen_logps"] = torch.tensor([float(c) for c, _ in refs], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([float(r) for _, r in refs], dtype=torch.float32)
        return batch

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        return 0 if pad is None else int(pad)

    def _padded(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(p) + len(c) for p, c in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, length), self._pad_id(), dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        completion_mask = torch.zeros((n, length), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            seq = p + c
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
            completion_mask[i, len(p): len(seq)] = 1
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                "labels": labels}

    def _packed(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, pos, comp, lens = [], [], [], []
        for p, c in rows:
            seq = p + c
            ids += seq
            pos += list(range(len(seq)))
            # The first token of a sequence is never predicted inside it.
            comp += [0] * len(p) + [1] * len(c)
            if seq:
                comp[len(comp) - len(seq)] = 0
            lens.append(len(seq))
        input_ids = torch.tensor([ids], dtype=torch.long)
        completion_mask = torch.tensor([comp], dtype=torch.long)
        cu = torch.zeros(len(rows) + 1, dtype=torch.long)
        cu[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
        return {"input_ids": input_ids, "position_ids": torch.tensor([pos], dtype=torch.long),
                "completion_mask": completion_mask, "labels": input_ids.masked_fill(completion_mask == 0, -100),
                "cu_seqlens": cu}
