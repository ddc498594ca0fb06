"""The light path without TRL: collator, compute_preference_loss, PreferenceTrainer, precompute."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
datasets = pytest.importorskip("datasets", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

from apo_kernels import FusedLinearPreferenceLoss, preference_loss
from apo_kernels.integrations.collator import PreferenceCollator, tokenize_preference
from apo_kernels.integrations.data import load_preference_dataset, tiny_dataset_path
from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer
from apo_kernels.integrations.trainer import (
    PreferenceTrainer,
    compute_preference_loss,
    precompute_ref_logps,
)


@pytest.fixture(scope="module")
def ds():
    return load_preference_dataset(tiny_dataset_path())


@pytest.fixture(scope="module")
def tok(ds):
    return build_tiny_tokenizer([list(ds[c]) for c in ("prompt", "chosen", "rejected")])


def _seq_logps(model, batch):
    """Sequence log-probs from the model's full logits (the ordinary way)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * (labels != -100)).sum(-1)


def test_tokenize_strings_messages_and_implicit_prompt(tok):
    s = tokenize_preference({"prompt": "What is 2 plus 3?", "chosen": "It is 5.", "rejected": "It is 6."}, tok)
    assert tok.convert_ids_to_tokens(s["chosen_input_ids"]) == ["it", "is", "5", ".", tok.eos_token]
    msgs = {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
            "chosen": [{"role": "assistant", "content": "It is 5."}],
            "rejected": [{"role": "assistant", "content": "It is 6."}], "rationale": "ignored"}
    m = tokenize_preference(msgs, tok)
    assert tok.convert_ids_to_tokens(m["prompt_input_ids"])[0] == "<|user|>"
    assert tok.convert_ids_to_tokens(m["prompt_input_ids"])[-1] == "<|assistant|>"
    assert tok.convert_ids_to_tokens(m["chosen_input_ids"])[:4] == ["it", "is", "5", "."]
    assert "<|end|>" in tok.convert_ids_to_tokens(m["chosen_input_ids"])
    implicit = {"chosen": msgs["prompt"] + msgs["chosen"], "rejected": msgs["prompt"] + msgs["rejected"]}
    assert tokenize_preference(implicit, tok) == m
    t = tokenize_preference({"prompt": "a " * 30, "chosen": "b " * 30, "rejected": "c"}, tok, max_length=20)
    assert len(t["prompt_input_ids"]) + len(t["chosen_input_ids"]) <= 20 and len(t["prompt_input_ids"]) == 10
    with pytest.raises(ValueError, match="rejected"):
        tokenize_preference({"prompt": "x", "chosen": "y"}, tok)


def test_collator_padded_and_packed_layouts(ds, tok):
    rows = [ds[i] for i in (0, 12, 20)]
    padded = PreferenceCollator(tok)(rows)
    assert padded["input_ids"].shape[0] == 6
    assert torch.equal(padded["labels"] != -100, padded["completion_mask"].bool())
    assert (padded["attention_mask"].sum(1) > padded["completion_mask"].sum(1)).all()
    packed = PreferenceCollator(tok, padding_free=True)(rows)
    cu = packed["cu_seqlens"]
    assert cu.tolist() == [0, *padded["attention_mask"].sum(1).cumsum(0).tolist()]
    assert (packed["labels"][0, cu[:-1]] == -100).all()
    for i in range(6):  # the same tokens, in the same order
        n = int(padded["attention_mask"][i].sum())
        assert torch.equal(packed["input_ids"][0, cu[i]:cu[i + 1]], padded["input_ids"][i, :n])
        assert torch.equal(packed["position_ids"][0, cu[i]:cu[i + 1]], torch.arange(n))
    with pytest.raises(ValueError, match="empty"):
        PreferenceCollator(tok)([])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compute_loss_matches_full_logits(ds, tok, packed):
    policy = build_tiny_model(tok, seed=0)
    ref = build_tiny_model(tok, seed=1)
    rows = [ds[i] for i in range(0, 48, 6)]
    batch = PreferenceCollator(tok)(rows)
    out = compute_preference_loss(policy, PreferenceCollator(tok, padding_free=packed)(rows),
                                  FusedLinearPreferenceLoss("apo_zero", beta=0.3), ref_model=ref)
    logps = _seq_logps(policy, batch)
    with torch.no_grad():
        ref_logps = _seq_logps(ref, batch)
    b = len(rows)
    expected = preference_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], loss_type="apo_zero",
                               beta=0.3).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ref_chosen_logps, ref_logps[:b], rtol=1e-4, atol=1e-4)
    g_ours = torch.autograd.grad(out.loss, list(policy.parameters()))
    g_ref = torch.autograd.grad(expected, list(policy.parameters()))
    for a, e in zip(g_ours, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-6)
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(out.metrics)


def test_precompute_matches_reference_model_and_trainer_learns(ds, tok, tmp_path):
    from transformers import TrainingArguments

    small = ds.select(range(16))
    model = build_tiny_model(tok, seed=0)
    ref = copy.deepcopy(model)
    collator = PreferenceCollator(tok, max_length=64)
    with_ref = precompute_ref_logps(ref, small, collator, batch_size=5, progress=False)
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(with_ref.column_names)
    as_list = precompute_ref_logps(ref, [dict(r) for r in small], PreferenceCollator(tok, max_length=64,
                                   padding_free=True), batch_size=3, progress=False)
    torch.testing.assert_close(torch.tensor([r["ref_chosen_logps"] for r in as_list]),
                               torch.tensor(with_ref["ref_chosen_logps"]), rtol=1e-4, atol=1e-4)
    # Without a process group, split_across_ranks changes nothing (one rank scores everything).
    split = precompute_ref_logps(ref, small, collator, batch_size=5, progress=False, split_across_ranks=True)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert split[key] == with_ref[key], key
    # Precomputed reference == reference model, loss for loss.
    batch = collator([with_ref[i] for i in range(4)])
    a = compute_preference_loss(model, batch, ref_model=None)
    b = compute_preference_loss(model, {k: v for k, v in batch.items() if not k.startswith("ref_")}, ref_model=ref)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no reference"):
        compute_preference_loss(model, {k: v for k, v in batch.items() if not k.startswith("ref_")})

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=4, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = PreferenceTrainer(model, args, loss_fn=FusedLinearPreferenceLoss("sigmoid", beta=0.5),
                                data_collator=collator, processing_class=tok, train_dataset=with_ref)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and "rewards/margins" in logs[-1] and "rewards/accuracies" in logs[-1]
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]


def test_peft_policy_uses_base_as_reference(ds, tok):
    peft = pytest.importorskip("peft", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    model = peft.get_peft_model(build_tiny_model(tok, seed=0), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = PreferenceCollator(tok)([ds[i] for i in range(4)])
    out = compute_preference_loss(model, batch)
    with model.disable_adapter():
        ref_logps = _seq_logps(model, batch)
    torch.testing.assert_close(out.ref_chosen_logps, ref_logps[:4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.chosen_logps, out.ref_chosen_logps)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_dataset_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="rejected"):
        load_preference_dataset(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_preference_dataset(empty)
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(tmp_path / "nope.jsonl")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}],
                          "chosen": [{"role": "assistant", "content": "b"}],
                          "rejected": [{"role": "assistant", "content": "c"}], "rationale": "r"}])}
                         ).save_to_disk(str(tmp_path / "dataset.messages"))
    assert len(load_preference_dataset(tmp_path / "dataset.messages")) == 1
