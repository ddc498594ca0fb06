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
DEFAULT_CHUNK_BYTES = 256 * 2**20
_TEMPORARIES_PER_CHUNK = 4


def _chunk_tokens(vocab_size: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (vocab_size * 4 * _TEMPORARIES_PER_CHUNK))


def _transformed_logits(
    h: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None,
    logit_scale: float, softcap: float | None, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """fp32 ``z [n, V]`` and ``dz/d(raw logits)`` (a scalar without softcap)."""
    z = h.float() @ w32.T
    if b32 is not None:
        z += b32
    z *= logit_scale
    if softcap is None:
        return z.div_(temperature), logit_scale / temperature
    th = torch.tanh(z.div_(softcap))
    jac = (logit_scale / temperature) * (1.0 - th * th)
    return th.mul_(softcap / temperature), jac


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


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
    vocab = weight.shape[0]
    step = _chunk_tokens(vocab, chunk_bytes)
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        z, _ = _transformed_logits(hidden[r], w32, b32, logit_scale, softcap, temperature)
        y = labels[r]
        lse = torch.logsumexp(z, dim=-1)
        zy = z.gather(1, y[:, None]).squeeze(1)
        outputs["lse"][r] = lse
        outputs["logp"][r] = zy - lse
        if with_entropy or with_stats:
            p = torch.exp(z - lse[:, None])
        if with_entropy:
            # -sum p (z - lse), not lse - sum p z: the latter cancels when H is small.
            outputs["entropy"][r] = -(p * (z - lse[:, None])).sum(-1)
        if with_stats:
            outputs["mean_logit"][r] = z.mean(-1)
            # First arg-max on ties, as torch.argmax and the kernel define it.
            outputs["is_top1"][r] = (z.argmax(-1) == y).to(outputs["is_top1"].dtype)
            outputs["log_sum_p2"][r] = torch.log((p * p).sum(-1))


def torch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
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
    """Same contract as ``triton_backward`` in deterministic mode (label term included)."""
    w32, b32 = weight.float(), _fp32(bias)
    vocab = weight.shape[0]
    step = _chunk_tokens(vocab, chunk_bytes)
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        h = hidden[r]
        z, jac = _transformed_logits(h, w32, b32, logit_scale, softcap, temperature)
        g = grad_logp[r]
        p = torch.exp(z - lse[r, None])
        coef = g[:, None]
        if grad_entropy is not None:
            coef = coef + grad_entropy[r, None] * (z - expected_logit[r, None])
        dacc = p.mul_(coef).neg_()
        dacc[torch.arange(r.numel(), device=r.device), labels[r]] += g
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

