"""What the torchrun workers that compare a sharded model with one process share: the global
batch, the one-process ground truth (the unpatched model's own logits, in float64) and the loop
that runs named cases and reports one verdict line each (read by ``launch.run_cases``)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


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


def run_case_loop(cases: list[str], run_case: Callable[[str], tuple[list[str], str]], results_env: str) -> int:
    """Run every case on every rank (``run_case(case) -> (errors, note)``; an exception is an
    error), agree on each verdict with one all-reduce (which also keeps the ranks' collectives in
    step), print ``CASE <name> ok|FAILED`` on rank 0 and append it (with the first errors) to the
    file named by ``$results_env``. Returns the number of failed cases."""
    rank = dist.get_rank()
    results = os.environ.get(results_env) if rank == 0 else None
    failed = 0
    for case in cases:
        note = ""
        try:
            errors, note = run_case(case)
        except Exception:  # noqa: BLE001  report every case, not only the first failure
            errors = [f"{case} rank {rank}: raised\n{traceback.format_exc()}"]
        flag = torch.tensor([len(errors)])
        dist.all_reduce(flag)
        if errors:
            print("\n".join(errors[:8]), flush=True)
        verdict = f"CASE {case} FAILED" if flag.item() else f"CASE {case} ok{note}"
        failed += bool(flag.item())
        if rank == 0:
            print(verdict, flush=True)
            if results:
                with open(results, "a") as f:
                    f.write(verdict + ("\n" + "\n".join(errors[:8]) if errors else "") + "\n")
    return failed
