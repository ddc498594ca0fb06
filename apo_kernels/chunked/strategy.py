"""The chunked strategy: vendor GEMMs on blocks of logits plus one fused epilogue pass each.

Forward (token chunks, whole vocabulary rows, because the normaliser needs the whole row):

    for each chunk of C kept tokens:  buf[:C] = h_c @ W.T          (torch.mm: MKL / cuBLAS)
                                      stats  = chunk_forward_epilogue(buf[:C], y_c)

Backward (vocabulary blocks, every kept token at once; the logits are recomputed):

    for each block of Vb vocabulary rows:  buf = h @ W[vb].T        (recompute, 2 M D Vb)
                                           chunk_grad_inplace(buf)  (buf <- d loss / d logits)
                                           dH     += buf @ W[vb]
                                           dW[vb]  = buf.T @ h      (written once, no accumulate)
                                           db[vb]  = buf.sum(0)

The backward's gradient is elementwise once the forward's normaliser (m, log s1) is known, so it
can block the vocabulary instead of the tokens. That order writes each dW block exactly once:
no ``[V, D]`` read-modify-write per chunk, and for 16-bit weights no parameter-sized fp32
accumulator — each block is accumulated in fp32 by the GEMM and rounded once into the output.
dH ([M, D] fp32) is the accumulator instead, which is small. When M is so large that even a
narrow vocabulary block would overflow the budget, tokens are chunked inside the block and the
dW block is accumulated in an fp32 ``[Vb, D]`` buffer.

Memory: one fp32 logits buffer of at most ``chunk_bytes`` (default 64 MiB on CPU, 256 MiB on
CUDA; ``APO_KERNELS_CHUNK_MB`` overrides), plus for 16-bit weights a ``[Vb, D]`` fp32 copy of the
current weight block where the GEMM cannot produce fp32 from 16-bit operands (CPU).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from .epilogue import chunk_forward_epilogue, chunk_grad_inplace

MiB = 2**20
DEFAULT_CHUNK_BYTES = {"cpu": 64 * MiB, "cuda": 256 * MiB}
CHUNK_ENV = "APO_KERNELS_CHUNK_MB"
_ROW_MULTIPLE = 16      # GEMM-friendly chunk heights
_MIN_VOCAB_BLOCK = 512  # below this, the backward chunks tokens inside a vocabulary block
_WEIGHT_BLOCK_BYTES = 8 * MiB  # fp32 copy of a weight block (16-bit weights on CPU)


def chunk_bytes_for(device: torch.device, chunk_bytes: Optional[int] = None) -> int:
    """The logits-buffer budget: the argument, else ``APO_KERNELS_CHUNK_MB``, else the default."""
    if chunk_bytes is not None:
        return int(chunk_bytes)
    env = os.environ.get(CHUNK_ENV)
    if env:
        return int(float(env) * MiB)
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])


def _round_rows(rows: int) -> int:
    return max(1, rows - rows % _ROW_MULTIPLE if rows >= _ROW_MULTIPLE else rows)


def forward_chunk_rows(vocab: int, budget: int) -> int:
    """Tokens per forward chunk: ``[rows, V]`` fp32 fits ``budget`` (a multiple of 16)."""
    return _round_rows(budget // (4 * vocab))


def backward_blocks(tokens: int, vocab: int, budget: int) -> tuple[int, int]:
    """``(token_chunk, vocab_block)`` of the backward: every token at once when a vocabulary
    block of at least ``_MIN_VOCAB_BLOCK`` fits, else token chunks inside such blocks."""
    vocab_block = min(vocab, budget // (4 * max(tokens, 1)))
    if vocab_block >= min(vocab, _MIN_VOCAB_BLOCK):
        return tokens, max(vocab_block - vocab_block % 128 if vocab_block >= 128 else vocab_block, 1)
    vocab_block = min(vocab, _MIN_VOCAB_BLOCK)
    return min(tokens, _round_rows(budget // (4 * vocab_block))), vocab_block


def _spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


# ---------------------------------------------------------------------------------------------
# GEMMs with fp32 results from fp32 or 16-bit operands.

@functools.cache
def _out_dtype_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` here (cuBLAS with
    fp32 output from 16-bit operands; not on CPU in torch 2.13)."""
    try:
        a = torch.ones(2, 2, device=device_type, dtype=dtype)
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(torch.zeros(2, 2, device=device_type), a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _weight_block_rows(d: int) -> int:
    return max(128, _WEIGHT_BLOCK_BYTES // (4 * d))


def logits_into(out: Tensor, h: Tensor, w: Tensor, h32: Optional[Tensor] = None) -> Tensor:
    """``out[:] = h @ w.T`` in fp32. ``out``: fp32 ``[C, Vb]`` (rows contiguous; may be a
    column slice); ``h [C, D]``, ``w [Vb, D]`` fp32 or both of one 16-bit dtype; ``h32``:
    ``h`` in fp32 if the caller has it."""
    if w.dtype == torch.float32:
        return torch.mm(h, w.T, out=out)
    if _out_dtype_mm_works(w.device.type, w.dtype):
        return torch.mm(h, w.T, out_dtype=torch.float32, out=out)
    h32 = h.float() if h32 is None else h32
    step = _weight_block_rows(w.shape[1])
    for v0, v1 in _spans(w.shape[0], step):  # an fp32 copy of a weight block, never all of W
        torch.mm(h32, w[v0:v1].float().T, out=out[:, v0:v1])
    return out


def addmm_hidden_grad(acc: Tensor, dz: Tensor, w: Tensor) -> None:
    """``acc += dz @ w``: ``acc`` fp32 ``[C, D]``, ``dz`` fp32 ``[C, Vb]``, ``w [Vb, D]``."""
    if w.dtype == torch.float32:
        acc.addmm_(dz, w)
        return
    if _out_dtype_mm_works(w.device.type, w.dtype):
        torch.addmm(acc, dz.to(w.dtype), w, out_dtype=torch.float32, out=acc)
        return
    step = _weight_block_rows(w.shape[1])
    for v0, v1 in _spans(w.shape[0], step):
        acc.addmm_(dz[:, v0:v1], w[v0:v1].float())


def add_weight_grad(out: Tensor, dz: Tensor, h: Tensor, h32: Tensor) -> None:
    """``out += dz.T @ h``: ``out [Vb, D]`` fp32 or 16-bit, ``dz [C, Vb]`` fp32, ``h`` the
    hidden rows in their dtype, ``h32`` in fp32. The product is accumulated in fp32 by the GEMM;
    a 16-bit ``out`` is rounded once per call (the backward calls once per block)."""
    if out.dtype == torch.float32:
        out.addmm_(dz.T, h32)
    elif _out_dtype_mm_works(h.device.type, h.dtype):
        out.add_(torch.mm(dz.T.to(h.dtype), h, out_dtype=torch.float32))
    else:
        out.add_(torch.mm(dz.T, h32))  # fp32 [Vb, D]: one block, never the whole head


# ---------------------------------------------------------------------------------------------
# The two passes, with the contract of kernels.linear_logprobs_{fwd,bwd}.triton_{forward,backward}.

def _gather_rows(t: Tensor, rows: Tensor, all_kept: bool, start: int, stop: int) -> Tensor:
    return t[start:stop] if all_kept else t.index_select(0, rows[start:stop])


def chunked_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor, *,
    logit_scale: float, softcap: Optional[float], temperature: float, with_entropy: bool,
    with_stats: bool, outputs: dict[str, Tensor], chunk_bytes: Optional[int] = None,
    epilogue: str = "auto",
) -> None:
    """Fill ``outputs`` at ``rows`` (same contract as ``triton_forward``; no tile max).

    hidden ``[N, D]``, weight ``[V, D]`` (fp32, or one 16-bit dtype), bias ``[V]`` or None,
    labels ``[N]`` int64 valid at ``rows`` (``[M]`` int64, the kept tokens).
    """
    vocab = weight.shape[0]
    all_kept = rows.numel() == labels.shape[0]
    step = forward_chunk_rows(vocab, chunk_bytes_for(hidden.device, chunk_bytes))
    step = min(step, rows.numel())
    buf = torch.empty((step, vocab), device=hidden.device, dtype=torch.float32)
    b32 = None if bias is None else bias.float().contiguous()
    for start, stop in _spans(rows.numel(), step):
        z = buf[: stop - start]
        logits_into(z, _gather_rows(hidden, rows, all_kept, start, stop), weight)
        y = _gather_rows(labels, rows, all_kept, start, stop)
        stats = chunk_forward_epilogue(z, y, bias=b32, logit_scale=logit_scale, softcap=softcap,
                                       temperature=temperature, with_entropy=with_entropy,
                                       with_stats=with_stats, impl=epilogue)
        for name, value in stats.items():
            if all_kept:
                outputs[name][start:stop] = value
            else:
                outputs[name].index_copy_(0, rows[start:stop], value.to(outputs[name].dtype))


def chunked_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
    row_max: Tensor, log_norm: Tensor, grad_logp: Tensor, expected_logit: Optional[Tensor],
    grad_entropy: Optional[Tensor], *, logit_scale: float, softcap: Optional[float],
    temperature: float, grad_hidden: Optional[Tensor], grad_weight: Optional[Tensor],
    grad_bias: Optional[Tensor], chunk_bytes: Optional[int] = None, epilogue: str = "auto",
) -> None:
    """Gradients at ``rows`` (same contract as ``triton_backward``, always exact and
    deterministic). ``grad_hidden [N, D]`` and ``grad_bias [V]`` fp32, accumulated into;
    ``grad_weight [V, D]`` fp32 or the weight's dtype: every block is ADDED once (pass zeros),
    accumulated in fp32 before any rounding to 16 bits."""
    m_rows, vocab = rows.numel(), weight.shape[0]
    all_kept = m_rows == labels.shape[0]
    token_step, vocab_step = backward_blocks(m_rows, vocab, chunk_bytes_for(hidden.device, chunk_bytes))
    b32 = None if bias is None else bias.float().contiguous()

    def take(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else (t if all_kept else t.index_select(0, rows))

    h, y = take(hidden), take(labels)
    h32 = h if h.dtype == torch.float32 else h.float()  # [M, D]: small next to [V, D]
    m, ln, g = take(row_max), take(log_norm), take(grad_logp)
    ge, ez = take(grad_entropy), take(expected_logit)
    dh = torch.zeros((m_rows, hidden.shape[1]), device=hidden.device, dtype=torch.float32) \
        if grad_hidden is not None else None
    buf = torch.empty((token_step, min(vocab_step, vocab)), device=hidden.device, dtype=torch.float32)
    many_token_chunks = token_step < m_rows
    for v0, v1 in _spans(vocab, vocab_step):
        w_blk = weight[v0:v1]
        dw_acc = None
        if grad_weight is not None and many_token_chunks and grad_weight.dtype != torch.float32:
            dw_acc = torch.zeros((v1 - v0, weight.shape[1]), device=weight.device, dtype=torch.float32)
        for t0, t1 in _spans(m_rows, token_step):
            dz = buf[: t1 - t0, : v1 - v0]
            logits_into(dz, h[t0:t1], w_blk, h32[t0:t1])
            chunk_grad_inplace(
                dz, y[t0:t1], m[t0:t1], ln[t0:t1], g[t0:t1],
                grad_entropy=None if ge is None else ge[t0:t1],
                expected_logit=None if ez is None else ez[t0:t1],
                bias=None if b32 is None else b32[v0:v1], logit_scale=logit_scale, softcap=softcap,
                temperature=temperature, vocab_start=v0, impl=epilogue)
            if dh is not None:
                addmm_hidden_grad(dh[t0:t1], dz, w_blk)
            if grad_weight is not None:
                target = dw_acc if dw_acc is not None else grad_weight[v0:v1]
                add_weight_grad(target, dz, h[t0:t1], h32[t0:t1])
            if grad_bias is not None:
                grad_bias[v0:v1] += dz.sum(0)
        if dw_acc is not None:
            grad_weight[v0:v1] += dw_acc
    if grad_hidden is not None:
        if all_kept:
            grad_hidden += dh
        else:
            grad_hidden.index_add_(0, rows, dh)
