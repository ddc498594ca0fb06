"""linear_logprobs against the float64 oracle, by DESIGN.md's rule, on both backends.

The Triton backend runs its real kernels under Triton's interpreter on CPU (conftest sets
TRITON_INTERPRET=1); shapes are odd so every tile has a ragged edge, and fresh random inputs
are drawn for each case.
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import linear_logprobs
from apo_kernels.verify import assert_close_by_rule, make_inputs, oracle_and_same_dtype

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRANSFORMS = {
    "plain": dict(),
    "softcap": dict(softcap=5.0),
    "temp_scale": dict(temperature=0.7, logit_scale=1.6),
    "all": dict(softcap=8.0, temperature=1.3, logit_scale=0.8),
}


def _run_case(backend, dtype, transform, *, n=37, d=48, v=509, bias=False, peaked=False,
              entropy=False, stats=False, filter_eps="auto", deterministic=False,
              ignore_frac=0.25, grads=("hidden", "weight", "bias"), batch_shape=None):
    hidden, weight, labels, b = make_inputs(n, d, v, dtype, bias=bias, peaked=peaked,
                                            ignore_frac=ignore_frac, batch_shape=batch_shape)
    leaves = {"hidden": hidden, "weight": weight, "bias": b}
    for name, t in leaves.items():
        if t is not None and name in grads:
            t.requires_grad_()
    out = linear_logprobs(hidden, weight, labels, b, return_entropy=entropy, return_stats=stats,
                          filter_eps=filter_eps, deterministic=deterministic, backend=backend,
                          **transform)
    logp = out if not (entropy or stats) else out.logprobs
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    grad_logp = torch.randn(labels.shape)
    grad_entropy = torch.randn(labels.shape) if entropy else None
    loss = (logp * grad_logp).sum() + ((out.entropy * grad_entropy).sum() if entropy else 0)
    wanted = [k for k, t in leaves.items() if t is not None and t.requires_grad]
    ours_grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[k] for k in wanted])))
    oracle, same = oracle_and_same_dtype(hidden, weight, labels, b, grad_logp, grad_entropy, **transform)

    keep = labels != -100
    assert (logp[~keep] == 0).all()
    assert_close_by_rule("logp", logp, oracle["logp"], same["logp"], dtype)
    if entropy:
        assert_close_by_rule("entropy", out.entropy, oracle["entropy"], same["entropy"], dtype)
    if stats:
        assert_close_by_rule("mean_logit", out.mean_logit, oracle["mean_logit"], same["mean_logit"], dtype)
        assert_close_by_rule("log_sum_p2", out.log_sum_p2, oracle["log_sum_p2"], same["log_sum_p2"], dtype)
        # The arg-max may legitimately differ where the top two logits are within rounding.
        disagree = out.is_top1 != oracle["is_top1"]
        assert not (disagree & (same["is_top1"] == oracle["is_top1"]) & (dtype == torch.float32)).any()
        assert disagree.float().mean() <= (0.05 if dtype != torch.float32 else 0.0)
    for name, g in ours_grads.items():
        assert g.dtype == leaves[name].dtype, f"grad of {name} has dtype {g.dtype}"
        assert_close_by_rule(f"d{name}", g, oracle["grads"][name], same["grads"][name], dtype)
    if "hidden" in ours_grads:
        assert (ours_grads["hidden"].reshape(-1, d)[~keep.reshape(-1)] == 0).all()
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=str)
def test_values_and_gradients(backend, dtype, transform, poison_empty):
    _run_case(backend, dtype, TRANSFORMS[transform], bias=transform != "plain",
              entropy=transform in ("softcap", "all"), stats=transform == "all")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_peaked_logits_with_default_filter(dtype, deterministic, poison_empty):
    """Peaked logits are where the filter skips tiles (fp16/bf16 defaults; fp32 is exact).
    Only the Triton backend filters; the torch backend is covered by the other cases."""
    _run_case("triton", dtype, {}, peaked=True, bias=True, entropy=True, stats=True,
              deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_exact_mode_and_filter_is_active(deterministic):
    """filter_eps=None is exact; the largest filter_eps visibly drops gradient and skips tiles
    (so the filter path really runs), but never a tile holding a label; both modes agree."""
    from apo_kernels import count_skipped_tiles

    torch.manual_seed(1)
    hidden, weight, labels, _ = make_inputs(40, 32, 300, torch.float32)  # flat: p ~ 1/300
    top = 1 - 2.0**-10  # filter_eps must lie in [0, 1)
    grads, skipped = {}, {}
    for eps in (None, 0.0, top):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = linear_logprobs(h, w, labels, backend="triton", filter_eps=eps, deterministic=deterministic)
        with count_skipped_tiles() as stats:
            grads[eps] = torch.autograd.grad(logp.sum(), [h, w])
        skipped[eps] = stats.skipped_fraction
    torch.testing.assert_close(grads[None][0], grads[0.0][0], rtol=0, atol=1e-6)
    assert skipped[None] == 0 and skipped[top] > 0
    assert (grads[None][0] - grads[top][0]).abs().max() > 1e-2
    # That the label term survives the top of the range: tests/test_filter_eps.py.


def test_deterministic_backward_is_bitwise_reproducible():
    hidden, weight, labels, b = make_inputs(45, 40, 260, torch.float32, bias=True, peaked=True)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        logp = linear_logprobs(leaves[0], leaves[1], labels, leaves[2], backend="triton",
                               deterministic=True, softcap=10.0)
        runs.append(torch.autograd.grad((logp * torch.linspace(-1, 1, 45)).sum(), leaves))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grads", [("hidden",), ("weight",), ("bias",), ("weight", "bias")], ids=str)
def test_only_some_inputs_require_grad(backend, grads):
    _run_case(backend, torch.float32, {"softcap": 6.0}, bias=True, entropy=True, grads=grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_shapes_and_entropy_only_gradient(backend):
    """[B, T, D] inputs; a loss on the entropy alone still back-propagates."""
    hidden, weight, labels, _ = make_inputs(3 * 11, 24, 130, torch.float32, batch_shape=(3, 11))
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight, labels, return_entropy=True, backend=backend)
    assert out.logprobs.shape == (3, 11) and out.entropy.shape == (3, 11)
    (grad,) = torch.autograd.grad(out.entropy.sum(), [h])
    hd = hidden.double().requires_grad_()
    from apo_kernels.reference import oracle_linear_logprobs

    (ref,) = torch.autograd.grad(oracle_linear_logprobs(hd, weight.double(), labels)["entropy"].sum(), [hd])
    torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_on_split_and_unsplit_vocab(backend):
    """Few tokens -> the vocabulary is split across programs and merged; many -> one split.
    Both must match the oracle (the interpreter's split target is 8 programs)."""
    for n in (3, 150):
        _run_case(backend, torch.float32, {}, n=n, d=20, v=700, stats=True, entropy=True, ignore_frac=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_preskip_from_forward_tile_max_is_exact_and_skips_recomputes(dtype):
    """The backward's pre-skip (from the forward's per-tile max logits) only drops tiles the
    filter would drop after recomputing them: gradients are bitwise those of the plain filter,
    and on peaked logits some tiles are skipped before any recompute."""
    from apo_kernels import count_skipped_tiles

    # V large next to a 16-token block: most vocabulary tiles hold no token's peak, so some
    # are provably skippable whatever the draw.
    hidden, weight, labels, bias = make_inputs(70, 40, 2000, dtype, peaked=True, bias=True,
                                               ignore_frac=0.2)
    g = torch.randn(70)
    grads, stats = {}, {}
    for record in (True, False):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with count_skipped_tiles() as st:
            out = torch.ops.apo_kernels.linear_logprobs_fwd(
                *leaves[:2], labels, leaves[2], -100, 1.0, 20.0, 1.0, False, False, "triton",
                2.0**-12, False, record)
            (out[0] * g).sum().backward()
        grads[record], stats[record] = [t.grad for t in leaves], st
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
    assert stats[True].tiles == stats[False].tiles > 0
    assert stats[False].skipped_before_recompute == 0
    assert stats[True].skipped_before_recompute > 0
    assert stats[True].skipped_fraction == stats[False].skipped_fraction


def test_public_call_records_tile_max_only_when_a_filtered_backward_will_run(monkeypatch):
    import sys

    op = sys.modules["apo_kernels.ops.logprobs_passes"]  # the forward's buffers live there
    seen = []
    real = op.tile_max_buffer
    monkeypatch.setattr(op, "tile_max_buffer", lambda h, n, v, record: seen.append(record) or real(h, n, v, record))
    hidden, weight, labels, _ = make_inputs(20, 16, 100, torch.bfloat16)
    linear_logprobs(hidden, weight, labels, backend="triton")                     # no grad needed
    linear_logprobs(hidden.requires_grad_(), weight, labels, backend="triton")    # filtered backward
    linear_logprobs(hidden, weight, labels, backend="triton", filter_eps=None)    # exact
    linear_logprobs(hidden, weight, labels, backend="triton", deterministic=True)  # pre-skip too
    linear_logprobs(hidden, weight, labels, backend="torch")
    assert seen == [False, True, False, True, False]


def test_entropy_asked_as_a_metric_keeps_the_preskip():
    """TRL asks for entropy on every call but never differentiates it: its unused gradient
    must not count as an entropy gradient (which would switch the pre-skip off)."""
    from apo_kernels import count_skipped_tiles

    hidden, weight, labels, _ = make_inputs(40, 32, 2000, torch.float32, peaked=True)
    seen = []
    for entropy in (True, False):
        h = hidden.clone().requires_grad_()
        with count_skipped_tiles() as stats:
            out = linear_logprobs(h, weight, labels, backend="triton", return_entropy=entropy,
                                  filter_eps=2.0**-12)
            (out.logprobs if entropy else out).sum().backward()
        seen.append((stats.tiles, stats.skipped_before_recompute, stats.skipped_after_recompute))
    assert seen[0] == seen[1] and seen[0][1] > 0
