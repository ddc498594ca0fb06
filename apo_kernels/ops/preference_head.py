"""``preference_head``: per-token log-probs -> sequence sums -> APO/DPO loss, as one op.

The Triton backend runs the whole head in one launch forward and one backward (see
``apo_kernels/kernels/preference_head.py``) instead of the dozen small kernels the torch
expression needs; the torch backend (``apo_kernels.sequence`` + ``apo_kernels.losses``) is the
CPU default and the test oracle. Both give the same values and gradients to fp32 rounding.

The reference log-probs are constants here (the reference model is frozen): with the Triton
backend they get no gradient, and a reference that requires grad is only accepted by the torch
backend (``"auto"`` switches to it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..losses import preference_loss
from ..sequence import seq_ids_from_cu_seqlens
from .backend import resolve_backend
from .checks import check_real

__all__ = ["HEAD_LOSS_TYPES", "PreferenceHeadOutput", "preference_head"]

#: The losses the fused head computes in-kernel; every other loss goes through the torch path.
HEAD_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "apo_zero", "apo_down")


class PreferenceHeadOutput(NamedTuple):
    """losses ``[B]`` fp32 (differentiable); logps ``[2B]`` fp32 policy sequence log-probs
    (differentiable, chosen then rejected); ref_logps ``[2B]`` fp32 (no gradient)."""

    losses: Tensor
    logps: Tensor
    ref_logps: Tensor


class _PreferenceHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ref, cu, ref_is_tokens: bool, beta: float, loss_code: int):
        from ..kernels.preference_head import preference_head_forward

        losses, seq, seq_ref = preference_head_forward(x, weights, ref, ref_is_tokens, cu, beta, loss_code)
        ctx.save_for_backward(weights, cu, seq, seq_ref)
        ctx.beta, ctx.loss_code, ctx.num_tokens, ctx.x_dtype = beta, loss_code, x.numel(), x.dtype
        ctx.mark_non_differentiable(seq_ref)
        return losses, seq, seq_ref

    @staticmethod
    def backward(ctx, grad_losses, grad_seq, _grad_seq_ref):
        from ..kernels.preference_head import preference_head_backward

        weights, cu, seq, seq_ref = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        b = seq.numel() // 2
        if grad_losses is None:
            grad_losses = torch.zeros(b, device=seq.device, dtype=torch.float32)
        grad_x = preference_head_backward(
            grad_losses.float().contiguous(),
            None if grad_seq is None else grad_seq.float().contiguous(),
            weights, cu, seq, seq_ref, ctx.beta, ctx.loss_code, ctx.num_tokens, ctx.x_dtype,
        )
        return grad_x, None, None, None, None, None, None


def _torch_head(
    x: Tensor, weights: Tensor | None, ref: Tensor, ref_is_tokens: bool, cu: Tensor, beta: float, loss_type: str
) -> PreferenceHeadOutput:
    num_seqs = cu.numel() - 1
    ids = seq_ids_from_cu_seqlens(cu, x.numel())

    def seg_sum(v: Tensor) -> Tensor:
        v = v.float() if v.dtype != torch.float64 else v
        if weights is not None:
            v = torch.where(weights != 0, v * weights.to(v.dtype), v.new_zeros(()))
        return v.new_zeros(num_seqs).index_add(0, ids, v)

    seq = seg_sum(x)
    seq_ref = seg_sum(ref) if ref_is_tokens else ref.to(seq.dtype)
    b = num_seqs // 2
    losses = preference_loss(seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], loss_type=loss_type, beta=beta)
    return PreferenceHeadOutput(losses, seq, seq_ref.detach() if not ref.requires_grad else seq_ref)


def preference_head(
    token_logps: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    ref_token_logps: Tensor | None = None,
    ref_logps: Tensor | None = None,
    token_weights: Tensor | None = None,
    loss_type: str = "apo_zero",
    beta: float = 0.1,
    backend: str = "auto",
) -> PreferenceHeadOutput:
    """Segment sums of policy (and reference) per-token log-probs and the per-pair loss.

    Args:
        token_logps: policy per-token log-probs, packed ``[N]`` (with ``cu_seqlens``) or padded
            ``[2B, T]`` (rows are the segments); any float dtype. Positions that are not
            completion tokens must be 0 (as ``linear_logprobs`` returns them) or have weight 0.
        cu_seqlens: ``[2B + 1]`` int segment bounds for packed input (chosen segments first).
        ref_token_logps: reference per-token log-probs shaped like ``token_logps``, or
        ref_logps: reference sequence log-probs ``[2B]`` (chosen then rejected), e.g.
            precomputed; exactly one of the two.
        token_weights: optional per-token weights shaped like ``token_logps`` (completion mask,
            LD-DPO factor, ``1/length`` for a mean; see
            :func:`apo_kernels.sequence.completion_token_weights`). Constants: no gradient.
        loss_type: one of :data:`HEAD_LOSS_TYPES`.
        beta: ``> 0``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` or
            ``"auto"`` (triton on CUDA when the reference needs no gradient, else torch).

    Returns:
        :class:`PreferenceHeadOutput`; ``losses.mean()`` is the batch loss.
    """
    if loss_type not in HEAD_LOSS_TYPES:
        raise ValueError(
            f"`loss_type` {loss_type!r} has no fused head; valid loss types are {list(HEAD_LOSS_TYPES)} "
            "(use apo_kernels.preference_loss for the others)"
        )
    beta = check_real("`beta`", beta, low=0.0, low_open=True)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"Unknown `backend` {backend!r}; valid backends are ['auto', 'triton', 'torch']")
    if (ref_token_logps is None) == (ref_logps is None):
        raise ValueError("give exactly one of `ref_token_logps` (per token) or `ref_logps` (per sequence, [2B])")

    # Layout -> flat tokens + int64 segment bounds.
    if token_logps.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("`cu_seqlens` is for packed [N] input; padded [2B, T] rows are the segments")
        rows, t = token_logps.shape
        cu = torch.arange(rows + 1, device=token_logps.device, dtype=torch.int64) * t
    elif token_logps.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("packed `token_logps` [N] needs `cu_seqlens` [2B + 1]")
        cu = cu_seqlens.to(device=token_logps.device, dtype=torch.int64).contiguous()
        seq_ids_from_cu_seqlens(cu, token_logps.numel())  # validates the bounds
    else:
        raise ValueError(f"`token_logps` must be [N] or [2B, T], got shape {tuple(token_logps.shape)}")
    num_seqs = cu.numel() - 1
    if num_seqs % 2:
        raise ValueError(
            f"`token_logps` must hold chosen then rejected sequences (2B of them), got {num_seqs}"
        )
    x = token_logps.reshape(-1)
    for name, t_ in (("ref_token_logps", ref_token_logps), ("token_weights", token_weights)):
        if t_ is not None and t_.shape != token_logps.shape:
            raise ValueError(f"`{name}` must have the shape of `token_logps` {tuple(token_logps.shape)}, got {tuple(t_.shape)}")
    if ref_logps is not None and (ref_logps.dim() != 1 or ref_logps.numel() != num_seqs):
        raise ValueError(f"`ref_logps` must be [2B]={num_seqs} (chosen then rejected), got {tuple(ref_logps.shape)}")
    ref_is_tokens = ref_token_logps is not None
    ref = (ref_token_logps if ref_is_tokens else ref_logps).reshape(-1)
    w = None if token_weights is None else token_weights.reshape(-1)

    needs_torch = ref.requires_grad or (w is not None and w.requires_grad)
    backend = resolve_backend(backend, x.device, auto_allows_triton=not needs_torch)
    if backend == "triton":
        if needs_torch:
            raise ValueError(
                "backend='triton' treats the reference and the token weights as constants; they "
                "require grad here: detach them or use backend='torch'"
            )
        from ..kernels.fast_path import aligned
        from ..kernels.preference_head import LOSS_CODES

        # Contiguous and 16-byte aligned: the variant the compile check builds (a view at an
        # odd offset would compile one without vectorised loads); copies are logged at debug.
        losses, seq, seq_ref = _PreferenceHeadFunction.apply(
            aligned(x.contiguous(), "token_logps"),
            None if w is None else aligned(w.float().contiguous(), "token_weights"),
            aligned(ref.contiguous(), "ref_logps"), aligned(cu, "cu_seqlens"),
            ref_is_tokens, float(beta), LOSS_CODES[loss_type],
        )
        return PreferenceHeadOutput(losses, seq, seq_ref)
    return _torch_head(x, w, ref, ref_is_tokens, cu, float(beta), loss_type)
