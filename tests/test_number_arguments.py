"""Float and int hyper-parameters: a bool is not a number here (``beta=True`` silently meant
``beta=1``), nor is NaN, infinity or a value outside the range; each error names the argument."""

from __future__ import annotations

import pytest
import torch

from apo_kernels import (
    FusedLinearPreferenceLoss,
    fused_linear_preference_loss,
    linear_logprobs,
    packed_sequence_logps,
    preference_head,
    preference_loss,
    preference_rewards,
    unpaired_preference_loss,
)
from apo_kernels.ops.checks import check_int, check_real
from apo_kernels.sequence import completion_token_weights, padded_sequence_logps


def _pairs():
    return [torch.randn(4) for _ in range(4)]


LOSS_CASES = [
    (dict(beta=True), TypeError, "beta"),
    (dict(beta=False), TypeError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(beta=torch.tensor(0.1)), TypeError, "beta"),
    (dict(loss_type="robust", label_smoothing=True), TypeError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(loss_type="discopop", discopop_tau=True), TypeError, "discopop_tau"),
    (dict(loss_type="discopop", discopop_tau=float("inf")), ValueError, "discopop_tau"),
    (dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=True),
     TypeError, "f_alpha_divergence_coef"),
    (dict(loss_type="sigmoid", f_divergence_type="alpha_divergence",
          f_alpha_divergence_coef=float("nan")), ValueError, "f_alpha_divergence_coef"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[True, 1.0]), TypeError, r"loss_weights\[0\]"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, float("inf")]), ValueError, r"loss_weights\[1\]"),
    (dict(loss_type=["sigmoid"], loss_weights=0.5), TypeError, "loss_weights"),
]


@pytest.mark.parametrize("kwargs, error, match", LOSS_CASES, ids=[str(i) for i in range(len(LOSS_CASES))])
def test_preference_loss_rejects_bools_and_bad_numbers(kwargs, error, match):
    with pytest.raises(error, match=match):
        preference_loss(*_pairs(), **kwargs)


def test_beta_true_was_accepted_as_one():
    """The issue's case, and that a real 1.0 still works."""
    x = _pairs()
    with pytest.raises(TypeError, match="beta.*bool"):
        preference_loss(*x, beta=True)
    preference_loss(*x, beta=1.0)
    preference_loss(*x, beta=1)  # a plain int is a number


@pytest.mark.parametrize("call, error, match", [
    (lambda x: preference_rewards(*x, beta=True), TypeError, "beta"),
    (lambda x: unpaired_preference_loss(x[0], x[1], x[2] > 0, beta=True), TypeError, "beta"),
    (lambda x: unpaired_preference_loss(x[0], x[1], x[2] > 0, desirable_weight=True), TypeError,
     "desirable_weight"),
    (lambda x: unpaired_preference_loss(x[0], x[1], x[2] > 0, undesirable_weight=float("nan")), ValueError,
     "undesirable_weight"),
    (lambda x: preference_head(torch.zeros(4), cu_seqlens=torch.tensor([0, 1, 2, 3, 4]),
                               ref_token_logps=torch.zeros(4), beta=True), TypeError, "beta"),
    (lambda x: padded_sequence_logps(torch.zeros(4, 3), torch.ones(4, 3), ld_alpha=True), TypeError, "ld_alpha"),
    (lambda x: packed_sequence_logps(torch.zeros(4), seq_ids=torch.tensor([0, 0, 1, 1]), num_seqs=True),
     TypeError, "num_seqs"),
    (lambda x: completion_token_weights(torch.ones(4), torch.tensor([0, 0, 1, 1]), num_seqs=2.0), TypeError,
     "num_seqs"),
], ids=["rewards_beta", "unpaired_beta", "desirable_weight", "undesirable_weight", "head_beta", "ld_alpha",
        "num_seqs", "num_seqs_float"])
def test_other_loss_entry_points_reject_bools(call, error, match):
    with pytest.raises(error, match=match):
        call(_pairs())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=True), TypeError, "temperature"),
    (dict(logit_scale=True), TypeError, "logit_scale"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(ignore_index=True), TypeError, "ignore_index"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
])
def test_linear_logprobs_rejects_bools(kwargs, error, match):
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with pytest.raises(error, match=match):
        linear_logprobs(h, w, y, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta=True), TypeError, "beta"),
    (dict(ld_alpha=True), TypeError, "ld_alpha"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
])
def test_fused_preference_loss_rejects_bools_early(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedLinearPreferenceLoss(**kwargs)  # at construction
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3))
    with pytest.raises(error, match=match):
        fused_linear_preference_loss(h, w, labels, ref_chosen_logps=torch.zeros(1),
                                     ref_rejected_logps=torch.zeros(1), **kwargs)


def test_checker_accepts_numpy_scalars_and_reports_ranges():
    np = pytest.importorskip("numpy")
    assert check_real("x", np.float32(0.5), low=0.0, high=1.0) == 0.5
    assert check_int("n", np.int64(3), low=0) == 3
    with pytest.raises(ValueError, match=r"x must be a finite number in \[0, 1\), got 1.0"):
        check_real("x", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        check_int("n", -1, low=0)
    assert check_real("x", None, optional=True) is None
