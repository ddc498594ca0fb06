"""The loss-head Triton kernel (under TRITON_INTERPRET=1 on CPU) against the torch formulas."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the loss-head kernel needs triton")

from apo_kernels.ops.preference_head import HEAD_LOSS_TYPES, preference_head  # noqa: E402
from apo_kernels.sequence import completion_token_weights  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def _packed(b, gen, max_len=40, extreme=False):
    lengths = torch.randint(0, max_len, (2 * b,), generator=gen)
    lengths[0] = max_len + 37  # one segment longer than a block, to cover the loop
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(cu[-1])
    scale = 30.0 if extreme else 2.0
    x = -scale * torch.rand(n, generator=gen)
    ref = x - (scale / 4) * torch.randn(n, generator=gen)
    return x, ref, cu


def _run(backend, x, ref, cu, *, w=None, ref_seq=None, loss_type, beta, dtype=torch.float32, cot=None):
    leaf = x.to(dtype).clone().requires_grad_(True)
    kwargs = dict(cu_seqlens=cu) if x.dim() == 1 else {}
    if ref_seq is None:
        kwargs["ref_token_logps"] = ref
    else:
        kwargs["ref_logps"] = ref_seq
    out = preference_head(leaf, token_weights=w, loss_type=loss_type, beta=beta, backend=backend, **kwargs)
    g_loss, g_seq = cot
    ((out.losses * g_loss).sum() + (out.logps * g_seq).sum()).backward()
    return out, leaf.grad


@pytest.mark.parametrize("loss_type", HEAD_LOSS_TYPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_packed_kernel_matches_torch(loss_type, extreme, gen, poison_empty):
    b = 5
    x, ref, cu = _packed(b, gen, extreme=extreme)
    beta = 0.1 if not extreme else 2.0
    cot = (torch.rand(b, generator=gen), torch.rand(2 * b, generator=gen))
    ours, g_ours = _run("triton", x, ref, cu, loss_type=loss_type, beta=beta, cot=cot)
    want, g_want = _run("torch", x, ref, cu, loss_type=loss_type, beta=beta, cot=cot)
    assert torch.isfinite(ours.losses).all() and torch.isfinite(g_ours).all()
    # Sums of ~100 fp32 terms in a different order differ by ~1e-4 in the extreme case. A pair's
    # loss depends on four sums (policy and reference, chosen and rejected), each off by up to
    # sum_tol, with Lipschitz constants beta (loss) and beta^2 (gradient) in each.
    sum_tol = 2e-4 if extreme else 2e-5
    pair_tol = 4 * sum_tol
    torch.testing.assert_close(ours.logps, want.logps, rtol=1e-6, atol=sum_tol)
    torch.testing.assert_close(ours.ref_logps, want.ref_logps, rtol=1e-6, atol=sum_tol)
    torch.testing.assert_close(ours.losses, want.losses, rtol=1e-5, atol=beta * pair_tol + 1e-6)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-5, atol=beta * beta * pair_tol + 1e-6)


@pytest.mark.parametrize("loss_type", HEAD_LOSS_TYPES)
def test_padded_weighted_precomputed_ref(loss_type, gen, poison_empty):
    """Padded [2B, T] with mean + LD-DPO weights, a NaN at every masked position, and the
    reference given as sequence values."""
    b, t = 3, 21
    mask = torch.rand(2 * b, t, generator=gen) > 0.3
    mask[1] = False  # a sequence with no completion token: log-prob 0, finite loss
    w, _ = completion_token_weights(mask, reduction="mean", ld_alpha=0.4)
    x = -3 * torch.rand(2 * b, t, generator=gen)
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    ref_seq = -20 * torch.rand(2 * b, generator=gen)
    cot = (torch.rand(b, generator=gen), torch.zeros(2 * b))
    ours, g_ours = _run("triton", x, None, None, w=w, ref_seq=ref_seq, loss_type=loss_type, beta=0.5, cot=cot)
    want, g_want = _run("torch", x, None, None, w=w, ref_seq=ref_seq, loss_type=loss_type, beta=0.5, cot=cot)
    assert torch.isfinite(ours.losses).all()
    assert ours.logps[1] == 0
    torch.testing.assert_close(ours.losses, want.losses, rtol=1e-5, atol=1e-6)
    g_want = torch.nan_to_num(g_want, nan=0.0)  # torch's where() gives 0 there too; be explicit
    torch.testing.assert_close(g_ours, g_want, rtol=1e-5, atol=1e-7)
    assert (g_ours[~mask] == 0).all()


def test_bf16_tokens_grad_in_bf16(gen, poison_empty):
    b = 4
    x, ref, cu = _packed(b, gen)
    cot = (torch.ones(b) / b, torch.zeros(2 * b))
    ours, g = _run("triton", x, ref, cu, loss_type="apo_zero", beta=0.1, dtype=torch.bfloat16, cot=cot)
    want, g_want = _run("torch", x, ref, cu, loss_type="apo_zero", beta=0.1, dtype=torch.bfloat16, cot=cot)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(ours.losses, want.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), g_want.float(), rtol=1e-2, atol=1e-6)


def test_head_matches_preference_loss_formula(gen):
    """Closing the loop: kernel loss == losses.preference_loss on explicitly summed sequences."""
    from apo_kernels.losses import preference_loss

    b = 3
    x, ref, cu = _packed(b, gen)
    seq = torch.stack([x[cu[i]:cu[i + 1]].double().sum() for i in range(2 * b)])
    seq_ref = torch.stack([ref[cu[i]:cu[i + 1]].double().sum() for i in range(2 * b)])
    for loss_type in HEAD_LOSS_TYPES:
        out = preference_head(x, cu_seqlens=cu, ref_token_logps=ref, loss_type=loss_type, beta=0.3, backend="triton")
        want = preference_loss(seq[:b], seq[b:], seq_ref[:b], seq_ref[b:], loss_type=loss_type, beta=0.3)
        torch.testing.assert_close(out.losses.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="ipo"), "valid loss types"),
        (dict(beta=0.0), "beta"),
        (dict(backend="cuda"), "backend"),
        (dict(ref_logps=torch.zeros(4)), "exactly one"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4, 6])), "2B"),
        (dict(cu_seqlens=torch.tensor([0, 2, 3, 9, 6])), "cu_seqlens"),
    ],
)
def test_bad_input(kwargs, match):
    x = torch.zeros(6)
    base = dict(cu_seqlens=torch.tensor([0, 1, 3, 4, 6]), ref_token_logps=torch.zeros(6))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        preference_head(x, **base)


def test_triton_rejects_reference_with_grad():
    x = torch.zeros(4)
    ref = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="constants"):
        preference_head(x, cu_seqlens=torch.tensor([0, 2, 4]), ref_token_logps=ref, backend="triton")
    # auto falls back to the torch path, which differentiates the reference too.
    out = preference_head(x, cu_seqlens=torch.tensor([0, 2, 4]), ref_token_logps=ref)
    out.losses.sum().backward()
    assert ref.grad is not None
