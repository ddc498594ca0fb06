"""FusedLinearPreferenceLoss against the ordinary computation (full logits, log_softmax, gather,
sum, formula), in float64 as the oracle and in the input dtype as the baseline:
``|ours - oracle| <= |baseline - oracle| + tol * max|oracle|`` elementwise."""

from __future__ import annotations

import pytest
import torch

from apo_kernels.losses import preference_loss
from apo_kernels.preference import FusedLinearPreferenceLoss, fused_linear_preference_loss

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TRL_METRICS = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "nll",
}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def _problem(gen, b=2, t=9, d=48, v=509, dtype=torch.float32, bias=False, ref_d=None, peaked=False):
    """A padded batch: prompt positions ignored, ragged right padding, one near-empty row."""
    rows = 2 * b
    h = torch.randn(rows, t, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * (1.5 if peaked else 0.3) / d**0.5 * 4
    labels = torch.randint(0, v, (rows, t), generator=gen)
    for i in range(rows):
        start = int(torch.randint(1, 4, (), generator=gen))
        end = int(torch.randint(start + 1, t + 1, (), generator=gen))
        labels[i, :start] = -100
        labels[i, end:] = -100
    rd = ref_d or d
    ref_h = torch.randn(rows, t, rd, generator=gen)
    ref_w = torch.randn(v, rd, generator=gen) * 0.3 / rd**0.5 * 4
    bb = 0.5 * torch.randn(v, generator=gen) if bias else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(w), labels, cast(bb), cast(ref_h), cast(ref_w)


def _ordinary(h, w, labels, bias, ref_h, ref_w, *, dtype, scale=1.0, softcap=None, temp=1.0, **loss_kw):
    """Full [rows, T, V] logits in `dtype` (float64: the oracle), log_softmax in >= fp32."""

    def logits(hh, ww, bb):
        z = hh.to(dtype) @ ww.to(dtype).T
        if bb is not None:
            z = z + bb.to(dtype)
        z = z * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return (z / temp).to(torch.promote_types(dtype, torch.float32))

    mask = labels != -100
    safe = labels.clamp(min=0)
    z = logits(h, w, bias)
    logsm = torch.log_softmax(z, -1)
    tok = torch.where(mask, logsm.gather(-1, safe[..., None])[..., 0], torch.zeros((), dtype=z.dtype))
    with torch.no_grad():
        ref_tok = torch.where(mask, torch.log_softmax(logits(ref_h, ref_w, None), -1).gather(-1, safe[..., None])[..., 0], 0.0)
    seq, ref = tok.sum(1), ref_tok.sum(1)
    b = seq.shape[0] // 2
    lengths = mask.sum(1)
    losses = preference_loss(seq[:b], seq[b:], ref[:b], ref[b:], chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **loss_kw)
    p = logsm.exp()
    chosen = mask.clone()
    chosen[b:] = False
    beta = loss_kw.get("beta", 0.1)
    cr, rr = beta * (seq[:b] - ref[:b]), beta * (seq[b:] - ref[b:])
    metrics = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).double().mean(), "logps/chosen": seq[:b].mean(), "logps/rejected": seq[b:].mean(),
        "logits/chosen": z.mean(-1)[chosen].mean(), "logits/rejected": z.mean(-1)[mask & ~chosen].mean(),
        "entropy": (-(p * logsm).sum(-1))[mask].mean(), "nll": -tok[chosen].mean(),
        "mean_token_accuracy": (z.argmax(-1) == safe)[chosen].double().mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def _grads(loss, leaves):
    gs = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    it = iter(gs)
    return [None if x is None else next(it) for x in leaves]


def _assert_rule(name, ours, base, oracle, dtype, scale=None):
    """``scale``: the magnitude the rounding comes from, when the result is a small difference
    of large numbers (a reward is beta * (logp - ref_logp) with |logp| ~ 50)."""
    ours, base, oracle = ours.double(), base.double(), oracle.double()
    assert torch.isfinite(ours).all(), name
    scale = max(float(oracle.abs().max()), 1e-6) if scale is None else scale
    allowed = (base - oracle).abs() + TOL[dtype] * scale
    excess = (ours - oracle).abs() - allowed
    assert float(excess.max()) <= 0, f"{name}: max |ours - oracle| = {float((ours - oracle).abs().max()):.3g}, allowed {float(allowed.max()):.3g}"


CASES = [
    # (loss_type, dtype, bias, softcap, temperature, logit_scale)
    ("apo_zero", torch.float32, False, None, 1.0, 1.0),
    ("apo_down", torch.float32, True, 30.0, 0.7, 1.0),
    ("sigmoid", torch.float32, True, None, 1.0, 0.5),
    ("ipo", torch.float32, False, 10.0, 1.0, 1.0),
    (["sigmoid", "sft"], torch.float32, True, None, 1.0, 1.0),
    ("apo_zero", torch.bfloat16, True, 30.0, 1.0, 1.0),
    ("sigmoid", torch.bfloat16, False, None, 1.0, 1.0),
    ("robust", torch.bfloat16, True, None, 1.0, 1.0),
]


@pytest.mark.parametrize("loss_type, dtype, bias, softcap, temp, scale", CASES)
def test_matches_ordinary_computation(loss_type, dtype, bias, softcap, temp, scale, gen):
    beta = 0.5
    h, w, labels, bb, ref_h, ref_w = _problem(gen, dtype=dtype, bias=bias)
    eps = 0.1 if loss_type == "robust" else 0.0
    loss_kw = dict(loss_type=loss_type, beta=beta, label_smoothing=eps)
    tf = dict(scale=scale, softcap=softcap, temp=temp)

    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w)] + [None if bb is None else bb.detach().clone().requires_grad_(True)]
    ours = fused_linear_preference_loss(
        leaves[0], leaves[1], labels, leaves[2], ref_hidden=ref_h, ref_weight=ref_w,
        logit_scale=scale, softcap=softcap, temperature=temp, **loss_kw,
    )
    g_ours = _grads(ours.loss, leaves)

    def run(dt):
        lv = [None if x is None else x.detach().to(dt if dt == torch.float64 else x.dtype).requires_grad_(True) for x in (h, w, bb)]
        loss, metrics = _ordinary(lv[0], lv[1], labels, lv[2], ref_h, ref_w, dtype=dt, **tf, **loss_kw)
        return loss, metrics, _grads(loss, lv)

    oracle, m_oracle, g_oracle = run(torch.float64)
    base, m_base, g_base = run(dtype)
    _assert_rule("loss", ours.loss.detach(), base.detach(), oracle.detach(), dtype)
    for name, go, gb, gr in zip(("dH", "dW", "dbias"), g_ours, g_base, g_oracle):
        if gr is None:
            continue
        assert go.dtype == dtype, name
        _assert_rule(name, go, gb, gr, dtype)
    assert TRL_METRICS <= set(ours.metrics)
    for k in TRL_METRICS:
        if dtype == torch.bfloat16 and k in ("rewards/accuracies", "mean_token_accuracy"):
            continue  # a near-tie may flip in bf16: compare only continuous metrics there
        scale = None
        if k.startswith("rewards/"):
            scale = beta * max(abs(float(m_oracle["logps/chosen"])), abs(float(m_oracle["logps/rejected"])))
        elif k.startswith("logits/"):
            scale = 1.0  # a mean of O(1) logits that nearly cancel: rounding scales with the logits
        _assert_rule(k, ours.metrics[k], m_base[k], m_oracle[k], dtype, scale)


def _pack(h, labels, ref_h, gen):
    """Padded -> packed: drop a random part of each row's right padding, concatenate rows."""
    keep = []
    for i in range(labels.shape[0]):
        last = int((labels[i] != -100).nonzero().max()) + 1
        keep.append(int(torch.randint(last, labels.shape[1] + 1, (), generator=gen)))
    idx = torch.cat([i * labels.shape[1] + torch.arange(k) for i, k in enumerate(keep)])
    cu = torch.tensor([0] + keep).cumsum(0)
    flat = lambda x: x.reshape(-1, x.shape[-1])[idx]  # noqa: E731
    return flat(h), labels.reshape(-1)[idx], flat(ref_h), cu, idx


@pytest.mark.parametrize("loss_type, ld_alpha, reduction", [("apo_zero", None, "sum"), ("apo_down", 0.5, "mean"), ("sigmoid_norm", None, "sum")])
def test_padded_and_packed_agree(loss_type, ld_alpha, reduction, gen):
    h, w, labels, bb, ref_h, ref_w = _problem(gen, bias=True)
    kw = dict(loss_type=loss_type, beta=0.3, ld_alpha=ld_alpha, reduction=reduction, ref_weight=ref_w)
    hp = h.clone().requires_grad_(True)
    wp = w.clone().requires_grad_(True)
    padded = fused_linear_preference_loss(hp, wp, labels, bb, ref_hidden=ref_h, **kw)
    g_h, g_w = torch.autograd.grad(padded.loss, [hp, wp])
    ph, pl, pref, cu, idx = _pack(h, labels, ref_h, gen)
    ph = ph.clone().requires_grad_(True)
    wq = w.clone().requires_grad_(True)
    seq_ids = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    for bounds in (dict(cu_seqlens=cu), dict(seq_ids=seq_ids)):
        packed = fused_linear_preference_loss(ph, wq, pl, bb, ref_hidden=pref, **bounds, **kw)
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-5, atol=1e-6)
        for k in padded.metrics:
            torch.testing.assert_close(packed.metrics[k], padded.metrics[k], rtol=1e-5, atol=1e-6)
        gp_h, gp_w = torch.autograd.grad(packed.loss, [ph, wq])
        torch.testing.assert_close(gp_h, g_h.reshape(-1, g_h.shape[-1])[idx], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gp_w, g_w, rtol=1e-5, atol=1e-7)


def test_precomputed_reference_equals_reference_hidden(gen):
    h, w, labels, bb, ref_h, ref_w = _problem(gen, ref_d=32)
    fn = FusedLinearPreferenceLoss("apo_down", beta=0.2)
    a = fn(h, w, labels, ref_hidden=ref_h, ref_weight=ref_w)
    b = fn(h, w, labels, ref_chosen_logps=a.ref_chosen_logps, ref_rejected_logps=a.ref_rejected_logps)
    torch.testing.assert_close(a.losses, b.losses)
    assert not a.ref_chosen_logps.requires_grad


def test_reference_without_its_own_head_shares_the_policy_bias(gen):
    """ref_weight=None means the reference uses the policy's head: weight and bias."""
    h, w, labels, bb, ref_h, _ = _problem(gen, bias=True)
    shared = fused_linear_preference_loss(h, w, labels, bb, ref_hidden=ref_h)
    explicit = fused_linear_preference_loss(h, w, labels, bb, ref_hidden=ref_h, ref_weight=w, ref_bias=bb)
    no_bias = fused_linear_preference_loss(h, w, labels, bb, ref_hidden=ref_h, ref_weight=w)
    torch.testing.assert_close(shared.ref_chosen_logps, explicit.ref_chosen_logps)
    assert not torch.allclose(shared.ref_chosen_logps, no_bias.ref_chosen_logps)


def test_triton_backend_under_interpreter(gen, poison_empty):
    """The whole path on the Triton kernels (op + loss head) under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    h, w, labels, bb, ref_h, ref_w = _problem(gen, b=2, t=6, d=32, v=131, bias=True)
    res = {}
    for backend in ("torch", "triton"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fused_linear_preference_loss(
            hh, ww, labels, bb, ref_hidden=ref_h, ref_weight=ref_w, loss_type="apo_zero", beta=0.5,
            softcap=20.0, backend=backend, filter_eps=None,
        )
        res[backend] = (out, *torch.autograd.grad(out.loss, [hh, ww]))
    (a, ah, aw), (b, bh, bw) = res["torch"], res["triton"]
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bh, ah, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bw, aw, rtol=1e-4, atol=1e-6)
    for k in a.metrics:
        torch.testing.assert_close(b.metrics[k], a.metrics[k], rtol=1e-4, atol=1e-5)


def test_sequence_without_completion_is_finite(gen):
    h, w, labels, bb, ref_h, ref_w = _problem(gen)
    labels[1] = -100  # chosen sequence 1: no completion token
    for loss_type in ("apo_zero", "sigmoid_norm", "ipo", ["sigmoid", "sft"]):
        hh = h.clone().requires_grad_(True)
        out = fused_linear_preference_loss(hh, w, labels, ref_hidden=ref_h, ref_weight=ref_w, loss_type=loss_type)
        assert torch.isfinite(out.loss) and out.chosen_logps[1] == 0
        (g,) = torch.autograd.grad(out.loss, [hh])
        assert torch.isfinite(g).all() and (g[1] == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("case, match", [
    ("odd_rows", "even number of rows"),
    ("ref_count", "ref_rejected_logps"),
    ("packed_odd", "chosen and rejected"),
    ("no_valid_label", "labels"),
    ("beta_zero", "beta"),
    ("beta_negative", "beta"),
    ("no_reference", "reference"),
    ("both_references", "reference"),
    ("ref_shape", "ref_hidden"),
    ("bad_loss", "valid loss types"),
])
def test_bad_input(case, match, gen):
    h, w, labels, bb, ref_h, ref_w = _problem(gen)
    kw = dict(ref_hidden=ref_h, ref_weight=ref_w)
    args = [h, w, labels]
    if case == "odd_rows":
        args = [h[:3], w, labels[:3]]
        kw["ref_hidden"] = ref_h[:3]
    elif case == "ref_count":
        kw = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(3))
    elif case == "packed_odd":
        n = h.shape[1] * 3
        args = [h[:3].reshape(n, -1), w, labels[:3].reshape(n)]
        kw = dict(ref_hidden=ref_h[:3].reshape(n, -1), ref_weight=ref_w, cu_seqlens=torch.tensor([0, 9, 18, n]))
    elif case == "no_valid_label":
        args[2] = torch.full_like(labels, -100)
    elif case == "beta_zero":
        kw["beta"] = 0.0
    elif case == "beta_negative":
        kw["beta"] = -0.1
    elif case == "no_reference":
        kw = {}
    elif case == "both_references":
        kw.update(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    elif case == "ref_shape":
        kw["ref_hidden"] = ref_h[:, :-1]
    elif case == "bad_loss":
        kw["loss_type"] = "dpo"
    with pytest.raises(ValueError, match=match):
        fused_linear_preference_loss(*args, **kw)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="beta"):
        FusedLinearPreferenceLoss(beta=0)
    with pytest.raises(ValueError, match="valid loss types"):
        FusedLinearPreferenceLoss("apo")
    with pytest.raises(ValueError, match="ld_alpha"):
        FusedLinearPreferenceLoss(ld_alpha=2.0)
    assert "apo_zero" in repr(FusedLinearPreferenceLoss())


def test_check_preference_rows_and_can_fail(monkeypatch):
    from apo_kernels.commands import check_preference as cp

    rows = cp.check_preference(dtypes=("float32",), loss_types=("apo_zero", "sigmoid_norm"), seed=None)
    assert {r["name"] for r in rows} == {f"{lt}/float32/{q}" for lt in ("apo_zero", "sigmoid_norm") for q in ("loss", "dH", "dW", "dbias")}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    real = cp.fused_linear_preference_loss

    def off_by_a_little(*args, **kwargs):  # a 0.1% temperature error must be caught
        kwargs["temperature"] = kwargs.get("temperature", 1.0) * 1.001
        return real(*args, **kwargs)

    monkeypatch.setattr(cp, "fused_linear_preference_loss", off_by_a_little)
    rows = cp.check_preference(dtypes=("float32",), loss_types=("apo_zero",))
    assert not all(r["passed"] for r in rows)


def test_tiny_llama_end_to_end(gen):
    """The README example on a tiny random Llama: fused loss == loss from the model's own logits."""
    transformers = pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    policy, ref_model = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    b, t = 2, 10
    input_ids = torch.randint(0, 97, (2 * b, t), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 4:] = 1
    completion_mask[1, 8:] = 0  # shorter chosen completion (right padding)
    attention_mask[1, 8:] = 0

    hidden = policy.model(input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    res = FusedLinearPreferenceLoss("apo_zero", beta=0.1)(
        hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_model.lm_head.weight
    )
    (g_ours,) = torch.autograd.grad(res.loss, [policy.lm_head.weight])

    def seq_logps(model):
        logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (tok * (labels != -100)).sum(1)

    pol = seq_logps(policy)
    with torch.no_grad():
        ref = seq_logps(ref_model)
    want = preference_loss(pol[:b], pol[b:], ref[:b], ref[b:], loss_type="apo_zero", beta=0.1).mean()
    (g_want,) = torch.autograd.grad(want, [policy.lm_head.weight])
    torch.testing.assert_close(res.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-4, atol=1e-7)
