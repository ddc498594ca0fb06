"""Sequence log-probs from per-token log-probs, for padded and packed preference batches.

Layouts (both follow TRL's order: all chosen sequences first, then all rejected, pair ``i`` is
sequence ``i`` and sequence ``B + i``):

- **padded**: ``token_logps [2B, T]`` with a completion ``mask [2B, T]`` (bool or 0/1);
- **packed** (padding-free): ``token_logps [N]``, every sequence a contiguous run of tokens,
  boundaries given as ``cu_seqlens [2B + 1]`` (int, ``cu_seqlens[0] == 0``, non-decreasing,
  ``cu_seqlens[-1] == N``) or as per-token sequence ids ``seq_ids [N]`` (int in ``[0, 2B)``,
  non-decreasing), with an optional completion ``mask [N]``.

Reductions: ``"sum"`` (TRL's default) or ``"mean"`` (sum divided by the number of completion
tokens). Optional ``ld_alpha`` (LD-DPO, arXiv 2409.06411, as in TRL): within each pair, the first
``min(len_w, len_l)`` completion tokens of each side weigh 1 and the longer side's extra "verbose"
tokens weigh ``ld_alpha`` in ``[0, 1]``.

A sequence with no completion token has log-prob 0 and length 0 (``"mean"`` divides by
``max(length, 1)``): its log-ratio is 0, so every loss stays finite and it gets no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .ops.checks import check_int, check_real

__all__ = [
    "SequenceLogps",
    "REDUCTIONS",
    "cu_seqlens_from_seq_ids",
    "seq_ids_from_cu_seqlens",
    "completion_token_weights",
    "padded_sequence_logps",
    "packed_sequence_logps",
    "split_pairs",
    "wpo_pair_weights",
]

REDUCTIONS = ("sum", "mean")


class SequenceLogps(NamedTuple):
    """``logps [2B]`` (float32/float64) and ``lengths [2B]`` (int64, completion token counts)."""

    logps: Tensor
    lengths: Tensor


def split_pairs(x: Tensor, name: str = "x") -> tuple[Tensor, Tensor]:
    """``[2B, ...]`` stacked chosen-then-rejected -> ``(chosen [B, ...], rejected [B, ...])``."""
    if x.dim() == 0 or x.shape[0] % 2:
        raise ValueError(
            f"`{name}` must stack chosen then rejected sequences (an even number of rows, 2B); "
            f"got {x.shape[0] if x.dim() else 0} rows"
        )
    return x[: x.shape[0] // 2], x[x.shape[0] // 2 :]


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown `reduction` {reduction!r}; valid reductions are {list(REDUCTIONS)}")


def _check_ld_alpha(ld_alpha: float | None) -> None:
    check_real("`ld_alpha`", ld_alpha, low=0.0, high=1.0, optional=True)


def _float_dtype(x: Tensor) -> torch.dtype:
    # Per-token log-probs may be bf16; their sums over thousands of tokens must not be.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def seq_ids_from_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """``cu_seqlens [S+1]`` -> per-token sequence ids ``[num_tokens]`` (int64), validated."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"`cu_seqlens` must be 1-D with S+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_floating_point():
        raise ValueError("`cu_seqlens` must be an integer tensor")
    cu = cu_seqlens.to(torch.int64)
    counts = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((counts < 0).any()):
        raise ValueError(
            f"`cu_seqlens` must start at 0, be non-decreasing and end at the number of tokens "
            f"({num_tokens}); got {cu.tolist() if cu.numel() <= 16 else 'a tensor that does not'}"
        )
    return torch.repeat_interleave(torch.arange(counts.numel(), device=cu.device), counts)


def cu_seqlens_from_seq_ids(seq_ids: Tensor, num_seqs: int | None = None) -> Tensor:
    """Non-decreasing per-token sequence ids ``[N]`` -> ``cu_seqlens [S+1]`` (int64), validated.

    ``num_seqs`` defaults to ``max(seq_ids) + 1``; give it when trailing sequences are empty.
    """
    if seq_ids.dim() != 1 or seq_ids.is_floating_point():
        raise ValueError(f"`seq_ids` must be a 1-D integer tensor, got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    ids = seq_ids.to(torch.int64)
    if ids.numel() and (bool((ids < 0).any()) or bool((ids[1:] < ids[:-1]).any())):
        raise ValueError(
            "`seq_ids` must be >= 0 and non-decreasing (each sequence a contiguous run of tokens); "
            "mark non-completion tokens with the mask, not with a negative id"
        )
    s = (int(ids.max()) + 1 if ids.numel() else 0) if num_seqs is None else check_int("`num_seqs`", num_seqs, low=0)
    if ids.numel() and int(ids.max()) >= s:
        raise ValueError(f"`seq_ids` has ids up to {int(ids.max())} but `num_seqs` is {s}")
    counts = torch.bincount(ids, minlength=s)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def completion_token_weights(
    mask: Tensor,
    seq_ids: Tensor | None = None,
    *,
    num_seqs: int | None = None,
    reduction: str = "sum",
    ld_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token weights ``w`` so that ``logps[s] = sum_{t in s} w[t] * token_logps[t]``.

    Padded: ``mask [2B, T]`` and ``seq_ids=None``. Packed: ``mask [N]`` with ``seq_ids [N]``
    (non-decreasing). Returns ``(w, lengths)``: ``w`` float32 with the mask's shape, ``lengths``
    int64 ``[2B]``. The weight is ``mask`` times the LD-DPO factor (``ld_alpha`` past the
    shared length) divided by ``max(length, 1)`` for ``"mean"``. One formula for both layouts
    and for the fused loss-head kernel, which takes ``w`` directly.
    """
    _check_reduction(reduction)
    _check_ld_alpha(ld_alpha)
    m = mask.to(torch.int64)
    if seq_ids is None:
        if m.dim() != 2:
            raise ValueError(f"padded `mask` must be [2B, T], got shape {tuple(mask.shape)}")
        split_pairs(m, "mask")
        lengths = m.sum(dim=1)
        # Position of each completion token within its sequence (1-based; 0 before the first).
        pos = m.cumsum(dim=1)
        seq_len_of_tok = None
    else:
        if m.dim() != 1 or seq_ids.shape != m.shape:
            raise ValueError(
                f"packed `mask` and `seq_ids` must both be [N]; got {tuple(mask.shape)} and {tuple(seq_ids.shape)}"
            )
        ids = seq_ids.to(torch.int64)
        s = (int(ids.max()) + 1 if ids.numel() else 0) if num_seqs is None else check_int("`num_seqs`", num_seqs, low=0)
        if s % 2:
            raise ValueError(
                f"packed batches must hold chosen then rejected sequences (2B of them); got {s} sequences"
            )
        lengths = torch.zeros(s, dtype=torch.int64, device=m.device).index_add_(0, ids, m)
        # Within-sequence cumulative count: global cumsum minus the count before the sequence.
        csum = m.cumsum(0)
        before = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        pos = csum - before[ids]
        seq_len_of_tok = ids
    w = m.to(torch.float32)
    if ld_alpha is not None:
        lc, lr = split_pairs(lengths, "sequence lengths")
        shared = torch.minimum(lc, lr).repeat(2)  # [2B]: each side's shared length
        shared_tok = shared[:, None] if seq_len_of_tok is None else shared[seq_len_of_tok]
        # pos == 0 only happens where mask == 0, so w is already 0 there.
        w = torch.where(pos > shared_tok, w * float(ld_alpha), w)
    if reduction == "mean":
        denom = lengths.clamp(min=1).to(torch.float32)
        w = w / (denom[:, None] if seq_len_of_tok is None else denom[seq_len_of_tok])
    return w, lengths


def padded_sequence_logps(
    token_logps: Tensor,
    mask: Tensor,
    *,
    reduction: str = "sum",
    ld_alpha: float | None = None,
) -> SequenceLogps:
    """Padded ``token_logps [2B, T]`` + completion ``mask [2B, T]`` -> :class:`SequenceLogps`.

    Tokens outside the mask never contribute, whatever their value (NaN included).
    """
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(
            f"`token_logps` and `mask` must both be [2B, T]; got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    w, lengths = completion_token_weights(mask, reduction=reduction, ld_alpha=ld_alpha)
    x = token_logps.to(_float_dtype(token_logps))
    # where() rather than multiply so a NaN/inf at a padded position cannot leak into the sum.
    logps = torch.where(w != 0, x * w.to(x.dtype), x.new_zeros(())).sum(dim=1)
    return SequenceLogps(logps, lengths)


def packed_sequence_logps(
    token_logps: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    seq_ids: Tensor | None = None,
    mask: Tensor | None = None,
    num_seqs: int | None = None,
    reduction: str = "sum",
    ld_alpha: float | None = None,
) -> SequenceLogps:
    """Packed ``token_logps [N]`` -> :class:`SequenceLogps` over ``2B`` sequences.

    Give exactly one of ``cu_seqlens [2B+1]`` or ``seq_ids [N]``; ``mask [N]`` marks completion
    tokens (default: every token).
    """
    if token_logps.dim() != 1:
        raise ValueError(f"packed `token_logps` must be 1-D [N], got shape {tuple(token_logps.shape)}")
    n = token_logps.numel()
    if (cu_seqlens is None) == (seq_ids is None):
        raise ValueError("give exactly one of `cu_seqlens` or `seq_ids` for a packed batch")
    if cu_seqlens is not None:
        ids = seq_ids_from_cu_seqlens(cu_seqlens, n)
        num_seqs = cu_seqlens.numel() - 1
    else:
        if seq_ids.shape != token_logps.shape:
            raise ValueError(f"`seq_ids` must be [N]={n}, got shape {tuple(seq_ids.shape)}")
        cu = cu_seqlens_from_seq_ids(seq_ids, num_seqs)
        num_seqs = cu.numel() - 1
        ids = seq_ids.to(torch.int64)
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=token_logps.device)
    elif mask.shape != token_logps.shape:
        raise ValueError(f"`mask` must be [N]={n}, got shape {tuple(mask.shape)}")
    w, lengths = completion_token_weights(mask, ids, num_seqs=num_seqs, reduction=reduction, ld_alpha=ld_alpha)
    x = token_logps.to(_float_dtype(token_logps))
    contrib = torch.where(w != 0, x * w.to(x.dtype), x.new_zeros(()))
    logps = x.new_zeros(num_seqs).index_add(0, ids, contrib)
    return SequenceLogps(logps, lengths)


def wpo_pair_weights(
    token_logps: Tensor,
    token_log_sum_p2: Tensor,
    mask: Tensor,
    seq_ids: Tensor | None = None,
    *,
    num_seqs: int | None = None,
) -> Tensor:
    """TRL's WPO weighting (arXiv 2406.11827, eq. 2): ``[B]`` weights ``w_chosen * w_rejected``.

    ``w_s = exp(mean over completion tokens of (logp_t - log sum_v p_v^2))``: the sequence's
    probability under the policy's own sampling distribution, length-normalised; no gradient.
    Padded (``[2B, T]`` inputs) or packed (``[N]`` inputs with ``seq_ids``).
    """
    with torch.no_grad():
        x = (token_logps.float() - token_log_sum_p2.float()).detach()
        if seq_ids is None:
            s = padded_sequence_logps(x, mask, reduction="mean").logps
        else:
            s = packed_sequence_logps(x, seq_ids=seq_ids, mask=mask, num_seqs=num_seqs, reduction="mean").logps
        wc, wr = split_pairs(torch.exp(s), "sequences")
        return wc * wr
