"""Pieces shared by the kernels: the logit transform, an accurate tanh, dtype plumbing."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors through its numpy interpreter.

    Triton decides once, when it is imported: its own ``@jit`` helpers (``tl.sum``'s combine
    function, ``tl.cdiv``...) are built for the interpreter only if ``TRITON_INTERPRET`` was set
    by then. Setting it later gives a mix that fails inside kernels ("Cannot call @triton.jit'd
    outside of the scope of a kernel"), so ask triton's standard library, not the environment.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype tiles are cast to before ``tl.dot``.

    The interpreter has no bf16 arithmetic (bf16 tiles are raw 16-bit integers there), so under
    it every dot runs in fp32; on a GPU the input dtype feeds the tensor cores directly.
    """
    if interpreter_active() or dtype == torch.float32:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 setting for matmuls, so fp32 results match ``torch.mm``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def accurate_tanh(x):
    """tanh with ~1 ulp relative error in fp32 on the interpreter and the GPU alike.

    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` loses relative precision as ``|x| -> 0``
    (``1 - e`` cancels), so below 1/8 use the odd Taylor series to x^7, whose truncation
    error there is below 2e-10. libdevice's tanh is not available under the interpreter.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def transform_logits(acc, bias_row, scale, softcap, inv_temp,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Raw logits ``acc = h @ W.T`` -> ``z = softcap*tanh(scale*(acc+b)/softcap) / T``.

    Returns ``(z, jac)`` where ``jac = dz/dacc`` elementwise (a scalar when there is no
    softcap):  d/da [c*tanh(s*a/c)/T] = (s/T) * (1 - tanh^2(s*a/c)).
    """
    if HAS_BIAS:
        acc = acc + bias_row[None, :]
    acc = acc * scale
    if HAS_SOFTCAP:
        th = accurate_tanh(acc / softcap)
        z = softcap * th * inv_temp
        jac = (scale * inv_temp) * (1.0 - th * th)
    else:
        z = acc * inv_temp
        jac = scale * inv_temp
    return z, jac


@triton.jit
def round_to_bf16(x):
    """``x`` (fp32) rounded to the nearest bf16 value, ties to even, still as fp32.

    The GPU's ``x.to(tl.bfloat16)`` rounds this way (``cvt.rn``); Triton's interpreter truncates
    (and its explicit round-to-nearest mode mishandles the carry into the exponent), so kernels
    round with integer arithmetic first when they run there, and the cast that follows is exact.
    Non-finite values are returned unchanged.
    """
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < float("inf"), rounded, x)
