"""``check_preference``: verify the fused preference loss against the ordinary computation.

For each dtype and loss type it builds a small random padded batch (ignored prompt positions,
ragged padding, a bias, a softcap), runs :func:`apo_kernels.fused_linear_preference_loss` and
compares the loss and the gradients ``dH``, ``dW``, ``dbias`` with

- the float64 oracle: full ``[N, V]`` logits, ``log_softmax``, gather, sum, formula;
- the same computation in the input dtype (the baseline a user would otherwise run).

Rule (as for the log-prob op): elementwise ``|ours - oracle| <= |baseline - oracle| + tol *
max|oracle|``, ``tol`` 1e-5 for fp32, 1e-3 for fp16, 1e-2 for bf16. Each row reports the largest
error and the largest allowed error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..losses import preference_loss
from ..preference import fused_linear_preference_loss
from ..reference import oracle_linear_logprobs
from ..verify import TOLERANCE

__all__ = ["check_preference", "TOLERANCES"]

TOLERANCES = TOLERANCE  # the op's per-dtype tolerances, one table for every check
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _ordinary_loss(h, w, bias, labels, ref_h, ref_w, dtype, transform, loss_kw):
    """Loss from full logits in ``dtype`` (float64 = oracle); differentiable in h, w, bias."""
    pol = oracle_linear_logprobs(h, w, labels, bias, dtype=dtype, **transform)["logp"]
    with torch.no_grad():
        ref = oracle_linear_logprobs(ref_h, ref_w, labels, None, dtype=dtype, **transform)["logp"]
    seq, seq_ref = pol.sum(1), ref.sum(1)
    b = seq.shape[0] // 2
    lengths = (labels != -100).sum(1)
    losses = preference_loss(
        seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **loss_kw
    )
    return losses.mean()


def _ordinary_with_grads(problem, as_dtype, transform, loss_kw):
    """(loss, (dH, dW, dbias)) of the ordinary computation with h, w, bias cast to ``as_dtype``
    when it is float64 (the oracle), else kept in their own dtype (the baseline)."""
    h, w, bias, labels, ref_h, ref_w = problem
    lv = [x.detach().to(as_dtype if as_dtype == torch.float64 else x.dtype).requires_grad_(True) for x in (h, w, bias)]
    loss = _ordinary_loss(lv[0], lv[1], lv[2], labels, ref_h, ref_w, as_dtype, transform, loss_kw)
    return loss.detach(), torch.autograd.grad(loss, lv)


def _row(name: str, ours: torch.Tensor, base: torch.Tensor, oracle: torch.Tensor, tol: float) -> dict:
    ours, base, oracle = ours.double().cpu(), base.double().cpu(), oracle.double().cpu()
    err = (ours - oracle).abs()
    allowed = (base - oracle).abs() + tol * max(float(oracle.abs().max()), 1e-12)
    finite = bool(torch.isfinite(ours).all())
    return {
        "name": name,
        "max_abs_err": float(err.max()) if finite else float("nan"),
        "baseline_err": float((base - oracle).abs().max()),
        "tol": float(allowed.max()),
        "passed": finite and bool((err <= allowed).all()),
    }


def check_preference(
    *,
    device: str | torch.device = "cpu",
    dtypes: Sequence[str | torch.dtype] = ("float32", "bfloat16"),
    loss_types: Sequence[str] = ("apo_zero", "apo_down", "sigmoid", "ipo"),
    pairs: int = 2,
    seq_len: int = 12,
    hidden_size: int = 48,
    vocab_size: int = 509,
    softcap: float | None = 30.0,
    beta: float = 0.5,
    backend: str = "auto",
    seed: int | None = None,
) -> list[dict]:
    """Check loss, dH, dW and dbias of the fused preference loss; one row per quantity.

    Returns a list of dicts ``{name, max_abs_err, baseline_err, tol, passed}`` with ``name`` like
    ``"apo_zero/bfloat16/dW"``. Small default shapes keep it to seconds on a CPU; on a GPU pass
    realistic ones. ``backend`` goes to the op and the loss head (``"auto"``: Triton on CUDA).
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31) if seed is None else seed)
    rows_out: list[dict] = []
    transform = dict(softcap=softcap)
    for dt in dtypes:
        dtype = _DTYPES[dt] if isinstance(dt, str) else dt
        if dtype not in TOLERANCES:
            raise ValueError(f"Unsupported dtype {dt!r}; valid: {sorted(_DTYPES)}")
        for loss_type in loss_types:
            rows, t, d, v = 2 * pairs, seq_len, hidden_size, vocab_size
            h = torch.randn(rows, t, d, generator=gen)
            w = torch.randn(v, d, generator=gen) * (2.0 / d**0.5)
            bias = 0.5 * torch.randn(v, generator=gen)
            ref_h = torch.randn(rows, t, d, generator=gen)
            ref_w = torch.randn(v, d, generator=gen) * (2.0 / d**0.5)
            labels = torch.randint(0, v, (rows, t), generator=gen)
            for i in range(rows):  # a prompt prefix and ragged right padding, ignored
                start = int(torch.randint(1, max(2, t // 3), (), generator=gen))
                end = int(torch.randint(start + 1, t + 1, (), generator=gen))
                labels[i, :start] = -100
                labels[i, end:] = -100
            h, w, bias, ref_h, ref_w = (x.to(device=dev, dtype=dtype) for x in (h, w, bias, ref_h, ref_w))
            labels = labels.to(dev)
            loss_kw = dict(loss_type=loss_type, beta=beta)

            leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, bias)]
            out = fused_linear_preference_loss(
                leaves[0], leaves[1], labels, leaves[2], ref_hidden=ref_h, ref_weight=ref_w,
                compute_metrics=False, backend=backend, **transform, **loss_kw,
            )
            g_ours = torch.autograd.grad(out.loss, leaves)

            problem = (h, w, bias, labels, ref_h, ref_w)
            oracle, g_oracle = _ordinary_with_grads(problem, torch.float64, transform, loss_kw)
            base, g_base = _ordinary_with_grads(problem, dtype, transform, loss_kw)
            tol = TOLERANCES[dtype]
            prefix = f"{loss_type}/{str(dtype).removeprefix('torch.')}"
            rows_out.append(_row(f"{prefix}/loss", out.loss.detach(), base, oracle, tol))
            for name, go, gb, gr in zip(("dH", "dW", "dbias"), g_ours, g_base, g_oracle):
                rows_out.append(_row(f"{prefix}/{name}", go, gb, gr, tol))
    return rows_out
