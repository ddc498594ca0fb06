"""Input validation shared by the ops: every error names the argument and the problem."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


#: The names errors use for ``(hidden, weight, labels, bias)``; a caller that validates other
#: arguments (the reference model's ``ref_hidden``...) passes its own.
LINEAR_NAMES = ("hidden", "weight", "labels", "bias")


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    names: tuple[str, str, str, str] = LINEAR_NAMES,
) -> None:
    """Shapes, dtypes and devices of ``hidden [..., D]``, ``weight [V, D]``, ``labels [...]``,
    ``bias [V]``. Label values are checked later, where the device sync is unavoidable.
    ``names``: what the errors call the four arguments."""
    nh, nw, nl, nb = names
    for name, t in ((nh, hidden), (nw, weight), (nl, labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{nh} must be float32, float16 or bfloat16 hidden states, got dtype {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{nw} must be float32, float16 or bfloat16, got dtype {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{nl} must be an integer tensor of token ids, got dtype {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{nh} must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{nw} must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: {nh} has D={hidden.shape[-1]} but {nw} has "
            f"D={weight.shape[1]} (the head must be [V, D])")
    if weight.shape[0] == 0:
        raise ValueError(f"{nw} has an empty vocabulary (V=0)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{nl} shape {tuple(labels.shape)} must equal {nh}.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}")
    devices = {nh: hidden.device, nw: weight.device, nl: labels.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{nb} must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"{nb} must be a floating tensor, got dtype {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{nb} must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        devices[nb] = bias.device
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")


def check_same_dtype(hidden: torch.Tensor, weight: torch.Tensor,
                     names: tuple[str, str] = ("hidden", "weight")) -> None:
    """After any autocast cast: the two matmul operands must agree."""
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{names[1]} dtype {weight.dtype} differs from {names[0]} dtype {hidden.dtype}; cast "
            "one of them or run under torch.autocast")


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    optional: bool = False,
    desc: str | None = None,
) -> float | None:
    """Check a float hyper-parameter; return it as a Python float (None stays None when
    ``optional``).

    TypeError unless ``value`` is a real number: ``bool`` is refused although Python counts it
    as an int (``beta=True`` would silently mean 1), and so are tensors, strings and None.
    ValueError when it is NaN, infinite (with ``finite``) or outside ``[low, high]`` (an open end
    with ``low_open``/``high_open``). Every message names the argument; ``desc`` replaces the
    generated description of the allowed values ("a finite number > 0").
    """
    if value is None and optional:
        return None
    if desc is None:
        desc = _range_text(low, high, low_open, high_open, finite)
    if optional:
        desc = f"None or {desc}"
    if not _is_real(value):
        got = f"a bool ({value!r})" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be {desc}, got {got}")
    x = float(value)
    bad = math.isnan(x) or (finite and math.isinf(x))
    if low is not None:
        bad = bad or (x <= low if low_open else x < low)
    if high is not None:
        bad = bad or (x >= high if high_open else x > high)
    if bad:
        raise ValueError(f"{name} must be {desc}, got {value!r}")
    return x


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Check an integer argument (``bool`` refused, numpy integers accepted); return an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        got = f"a bool ({value!r})" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be an int, got {got}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _range_text(low, high, low_open, high_open, finite) -> str:
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_transform(logit_scale: float, softcap: float | None, temperature: float) -> None:
    check_real("temperature", temperature, low=0, low_open=True, desc="a positive finite number")
    check_real("logit_scale", logit_scale, low=0, low_open=True, desc="a positive finite number")
    check_real("softcap", softcap, low=0, low_open=True, optional=True,
               desc="a positive finite number")


#: Largest ``filter_eps`` accepted (exclusive). The filter skips a vocabulary tile when every
#: entry of its softmax part ``-p_v (g + e (z_v - E[z])) jac_v`` is at most ``filter_eps`` times
#: the token's gradient scale ``(|g| + |e|) * logit_scale / T``. Without an entropy gradient
#: ``|p_v g jac_v| <= |g| * logit_scale / T`` always (``p <= 1``), so from 1 on the condition holds
#: for every tile whatever the data: the filter would drop the whole softmax term (the label's
#: own ``-p_y g`` included, which nearly cancels ``+g`` on a confident token) and return the bare
#: label term as the gradient. Below 1 it can still drop a lot (on flat logits every ``p_v`` is
#: tiny), but only entries the promise above allows.
FILTER_EPS_MAX = 1.0


def check_filter_eps(filter_eps: object) -> None:
    """``filter_eps`` is ``"auto"``, None (exact) or a number in ``[0, 1)`` (see
    :data:`FILTER_EPS_MAX`)."""
    if filter_eps is None or (isinstance(filter_eps, str) and filter_eps == "auto"):
        return
    check_real("filter_eps", filter_eps, low=0.0, high=FILTER_EPS_MAX, high_open=True,
               desc="'auto', None (exact) or a number in [0, 1) (from 1 on, the filter would drop "
                    "the whole softmax part of the gradient whatever the data)")


def check_options(ignore_index: int, filter_eps: object, backend: str) -> None:
    check_int("ignore_index", ignore_index)
    check_filter_eps(filter_eps)
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
