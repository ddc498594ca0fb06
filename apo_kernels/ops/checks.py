"""Input validation shared by the ops: every error names the argument and the problem."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and devices of ``hidden [..., D]``, ``weight [V, D]``, ``labels [...]``,
    ``bias [V]``. Label values are checked later, where the device sync is unavoidable."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, float16 or bfloat16 hidden states, got dtype {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got dtype {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden has D={hidden.shape[-1]} but weight has "
            f"D={weight.shape[1]} (weight must be [V, D])")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}")
    devices = {"hidden": hidden.device, "weight": weight.device, "labels": labels.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got dtype {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")


def check_same_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """After any autocast cast: the two matmul operands must agree."""
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of "
            "them or run under torch.autocast")


def check_transform(logit_scale: float, softcap: float | None, temperature: float) -> None:
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not _is_real(logit_scale) or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    if softcap is not None and (not _is_real(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")


def check_options(ignore_index: int, filter_eps: object, backend: str) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if filter_eps is not None and filter_eps != "auto":
        if not _is_real(filter_eps) or not math.isfinite(filter_eps) or filter_eps < 0:
            raise ValueError(
                f"filter_eps must be 'auto', None (exact) or a non-negative number, got {filter_eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_label_values(labels: torch.Tensor, kept: torch.Tensor, vocab_size: int) -> None:
    """``labels[kept]`` must lie in ``[0, V)``; names the first offending position."""
    values = labels[kept]
    bad = (values < 0) | (values >= vocab_size)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index; flat position "
            f"{int(kept[first])} holds {int(values[first])}")


def _is_real(x: object) -> bool:
    # numbers.Real admits numpy scalars (np.float32(0.5)) as well as Python numbers.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
