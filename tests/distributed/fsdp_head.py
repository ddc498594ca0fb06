"""Worker: a patched tiny Llama under FSDP2 (``fully_shard``) against one process, every wrapping.

Run by ``tests/test_distributed_fsdp.py`` through ``torchrun --nproc_per_node=2`` (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed/fsdp_head.py [CASE ...]

A case is ``<wrapping>-<tied|untied>[-triton]``; no argument runs :data:`CASES`. For each case
every rank builds the same model from a fixed seed. The ground truth is the unpatched model in
this one process over the WHOLE batch: log-probs and entropy from its own logits (float64), loss
= mean NLL over every labelled token of the global batch, gradients, and parameters after two
optimizer steps. The FSDP copy is patched (``patch_model``), wrapped, and each rank runs its
half of the batch with ``num_items_in_batch`` = global tokens / world size, so that FSDP's
averaging reduce-scatter gives the gradient of the global mean. Compared: each rank's
log-probs/entropy rows, the loss summed over ranks, every gradient and every parameter after two
AdamW steps (``full_tensor()`` of the shards). Prints ``CASE <name> ok`` per case; exits 1 with
the differences on any mismatch, or when a case raises (its error is printed).

Wrappings (``fully_shard`` groups; every layer is its own group in all but ``root``):

- ``head``: ``lm_head`` alone (the layout whose gradient was silently wrong).
- ``head_norm``: ``[norm, lm_head]`` as one group.
- ``head_embed``: ``[embed_tokens, lm_head]`` as one group.
- ``embed``: ``embed_tokens`` alone, head left to the root (tied: the root shares its weight).
- ``root``: everything in the root group.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU interpreter)

import copy  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from apo_kernels.integrations.transformers import patch_model  # noqa: E402

V, D, B, T = 67, 32, 4, 9  # B: global batch (rows); each of 2 ranks gets B / 2
WRAPPINGS = ("head", "head_norm", "head_embed", "embed", "root")
CASES = tuple(f"{w}-{t}" for w in WRAPPINGS for t in ("untied", "tied")) + ("head-untied-triton",)
TOL = dict(rtol=1e-4, atol=2e-5)


def build(tied: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peaked distribution, as a trained head gives
        model.get_output_embeddings().weight.mul_(6.0)
    return model.float().train()


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch ``step``: ids, labels (prompt and padding ignored), attention mask."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # right padding on one row of rank 0's half
    labels[1, -3:] = -100
    labels[2, :4] = -100
    return ids, labels, attention


def reference(model: LlamaForCausalLM, steps: int = 2) -> dict:
    """One process, whole batch, the model's own logits (log-softmax in float64)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
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
            first = dict(logprobs=logp.float().detach(), entropy=entropy.float().detach(),
                         loss=loss.float().detach(), mask=mask,
                         grads={n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    first["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return first


def wrap(model: LlamaForCausalLM, wrapping: str) -> None:
    inner = model.model
    if wrapping != "root":
        for layer in inner.layers:
            fully_shard(layer)
    if wrapping == "head":
        fully_shard(model.lm_head)
    elif wrapping == "head_norm":
        fully_shard([inner.norm, model.lm_head])
    elif wrapping == "head_embed":
        fully_shard([inner.embed_tokens, model.lm_head])
    elif wrapping == "embed":
        fully_shard(inner.embed_tokens)
    elif wrapping != "root":
        raise ValueError(wrapping)
    fully_shard(model)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(case: str, rank: int, world: int) -> list[str]:
    wrapping, tie, *rest = case.split("-")
    backend = rest[0] if rest else "torch"
    tied = tie == "tied"
    base = build(tied)
    ref = reference(copy.deepcopy(base))

    model = copy.deepcopy(base)
    patch_model(model, backend=backend, filter_eps=None, outputs=("entropy",))
    wrap(model, wrapping)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    errors: list[str] = []

    def check(name: str, ours: torch.Tensor, want: torch.Tensor) -> None:
        if ours.shape != want.shape or not torch.allclose(ours, want, **TOL):
            diff = (ours - want).abs().max().item() if ours.shape == want.shape else "shape"
            rel = ((ours - want).norm() / want.norm().clamp(min=1e-12)).item() if ours.shape == want.shape else ""
            errors.append(f"{case} rank {rank}: {name} differs (max abs {diff}, rel {rel})")

    for step in range(2):
        ids, labels, attention = batches(step)
        n_global = (labels[:, 1:] != -100).sum()
        out = model(input_ids=ids[rows], attention_mask=attention[rows], labels=labels[rows],
                    num_items_in_batch=n_global.float() / world)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            mask = ref["mask"][rows]
            check("logprobs", out.logprobs * mask, ref["logprobs"][rows])
            check("entropy", out.entropy * mask, ref["entropy"][rows])
            loss = out.loss.detach() / world
            dist.all_reduce(loss)
            check("loss", loss, ref["loss"])
            grads = {n: p.grad for n, p in model.named_parameters()}
            if set(grads) != set(ref["grads"]):
                errors.append(f"{case}: parameter names differ: {sorted(set(grads) ^ set(ref['grads']))}")
            for n, g in grads.items():
                if g is None:
                    errors.append(f"{case} rank {rank}: no gradient for {n}")
                elif n in ref["grads"]:
                    check(f"grad {n}", full(g), ref["grads"][n])
        opt.step()
    for n, p in model.named_parameters():
        check(f"param after 2 steps {n}", full(p.detach()), ref["params"][n])
    return errors


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cases = sys.argv[1:] or list(CASES)
    failed = 0
    for case in cases:
        try:
            errors = run_case(case, rank, world)
        except Exception:  # report every case, not only the first failure
            errors = [f"{case} rank {rank}: raised\n{traceback.format_exc()}"]
        # Every rank must agree on the verdict (and keep collectives in step).
        flag = torch.tensor([len(errors)])
        dist.all_reduce(flag)
        if errors:
            print("\n".join(errors[:8]), flush=True)
        if flag.item():
            failed += 1
            if rank == 0:
                print(f"CASE {case} FAILED", flush=True)
        elif rank == 0:
            print(f"CASE {case} ok", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
