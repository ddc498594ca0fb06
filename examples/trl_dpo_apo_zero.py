"""TRL's DPOTrainer with APO-zero, log-probs computed by apo-kernels (one line: ``enable()``).

Runs offline on the tiny model built in code (about 20 s on a laptop CPU):

    python examples/trl_dpo_apo_zero.py

With a real model, replace the tiny model/tokenizer by ``AutoModelForCausalLM.from_pretrained(...)``
and ``AutoTokenizer.from_pretrained(...)``; nothing else changes.
"""

from __future__ import annotations

import datasets
from trl import DPOConfig, DPOTrainer

from apo_kernels.integrations import trl as apo_trl
from apo_kernels.integrations.data import load_preference_dataset, tiny_dataset_path
from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer


def main() -> None:
    # TRL wants one format per dataset: keep the plain-string pairs of the shipped data.
    records = [r for r in load_preference_dataset(tiny_dataset_path()) if isinstance(r["prompt"], str)]
    train = datasets.Dataset.from_list(records)
    tokenizer = build_tiny_tokenizer(records)
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)

    apo_trl.enable()  # <- every TRL trainer now computes log-probs with apo-kernels

    args = DPOConfig(
        output_dir="trl-apo-zero-out", loss_type="apo_zero", beta=0.1, learning_rate=3e-3,
        max_steps=40, per_device_train_batch_size=8, logging_steps=10, report_to="none",
        precompute_ref_log_probs=True,  # reference scored once, forward-only; no second model
        bf16=False, save_strategy="no", max_length=128,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    last = [h for h in trainer.state.log_history if "rewards/margins" in h][-1]
    print({k: round(last[k], 4) for k in ("loss", "rewards/margins", "rewards/accuracies")})


if __name__ == "__main__":
    main()
