"""Triton epilogues of the chunked strategy on CUDA: cuBLAS writes a chunk's logits, these make
one pass over them. Memory-bound by design: the bytes are ``C * V * elem`` read (forward) or
read + written (gradient), nothing else of size ``[C, V]``.

``_chunk_forward_kernel``: one program per ``BLOCK_R`` rows sweeps the buffer's columns in
``BLOCK_V`` steps with the online update of ``linear_logprobs_fwd`` (running max m, s1, and
the optional u, s2, sum z, max before the label), writing those partials as ``[7, C]`` fp32
rows (m, s1, label logit, u, s2, sum z, max before); blocks of the vocabulary merge in
``chunked.epilogue.merge_partials``. Labels are relative to the buffer's first column.

``_chunk_grad_kernel``: a 2-D grid of ``[BLOCK_R, BLOCK_V]`` tiles, each replaced in place by
``d loss / d logits`` (``g [v = y] - p (g + e (z - E[z]))`` times the transform's jacobian);
``labels`` are relative to the buffer's first column, so a vocabulary block gets its label
terms only where the label falls inside it.

The logits buffer may be fp32 or 16-bit (loaded and converted to fp32; the gradient is stored
back in the buffer's dtype). Tested on CPU tensors under TRITON_INTERPRET against float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import transform_logits
from .launch_specs import LaunchSpec

NUM_OUT = 7
_FWD_BLOCK_R, _FWD_BLOCK_V, _FWD_WARPS = 4, 1024, 4
_GRAD_BLOCK_R, _GRAD_BLOCK_V, _GRAD_WARPS = 4, 1024, 4
_INTERP_BLOCK_V = 64


@triton.jit
def _chunk_forward_kernel(
    z_ptr, labels_ptr, bias_ptr, out_ptr, C, V, stride_zc, scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = r < C
    y = tl.load(labels_ptr + r, mask=r_valid, other=-1).to(tl.int64)
    row = z_ptr + r.to(tl.int64)[:, None] * stride_zc
    neg_inf = float("-inf")
    m = tl.full((BLOCK_R,), neg_inf, tl.float32)
    s1 = tl.zeros((BLOCK_R,), tl.float32)
    zy = tl.zeros((BLOCK_R,), tl.float32)
    u = tl.zeros((BLOCK_R,), tl.float32)
    s2 = tl.zeros((BLOCK_R,), tl.float32)
    sumz = tl.zeros((BLOCK_R,), tl.float32)
    maxbefore = tl.full((BLOCK_R,), neg_inf, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_valid = v < V
        valid = r_valid[:, None] & v_valid[None, :]
        x = tl.load(row + v[None, :], mask=valid, other=0.0).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + v, mask=v_valid, other=0.0)
        z, _ = transform_logits(x, bias, scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(valid, z, neg_inf)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if WITH_ENTROPY:
            shift = tl.where(s1 > 0, (m - m_new) * s1, 0.0)
            pz = tl.where(valid, p * (z - m_new[:, None]), 0.0)
            u = alpha * (u + shift) + tl.sum(pz, 1)
        if WITH_STATS:
            s2 = s2 * alpha * alpha + tl.sum(p * p, 1)
            sumz += tl.sum(tl.where(valid, z, 0.0), 1)
            before = v.to(tl.int64)[None, :] < y[:, None]
            maxbefore = tl.maximum(maxbefore, tl.max(tl.where(before, z, neg_inf), 1))
        s1 = s1 * alpha + tl.sum(p, 1)
        zy += tl.sum(tl.where(v.to(tl.int64)[None, :] == y[:, None], z, 0.0), 1)
        m = m_new
    # The block's partials, merged across blocks by chunked.epilogue.merge_partials.
    tl.store(out_ptr + 0 * C + r, m, mask=r_valid)
    tl.store(out_ptr + 1 * C + r, s1, mask=r_valid)
    tl.store(out_ptr + 2 * C + r, zy, mask=r_valid)
    if WITH_ENTROPY:
        tl.store(out_ptr + 3 * C + r, u, mask=r_valid)
    if WITH_STATS:
        tl.store(out_ptr + 4 * C + r, s2, mask=r_valid)
        tl.store(out_ptr + 5 * C + r, sumz, mask=r_valid)
        tl.store(out_ptr + 6 * C + r, maxbefore, mask=r_valid)


@triton.jit
def _chunk_grad_kernel(
    z_ptr, labels_ptr, bias_ptr, max_ptr, lognorm_ptr, g_ptr, ge_ptr, ez_ptr,
    C, V, stride_zc, scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    r_valid = r < C
    v_valid = v < V
    valid = r_valid[:, None] & v_valid[None, :]
    ptrs = z_ptr + r.to(tl.int64)[:, None] * stride_zc + v[None, :]
    x = tl.load(ptrs, mask=valid, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + v, mask=v_valid, other=0.0)
    z, jac = transform_logits(x.to(tl.float32), bias, scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
    m = tl.load(max_ptr + r, mask=r_valid, other=0.0)
    log_norm = tl.load(lognorm_ptr + r, mask=r_valid, other=0.0)
    g = tl.load(g_ptr + r, mask=r_valid, other=0.0)
    y = tl.load(labels_ptr + r, mask=r_valid, other=-1).to(tl.int64)
    z_rel = z - m[:, None]
    p = tl.exp(z_rel - log_norm[:, None])
    if WITH_ENTROPY:
        ge = tl.load(ge_ptr + r, mask=r_valid, other=0.0)
        ez = tl.load(ez_ptr + r, mask=r_valid, other=0.0)
        dz = -p * (g[:, None] + ge[:, None] * (z_rel - ez[:, None]))
    else:
        dz = -p * g[:, None]
    dz += tl.where(v.to(tl.int64)[None, :] == y[:, None], g[:, None], 0.0)
    tl.store(ptrs, (dz * jac).to(x.dtype), mask=valid)


def _fwd_block_v(interpreted: bool) -> int:
    return _INTERP_BLOCK_V if interpreted else _FWD_BLOCK_V


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [C, V] with contiguous rows, got strides {logits.stride()}")


def triton_forward_partials(logits, labels, bias, logit_scale, softcap, temperature,
                            with_entropy, with_stats) -> torch.Tensor:
    """Same contract as the ``"native"`` partials of ``chunked.epilogue``: fp32 ``[7, C]`` (m, s1,
    label logit, u, s2, sum z, max before the label) of a block; ``logits`` is read only."""
    _check(logits)
    c, v = logits.shape
    out = torch.empty((NUM_OUT, c), device=logits.device, dtype=torch.float32)
    block_v = _fwd_block_v(_interpreted(logits))
    _chunk_forward_kernel[(triton.cdiv(c, _FWD_BLOCK_R),)](
        logits, labels, bias if bias is not None else out, out, c, v, logits.stride(0),
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy,
        WITH_STATS=with_stats, BLOCK_R=_FWD_BLOCK_R, BLOCK_V=block_v, num_warps=_FWD_WARPS)
    return out


def triton_grad_inplace(logits, labels, row_max, log_norm, grad_logp, grad_entropy: torch.Tensor | None,
                        expected_logit: torch.Tensor | None, bias, logit_scale, softcap,
                        temperature) -> None:
    """Same contract as ``chunked.epilogue.chunk_grad_inplace`` (labels already relative)."""
    _check(logits)
    c, v = logits.shape
    block_v = _INTERP_BLOCK_V if _interpreted(logits) else _GRAD_BLOCK_V
    ent = grad_entropy is not None
    _chunk_grad_kernel[(triton.cdiv(c, _GRAD_BLOCK_R), triton.cdiv(v, block_v))](
        logits, labels, bias if bias is not None else row_max, row_max, log_norm, grad_logp,
        grad_entropy if ent else grad_logp, expected_logit if ent else grad_logp,
        c, v, logits.stride(0), float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=ent,
        BLOCK_R=_GRAD_BLOCK_R, BLOCK_V=block_v, num_warps=_GRAD_WARPS)


def launch_specs() -> list[LaunchSpec]:
    """The variants the two launchers compile on a GPU, per buffer dtype (fp32 logits from
    cuBLAS with fp32 output, or 16-bit): every optional feature on ("all") and off ("none");
    the flags only add elementwise code, so the two ends bound registers and spills. No tl.dot
    and no K loop: the gates that apply are spills and fences."""
    specs = []
    dtypes = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    for dtype, ptr in dtypes.items():
        for variant, on in (("all", True), ("none", False)):
            flags = dict(HAS_BIAS=on, HAS_SOFTCAP=on, WITH_ENTROPY=on)
            specs.append(LaunchSpec(
                kernel=_chunk_forward_kernel,
                config=f"{_FWD_BLOCK_R}x{_FWD_BLOCK_V}w{_FWD_WARPS}", dtype=dtype,
                constexprs=dict(flags, WITH_STATS=on, BLOCK_R=_FWD_BLOCK_R, BLOCK_V=_FWD_BLOCK_V),
                num_warps=_FWD_WARPS, divisible=("stride_zc",), types={"z_ptr": ptr},
                variant=variant))
            specs.append(LaunchSpec(
                kernel=_chunk_grad_kernel,
                config=f"{_GRAD_BLOCK_R}x{_GRAD_BLOCK_V}w{_GRAD_WARPS}", dtype=dtype,
                constexprs=dict(flags, BLOCK_R=_GRAD_BLOCK_R, BLOCK_V=_GRAD_BLOCK_V),
                num_warps=_GRAD_WARPS, divisible=("stride_zc",), types={"z_ptr": ptr},
                variant=variant))
    return specs
