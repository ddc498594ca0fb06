"""Pure-torch implementations: the chunked fallback backend and the float64 oracle.

The fallback computes exactly what the Triton kernels compute (same outputs, same gradient
formulas, see ``kernels/linear_logprobs_bwd.py``), one chunk of tokens at a time, so peak
memory is bounded by ``chunk x V`` fp32 logits instead of ``N x V``. It never filters
gradients (it is always exact) and is deterministic. The oracle materialises everything in
float64 and exists for tests and ``apo-kernels check``.
"""

from __future__ import annotations


import torch

# Bytes of fp32 [chunk, V] temporaries the fallback may hold at once (logits, probabilities,
# their gradient): bounded, whatever N is.
DEFAULT_CHUNK_BYTES = 64 * 2**20
_TEMPORARIES_PER_CHUNK = 4


def _chunk_tokens(vocab_size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (vocab_size * 4 * _TEMPORARIES_PER_CHUNK))


def _transformed_logits(
    h: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None,
    logit_scale: float, softcap: float | None, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """fp32 ``z [n, V]`` and ``dz/d(raw logits)`` (a scalar without softcap), in place where
    possible: every pass over ``[n, V]`` costs as much as the log-softmax itself on CPU."""
    z = h.float() @ w32.T
    if b32 is not None:
        z += b32
    if softcap is None:
        factor = logit_scale / temperature
        if factor != 1.0:
            z *= factor
        return z, factor
    th = z.mul_(logit_scale / softcap).tanh_()
    jac = (logit_scale / temperature) * (1.0 - th * th)
    return th.mul_(softcap / temperature), jac


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _chunks(rows: torch.Tensor, n_total: int, step: int):
    """Yield index chunks of ``rows``; a slice when every token is kept (no gather copy)."""
    all_kept = rows.numel() == n_total
    for start in range(0, rows.numel(), step):
        yield slice(start, min(start + step, n_total)) if all_kept else rows[start:start + step]


def torch_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    *,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
    with_stats: bool,
    outputs: dict[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Same contract as ``kernels.linear_logprobs_fwd.triton_forward``."""
    w32, b32 = weight.float(), _fp32(bias)
    step = _chunk_tokens(weight.shape[0], chunk_bytes)
    for r in _chunks(rows, labels.shape[0], step):
        z, _ = _transformed_logits(hidden[r], w32, b32, logit_scale, softcap, temperature)
        y = labels[r][:, None]
        row_max, argmax = z.max(-1, keepdim=True)
        if with_stats:
            outputs["mean_logit"][r] = z.mean(-1)
            # First arg-max on ties, as torch.argmax and the kernel define it.
            outputs["is_top1"][r] = (z.argmax(-1, keepdim=True) == y).squeeze(1).to(torch.int8)
        logsm = torch.log_softmax(z, dim=-1)  # one fused pass
        del z
        outputs["logp"][r] = logsm.gather(1, y).squeeze(1)
        # The normaliser as (m, log s1), like the kernel: log s1 = -(log-softmax at the arg-max).
        outputs["row_max"][r] = row_max.squeeze(1)
        outputs["log_norm"][r] = -logsm.gather(1, argmax).squeeze(1)
        if with_entropy:
            # -sum p log p, stable even when H is tiny (lse - E[z] would cancel).
            outputs["entropy"][r] = -(logsm.exp() * logsm).sum(-1)
        if with_stats:
            outputs["log_sum_p2"][r] = torch.logsumexp(logsm.mul_(2.0), dim=-1)


def torch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    grad_logp: torch.Tensor,
    expected_logit: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Same contract as ``kernels.linear_logprobs_bwd.triton_backward`` (exact, no filter)."""
    w32, b32 = weight.float(), _fp32(bias)
    step = _chunk_tokens(weight.shape[0], chunk_bytes)
    for r in _chunks(rows, labels.shape[0], step):
        h = hidden[r]
        z, jac = _transformed_logits(h, w32, b32, logit_scale, softcap, temperature)
        g = grad_logp[r]
        z_rel = z.sub_(row_max[r, None])  # relative to the row max, as the kernel does
        if grad_entropy is not None:
            # coef = g + e (z - E[z]), computed before z is overwritten by p;
            # expected_logit is E[z] - m.
            coef = (z_rel - expected_logit[r, None]).mul_(grad_entropy[r, None]).add_(g[:, None])
        else:
            coef = g[:, None]
        dacc = z_rel.sub_(log_norm[r, None]).exp_().mul_(coef).neg_()  # -p * coef, in z's memory
        dacc[torch.arange(dacc.shape[0], device=dacc.device), labels[r]] += g
        dacc *= jac
        if grad_hidden is not None:
            grad_hidden[r] = dacc @ w32
        if grad_weight is not None:
            grad_weight.addmm_(dacc.T, h.float())
        if grad_bias is not None:
            grad_bias += dacc.sum(0)


def oracle_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """The ordinary computation with full ``[N, V]`` logits, in ``dtype`` (float64 by default).

    Differentiable: returns ``logp``, ``entropy``, ``mean_logit``, ``is_top1``, ``log_sum_p2``
    with shape ``labels.shape``, zero at ignored positions. Passing ``dtype=hidden.dtype``
    gives the same-dtype torch computation the tolerance rule compares against.
    """
    h = hidden.to(dtype)
    z = h @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = (z / temperature).to(torch.promote_types(dtype, torch.float32))
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logsm = torch.log_softmax(z, dim=-1)
    p = logsm.exp()
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return {
        "logp": torch.where(keep, logsm.gather(-1, safe[..., None]).squeeze(-1), zero),
        "entropy": torch.where(keep, -(p * logsm).sum(-1), zero),
        "mean_logit": torch.where(keep, z.mean(-1), zero),
        "is_top1": keep & (z.argmax(-1) == safe),
        "log_sum_p2": torch.where(keep, torch.log((p * p).sum(-1)), zero),
    }


def default_filter_eps(dtype: torch.dtype) -> float | None:
    """Relative gradient-filter threshold by input dtype: below the rounding of the gradients
    that dtype returns (bf16 keeps 8 significant bits, fp16 11); exact for fp32."""
    return {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-15}.get(dtype)


__all__ = [
    "torch_forward",
    "torch_backward",
    "oracle_linear_logprobs",
    "default_filter_eps",
    "DEFAULT_CHUNK_BYTES",
]

