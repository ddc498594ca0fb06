"""The chunked strategy (backend="torch") and its chunk epilogues against float64.

Every CPU epilogue (C++, torch ops; torch.compile only with APO_TEST_COMPILE=1: its first call
compiles for about two minutes on 2 cores) must give values, entropy, statistics and every
gradient within DESIGN.md's rule, with a chunk budget small enough that the forward runs many
token chunks and the backward many vocabulary blocks (and, for 16-bit weights, token chunks
inside a block). The Triton epilogue kernels run under the interpreter on CPU tensors.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from apo_kernels import linear_logprobs
from apo_kernels.chunked import (
    backward_blocks,
    chunk_forward_epilogue,
    chunk_grad_inplace,
    native_available,
    set_cpu_epilogue,
)
from apo_kernels.chunked import native as native_mod
from apo_kernels.reference import oracle_linear_logprobs
from apo_kernels.verify import assert_close_by_rule, make_inputs, oracle_and_same_dtype

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

EPILOGUES = ["torch", "native"]
if os.environ.get("APO_TEST_COMPILE") == "1":
    EPILOGUES.append("compile")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRANSFORMS = {
    "plain": dict(),
    "all": dict(softcap=8.0, temperature=1.3, logit_scale=0.8),
}


def _skip_without_native(impl: str) -> None:
    # Checked inside the test (not at collection): the first check builds the extension.
    if impl == "native" and not native_available():
        pytest.skip("native epilogue unavailable: no C++ compiler/ninja, or APO_KERNELS_NATIVE=0")


@pytest.fixture
def epilogue(request):
    _skip_without_native(request.param)
    set_cpu_epilogue(request.param)
    yield request.param
    set_cpu_epilogue(None)


@pytest.fixture
def small_chunks(monkeypatch):
    """~20 KB of logits per block: forward chunks of a few tokens, several vocabulary blocks."""
    monkeypatch.setenv("APO_KERNELS_CHUNK_MB", str(20_000 / 2**20))


def _case(dtype, transform, *, n=37, d=48, v=1100, bias=True, grads=("hidden", "weight", "bias"),
          entropy=True, stats=True, ignore_frac=0.25, peaked=True):
    hidden, weight, labels, b = make_inputs(n, d, v, dtype, bias=bias, peaked=peaked,
                                            ignore_frac=ignore_frac)
    leaves = {"hidden": hidden, "weight": weight, "bias": b}
    for name, t in leaves.items():
        if t is not None and name in grads:
            t.requires_grad_()
    out = linear_logprobs(hidden, weight, labels, b, return_entropy=entropy, return_stats=stats,
                          backend="torch", **transform)
    grad_logp = torch.randn(labels.shape)
    grad_entropy = torch.randn(labels.shape) if entropy else None
    loss = (out.logprobs * grad_logp).sum() + ((out.entropy * grad_entropy).sum() if entropy else 0)
    wanted = [k for k, t in leaves.items() if t is not None and t.requires_grad]
    ours = dict(zip(wanted, torch.autograd.grad(loss, [leaves[k] for k in wanted])))
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, b, grad_logp, grad_entropy, **transform)
    assert_close_by_rule("logp", out.logprobs, oracle["logp"], same["logp"], dtype)
    if entropy:
        assert_close_by_rule("entropy", out.entropy, oracle["entropy"], same["entropy"], dtype)
    if stats:
        for name in ("mean_logit", "log_sum_p2"):
            assert_close_by_rule(name, getattr(out, name), oracle[name], same[name], dtype)
        disagree = out.is_top1 != oracle["is_top1"]
        assert disagree.float().mean() <= (0.0 if dtype == torch.float32 else 0.05)
    for name, g in ours.items():
        assert g.dtype == leaves[name].dtype
        assert_close_by_rule(f"d{name}", g, oracle["grads"][name], same["grads"][name], dtype)


@pytest.mark.parametrize("epilogue", EPILOGUES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=str)
def test_each_epilogue_matches_float64_across_chunks(epilogue, dtype, transform, small_chunks,
                                                     poison_empty):
    _case(dtype, TRANSFORMS[transform], bias=transform != "plain")


@pytest.mark.parametrize("epilogue", EPILOGUES, indirect=True)
@pytest.mark.parametrize("grads", [("hidden",), ("weight",), ("bias",), ("weight", "bias")])
def test_only_some_inputs_require_grad(epilogue, grads, small_chunks):
    _case(torch.float32, {"softcap": 6.0}, grads=grads, stats=False)


@pytest.mark.parametrize("epilogue", EPILOGUES, indirect=True)
@pytest.mark.parametrize("shape", [(1, 7, 3), (53, 33, 257), (20, 16, 2053)])
def test_odd_shapes_flat_logits_and_default_budget(epilogue, shape):
    n, d, v = shape
    _case(torch.float32, {"temperature": 0.7}, n=n, d=d, v=v, peaked=False, bias=False,
          ignore_frac=0.1 if n > 1 else 0.0)


def test_blocking_follows_the_budget():
    # Every kept token at once when a vocabulary block of >= 512 fits; else token chunks.
    assert backward_blocks(1850, 49152, 64 * 2**20) == (1850, 8960)
    tokens, block = backward_blocks(10**6, 49152, 64 * 2**20)
    assert block == 512 and tokens * block * 4 <= 64 * 2**20


def _chunk_oracle(raw, labels, bias, transform):
    z = raw.double() + (bias.double() if bias is not None else 0)
    z = z * transform.get("logit_scale", 1.0)
    if transform.get("softcap"):
        z = transform["softcap"] * torch.tanh(z / transform["softcap"])
    return z / transform.get("temperature", 1.0)


@pytest.mark.parametrize("impl", ["torch", "triton", "native"])
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=str)
def test_chunk_epilogue_api_against_float64(impl, transform):
    """The API the single-pass preference path uses: forward stats, then the in-place gradient
    on vocabulary blocks (labels outside a block add nothing there)."""
    _skip_without_native(impl)
    tr = TRANSFORMS[transform]
    c, v = 11, 300
    raw = torch.randn(c, v) * 4
    labels = torch.randint(0, v, (c,))
    bias = torch.randn(v) if transform != "plain" else None
    z = _chunk_oracle(raw, labels, bias, tr).requires_grad_()
    lsm = z.log_softmax(-1)
    p = lsm.exp()
    logp = lsm.gather(1, labels[:, None]).squeeze(1)
    ent = -(p * lsm).sum(-1)
    stats = chunk_forward_epilogue(raw.clone(), labels, bias=bias, with_entropy=True,
                                   with_stats=True, impl=impl, **tr)
    torch.testing.assert_close(stats["logp"].double(), logp.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(stats["entropy"].double(), ent.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(stats["mean_logit"].double(), z.detach().mean(-1), atol=2e-5, rtol=0)
    torch.testing.assert_close(stats["log_sum_p2"].double(), (p * p).sum(-1).log().detach(),
                               atol=2e-5, rtol=0)
    assert (stats["is_top1"].bool() == (z.argmax(-1) == labels)).all()
    torch.testing.assert_close(stats["row_max"].double() + stats["log_norm"].double(),
                               z.detach().logsumexp(-1), atol=2e-5, rtol=0)

    g, e = torch.randn(c), torch.randn(c)
    raw_d = raw.double().requires_grad_()
    zz = _chunk_oracle(raw_d, labels, bias, tr)
    lsm2 = zz.log_softmax(-1)
    loss = (lsm2.gather(1, labels[:, None]).squeeze(1) * g).sum() + (
        -(lsm2.exp() * lsm2).sum(-1) * e).sum()
    (want,) = torch.autograd.grad(loss, raw_d)
    buf = raw.clone()
    expected = stats["log_norm"] - stats["entropy"]
    for v0, v1 in [(0, 128), (128, 200), (200, v)]:  # vocabulary blocks, as the backward runs them
        chunk_grad_inplace(buf[:, v0:v1], labels, stats["row_max"], stats["log_norm"], g,
                           grad_entropy=e, expected_logit=expected,
                           bias=None if bias is None else bias[v0:v1], vocab_start=v0, impl=impl,
                           **tr)
    torch.testing.assert_close(buf.double(), want, atol=1e-5, rtol=1e-4)


def test_native_build_failure_falls_back_to_torch_with_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(native_mod, "SOURCE", tmp_path / "missing.cpp")
    native_mod.load_native.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="apo_kernels.chunked.native"):
            assert native_mod.load_native() is None
            from apo_kernels.chunked import resolve_epilogue

            assert resolve_epilogue("auto", torch.device("cpu")) == "torch"
        assert len([r for r in caplog.records if "pure-torch" in r.getMessage()]) == 1
        h, w, labels, _ = make_inputs(9, 8, 40, torch.float32)
        ref = oracle_linear_logprobs(h, w, labels)["logp"].float()
        torch.testing.assert_close(linear_logprobs(h, w, labels, backend="torch"), ref,
                                   atol=1e-5, rtol=0)
    finally:
        native_mod.load_native.cache_clear()


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("APO_KERNELS_NATIVE", "0")
    native_mod.load_native.cache_clear()
    try:
        assert native_mod.load_native() is None
    finally:
        native_mod.load_native.cache_clear()


def test_bad_chunk_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="logits must be"):
        chunk_forward_epilogue(torch.randn(3, 5).double(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        chunk_forward_epilogue(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="together"):
        chunk_grad_inplace(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(3),
                           torch.zeros(3), torch.zeros(3), grad_entropy=torch.zeros(3))
    with pytest.raises(ValueError, match="cpu epilogue"):
        set_cpu_epilogue("fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_grad_kernel_on_a_16bit_buffer(dtype):
    """The grad kernel stores back in the buffer's dtype (cuBLAS may write 16-bit logits)."""
    c, v = 5, 130
    raw = (torch.randn(c, v) * 3).to(dtype)
    labels = torch.randint(0, v, (c,))
    stats = chunk_forward_epilogue(raw.float(), labels, impl="triton")
    g = torch.randn(c)
    buf = raw.clone()
    from apo_kernels.kernels.chunk_epilogue import triton_grad_inplace

    triton_grad_inplace(buf, labels, stats["row_max"], stats["log_norm"], g, None, None, None,
                        1.0, None, 1.0)
    z = raw.double().requires_grad_()
    (want,) = torch.autograd.grad((z.log_softmax(-1).gather(1, labels[:, None]).squeeze(1) * g).sum(), z)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(buf.double(), want, atol=tol, rtol=tol)


def test_launch_specs_cover_every_dtype_with_all_features_on_and_off():
    from apo_kernels.kernels import chunk_epilogue

    specs = chunk_epilogue.launch_specs()
    names = {s.name for s in specs}
    assert names == {"_chunk_forward_kernel", "_chunk_grad_kernel"}
    fwd = [s for s in specs if s.name == "_chunk_forward_kernel"]
    assert len(fwd) == 3 * 2 and len(specs) - len(fwd) == 3 * 2
    assert {(s.dtype, s.variant) for s in fwd} == {
        (d, v) for d in (torch.float32, torch.float16, torch.bfloat16) for v in ("all", "none")}
    for s in specs:
        assert set(s.constexprs) <= set(s.kernel.arg_names)
        assert s.types["z_ptr"].startswith("*")
