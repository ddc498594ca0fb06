"""Worker: a patched tiny Llama under FSDP2 (``fully_shard``) against one process, every wrapping.

Run by ``tests/test_distributed_fsdp.py`` through ``torchrun --nproc_per_node=2`` (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed/fsdp_head.py [CASE ...]

A case is ``<wrapping>-<tied|untied>[-<variant>]``; no argument runs :data:`CASES`. For each
case every rank builds the same model from a fixed seed. The ground truth is the unpatched model
in this one process over the WHOLE batch: log-probs and entropy from its own logits (float64),
loss = mean NLL over every labelled token of the global batch, gradients, and parameters after
two optimizer steps. The FSDP copy is patched (``patch_model``), wrapped, and each rank runs its half
of the batch with ``num_items_in_batch`` = global tokens / world size, so that FSDP's averaging
reduce-scatter gives the gradient of the global mean. Compared: each rank's log-probs/entropy
rows, the loss summed over ranks, every gradient and every parameter after two steps
(``full_tensor()`` of the shards). Prints ``CASE <name> ok`` per case; exits 1 with the
differences on any mismatch, or when a case raises (its error is printed).

Wrappings (``fully_shard`` groups; every decoder layer is its own group in all but ``root``):

- ``head``: ``lm_head`` alone (the layout whose gradient was silently wrong, rel. error 1.0).
- ``head_norm``: ``[norm, lm_head]`` as one group.
- ``head_embed``: ``[embed_tokens, lm_head]`` as one group.
- ``embed``: ``embed_tokens`` alone, the head in the root's group.
- ``backbone``: ``model.model`` (embeddings, norm) as a group, the head in the root's group.
- ``accel``: accelerate's FSDP2 layout (HF Trainer, TRL): untied ``embed_tokens`` alone and
  ``[norm, lm_head]``; tied ``[norm, embed_tokens, lm_head]``; that group not resharded.
- ``root``: everything in the root group.

Tied heads: torch refuses a tied weight split across groups (``head``, ``head_norm``, ``embed``,
``backbone``) with a ValueError at the first forward; those cases pass as "refused" (and are
checked like any other if a later torch accepts them).

Variants: ``triton`` (the Triton kernels under the interpreter), ``bf16`` (the head's group under
``MixedPrecisionPolicy(param_dtype=bfloat16)``: compared by relative norm, 2e-2), ``keep``
(``reshard_after_forward=False``), ``offload`` (``CPUOffloadPolicy(pin_memory=False)`` on every
group; on CPU it runs the offload code paths, not host-device copies), ``hsdp`` (a 2-D
``(replicate=1, shard=2)`` mesh), ``twice``
(two patched forwards before one backward), ``late`` (``patch_model`` after ``fully_shard``), ``bias`` (a head bias), ``accum`` (gradient accumulation over two
micro-batches, FSDP's gradient sync off for the first), ``twice2`` (the same with the head group's
``reshard_after_forward=2``, run on 4 ranks: between the forwards its weight is resharded to a
2-rank mesh; :data:`CASES_4` is launched separately), ``trl`` (TRL's ``add_fused_lm_head`` forward with
``apo_kernels.integrations.trl.enable()`` instead of ``patch_model``; TRL gathers a sharded
head itself with ``full_tensor()``, and our function recomputes through the head's group). The case
``guard`` checks that gathering a sharded head where gradients flow raises instead of computing
a wrong gradient. Cases ``pref-<wrapping>-<tie>[-refmodel]`` run ``compute_preference_loss``
(the light path under ``PreferenceTrainer``) the same way, pairs split over ranks, with
precomputed reference log-probs or a reference model wrapped the same way; cases
``precompute-<wrapping>-<tie>`` run ``precompute_ref_logps`` on a wrapped reference;
``fsdp1-root`` / ``fsdp1-head``: FSDP1 with the head in the root unit (gradients checked) / in
its own unit (must raise).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU interpreter)

import copy
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from apo_kernels import FusedLinearPreferenceLoss
from apo_kernels.integrations.head_call import UnsupportedHeadLayout, call_head, gathered_fsdp_param
from apo_kernels.integrations.trainer import compute_preference_loss, precompute_ref_logps
from apo_kernels.integrations.transformers import output_head, patch_model
from tests.distributed.common import causal_batch, one_process_reference, run_case_loop

V, D, B, T = 67, 32, 8, 9  # B: global batch (rows), split evenly over 2 or 4 ranks
WRAPPINGS = ("head", "head_norm", "head_embed", "embed", "backbone", "accel", "root")
TIED_REFUSED = ("head", "head_norm", "embed", "backbone")  # torch 2.13: tied weight split across groups
CASES = (tuple(f"{w}-{t}" for w in WRAPPINGS for t in ("untied", "tied"))
         + ("head-untied-triton", "head-untied-bf16", "head_norm-untied-bf16", "head-untied-keep",
            "head_norm-untied-keep", "head-untied-offload", "accel-tied-offload", "head-untied-hsdp",
            "head-untied-twice", "head-untied-late", "head-untied-bias",
            "head-untied-accum", "head_norm-untied-accum", "head_embed-tied-accum",
            "head_embed-tied-twice", "root-tied-twice", "guard",
            "pref-head-untied", "pref-head_norm-untied", "pref-root-tied", "pref-head_embed-tied-refmodel",
            "pref-head-untied-refmodel", "pref-accel-tied", "pref-accel-untied",
            "accel-untied-trl", "accel-tied-trl", "root-tied-trl", "head-untied-trl",
            "head_embed-tied-trl", "fsdp1-root", "fsdp1-head", "precompute-head-untied", "precompute-root-tied"))
CASES_4 = ("head-untied-twice2", "precompute-head-untied")  # need --nproc_per_node=4
TOL = {"rtol": 1e-4, "atol": 2e-5}
BF16_REL = 2e-2


def build(tied: bool, bias: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peaked distribution, as a trained head gives
        model.get_output_embeddings().weight.mul_(6.0)
    if bias:  # Llama has no head bias; some architectures do (the op takes it)
        model.lm_head.bias = torch.nn.Parameter(torch.randn(V, generator=torch.Generator().manual_seed(5)))
    return model.float().train()


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return causal_batch(step, V, B, T)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD with momentum: the update is linear in the gradients of both steps, so a wrong gradient
    # shows in the weights in proportion. AdamW's near-sign update turns reduction-order noise
    # in tiny gradients (fp32 on 4 ranks, bf16) into full-size weight differences.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def reference(model: LlamaForCausalLM) -> dict:
    return one_process_reference(model, batches, optimizer(model))


def wrap(model: LlamaForCausalLM, wrapping: str, variant: str = "") -> None:
    inner = model.model
    kw: dict = {}
    if variant == "keep":
        kw["reshard_after_forward"] = False
    if variant == "offload":  # pin_memory needs CUDA; on a GPU machine the default pins
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if variant == "hsdp":
        kw["mesh"] = init_device_mesh("cpu", (1, dist.get_world_size()),
                                      mesh_dim_names=("replicate", "shard"))
    head_kw = dict(kw)
    if variant == "twice2":  # 4 ranks: between forwards the head is a DTensor on a 2-rank mesh
        head_kw["reshard_after_forward"] = 2
    if variant == "bf16":
        head_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if wrapping not in ("root", "backbone"):
        for layer in inner.layers:
            fully_shard(layer, **kw)
    if wrapping == "head":
        fully_shard(model.lm_head, **head_kw)
    elif wrapping == "head_norm":
        fully_shard([inner.norm, model.lm_head], **head_kw)
    elif wrapping == "head_embed":
        fully_shard([inner.embed_tokens, model.lm_head], **head_kw)
    elif wrapping == "embed":
        fully_shard(inner.embed_tokens, **kw)
    elif wrapping == "backbone":
        fully_shard(inner, **kw)
    elif wrapping == "accel":  # what accelerate 1.x's FSDP2 prepare does (HF Trainer, TRL)
        tied = model.lm_head.weight is inner.embed_tokens.weight
        if not tied:
            fully_shard(inner.embed_tokens, **kw)
        tail = [inner.norm, inner.embed_tokens, model.lm_head] if tied else [inner.norm, model.lm_head]
        fully_shard(tail, **{**head_kw, "reshard_after_forward": False})
    elif wrapping != "root":
        raise ValueError(wrapping)
    fully_shard(model, **kw)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(case: str, rank: int, world: int) -> tuple[list[str], str]:
    """Errors (empty: passed) and a note for the verdict line."""
    if case == "guard":
        return run_guard(), ""
    if case.startswith("fsdp1-"):
        return run_fsdp1(case, rank, world), ""
    if case.startswith("precompute-"):
        return run_precompute(case, world), ""
    if case.startswith("pref-"):
        return run_pref(case, rank, world), ""
    wrapping, tie, *rest = case.split("-")
    variant = rest[0] if rest else ""
    backend = "triton" if variant == "triton" else "torch"
    tied = tie == "tied"
    base = build(tied, bias=variant == "bias")
    ref = reference(copy.deepcopy(base))

    model = copy.deepcopy(base)
    if variant == "trl":  # TRL's own fused head, routed to our op by apo_trl.enable()
        from trl.trainer.utils import add_fused_lm_head

        from apo_kernels.integrations import trl as apo_trl

        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        model._test_trl_head = True
        apo_trl.enable(backend="torch", filter_eps=None)
        try:
            return _run_steps(case, model, ref, rank, world, wrapping, variant, tied)
        finally:
            apo_trl.disable()
    if variant == "late":  # patch_model after fully_shard
        wrap(model, wrapping, variant)
    patch_model(model, backend=backend, filter_eps=None, outputs=("entropy",))
    return _run_steps(case, model, ref, rank, world, wrapping, variant, tied)


def _run_steps(case: str, model: LlamaForCausalLM, ref: dict, rank: int, world: int, wrapping: str,
               variant: str, tied: bool) -> tuple[list[str], str]:
    if variant != "late":
        wrap(model, wrapping, variant)
    opt = optimizer(model)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    errors: list[str] = []

    def close(ours: torch.Tensor, want: torch.Tensor) -> bool:
        if variant == "bf16":
            return bool((ours - want).norm() <= BF16_REL * want.norm() + 1e-6)
        return torch.allclose(ours, want, **TOL)

    def check(name: str, ours: torch.Tensor, want: torch.Tensor) -> None:
        if ours.shape != want.shape or not close(ours, want):
            diff = (ours - want).abs().max().item() if ours.shape == want.shape else "shape"
            rel = ((ours - want).norm() / want.norm().clamp(min=1e-12)).item() if ours.shape == want.shape else ""
            errors.append(f"{case} rank {rank}: {name} differs (max abs {diff}, rel {rel})")

    for step in range(2):
        ids, labels, attention = batches(step)
        n_global = (labels[:, 1:] != -100).sum()
        opt.zero_grad()
        try:
            if variant == "accum":
                out = accumulate(model, ids[rows], attention[rows], labels[rows], n_global.float() / world)
            else:
                out = forward(model, ids[rows], attention[rows], labels[rows], n_global.float() / world,
                              pieces=2 if variant.startswith("twice") else 1)
                out.loss.backward()
        except ValueError as err:
            if tied and wrapping in TIED_REFUSED and "shared" in str(err) and step == 0:
                return [], " (refused by torch: tied weight split across FSDP groups)"
            raise
        if step == 0:
            mask = ref["mask"][rows]
            check("logprobs", out.logprobs * mask, ref["logprobs"][rows])
            check("entropy", out.entropy * mask, ref["entropy"][rows])
            if variant == "bf16" and torch.allclose(out.logprobs * mask, ref["logprobs"][rows], atol=1e-5):
                errors.append(f"{case}: the head did not run in the policy's bf16 (fp32-exact log-probs)")
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
    return errors, ""


def call(model, **kw) -> SimpleNamespace:
    """One patched forward (ours, or TRL's fused head when the model has one)."""
    if getattr(model, "_test_trl_head", False):
        out = model(**kw, fused_lm_head=True)
        return SimpleNamespace(loss=out.loss, logprobs=out.log_probs, entropy=out.entropy)
    return model(**kw)


def forward(model, ids, attention, labels, num_items, pieces: int) -> SimpleNamespace:
    """The patched forward, over ``pieces`` row blocks called one after the other before any
    backward (as a DPO step scores several batches): concatenated outputs, summed loss."""
    outs = [call(model, input_ids=i, attention_mask=a, labels=lab, num_items_in_batch=num_items)
            for i, a, lab in zip(ids.chunk(pieces), attention.chunk(pieces), labels.chunk(pieces))]
    return SimpleNamespace(loss=sum(o.loss for o in outs),
                           logprobs=torch.cat([o.logprobs for o in outs]),
                           entropy=torch.cat([o.entropy for o in outs]))


def accumulate(model, ids, attention, labels, num_items, pieces: int = 2) -> SimpleNamespace:
    """Gradient accumulation: one forward+backward per row block, FSDP's gradient sync off for
    all but the last (``set_requires_gradient_sync``), as trainers do."""
    outs = []
    for k, (i, a, lab) in enumerate(zip(ids.chunk(pieces), attention.chunk(pieces), labels.chunk(pieces))):
        model.set_requires_gradient_sync(k == pieces - 1)
        out = model(input_ids=i, attention_mask=a, labels=lab, num_items_in_batch=num_items)
        out.loss.backward()
        outs.append(out)
    return SimpleNamespace(loss=sum(o.loss.detach() for o in outs),
                           logprobs=torch.cat([o.logprobs for o in outs]),
                           entropy=torch.cat([o.entropy for o in outs]))


def pref_batch(step: int) -> dict:
    """Global preference batch: B // 2 pairs, rows ``[chosen..., rejected...]`` (the collator's
    layout), precomputed reference log-probs."""
    ids, labels, attention = batches(step)
    g = torch.Generator().manual_seed(200 + step)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention,
            "ref_chosen_logps": -10 * torch.rand(B // 2, generator=g),
            "ref_rejected_logps": -10 * torch.rand(B // 2, generator=g)}


def rank_pairs(batch: dict, rank: int, world: int) -> dict:
    """This rank's pairs, in the same ``[chosen..., rejected...]`` layout."""
    pairs = B // 2
    sel = torch.arange(rank * pairs // world, (rank + 1) * pairs // world)
    rows = torch.cat([sel, sel + pairs])
    return {k: v[sel] if k.startswith("ref_") else v[rows] for k, v in batch.items()}


def run_pref(case: str, rank: int, world: int) -> list[str]:
    """compute_preference_loss (the light path / PreferenceTrainer) under FSDP2 vs one process;
    ``refmodel``: a reference model (wrapped the same way) instead of precomputed log-probs."""
    _, wrapping, tie, *rest = case.split("-")
    with_ref_model = rest == ["refmodel"]
    base = build(tie == "tied")
    loss_fn = FusedLinearPreferenceLoss("apo_zero", beta=0.5, backend="torch", filter_eps=None)
    ref_base = build(tie == "tied")
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref_base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def batch_for(step: int, sharded: bool) -> dict:
        batch = pref_batch(step)
        if with_ref_model:
            batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        return rank_pairs(batch, rank, world) if sharded else batch

    ref_model = copy.deepcopy(ref_base) if with_ref_model else None
    single = copy.deepcopy(base)
    opt = optimizer(single)
    want = []
    for step in range(2):
        out = compute_preference_loss(single, batch_for(step, False), loss_fn, ref_model=ref_model)
        opt.zero_grad()
        out.loss.backward()
        want.append((out, {n: p.grad.clone() for n, p in single.named_parameters()}))
        opt.step()

    model = copy.deepcopy(base)
    wrap(model, wrapping)
    ref_model = None
    if with_ref_model:
        ref_model = copy.deepcopy(ref_base).requires_grad_(False)
        wrap(ref_model, wrapping)
    opt = optimizer(model)
    errors: list[str] = []
    pairs = B // 2
    sel = slice(rank * pairs // world, (rank + 1) * pairs // world)

    def check(name: str, ours: torch.Tensor, exp: torch.Tensor) -> None:
        if ours.shape != exp.shape or not torch.allclose(ours, exp, **TOL):
            diff = (ours - exp).abs().max().item() if ours.shape == exp.shape else "shape"
            errors.append(f"{case} rank {rank}: {name} differs (max abs {diff})")

    for step in range(2):
        out = compute_preference_loss(model, batch_for(step, True), loss_fn, ref_model=ref_model)
        opt.zero_grad()
        out.loss.backward()
        exp, grads = want[step]
        check(f"step {step} chosen_logps", out.chosen_logps.detach(), exp.chosen_logps[sel].detach())
        check(f"step {step} rejected_logps", out.rejected_logps.detach(), exp.rejected_logps[sel].detach())
        check(f"step {step} ref_chosen_logps", out.ref_chosen_logps, exp.ref_chosen_logps[sel])
        loss = out.loss.detach() / world
        dist.all_reduce(loss)
        check(f"step {step} loss", loss, exp.loss.detach())
        for n, p in model.named_parameters():
            check(f"step {step} grad {n}", full(p.grad), grads[n])
        opt.step()
    for n, p in model.named_parameters():
        check(f"param after 2 steps {n}", full(p.detach()), dict(single.named_parameters())[n].detach())
    return errors


def run_precompute(case: str, world: int) -> list[str]:
    """precompute_ref_logps with an FSDP2-wrapped reference gives the one-process values, also
    with the batches split across ranks (each rank scores only its share)."""
    _, wrapping, tie = case.split("-")
    base = build(tie == "tied")
    batch = pref_batch(0)
    pairs = B // 2

    def collate(examples: list[dict]) -> dict:
        sel = torch.tensor([e["pair"] for e in examples])
        rows = torch.cat([sel, sel + pairs])
        return {k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask")}

    data = [{"pair": i} for i in range(pairs)]
    want = precompute_ref_logps(copy.deepcopy(base), data, collate, batch_size=2, progress=False)
    ref_model = copy.deepcopy(base).requires_grad_(False)
    wrap(ref_model, wrapping)
    errors = []
    # Not split, then split across ranks with 3, 1, 2 or 4 pairs per batch: 2, 4, 2 or 1 batches
    # on `world` ranks (an uneven last batch, several rounds, and ranks left without a batch,
    # which re-score one in a padding round: batch_size=4, and 3 on 4 ranks).
    for split, batch_size in ((False, 2), (True, 3), (True, 1), (True, 2), (True, 4)):
        calls = [0]

        def counting(examples: list[dict]) -> dict:
            calls[0] += 1
            return collate(examples)

        got = precompute_ref_logps(ref_model, data, counting, batch_size=batch_size, progress=False,
                                   split_across_ranks=split)
        n_batches = -(-pairs // batch_size)
        expected_calls = -(-n_batches // world) if split else n_batches
        if calls[0] != expected_calls:
            errors.append(f"{case} split={split} batch_size={batch_size}: {calls[0]} batches scored on "
                          f"this rank, expected {expected_calls}")
        if [g["pair"] for g in got] != list(range(pairs)):
            errors.append(f"{case} split={split}: records reordered {[g['pair'] for g in got]}")
        for w, g in zip(want, got):
            for k in ("ref_chosen_logps", "ref_rejected_logps"):
                if abs(w[k] - g[k]) > 1e-4 * (1 + abs(w[k])):
                    errors.append(f"{case} split={split} batch_size={batch_size}: pair {w['pair']} {k}: "
                                  f"{g[k]} != {w[k]}")
    # Ranks handed different datasets: every rank raises (no rank waits in a collective).
    try:
        precompute_ref_logps(ref_model, data[: pairs - dist.get_rank()], collate, batch_size=2,
                             progress=False, split_across_ranks=True)
        errors.append(f"{case}: different datasets on the ranks were not refused")
    except ValueError as err:
        if "same dataset" not in str(err):
            errors.append(f"{case}: unclear refusal: {err}")
    # The same length, other records (a per-rank shard): refused too, not scored out of place.
    shard = data[:pairs // 2] if dist.get_rank() == 0 else data[pairs // 2: 2 * (pairs // 2)]
    try:
        precompute_ref_logps(ref_model, shard, collate, batch_size=1, progress=False, split_across_ranks=True)
        errors.append(f"{case}: equal-length different datasets on the ranks were not refused")
    except ValueError as err:
        if "same dataset" not in str(err):
            errors.append(f"{case}: unclear refusal of per-rank shards: {err}")
    # A rank's own problem (an empty dataset; a record its collator rejects, in a batch only
    # rank 1 scores): every rank raises, none waits in a collective (the process-group timeout).
    def rejecting(examples: list[dict]) -> dict:
        if any(e["pair"] == pairs - 1 for e in examples):
            raise ValueError("collator: bad record")
        return collate(examples)

    for what, kw in (("empty", {"dataset": data if dist.get_rank() == 0 else [], "collator": collate}),
                     ("collator", {"dataset": data, "collator": rejecting})):
        try:
            precompute_ref_logps(ref_model, batch_size=pairs - 1, progress=False, split_across_ranks=True, **kw)
            errors.append(f"{case}: {what}: no error")
        except ValueError as err:
            own = "empty" if what == "empty" else "bad record"
            if own not in str(err):
                errors.append(f"{case}: {what}: unclear error: {err}")
    return errors


def run_fsdp1(case: str, rank: int, world: int) -> list[str]:
    """FSDP1 (deprecated): the head in the root unit is correct; a head wrapped alone raises."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    layout = case.split("-")[1]
    base = build(False)
    ref = reference(copy.deepcopy(base))
    model = copy.deepcopy(base)
    patch_model(model, backend="torch", filter_eps=None)
    cpu = torch.device("cpu")
    if layout == "head":
        model.lm_head = FSDP(model.lm_head, device_id=cpu, use_orig_params=True)
    wrapped = FSDP(model, device_id=cpu, use_orig_params=True)
    ids, labels, attention = batches(0)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    n_global = (labels[:, 1:] != -100).sum()
    try:
        out = wrapped(input_ids=ids[rows], attention_mask=attention[rows], labels=labels[rows],
                      num_items_in_batch=n_global.float() / world)
    except UnsupportedHeadLayout as err:
        return [] if layout == "head" and "FSDP1" in str(err) else [f"{case}: raised {err}"]
    if layout == "head":
        return [f"{case}: a head wrapped alone by FSDP1 did not raise"]
    out.loss.backward()
    errors = []
    with FSDP.summon_full_params(wrapped, with_grads=True):
        for n, p in model.named_parameters():
            if not torch.allclose(p.grad, ref["grads"][n], **TOL):
                errors.append(f"{case} rank {rank}: grad {n} differs")
    return errors


def run_guard() -> list[str]:
    """Where the head's weight is sharded and cannot be gathered correctly, we raise."""
    errors = []
    base = build(False)

    head_alone = copy.deepcopy(base)
    wrap(head_alone, "head")
    try:
        output_head(head_alone)
        errors.append("guard: output_head() gathered an FSDP-sharded head with gradients on")
    except UnsupportedHeadLayout:
        pass
    with torch.no_grad():  # no gradient: gathering is exact (frozen reference models)
        weight, _ = output_head(head_alone)
    if not torch.equal(weight, base.lm_head.weight):
        errors.append("guard: output_head() under no_grad is not the full weight")

    # A gather that FSDP does not manage (tensor parallelism's Shard(0), a plain tensor) is left
    # alone by the TRL path's detector; a gathered FSDP-sharded head is recognised.
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tp = torch.nn.Parameter(distribute_tensor(torch.randn(V, D), mesh, [Shard(0)]))
    if gathered_fsdp_param(tp.full_tensor()) is not None or gathered_fsdp_param(base.lm_head.weight * 1) is not None:
        errors.append("guard: gathered_fsdp_param() claims a non-FSDP tensor")
    gathered = head_alone.lm_head.weight.full_tensor()
    for what, derived in (("x2", gathered * 2.0), ("slice", gathered[:-1]), ("transpose", gathered.t())):
        if gathered_fsdp_param(derived) is not None:  # recomputing from the parameter drops it
            errors.append(f"guard: gathered_fsdp_param() takes a {what} of the gather for the parameter")
    found = gathered_fsdp_param(gathered)
    if found is None or found[0] is not head_alone.lm_head or found[2] != "weight":
        errors.append(f"guard: gathered_fsdp_param() did not find the FSDP head: {found}")

    root = copy.deepcopy(base)  # root-only, before any forward: the root's params are sharded
    wrap(root, "root")
    hidden = torch.randn(3, D, requires_grad=True)
    for what, call in (("output_head", lambda: output_head(root)),
                       ("call_head", lambda: call_head(root, root.lm_head, lambda w, b, h: (h @ w.T,), hidden))):
        try:
            call()
            errors.append(f"guard: {what} on a sharded root-owned head did not raise")
        except UnsupportedHeadLayout as err:
            if "root" not in str(err):
                errors.append(f"guard: {what}: message does not name the layout: {err}")
    return errors


def main() -> int:
    """Run the cases named on the command line (default :data:`CASES`). Rank 0 prints one
    ``CASE <name> ok|FAILED`` line per case and, when ``APO_FSDP_RESULTS`` names a file,
    appends the same line there (the output can be long and is cut by the launcher)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # FSDP2 warns when a wrapped module returns a grad-requiring view (an in-place op on it would
    # drop FSDP's pre-backward hook): our head call and patched forward must return none.
    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    cases = sys.argv[1:] or list(CASES)
    failed = run_case_loop(cases, lambda case: run_case(case, rank, world), "APO_FSDP_RESULTS")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
