"""Verify values and gradients against a float64 reference, by cut-cross-entropy's rule.

    |ours - oracle| <= |same-dtype torch - oracle| + tol * max(1, |oracle|)      (elementwise)

``oracle`` is the ordinary computation in float64; ``same-dtype torch`` is the ordinary
computation in the inputs' own dtype, so low precision is judged against what the dtype itself
allows. Used by the tests and ``apo-kernels check``.

``tol`` is absolute up to magnitude 1 and relative above it: our rounding is independent of the
same-dtype path's, so where that path happens to land near the oracle, ``tol`` alone must cover
our own error, which grows with the value (fp32 rounding is relative). With an absolute 1e-5,
an fp32 weight gradient of 8.75 (about 10 ulp of slack) failed by 1e-6 in roughly one case in
a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import oracle_linear_logprobs

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class Comparison:
    """Result of comparing one quantity: worst error and the rule's bound there."""

    name: str
    max_error: float
    max_excess: float  # max of (error - bound); <= 0 passes
    violations: int
    numel: int
    finite: bool
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.finite and self.violations == 0


def compare_by_rule(name: str, ours: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor,
                    dtype: torch.dtype, extra_tol: float = 0.0) -> Comparison:
    ours, oracle, same_dtype = (t.detach().double() for t in (ours, oracle, same_dtype))
    if ours.shape != oracle.shape:
        raise ValueError(f"{name}: shape {tuple(ours.shape)} != oracle shape {tuple(oracle.shape)}")
    finite = bool(torch.isfinite(ours).all())
    err = (ours - oracle).abs()
    bound = (same_dtype - oracle).abs() + TOLERANCE[dtype] * oracle.abs().clamp(min=1.0) + extra_tol
    excess = err - bound
    bad = excess > 0
    detail = ""
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        detail = (f"first at {list(i)}: ours={ours[i].item():.6g} oracle={oracle[i].item():.6g} "
                  f"same-dtype={same_dtype[i].item():.6g}")
    return Comparison(name, float(err.max()) if err.numel() else 0.0,
                      float(excess.max()) if excess.numel() else 0.0,
                      int(bad.sum()), err.numel(), finite, detail)


def assert_close_by_rule(name: str, ours: torch.Tensor, oracle: torch.Tensor,
                         same_dtype: torch.Tensor, dtype: torch.dtype, extra_tol: float = 0.0) -> None:
    result = compare_by_rule(name, ours, oracle, same_dtype, dtype, extra_tol)
    assert result.finite, f"{name}: non-finite values"
    assert result.passed, (f"{name}: {result.violations} of {result.numel} elements exceed the "
                           f"rule; {result.detail}; max err {result.max_error:.3g}")


def oracle_and_same_dtype(hidden, weight, labels, bias, grad_logp, grad_entropy, **transform):
    """Values and input gradients of ``sum(grad_logp * logp) + sum(grad_entropy * entropy)``
    from the float64 oracle and from the same-dtype ordinary computation.

    Returns two dicts with ``logp``, ``entropy``, ``mean_logit``, ``is_top1``, ``log_sum_p2``
    (shaped like ``labels``) and ``grads`` (``hidden``/``weight``/``bias`` present inputs).
    """
    results = []
    for dtype in (torch.float64, hidden.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
                  for t in (hidden, weight, bias)]
        out = oracle_linear_logprobs(leaves[0], leaves[1], labels, leaves[2], dtype=dtype, **transform)
        loss = (out["logp"] * grad_logp.to(out["logp"])).sum()
        if grad_entropy is not None:
            loss = loss + (out["entropy"] * grad_entropy.to(out["entropy"])).sum()
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, present)
        out["grads"] = dict(zip(["hidden", "weight", "bias"][:len(present)], grads))
        results.append(out)
    return results


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype = torch.float32, *, bias: bool = False,
                peaked: bool = False, ignore_frac: float = 0.0, generator: torch.Generator | None = None,
                batch_shape: tuple[int, ...] | None = None):
    """Random ``hidden [n, d]`` (or ``[*batch_shape, d]``), ``weight [v, d]``, ``labels``,
    ``bias`` on CPU. ``peaked``: the label's weight row is pushed along the token's hidden state so
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


def check_linear_logprobs(
    n: int, d: int, v: int, *, dtype: torch.dtype = torch.float32, backend: str = "auto",
    device: torch.device | str = "cpu", softcap: float | None = None, temperature: float = 1.0,
    logit_scale: float = 1.0, bias: bool = False, peaked: bool = True,
    filter_eps: float | str | None = "auto", deterministic: bool = False,
    ignore_frac: float = 0.2, seed: int = 0,
) -> list[Comparison]:
    """Run ``linear_logprobs`` once on fresh random inputs and compare log-probs, entropy and
    the gradients of hidden, weight (and bias) with the float64 oracle. The oracle runs on
    ``device`` in float64 with full ``[n, v]`` logits, so keep ``n * v`` moderate."""
    from .ops import linear_logprobs

    gen = torch.Generator().manual_seed(seed)
    hidden, weight, labels, b = make_inputs(n, d, v, dtype, bias=bias, peaked=peaked,
                                            ignore_frac=ignore_frac, generator=gen)
    hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
    b = b.to(device) if b is not None else None
    transform = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    out = linear_logprobs(leaves[0], leaves[1], labels, leaves[2], return_entropy=True,
                          filter_eps=filter_eps, deterministic=deterministic, backend=backend,
                          **transform)
    grad_logp = torch.randn(n, generator=gen).to(device)
    grad_entropy = torch.randn(n, generator=gen).to(device)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out.logprobs * grad_logp).sum() + (out.entropy * grad_entropy).sum(),
                                present)
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, b, grad_logp, grad_entropy, **transform)
    results = [compare_by_rule("logprobs", out.logprobs, oracle["logp"], same["logp"], dtype),
               compare_by_rule("entropy", out.entropy, oracle["entropy"], same["entropy"], dtype)]
    for name, g in zip(["hidden", "weight", "bias"], grads):
        results.append(compare_by_rule(f"d{name}", g, oracle["grads"][name], same["grads"][name], dtype))
    return results
