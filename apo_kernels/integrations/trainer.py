"""The light path without TRL: a preference loss for any causal LM, an HF ``Trainer`` that uses
it, and a one-off reference log-prob precompute.

- :func:`compute_preference_loss`: policy (and reference) backbone forward -> last hidden states
  -> :class:`apo_kernels.FusedLinearPreferenceLoss` over the model's own output embedding. No
  ``[tokens, vocab]`` logits; the reference runs forward-only. Use it in any loop (Accelerate,
  plain PyTorch) with batches from :class:`~apo_kernels.integrations.collator.PreferenceCollator`.
- :class:`PreferenceTrainer`: ``transformers.Trainer`` whose ``compute_loss`` is the above, logging
  TRL's metric names (``rewards/margins``, ``rewards/accuracies``, ...).
- :func:`precompute_ref_logps`: run the reference once over a dataset (progress bar) and add
  ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, so no reference model is kept in memory.

The reference is, in order: ``ref_chosen_logps``/``ref_rejected_logps`` in the batch, the
``ref_model`` given, or, for a PEFT policy, the same model with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..preference import (
    FusedLinearPreferenceLoss,
    PreferenceLossOutput,
    fused_linear_preference_loss,
)
from ..sequence import packed_sequence_logps, padded_sequence_logps, seq_ids_from_cu_seqlens
from .collator import PreferenceCollator
from .head_call import call_head, call_through, fsdp_root, tensor_parallel_params
from .transformers import (
    _head_module,
    backbone,
    head_transform,
    hidden_states,
    output_head,
    unwrap_model,
)
from .zero3 import gathered_for_forward, initialize_reference, is_deepspeed_engine, zero3_head_owner

__all__ = ["PreferenceTrainer", "compute_preference_loss", "model_inputs", "precompute_ref_logps"]

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Tensor]:
    """The backbone's inputs from a collated batch (``input_ids``, ``attention_mask`` or ``position_ids``)."""
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(
            f"a preference batch needs `input_ids` and `labels` (from PreferenceCollator); got {sorted(batch)}"
        )
    out = {k: batch[k] for k in _MODEL_KEYS if k in batch and batch[k] is not None}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _shifted(batch: dict[str, Any], hidden: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Align hidden states with next-token labels: ``hidden[:, :-1]``, ``labels[:, 1:]`` and, for a
    packed batch, per-token sequence ids of the labels (``[N - 1]``)."""
    labels = batch["labels"].to(device)[:, 1:]
    seq_ids = None
    if "cu_seqlens" in batch and batch["cu_seqlens"] is not None:
        cu = batch["cu_seqlens"].to(device)
        seq_ids = seq_ids_from_cu_seqlens(cu, batch["input_ids"].shape[-1])[1:]
    return hidden[:, :-1], labels, seq_ids


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _in_root(model: nn.Module, fn: Any) -> tuple:
    """``fn()`` inside the forward of ``model``'s FSDP2 root, if it has one (see
    :func:`~apo_kernels.integrations.head_call.fsdp_root`): we call the backbone and the head
    separately, and only the root's pre-forward unshards the parameters its group holds."""
    root = fsdp_root(model, backbone(model))
    return call_through(root, fn) if root is not None else tuple(fn())


def _reference_hidden(model: nn.Module, ref_model: nn.Module | None, inputs: dict[str, Tensor]
                      ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The reference's last hidden states and head ``(weight, bias)``, detached; the head is
    ``(None, None)`` for a PEFT policy (the policy's own head, adapters off) and for a ZeRO-3
    reference (read later, while the op runs, inside :func:`_reference_head`)."""
    with torch.no_grad():
        if ref_model is not None:
            if zero3_head_owner(_head_module(ref_model)) is not None:
                # ZeRO-3 partitions the head again after this returns: gather it where it is used.
                return _in_root(ref_model, lambda: (hidden_states(ref_model, **inputs),))[0], None, None

            def ref_forward() -> tuple:
                ref_weight, ref_bias = output_head(ref_model)  # no gradient: gathering is exact
                return (hidden_states(ref_model, **inputs), ref_weight.detach(),
                        None if ref_bias is None else ref_bias.detach())

            return _in_root(ref_model, ref_forward)
        if _is_peft(model):
            # The frozen base model is the reference: same head, adapters off.
            with model.disable_adapter():
                return _in_root(model, lambda: (hidden_states(model, **inputs),))[0], None, None
    raise ValueError(
        "no reference: pass `ref_model`, precomputed `ref_chosen_logps`/`ref_rejected_logps` in the "
        "batch (see precompute_ref_logps), or train a PEFT model (its base is the reference)"
    )


@contextlib.contextmanager
def _reference_head(ref_model: nn.Module | None) -> Iterator[tuple[Tensor, Tensor | None] | None]:
    """A ZeRO-3 reference model's head ``(weight, bias)``, detached and whole while the context
    lasts (forward only: see :func:`~.zero3.gathered_for_forward`); None for any other
    reference (its head was read with its hidden states)."""
    head = None if ref_model is None else _head_module(ref_model)
    if head is None or zero3_head_owner(head) is None:
        yield None
        return
    # Not under no_grad here: the caller's policy op runs inside this context.
    with gathered_for_forward(head.weight, _head_bias(head)):
        with torch.no_grad():
            weight, bias = output_head(ref_model)
        yield weight.detach(), None if bias is None else bias.detach()


def _head_bias(head: nn.Module) -> Tensor | None:
    bias = getattr(head, "bias", None)
    return bias if isinstance(bias, Tensor) else None


_OUTPUT_TENSORS = ("loss", "losses", "chosen_logps", "rejected_logps", "ref_chosen_logps",
                   "ref_rejected_logps")


def compute_preference_loss(
    model: nn.Module,
    batch: dict[str, Any],
    loss_fn: FusedLinearPreferenceLoss | None = None,
    *,
    ref_model: nn.Module | None = None,
) -> PreferenceLossOutput:
    """Preference loss of a causal LM on one collated batch, without ``[tokens, vocab]`` logits.

    Under FSDP2 (``fully_shard``) the backbone runs inside the root's forward and the head
    inside the forward of the group that shards it, so FSDP unshards, casts and reduce-scatters
    as for the model's own forward (see :mod:`apo_kernels.integrations.head_call`). Under
    DeepSpeed ZeRO-3 the head runs through the head module's hooks, and a ZeRO-3 reference's
    head is gathered only while the op runs (see :mod:`apo_kernels.integrations.zero3`); pass
    the engines (``model=engine``, ``ref_model=initialize_reference(...)``) and call
    ``engine.backward(out.loss)``.

    Args:
        model: the policy (a transformers causal LM, possibly PEFT-wrapped).
        batch: from :class:`PreferenceCollator` (padded or packed), tensors on any device.
        loss_fn: the loss configuration (default: APO-zero, beta 0.1). Its ``softcap`` and
            ``logit_scale`` are taken from the model's config when left at their defaults.
        ref_model: the frozen reference, unless the batch holds precomputed reference log-probs.

    Returns:
        :class:`~apo_kernels.PreferenceLossOutput` (``loss`` differentiable, ``metrics`` detached).
    """
    loss_fn = loss_fn if loss_fn is not None else FusedLinearPreferenceLoss()
    device = output_head(model, gather=False)[0].device
    inputs = model_inputs(batch, device)

    config = dict(loss_fn.config)
    transform = head_transform(unwrap_model(model).config)
    if config["softcap"] is None:
        config["softcap"] = transform.softcap
    if config["logit_scale"] == 1.0:
        config["logit_scale"] = transform.logit_scale

    ref: dict[str, Any] = {}
    if batch.get("ref_chosen_logps") is not None and batch.get("ref_rejected_logps") is not None:
        ref["ref_chosen_logps"] = batch["ref_chosen_logps"].to(device)
        ref["ref_rejected_logps"] = batch["ref_rejected_logps"].to(device)
    else:
        ref_hidden, ref_weight, ref_bias = _reference_hidden(model, ref_model, inputs)
        ref.update(ref_hidden=ref_hidden[:, :-1].to(device), ref_weight=ref_weight, ref_bias=ref_bias)

    metric_keys: list[str] = []

    def head_op(_weight: Tensor, _bias: Tensor | None, hidden: Tensor, labels: Tensor,
                seq_ids: Tensor | None) -> tuple:
        # Inside the forward of the group that shards the head, if any: output_head then reads
        # the unsharded parameters (see head_call.call_head).
        weight, bias = output_head(model)
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(device.type):
            hidden = hidden.to(weight.dtype)
        kw = dict(ref)
        with _reference_head(ref_model if "ref_hidden" in kw else None) as zero3_ref:
            if zero3_ref is not None:  # a ZeRO-3 reference's head: whole only inside this context
                kw["ref_weight"], kw["ref_bias"] = zero3_ref
            elif "ref_hidden" in kw and kw["ref_weight"] is None:  # PEFT: the policy's own head
                kw["ref_bias"] = None if bias is None else bias.detach()
            if "ref_hidden" in kw:
                rw = kw["ref_weight"] if kw["ref_weight"] is not None else weight
                if kw["ref_hidden"].dtype != rw.dtype and not torch.is_autocast_enabled(device.type):
                    kw["ref_hidden"] = kw["ref_hidden"].to(rw.dtype)
            out = fused_linear_preference_loss(hidden, weight, labels, bias, seq_ids=seq_ids, **kw, **config)
        metric_keys[:] = list(out.metrics)
        return (*(getattr(out, k) for k in _OUTPUT_TENSORS), *out.metrics.values())

    def policy() -> tuple:
        hidden, labels, seq_ids = _shifted(batch, hidden_states(model, **inputs), device)
        return call_head(model, _head_module(model), head_op, hidden, labels, seq_ids)

    flat = _in_root(model, policy)
    n = len(_OUTPUT_TENSORS)
    return PreferenceLossOutput(**dict(zip(_OUTPUT_TENSORS, flat[:n])),
                                metrics=dict(zip(metric_keys, flat[n:])))


@torch.no_grad()
def precompute_ref_logps(
    ref_model: nn.Module,
    dataset: Any,
    collator: PreferenceCollator,
    *,
    batch_size: int = 8,
    reduction: str = "sum",
    ld_alpha: float | None = None,
    temperature: float = 1.0,
    progress: bool = True,
    split_across_ranks: bool = False,
) -> Any:
    """Score every pair of ``dataset`` once with the reference, forward-only.

    Args:
        ref_model: the reference causal LM (its device is used; with a PEFT model, adapters are
            disabled while scoring, so the base model is the reference).
        dataset: a ``datasets.Dataset`` or a list of records.
        collator: turns records into batches (the same truncation as training).
        batch_size: pairs per forward.
        reduction, ld_alpha: must match the loss's sequence reduction.
        temperature: as in the loss.
        progress: show a tqdm progress bar (rank 0 only when split across ranks).
        split_across_ranks: under ``torch.distributed``, every rank of the default group calls
            this with the same ``dataset``; batch ``i`` is scored by rank ``i % world_size``
            and the scores are all-gathered, so each rank runs ``ceil(batches / world_size)``
            forwards instead of all of them. A rank left without a batch in the last round
            re-scores its first one and drops the result, which keeps the collectives of a
            sharded reference (FSDP2, ZeRO-3) in step. For data-parallel layouts (DDP, FSDP2,
            ZeRO-3); not for tensor parallelism, whose ranks must see the same batch. Without
            an initialised process group (or with one rank) it changes nothing. Checked on
            every rank together: the same length, batch size and records (a fingerprint of
            up to 64 sampled records); an error on one rank (an argument, a batch its
            collator rejects) makes every rank raise before the next collective.

    Returns:
        the dataset with fp32 ``ref_chosen_logps`` and ``ref_rejected_logps`` columns (a new
        ``datasets.Dataset``, or a new list of dicts), the same on every rank.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    error: Exception | None = None
    if batch_size < 1:
        error = ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    elif len(dataset) == 0:
        error = ValueError("`dataset` is empty: nothing to score")
    # Checked on every rank together when splitting: a rank that raised alone here would leave
    # the others waiting in the first collective.
    rank, world = _split_ranks(split_across_ranks, ref_model, dataset, batch_size, error)
    n_batches = -(-len(dataset) // batch_size)
    batches = [list(range(i * batch_size, min(len(dataset), (i + 1) * batch_size))) for i in range(n_batches)]
    mine = list(range(rank, n_batches, world))
    rounds = -(-n_batches // world)
    # Padding rounds re-score this rank's first batch (or batch 0): every rank runs `rounds`
    # forwards, as the gathers of a sharded reference need. Their results are dropped.
    order = mine + [mine[0] if mine else 0] * (rounds - len(mine))
    loader = DataLoader(dataset, batch_sampler=[batches[i] for i in order], collate_fn=collator)
    scorer = _ReferenceScorer(ref_model, reduction=reduction, ld_alpha=ld_alpha, temperature=temperature)
    scores: dict[int, tuple[list[float], list[float]]] = {}
    show = progress and rank == 0
    with scorer:
        batches_iter = iter(tqdm(loader, desc="reference log-probs", unit="batch", disable=not show))
        for step, index in enumerate(order):
            # A failure on this rank's own batches (a record the collator rejects, a label out of
            # the vocabulary) is shared before the next forward: the peers, scoring other
            # batches, would otherwise wait in the reference's or the final gather's collectives.
            batch = None
            try:
                batch = next(batches_iter)
            except Exception as exc:
                if world == 1:
                    raise
                error = error or exc
            _share_error(world, error)
            try:
                result = scorer(batch)
                if step < len(mine):  # a padding round's repeat is dropped
                    scores[index] = result
            except Exception as exc:
                if world == 1:
                    raise
                error = exc
        next(batches_iter, None)  # exhausted: the progress bar closes
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (scores, None if error is None else repr(error)))
        _raise_shared(error, [part[1] for part in gathered])
        scores = {i: v for part in gathered for i, v in part[0].items()}
    elif error is not None:
        raise error
    chosen = [x for i in range(n_batches) for x in scores[i][0]]
    rejected = [x for i in range(n_batches) for x in scores[i][1]]
    if hasattr(dataset, "add_column"):
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
    return [{**dict(ex), "ref_chosen_logps": c, "ref_rejected_logps": r}
            for ex, c, r in zip(dataset, chosen, rejected)]


def _split_ranks(split: bool, ref_model: nn.Module, dataset: Any, batch_size: int,
                 error: Exception | None) -> tuple[int, int]:
    """``(rank, world_size)`` over which :func:`precompute_ref_logps` splits its batches:
    ``(0, 1)`` when not splitting (``error``, this rank's argument error, is raised). Splitting,
    every rank checks that all were given the same dataset (size, and a fingerprint of sampled
    records) and batch size, and that none found an error: else all raise (a different split on
    one rank would misplace scores; a rank raising alone would leave the others in a collective).
    """
    dist = torch.distributed
    if not split or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return 0, 1
    tp = tensor_parallel_params(unwrap_model(ref_model))
    if tp:  # local to each rank, so every rank raises (no collective is left waiting)
        raise ValueError(f"split_across_ranks=True: `ref_model` is tensor-parallel ({tp[0]}, ...), "
                         "and tensor-parallel ranks must score the same batches; pass split_across_ranks=False")
    mine = (len(dataset), batch_size, None if error is not None else _fingerprint(dataset))
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (mine, None if error is None else repr(error)))
    _raise_shared(error, [s[1] for s in seen])
    if any(other[0] != mine for other in seen):
        raise ValueError("split_across_ranks=True: ranks were given different datasets "
                         f"((len(dataset), batch_size, fingerprint) by rank: {[s[0] for s in seen]}); "
                         "every rank must pass the same dataset")
    return dist.get_rank(), dist.get_world_size()


def _fingerprint(dataset: Any, samples: int = 64) -> str:
    """A hash of up to ``samples`` evenly spaced records (first and last included): the same on
    every rank for the same dataset, cheap for any size; it tells apart per-rank shards or
    per-rank shuffles of equal length (which the length alone cannot)."""
    n = len(dataset)
    picks = sorted({(n - 1) * k // max(1, samples - 1) for k in range(samples)}) if n else []
    digest = hashlib.sha256()
    for i in picks:
        record = dataset[i]
        if isinstance(record, Mapping):
            record = sorted(record.items(), key=lambda kv: str(kv[0]))
        digest.update(repr(record).encode())
    return digest.hexdigest()


def _share_error(world: int, error: Exception | None) -> None:
    """All ranks learn whether any failed (one small all-gather); every rank raises if so."""
    if world == 1:
        if error is not None:
            raise error
        return
    seen: list[Any] = [None] * world
    torch.distributed.all_gather_object(seen, None if error is None else repr(error))
    _raise_shared(error, seen)


def _raise_shared(error: Exception | None, seen: list[str | None]) -> None:
    """Raise ``error`` on the rank that found it, a ValueError naming it on every other rank."""
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(seen) if e is not None]
    if failed:
        raise ValueError(f"precompute_ref_logps(split_across_ranks=True): rank {failed[0][0]} failed "
                         f"({failed[0][1]}); every rank stops so that none waits in a collective")


class _ReferenceScorer:
    """Sequence log-probs of one collated preference batch under the reference (forward only);
    a context manager that puts the reference in eval mode (and disables PEFT adapters)."""

    def __init__(self, ref_model: nn.Module, *, reduction: str, ld_alpha: float | None, temperature: float):
        # A ZeRO-3 head is partitioned between batches: only its dtype and device are read here,
        # and it is gathered for each batch's op (_reference_head).
        self.weight, self.bias = output_head(ref_model, gather=zero3_head_owner(_head_module(ref_model)) is None)
        self.transform = head_transform(unwrap_model(ref_model).config)
        self.model, self.reduction, self.ld_alpha, self.temperature = ref_model, reduction, ld_alpha, temperature
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ReferenceScorer:
        was_training = self.model.training
        self.model.eval()
        self._stack.callback(self.model.train, was_training)
        if _is_peft(self.model):
            self._stack.enter_context(self.model.disable_adapter())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self, batch: dict[str, Any]) -> tuple[list[float], list[float]]:
        """``(chosen, rejected)`` sequence log-probs (fp32 floats) of the batch's pairs."""
        from ..ops import linear_logprobs

        model, device = self.model, self.weight.device
        inputs = model_inputs(batch, device)
        hidden = _in_root(model, lambda: (hidden_states(model, **inputs),))[0]
        hidden, labels, seq_ids = _shifted(batch, hidden, device)
        with _reference_head(model) as zero3_head:
            w, b = zero3_head if zero3_head is not None else (self.weight, self.bias)
            tok = linear_logprobs(hidden.to(w.dtype), w, labels, b, temperature=self.temperature,
                                  logit_scale=self.transform.logit_scale, softcap=self.transform.softcap)
        mask = labels != -100
        if seq_ids is None:
            seq = padded_sequence_logps(tok, mask, reduction=self.reduction, ld_alpha=self.ld_alpha).logps
        else:
            seq = packed_sequence_logps(tok[0], seq_ids=seq_ids, mask=mask[0],
                                        num_seqs=batch["cu_seqlens"].numel() - 1,
                                        reduction=self.reduction, ld_alpha=self.ld_alpha).logps
        half = seq.shape[0] // 2
        return seq[:half].float().tolist(), seq[half:].float().tolist()


def _trainer_base() -> type:
    from transformers import Trainer

    return Trainer


class PreferenceTrainer(_trainer_base()):
    """``transformers.Trainer`` for APO / DPO on preference records, via our fused loss.

    Args:
        model: the policy causal LM (or PEFT model).
        args: ``TrainingArguments``; ``remove_unused_columns`` is forced off (the collator needs
            the raw ``prompt``/``chosen``/``rejected`` fields).
        ref_model: the frozen reference; not needed when the dataset carries
            ``ref_chosen_logps``/``ref_rejected_logps`` or the policy is a PEFT model. Under
            DeepSpeed ZeRO-3 it is partitioned like the policy (``deepspeed.initialize`` without
            an optimizer, see :func:`~.zero3.initialize_reference`) unless it is an engine already.
        loss_fn: the loss (default ``FusedLinearPreferenceLoss("apo_zero", beta=0.1)``).
        data_collator: default ``PreferenceCollator(processing_class)``.
        other arguments: as for ``transformers.Trainer`` (``train_dataset``, ``eval_dataset``,
            ``processing_class``, ``callbacks``, ...).

    Logged: ``loss`` plus the loss's metrics averaged over the logging window, under TRL's names.
    """

    def __init__(self, model: nn.Module, args: Any = None, *, ref_model: nn.Module | None = None,
                 loss_fn: FusedLinearPreferenceLoss | None = None, data_collator: Any = None,
                 processing_class: Any = None, **kwargs: Any) -> None:
        if args is not None:
            args.remove_unused_columns = False
        if data_collator is None:
            if processing_class is None:
                raise ValueError("give `processing_class` (the tokenizer) or a `data_collator`")
            data_collator = PreferenceCollator(processing_class)
        super().__init__(model=model, args=args, data_collator=data_collator,
                         processing_class=processing_class, **kwargs)
        self.loss_fn = loss_fn if loss_fn is not None else FusedLinearPreferenceLoss()
        if ref_model is not None:
            ref_model.requires_grad_(False)
            if is_deepspeed_engine(ref_model):
                pass  # DeepSpeed placed it (moving it could move offloaded ZeRO-3 partitions)
            elif self._zero3_config() is not None:
                # Partitioned like the policy, its hooks gathering each layer (as TRL does).
                ref_model = initialize_reference(ref_model, self._zero3_config())
            else:
                ref_model.to(self.args.device)
            ref_model.eval()
        self.ref_model = ref_model
        self._pref_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _zero3_config(self) -> dict[str, Any] | None:
        """The run's DeepSpeed config when it is ZeRO stage 3, else None."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        config = getattr(plugin, "deepspeed_config", None) or {}
        return config if config.get("zero_optimization", {}).get("stage") == 3 else None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = compute_preference_loss(model, inputs, self.loss_fn, ref_model=self.ref_model)
        mode = "train" if model.training else "eval"
        for k, v in out.metrics.items():
            self._pref_metrics[mode][k].append(float(v))
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Tensor, None, None]:
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, values in self._pref_metrics[mode].items():
            if values:
                logs[prefix + k] = sum(values) / len(values)
        self._pref_metrics[mode].clear()
        super().log(logs, start_time)
