"""DeepSpeed ZeRO-3 + patch_model under ``torchrun --nproc_per_node=2`` (gloo, DeepSpeed's CPU
accelerator), compared with one process: log-probs, entropy, loss, every gradient, weights after
two optimizer steps; tied and untied heads; DeepSpeed's bf16 mode (one step, bf16 tolerance
rule in norm form); and the HF Trainer recipe (``TrainingArguments(deepspeed=...)``,
a model partitioned while ``from_pretrained`` loads it) for three steps
(worker: tests/distributed/zero3_patch_model.py). The same launch checks the preference-loss
paths against one process: ``precompute_ref_logps`` with a ZeRO-3 reference,
``compute_preference_loss`` with a ZeRO-3 reference model and with precomputed reference
log-probs (loss, log-probs, metrics, every gradient, weights after two steps; tied and untied),
and ``PreferenceTrainer`` with a ZeRO-3 policy and reference (loss and metrics of two steps).
A second launch checks TRL's DPOTrainer under
ZeRO-3 with ``apo_kernels.integrations.trl.enable()`` against TRL's own head.

Skips without DeepSpeed (``pip install 'apo-kernels[zero3]'``). The worker skips compiling
DeepSpeed's shared-memory CPU all-reduce (30-80 s on a fresh machine); ``APO_ZERO3_SHM=1`` keeps it.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("transformers") is None,
    reason="needs deepspeed and transformers: pip install 'apo-kernels[zero3]'",
)


def test_zero3_patch_model_matches_one_process():
    out = run_torchrun("zero3_patch_model.py", "untied", "tied", "bf16", "trainer", "pref-untied", "pref-tied",
                       "pref-trainer", timeout=420.0, env={"DS_ACCELERATOR": "cpu"})
    for layout in ("untied", "tied"):
        assert f"zero3 {layout}: logprobs, entropy, loss" in out, out[-3000:]
        assert f"zero3 pref {layout}: precompute_ref_logps, compute_preference_loss" in out, out[-3000:]
    assert "zero3 bf16: logprobs, entropy, loss" in out, out[-3000:]
    assert "zero3 trainer: from_pretrained under ZeRO-3" in out, out[-3000:]
    assert "zero3 pref trainer: PreferenceTrainer, ZeRO-3 policy and reference" in out, out[-3000:]


def test_zero3_trl_dpo_enable_matches_trl_head():
    pytest.importorskip("trl", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    out = run_torchrun("zero3_patch_model.py", "dpo", timeout=420.0, env={"DS_ACCELERATOR": "cpu"})
    assert "zero3 dpo: TRL DPOTrainer with enable() matches TRL's head" in out, out[-3000:]
