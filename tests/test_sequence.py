"""Sequence log-probs: padded and packed layouts, sum/mean, LD-DPO weighting, WPO weights."""

from __future__ import annotations

import pytest
import torch

from apo_kernels.sequence import (
    completion_token_weights,
    cu_seqlens_from_seq_ids,
    packed_sequence_logps,
    padded_sequence_logps,
    seq_ids_from_cu_seqlens,
    split_pairs,
    wpo_pair_weights,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def _padded_batch(b, t, gen, allow_empty=True):
    """[2B, T] log-probs (NaN at padded positions, to prove they never leak) and a mask with a
    prompt prefix, a completion run and right padding."""
    mask = torch.zeros(2 * b, t, dtype=torch.bool)
    for i in range(2 * b):
        s = int(torch.randint(0, t // 2, (), generator=gen))
        e = int(torch.randint(s if allow_empty else s + 1, t + 1, (), generator=gen))
        mask[i, s:e] = True
    x = -5 * torch.rand(2 * b, t, generator=gen)
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    return x, mask


def _loop_reference(x, mask, reduction="sum", ld_alpha=None):
    """Plain Python loops over rows and tokens, float64."""
    rows = x.shape[0]
    b = rows // 2
    lengths = [int(mask[i].sum()) for i in range(rows)]
    out = []
    for i in range(rows):
        pair_other = i + b if i < b else i - b
        shared = min(lengths[i], lengths[pair_other])
        total, k = 0.0, 0
        for j in range(x.shape[1]):
            if mask[i, j]:
                k += 1
                w = 1.0 if (ld_alpha is None or k <= shared) else ld_alpha
                total += w * float(x[i, j])
        if reduction == "mean":
            total /= max(lengths[i], 1)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(lengths)


def _pack(x, mask):
    """Padded -> packed: keep each row's tokens from its first to its last position (prompt and
    completion alike; padding after the completion dropped), concatenated in row order."""
    toks, masks, counts = [], [], []
    for i in range(x.shape[0]):
        keep = int(mask[i].nonzero().max()) + 1 if mask[i].any() else int(torch.randint(0, 3, ()))
        toks.append(x[i, :keep])
        masks.append(mask[i, :keep])
        counts.append(keep)
    cu = torch.tensor([0] + counts).cumsum(0)
    return torch.cat(toks), torch.cat(masks), cu


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.35, 1.0])
def test_padded_and_packed_match_loops(reduction, ld_alpha, gen):
    x, mask = _padded_batch(5, 13, gen)
    want, want_len = _loop_reference(x, mask, reduction, ld_alpha)
    got = padded_sequence_logps(x, mask, reduction=reduction, ld_alpha=ld_alpha)
    assert got.logps.dtype == torch.float32
    torch.testing.assert_close(got.logps.double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(got.lengths, want_len)
    flat, fmask, cu = _pack(x, mask)
    by_cu = packed_sequence_logps(flat, cu_seqlens=cu, mask=fmask, reduction=reduction, ld_alpha=ld_alpha)
    ids = seq_ids_from_cu_seqlens(cu, flat.numel())
    by_ids = packed_sequence_logps(
        flat, seq_ids=ids, mask=fmask, num_seqs=cu.numel() - 1, reduction=reduction, ld_alpha=ld_alpha
    )
    for packed in (by_cu, by_ids):
        torch.testing.assert_close(packed.logps, got.logps, rtol=1e-6, atol=1e-5)
        assert torch.equal(packed.lengths, got.lengths)


def test_ld_alpha_limits(gen):
    x, mask = _padded_batch(4, 11, gen)
    plain = padded_sequence_logps(x, mask).logps
    torch.testing.assert_close(padded_sequence_logps(x, mask, ld_alpha=1.0).logps, plain)
    # ld_alpha = 0: both sides truncated to the shared length -> the shorter side is unchanged.
    lengths = mask.sum(1)
    lc, lr = split_pairs(lengths)
    trunc = padded_sequence_logps(x, mask, ld_alpha=0.0).logps
    shorter = torch.cat([lc <= lr, lr <= lc])
    torch.testing.assert_close(trunc[shorter], plain[shorter])


def test_gradient_is_the_token_weight(gen):
    x, mask = _padded_batch(3, 9, gen, allow_empty=False)
    x = torch.nan_to_num(x, nan=0.0).requires_grad_(True)
    out = padded_sequence_logps(x, mask, reduction="mean", ld_alpha=0.5)
    g = torch.rand(out.logps.shape, generator=gen)
    (out.logps * g).sum().backward()
    w, _ = completion_token_weights(mask, reduction="mean", ld_alpha=0.5)
    torch.testing.assert_close(x.grad, w * g[:, None])


def test_empty_completion_is_zero_and_finite(gen):
    x, mask = _padded_batch(2, 6, gen)
    mask[1] = False  # chosen sequence 1 has no completion token
    for reduction in ("sum", "mean"):
        out = padded_sequence_logps(x, mask, reduction=reduction, ld_alpha=0.5)
        assert out.logps[1] == 0 and out.lengths[1] == 0
        assert torch.isfinite(out.logps).all()


def test_bf16_tokens_summed_in_fp32(gen):
    x = -torch.rand(2, 4096, generator=gen)
    mask = torch.ones_like(x, dtype=torch.bool)
    got = padded_sequence_logps(x.to(torch.bfloat16), mask).logps
    assert got.dtype == torch.float32
    want = x.to(torch.bfloat16).double().sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)


def test_wpo_weights(gen):
    x, mask = _padded_batch(3, 8, gen, allow_empty=False)
    x = torch.nan_to_num(x, nan=0.0)
    lsp = -torch.rand_like(x)
    w = wpo_pair_weights(x, lsp, mask)
    per_seq = torch.stack(
        [torch.exp(((x[i] - lsp[i]) * mask[i]).sum() / mask[i].sum().clamp(min=1)) for i in range(6)]
    )
    torch.testing.assert_close(w, per_seq[:3] * per_seq[3:])


def test_cu_seqlens_round_trip():
    ids = torch.tensor([0, 0, 1, 3, 3, 3])
    cu = cu_seqlens_from_seq_ids(ids, num_seqs=4)
    assert cu.tolist() == [0, 2, 3, 3, 6]
    assert torch.equal(seq_ids_from_cu_seqlens(cu, 6), ids)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: padded_sequence_logps(torch.zeros(3, 4), torch.ones(3, 4)), "even number of rows"),
        (lambda: padded_sequence_logps(torch.zeros(4, 4), torch.ones(4, 5)), "mask"),
        (lambda: padded_sequence_logps(torch.zeros(4, 4), torch.ones(4, 4), reduction="max"), "reduction"),
        (lambda: padded_sequence_logps(torch.zeros(4, 4), torch.ones(4, 4), ld_alpha=1.5), "ld_alpha"),
        (lambda: packed_sequence_logps(torch.zeros(5), cu_seqlens=torch.tensor([0, 2, 4])), "cu_seqlens"),
        (lambda: packed_sequence_logps(torch.zeros(5), cu_seqlens=torch.tensor([0, 3, 2, 5])), "cu_seqlens"),
        (lambda: packed_sequence_logps(torch.zeros(5), cu_seqlens=torch.tensor([0, 2, 5])), None),
        (lambda: packed_sequence_logps(torch.zeros(4), cu_seqlens=torch.tensor([0, 1, 2, 4])), "2B"),
        (lambda: packed_sequence_logps(torch.zeros(4), seq_ids=torch.tensor([0, 1, 0, 1])), "seq_ids"),
        (lambda: packed_sequence_logps(torch.zeros(4)), "cu_seqlens"),
        (lambda: split_pairs(torch.zeros(5), "chosen_logps"), "chosen_logps"),
    ],
)
def test_bad_layouts_raise(call, match):
    if match is None:  # a valid call, to prove the others fail for the stated reason
        call()
        return
    with pytest.raises(ValueError, match=match):
        call()
