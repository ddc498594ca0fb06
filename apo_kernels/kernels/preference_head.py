"""Triton kernels for the preference loss head: segment sums + loss, and its per-token backward.

Input layout: per-token policy log-probs ``x [N]`` (any float dtype), optional per-token weights
``w [N]`` (fp32: completion mask, LD-DPO factor, 1/length for a mean), and ``cu [2B+1]`` (int64)
bounding 2B contiguous segments, chosen sequences ``0..B-1`` then rejected ``B..2B-1`` (a padded
``[2B, T]`` batch is the special case ``cu = T * arange(2B+1)``). The reference is either
per-token log-probs ``x_ref [N]`` over the same segments or per-sequence values ``[2B]``.

Forward, one program per pair ``p`` (grid ``(B,)``), one launch:

    S_s     = sum_{t in seg s} w_t x_t               (s = p and s = B + p; fp32 accumulation)
    Sref_s  = the same over x_ref (or loaded)
    r_w = S_p - Sref_p,  r_l = S_{B+p} - Sref_{B+p}
    loss_p  = L(r_w, r_l)

with, for ``b = beta`` and ``sigma`` the logistic function,

    sigmoid (DPO): L = softplus(-b (r_w - r_l))
    apo_zero:      L = sigma(-b r_w) + sigma(b r_l)
    apo_down:      L = sigma(b r_w) + sigma(-b (r_w - r_l))

Backward, one program per pair, one launch. The loss depends on the tokens only through the two
segment sums, so with upstream ``g_p = dLoss/dloss_p`` (and optionally ``G_s = dLoss/dS_s`` when
the sequence log-probs are used elsewhere, e.g. in a metric that carries a gradient):

    dLoss/dx_t = w_t * (G_s + g_p * dL/dr_side(s))         for t in segment s

Derivatives (using sigma'(u) = sigma(u) sigma(-u)):

    sigmoid:  dL/dr_w = -b sigma(-b m),   dL/dr_l = +b sigma(-b m),       m = r_w - r_l
    apo_zero: dL/dr_w = -b sigma(b r_w) sigma(-b r_w),
              dL/dr_l = +b sigma(b r_l) sigma(-b r_l)
    apo_down: dL/dr_w = +b sigma(b r_w) sigma(-b r_w) - b sigma(b m) sigma(-b m),
              dL/dr_l = +b sigma(b m) sigma(-b m)

The backward recomputes these from the saved segment sums (4 floats per pair), so nothing
per-token is saved beyond the inputs. No atomics: each token belongs to exactly one program, so
the kernels are deterministic. Offsets are int64 (``cu`` is int64) so N > 2^31 is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_specs import LaunchSpec

#: loss_type -> the kernel's LOSS constexpr.
LOSS_CODES = {"sigmoid": 0, "apo_zero": 1, "apo_down": 2}

_BLOCK = 1024  # tokens per loop step; a segment of T tokens costs ceil(T / BLOCK) steps


@triton.jit
def _sigmoid(u):
    # Evaluate exp only at non-positive arguments: no overflow, no inf/inf for |u| large.
    e = tl.exp(-tl.abs(u))
    return tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 to full relative precision (no libdevice under the interpreter).

    With u = fl(1 + x), log(u) * x / (u - 1) cancels the rounding of u (Goldberg's trick);
    where u rounds to 1, log1p(x) = x to working precision.
    """
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(u):
    # log(1 + e^u) = max(u, 0) + log1p(e^-|u|); log1p keeps tiny losses (u << 0) accurate.
    return tl.maximum(u, 0.0) + _log1p(tl.exp(-tl.abs(u)))


@triton.jit
def _segment_sum(x_ptr, w_ptr, start, end, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """sum_{start <= t < end} w_t x_t in fp32 (w = 1 without HAS_W)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for base in range(start, end, BLOCK):
        idx = base + offs
        m = idx < end
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + idx, mask=m, other=0.0).to(tl.float32)
            # where(): a weight of 0 must drop the token even if its value is inf/NaN.
            x = tl.where(w != 0.0, x * w, 0.0)
        acc += x
    return tl.sum(acc, axis=0)


@triton.jit
def _loss_and_grads(r_w, r_l, beta, LOSS: tl.constexpr):
    """(L, dL/dr_w, dL/dr_l) for one pair; see the module docstring for the algebra."""
    if LOSS == 0:  # sigmoid (DPO)
        m = r_w - r_l
        s = _sigmoid(-beta * m)
        loss = _softplus(-beta * m)
        d_w = -beta * s
        d_l = beta * s
    elif LOSS == 1:  # apo_zero
        # sigma(u) sigma(-u) keeps full relative precision where 1 - sigma(u) would round to 0.
        nw = _sigmoid(-beta * r_w)
        sl = _sigmoid(beta * r_l)
        loss = nw + sl
        d_w = -beta * _sigmoid(beta * r_w) * nw
        d_l = beta * sl * _sigmoid(-beta * r_l)
    else:  # apo_down
        m = r_w - r_l
        sw = _sigmoid(beta * r_w)
        nm = _sigmoid(-beta * m)
        loss = sw + nm
        d_m = beta * _sigmoid(beta * m) * nm
        d_w = beta * sw * _sigmoid(-beta * r_w) - d_m
        d_l = d_m
    return loss, d_w, d_l


@triton.jit
def _preference_head_fwd(
    x_ptr, w_ptr, xref_ptr, cu_ptr,
    loss_ptr, seq_ptr, seq_ref_ptr,
    num_pairs, beta,
    LOSS: tl.constexpr, HAS_W: tl.constexpr, REF_TOKENS: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    q = p + num_pairs  # the rejected sequence of pair p
    c0 = tl.load(cu_ptr + p)
    c1 = tl.load(cu_ptr + p + 1)
    r0 = tl.load(cu_ptr + q)
    r1 = tl.load(cu_ptr + q + 1)
    s_w = _segment_sum(x_ptr, w_ptr, c0, c1, HAS_W, BLOCK)
    s_l = _segment_sum(x_ptr, w_ptr, r0, r1, HAS_W, BLOCK)
    if REF_TOKENS:
        ref_w = _segment_sum(xref_ptr, w_ptr, c0, c1, HAS_W, BLOCK)
        ref_l = _segment_sum(xref_ptr, w_ptr, r0, r1, HAS_W, BLOCK)
    else:
        ref_w = tl.load(xref_ptr + p).to(tl.float32)
        ref_l = tl.load(xref_ptr + q).to(tl.float32)
    loss, _d_w, _d_l = _loss_and_grads(s_w - ref_w, s_l - ref_l, beta, LOSS)
    tl.store(loss_ptr + p, loss)
    tl.store(seq_ptr + p, s_w)
    tl.store(seq_ptr + q, s_l)
    tl.store(seq_ref_ptr + p, ref_w)
    tl.store(seq_ref_ptr + q, ref_l)


@triton.jit
def _scatter_segment(out_ptr, w_ptr, start, end, coef, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = coef * w_t for start <= t < end (coef without HAS_W)."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for base in range(start, end, BLOCK):
        idx = base + offs
        m = idx < end
        g = tl.zeros((BLOCK,), dtype=tl.float32) + coef
        if HAS_W:
            g = g * tl.load(w_ptr + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, g.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _preference_head_bwd(
    grad_loss_ptr, grad_seq_ptr, w_ptr, cu_ptr, seq_ptr, seq_ref_ptr,
    grad_x_ptr,
    num_pairs, beta,
    LOSS: tl.constexpr, HAS_W: tl.constexpr, HAS_GRAD_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    q = p + num_pairs
    r_w = tl.load(seq_ptr + p) - tl.load(seq_ref_ptr + p)
    r_l = tl.load(seq_ptr + q) - tl.load(seq_ref_ptr + q)
    _loss, d_w, d_l = _loss_and_grads(r_w, r_l, beta, LOSS)
    g = tl.load(grad_loss_ptr + p).to(tl.float32)
    coef_w = g * d_w
    coef_l = g * d_l
    if HAS_GRAD_SEQ:
        coef_w += tl.load(grad_seq_ptr + p).to(tl.float32)
        coef_l += tl.load(grad_seq_ptr + q).to(tl.float32)
    _scatter_segment(grad_x_ptr, w_ptr, tl.load(cu_ptr + p), tl.load(cu_ptr + p + 1), coef_w, HAS_W, BLOCK)
    _scatter_segment(grad_x_ptr, w_ptr, tl.load(cu_ptr + q), tl.load(cu_ptr + q + 1), coef_l, HAS_W, BLOCK)


#: The block sizes the launchers can pick (each compiled by the compile check).
BLOCKS = (32, 256, _BLOCK)


def launch_specs() -> list[LaunchSpec]:
    """Every block size with one loss and every loss with the largest block (the loss only
    changes scalar code), fp32 per-token inputs and weights, all options on. No dots, no K
    loop, no atomics: these only have to compile without spills."""
    specs = []
    for name, code in LOSS_CODES.items():
        for block in BLOCKS:
            if block != BLOCKS[-1] and name != "apo_zero":
                continue
            common = dict(config=f"{block}w4s3", dtype=torch.float32, variant=name,
                          num_warps=4, num_stages=3)
            specs.append(LaunchSpec(kernel=_preference_head_fwd, **common, constexprs=dict(
                LOSS=code, HAS_W=True, REF_TOKENS=True, BLOCK=block)))
            specs.append(LaunchSpec(kernel=_preference_head_bwd, **common, constexprs=dict(
                LOSS=code, HAS_W=True, HAS_GRAD_SEQ=True, BLOCK=block)))
    return specs


def _block(num_tokens: int, num_seqs: int) -> int:
    # Enough lanes for a typical segment, never more than the default; small for short
    # segments (and under the interpreter, whose numpy cost grows with the block).
    avg = max(1, num_tokens // max(num_seqs, 1))
    return next((b for b in BLOCKS if b >= avg), BLOCKS[-1])


def preference_head_forward(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    ref: torch.Tensor,
    ref_is_tokens: bool,
    cu_seqlens: torch.Tensor,
    beta: float,
    loss_code: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. ``x [N]``, ``weights [N] fp32 | None``, ``ref [N]`` (tokens) or
    ``[2B]`` (sequence values), ``cu_seqlens [2B+1] int64`` -> fp32 ``losses [B]``,
    ``seq [2B]``, ``seq_ref [2B]``. Inputs must be contiguous and on one device."""
    num_seqs = cu_seqlens.numel() - 1
    b = num_seqs // 2
    dev = x.device
    losses = torch.empty(b, device=dev, dtype=torch.float32)
    seq = torch.empty(num_seqs, device=dev, dtype=torch.float32)
    seq_ref = torch.empty(num_seqs, device=dev, dtype=torch.float32)
    if b == 0:
        return losses, seq, seq_ref
    w = weights if weights is not None else x  # dummy pointer; never read without HAS_W
    _preference_head_fwd[(b,)](
        x, w, ref, cu_seqlens, losses, seq, seq_ref, b, float(beta),
        LOSS=loss_code, HAS_W=weights is not None, REF_TOKENS=ref_is_tokens,
        BLOCK=_block(x.numel(), num_seqs),
    )
    return losses, seq, seq_ref


def preference_head_backward(
    grad_losses: torch.Tensor,
    grad_seq: torch.Tensor | None,
    weights: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    seq: torch.Tensor,
    seq_ref: torch.Tensor,
    beta: float,
    loss_code: int,
    num_tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the backward -> ``grad_x [N]`` in ``out_dtype``. Every token lies in exactly one
    segment (``cu_seqlens`` spans ``[0, N]``), so every element is written."""
    num_seqs = cu_seqlens.numel() - 1
    b = num_seqs // 2
    grad_x = torch.empty(num_tokens, device=seq.device, dtype=out_dtype)
    if b == 0:
        return grad_x
    w = weights if weights is not None else seq
    gs = grad_seq if grad_seq is not None else seq
    _preference_head_bwd[(b,)](
        grad_losses, gs, w, cu_seqlens, seq, seq_ref, grad_x, b, float(beta),
        LOSS=loss_code, HAS_W=weights is not None, HAS_GRAD_SEQ=grad_seq is not None,
        BLOCK=_block(num_tokens, num_seqs),
    )
    return grad_x
