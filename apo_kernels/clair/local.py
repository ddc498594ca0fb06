"""Answers from a local Hugging Face model with batched ``generate``.

Prompts are rendered with the tokenizer's chat template, sorted by length (less padding per
batch), left-padded (a decoder-only model must see its prompt end right before the first new
token) and generated in batches. Results come back per batch through a callback, so the pipeline
can store each batch as soon as it is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._optional import require
from .io import ClairInputError, Prompt, as_messages


@dataclass
class LocalResult:
    """One generated answer."""

    text: str
    finish_reason: str  # "stop" (end-of-sequence produced) or "length"
    usage: dict[str, int]


class LocalGenerator:
    """Batched generation with a transformers causal LM.

    Args:
        model: a model id or path (loaded with ``AutoModelForCausalLM``), or a loaded model.
        tokenizer: a tokenizer, or None to load it from ``model``.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: answer length limit.
        temperature: 0 or None for greedy decoding, else sampling at that temperature.
        top_p: nucleus sampling threshold (sampling only).
        seed: seeds torch before each batch, so reruns sample the same answers.
        device: e.g. ``"cuda"``; default: CUDA when available, else CPU.
        dtype: torch dtype name for loading (``"bfloat16"``...), default the checkpoint's.
        gguf_file: a GGUF file inside ``model`` (dequantised by transformers on load).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = 0,
        device: str | None = None,
        dtype: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        import torch

        what = "CLAIR with a local model (no --base-url)"
        transformers = require("transformers", "clair", what=what)
        AutoModelForCausalLM, AutoTokenizer = (transformers.AutoModelForCausalLM,
                                               transformers.AutoTokenizer)
        if gguf_file:  # transformers needs both to dequantise a GGUF file
            require("gguf", "clair", what="--gguf-file")
            require("accelerate", "clair", what="--gguf-file")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        extra: dict[str, Any] = {}
        if gguf_file:
            extra["gguf_file"] = gguf_file
        if isinstance(model, str):
            self.name = model + (f"#{gguf_file}" if gguf_file else "")
            kwargs = dict(extra)
            if dtype:
                kwargs["dtype"] = getattr(torch, dtype)
            loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model, **extra)
            model = loaded
        else:
            self.name = getattr(getattr(model, "config", None), "_name_or_path", "") or "local"
        if tokenizer is None:
            raise ValueError("a tokenizer is needed when passing a loaded model")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    def params(self) -> dict[str, Any]:
        """Generation settings that change the answers (part of each item's key)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}

    def render(self, prompt: Prompt) -> str:
        """The model's input text for a prompt (chat template when the tokenizer has one)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                as_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        if isinstance(prompt, str):
            return prompt
        raise ClairInputError(
            f"model {self.name!r}: the tokenizer has no chat template, so chat-message prompts "
            "cannot be rendered; give plain-string prompts or a tokenizer with a template"
        )

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, list | tuple) else {int(ids)}

    def generate(
        self,
        prompts: Sequence[Prompt],
        on_batch: Callable[[list[int], list[LocalResult]], None] | None = None,
    ) -> list[LocalResult]:
        """Answer every prompt; ``on_batch(indices, results)`` is called after each batch."""
        import torch

        texts = [self.render(p) for p in prompts]
        # Template text already holds any special tokens; adding BOS again would double it.
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        eos = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        out: list[LocalResult | None] = [None] * len(texts)
        sample = bool(self.temperature)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            gen_kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                          "do_sample": sample, "pad_token_id": pad}
            if sample:
                gen_kwargs["temperature"] = self.temperature
                if self.top_p is not None:
                    gen_kwargs["top_p"] = self.top_p
                if self.seed is not None:
                    torch.manual_seed(self.seed + b)
            else:  # silence "temperature is set but do_sample=False" from the model's config
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                seqs = self.model.generate(**enc, **gen_kwargs)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            batch_results = []
            for row, i in enumerate(idx):
                toks = new[row]
                cut = next((k for k, t in enumerate(toks) if t in eos), None)
                finish = "stop" if cut is not None else "length"
                kept = toks[:cut] if cut is not None else toks
                n_prompt = int(enc["attention_mask"][row].sum())
                res = LocalResult(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True),
                    finish_reason=finish,
                    usage={"prompt_tokens": n_prompt,
                           "completion_tokens": len(kept) + (cut is not None),
                           "total_tokens": n_prompt + len(kept) + (cut is not None)},
                )
                out[i] = res
                batch_results.append(res)
            if on_batch is not None:
                on_batch(idx, batch_results)
        return [r for r in out if r is not None]
