"""Errors about the reference model's inputs name the reference's arguments (``ref_hidden``,
``ref_weight``, ``ref_bias``), not the policy's ``hidden``/``weight`` the op would use."""

from __future__ import annotations

import pytest
import torch

from apo_kernels import FusedLinearPreferenceLoss, fused_linear_preference_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[:, 0] = -100
    return h, w, labels


CASES = [
    (dict(ref_hidden=torch.randn(2, 5, 6), ref_weight=torch.randn(13, 8)), ValueError,
     r"ref_hidden has D=6 but ref_weight has D=8"),
    (dict(ref_hidden=torch.randn(2, 5, 6)), ValueError, r"ref_hidden has D=6 but weight \(the reference shares"),
    (dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(13, 8).double()), TypeError,
     "ref_weight must be float32"),
    (dict(ref_hidden=torch.randn(2, 5, 8).half(), ref_weight=torch.randn(13, 8)), TypeError,
     "ref_weight dtype torch.float32 differs from ref_hidden dtype torch.float16"),
    (dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(13, 8)[None]), ValueError,
     r"ref_weight must have shape \[V, D\]"),
    (dict(ref_hidden=torch.randn(2, 5, 8), ref_weight=torch.randn(13, 8), ref_bias=torch.randn(7)), ValueError,
     r"ref_bias must have shape \[V\]"),
    (dict(ref_hidden=torch.randn(2, 5, 8), ref_bias=torch.randn(13)), ValueError, "ref_bias` needs `ref_weight"),
    (dict(ref_hidden=torch.randn(2, 5, 8).long(), ref_weight=torch.randn(13, 8)), TypeError,
     "ref_hidden must be float32"),
]


@pytest.mark.parametrize("kwargs, error, match", CASES,
                         ids=["hidden_size", "hidden_size_shared_head", "weight_dtype", "dtype_mismatch",
                              "weight_3d", "bias_shape", "bias_without_weight", "int_hidden"])
def test_reference_errors_name_the_reference_arguments(kwargs, error, match):
    h, w, labels = _batch()
    with pytest.raises(error, match=match):
        fused_linear_preference_loss(h, w, labels, **kwargs)


def test_module_forward_names_the_reference_too():
    h, w, labels = _batch()
    with pytest.raises(ValueError, match="ref_hidden has D=6 but ref_weight has D=8"):
        FusedLinearPreferenceLoss()(h, w, labels, ref_hidden=torch.randn(2, 5, 6), ref_weight=torch.randn(13, 8))


def test_a_reference_with_its_own_hidden_size_is_fine():
    """Policy D=8, reference D=6 with its own head: valid (only the error names were wrong)."""
    h, w, labels = _batch()
    out = fused_linear_preference_loss(h, w, labels, ref_hidden=torch.randn(2, 5, 6),
                                       ref_weight=torch.randn(13, 6), backend="torch")
    assert torch.isfinite(out.loss)
