"""A plain PyTorch training loop with ``FusedLinearPreferenceLoss`` (no Trainer, no TRL).

The policy's backbone gives the last hidden states; the loss takes them with the LM head weight
and never builds the ``[tokens, vocab]`` logits. The reference log-probs are computed once,
forward-only, before training.

    python examples/plain_loop.py
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from apo_kernels import FusedLinearPreferenceLoss
from apo_kernels.integrations.collator import PreferenceCollator
from apo_kernels.integrations.data import load_preference_dataset, tiny_dataset_path
from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer
from apo_kernels.integrations.trainer import precompute_ref_logps


def main() -> None:
    torch.manual_seed(0)
    dataset = load_preference_dataset(tiny_dataset_path())  # prompt / chosen / rejected, strings or messages
    tokenizer = build_tiny_tokenizer([list(dataset[c]) for c in ("prompt", "chosen", "rejected")])
    model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    collator = PreferenceCollator(tokenizer, max_length=128)

    # Reference = the initial policy, scored once (adds ref_chosen_logps / ref_rejected_logps columns).
    dataset = precompute_ref_logps(model, dataset, collator, batch_size=16)

    loss_fn = FusedLinearPreferenceLoss(loss_type="apo_zero", beta=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collator)
    model.train()
    step = 0
    for _epoch in range(4):
        for batch in loader:
            # Rows 0..B-1 chosen, B..2B-1 rejected; labels are unshifted (-100 off the completion).
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out = loss_fn(hidden[:, :-1], model.lm_head.weight, batch["labels"][:, 1:],
                          ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 6 == 0:
                m = out.metrics
                print(f"step {step:3d}  loss {out.loss.item():.4f}  margin {m['rewards/margins'].item():+.3f}  "
                      f"acc {m['rewards/accuracies'].item():.2f}")


if __name__ == "__main__":
    main()
