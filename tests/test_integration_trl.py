"""TRL drop-in: DPOTrainer steps with and without ``enable()`` give the same losses and metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
datasets = pytest.importorskip("datasets", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

import trl.trainer.utils as trl_utils
from trl import DPOConfig, DPOTrainer

from apo_kernels.integrations import trl as apo_trl
from apo_kernels.integrations.data import load_preference_dataset, tiny_dataset_path
from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer

STEPS = 3
# Logged values compared between the two runs (TRL's own names).
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
        "mean_token_accuracy")


@pytest.fixture(scope="module")
def data():
    # TRL wants one format per dataset: the plain-string pairs of the shipped data.
    records = [r for r in load_preference_dataset(tiny_dataset_path()) if isinstance(r["prompt"], str)][:16]
    ds = datasets.Dataset.from_list(records)
    tok = build_tiny_tokenizer(records)
    return ds, tok


@pytest.fixture(autouse=True)
def _restore():
    yield
    apo_trl.disable()


def _run(data, tmp_path, *, ours: bool, loss_type: str, reference: str) -> tuple[list[dict], dict, int]:
    ds, tok = data
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, seed=1)
    ref_model = None
    peft_config = None
    if reference == "model":
        ref_model = copy.deepcopy(model)
    elif reference == "peft":
        peft = pytest.importorskip("peft", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False)
    args = DPOConfig(
        output_dir=str(tmp_path / ("ours" if ours else "trl")), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=5e-3, loss_type=loss_type, beta=0.5, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, data_seed=0, precompute_ref_log_probs=reference == "precompute",
        max_length=64, disable_tqdm=True, dataloader_num_workers=0,
        bf16=False,  # TRL turns on bf16 autocast by default, even on CPU; compare in fp32
    )
    calls = {"n": 0}
    with apo_trl.enabled() if ours else _nullcontext():
        original = trl_utils._ChunkedLogProbFunction

        class Counting:
            @staticmethod
            def apply(*a, **k):
                calls["n"] += 1
                return original.apply(*a, **k)

        trl_utils._ChunkedLogProbFunction = Counting
        try:
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds,
                                 processing_class=tok, peft_config=peft_config)
            trainer.train()
        finally:
            trl_utils._ChunkedLogProbFunction = original
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, params, calls["n"]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CASES = [("apo_zero", "model"), ("apo_down", "model"), ("sigmoid", "model"),
         ("apo_zero", "precompute"), ("apo_down", "peft")]


@pytest.mark.parametrize("loss_type,reference", CASES)
def test_dpo_trainer_same_losses_and_metrics(data, tmp_path, loss_type, reference):
    theirs, their_params, _ = _run(data, tmp_path, ours=False, loss_type=loss_type, reference=reference)
    ours, our_params, n_calls = _run(data, tmp_path, ours=True, loss_type=loss_type, reference=reference)
    assert n_calls > 0, "TRL never called the fused head"
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in KEYS:
            assert key in a and key in b, f"{key} missing from the logs"
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-4), (step, key, a[key], b[key])
    # Training moved the weights, identically.
    for name, p in their_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-4, atol=1e-5, msg=name)
    # Sanity: the run learned something (the test could fail if the head were ignored).
    assert ours[-1]["loss"] != ours[0]["loss"]


def test_enable_swaps_and_disable_restores():
    original_fn, original_compact = trl_utils._ChunkedLogProbFunction, trl_utils._use_triton
    apo_trl.enable()
    assert apo_trl.is_enabled() and trl_utils._ChunkedLogProbFunction is apo_trl.ApoLogProbFunction
    apo_trl.enable(deterministic=True)  # idempotent, only updates options
    apo_trl.disable()
    assert not apo_trl.is_enabled()
    assert trl_utils._ChunkedLogProbFunction is original_fn and trl_utils._use_triton is original_compact
    with apo_trl.enabled():
        assert trl_utils._ChunkedLogProbFunction is apo_trl.ApoLogProbFunction
    assert trl_utils._ChunkedLogProbFunction is original_fn
    with pytest.raises(ValueError, match="backend"):
        apo_trl.enable(backend="cuda-magic")
    assert not apo_trl.is_enabled()


@pytest.mark.parametrize("softcap,scale,with_bias", [(None, 1.0, False), (3.0, 0.5, True)])
def test_apply_matches_trl_function(softcap, scale, with_bias):
    """Values, extras and gradients of our drop-in against TRL's own function."""
    torch.manual_seed(0)
    n, d, v = 13, 16, 97
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if with_bias else None
    y = torch.randint(0, v, (n,))
    outs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    grads = []
    results = []
    for fn in (trl_utils._ChunkedLogProbFunction if not apo_trl.is_enabled() else None, apo_trl.ApoLogProbFunction):
        res = fn.apply(h, w, b, y, 0.7, 32, softcap, scale, outs)
        (res[0].sum() + 0.3 * res[1].sum()).backward()
        grads.append([t.grad.clone() for t in (h, w, b) if t is not None])
        for t in (h, w, b):
            if t is not None:
                t.grad = None
        results.append(res)
    for a, b_ in zip(*results):
        torch.testing.assert_close(a.float(), b_.float(), rtol=1e-5, atol=1e-5)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
