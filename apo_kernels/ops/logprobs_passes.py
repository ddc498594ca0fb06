"""The two passes of ``linear_logprobs`` on one head, without autograd: output buffers, backend
dispatch and gradient buffers. Shared by the custom ops (``linear_logprobs.py``, the whole head)
and by the vocabulary-parallel op (``vocab_parallel.py``, one shard of the head, which calls them
with labels relative to its shard and, in the backward, the global normaliser).

Labels here are already relative to ``weight``'s rows and are read only at ``rows`` (the kept
tokens, chosen by the caller): a label outside ``[0, V)`` at a kept row is a token whose label
lies in another shard of the vocabulary. Both backends then add no one-hot term for it (the
chunked epilogues and the Triton kernels compare ``v == y``), its ``logp``/``is_top1`` are
meaningless and its normaliser and statistics are those of this shard.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import chunked, reference

_EMPTY = (0,)


def autocast_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Like a matmul under ``torch.autocast``: both operands in the autocast dtype (the casts
    are differentiable, so fp32 master weights get fp32 gradients); unchanged otherwise."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        cast_to = torch.get_autocast_dtype(device_type)
        return hidden.to(cast_to), weight.to(cast_to)
    return hidden, weight


def filter_plan(backend: str, dtype: torch.dtype, filter_eps: float | str | None,
                params: tuple[Optional[Tensor], ...]) -> tuple[Optional[float], bool]:
    """The backward's filter threshold (``"auto"``: by input dtype) and whether the forward
    records per-tile max logits for its pre-skip: only for a filtered Triton backward that will
    actually run (a gradient is enabled and wanted by one of ``params``)."""
    eps = reference.default_filter_eps(dtype) if filter_eps == "auto" else filter_eps
    record = (backend == "triton" and eps is not None and torch.is_grad_enabled()
              and any(t is not None and t.requires_grad for t in params))
    return (None if eps is None else float(eps)), record


def tile_max_buffer(hidden: Tensor, n: int, vocab: int, record: bool) -> Tensor:
    """``[N, tiles]`` fp32; the first M rows receive the M kept tokens in compacted order (the
    backward reads only those; the shape must not depend on M for the fake op)."""
    if not record:
        return hidden.new_empty(_EMPTY, dtype=torch.float32)
    from ..kernels.linear_logprobs_fwd import tile_max_columns

    return hidden.new_empty((n, tile_max_columns(vocab, hidden.dtype)), dtype=torch.float32)


def run_forward(backend: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                labels: Tensor, rows: Tensor, outputs: dict[str, Tensor], **kwargs) -> None:
    """Fill ``outputs`` at ``rows`` with the chosen backend (``rows`` non-empty)."""
    # Autocast must not re-cast inside: the wrapper already chose the compute dtype.
    with torch.autocast(hidden.device.type, enabled=False):
        if backend == "triton":
            from ..kernels.linear_logprobs_fwd import triton_forward

            triton_forward(hidden, weight, bias, labels, rows, outputs=outputs, **kwargs)
        else:
            chunked.chunked_forward(hidden, weight, bias, labels, rows, outputs=outputs, **kwargs)


def forward_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
    ignored: Tensor, *, backend: str, logit_scale: float, softcap: Optional[float],
    temperature: float, with_entropy: bool, with_stats: bool, record_tile_max: bool,
) -> tuple[dict[str, Tensor], Tensor]:
    """hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]`` int64 (relative to ``weight``), rows
    ``[M]`` int64 kept tokens, ignored ``[N]`` bool (the complement of ``rows``).

    Returns the fp32 ``[N]`` outputs ``logp``, ``row_max`` (m), ``log_norm`` (log s1; lse = m +
    log s1) and, when asked, ``entropy``, ``mean_logit``, ``is_top1`` (int8), ``log_sum_p2``,
    all 0 at ignored tokens; and the per-tile max buffer (``tile_max_buffer``; empty ``[0]``
    unless ``record_tile_max``)."""
    n = labels.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    # Uninitialised on purpose: the backends write every kept row, the ignored rows are zeroed
    # below, and tests poison torch.empty with NaN so a row left unwritten fails loudly.
    # Separate allocations: a view of a [2, N] buffer would start 4n bytes in, not 16-byte
    # aligned for odd n, and the kernels' fast path wants aligned pointers.
    outputs = {"logp": torch.empty(n, **f32), "row_max": torch.empty(n, **f32),
               "log_norm": torch.empty(n, **f32)}
    if with_entropy:
        outputs["entropy"] = torch.empty(n, **f32)
    if with_stats:
        outputs["mean_logit"] = torch.empty(n, **f32)
        outputs["is_top1"] = torch.empty(n, device=hidden.device, dtype=torch.int8)
        outputs["log_sum_p2"] = torch.empty(n, **f32)
    tile_max = tile_max_buffer(hidden, n, weight.shape[0], record_tile_max)
    if rows.numel() > 0:
        extra = {"tile_max": tile_max} if record_tile_max else {}
        run_forward(backend, hidden, weight, bias, labels, rows, outputs, logit_scale=logit_scale,
                    softcap=softcap, temperature=temperature, with_entropy=with_entropy,
                    with_stats=with_stats, **extra)
    for out in outputs.values():  # [N] each
        out.masked_fill_(ignored, 0)
    return outputs, tile_max


def backward_pass(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
    labels: Tensor, bias: Optional[Tensor], rows: Tensor, row_max: Tensor, log_norm: Tensor,
    entropy: Optional[Tensor], tile_max: Optional[Tensor], *, logit_scale: float,
    softcap: Optional[float], temperature: float, backend: str, filter_eps: Optional[float],
    deterministic: bool, needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of hidden ``[N, D]`` (fp32), weight ``[V, D]`` (fp32, or the weight's dtype
    with the chunked backend) and bias ``[V]`` (fp32), None where not needed; each accumulated
    in fp32. ``row_max``/``log_norm`` ``[N]``: the normaliser the probabilities are taken
    against (the forward's own, or a global one for a vocabulary shard); ``entropy`` ``[N]``
    the matching entropy (with ``grad_entropy`` only)."""
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.zeros(hidden.shape, **f32) if needs_hidden else None
    # The chunked strategy writes each dW block once, accumulated in fp32 by the GEMM, so it
    # needs no parameter-sized fp32 accumulator for 16-bit weights; the Triton kernels add
    # tile by tile and do. It also writes every row of dW, so it needs no zero fill.
    is_chunked = backend != "triton"
    dw_alloc = torch.empty if is_chunked and rows.numel() > 0 else torch.zeros
    grad_weight = (dw_alloc(weight.shape, device=weight.device,
                            dtype=weight.dtype if is_chunked else torch.float32)
                   if needs_weight else None)
    grad_bias = torch.zeros(weight.shape[0], **f32) if needs_bias else None
    if rows.numel() > 0:
        grad_logp = grad_logp.float().contiguous()
        expected_logit = None
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
            expected_logit = (log_norm - entropy).contiguous()  # E_p[z] - m = log s1 - H
        # A row of a [2, N] buffer may start 4N bytes in: an [N] copy keeps the kernels'
        # pointers 16-byte aligned.
        if log_norm.data_ptr() % 16 != 0:
            log_norm = log_norm.clone()
        args = (hidden, weight, bias, labels, rows, row_max, log_norm, grad_logp, expected_logit,
                grad_entropy)
        kwargs = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature,
                      grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias)
        with torch.autocast(hidden.device.type, enabled=False):
            if backend == "triton":
                from ..kernels.linear_logprobs_bwd import triton_backward

                triton_backward(*args, filter_eps=filter_eps, deterministic=deterministic,
                                tile_max=tile_max, **kwargs)
            else:
                chunked.chunked_backward(*args, **kwargs)
    return grad_hidden, grad_weight, grad_bias
