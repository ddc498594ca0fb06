"""Bad input, empty and non-finite input, autocast, torch.compile, no_grad, random shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apo_kernels import linear_logprobs
from apo_kernels.reference import oracle_linear_logprobs
from apo_kernels.verify import assert_close_by_rule, make_inputs, oracle_and_same_dtype

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
BACKENDS = ["torch", "triton"]


def _inputs(n=6, d=8, v=20):
    return torch.randn(n, d), torch.randn(v, d), torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, w, y: (h, w, y.clone().fill_(20)), ValueError, r"labels must be in \[0, 20\).*holds 20"),
        (lambda h, w, y: (h, w, y.clone().fill_(-1)), ValueError, r"labels must be in .*holds -1"),
        (lambda h, w, y: (h, w[:, :7], y), ValueError, "hidden size mismatch"),
        (lambda h, w, y: (h, w, y[:5]), ValueError, "labels shape"),
        (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must be float32"),
        (lambda h, w, y: (h, w.half(), y), TypeError, "weight dtype"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer"),
        (lambda h, w, y: (h, w[None], y), ValueError, r"weight must have shape \[V, D\]"),
        (lambda h, w, y: (h, w.to("meta"), y), ValueError, "one device"),
    ],
    ids=["label_too_big", "label_negative", "hidden_size", "label_shape", "int_hidden",
         "dtype_mismatch", "float_labels", "weight_3d", "devices"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(mutate, error, match, backend):
    h, w, y = mutate(*_inputs())
    with pytest.raises(error, match=match):
        linear_logprobs(h, w, y, backend=backend)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(temperature=-1.0), "temperature must be a positive"),
        (dict(softcap=0.0), "softcap must be None or a positive"),
        (dict(softcap=float("inf")), "softcap must be None or a positive"),
        (dict(logit_scale=float("nan")), "logit_scale must be a positive"),
        (dict(filter_eps=-1.0), "filter_eps must be"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(bias=torch.randn(19)), r"bias must have shape \[V\]"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    h, w, y = _inputs()
    with pytest.raises(ValueError, match=match):
        linear_logprobs(h, w, y, **kwargs)


def test_ignore_index_is_allowed_outside_the_vocabulary():
    h, w, y = _inputs()
    y[2] = -1
    out = linear_logprobs(h, w, y, ignore_index=-1)
    assert out[2] == 0 and (out[torch.arange(6) != 2] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 5])
def test_empty_and_all_ignored_give_zeros_and_zero_grads(backend, n):
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = torch.full((n,), -100)
    out = linear_logprobs(h, w, y, b, backend=backend, return_entropy=True, return_stats=True)
    assert out.logprobs.shape == (n,) and (out.logprobs == 0).all() and (out.entropy == 0).all()
    (out.logprobs.sum() + out.entropy.sum()).backward()
    for t in (h, w, b):
        assert t.grad is not None and (t.grad == 0).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_stays_in_its_token(backend, bad):
    h, w, y = _inputs(n=40, d=16, v=100)
    h[7, 3] = bad
    h.requires_grad_()
    out = linear_logprobs(h, w, y, backend=backend, return_entropy=True)
    finite = torch.isfinite(out.logprobs)
    assert not finite[7] and finite[torch.arange(40) != 7].all()
    assert torch.isfinite(out.entropy[torch.arange(40) != 7]).all()
    out.logprobs.sum().backward()  # must not crash or hang
    # dH is per token: only the bad token's row is non-finite. (dW mixes every token.)
    row_finite = torch.isfinite(h.grad).all(dim=1)
    assert not row_finite[7] and row_finite[torch.arange(40) != 7].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_forward_only_save_nothing(backend):
    h, w, y = _inputs()
    h.requires_grad_()
    with torch.no_grad():
        out = linear_logprobs(h, w, y, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    out = linear_logprobs(h.detach(), w, y, backend=backend)
    assert out.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_a_matmul(backend):
    hidden, weight, labels, _ = make_inputs(30, 24, 90, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_logprobs(h, w, labels, backend=backend)
    assert logp.dtype == torch.float32
    g = torch.randn(30)
    gh, gw = torch.autograd.grad((logp * g).sum(), [h, w])
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # fp32 master weights
    oracle, same = oracle_and_same_dtype(hidden.bfloat16(), weight.bfloat16(), labels, None, g, None)
    assert_close_by_rule("logp", logp, oracle["logp"], same["logp"], torch.bfloat16)
    assert_close_by_rule("dW", gw, oracle["grads"]["weight"], same["grads"]["weight"], torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_bf16_hidden_and_fp32_master_weight(backend):
    """The usual mixed-precision case: bf16 activations, fp32 lm_head parameters."""
    hidden, weight, labels, _ = make_inputs(20, 16, 60, torch.float32)
    h, w = hidden.bfloat16().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_logprobs(h, w, labels, backend=backend)
    logp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = linear_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, backend=backend)
    torch.testing.assert_close(logp, ref)


def test_labels_of_any_integer_dtype_and_numpy_scalars():
    import numpy as np

    h, w, y = _inputs()
    expected = linear_logprobs(h, w, y, temperature=0.5)
    torch.testing.assert_close(linear_logprobs(h, w, y.to(torch.uint8), temperature=np.float32(0.5)),
                               expected)
    torch.testing.assert_close(linear_logprobs(h, w, y.int(), temperature=0.5), expected)


def test_torch_compile_fullgraph_with_backward():
    """The custom ops keep the compiled graph whole (fullgraph=True would raise on a break)."""
    hidden, weight, labels, bias = make_inputs(25, 16, 70, torch.float32, bias=True, ignore_frac=0.3)

    def step(h, w, b):
        out = linear_logprobs(h, w, labels, b, softcap=4.0, return_entropy=True)
        return (out.logprobs.sum() + 0.1 * out.entropy.sum()) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = compiled(*leaves)
    loss.backward()
    step(*eager_leaves).backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 40), d=st.integers(1, 70), v=st.integers(1, 260),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    softcap=st.sampled_from([None, 3.0]), peaked=st.booleans(), ignore=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_match_oracle(n, d, v, dtype, softcap, peaked, ignore, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, labels, _ = make_inputs(n, d, v, dtype, peaked=peaked, ignore_frac=ignore, generator=gen)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprobs(h, w, labels, softcap=softcap, return_entropy=True, backend="triton")
    g = torch.randn(n, generator=gen)
    gh, gw = torch.autograd.grad((out.logprobs * g).sum() + out.entropy.sum(), [h, w])
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, None, g, torch.ones(n), softcap=softcap)
    assert_close_by_rule("logp", out.logprobs, oracle["logp"], same["logp"], dtype)
    assert_close_by_rule("entropy", out.entropy, oracle["entropy"], same["entropy"], dtype)
    assert_close_by_rule("dH", gh, oracle["grads"]["hidden"], same["grads"]["hidden"], dtype)
    assert_close_by_rule("dW", gw, oracle["grads"]["weight"], same["grads"]["weight"], dtype)


def test_oracle_is_the_textbook_formula():
    """Guard the guard: the oracle equals cross_entropy's negative on a plain case."""
    h, w, y = _inputs(n=9, d=5, v=11)
    expected = -torch.nn.functional.cross_entropy(h.double() @ w.double().T, y, reduction="none")
    torch.testing.assert_close(oracle_linear_logprobs(h, w, y)["logp"], expected)
