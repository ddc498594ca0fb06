"""The shared inner loop: one ``[BLOCK_N, BLOCK_V]`` tile of logits ``h[n] @ W[v].T``.

Operands are contiguous in D (the launchers compact the kept hidden rows into ``[M, D]`` and
make the weight's last dimension contiguous), so each program reads ``BLOCK_N`` consecutive
rows of ``h`` and ``BLOCK_V`` consecutive rows of ``W``: with 16-byte-aligned rows
(``stride % 16 == 0``, the launcher's specialisation) the K loop's loads become ``cp.async``
(LDGSTS) and are software-pipelined ``num_stages`` deep.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import transform_logits


@triton.jit
def raw_logit_tile(h_ptr, w_ptr, n, n_valid, v, v_valid, D, stride_hn, stride_wv,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile ``sum_d h[n, d] W[v, d]``, accumulated over D in steps
    of BLOCK_D on chip. Out-of-range rows / vocabulary entries load zeros (callers mask them).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_base = h_ptr + n.to(tl.int64)[:, None] * stride_hn
    w_base = w_ptr + v.to(tl.int64)[None, :] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < D
        h = tl.load(h_base + d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        # W tile loaded already transposed: [BLOCK_D, BLOCK_V].
        w = tl.load(w_base + d[:, None], mask=d_valid[:, None] & v_valid[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def transformed_logit_tile(h_ptr, w_ptr, b_ptr, n, n_valid, v, v_valid, D,
                           stride_hn, stride_wv, scale, softcap, inv_temp,
                           HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``(z, jac)``: the tile after bias, scale, softcap and temperature, and ``dz/d(raw)``
    (see ``common.transform_logits``). Forward and backward recompute exactly this, so the
    backward's probabilities are bitwise those the forward normalised."""
    acc = raw_logit_tile(h_ptr, w_ptr, n, n_valid, v, v_valid, D, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + v, mask=v_valid, other=0.0).to(tl.float32)
    return transform_logits(acc, bias, scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
