"""The float64 oracle (the ordinary computation with full logits) for tests and
``apo-kernels check``, and the default gradient-filter threshold.

The pure-torch backend (``backend="torch"``) is the chunked strategy in ``apo_kernels/chunked/``.
"""

from __future__ import annotations


import torch

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


__all__ = ["oracle_linear_logprobs", "default_filter_eps"]

