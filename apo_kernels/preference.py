"""Fused preference loss: policy hidden states + LM head -> APO / DPO-family loss and TRL metrics.

Data flow (no ``[tokens, vocab]`` tensor anywhere):

    hidden, weight, labels --linear_logprobs--> per-token log-probs (+ entropy, stats)
    ref_hidden, ref_weight --linear_logprobs under no_grad--> reference per-token log-probs
        (or precomputed reference sequence log-probs)
    per-token log-probs --segment sums (sum / mean / LD-DPO weights)--> sequence log-probs
    sequence log-probs --losses.preference_loss--> per-pair losses -> mean

For ``sigmoid``, ``apo_zero`` and ``apo_down`` (reverse-KL, no WPO weighting) the last two
steps run as one fused op (:func:`apo_kernels.ops.preference_head.preference_head`: one Triton
launch forward, one backward on CUDA); every other loss goes through the torch formulas.

Labels are aligned with the hidden states: ``labels[..., t]`` is the token predicted from
``hidden[..., t, :]`` (for a causal LM pass ``hidden[:, :-1]`` and ``input_ids[:, 1:]`` with
non-completion positions set to ``ignore_index``, as TRL's fused head does).

Layouts, chosen sequences first then rejected (TRL's order):
- padded: ``hidden [2B, T, D]``, ``labels [2B, T]``;
- packed (padding-free): ``hidden [N, D]`` (or ``[1, N, D]``), ``labels [N]`` and sequence
  bounds ``cu_seqlens [2B + 1]`` or per-token ``seq_ids [N]`` (non-decreasing).

A sequence without any completion token has log-prob 0 (policy and reference), so its pair's
loss is finite and it contributes no gradient; a batch without any completion token at all is
an error (there is nothing to train on, and TRL's own mean would be NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .losses import _normalise_loss_types, _validate_params, preference_loss, preference_rewards
from .ops import LinearLogprobsOutput, linear_logprobs
from .ops.backend import resolve_backend
from .ops.checks import (
    check_label_values,
    check_linear_inputs,
    check_options,
    check_same_dtype,
    check_transform,
)
from .ops.preference_head import HEAD_LOSS_TYPES, preference_head
from .ops.preference_single_pass import SinglePassPlan, single_pass_sequence_logps
from .ops.vocab_parallel import intended_group, resolve_dtensor_inputs, share_input_errors
from .sequence import (
    REDUCTIONS,
    _check_ld_alpha,
    completion_token_weights,
    cu_seqlens_from_seq_ids,
    seq_ids_from_cu_seqlens,
    wpo_pair_weights,
)

__all__ = ["FusedLinearPreferenceLoss", "PreferenceLossOutput", "fused_linear_preference_loss"]


@dataclass
class PreferenceLossOutput:
    """Result of the fused preference loss.

    loss: 0-dim fp32, the batch loss (mean of ``losses``), differentiable.
    losses: ``[B]`` fp32 per-pair losses, differentiable.
    chosen_logps, rejected_logps: ``[B]`` fp32 policy sequence log-probs, differentiable.
    ref_chosen_logps, ref_rejected_logps: ``[B]`` fp32 reference sequence log-probs, no grad.
    metrics: TRL's names -> 0-dim detached tensors (``.item()`` to log): ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (mean logit over the
        vocabulary, averaged over chosen / rejected completion tokens), ``entropy`` (mean over
        all completion tokens), ``mean_token_accuracy`` (label is the arg-max, chosen tokens)
        and ``nll`` (mean NLL per chosen completion token). Empty when metrics are off.
    """

    loss: Tensor
    losses: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """Where the 2B sequences are: padded rows, or packed tokens with int64 ``cu [2B+1]``."""

    packed: bool
    num_seqs: int
    cu: Tensor | None = None  # packed only
    seq_ids: Tensor | None = None  # packed only, [N] int64


def _resolve_layout(hidden: Tensor, labels: Tensor, cu_seqlens: Tensor | None, seq_ids: Tensor | None) -> tuple[Tensor, Tensor, _Layout]:
    if not isinstance(hidden, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("`hidden` and `labels` must be torch.Tensors")
    packed = cu_seqlens is not None or seq_ids is not None
    if cu_seqlens is not None and seq_ids is not None:
        raise ValueError("give at most one of `cu_seqlens` or `seq_ids` (packed batches)")
    if packed:
        if hidden.dim() == 3 and hidden.shape[0] == 1:  # TRL's padding-free single row
            hidden, labels = hidden[0], labels.reshape(labels.shape[-1])
        if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
            raise ValueError(
                f"packed `hidden` must be [N, D] (or [1, N, D]) with `labels` [N]; got "
                f"{tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        n = labels.shape[0]
        if cu_seqlens is not None:
            ids = seq_ids_from_cu_seqlens(cu_seqlens.to(labels.device), n)
            cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        else:
            if seq_ids.shape != labels.shape:
                raise ValueError(f"`seq_ids` must be [N]={n}, got {tuple(seq_ids.shape)}")
            cu = cu_seqlens_from_seq_ids(seq_ids.to(labels.device))
            ids = seq_ids.to(device=labels.device, dtype=torch.int64)
        num_seqs = cu.numel() - 1
        if num_seqs % 2:
            raise ValueError(
                f"a packed batch must hold chosen then rejected sequences (2B); got {num_seqs} sequences: "
                "the numbers of chosen and rejected completions differ"
            )
        return hidden, labels, _Layout(True, num_seqs, cu.contiguous(), ids)
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"padded `hidden` must be [2B, T, D] with `labels` [2B, T]; got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)} (packed batches need `cu_seqlens` or `seq_ids`)"
        )
    if hidden.shape[0] % 2:
        raise ValueError(
            f"`hidden` has {hidden.shape[0]} rows; a padded batch stacks B chosen then B rejected "
            "sequences (an even number of rows)"
        )
    return hidden, labels, _Layout(False, hidden.shape[0])


def _segment_sums(x: Tensor, w: Tensor, layout: _Layout) -> Tensor:
    """``sum_t w_t x_t`` per sequence -> fp32 ``[2B]`` (``where`` so weight-0 tokens never leak)."""
    contrib = torch.where(w != 0, x.float() * w, x.new_zeros((), dtype=torch.float32))
    if layout.packed:
        return contrib.new_zeros(layout.num_seqs).index_add(0, layout.seq_ids, contrib)
    return contrib.sum(dim=1)


def _check_reference_head(ref_hidden: Tensor, ref_weight: Tensor | None, ref_bias: Tensor | None,
                          weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    """The reference's inputs, with errors that name the reference's arguments (the op's own
    checks would call them ``hidden``/``weight``, the policy's names)."""
    if ref_weight is None:
        if ref_bias is not None:
            raise ValueError("`ref_bias` needs `ref_weight`: without its own head the reference "
                             "shares the policy's `weight` and `bias`")
        shared = "weight (the reference shares the policy's head: no ref_weight given)"
        names = ("ref_hidden", shared, "labels", "bias (shared with the reference)")
        ref_weight, ref_bias = weight, bias
    else:
        names = ("ref_hidden", "ref_weight", "labels", "ref_bias")
    check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, names=names)
    if not torch.is_autocast_enabled(ref_hidden.device.type):  # autocast casts both alike
        check_same_dtype(ref_hidden, ref_weight, names=names[:2])


def fused_linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    seq_ids: Tensor | None = None,
    loss_type: str | Sequence[str] = "apo_zero",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reduction: str = "sum",
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    compute_metrics: bool = True,
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str = "auto",
    vocab_parallel_group: object = None,
) -> PreferenceLossOutput:
    """Preference loss from hidden states, never materialising ``[tokens, vocab]``.

    Args:
        hidden: policy hidden states, padded ``[2B, T, D]`` or packed ``[N, D]``; fp32/fp16/bf16.
        weight: LM head ``[V, D]``, same dtype; ``bias``: optional ``[V]``.
        labels: ``[2B, T]`` / ``[N]`` int token ids aligned with ``hidden``; ``ignore_index`` at
            prompt and padding positions.
        ref_hidden: reference hidden states shaped like ``hidden`` (its own D allowed) with
            ``ref_weight [V, D_ref]`` and ``ref_bias`` (default: the policy's ``weight`` and
            ``bias``, e.g. a PEFT policy whose frozen base is the reference); run forward-only
            under ``no_grad``. Or
        ref_chosen_logps, ref_rejected_logps: precomputed reference sequence log-probs ``[B]``
            (computed with the same ``reduction``/``ld_alpha``).
        cu_seqlens / seq_ids: packed sequence bounds, ``[2B + 1]`` / ``[N]``.
        loss_type, beta, label_smoothing, loss_weights, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef: as in :func:`apo_kernels.losses.preference_loss`.
        reduction: ``"sum"`` (TRL) or ``"mean"`` per-sequence reduction of token log-probs.
        ld_alpha: LD-DPO weight of the tokens past the shared length, ``[0, 1]`` or None.
        use_weighting: TRL's WPO pair weights (from the policy's ``log sum p^2``).
        ignore_index, temperature, logit_scale, softcap: as in ``linear_logprobs`` (the
            reference uses the same transform).
        compute_metrics: also compute TRL's metrics (entropy and logit statistics ride along
            in the same pass over the vocabulary).
        filter_eps, deterministic, backend: passed to ``linear_logprobs``; ``backend`` also
            picks the loss head's backend.
        vocab_parallel_group: the head is split by rows across this process group (see
            ``linear_logprobs``): ``weight``/``bias`` and ``ref_weight``/``ref_bias`` are this
            rank's rows, ``hidden``, ``ref_hidden`` and ``labels`` the same on every rank. A
            ``DTensor`` head placed ``Shard(0)`` on a 1-D mesh selects this by itself. Every
            rank gets the full loss and metrics (and the full ``dH``, its own ``dW``).

    Returns:
        :class:`PreferenceLossOutput`.
    """
    # Checked before the first collective of a vocabulary-parallel call: a rank whose inputs
    # fail makes every rank of the group raise (share_input_errors), none waits in it.
    shared_group = intended_group(weight, vocab_parallel_group)
    input_error: BaseException | None = None
    try:
        types = _checked_options(
            loss_type, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef, reduction, ld_alpha, logit_scale, softcap, temperature,
            ignore_index, filter_eps, backend)
        # DTensor inputs -> local shards + the vocabulary-parallel group (None: one process).
        hidden, weight, bias, group = resolve_dtensor_inputs(hidden, weight, bias, vocab_parallel_group)
        ref_group = group
        if ref_hidden is not None:
            names = ("ref_hidden", "ref_weight", "ref_bias")
            if ref_weight is None:  # the policy's head (already local), only ref_hidden to resolve
                ref_hidden = resolve_dtensor_inputs(ref_hidden, weight, None, None, names)[0]
            else:
                ref_hidden, ref_weight, ref_bias, ref_group = resolve_dtensor_inputs(
                    ref_hidden, ref_weight, ref_bias, vocab_parallel_group, names)
                if (group is not None and ref_group is not None and isinstance(ref_weight, Tensor)
                        and isinstance(weight, Tensor) and ref_weight.dim() == 2 and weight.dim() == 2
                        and ref_weight.shape[0] != weight.shape[0]):
                    # Both heads are split over the group: each rank holds its rows of the same
                    # vocabulary. A whole reference head taken for a block would normalise over
                    # P copies of the vocabulary (reference log-probs off by log P per token).
                    raise ValueError(
                        f"`ref_weight` has {ref_weight.shape[0]} rows on this rank but `weight` has "
                        f"{weight.shape[0]}: with vocab_parallel_group both heads must be this rank's "
                        "rows of the same vocabulary. For a whole reference head on every rank, pass "
                        "the policy's head as a DTensor placed Shard(0) (no vocab_parallel_group) or "
                        "precompute the reference log-probs")
        hidden, labels, layout = _resolve_layout(hidden, labels, cu_seqlens, seq_ids)
        b = layout.num_seqs // 2

        has_ref_hidden = ref_hidden is not None
        has_ref_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
        if has_ref_hidden == has_ref_logps:
            raise ValueError(
                "give the reference either as `ref_hidden` (+ `ref_weight`) or as precomputed "
                "`ref_chosen_logps` and `ref_rejected_logps`, exactly one of the two"
            )
        if has_ref_logps:
            for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                if t is None or t.dim() != 1 or t.numel() != b:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(
                        f"`{name}` must be [B]=({b},) to match the {2 * b} policy sequences "
                        f"(chosen/rejected count mismatch); got {got}"
                    )
        else:
            if layout.packed and ref_hidden.dim() == 3 and ref_hidden.shape[0] == 1:
                ref_hidden = ref_hidden[0]
            if ref_hidden.shape[:-1] != hidden.shape[:-1]:
                raise ValueError(
                    f"`ref_hidden` must have the token layout of `hidden` {tuple(hidden.shape[:-1])} + (D,), "
                    f"got {tuple(ref_hidden.shape)}"
                )
            _check_reference_head(ref_hidden, ref_weight, ref_bias, weight, bias, labels)

        mask = labels != ignore_index
        if not bool(mask.any()):
            raise ValueError(
                f"`labels` has no completion token (every label is ignore_index={ignore_index}): "
                "nothing to score"
            )
    except Exception as exc:  # noqa: BLE001 - any type (e.g. AttributeError from a list where a
        # tensor goes): raised here as it is, and on the other ranks as a ValueError
        input_error = exc
    share_input_errors(shared_group, input_error,
                       device=weight.device if isinstance(weight, Tensor) else None)

    op_kwargs = dict(
        ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
        filter_eps=filter_eps, deterministic=deterministic, backend=backend,
    )
    want_stats = compute_metrics or use_weighting
    # Per-token weights: completion mask x LD-DPO factor (/ length for "mean").
    w, lengths = completion_token_weights(
        mask, layout.seq_ids, num_seqs=layout.num_seqs, reduction=reduction, ld_alpha=ld_alpha
    )
    plain = reduction == "sum" and ld_alpha is None  # w == mask: the op already wrote 0 there
    # The single pass forms gradients per chunk of whole pairs over the whole vocabulary: a
    # vocabulary shard goes through the vocabulary-parallel op and the loss formulas instead.
    single = group is None and ref_group is None and _single_pass_applies(hidden, weight, bias, types, backend)

    ref_tok = ref_seq_sums = None
    if has_ref_hidden:
        with torch.no_grad():
            # Without its own head, the reference shares the policy's whole head, bias included.
            # Forward-only, and first: the policy's single pass needs the reference sums.
            rw, rb = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
            rb = None if rb is None else rb.detach()
            if single:  # the same chunks of whole pairs, no gradient: one GEMM per chunk
                ref_seq_sums = _pair_chunk_sums(
                    ref_hidden.detach(), rw.detach(), rb, labels, layout, w, ignore_index=ignore_index,
                    temperature=temperature, logit_scale=logit_scale, softcap=softcap)
            else:
                ref_tok = linear_logprobs(ref_hidden.detach(), rw.detach(), labels, rb,
                                          vocab_parallel_group=ref_group, **op_kwargs)

    if single:
        seq_ref = (
            ref_seq_sums if ref_seq_sums is not None
            else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().float()
        )
        loss_kw = dict(
            loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
            chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], discopop_tau=discopop_tau,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        )
        sp = _single_pass(
            hidden, weight, labels, bias, layout, w, seq_ref, lengths, types, loss_kw,
            use_weighting=use_weighting, sft_plain=not plain and "sft" in types,
            compute_metrics=compute_metrics, want_stats=want_stats, ignore_index=ignore_index,
            temperature=temperature, logit_scale=logit_scale, softcap=softcap, filter_eps=filter_eps,
            backend=backend,
        )
        seq, losses = sp.seq, sp.losses
        out, tok = sp.out, sp.out.logprobs
    else:
        out = linear_logprobs(
            hidden, weight, labels, bias, return_entropy=compute_metrics, return_stats=want_stats,
            vocab_parallel_group=group, **op_kwargs
        )
        tok = out.logprobs if isinstance(out, LinearLogprobsOutput) else out
        seq, seq_ref, losses = _losses_from_tokens(
            tok, out, ref_tok, ref_chosen_logps, ref_rejected_logps, w, lengths, mask, layout, plain,
            types, backend, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
            loss_weights=loss_weights, discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
        )

    metrics: dict[str, Tensor] = {}
    if compute_metrics:
        metrics = _metrics(out, tok, mask, layout, seq, seq_ref, b, beta)
    return PreferenceLossOutput(
        loss=losses.mean(), losses=losses, chosen_logps=seq[:b], rejected_logps=seq[b:],
        ref_chosen_logps=seq_ref[:b].detach(), ref_rejected_logps=seq_ref[b:].detach(), metrics=metrics,
    )


def _checked_options(loss_type, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
                     f_alpha_divergence_coef, reduction, ld_alpha, logit_scale, softcap, temperature,
                     ignore_index, filter_eps, backend) -> list[str]:
    """Every scalar option of the preference loss and of its op checked (ValueError/TypeError
    naming it); returns the loss types. Shared by the function and the module's constructor."""
    types = [t for t, _ in _normalise_loss_types(loss_type, loss_weights)]
    _validate_params(types, beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef)
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown `reduction` {reduction!r}; valid reductions are {list(REDUCTIONS)}")
    _check_ld_alpha(ld_alpha)
    check_transform(logit_scale, softcap, temperature)
    check_options(ignore_index, filter_eps, backend)
    return types


#: Losses whose gradient for one pair depends on the other pairs' log-probs (they sort over the
#: batch): their gradients cannot be formed chunk by chunk, so they take the recompute path.
NON_SEPARABLE_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})


def _single_pass_applies(hidden: Tensor, weight: Tensor, bias: Tensor | None, types: list[str], backend: str) -> bool:
    """The single pass (gradients formed in the forward) runs on the chunked torch strategy, when
    a gradient is wanted and every loss is separable across pairs."""
    if not torch.is_grad_enabled():
        return False
    if not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return False
    if NON_SEPARABLE_LOSS_TYPES.intersection(types):
        return False
    if backend not in ("auto", "torch", "triton"):
        return False  # linear_logprobs names the bad value
    shape = (hidden.dtype, hidden.shape[-1], weight.shape[0], hidden.numel() // max(1, hidden.shape[-1]))
    return resolve_backend(backend, hidden.device, shape=shape) == "torch"


def _pair_chunk_inputs(hidden, weight, labels, bias, layout, ignore_index, logit_scale, softcap, temperature):
    """Checked inputs of the pair-chunk pass: (hidden, weight) cast like a matmul under
    autocast, flat int64 labels and per-position sequence ids."""
    check_linear_inputs(hidden, weight, labels, bias)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as linear_logprobs: a matmul's casts
        cast_to = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(cast_to), weight.to(cast_to)
    check_same_dtype(hidden, weight)
    check_transform(logit_scale, softcap, temperature)
    flat_labels = labels.reshape(-1).long()
    check_label_values(flat_labels, (flat_labels != ignore_index).nonzero().squeeze(1), weight.shape[0])
    if layout.packed:
        seq_ids = layout.seq_ids
    else:
        seq_ids = torch.arange(layout.num_seqs, device=labels.device).repeat_interleave(labels.shape[1])
    return hidden, weight, flat_labels, seq_ids


def _pair_chunk_sums(hidden, weight, bias, labels, layout, w, *, ignore_index, temperature, logit_scale,
                     softcap) -> Tensor:
    """Forward-only weighted sequence sums ``[2B]`` (the reference), by chunks of whole pairs."""
    hidden, weight, flat_labels, seq_ids = _pair_chunk_inputs(
        hidden, weight, labels, bias, layout, ignore_index, logit_scale, softcap, temperature)
    plan = SinglePassPlan(
        labels=flat_labels, seq_ids=seq_ids, num_seqs=layout.num_seqs, token_weights=w.reshape(-1).float(),
        loss_fn=None, ignore_index=int(ignore_index), logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap), temperature=float(temperature),
    )
    return single_pass_sequence_logps(hidden.reshape(-1, hidden.shape[-1]), weight, bias, plan)["seq"]


@dataclass
class _SinglePassResult:
    seq: Tensor
    losses: Tensor
    out: LinearLogprobsOutput


def _single_pass(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, layout: _Layout, w: Tensor,
    seq_ref: Tensor, lengths: Tensor, types: list[str], loss_kw: dict, *, use_weighting: bool,
    sft_plain: bool, compute_metrics: bool, want_stats: bool, ignore_index: int, temperature: float,
    logit_scale: float, softcap: float | None, filter_eps: object, backend: str,
) -> _SinglePassResult:
    """Policy log-probs, sequence sums, per-pair losses, with dH/dW formed in the same pass."""
    hidden, weight, flat_labels, seq_ids = _pair_chunk_inputs(
        hidden, weight, labels, bias, layout, ignore_index, logit_scale, softcap, temperature)
    check_options(ignore_index, filter_eps, backend)
    b = layout.num_seqs // 2
    need_plain = use_weighting or sft_plain
    len_f = lengths.clamp(min=1).float()

    def loss_fn(seq: Tensor, plain_sums: Tensor, lsp2: Tensor) -> Tensor:
        pair_weights = None
        if use_weighting:  # WPO (TRL): exp(mean over the completion of logp - log sum p^2), no grad
            ws = torch.exp((plain_sums.detach() - lsp2) / len_f)
            pair_weights = ws[:b] * ws[b:]
        return preference_loss(
            seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], pair_weights=pair_weights,
            sft_chosen_logps=plain_sums[:b] if sft_plain else None, **loss_kw,
        )

    plan = SinglePassPlan(
        labels=flat_labels, seq_ids=seq_ids, num_seqs=layout.num_seqs, token_weights=w.reshape(-1).float(),
        loss_fn=loss_fn, ignore_index=int(ignore_index), logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap), temperature=float(temperature),
        with_entropy=compute_metrics, with_stats=want_stats, need_plain=need_plain,
    )
    sp = single_pass_sequence_logps(hidden.reshape(-1, hidden.shape[-1]), weight, bias, plan)
    losses = loss_fn(sp["seq"], sp["plain"], sp["lsp2"])
    shape = labels.shape

    def view(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.view(shape)

    out = LinearLogprobsOutput(view(sp["logp"]), view(sp["entropy"]), view(sp["mean_logit"]),
                               view(sp["is_top1"]), view(sp["log_sum_p2"]))
    return _SinglePassResult(sp["seq"], losses, out)


def _losses_from_tokens(
    tok, out, ref_tok, ref_chosen_logps, ref_rejected_logps, w, lengths, mask, layout, plain, types,
    backend, *, loss_type, beta, label_smoothing, loss_weights, discopop_tau, f_divergence_type,
    f_alpha_divergence_coef, use_weighting,
):
    """The recompute path: per-token log-probs from the op -> sums -> losses (autograd)."""
    b = layout.num_seqs // 2
    fused_head = (
        len(types) == 1 and types[0] in HEAD_LOSS_TYPES and f_divergence_type == "reverse_kl"
        and not use_weighting
    )
    if fused_head:
        head = preference_head(
            tok,
            cu_seqlens=layout.cu,
            ref_token_logps=ref_tok,
            ref_logps=None if ref_tok is not None else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach(),
            token_weights=None if plain else w,
            loss_type=types[0],
            beta=beta,
            backend=backend,  # "auto": the Triton head on CUDA, the torch formulas elsewhere
        )
        return head.logps, head.ref_logps, head.losses
    seq = _segment_sums(tok, w, layout)
    seq_ref = (
        _segment_sums(ref_tok, w, layout) if ref_tok is not None
        else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().float()
    )
    sft_logps = None
    if not plain and "sft" in types:
        sft_logps = _segment_sums(tok, mask.float(), layout)[:b]
    pair_weights = None
    if use_weighting:
        pair_weights = wpo_pair_weights(tok, out.log_sum_p2, mask, layout.seq_ids, num_seqs=layout.num_seqs)
    losses = preference_loss(
        seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, loss_weights=loss_weights, chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:], discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, pair_weights=pair_weights,
        sft_chosen_logps=sft_logps,
    )
    return seq, seq_ref, losses


def _metrics(
    out: LinearLogprobsOutput, tok: Tensor, mask: Tensor, layout: _Layout, seq: Tensor, seq_ref: Tensor,
    b: int, beta: float,
) -> dict[str, Tensor]:
    """TRL's logged metrics, detached (a 0 where a mean has no token, as TRL logs)."""
    with torch.no_grad():
        m = preference_rewards(seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], beta=beta)
        if layout.packed:
            chosen_tok = mask & (layout.seq_ids < b)
        else:
            chosen_tok = mask.clone()
            chosen_tok[b:] = False
        rejected_tok = mask & ~chosen_tok

        def mean_over(values: Tensor, where: Tensor) -> Tensor:
            n = where.sum()
            total = torch.where(where, values.float(), torch.zeros((), device=values.device)).sum()
            return torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))

        m["logits/chosen"] = mean_over(out.mean_logit, chosen_tok)
        m["logits/rejected"] = mean_over(out.mean_logit, rejected_tok)
        m["entropy"] = mean_over(out.entropy.detach(), mask)
        m["mean_token_accuracy"] = mean_over(out.is_top1.float(), chosen_tok)
        m["nll"] = -mean_over(tok.detach(), chosen_tok)
        return m


class FusedLinearPreferenceLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_preference_loss`: the loss configuration is
    fixed at construction (and validated there), the tensors go to ``forward``.

    Example::

        loss_fn = FusedLinearPreferenceLoss(loss_type="apo_zero", beta=0.1)
        out = loss_fn(hidden, lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_head.weight)
        out.loss.backward()
        log({k: v.item() for k, v in out.metrics.items()})
    """

    def __init__(
        self,
        loss_type: str | Sequence[str] = "apo_zero",
        beta: float = 0.1,
        *,
        label_smoothing: float = 0.0,
        loss_weights: Sequence[float] | None = None,
        discopop_tau: float = 0.05,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        reduction: str = "sum",
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        compute_metrics: bool = True,
        filter_eps: float | str | None = "auto",
        deterministic: bool = False,
        backend: str = "auto",
        vocab_parallel_group: object = None,
    ) -> None:
        super().__init__()
        # The op's options too, so a bad one fails here and not at the first batch.
        _checked_options(
            loss_type, loss_weights, beta, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef, reduction, ld_alpha, logit_scale, softcap, temperature,
            ignore_index, filter_eps, backend)
        self.config = dict(
            loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
            discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, reduction=reduction, ld_alpha=ld_alpha,
            use_weighting=use_weighting, ignore_index=ignore_index, temperature=temperature,
            logit_scale=logit_scale, softcap=softcap, compute_metrics=compute_metrics,
            filter_eps=filter_eps, deterministic=deterministic, backend=backend,
            vocab_parallel_group=vocab_parallel_group,
        )

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None = None,
        *,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        seq_ids: Tensor | None = None,
    ) -> PreferenceLossOutput:
        """See :func:`fused_linear_preference_loss` for shapes."""
        return fused_linear_preference_loss(
            hidden, weight, labels, bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            cu_seqlens=cu_seqlens, seq_ids=seq_ids, **self.config,
        )

    def extra_repr(self) -> str:
        shown = ("loss_type", "beta", "reduction", "ld_alpha", "softcap", "temperature")
        return ", ".join(f"{k}={self.config[k]!r}" for k in shown)
