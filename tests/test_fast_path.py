"""Inputs that break the compiled fast path's assumptions (D a multiple of 16, 16-byte-aligned
data, unit inner stride, row stride a multiple of 16) are copied or zero-padded on purpose by
the launchers, logged at debug level, and still give float64-accurate values and gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from apo_kernels import linear_logprobs, preference_head
from apo_kernels.kernels.fast_path import gemm_operands
from apo_kernels.verify import assert_close_by_rule, make_inputs, oracle_and_same_dtype

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _check(hidden, weight, labels, bias, dtype, deterministic=False):
    """Values, entropy and every gradient against float64 by the rule."""
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = linear_logprobs(hidden, weight, labels, bias, softcap=6.0, return_entropy=True,
                          backend="triton", deterministic=deterministic)
    g_logp, g_ent = torch.randn(labels.shape), torch.randn(labels.shape)
    loss = (out.logprobs * g_logp).sum() + (out.entropy * g_ent).sum()
    grads = torch.autograd.grad(loss, leaves)
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, bias, g_logp, g_ent, softcap=6.0)
    assert_close_by_rule("logp", out.logprobs, oracle["logp"], same["logp"], dtype)
    assert_close_by_rule("entropy", out.entropy, oracle["entropy"], same["entropy"], dtype)
    for name, g in zip(("hidden", "weight", "bias"), grads):
        assert g.shape == oracle["grads"][name].shape
        assert_close_by_rule(f"d{name}", g, oracle["grads"][name], same["grads"][name], dtype)


def _fast_path_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "apo_kernels" and "fast path" in r.getMessage()]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_d_not_a_multiple_of_16_is_zero_padded(dtype, deterministic, caplog):
    hidden, weight, labels, bias = make_inputs(37, 50, 509, dtype, bias=True, ignore_frac=0.2)
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        _check(hidden, weight, labels, bias, dtype, deterministic)
    messages = _fast_path_messages(caplog)
    for name in ("hidden", "weight", "grad_hidden", "grad_weight"):
        assert any(m.startswith(f"apo_kernels fast path: zero-padding {name} ") and "D=64" in m
                   or m.startswith(f"apo_kernels fast path: {name} ") and "padded to D=64" in m
                   for m in messages), (name, messages)


def test_aligned_contiguous_input_takes_the_fast_path_untouched(caplog):
    hidden, weight, labels, bias = make_inputs(37, 48, 509, torch.float32, bias=True)
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        _check(hidden, weight, labels, bias, torch.float32)
    assert _fast_path_messages(caplog) == []


def test_strided_operands_are_copied_contiguous(caplog):
    hidden, weight, labels, bias = make_inputs(29, 48, 300, torch.float32, bias=True)
    # hidden: every other column of a wider tensor (inner stride 2); weight: stored transposed.
    wide = torch.zeros(29, 96)
    wide[:, ::2] = hidden
    hidden = wide[:, ::2].detach()
    weight = weight.t().contiguous().t()
    assert hidden.stride(1) == 2 and weight.stride(1) == 300
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        _check(hidden, weight, labels, bias, torch.float32)
    messages = _fast_path_messages(caplog)
    assert any("copying hidden (29, 48)" in m and "inner stride 2 != 1" in m
               for m in messages), messages
    assert any("copying weight (300, 48)" in m and "inner stride 300 != 1" in m
               for m in messages), messages


def test_row_stride_not_a_multiple_of_16_is_copied(caplog):
    hidden, weight, labels, _ = make_inputs(23, 32, 200, torch.float32)
    hidden = torch.cat([hidden, torch.randn(23, 8)], dim=1)[:, :32].detach()  # row stride 40
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        _check(hidden, weight, labels, None, torch.float32)
    assert any("copying hidden (23, 32)" in m and "row stride 40 not a multiple of 16" in m
               for m in _fast_path_messages(caplog))


def test_misaligned_storage_offset_is_copied(caplog):
    hidden, weight, labels, bias = make_inputs(21, 32, 150, torch.bfloat16, bias=True)
    storage = torch.empty(1 + hidden.numel(), dtype=torch.bfloat16)
    storage[1:] = hidden.reshape(-1)
    hidden = storage[1:].view(21, 32)  # 2 bytes past an aligned allocation
    assert hidden.data_ptr() % 16 != 0
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        _check(hidden, weight, labels, bias, torch.bfloat16)
    assert any("copying hidden (21, 32)" in m and "not 16-byte aligned" in m
               for m in _fast_path_messages(caplog))


def test_gemm_operands_leave_a_conforming_view_alone():
    """A column slice of a wider tensor with an aligned start and a row stride that is a
    multiple of 16 is used in place: no copy."""
    wide = torch.randn(10, 64)
    hidden, weight = wide[:, :32], torch.randn(7, 32)
    h, w, d = gemm_operands(hidden, weight)
    assert d == 32 and h.data_ptr() == hidden.data_ptr() and w is weight


def test_preference_head_copies_a_misaligned_input(caplog):
    x = torch.randn(1 + 24, dtype=torch.float32)[1:]  # 4 bytes past an aligned allocation
    assert x.data_ptr() % 16 != 0
    cu = torch.tensor([0, 7, 12, 20, 24])
    ref = torch.randn(24)
    with caplog.at_level(logging.DEBUG, logger="apo_kernels"):
        ours = preference_head(x, cu_seqlens=cu, ref_token_logps=ref, backend="triton")
    expected = preference_head(x, cu_seqlens=cu, ref_token_logps=ref, backend="torch")
    torch.testing.assert_close(ours.losses, expected.losses)
    assert any("copying token_logps" in m for m in _fast_path_messages(caplog))
