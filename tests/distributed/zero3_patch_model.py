"""Worker: DeepSpeed ZeRO-3 (CPU accelerator, gloo) + ``patch_model`` against one process.

Run by ``tests/test_distributed_zero3.py`` under ``torchrun --nproc_per_node=2``. For a tiny
Llama, untied and tied, every rank builds the same model from a fixed seed; the one-process
ground truth (the same patched model, no DeepSpeed) sees every rank's micro-batch and averages
the per-rank losses, as ZeRO's data-parallel gradient averaging does. Then ZeRO-3 trains two
steps (different data each step) and each step compares log-probs, entropy and loss (this
rank's rows), every parameter's full gradient (``safe_get_full_grad``), and at the end every
full weight. ``bf16`` checks one step of DeepSpeed's bf16 mode. ``pref-untied`` / ``pref-tied`` do the same for the preference-loss paths
(``precompute_ref_logps`` and ``compute_preference_loss`` with a ZeRO-3 reference model or with
precomputed reference log-probs), ``pref-trainer`` runs ``PreferenceTrainer``, ``trainer`` the HF
Trainer and ``dpo`` TRL's DPOTrainer. Exits non-zero (AssertionError) on any mismatch.

Usage: torchrun --nproc_per_node=2 tests/distributed/zero3_patch_model.py
       [untied|tied|bf16|trainer|dpo|pref-untied|pref-tied|pref-trainer ...]
"""

from __future__ import annotations

import copy
import importlib
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

# Model classes first: deepspeed.zero.Init patches tensor constructors, which breaks importing
# transformers' modelling code afterwards; importing deepspeed itself is harmless.
from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer
from apo_kernels.integrations.transformers import output_head, patch_model

build_tiny_model(build_tiny_tokenizer(["warm"]), hidden_size=8, num_layers=1, num_heads=2)

import deepspeed
from deepspeed.utils import safe_get_full_grad

if os.environ.get("APO_ZERO3_SHM") != "1":
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (a C++ extension) when
    # its communicator starts: 30-80 s on a fresh 2-core machine, cached afterwards in
    # ~/.cache/torch_extensions. It is a CPU speed-up only (GPUs use NCCL) and the plain gloo
    # collectives it replaces give the same sums, so the test skips the build; APO_ZERO3_SHM=1
    # runs with it (the same checks pass).
    # (sys.modules: the attribute `deepspeed.comm.torch` is the torch package itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

MICRO = 2       # sequences per rank per step
SEQ = 9
LR = 0.5
# SGD with momentum, not Adam: Adam's first step moves every weight by about +-lr whatever the
# size of its gradient, so a gradient that is 1e-10 on one side and -1e-10 on the other (reduction
# order) would make weights differ by 2*lr and hide real errors behind noise. SGD keeps the
# comparison linear in the gradients.
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32; ranks differ only in reduction order

TEXT = ("the quick brown fox jumps over the lazy dog while seven odd wizards quietly judge "
        "boxing matches near a frozen lake under pale violet skies")


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        # persistence 0: even these tiny parameters are partitioned (the default keeps
        # parameters below 1e5 elements whole, which would hide the bug under test).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at norm 1.0 unless told otherwise
        "zero_allow_untested_optimizer": True,  # torch SGD: ZeRO-3 steps it on fp32 partitions
    }


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def make_batch(vocab: int, world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[world * MICRO, SEQ] ids and labels: a prompt of 2-4 tokens and a few random positions
    ignored, so ranks hold different numbers of labelled tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (world * MICRO, SEQ), generator=gen)
    labels = ids.clone()
    for row in range(labels.shape[0]):
        labels[row, : 2 + row % 3] = -100
    labels[torch.rand(labels.shape, generator=gen) < 0.15] = -100
    return ids, labels


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.allclose(got, want, **TOL):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{name}: max |ZeRO-3 - one process| = {diff:.3g} (scale {want.abs().max().item():.3g})")


def check_full_grads(engine, ref_params: dict, label: str) -> None:
    """Every parameter's full gradient (gathered across the ZeRO-3 partitions) against one
    process's. A collective: every rank walks the parameters in the same order."""
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        want = ref_params[name].grad
        assert grad is not None and want is not None, f"{label} {name}: no gradient"
        check(f"{label} grad {name}", grad.view(want.shape), want)


def check_weights(engine, ref_params: dict, label: str) -> None:
    """Every parameter, gathered, against one process's after the same optimizer steps."""
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            check(f"{label} weight {name} after 2 steps", param.data.clone(), ref_params[name].data)


def run(tied: bool, rank: int, world: int) -> None:
    tag = "tied" if tied else "untied"
    tok = build_tiny_tokenizer([TEXT])
    ref = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4,
                           tie_word_embeddings=tied, seed=11)
    model = copy.deepcopy(ref)
    vocab = len(tok)
    patch_model(ref, backend="torch", outputs=("entropy",))
    ref_opt = optimizer(ref)
    # Both orders work: untied patches the model before deepspeed.initialize, tied the engine after.
    if not tied:
        patch_model(model, backend="torch", outputs=("entropy",))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model),
                                      config=ds_config())
    if tied:
        assert patch_model(engine, backend="torch", outputs=("entropy",)) is engine
        assert "forward" not in vars(engine) and "forward" in vars(engine.module), "patched the engine itself"
    head = engine.module.get_output_embeddings()
    assert (head.weight is engine.module.get_input_embeddings().weight) == tied, f"{tag}: tying lost"
    # The layout under test: the head weight is partitioned to nothing outside its forward.
    assert head.weight.numel() == 0 and tuple(head.weight.ds_shape) == (vocab, 32), \
        f"{tag}: head not ZeRO-3 partitioned ({tuple(head.weight.shape)})"
    # Reading the partitioned head outside its module's hooks is refused clearly.
    try:
        output_head(engine.module)
    except ValueError as exc:
        assert "ZeRO-3" in str(exc), exc
    else:
        raise AssertionError(f"{tag}: output_head read a partitioned ZeRO-3 head without error")

    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    names = [n for n, _ in engine.module.named_parameters()]
    ref_params = dict(ref.named_parameters())
    assert sorted(names) == sorted(ref_params), f"{tag}: parameter names differ"
    for step in range(2):
        ids, labels = make_batch(vocab, world, seed=100 * step + 7)
        # One process: every rank's micro-batch, losses averaged over ranks (ZeRO's gradient
        # averaging), then the ordinary torch optimizer step.
        ref_opt.zero_grad(set_to_none=True)
        ref_out = [ref(input_ids=ids[r * MICRO:(r + 1) * MICRO], labels=labels[r * MICRO:(r + 1) * MICRO])
                   for r in range(world)]
        (sum(o.loss for o in ref_out) / world).backward()
        if step == 0:  # the ground truth itself matches the unpatched model's logits
            with torch.no_grad():
                logits = ref(input_ids=ids[rows], fused_logprobs=False, labels=labels[rows]).logits
            lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[rows, 1:, None])[..., 0]
            lp = torch.where(labels[rows, 1:] != -100, lp, torch.zeros_like(lp))
            check(f"{tag} step {step} one-process logprobs vs logits", ref_out[rank].logprobs, lp)

        out = engine(input_ids=ids[rows], labels=labels[rows])
        check(f"{tag} step {step} logprobs", out.logprobs, ref_out[rank].logprobs)
        check(f"{tag} step {step} entropy", out.entropy, ref_out[rank].entropy)
        check(f"{tag} step {step} loss", out.loss, ref_out[rank].loss)
        engine.backward(out.loss)
        check_full_grads(engine, ref_params, f"{tag} step {step}")
        engine.step()
        ref_opt.step()

    check_weights(engine, ref_params, tag)
    head_grad_seen = ref.get_output_embeddings().weight.grad.abs().sum().item()
    assert head_grad_seen > 0, f"{tag}: the head got no gradient (the test would prove nothing)"
    engine.destroy()
    if rank == 0:
        print(f"zero3 {tag}: logprobs, entropy, loss, {len(names)} gradients x2 steps, weights OK",
              flush=True)


def run_bf16(rank: int, world: int) -> None:
    """ZeRO-3 with DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights),
    untied head, one step. bf16 rounding differs with the reduction order, so the check is the
    tolerance rule in norm form: for each quantity q (this rank's log-probs, entropy, loss, every
    full gradient), ||q_zero3 - q_fp32|| <= 2 ||q_bf16 - q_fp32|| + 1e-3 ||q_fp32||, where q_bf16
    is one process in bf16 on the same weights and q_fp32 the same weights in fp32. A half-reduced
    or stale head gradient is off by ~||q|| and fails."""
    tok = build_tiny_tokenizer([TEXT])
    base = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, seed=13).to(torch.bfloat16)
    exact, same = copy.deepcopy(base).float(), copy.deepcopy(base)
    model = copy.deepcopy(base).float()  # bf16-representable values: DeepSpeed's cast is exact
    for m in (exact, same, model):
        patch_model(m, backend="torch", outputs=("entropy",))
    config = dict(ds_config(), bf16={"enabled": True})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model), config=config)
    head = engine.module.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and head.numel() == 0, f"bf16: head {head.dtype}, {head.numel()} elements"

    ids, labels = make_batch(len(tok), world, seed=17)
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    refs = {}
    for key, m in (("exact", exact), ("same", same)):
        outs = [m(input_ids=ids[r * MICRO:(r + 1) * MICRO], labels=labels[r * MICRO:(r + 1) * MICRO])
                for r in range(world)]
        (sum(o.loss for o in outs) / world).backward()
        refs[key] = {"logprobs": outs[rank].logprobs, "entropy": outs[rank].entropy, "loss": outs[rank].loss,
                     **{f"grad {n}": p.grad for n, p in m.named_parameters()}}
    out = engine(input_ids=ids[rows], labels=labels[rows])
    engine.backward(out.loss)
    got = {"logprobs": out.logprobs, "entropy": out.entropy, "loss": out.loss}
    for name, param in engine.module.named_parameters():  # a collective: same order on every rank
        got[f"grad {name}"] = safe_get_full_grad(param).view(refs["exact"][f"grad {name}"].shape)
    for key, value in got.items():
        exact_q, same_q = (refs[k][key].detach().double() for k in ("exact", "same"))
        err = (value.detach().double() - exact_q).norm().item()
        allowed = 2 * (same_q - exact_q).norm().item() + 1e-3 * exact_q.norm().item()
        assert err <= allowed, f"bf16 {key}: ||ZeRO-3 - fp32|| = {err:.3g} > {allowed:.3g}"
    assert refs["exact"]["grad lm_head.weight"].abs().sum() > 0, "bf16: the head got no gradient"
    engine.destroy()
    if rank == 0:
        print(f"zero3 bf16: logprobs, entropy, loss, {len(got) - 3} gradients within the bf16 rule OK",
              flush=True)


def run_hf_trainer(rank: int, world: int) -> None:
    """The HF Trainer recipe: ``TrainingArguments(deepspeed=...)`` before ``from_pretrained``
    (so the model is partitioned while it loads, before ``patch_model`` sees it), a tied head,
    AdamW. Every example is the same sequence, so the first logged loss must equal the one-process
    loss of that sequence whatever the sampler does; then the loss drops and the head moves."""
    import tempfile

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tok = build_tiny_tokenizer([TEXT])
    ref = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=True, seed=5)
    # Rank 0 saves (transformers writes the config only on the main process), the others wait.
    folder = [tempfile.mkdtemp(prefix="zero3-trainer-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(folder, src=0)
    folder = folder[0]
    if rank == 0:
        ref.save_pretrained(folder)
    torch.distributed.barrier()
    ids, labels = make_batch(len(tok), 1, seed=3)
    ids, labels = ids[:1], labels[:1]
    patch_model(ref, backend="torch")
    with torch.no_grad():
        want = ref(input_ids=ids, labels=labels).loss.item()
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    args = TrainingArguments(output_dir=os.path.join(folder, f"out{rank}"), per_device_train_batch_size=MICRO, max_steps=3,
                             learning_rate=1e-2, deepspeed=ds, use_cpu=True, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    weight = model.get_output_embeddings().weight
    assert weight.numel() == 0 and tuple(weight.ds_shape) == (len(tok), 32), "trainer: not partitioned at load"
    patch_model(model, backend="torch")
    data = [{"input_ids": ids[0], "labels": labels[0]} for _ in range(4 * world * MICRO)]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3, losses
    check("trainer first loss", torch.tensor(losses[0]), torch.tensor(want))
    assert losses[2] < losses[0] - 1e-3, f"trainer: loss did not drop {losses}"
    with deepspeed.zero.GatheredParameters([weight]):
        moved = (weight.data - ref.get_output_embeddings().weight.data).abs().max().item()
    assert moved > 1e-3, "trainer: the head did not train"
    if rank == 0:
        print(f"zero3 trainer: from_pretrained under ZeRO-3, tied, losses {[round(x, 4) for x in losses]} OK",
              flush=True)


def run_dpo(rank: int, world: int) -> None:
    """TRL's DPOTrainer under ZeRO-3 with ``apo_kernels.integrations.trl.enable()``: TRL's own
    fused head gathers the partitioned head itself; our op must give the same losses as TRL's
    own head for two steps (the second loss depends on the first step's gradients)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from apo_kernels.integrations import trl as apo_trl
    from apo_kernels.integrations.data import load_preference_dataset, tiny_dataset_path

    records = [r for r in load_preference_dataset(tiny_dataset_path()) if isinstance(r["prompt"], str)][:8]
    data = datasets.Dataset.from_list(records)
    tok = build_tiny_tokenizer(records)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    losses = {}
    for ours in (False, True):
        args = DPOConfig(output_dir=f"/tmp/zero3-dpo-{rank}-{ours}", max_steps=2, per_device_train_batch_size=2,
                         learning_rate=5e-3, beta=0.5, logging_steps=1, report_to="none", use_cpu=True,
                         save_strategy="no", max_length=64, disable_tqdm=True, bf16=False, deepspeed=ds,
                         seed=0, data_seed=0)
        model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=1)
        if ours:
            apo_trl.enable(backend="torch")
        try:
            trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                                 processing_class=tok)
            trainer.train()
        finally:
            apo_trl.disable()
        losses[ours] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 2, losses
    check("dpo losses (enable() vs TRL's head)", torch.tensor(losses[True]), torch.tensor(losses[False]))
    assert losses[True][1] != losses[True][0], f"dpo: the second step did not change the loss {losses}"
    if rank == 0:
        print(f"zero3 dpo: TRL DPOTrainer with enable() matches TRL's head {[round(x, 5) for x in losses[True]]} OK",
              flush=True)


PAIRS = 2  # preference pairs per rank per step


def pref_batch(vocab: int, world: int, seed: int, ref_logps: bool) -> dict:
    """A global preference batch of ``world * PAIRS`` pairs in the collator's layout (rows
    ``[chosen..., rejected...]``, unshifted labels, right padding with an attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * world * PAIRS
    ids = torch.randint(0, vocab, (n, SEQ), generator=gen)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    for row in range(n):
        labels[row, : 2 + row % 3] = -100          # the prompt
        pad = row % 2                               # some rows padded at the end
        if pad:
            labels[row, -pad:] = -100
            attention[row, -pad:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    if ref_logps:
        batch["ref_chosen_logps"] = -20 * torch.rand(world * PAIRS, generator=gen)
        batch["ref_rejected_logps"] = -20 * torch.rand(world * PAIRS, generator=gen)
    return batch


def rank_pairs(batch: dict, rank: int, world: int) -> dict:
    """This rank's pairs, in the same ``[chosen..., rejected...]`` layout."""
    total = world * PAIRS
    sel = torch.arange(rank * PAIRS, (rank + 1) * PAIRS)
    rows = torch.cat([sel, sel + total])
    return {k: v[sel] if k.startswith("ref_") else v[rows] for k, v in batch.items()}


def run_pref(tied: bool, rank: int, world: int) -> None:
    """compute_preference_loss and precompute_ref_logps under ZeRO-3 against one process:
    the reference as a ZeRO-3 model, then as log-probs that precompute_ref_logps computed with
    that ZeRO-3 reference. Per rank: chosen/rejected/reference log-probs, loss and every metric
    (against one process on this rank's pairs); every full gradient (against one process on all
    pairs: ZeRO averages the ranks' gradients, the loss is a mean over pairs); weights after two
    steps."""
    from apo_kernels import FusedLinearPreferenceLoss
    from apo_kernels.integrations.trainer import compute_preference_loss, precompute_ref_logps
    from apo_kernels.integrations.zero3 import initialize_reference

    tag = "pref " + ("tied" if tied else "untied")
    tok = build_tiny_tokenizer([TEXT])
    vocab = len(tok)
    base = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=tied, seed=21)
    ref_base = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=tied, seed=22)
    loss_fn = FusedLinearPreferenceLoss("apo_zero", beta=0.5, backend="torch", filter_eps=None)

    # As PreferenceTrainer prepares a reference (and TRL does): deepspeed.initialize, no optimizer.
    ref_engine = initialize_reference(copy.deepcopy(ref_base), ds_config())
    assert ref_engine.module.get_output_embeddings().weight.numel() == 0, f"{tag}: reference not partitioned"

    # precompute_ref_logps with the ZeRO-3 reference (every rank gets the same records: its
    # gathers are collectives) against the same reference in one process.
    records = [{"pair": i} for i in range(world * PAIRS)]
    batches = {step: pref_batch(vocab, world, 300 + step, ref_logps=False) for step in range(2)}

    def collate(step: int):
        def fn(examples: list[dict]) -> dict:
            sel = torch.tensor([e["pair"] for e in examples])
            rows = torch.cat([sel, sel + world * PAIRS])
            return {k: v[rows] for k, v in batches[step].items()}
        return fn

    precomputed = {}
    for step in range(2):
        want = precompute_ref_logps(copy.deepcopy(ref_base), records, collate(step), batch_size=3, progress=False)
        # Step 1 splits the batches across ranks (an uneven split: a padding round on one rank).
        got = precompute_ref_logps(ref_engine, records, collate(step), batch_size=3, progress=False,
                                   split_across_ranks=step == 1)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            check(f"{tag} step {step} precompute_ref_logps {key}", torch.tensor([g[key] for g in got]),
                  torch.tensor([w[key] for w in want]))
        precomputed[step] = {"ref_chosen_logps": torch.tensor([g["ref_chosen_logps"] for g in got]),
                             "ref_rejected_logps": torch.tensor([g["ref_rejected_logps"] for g in got])}

    for mode in ("ref_model", "precomputed"):
        def batch_for(step: int, mode: str = mode) -> dict:
            batch = dict(batches[step])
            if mode == "precomputed":
                batch.update(precomputed[step])
            return batch

        single = copy.deepcopy(base)
        single_ref = copy.deepcopy(ref_base).requires_grad_(False) if mode == "ref_model" else None
        opt = optimizer(single)
        model = copy.deepcopy(base)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model), config=ds_config())
        assert engine.module.get_output_embeddings().weight.numel() == 0, f"{tag}: policy not partitioned"
        ref_arg = ref_engine if mode == "ref_model" else None
        params = dict(single.named_parameters())
        for step in range(2):
            full = batch_for(step)
            mine = rank_pairs(full, rank, world)
            with torch.no_grad():  # one process on this rank's pairs: values and metrics
                want = compute_preference_loss(single, mine, loss_fn, ref_model=single_ref)
            opt.zero_grad(set_to_none=True)
            compute_preference_loss(single, full, loss_fn, ref_model=single_ref).loss.backward()

            out = compute_preference_loss(engine, mine, loss_fn, ref_model=ref_arg)
            name = f"{tag} {mode} step {step}"
            for key in ("loss", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
                check(f"{name} {key}", getattr(out, key), getattr(want, key))
            assert sorted(out.metrics) == sorted(want.metrics), f"{name}: metric names differ"
            for key, value in want.metrics.items():
                check(f"{name} metric {key}", out.metrics[key], value)
            engine.backward(out.loss)
            check_full_grads(engine, params, name)
            engine.step()
            opt.step()
        check_weights(engine, params, f"{tag} {mode}")
        head_grad = single.get_output_embeddings().weight.grad.abs().sum().item()
        assert head_grad > 0, f"{tag} {mode}: the head got no gradient (the test would prove nothing)"
        engine.destroy()
    ref_engine.destroy()
    if rank == 0:
        print(f"zero3 {tag}: precompute_ref_logps, compute_preference_loss (ZeRO-3 reference model, "
              "precomputed) loss, log-probs, metrics, gradients x2 steps, weights OK", flush=True)


def run_pref_trainer(rank: int, world: int) -> None:
    """PreferenceTrainer under ZeRO-3 (the HF Trainer recipe: ``TrainingArguments(deepspeed=...)``
    first, so policy and reference are partitioned while ``from_pretrained`` loads them; tied
    heads; the trainer gives the reference DeepSpeed hooks). Every record is the same pair, so
    each logged step must equal one process on one batch whatever the sampler does: the loss and
    every metric of both steps (plain SGD at a constant rate: the second step checks the
    first step's update)."""
    import tempfile

    from transformers import AutoModelForCausalLM, TrainingArguments

    from apo_kernels import FusedLinearPreferenceLoss
    from apo_kernels.integrations.collator import PreferenceCollator
    from apo_kernels.integrations.trainer import PreferenceTrainer, compute_preference_loss

    tok = build_tiny_tokenizer([TEXT])
    record = {"prompt": "the quick brown", "chosen": "fox jumps over the lazy dog",
              "rejected": "dog while seven odd wizards"}
    policy = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=True, seed=31)
    reference = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=True, seed=32)
    folder = [tempfile.mkdtemp(prefix="zero3-pref-trainer-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(folder, src=0)
    folder = folder[0]
    if rank == 0:
        policy.save_pretrained(os.path.join(folder, "policy"))
        reference.save_pretrained(os.path.join(folder, "ref"))
    torch.distributed.barrier()

    loss_fn = FusedLinearPreferenceLoss("apo_zero", beta=0.5, backend="torch", filter_eps=None)
    lr = 0.5
    batch = PreferenceCollator(tok)([record] * MICRO)
    want = []
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    for _ in range(2):
        out = compute_preference_loss(policy, batch, loss_fn, ref_model=reference)
        want.append({"loss": out.loss.item(), **{k: float(v) for k, v in out.metrics.items()}})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert abs(want[1]["loss"] - want[0]["loss"]) > 1e-3, f"pref trainer: the step changed nothing {want}"

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    args = TrainingArguments(output_dir=os.path.join(folder, f"out{rank}"), per_device_train_batch_size=MICRO,
                             max_steps=2, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, deepspeed=ds, use_cpu=True, report_to=[], logging_steps=1,
                             save_strategy="no", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"))
    ref_model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "ref"))
    for m in (model, ref_model):
        assert m.get_output_embeddings().weight.numel() == 0, "pref trainer: not partitioned at load"
    trainer = PreferenceTrainer(model, args, ref_model=ref_model, loss_fn=loss_fn, processing_class=tok,
                                train_dataset=[record] * (4 * world * MICRO))
    assert "DeepSpeedEngine" in type(trainer.ref_model).__name__, "pref trainer: reference not initialised"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2, logs
    for step, (got, exp) in enumerate(zip(logs, want)):
        for key, value in exp.items():
            assert key in got, f"pref trainer step {step}: {key} not logged ({sorted(got)})"
            check(f"pref trainer step {step} {key}", torch.tensor(got[key]), torch.tensor(value))
    if rank == 0:
        print(f"zero3 pref trainer: PreferenceTrainer, ZeRO-3 policy and reference, loss and "
              f"{len(want[0]) - 1} metrics x2 steps OK", flush=True)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    layouts = sys.argv[1:] or ["untied", "tied", "bf16", "trainer", "dpo", "pref-untied", "pref-tied", "pref-trainer"]
    for layout in layouts:
        if layout == "trainer":
            run_hf_trainer(rank, world)
        elif layout == "dpo":
            run_dpo(rank, world)
        elif layout in ("untied", "tied"):
            run(layout == "tied", rank, world)
        elif layout == "bf16":
            run_bf16(rank, world)
        elif layout == "pref-trainer":
            run_pref_trainer(rank, world)
        elif layout in ("pref-untied", "pref-tied"):
            run_pref(layout == "pref-tied", rank, world)
        else:
            raise SystemExit(f"unknown layout {layout!r}: expected 'untied', 'tied', 'trainer', 'dpo', "
                             "'bf16', 'pref-untied', 'pref-tied' or 'pref-trainer'")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
