"""A patched model trains under the plain HF ``Trainer`` (it reads the loss as ``outputs[0]``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer
from apo_kernels.integrations.transformers import patch_model


def test_output_indexes_like_model_output():
    tok = build_tiny_tokenizer(["one two three four five six"])
    model = patch_model(build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2), backend="torch")
    ids = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out[0] is out.loss and out["loss"] is out.loss and out[1] is out.logprobs
    assert out[:2] == (out.loss, out.logprobs) and out.to_tuple()[-1] is out.label_mask


def test_hf_trainer_steps_a_patched_model(tmp_path):
    tok = build_tiny_tokenizer(["the quick brown fox jumps over the lazy dog"])
    model = patch_model(build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2), backend="torch")
    before = model.lm_head.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, len(tok), (7,), generator=g)), "labels": ids} for _ in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          disable_tqdm=True, logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), losses
    assert not torch.equal(model.lm_head.weight, before)
