"""The vocabulary-chunked backward: chunking, the GPU's 16-bit dz buffer, determinism, tile counts.

Under the interpreter a dz chunk is two 64-wide tiles, so V=509 runs four chunks; the dz buffer
is fp32 there like every dot operand, unless ``DZ_16BIT_IN_INTERPRETER`` asks for the GPU's
16-bit rounding (which the tests below do).
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import count_skipped_tiles, linear_logprobs
from apo_kernels.kernels import configs
from apo_kernels.verify import TOLERANCE, assert_close_by_rule, make_inputs, oracle_and_same_dtype

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def dz16(monkeypatch):
    monkeypatch.setattr(configs, "DZ_16BIT_IN_INTERPRETER", True)


def _grads(hidden, weight, labels, bias, g, **kw):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logp = linear_logprobs(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
                           backend="triton", **kw)
    return torch.autograd.grad((logp * g).sum(), leaves)


def test_chunk_size_does_not_change_the_result(monkeypatch):
    """One tile per chunk, two (the default here) and the whole vocabulary in one chunk agree
    with each other and with the oracle (dH is accumulated across chunks in fp32)."""
    hidden, weight, labels, bias = make_inputs(37, 48, 509, torch.float32, bias=True, ignore_frac=0.2)
    g = torch.randn(37)
    real = configs.dz_chunk_columns
    results = []
    for tiles in (1, 2, 100):
        monkeypatch.setattr(configs, "dz_chunk_columns",
                            lambda m, v, e, align, t=tiles: min(t * align, -(-v // align) * align))
        import apo_kernels.kernels.linear_logprobs_bwd as bwd

        monkeypatch.setattr(bwd, "dz_chunk_columns", configs.dz_chunk_columns)
        results.append(_grads(hidden, weight, labels, bias, g, softcap=7.0, filter_eps=None))
    monkeypatch.setattr(configs, "dz_chunk_columns", real)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, bias, g, None, softcap=7.0)
    for name, got in zip(("hidden", "weight", "bias"), results[0]):
        assert_close_by_rule(f"d{name}", got, oracle["grads"][name], same["grads"][name], torch.float32)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_dz_buffer_accuracy_and_no_cancellation_at_p_near_1(dtype, dz16):
    """With dz rounded to 16 bits (as on a GPU, and as the same-dtype torch rounds its logit
    gradient), the gradients are on average as close to the float64 oracle as the same-dtype
    torch's, and each element within twice the torch's error or 2 output ulps, plus the usual
    tol. (The plain elementwise rule is a coin toss here: two computations with the same
    rounding step, each sometimes one ulp off where the other happens to be exact.)

    Tokens whose label has p -> 1 have a true dH of g (1 - p) W[y] + ... ~ 0: the label term
    rides in the tile in fp32 before rounding, so there is nothing to cancel. (A sparse
    ``+g W[y]`` added to a tile's rounded ``-p g``, the design this replaced, leaves
    ``g 2^-9 |W[y]|`` ~ 1e-2 there.)"""
    hidden, weight, labels, bias = make_inputs(41, 40, 509, dtype, peaked=True, bias=True, ignore_frac=0.1)
    g = torch.randn(41)
    got = dict(zip(("hidden", "weight", "bias"), _grads(hidden, weight, labels, bias, g)))
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, bias, g, None)
    for name, ours in got.items():
        ref, torch_same = oracle["grads"][name], same["grads"][name]
        err = (ours.double() - ref).abs()
        torch_err = (torch_same.double() - ref).abs()
        bound = torch.maximum(2 * torch_err, 2 * _ulp(ref, dtype)) + TOLERANCE[dtype]
        assert (err <= bound).all(), f"d{name}: max excess {(err - bound).max():.3g}"
        # Same rounding step as the torch: the same accuracy on average (not better).
        assert err.mean() <= 1.5 * torch_err.mean(), name
    sure = oracle["logp"].exp() > 0.99
    assert sure.sum() >= 5  # peaked inputs: most tokens
    err = (got["hidden"].double() - oracle["grads"]["hidden"]).abs()[sure]
    assert err.max() <= 1e-3, f"dH of p~1 tokens: max err {err.max():.3g}"


@pytest.mark.parametrize("grads", [("weight",), ("bias",), ("hidden", "bias")], ids=str)
def test_16bit_dz_buffer_with_only_some_inputs_requiring_grad(grads, dz16):
    hidden, weight, labels, bias = make_inputs(30, 32, 300, torch.bfloat16, bias=True, peaked=True)
    g = torch.randn(30)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    for name in grads:
        leaves[name].requires_grad_()
    out = linear_logprobs(leaves["hidden"], leaves["weight"], labels, leaves["bias"], backend="triton",
                          softcap=9.0)
    got = torch.autograd.grad((out * g).sum(), [leaves[n] for n in grads])
    full = _grads(hidden, weight, labels, bias, g, softcap=9.0)
    for name, value in zip(grads, got):
        # The same kernels with every gradient on: the flags only drop work, never change it.
        assert torch.equal(value, full[("hidden", "weight", "bias").index(name)])


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_reproducible_in_every_mode(deterministic, dz16):
    """No atomics anywhere: the default mode is as reproducible as deterministic=True."""
    hidden, weight, labels, bias = make_inputs(45, 40, 400, torch.bfloat16, bias=True, peaked=True,
                                               ignore_frac=0.2)
    g = torch.linspace(-1, 1, 45)
    runs = [_grads(hidden, weight, labels, bias, g, deterministic=deterministic, softcap=10.0)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_skip_counts_cover_every_chunk_tile():
    """count_skipped_tiles counts the dz tiles of every chunk: token blocks x vocabulary tiles."""
    hidden, weight, labels, _ = make_inputs(50, 32, 509, torch.float32, peaked=True, ignore_frac=0.0)
    h = hidden.requires_grad_()
    with count_skipped_tiles() as stats:
        linear_logprobs(h, weight, labels, backend="triton", filter_eps=2.0**-12).sum().backward()
    cfg = configs.backward_config(torch.float32).dz
    assert stats.tiles == -(-50 // cfg.block_n) * -(-509 // cfg.block_v)
    assert 0 < stats.skipped_before_recompute + stats.skipped_after_recompute < stats.tiles


def test_tensor_descriptor_loads_match_pointer_loads(monkeypatch):
    """The experimental TMA switch of the dH GEMM (tensor descriptors; off by default, see
    docs/kernels.md) computes exactly what the pointer loads do."""
    import apo_kernels.kernels.linear_logprobs_bwd as bwd

    hidden, weight, labels, _ = make_inputs(37, 48, 509, torch.float32, ignore_frac=0.2)
    g = torch.randn(37)
    results = []
    for tma in (False, True):
        monkeypatch.setattr(bwd, "_USE_TMA", tma)
        results.append(_grads(hidden, weight, labels, None, g, filter_eps=None)[0])
    assert torch.equal(results[0], results[1])
