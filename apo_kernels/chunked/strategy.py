"""The chunked strategy: vendor GEMMs on blocks of logits plus one fused epilogue pass each.

Both passes walk the same blocks: vocabulary blocks of ``Vb`` columns over every kept token at
once (token chunks inside a block only when M is too large for a 512-column block to fit the
budget):

    forward:   for each vocabulary block:  buf = h @ W[vb].T           (torch.mm: MKL / cuBLAS)
                                           partials = epilogue(buf)    (m, s1, label logit, ...)
                                           merge into the running per-token partials (log-add)
    backward:  for each vocabulary block:  buf = h @ W[vb].T           (the identical call)
                                           buf <- d loss / d logits    (in place, one pass)
                                           dH     += buf @ W[vb]
                                           dW[vb] += buf.T @ h         (each block written once)
                                           db[vb] += buf.sum(0)

Why vocabulary blocks. (1) The backward's gradient is elementwise once the forward's normaliser
(m, log s1) is known, and the forward's statistics merge across blocks with a stable log-add,
so nothing needs a whole row. (2) Each dW block is written once: no ``[V, D]`` read-modify-write
per token chunk, and for 16-bit weights no parameter-sized fp32 accumulator — each block is
accumulated in fp32 by the GEMM and rounded once into the output (dH, ``[M, D]`` fp32, is the
accumulator instead: small). (3) The backward recomputes each block with the call the forward
made, so the logits agree bit for bit; p = exp((z - m) - log s1) near 1 would otherwise turn
any recompute difference into an error in 1 - p (the label's gradient).

Memory: one fp32 logits buffer of at most ``chunk_bytes`` (default 64 MiB on CPU, 256 MiB on
CUDA; ``APO_KERNELS_CHUNK_MB`` overrides), ``[M, D]`` fp32 for dH (and hidden in fp32 for
16-bit inputs), plus for 16-bit weights on CPU a 2 MiB fp32 copy of a weight sub-block (the
CPU GEMM has no fp32 output from 16-bit operands in torch 2.13; cuBLAS does, via ``out_dtype``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from .epilogue import chunk_forward_partials, chunk_grad_inplace, finalize_partials, merge_partials

MiB = 2**20
DEFAULT_CHUNK_BYTES = {"cpu": 64 * MiB, "cuda": 256 * MiB}
CHUNK_ENV = "APO_KERNELS_CHUNK_MB"
_ROW_MULTIPLE = 16      # GEMM-friendly chunk heights
_MIN_VOCAB_BLOCK = 512  # below this, the backward chunks tokens inside a vocabulary block
_WEIGHT_BLOCK_BYTES = 2 * MiB  # fp32 copy of a weight sub-block (16-bit weights on CPU)


def chunk_bytes_for(device: torch.device, chunk_bytes: int | None = None) -> int:
    """The logits-buffer budget: the argument, else ``APO_KERNELS_CHUNK_MB``, else the default."""
    if chunk_bytes is not None:
        return int(chunk_bytes)
    env = os.environ.get(CHUNK_ENV)
    if env:
        return int(float(env) * MiB)
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])


def _round_rows(rows: int) -> int:
    return max(1, rows - rows % _ROW_MULTIPLE if rows >= _ROW_MULTIPLE else rows)


def backward_blocks(tokens: int, vocab: int, budget: int) -> tuple[int, int]:
    """``(token_chunk, vocab_block)`` of both passes: every token at once when a vocabulary
    block of at least ``_MIN_VOCAB_BLOCK`` columns fits ``budget`` bytes of fp32, else token
    chunks (multiples of 16) inside such blocks."""
    vocab_block = min(vocab, budget // (4 * max(tokens, 1)))
    if vocab_block >= min(vocab, _MIN_VOCAB_BLOCK):
        if vocab_block < vocab:
            vocab_block -= vocab_block % 128  # >= 512 here: whole 128-column steps
        return tokens, vocab_block
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
    try:  # the exact call patterns used below: out= a column slice, addmm into fp32, plain
        a = torch.ones(2, 2, device=device_type, dtype=dtype)
        buf = torch.zeros(2, 4, device=device_type)
        torch.mm(a, a.T, out_dtype=torch.float32, out=buf[:, :2])
        torch.addmm(buf[:, :2], a, a, out_dtype=torch.float32, out=buf[:, :2])
        ok = bool((buf[:, :2] == 4).all()) and torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        return ok
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _weight_block_rows(d: int) -> int:
    return max(128, _WEIGHT_BLOCK_BYTES // (4 * d))


def logits_into(out: Tensor, h: Tensor, w: Tensor, h32: Tensor | None = None) -> Tensor:
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


def weight_grad_into(out: Tensor, dz: Tensor, h: Tensor, h32: Tensor, *, first: bool) -> None:
    """``out = dz.T @ h`` (``first``) or ``out += dz.T @ h``: ``out [Vb, D]`` fp32 or 16-bit,
    ``dz [C, Vb]`` fp32, ``h`` the hidden rows in their dtype, ``h32`` in fp32. The product is
    accumulated in fp32 by the GEMM; a 16-bit ``out`` is rounded once per call."""
    if out.dtype == torch.float32:
        if first:
            torch.mm(dz.T, h32, out=out)
        else:
            out.addmm_(dz.T, h32)
        return
    # fp32 products of weight sub-blocks (2 MiB each), rounded once into the 16-bit rows.
    use_out_dtype = _out_dtype_mm_works(h.device.type, h.dtype)
    for v0, v1 in _spans(out.shape[0], _weight_block_rows(out.shape[1])):
        if use_out_dtype:
            block = torch.mm(dz[:, v0:v1].T.to(h.dtype), h, out_dtype=torch.float32)
        else:
            block = torch.mm(dz[:, v0:v1].T, h32)
        if first:
            out[v0:v1].copy_(block)
        else:
            out[v0:v1].add_(block)


# ---------------------------------------------------------------------------------------------
# The two passes, with the contract of kernels.linear_logprobs_{fwd,bwd}.triton_{forward,backward}.

class _Rows:
    """The kept tokens' rows of the per-token tensors (a view when every token is kept)."""

    def __init__(self, rows: Tensor, n_total: int) -> None:
        self.rows, self.all_kept = rows, rows.numel() == n_total

    def take(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else (t if self.all_kept else t.index_select(0, self.rows))

    def put(self, out: Tensor, t0: int, t1: int, value: Tensor) -> None:
        if self.all_kept:
            out[t0:t1] = value
        else:
            out.index_copy_(0, self.rows[t0:t1], value.to(out.dtype))


def chunked_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, rows: Tensor, *,
    logit_scale: float, softcap: float | None, temperature: float, with_entropy: bool,
    with_stats: bool, outputs: dict[str, Tensor], chunk_bytes: int | None = None,
    epilogue: str = "auto",
) -> None:
    """Fill ``outputs`` at ``rows`` (same contract as ``triton_forward``; no tile max).

    hidden ``[N, D]``, weight ``[V, D]`` (fp32, or one 16-bit dtype), bias ``[V]`` or None,
    labels ``[N]`` int64 valid at ``rows`` (``[M]`` int64, the kept tokens). The blocks are the
    backward's (``backward_blocks``): the backward then recomputes each block with the identical
    GEMM call, so its logits equal the forward's bit for bit and 1 - p stays exact near p = 1.
    """
    sel = _Rows(rows, labels.shape[0])
    m_rows, vocab = rows.numel(), weight.shape[0]
    token_step, vocab_step = backward_blocks(m_rows, vocab, chunk_bytes_for(hidden.device, chunk_bytes))
    h, y = sel.take(hidden), sel.take(labels)
    h32 = h if h.dtype == torch.float32 else h.float()
    b32 = None if bias is None else bias.float().contiguous()
    buf = torch.empty((token_step, vocab_step), device=hidden.device, dtype=torch.float32)
    token_spans = list(_spans(m_rows, token_step))
    parts: list = [None] * len(token_spans)
    for v0, v1 in _spans(vocab, vocab_step):
        w_blk = weight[v0:v1]
        for i, (t0, t1) in enumerate(token_spans):
            z = buf[: t1 - t0, : v1 - v0]
            logits_into(z, h[t0:t1], w_blk, h32[t0:t1])
            part = chunk_forward_partials(
                z, y[t0:t1], bias=None if b32 is None else b32[v0:v1], logit_scale=logit_scale,
                softcap=softcap, temperature=temperature, with_entropy=with_entropy,
                with_stats=with_stats, vocab_start=v0, impl=epilogue)
            parts[i] = merge_partials(parts[i], part)
    for (t0, t1), part in zip(token_spans, parts):
        for name, value in finalize_partials(part, vocab).items():
            sel.put(outputs[name], t0, t1, value)


def chunked_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, rows: Tensor,
    row_max: Tensor, log_norm: Tensor, grad_logp: Tensor, expected_logit: Tensor | None,
    grad_entropy: Tensor | None, *, logit_scale: float, softcap: float | None,
    temperature: float, grad_hidden: Tensor | None, grad_weight: Tensor | None,
    grad_bias: Tensor | None, chunk_bytes: int | None = None, epilogue: str = "auto",
) -> None:
    """Gradients at ``rows`` (contract of ``triton_backward`` except for dW; always exact and
    deterministic). ``grad_hidden [N, D]`` and ``grad_bias [V]`` fp32, accumulated into;
    ``grad_weight [V, D]`` fp32 or the weight's dtype is OVERWRITTEN (every row; ``torch.empty``
    is fine), each block accumulated in fp32 before one rounding to 16 bits."""
    sel = _Rows(rows, labels.shape[0])
    m_rows, vocab = rows.numel(), weight.shape[0]
    token_step, vocab_step = backward_blocks(m_rows, vocab, chunk_bytes_for(hidden.device, chunk_bytes))
    b32 = None if bias is None else bias.float().contiguous()
    h, y = sel.take(hidden), sel.take(labels)
    h32 = h if h.dtype == torch.float32 else h.float()  # [M, D]: small next to [V, D]
    m, ln, g = sel.take(row_max), sel.take(log_norm), sel.take(grad_logp)
    ge, ez = sel.take(grad_entropy), sel.take(expected_logit)
    dh = torch.zeros((m_rows, hidden.shape[1]), device=hidden.device, dtype=torch.float32) \
        if grad_hidden is not None else None
    buf = torch.empty((token_step, vocab_step), device=hidden.device, dtype=torch.float32)
    many_token_chunks = token_step < m_rows
    for v0, v1 in _spans(vocab, vocab_step):
        w_blk = weight[v0:v1]
        dw_acc = None  # fp32 accumulator of a 16-bit dW block over several token chunks
        if grad_weight is not None and many_token_chunks and grad_weight.dtype != torch.float32:
            dw_acc = torch.empty((v1 - v0, weight.shape[1]), device=weight.device, dtype=torch.float32)
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
                weight_grad_into(target, dz, h[t0:t1], h32[t0:t1], first=t0 == 0)
            if grad_bias is not None:
                grad_bias[v0:v1] += dz.sum(0)
        if dw_acc is not None:
            grad_weight[v0:v1] = dw_acc
    if grad_hidden is not None:
        if sel.all_kept:
            grad_hidden += dh
        else:
            grad_hidden.index_add_(0, rows, dh)
