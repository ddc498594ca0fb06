"""The shared inner loop: one ``[BLOCK_N, BLOCK_V]`` tile of logits ``h[rows] @ W[v].T``."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import transform_logits


@triton.jit
def raw_logit_tile(h_ptr, w_ptr, rows, n_valid, v, v_valid, D,
                   stride_hn, stride_hd, stride_wv, stride_wd,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile, accumulated over D in steps of BLOCK_D on chip.

    ``rows`` (int64) index the hidden states directly, so ignored tokens are never copied or
    computed; out-of-range rows/vocab entries load zeros and are masked by the caller.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_base = h_ptr + rows[:, None] * stride_hn
    w_base = w_ptr + v.to(tl.int64)[None, :] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < D
        h = tl.load(h_base + d[None, :] * stride_hd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        # W tile loaded already transposed: [BLOCK_D, BLOCK_V].
        w = tl.load(w_base + d[:, None] * stride_wd,
                    mask=d_valid[:, None] & v_valid[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def transformed_logit_tile(h_ptr, w_ptr, b_ptr, rows, n_valid, v, v_valid, D,
                           stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap, inv_temp,
                           HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``(z, jac)``: the tile after bias, scale, softcap and temperature, and ``dz/d(raw)``
    (see ``common.transform_logits``). Forward and backward recompute exactly this."""
    acc = raw_logit_tile(h_ptr, w_ptr, rows, n_valid, v, v_valid, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + v, mask=v_valid, other=0.0).to(tl.float32)
    return transform_logits(acc, bias, scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
