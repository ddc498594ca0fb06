"""``filter_eps``: its valid range, and what the filter promises at the top of that range.

The backward's gradient filter skips a vocabulary tile when every entry of the tile's softmax
part ``a_tv = -p_tv (g_t + e_t (z_tv - E[z_t])) jac_tv`` is at most ``filter_eps * (|g_t| +
|e_t|) * logit_scale / T``. The label's one-hot term ``g_t [v = y_t] jac_ty`` is exact and must
never be filtered, in the atomic mode (where it is a separate sparse update) and in the
deterministic mode (where it sits inside the tiles). So the error of every gradient entry is
at most the sum of the eligible ``|a_tv|`` times the other GEMM operand, plus rounding.
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import FusedLinearPreferenceLoss, fused_linear_preference_loss, linear_logprobs
from apo_kernels.ops.checks import FILTER_EPS_MAX
from apo_kernels.verify import compare_by_rule, make_inputs, oracle_and_same_dtype

TOP_EPS = FILTER_EPS_MAX - 2.0**-10  # the largest value worth testing: just inside [0, 1)

BAD_VALUES = [
    (1.0, ValueError), (1.5, ValueError), (5.0, ValueError), (-0.1, ValueError),
    (float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError), ("tiny", TypeError),
    (torch.tensor(0.1), TypeError),
]


def _tiny():
    g = torch.Generator().manual_seed(0)
    h, w, y, _ = make_inputs(6, 8, 19, generator=g)
    return h, w, y


@pytest.mark.parametrize("value, error", BAD_VALUES, ids=[repr(v) for v, _ in BAD_VALUES])
def test_linear_logprobs_rejects_filter_eps_outside_its_range(value, error):
    h, w, y = _tiny()
    with pytest.raises(error, match="filter_eps"):
        linear_logprobs(h, w, y, filter_eps=value)


@pytest.mark.parametrize("value, error", BAD_VALUES[:3] + BAD_VALUES[6:7], ids=["1.0", "1.5", "5.0", "True"])
def test_preference_entry_points_reject_filter_eps_outside_its_range(value, error):
    with pytest.raises(error, match="filter_eps"):
        FusedLinearPreferenceLoss(filter_eps=value)  # at construction, not at the first batch
    h = torch.randn(2, 4, 8)
    w = torch.randn(19, 8)
    labels = torch.randint(0, 19, (2, 4))
    with pytest.raises(error, match="filter_eps"):
        fused_linear_preference_loss(h, w, labels, ref_hidden=h, ref_weight=w, filter_eps=value)


def test_integrations_reject_filter_eps_outside_its_range():
    pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    from transformers import LlamaConfig, LlamaForCausalLM

    from apo_kernels.integrations.transformers import patch_model

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))
    with pytest.raises(ValueError, match="filter_eps"):
        patch_model(model, filter_eps=1.5)
    assert getattr(model, "_apo_kernels_patch", None) is None  # nothing patched
    pytest.importorskip("trl", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    from apo_kernels.integrations import trl as trl_integration

    with pytest.raises(ValueError, match="filter_eps"):
        trl_integration.enable(filter_eps=1.5)


def _softmax_part(hidden, weight, labels, bias, grad_logp, grad_entropy, *, logit_scale, temperature,
                  softcap):
    """float64 ``a [N, V]`` (the softmax part of the raw-logit gradient, ignored rows 0) and each
    token's filter threshold unit ``(|g| + |e|) * logit_scale / T`` ``[N]``."""
    h, w = hidden.double(), weight.double()
    x = h @ w.T + (bias.double() if bias is not None else 0.0)
    if softcap is not None:
        th = torch.tanh(logit_scale * x / softcap)
        z, jac = softcap * th / temperature, logit_scale * (1 - th * th) / temperature
    else:
        z, jac = logit_scale * x / temperature, torch.full_like(x, logit_scale / temperature)
    p = torch.softmax(z, dim=1)
    g = grad_logp.double()
    e = grad_entropy.double() if grad_entropy is not None else torch.zeros_like(g)
    expected = (p * z).sum(1, keepdim=True)
    a = -p * (g[:, None] + e[:, None] * (z - expected)) * jac
    kept = (labels != -100).double()[:, None]
    unit = (g.abs() + e.abs()) * logit_scale / temperature
    return a * kept, unit


CASES = [  # (backend, deterministic, with_entropy, peaked, transform)
    ("triton", False, False, False, {}),
    ("triton", False, False, True, dict(temperature=0.7)),
    ("triton", False, True, False, dict(softcap=3.0, logit_scale=1.3)),
    ("triton", True, False, False, {}),
    ("triton", True, False, True, dict(temperature=0.7)),
    ("triton", True, True, True, dict(softcap=3.0, logit_scale=1.3)),
    ("torch", False, True, False, {}),
    ("torch", False, False, True, dict(softcap=3.0)),
]


@pytest.mark.parametrize("backend, deterministic, with_entropy, peaked, transform", CASES)
def test_top_of_range_keeps_the_filters_promise(backend, deterministic, with_entropy, peaked, transform):
    """At ``filter_eps`` just below 1 (flat logits: the filter drops most of the softmax term;
    peaked: the label tiles, where the label term and ``-p_y g`` nearly cancel) every gradient
    stays within what the dropped softmax entries can explain. A filter that touches the label
    term (the deterministic mode did, whenever ``g (1 - p_y) <= eps g``) breaks this bound."""
    # Wide enough that many vocabulary tiles hold no label (the filter never drops a tile
    # that does), so the non-vacuity check below holds for any labels.
    n, d, v = 29, 16, 1333
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    hidden, weight, labels, bias = make_inputs(n, d, v, bias=True, peaked=peaked, ignore_frac=0.2,
                                               generator=gen)
    grad_logp = torch.randn(n, generator=gen)
    grad_entropy = torch.randn(n, generator=gen) if with_entropy else None
    t = dict(logit_scale=1.0, temperature=1.0, softcap=None) | transform
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = linear_logprobs(*leaves[:2], labels, leaves[2], return_entropy=True, filter_eps=TOP_EPS,
                          deterministic=deterministic, backend=backend, **t)
    loss = (out.logprobs * grad_logp).sum()
    if with_entropy:
        loss = loss + (out.entropy * grad_entropy).sum()
    grads = torch.autograd.grad(loss, leaves)

    oracle, same = oracle_and_same_dtype(hidden, weight, labels, bias, grad_logp, grad_entropy, **t)
    a, unit = _softmax_part(hidden, weight, labels, bias, grad_logp, grad_entropy, **t)
    # Entries the filter may drop (a hair of slack: the kernel decides in fp32).
    eligible = a.abs() <= TOP_EPS * unit[:, None] * (1 + 1e-4) + 1e-30
    dropped = a.abs() * eligible
    allowance = {"hidden": dropped @ weight.double().abs(), "weight": dropped.T @ hidden.double().abs(),
                 "bias": dropped.sum(0)}
    for name, ours in zip(("hidden", "weight", "bias"), grads):
        r = compare_by_rule(f"d{name}", ours, oracle["grads"][name], same["grads"][name], torch.float32,
                            extra_tol=allowance[name] * (1 + 1e-4))
        assert r.passed, f"{backend} deterministic={deterministic}: {r.name} {r.detail} (max err {r.max_error:.3g})"
    if backend == "triton" and not peaked:
        # The case is not vacuous: the filter dropped a visible part of the gradient here.
        err = (grads[0].double() - oracle["grads"]["hidden"]).abs().max()
        assert err > 1e-3, f"the filter dropped nothing at filter_eps={TOP_EPS} (max dH error {err:.3g})"
