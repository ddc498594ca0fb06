"""The ``[chunk, V]`` epilogue of the single-pass preference strategy, in plain torch ops.

Two functions, each working in place on one fp32 logit block so a chunk costs as few passes
over ``[chunk, V]`` as plain torch allows (every pass costs about as much as the log-softmax
itself on CPU):

- :func:`forward_stats_` turns the raw logits ``h @ W.T`` into the per-token statistics
  (log-prob of the label, the normaliser, optional entropy and metrics) and returns the
  probabilities ``p`` (one new ``[chunk, V]`` buffer; the logits block is freed) for the gradient;
- :func:`logit_grad_` turns that block, given the per-token gradient ``g_t = dL/dlogp_t``, into
  the raw-logit gradient ``dz = jac * g * (onehot - p)`` in place, ready for ``dz @ W`` and
  ``dz.T @ h``.

This module is the one place to swap for a faster fused epilogue (``torch.compile``, C++ or
Triton): :mod:`apo_kernels.ops.preference_single_pass` only calls these two functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ChunkStats", "GradState", "forward_stats_", "logit_grad_"]


class ChunkStats(NamedTuple):
    """Per-token results of one chunk, fp32 ``[n]`` each (None where not asked for).

    logp: ``log softmax(z)[label]``; row_max ``m`` and log_norm ``log s1`` with
    ``lse = m + log s1`` (the normaliser as the linear_logprobs op stores it); entropy
    ``-sum p log p``; mean_logit; is_top1 (bool); log_sum_p2 ``log sum p^2``.
    """

    logp: Tensor
    row_max: Tensor
    log_norm: Tensor
    entropy: Tensor | None
    mean_logit: Tensor | None
    is_top1: Tensor | None
    log_sum_p2: Tensor | None


class GradState(NamedTuple):
    """What :func:`logit_grad_` needs: ``p [n, V]`` (the probabilities, overwritten by ``dz``)
    and ``jac`` (``dz/d(raw logit)``: a float, or ``[n, V]`` with softcap)."""

    p: Tensor
    jac: Tensor | float


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[:, v] * b[:, v]`` as a batched matrix product: no ``[n, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def forward_stats_(
    z: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
    with_stats: bool,
    p_out: Tensor | None = None,
) -> tuple[ChunkStats, GradState]:
    """Raw fp32 logits ``z [n, V]`` (consumed: overwritten, the caller must not use it again), int64 labels
    ``[n]`` in ``[0, V)``, fp32 ``bias [V]`` or None -> (:class:`ChunkStats`, :class:`GradState`).

    The transform ``T(x) = softcap * tanh(scale * x / softcap) / temperature`` (without softcap
    ``scale * x / temperature``) is applied in place. ``p_out``: an fp32 ``[n, V]`` buffer
    (not ``z``) to write the probabilities into; reusing one buffer across chunks saves the
    page faults of a fresh allocation, which cost as much as the softmax itself on CPU.
    """
    if bias is not None:
        z += bias
    jac: Tensor | float
    if softcap is None:
        jac = logit_scale / temperature
        if jac != 1.0:
            z *= jac
    else:
        th = z.mul_(logit_scale / softcap).tanh_()
        jac = (1.0 - th * th).mul_(logit_scale / temperature)  # the one extra [n, V] buffer
        z = th.mul_(softcap / temperature)
    y = labels[:, None]
    row_max, argmax = z.max(-1)
    is_top1 = (argmax == labels) if with_stats else None  # first arg-max on ties, like the kernel
    mean_logit = z.mean(-1) if with_stats else None
    z_rel = z.sub_(row_max[:, None])  # <= 0 everywhere, 0 at the arg-max
    target = z_rel.gather(1, y).squeeze(1)
    # softmax, not exp_: torch's elementwise exp takes a slow path (10-30x) for arguments below
    # about -87 (results in or below the subnormal range), which peaked logits produce for most
    # of the vocabulary; the softmax kernel's own vectorised exp does not.
    if p_out is None:
        p = torch.softmax(z_rel, dim=-1)
    else:
        p = torch.ops.aten._softmax.out(z_rel, -1, False, out=p_out)
    # p at the arg-max is exp(0) / s1 = 1 / s1 >= 1 / V: log s1 without another pass or underflow.
    log_s1 = p.gather(1, argmax[:, None]).squeeze(1).log_().neg_()
    entropy = None
    if with_entropy:
        # H = log s1 + E_p[-z_rel]: a sum of two non-negative terms, so it never cancels.
        entropy = log_s1 - _rowdot(p, z_rel)
    del z_rel, z
    log_sum_p2 = _rowdot(p, p).log_() if with_stats else None
    stats = ChunkStats(target - log_s1, row_max, log_s1, entropy, mean_logit, is_top1, log_sum_p2)
    return stats, GradState(p, jac)


def logit_grad_(state: GradState, labels: Tensor, g: Tensor) -> Tensor:
    """fp32 ``g [n]`` (``dL/dlogp_t``) -> ``dz [n, V] = jac * g * (onehot(label) - p)``, written
    over ``state.p`` and returned (the gradient with respect to the raw logits ``h @ W.T``)."""
    dz = state.p.mul_(-g[:, None])
    dz[torch.arange(dz.shape[0], device=dz.device), labels] += g
    if isinstance(state.jac, Tensor) or state.jac != 1.0:
        dz *= state.jac
    return dz
