"""The comparison rule of DESIGN.md and random inputs for the op tests."""

from __future__ import annotations

import torch

from apo_kernels.reference import oracle_linear_logprobs

# Absolute slack on top of the same-dtype torch error (cut-cross-entropy's rule).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_by_rule(name: str, ours: torch.Tensor, oracle: torch.Tensor,
                         same_dtype: torch.Tensor, dtype: torch.dtype, extra_tol: float = 0.0) -> None:
    """Elementwise ``|ours - oracle| <= |same_dtype - oracle| + tol``."""
    ours, oracle, same_dtype = ours.double(), oracle.double(), same_dtype.double()
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - oracle).abs()
    bound = (same_dtype - oracle).abs() + TOLERANCE[dtype] + extra_tol
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the rule; first at {i}: "
            f"ours={ours[tuple(i)].item():.6g} oracle={oracle[tuple(i)].item():.6g} "
            f"same-dtype={same_dtype[tuple(i)].item():.6g}; max err {err.max().item():.3g}")


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, *, bias: bool = False,
                peaked: bool = False, ignore_frac: float = 0.0, generator: torch.Generator | None = None,
                batch_shape: tuple[int, ...] | None = None):
    """Random ``hidden [n, d]`` (or ``[*batch_shape, d]``), ``weight [v, d]``, ``labels``,
    ``bias``. ``peaked``: the label's weight row is pushed along the token's hidden state so
    the distribution concentrates on it (p_label near 1, most other p tiny), as on a trained
    model's own answers; flat otherwise (random weights give p ~ 1/V)."""
    g = generator or torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    if peaked:
        # Several tokens share a label, so average their directions into its row.
        push = torch.zeros(v, d).index_add_(0, labels, hidden)
        weight += 6.0 * push / (push.norm(dim=1, keepdim=True) + 1e-6)
        # Peaked but not exactly the same: some tokens are taught a different label.
        flip = torch.rand(n, generator=g) < 0.2
        labels = torch.where(flip, torch.randint(0, v, (n,), generator=g), labels)
    if ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    if batch_shape is not None:
        hidden = hidden.reshape(*batch_shape, d)
        labels = labels.reshape(batch_shape)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def oracle_and_same_dtype(hidden, weight, labels, bias, grad_logp, grad_entropy, **transform):
    """Values and gradients from the float64 oracle and from the same-dtype ordinary way."""
    results = []
    for dtype in (torch.float64, hidden.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
                  for t in (hidden, weight, bias)]
        out = oracle_linear_logprobs(leaves[0], leaves[1], labels, leaves[2], dtype=dtype, **transform)
        loss = (out["logp"] * grad_logp.to(out["logp"].dtype)).sum()
        if grad_entropy is not None:
            loss = loss + (out["entropy"] * grad_entropy.to(out["entropy"].dtype)).sum()
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, present)
        out["grads"] = dict(zip(["hidden", "weight", "bias"][:len(present)], grads))
        results.append(out)
    return results
