"""Worker: a patched tiny Llama under transformers' OWN tensor parallelism (``tp_plan``) vs one process.

Run by ``tests/test_distributed_hf_tp.py`` through ``torchrun`` (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed/hftp_patch_model.py [CASE ...]

Rank 0 builds a tiny Llama from a fixed seed (head scaled up: a peaked distribution, as a trained
head gives) and saves it with ``save_pretrained``; every rank loads it twice: once plainly (the
ground truth: the UNPATCHED model's own logits, log-softmax in float64, over the whole global
batch, SGD with momentum for two steps) and once with tensor parallelism from transformers'
``from_pretrained`` (what the HF Trainer / TRL users get), then ``patch_model``. Compared: log-probs,
entropy, loss, every gradient (``full_tensor()``), every parameter after two steps. A spy on
``linear_logprobs`` records the head weight the fused op receives, so each case also checks that
the head stays vocabulary-sharded (``V/P`` rows per rank) where it should.

Cases (:data:`CASES`, 2 ranks = one TP group):

- ``auto-untied``: ``from_pretrained(..., tp_plan="auto")`` (lm_head ``colwise_gather_output``:
  weight DTensor ``Shard(0)`` on the 1-D ``tp`` mesh); also ``verify_patch`` and HF's own loss of
  the same TP model (``fused_logprobs=False``, the lm_head's own TP forward).
- ``size-tied``: ``DistributedConfig(tp_size=2)``, tied embeddings (``embedding_rowwise`` and the
  head share one ``Shard(0)`` parameter).
- ``auto-untied-triton``: the Triton kernels (interpreter) on the shard.
- ``rowwise-untied``: ``tp_plan={"lm_head": "rowwise_split_input"}`` (the hidden dimension split,
  ``Shard(1)``, as a few models' plans do): gathered whole (correct, no memory saving).
- ``mismatch``: the two TP ranks fed different batches (a data loader sharded over TP ranks):
  every rank raises a ValueError naming the labels (not silently wrong; no rank hangs).
- ``trainer``: the HF ``Trainer`` for two steps (see :func:`run_trainer` for the one CPU-only
  bypass it needs).
- ``pref-untied``, ``pref-tied-refmodel``: ``compute_preference_loss`` (``PreferenceTrainer``'s
  loss) on the TP model, with precomputed reference log-probs / a TP reference model.
- ``auto-untied-trl``, ``size-tied-trl``: TRL's fused LM head (``add_fused_lm_head``, what its
  trainers use) with ``apo_kernels.integrations.trl.enable()`` instead of ``patch_model``. TRL
  gathers the DTensor head with ``full_tensor()``; our function must recognise the gather and
  run on the ``Shard(0)`` parameter itself. ``tp_guard``: that recognition accepts only a plain
  gather (and a cast), never another computation on the weight or another placement.

:data:`CASES_4` (4 ranks: ``DistributedConfig(tp_size=2, fsdp_size=2)``, a ``(fsdp=2, tp=2)``
mesh): ``fsdp_tp-untied``, ``fsdp_tp-tied``, ``fsdp_tp-untied-trl``: FSDP2 x TP, each FSDP rank
its half of the batch; the head FSDP unshards for the forward is the TP shard, run
vocabulary-parallel.

Rank 0 prints ``CASE <name> ok|FAILED`` per case (and appends it to ``$APO_HFTP_RESULTS``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU interpreter)

import shutil
import sys
import tempfile
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.distributed import DistributedConfig

import apo_kernels.integrations.transformers as apo_tf
from apo_kernels.integrations.head_call import tensor_parallel_params
from apo_kernels.integrations.trainer import precompute_ref_logps
from apo_kernels.integrations.transformers import patch_model, verify_patch

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

from tests.distributed.common import causal_batch, one_process_reference, run_case_loop

V, D, B, T = 67, 32, 4, 9  # B: global batch rows (split over FSDP ranks in the 4-rank cases)
CASES = ("auto-untied", "size-tied", "auto-untied-triton", "rowwise-untied", "mismatch", "trainer",
         "pref-untied", "pref-tied-refmodel", "auto-untied-trl", "size-tied-trl", "tp_guard")
CASES_4 = ("fsdp_tp-untied", "fsdp_tp-tied", "fsdp_tp-untied-trl")
TOL = {"rtol": 1e-4, "atol": 2e-5}
LR, MOMENTUM = 0.5, 0.9
SAVED: list[str] = []  # folders rank 0 wrote (removed at the end)


def save_model(tied: bool) -> str:
    """Rank 0 saves the tiny model; every rank gets the folder (removed by :func:`main`)."""
    folder = [None]
    if dist.get_rank() == 0:
        cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # a peaked distribution, as a trained head gives
            model.get_output_embeddings().weight.mul_(6.0)
        folder[0] = tempfile.mkdtemp(prefix=f"apo_hftp_{'tied' if tied else 'untied'}_")
        model.save_pretrained(folder[0])
        SAVED.append(folder[0])
    dist.broadcast_object_list(folder, src=0)
    return folder[0]


def load(folder: str, **kw) -> LlamaForCausalLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tp_plan= directly: deprecated, still the common recipe
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).train()


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return causal_batch(step, V, B, T)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD with momentum: the update is linear in both steps' gradients, so a wrong gradient shows
    # in the weights in proportion (AdamW's near-sign update would amplify rounding noise).
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def reference(model: LlamaForCausalLM, momentum: float = MOMENTUM) -> dict:
    """One process, whole batch, the unpatched model's own logits."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    return one_process_reference(model, batches, opt)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Spy:
    """Records the head weight ``linear_logprobs`` receives in the patched forward (or in
    another module that calls it, e.g. the TRL integration)."""

    def __init__(self, module=apo_tf) -> None:
        self.seen: list[tuple] = []
        self._module = module
        self._orig = module.linear_logprobs

    def __enter__(self) -> Self:
        def spy(hidden, weight, *args, **kwargs):
            local = weight.to_local() if isinstance(weight, DTensor) else weight
            self.seen.append((type(weight).__name__, tuple(getattr(weight, "placements", ())),
                              tuple(local.shape)))
            return self._orig(hidden, weight, *args, **kwargs)

        self._module.linear_logprobs = spy
        return self

    def __exit__(self, *exc) -> None:
        self._module.linear_logprobs = self._orig


class Checker:
    def __init__(self, case: str, rank: int) -> None:
        self.case, self.rank, self.errors = case, rank, []

    def __call__(self, name: str, ours: torch.Tensor, want: torch.Tensor) -> None:
        ours, want = ours.detach().float(), want.detach().float()
        if ours.shape != want.shape or not torch.allclose(ours, want, **TOL):
            diff = (ours - want).abs().max().item() if ours.shape == want.shape else f"shape {tuple(ours.shape)}"
            self.errors.append(f"{self.case} rank {self.rank}: {name} differs (max abs {diff})")

    def fail(self, msg: str) -> None:
        self.errors.append(f"{self.case} rank {self.rank}: {msg}")


def tp_kwargs(kind: str, world: int) -> dict:
    if kind == "auto":
        return {"tp_plan": "auto"}
    if kind == "size":
        return {"distributed_config": DistributedConfig(tp_size=world)}
    if kind == "rowwise":
        return {"distributed_config": DistributedConfig(tp_size=world, tp_plan={"lm_head": "rowwise_split_input"})}
    if kind == "fsdp_tp":
        return {"distributed_config": DistributedConfig(tp_size=2, fsdp_size=world // 2)}
    raise ValueError(kind)


def run_case(case: str, rank: int, world: int) -> list[str]:
    if case == "mismatch":
        return run_mismatch(rank, world)
    if case == "trainer":
        return run_trainer(rank, world)
    if case.startswith("pref-"):
        return run_pref(case, rank, world)
    if case == "tp_guard":
        return run_tp_guard(rank, world)
    kind, tie, *rest = case.split("-")
    variant = rest[0] if rest else ""
    check = Checker(case, rank)
    folder = save_model(tie == "tied")
    ref = reference(load(folder))
    model = load(folder, **tp_kwargs(kind, world))
    if tie == "tied" and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        check.fail("the tied head is not the embedding's parameter under TP")
    head_name = "model.embed_tokens.weight" if tie == "tied" else "lm_head.weight"  # tied: listed once
    if kind != "rowwise" and head_name not in tensor_parallel_params(model):
        # precompute_ref_logps(split_across_ranks=True) relies on it to refuse TP references.
        check.fail(f"tensor_parallel_params misses the TP head: {tensor_parallel_params(model)}")
    if variant == "trl":  # TRL's fused head, routed to our op by apo_trl.enable()
        from trl.trainer.utils import add_fused_lm_head

        from apo_kernels.integrations import trl as apo_trl

        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        apo_trl.enable(backend="torch", filter_eps=None)
        try:
            with Spy(apo_trl) as spy:
                out, grads, _, params = train_two_steps(model, kind, rank, world, trl=True)
        finally:
            apo_trl.disable()
        seen = spy.seen
    elif variant != "hf":  # "hf": the unpatched model's own loss (a control for the layout itself)
        patch_model(model, backend="triton" if variant == "triton" else "torch", filter_eps=None,
                    outputs=("entropy",))
    if variant != "trl":
        out, grads, seen, params = train_two_steps(model, kind, rank, world)
    if variant != "hf":
        expect_rows = V if kind == "rowwise" else -(-V // 2) if rank % 2 == 0 else V // 2
        if not seen or any(s[2] != (expect_rows, D) for s in seen) or (
                kind != "rowwise" and {s[0] for s in seen} != {"DTensor"}):
            check.fail(f"the fused op got the head as {seen}, expected {expect_rows} rows"
                       + ("" if kind == "rowwise" else " of a DTensor Shard(0) (vocabulary-parallel)"))
        mask = ref["mask"][out.rows]
        check("logprobs", out.logprobs * mask, ref["logprobs"][out.rows])
        check("entropy", out.entropy * mask, ref["entropy"][out.rows])
    check("loss", out.loss, ref["loss"])
    if set(grads) != set(ref["grads"]):
        check.fail(f"parameter names differ: {sorted(set(grads) ^ set(ref['grads']))}")
    for n, g in grads.items():
        if g is None:
            check.fail(f"no gradient for {n}")
        elif n in ref["grads"]:
            check(f"grad {n}", g, ref["grads"][n])
    want = ref["params"]
    if kind == "fsdp_tp" and tie == "tied" and variant != "hf":
        # transformers' own FSDP2 x TP run of a tied model (unpatched, its own loss) already
        # differs from one process after two steps (embed_tokens by 0.022 here; the first step's
        # gradients agree): not ours to fix. The patched run must equal that run.
        _, _, _, want = train_two_steps(load(folder, **tp_kwargs(kind, world)), kind, rank, world)
    for n, p in params.items():
        check(f"param after 2 steps {n}", p, want[n])
    if case == "auto-untied":
        check.errors += extra_checks(model, case, rank)
    return check.errors


def train_two_steps(model: LlamaForCausalLM, kind: str, rank: int, world: int, trl: bool = False) -> tuple:
    """Two SGD steps on the global batches (each FSDP rank its rows). Returns the first step's
    outputs (``loss`` summed over FSDP ranks: the global mean), its gradients and the heads the
    fused op received (``full_tensor()``), and the parameters after two steps."""
    opt = optimizer(model)
    fsdp = world // 2 if kind == "fsdp_tp" else 1
    part = rank // (world // fsdp)  # this rank's FSDP rank: which rows of the batch
    rows = slice(part * B // fsdp, (part + 1) * B // fsdp)
    first = grads = seen = None
    for step in range(2):
        ids, labels, attention = batches(step)
        n_global = (labels[:, 1:] != -100).sum()
        opt.zero_grad()
        with Spy() as spy:
            kw = {"input_ids": ids[rows], "attention_mask": attention[rows], "labels": labels[rows],
                  "num_items_in_batch": n_global.float() / fsdp}
            if trl:
                res = model(**kw, fused_lm_head=True)
                out = SimpleNamespace(loss=res.loss, logprobs=res.log_probs, entropy=res.entropy)
            else:
                out = model(**kw)
        out.loss.backward()
        if step == 0:
            loss = out.loss.detach() / world  # TP ranks hold the same loss, FSDP ranks their part
            dist.all_reduce(loss)
            first = SimpleNamespace(loss=loss, rows=rows, logprobs=getattr(out, "logprobs", None),
                                    entropy=getattr(out, "entropy", None))
            grads = {n: None if p.grad is None else full(p.grad) for n, p in model.named_parameters()}
            seen = spy.seen
        opt.step()
    return first, grads, seen, {n: full(p.detach()) for n, p in model.named_parameters()}


def extra_checks(model: LlamaForCausalLM, case: str, rank: int) -> list[str]:
    """verify_patch on the TP model, and our loss vs HF's own TP loss (its lm_head's TP forward)."""
    errors = []
    try:
        diff = verify_patch(model)
        if not diff < 1e-4:
            errors.append(f"{case} rank {rank}: verify_patch difference {diff}")
    except Exception as err:  # noqa: BLE001
        errors.append(f"{case} rank {rank}: verify_patch raised {err!r}")
    ids, labels, attention = batches(0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        hf = model(input_ids=ids, attention_mask=attention, labels=labels, fused_logprobs=False).loss
    if not torch.allclose(ours, hf, **TOL):
        errors.append(f"{case} rank {rank}: patched loss {ours.item()} vs HF's own TP loss {hf.item()}")
    return errors


def run_pref(case: str, rank: int, world: int) -> list[str]:
    """``compute_preference_loss`` (the light path under ``PreferenceTrainer``) on the TP model vs
    one process: chosen/rejected/reference log-probs, loss, every gradient, weights after two
    steps. ``refmodel``: a reference model loaded with the same TP plan (forward only) instead
    of precomputed reference log-probs."""
    from apo_kernels import FusedLinearPreferenceLoss
    from apo_kernels.integrations.trainer import compute_preference_loss

    _, tie, *rest = case.split("-")
    with_ref_model = rest == ["refmodel"]
    check = Checker(case, rank)
    folder = save_model(tie == "tied")
    loss_fn = FusedLinearPreferenceLoss("apo_zero", beta=0.5, backend="torch", filter_eps=None)

    def batch_for(step: int) -> dict:  # B // 2 pairs, rows [chosen..., rejected...]
        ids, labels, attention = batches(step)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        if not with_ref_model:
            g = torch.Generator().manual_seed(200 + step)
            batch["ref_chosen_logps"] = -10 * torch.rand(B // 2, generator=g)
            batch["ref_rejected_logps"] = -10 * torch.rand(B // 2, generator=g)
        return batch

    import apo_kernels.integrations.trainer as apo_trainer

    seen: list[tuple] = []
    original = apo_trainer.fused_linear_preference_loss

    def spy(hidden, weight, *args, **kwargs):  # the heads the loss gets (policy, reference)
        for w in (weight, kwargs.get("ref_weight")):
            if w is not None:
                seen.append((type(w).__name__, tuple((w.to_local() if isinstance(w, DTensor) else w).shape)))
        return original(hidden, weight, *args, **kwargs)

    runs = []
    for tp in (False, True):
        seen.clear()
        apo_trainer.fused_linear_preference_loss = spy
        kw = {"tp_plan": "auto"} if tp else {}
        model = load(folder, **kw)
        ref_model = load(folder, **kw).requires_grad_(False) if with_ref_model else None
        if ref_model is not None:
            with torch.no_grad():  # a reference that differs from the policy, the same on every rank
                for p in ref_model.parameters():
                    p.mul_(0.9)
        try:
            opt = optimizer(model)
            steps = []
            for step in range(2):
                out = compute_preference_loss(model, batch_for(step), loss_fn, ref_model=ref_model)
                opt.zero_grad()
                out.loss.backward()
                steps.append((out, {n: full(p.grad) for n, p in model.named_parameters()}))
                opt.step()
        finally:
            apo_trainer.fused_linear_preference_loss = original
        rows = -(-V // 2) if rank == 0 else V // 2
        if tp and (not seen or any(w != ("DTensor", (rows, D)) for w in seen)):
            check.fail(f"the preference loss got the heads as {seen}, expected DTensor shards of {rows} rows")
        runs.append((steps, {n: full(p.detach()) for n, p in model.named_parameters()}))
    (want, want_params), (got, got_params) = runs
    for step in range(2):
        for field in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "loss"):
            check(f"step {step} {field}", getattr(got[step][0], field), getattr(want[step][0], field))
        for n, g in got[step][1].items():
            check(f"step {step} grad {n}", g, want[step][1][n])
    for n, p in got_params.items():
        check(f"param after 2 steps {n}", p, want_params[n])
    return check.errors


def run_tp_guard(rank: int, world: int) -> list[str]:
    """``gathered_tp_shard`` takes only a plain gather (and a cast) of a Shard(0) parameter for
    a vocabulary shard: never another computation on it, nor another placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from apo_kernels.integrations.head_call import gathered_tp_shard

    check = Checker("tp_guard", rank)
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(V, D, generator=torch.Generator().manual_seed(3)),
                                             mesh, [Shard(0)]))
    for name, t, want in (("full_tensor()", w.full_tensor(), w), ("cast", w.full_tensor().bfloat16(), w),
                          ("scaled", w.full_tensor() * 2, None), ("a slice", w.full_tensor()[:5], None),
                          ("detached", w.full_tensor().detach(), None),
                          ("Shard(1)", torch.nn.Parameter(distribute_tensor(torch.randn(V, D), mesh, [Shard(1)])
                                                          ).full_tensor(), None),
                          ("Replicate", torch.nn.Parameter(distribute_tensor(torch.randn(V, D), mesh, [Replicate()])
                                                           ).full_tensor(), None)):
        if gathered_tp_shard(t) is not want:
            check.fail(f"gathered_tp_shard({name}) is {'not ' if want is not None else ''}the shard")
    return check.errors


def run_mismatch(rank: int, world: int) -> list[str]:
    """TP ranks fed different batches (a data loader sharding over TP ranks): every rank must
    raise a ValueError (labels differ across the group), none may return a loss."""
    check = Checker("mismatch", rank)
    model = patch_model(load(save_model(False), tp_plan="auto"), backend="torch")
    ids, labels, attention = batches(rank)  # a different batch per TP rank
    try:
        model(input_ids=ids, attention_mask=attention, labels=labels)
        check.fail("different batches on the TP ranks did not raise")
    except ValueError as err:
        if "labels" not in str(err) or "vocab_parallel_group" not in str(err):
            check.fail(f"error does not say what differs: {err}")
    # Splitting reference scoring across TP ranks would do the same: refused before any batch.
    try:
        precompute_ref_logps(model, [{"pair": 0}], None, split_across_ranks=True, progress=False)
        check.fail("precompute_ref_logps(split_across_ranks=True) accepted a tensor-parallel reference")
    except ValueError as err:
        if "tensor-parallel" not in str(err):
            check.fail(f"unclear refusal of a TP reference: {err}")
    return check.errors


def run_trainer(rank: int, world: int) -> list[str]:
    """The HF Trainer steps a patched TP model: weights after two steps match one process.

    CPU-only bypass: accelerate 1.15's ``ParallelismConfig._validate_accelerator`` refuses
    ``DistributedType.MULTI_CPU`` (it accepts MULTI_GPU and the other accelerators), so it is
    replaced by a no-op here. Nothing else differs from a GPU run: with ``tp_size > 1``
    ``Accelerator.prepare_model`` takes its tensor-parallel branch before its MULTI_CPU (DDP)
    branch, which the test checks (the model is not wrapped).
    """
    import accelerate.parallelism_config as apc
    from transformers import Trainer, TrainingArguments

    check = Checker("trainer", rank)
    folder = save_model(False)
    ref = reference(load(folder), momentum=0.0)
    model = patch_model(load(folder, tp_plan="auto"), backend="torch", filter_eps=None)
    data = []
    for i in range(B):  # the global batch as B examples; each step sees all of them
        ids, labels, attention = batches(0)
        data.append({"input_ids": ids[i], "labels": labels[i], "attention_mask": attention[i]})
    out_dir = tempfile.mkdtemp(prefix="apo_hftp_trainer_") if rank == 0 else None
    args = TrainingArguments(output_dir=out_dir or "/nonexistent", per_device_train_batch_size=B, max_steps=2,
                             learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             logging_steps=1, seed=0)
    original = apc.ParallelismConfig._validate_accelerator
    apc.ParallelismConfig._validate_accelerator = lambda self, accelerator: None
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    finally:
        apc.ParallelismConfig._validate_accelerator = original
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    if trainer.model_wrapped is not model:
        check.fail(f"the Trainer wrapped the TP model in {type(trainer.model_wrapped).__name__}")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not losses or abs(losses[0] - float(ref["loss"])) > 1e-4:
        check.fail(f"Trainer's first logged loss {losses} vs one process {float(ref['loss'])}")
    # The reference takes its second step on batch 1; the Trainer on the same batch 0 again.
    ref2 = reference_same_batch(load(folder))
    for n, p in model.named_parameters():
        check(f"param after 2 Trainer steps {n}", full(p.detach()), ref2[n])
    return check.errors


def reference_same_batch(model: LlamaForCausalLM) -> dict:
    """Plain SGD (the Trainer's ``optim="sgd"``: no momentum), two steps on batch 0."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids, labels, attention = batches(0)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cases = sys.argv[1:] or list(CASES if world == 2 else CASES_4)
    failed = run_case_loop(cases, lambda case: (run_case(case, rank, world), ""), "APO_HFTP_RESULTS")
    dist.barrier()
    for folder in SAVED:  # rank 0's (the others hold none)
        shutil.rmtree(folder, ignore_errors=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
