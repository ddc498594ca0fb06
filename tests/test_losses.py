"""Preference losses: against float64 formulas written from the papers, and against TRL 1.16's own
``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` driven by a stub model (no weights).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from apo_kernels.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    preference_loss,
    preference_rewards,
    unpaired_preference_loss,
)

# --------------------------------------------------------------------------------------------
# Independent float64 reference: the formulas as printed in the papers / TRL docs, evaluated
# naively (1 - sigmoid, -log sigmoid, exp * m) in float64, where they do not overflow for the
# ranges used here (|beta * score| < 700).
# --------------------------------------------------------------------------------------------


def _sig(x):
    # torch.sigmoid rather than 1/(1+exp(-x)): same value, but a gradient that is not inf/inf.
    return torch.sigmoid(x)


def _logsig(x):
    return torch.log(_sig(x))


def _scores(r, f_div, alpha):
    if f_div == "reverse_kl":
        return r
    if f_div == "forward_kl":
        return 1.0 - torch.exp(-r)
    if f_div == "js_divergence":
        return torch.log(2.0 * torch.exp(r) / (torch.exp(r) + 1.0))
    if f_div == "alpha_divergence":
        return (torch.exp((alpha - 1.0) * r) - 1.0) / (alpha - 1.0)
    raise AssertionError(f_div)


def reference_loss(pc, pr, rc, rr, lc, lr, *, loss_type, beta, eps=0.0, tau=0.05, f_div="reverse_kl", alpha=0.5):
    """float64 per-pair loss, one loss type."""
    r_w, r_l = pc - rc, pr - rr
    s_w, s_l = _scores(r_w, f_div, alpha), _scores(r_l, f_div, alpha)
    d = s_w - s_l
    b = beta
    if loss_type == "sigmoid":
        return -_logsig(b * d)
    if loss_type == "hinge":
        return torch.clamp(1 - b * d, min=0)
    if loss_type == "ipo":
        return (s_w / lc.clamp(min=1) - s_l / lr.clamp(min=1) - 1 / (2 * b)) ** 2
    if loss_type == "exo_pair":
        qw, ql = _sig(b * d), _sig(-b * d)
        return qw * torch.log(qw / (1 - eps)) + ql * torch.log(ql / eps)
    if loss_type == "nca_pair":
        return -_logsig(b * r_w) - 0.5 * _logsig(-b * r_w) - 0.5 * _logsig(-b * r_l)
    if loss_type == "robust":
        return ((1 - eps) * -_logsig(b * d) - eps * -_logsig(-b * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -_logsig(b * r_w) - _logsig(-b * r_l)
    if loss_type == "sppo_hard":
        return (r_w - 1 / (2 * b)) ** 2 + (r_l + 1 / (2 * b)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:
            delta = torch.sort(r_w).values - torch.sort(r_l).values
        return -(1 - eps) * _logsig(b * delta) - eps * _logsig(-b * delta)
    if loss_type == "apo_zero":
        return (1 - _sig(b * r_w)) + _sig(b * r_l)
    if loss_type == "apo_down":
        return _sig(b * r_w) + (1 - _sig(b * (r_w - r_l)))
    if loss_type == "apo_zero_unpaired":
        return ((1 - _sig(b * r_w)) + _sig(b * r_l)) / 2
    if loss_type == "discopop":
        x = b * d
        m = _sig(x / tau)
        return (1 - m) * -_logsig(x) + m * torch.exp(-x)
    if loss_type == "sft":
        return (-pc.sum() / lc.sum()).expand_as(pc)
    if loss_type == "sigmoid_norm":
        return -_logsig(b * (s_w / lc.clamp(min=1) - s_l / lr.clamp(min=1)))
    raise AssertionError(loss_type)


def _eps_for(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}.get(loss_type, 0.0)


def _random_pairs(b, scale, gen, dtype=torch.float32):
    """Sequence log-probs around -150 with log-ratios spread by `scale` (|r| up to ~3*scale)."""
    pc = -150 + 40 * torch.randn(b, generator=gen)
    pr = -150 + 40 * torch.randn(b, generator=gen)
    rc = pc - scale * torch.randn(b, generator=gen)
    rr = pr - scale * torch.randn(b, generator=gen)
    lc = torch.randint(0, 60, (b,), generator=gen)
    lr = torch.randint(1, 60, (b,), generator=gen)
    return [t.to(dtype) for t in (pc, pr, rc, rr)], lc, lr


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return g


def _loss_and_grads(fn, pc, pr, rc, rr):
    leaves = [t.detach().clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
    out = fn(*leaves)
    # A random cotangent so every per-pair gradient is checked, not only their sum.
    cot = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out * cot).sum().backward()
    # An input a loss does not use (the reference log-probs in `sft`) gets a zero gradient.
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


ALL_PAIRED = [t for t in LOSS_TYPES]


@pytest.mark.parametrize("loss_type", ALL_PAIRED)
@pytest.mark.parametrize("scale", [3.0, 60.0])
def test_each_loss_matches_float64_formula(loss_type, scale, gen):
    beta = [0.05, 0.1, 0.5][int(torch.randint(0, 3, (), generator=gen))]
    (pc, pr, rc, rr), lc, lr = _random_pairs(16, scale, gen)
    eps = _eps_for(loss_type)
    ours, g_ours = _loss_and_grads(
        lambda a, b_, c, d: preference_loss(
            a, b_, c, d, loss_type=loss_type, beta=beta, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr
        ),
        pc, pr, rc, rr,
    )
    ref, g_ref = _loss_and_grads(
        lambda a, b_, c, d: reference_loss(a, b_, c, d, lc.double(), lr.double(), loss_type=loss_type, beta=beta, eps=eps),
        *(t.double() for t in (pc, pr, rc, rr)),
    )
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.isfinite(ours).all()
    # fp32 rounding of r = logp - ref_logp (|logp| ~ 150) is ~1e-5 absolute; losses are Lipschitz
    # in r with constant <= beta * 2|r| for the quadratic ones.
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-5)
    for go, gr in zip(g_ours, g_ref):
        torch.testing.assert_close(go.double(), gr, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("f_div", F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergence_matches_float64_formula(loss_type, f_div, gen):
    alpha = float(torch.empty(()).uniform_(0.2, 0.8, generator=gen))
    (pc, pr, rc, rr), lc, lr = _random_pairs(8, 2.0, gen)
    # The naive float64 formulas hold while |beta * score| < 700: forward_kl's score is
    # 1 - exp(-r), so a 4-sigma draw (r = -8.3, seed 3852) made the reference's -log sigmoid
    # inf (ours stayed finite and right). Keep |r| <= 6.
    rc, rr = pc - (pc - rc).clamp(-6.0, 6.0), pr - (pr - rr).clamp(-6.0, 6.0)
    eps = _eps_for(loss_type)
    kw = dict(loss_type=loss_type, beta=0.3)
    ours, g_ours = _loss_and_grads(
        lambda a, b_, c, d: preference_loss(
            a, b_, c, d, **kw, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
            f_divergence_type=f_div, f_alpha_divergence_coef=alpha,
        ),
        pc, pr, rc, rr,
    )
    ref, g_ref = _loss_and_grads(
        lambda a, b_, c, d: reference_loss(a, b_, c, d, lc.double(), lr.double(), **kw, eps=eps, f_div=f_div, alpha=alpha),
        *(t.double() for t in (pc, pr, rc, rr)),
    )
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    for go, gr in zip(g_ours, g_ref):
        torch.testing.assert_close(go.double(), gr, rtol=1e-3, atol=1e-5)


def test_multi_loss_is_weighted_sum(gen):
    (pc, pr, rc, rr), lc, lr = _random_pairs(12, 5.0, gen)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO
    combo = preference_loss(pc, pr, rc, rr, loss_type=types, loss_weights=weights, chosen_lengths=lc, beta=0.2)
    parts = sum(
        w * preference_loss(pc, pr, rc, rr, loss_type=t, chosen_lengths=lc, beta=0.2) for t, w in zip(types, weights)
    )
    torch.testing.assert_close(combo, parts)
    default_w = preference_loss(pc, pr, rc, rr, loss_type=types[:2], beta=0.2)
    torch.testing.assert_close(
        default_w, sum(preference_loss(pc, pr, rc, rr, loss_type=t, beta=0.2) for t in types[:2])
    )


def test_pair_weights_scale_each_pair(gen):
    (pc, pr, rc, rr), _, _ = _random_pairs(6, 5.0, gen)
    w = torch.rand(6, generator=gen)
    torch.testing.assert_close(
        preference_loss(pc, pr, rc, rr, pair_weights=w), w * preference_loss(pc, pr, rc, rr)
    )


def test_float64_in_float64_out(gen):
    (pc, pr, rc, rr), lc, lr = _random_pairs(4, 5.0, gen, dtype=torch.float64)
    assert preference_loss(pc, pr, rc, rr).dtype == torch.float64
    bf = [t.to(torch.bfloat16) for t in (pc, pr, rc, rr)]
    assert preference_loss(*bf).dtype == torch.float32


def test_extreme_logratios_stay_finite(gen):
    """|r| in the hundreds and beta up to 5: every loss and gradient finite (discopop included,
    where the naive exp(-x) * sigmoid(x / tau) is inf * 0)."""
    b = 32
    r_w = torch.cat([torch.full((8,), 300.0), torch.full((8,), -300.0), 200 * torch.randn(16, generator=gen)])
    r_l = torch.cat([torch.full((8,), -300.0), torch.full((8,), 300.0), 200 * torch.randn(16, generator=gen)])
    pc, pr = -1000 * torch.rand(b, generator=gen), -1000 * torch.rand(b, generator=gen)
    rc, rr = pc - r_w, pr - r_l
    lc, lr = torch.randint(1, 9, (b,), generator=gen), torch.randint(1, 9, (b,), generator=gen)
    for loss_type in LOSS_TYPES:
        for beta in (0.1, 5.0):
            out, grads = _loss_and_grads(
                lambda a, b_, c, d, lt=loss_type, be=beta: preference_loss(
                    a, b_, c, d, loss_type=lt, beta=be, label_smoothing=_eps_for(lt),
                    chosen_lengths=lc, rejected_lengths=lr,
                ),
                pc, pr, rc, rr,
            )
            assert torch.isfinite(out).all(), (loss_type, beta, out)
            for g in grads:
                assert torch.isfinite(g).all(), (loss_type, beta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="dpo"), "valid loss types"),
        (dict(loss_type=["sigmoid", "nope"]), "valid loss types"),
        (dict(loss_type=[]), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="exo_pair", label_smoothing=0.0), "label_smoothing"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="ipo"), "chosen_lengths"),
        (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4)), "rejected_lengths"),
        (dict(loss_type="sft"), "chosen_lengths"),
        (dict(f_divergence_type="kl"), "f_divergence_type"),
        (dict(loss_type="apo_zero", f_divergence_type="forward_kl"), "f_divergence_type"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
        (dict(pair_weights=torch.ones(3)), "pair_weights"),
    ],
)
def test_bad_parameters_raise_naming_the_argument(kwargs, match):
    x = [torch.randn(4) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        preference_loss(*x, **kwargs)


def test_unknown_loss_lists_valid_names():
    x = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError) as e:
        preference_loss(*x, loss_type="orpo")
    for name in LOSS_TYPES:
        assert repr(name) in str(e.value)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="rejected_logps"):
        preference_loss(torch.randn(4), torch.randn(3), torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="chosen_logps"):
        preference_loss(torch.randn(4, 1), torch.randn(4), torch.randn(4), torch.randn(4))


def test_unpaired_matches_formula_and_paired_mean(gen):
    n = 10
    logps, ref = -100 * torch.rand(n, generator=gen), -100 * torch.rand(n, generator=gen)
    desirable = torch.rand(n, generator=gen) > 0.5
    out = unpaired_preference_loss(logps, ref, desirable, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    x = 0.3 * (logps.double() - ref.double())
    want = torch.where(desirable, 1.5 * (1 - _sig(x)), 0.7 * _sig(x))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    # Paired apo_zero_unpaired: mean over B pairs == KTO's mean over 2B completions.
    (pc, pr, rc, rr), _, _ = _random_pairs(5, 10.0, gen)
    paired = preference_loss(pc, pr, rc, rr, loss_type="apo_zero_unpaired", beta=0.3)
    flat = unpaired_preference_loss(
        torch.cat([pc, pr]), torch.cat([rc, rr]), torch.arange(10) < 5, beta=0.3
    )
    torch.testing.assert_close(paired.mean(), flat.mean())
    with pytest.raises(ValueError, match="valid unpaired loss types"):
        unpaired_preference_loss(logps, ref, desirable, loss_type="kto")


def test_rewards_metrics(gen):
    (pc, pr, rc, rr), _, _ = _random_pairs(9, 5.0, gen)
    m = preference_rewards(pc, pr, rc, rr, beta=0.25)
    cr, rrw = 0.25 * (pc - rc), 0.25 * (pr - rr)
    torch.testing.assert_close(m["rewards/chosen"], cr.mean())
    torch.testing.assert_close(m["rewards/margins"], (cr - rrw).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (cr > rrw).float().mean())
    torch.testing.assert_close(m["logps/rejected"], pr.mean())


# --------------------------------------------------------------------------------------------
# TRL 1.16 itself. DPOTrainer/KTOTrainer compute the loss inside `_compute_loss(model, inputs)`;
# we build the trainer object without __init__ (no model, no dataset), give it the attributes
# that method reads, and a stub model whose forward returns fixed per-token log-probs, exactly
# what TRL's fused LM head returns (0 at non-completion positions).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl", reason="TRL parity tests need the trl extra: pip install 'apo-kernels[trl]'")
    import trl

    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"TRL parity tests target TRL 1.16, found {trl.__version__}")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    return DPOTrainer, KTOTrainer


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


class _StubModel:
    training = True

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def _stub_trainer(cls, outputs, **attrs):
    tr = object.__new__(cls)
    stub = _StubModel(outputs)
    tr.__dict__.update(
        model=stub, ref_model=None, precompute_ref_logps=True, accelerator=_Accelerator(),
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, router_aux_loss_coef=0.0,
    )
    tr.__dict__.update(attrs)
    return tr


def _token_batch(b, t, gen, extreme=False):
    """Per-token log-probs [2B, T-1] and a completion mask [2B, T] whose first column (prompt) is 0,
    so TRL's unshifted and shifted completion counts agree."""
    mask = torch.zeros(2 * b, t, dtype=torch.int64)
    for i in range(2 * b):
        start = int(torch.randint(1, t // 2, (), generator=gen))
        end = int(torch.randint(start, t + 1, (), generator=gen))  # may be empty: end == start
        mask[i, start:end] = 1
    shift = mask[:, 1:]
    tok = -torch.rand(2 * b, t - 1, generator=gen) * (40.0 if extreme else 4.0)
    tok = tok * shift  # 0 at non-completion positions, as TRL's fused head returns
    return tok, mask


def _trl_dpo(trainer_cls, tok, mask, ref_c, ref_r, **cfg):
    leaf = tok.clone().requires_grad_(True)
    outputs = SimpleNamespace(
        log_probs=leaf, entropy=torch.rand_like(tok), mean_logits=torch.randn_like(tok),
        is_top1=torch.rand_like(tok) > 0.5, log_sum_sq_probs=-torch.rand_like(tok),
    )
    tr = _stub_trainer(
        trainer_cls, outputs, beta=cfg["beta"], loss_types=list(cfg["loss_type"]),
        loss_weights=cfg.get("loss_weights") or [1.0] * len(cfg["loss_type"]), ld_alpha=cfg.get("ld_alpha"),
        f_divergence_type=cfg.get("f_div", "reverse_kl"), f_alpha_divergence_coef=cfg.get("alpha", 0.5),
        label_smoothing=cfg.get("eps", 0.0), use_weighting=cfg.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=cfg.get("tau", 0.05), gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
    }
    loss = tr._compute_loss(tr.model, inputs, return_outputs=False)
    grad = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return loss.detach(), grad, metrics, outputs


def _ours_from_tokens(tok, mask, ref_c, ref_r, *, ld_alpha=None, outputs=None, **cfg):
    from apo_kernels.sequence import padded_sequence_logps, split_pairs, wpo_pair_weights

    leaf = tok.clone().requires_grad_(True)
    shift = mask[:, 1:]
    seq = padded_sequence_logps(leaf, shift, ld_alpha=ld_alpha)
    pc, pr = split_pairs(seq.logps)
    lc, lr = split_pairs(seq.lengths)
    sft = None
    if ld_alpha is not None:
        sft = split_pairs(padded_sequence_logps(leaf, shift).logps)[0]
    pw = None
    if cfg.get("use_weighting"):
        pw = wpo_pair_weights(leaf, outputs.log_sum_sq_probs, shift)
    losses = preference_loss(
        pc, pr, ref_c, ref_r, loss_type=cfg["loss_type"], beta=cfg["beta"], label_smoothing=cfg.get("eps", 0.0),
        loss_weights=cfg.get("loss_weights"), chosen_lengths=lc, rejected_lengths=lr,
        discopop_tau=cfg.get("tau", 0.05), f_divergence_type=cfg.get("f_div", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("alpha", 0.5), sft_chosen_logps=sft, pair_weights=pw,
    )
    loss = losses.mean()
    grad = torch.autograd.grad(loss, leaf)[0]
    return loss.detach(), grad, preference_rewards(pc, pr, ref_c, ref_r, beta=cfg["beta"])


def _compare_with_trl(trainer_cls, gen, extreme=False, **cfg):
    b, t = 6, 12
    tok, mask = _token_batch(b, t, gen, extreme)
    if cfg["loss_type"] == ["sft"] or "sft" in cfg["loss_type"]:
        mask[0, 1:4] = 1  # TRL's sft is NaN (empty mean) when no chosen token exists
        tok = torch.where(mask[:, 1:].bool(), tok.clamp(max=-1e-3), torch.zeros_like(tok))
    spread = 80.0 if extreme else 5.0
    seq = tok.sum(1)
    ref_c = seq[:b] - spread * torch.randn(b, generator=gen)
    ref_r = seq[b:] - spread * torch.randn(b, generator=gen)
    trl_loss, trl_grad, trl_metrics, outputs = _trl_dpo(trainer_cls, tok, mask, ref_c, ref_r, **cfg)
    ours, our_grad, our_metrics = _ours_from_tokens(tok, mask, ref_c, ref_r, outputs=outputs, **cfg)
    assert torch.isfinite(ours), (cfg, ours)
    if not torch.isfinite(trl_loss):
        # Only legitimate where TRL overflows (inf * 0 in discopop).
        assert "discopop" in cfg["loss_type"], (cfg, trl_loss)
        return
    scale = max(1.0, abs(float(trl_loss)))
    torch.testing.assert_close(ours, trl_loss, rtol=2e-5 if not extreme else 1e-4, atol=1e-5 * scale)
    if trl_grad is None:
        trl_grad = torch.zeros_like(tok)
    # TRL sums every position of `log_probs` (its head writes 0 and passes no gradient at
    # non-completion positions); compare where gradients really flow.
    trl_grad = trl_grad * mask[:, 1:]
    gscale = max(1e-3, float(trl_grad.abs().max()))
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-3, atol=2e-5 * gscale)
    for k, v in our_metrics.items():
        assert math.isclose(float(v), trl_metrics[k], rel_tol=1e-5, abs_tol=1e-5), (k, float(v), trl_metrics[k])


TRL_DPO_TYPES = [t for t in LOSS_TYPES if t != "apo_zero_unpaired"]


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_matches_trl_dpo_trainer(trl_trainers, loss_type, extreme, gen):
    beta = 0.1 if not extreme else 2.0
    _compare_with_trl(trl_trainers[0], gen, extreme, loss_type=[loss_type], beta=beta, eps=_eps_for(loss_type))


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_matches_trl_f_divergence(trl_trainers, loss_type, f_div, gen):
    _compare_with_trl(
        trl_trainers[0], gen, loss_type=[loss_type], beta=0.2, eps=_eps_for(loss_type), f_div=f_div, alpha=0.3
    )


@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
        dict(loss_type=["apo_zero", "sft"], ld_alpha=0.5),
        dict(loss_type=["apo_down"], ld_alpha=0.0),
        dict(loss_type=["sigmoid", "ipo"], use_weighting=True),
        dict(loss_type=["discopop"], tau=0.2),
    ],
)
def test_matches_trl_options(trl_trainers, cfg, gen):
    _compare_with_trl(trl_trainers[0], gen, beta=0.3, **cfg)


def test_matches_trl_kto_apo_zero_unpaired(trl_trainers, gen):
    kto = trl_trainers[1]
    n, t = 9, 10
    tok, mask = _token_batch(n, t, gen)
    tok, mask = tok[:n], mask[:n]
    label = torch.rand(n, generator=gen) > 0.4
    label[0], label[1] = True, False
    ref = tok.sum(1) - 30 * torch.randn(n, generator=gen)
    leaf = tok.clone().requires_grad_(True)
    outputs = SimpleNamespace(log_probs=leaf, entropy=torch.rand_like(tok), mean_logits=torch.randn_like(tok))
    tr = _stub_trainer(
        kto, outputs, beta=0.2, loss_type="apo_zero_unpaired", calculate_KL=False, desirable_weight=1.3,
        undesirable_weight=0.6, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    batch = {
        "input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "label": label, "ref_logps": ref,
    }
    trl_loss = tr._compute_loss(tr.model, batch, return_outputs=False)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    leaf2 = tok.clone().requires_grad_(True)
    ours = unpaired_preference_loss(
        leaf2.sum(1), ref, label, beta=0.2, desirable_weight=1.3, undesirable_weight=0.6
    ).mean()
    torch.testing.assert_close(ours.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, leaf2)[0], trl_grad, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# f-divergence scores at large log-ratios. The scores' gradients exp(-r) / exp((a - 1) r) are
# tiny there but multiply other factors (IPO's squared difference can be huge), and torch's
# expm1 backward (expm1(x) + 1) rounded them to exactly 0 in fp32 for x below about -17.
# --------------------------------------------------------------------------------------------

# (f_divergence_type, alpha, log-ratios on the underflowing side, log-ratios whose score is huge)
_EXP_F_DIVS = [
    ("forward_kl", 0.5, [18.0, 25.0, 40.0], [-20.0]),
    ("alpha_divergence", 0.5, [36.0, 45.0, 60.0], [-30.0]),
    ("alpha_divergence", 2.0, [-18.0, -25.0, -40.0], [20.0]),
    ("alpha_divergence", 0.3, [26.0, 35.0, 50.0], [-25.0]),
    ("alpha_divergence", 1.5, [-36.0, -45.0, -60.0], [30.0]),
]
_MODERATE = [-2.0, 0.5, 3.0]


def _large_ratio_pairs(underflow, huge, loss_type):
    """Every (chosen, rejected) log-ratio pair from the underflowing and moderate values; for
    IPO, whose squared difference multiplies the tiny score gradient, the huge side too (the
    other losses saturate there, and the naive float64 formula overflows)."""
    values = underflow + _MODERATE + (huge if loss_type == "ipo" else [])
    grid = torch.tensor([(a, b) for a in values for b in values], dtype=torch.float64)
    return grid[:, 0], grid[:, 1]


def _assert_within_rule(name, ours, oracle, same_dtype, rtol=1e-4):
    """Elementwise |ours - f64| <= |same-dtype naive - f64| + rtol |f64| (+ fp32's smallest
    normal): relative, so a tiny true gradient next to a huge one in the same tensor counts."""
    ours, oracle, same_dtype = ours.double(), oracle.double(), same_dtype.double()
    err = (ours - oracle).abs()
    bound = (same_dtype - oracle).abs() + rtol * oracle.abs() + 1.2e-38
    bad = ~(err <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, e.g. ours={ours[bad][:4].tolist()} "
                           f"f64={oracle[bad][:4].tolist()}")


@pytest.mark.parametrize("f_div, alpha, underflow, huge", _EXP_F_DIVS)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES - {"sft"}))
def test_f_divergence_gradients_at_large_logratios_match_float64(loss_type, f_div, alpha, underflow, huge, gen):
    r_w, r_l = _large_ratio_pairs(underflow, huge, loss_type)
    b = r_w.numel()
    pc = (-100 - 50 * torch.rand(b, generator=gen, dtype=torch.float64)).float()
    pr = (-100 - 50 * torch.rand(b, generator=gen, dtype=torch.float64)).float()
    rc, rr = (pc.double() - r_w).float(), (pr.double() - r_l).float()  # fp32 inputs, exact in f64
    lc, lr = torch.randint(1, 60, (b,), generator=gen), torch.randint(1, 60, (b,), generator=gen)
    eps = _eps_for(loss_type)
    kw = dict(loss_type=loss_type, beta=0.1)
    ours, g_ours = _loss_and_grads(
        lambda a, b_, c, d: preference_loss(
            a, b_, c, d, **kw, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
            f_divergence_type=f_div, f_alpha_divergence_coef=alpha),
        pc, pr, rc, rr)
    naive = lambda a, b_, c, d: reference_loss(  # noqa: E731
        a, b_, c, d, lc.to(a.dtype), lr.to(a.dtype), **kw, eps=eps, f_div=f_div, alpha=alpha)
    oracle, g_oracle = _loss_and_grads(naive, *(t.double() for t in (pc, pr, rc, rr)))
    same, g_same = _loss_and_grads(naive, pc, pr, rc, rr)
    _assert_within_rule("loss", ours, oracle, same)
    for name, go, gr, gs in zip(("chosen", "rejected", "ref_chosen", "ref_rejected"), g_ours, g_oracle, g_same):
        _assert_within_rule(f"d{name}", go, gr, gs)
        assert (go != 0).sum() >= (gr.abs() > 1e-30).sum(), f"d{name}: a non-zero gradient became 0"


def test_ipo_forward_kl_gradient_is_not_zero_at_large_logratios():
    """The issue's case: IPO with forward KL, chosen log-ratio 25, rejected -20."""
    pc = torch.tensor([-100.0], requires_grad=True)
    losses = preference_loss(pc, torch.tensor([-110.0]), torch.tensor([-125.0]), torch.tensor([-90.0]),
                             loss_type="ipo", beta=0.1, chosen_lengths=torch.tensor([10]),
                             rejected_lengths=torch.tensor([15]), f_divergence_type="forward_kl")
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    # float64: 2 * (s_w/10 - s_l/15 - 5) * exp(-25) / 10 with s = 1 - exp(-r)
    s_w, s_l = -math.expm1(-25.0), -math.expm1(20.0)
    expected = 2 * (s_w / 10 - s_l / 15 - 5) * math.exp(-25.0) / 10
    assert math.isclose(float(grad), expected, rel_tol=1e-5), (float(grad), expected)


@pytest.mark.parametrize("f_div, alpha, underflow, huge", _EXP_F_DIVS)
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid", "hinge", "discopop"])
def test_f_divergence_at_large_logratios_matches_trl(trl_trainers, loss_type, f_div, alpha, underflow, huge, gen):
    """Against TRL 1.16's own loss in fp32 (it writes 1 - exp(-r), whose gradient does not
    underflow) and float64: per-token gradients, elementwise."""
    r_w, r_l = _large_ratio_pairs(underflow, huge, loss_type)
    b, t = r_w.numel(), 5
    mask = torch.zeros(2 * b, t, dtype=torch.int64)
    mask[:, 1:] = 1
    tok = -torch.rand(2 * b, t - 1, generator=gen) * 4.0
    seq = tok.double().sum(1)
    ref_c, ref_r = (seq[:b] - r_w).float(), (seq[b:] - r_l).float()
    cfg = dict(loss_type=[loss_type], beta=0.1, f_div=f_div, alpha=alpha)
    trl_loss, trl_grad, _, _ = _trl_dpo(trl_trainers[0], tok, mask, ref_c, ref_r, **cfg)
    ours, our_grad, _ = _ours_from_tokens(tok, mask, ref_c, ref_r, **cfg)
    oracle, oracle_grad, _ = _ours_from_tokens(tok.double(), mask, ref_c.double(), ref_r.double(), **cfg)
    _assert_within_rule("loss", ours.reshape(1), oracle.reshape(1), trl_loss.reshape(1))
    _assert_within_rule("dlogp", our_grad, oracle_grad, trl_grad)
    assert torch.isfinite(trl_grad).all() and (trl_grad != 0).any()
