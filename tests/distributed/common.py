"""What the torchrun workers that compare a sharded model with one process share: the global
batch and the one-process ground truth (the unpatched model's own logits, in float64)."""

from __future__ import annotations

import torch


def causal_batch(step: int, vocab: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch ``step``: ids, labels (prompt and padding ignored), attention mask, each
    ``[rows, length]``."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # right padding (on one row of rank 0's share)
    labels[1, -3:] = -100
    labels[2, :4] = -100
    return ids, labels, attention


def one_process_reference(model: torch.nn.Module, batches, opt: torch.optim.Optimizer,
                          steps: int = 2) -> dict:
    """One process, whole batch ``batches(step)``, ``steps`` optimizer steps on the mean NLL of
    the model's own logits (log-softmax in float64). Returns the first step's ``logprobs``,
    ``entropy``, ``loss``, ``mask`` and ``grads`` (by parameter name) and the final ``params``."""
    first: dict = {}
    for step in range(steps):
        ids, labels, attention = batches(step)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        logp_all = torch.log_softmax(logits.double(), -1)
        targets = labels[:, 1:]
        mask = targets != -100
        logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
        loss = -(logp.sum() / mask.sum())
        opt.zero_grad()
        loss.float().backward()
        if step == 0:
            first = {"logprobs": logp.float().detach(), "entropy": entropy.float().detach(),
                     "loss": loss.float().detach(), "mask": mask,
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        opt.step()
    first["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return first
