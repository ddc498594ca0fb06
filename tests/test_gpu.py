"""On a CUDA device: the compiled kernels (not the interpreter) at realistic bf16 shapes.

Skipped without CUDA (conftest). Run on a GPU machine with
``APO_TEST_CUDA=1 python -m pytest tests/test_gpu.py`` (the variable keeps conftest from
switching on Triton's interpreter).
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import linear_logprobs
from apo_kernels.verify import check_linear_logprobs, make_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_compiled_kernels():
    from apo_kernels.kernels.common import interpreter_active

    if interpreter_active():
        pytest.skip("set APO_TEST_CUDA=1 so the kernels are compiled, not interpreted")


@pytest.mark.parametrize("shape, softcap", [((4096, 2048, 128256), None), ((2048, 2304, 256000), 30.0),
                                            ((1000, 896, 151936), None)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bf16_real_shapes_against_float64(shape, softcap, deterministic):
    results = check_linear_logprobs(*shape, dtype=torch.bfloat16, backend="triton", device="cuda",
                                    softcap=softcap, bias=False, deterministic=deterministic)
    failed = [f"{r.name}: {r.violations} bad, {r.detail}" for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_against_float64(dtype):
    results = check_linear_logprobs(1024, 1024, 32000, dtype=dtype, backend="triton", device="cuda",
                                    bias=True, softcap=20.0, temperature=0.9)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_more_than_2_31_logits():
    """N * V > 2**31: offsets must be 64-bit. Compared with the chunked torch backend."""
    n, d, v = 17000, 256, 128256
    assert n * v > 2**31
    hidden, weight, labels, _ = make_inputs(n, d, v, torch.bfloat16, ignore_frac=0.1)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    outs = {}
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = linear_logprobs(h, w, labels, backend=backend, filter_eps=None)
        logp.sum().backward()
        outs[backend] = (logp, h.grad.float(), w.grad.float())
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    hidden, weight, labels, _ = make_inputs(2048, 1024, 50000, torch.bfloat16, peaked=True)
    grads = []
    for _ in range(2):
        h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
        linear_logprobs(h, w, labels.cuda(), deterministic=True).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_forward_only_saves_nothing_and_allocates_no_logits():
    n, d, v = 8192, 2048, 128256
    hidden, weight, labels, _ = make_inputs(n, d, v, torch.bfloat16)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        linear_logprobs(hidden, weight, labels)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * v * 2 / 16, f"forward allocated {extra / 2**20:.0f} MiB"
