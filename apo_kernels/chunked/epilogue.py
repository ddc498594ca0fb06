"""The chunk epilogues: what is done to one block of logits after its GEMM.

Public API (used by the chunked strategy and by the single-pass preference path):

``chunk_forward_epilogue(logits, labels, ...) -> dict[str, Tensor]``
    ``logits``: fp32 ``[C, V]``, rows contiguous, the RAW logits ``h_c @ W.T`` of whole rows
    (bias and transforms not applied; the epilogue applies them). Overwritten by scratch.
    Returns fp32 ``[C]`` tensors ``row_max`` (m) and ``log_norm`` (log s1; lse = m + log s1, the
    pair the op saves for its backward), ``logp``, and when asked ``entropy`` and
    ``mean_logit``, ``is_top1`` (int8), ``log_sum_p2``, defined as in
    ``kernels/linear_logprobs_fwd.py``. It is ``finalize_partials(chunk_forward_partials(...))``.

``chunk_forward_partials(logits, labels, vocab_start=..., ...) -> Partials``
    The same for a vocabulary BLOCK ``[C, Vb]`` (columns ``vocab_start..``; a column slice of a
    wider buffer is fine): the block's partial statistics (m, s1 = sum exp(z - m), label logit,
    u, s2, sum z, max before the label). ``merge_partials(a, b)`` combines two blocks with a
    stable log-add; ``finalize_partials(p, V)`` gives the outputs above.

``chunk_grad_inplace(logits, labels, row_max, log_norm, grad_logp, ...) -> logits``
    ``logits``: the same raw fp32 logits (recomputed; whole rows or a vocabulary block);
    overwritten in place by ``d loss / d logits`` = ``(g [v = y] - p (g + e (z - E[z]))) *
    dz/dlogits``, where ``g = grad_logp``, ``e = grad_entropy`` (``[C]`` fp32;
    ``expected_logit`` = E[z] - m = log_norm - entropy, needed with ``grad_entropy``). Then
    ``dH_c = out @ W``, ``dW += out.T @ h_c``, ``dbias += out.sum(0)``.

The backward's p = exp((z - m) - log s1) amplifies any difference between the forward's and the
backward's logits where p is near 1 (1 - p cancels), so the strategy recomputes each block with
the identical GEMM call the forward made (same rows, same columns, same buffer layout).

``impl``: ``"auto"`` (Triton on CUDA; on CPU the C++ kernel when it builds, else torch ops),
``"native"``, ``"torch"``, ``"compile"`` (``torch.compile`` of the torch-ops version) or
``"triton"``. ``set_cpu_epilogue`` / ``APO_KERNELS_CPU_EPILOGUE`` change what ``"auto"`` picks on
CPU (the benchmark compares them that way).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

CPU_EPILOGUES = ("native", "torch", "compile")
CPU_EPILOGUE_ENV = "APO_KERNELS_CPU_EPILOGUE"
_cpu_choice: str | None = None


def set_cpu_epilogue(name: str | None) -> None:
    """Pin the CPU epilogue ``"auto"`` resolves to (``None``: back to the default)."""
    if name is not None and name not in CPU_EPILOGUES:
        raise ValueError(f"cpu epilogue must be one of {CPU_EPILOGUES}, got {name!r}")
    global _cpu_choice
    _cpu_choice = name


def resolve_epilogue(impl: str, device: torch.device) -> str:
    """The concrete epilogue ``impl`` means on ``device``."""
    if impl != "auto":
        if impl not in CPU_EPILOGUES + ("triton",):
            raise ValueError(f"epilogue must be 'auto', 'triton' or one of {CPU_EPILOGUES}, got {impl!r}")
        return impl
    if device.type == "cuda":
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    choice = _cpu_choice or os.environ.get(CPU_EPILOGUE_ENV) or "native"
    if choice not in CPU_EPILOGUES:
        raise ValueError(f"{CPU_EPILOGUE_ENV} must be one of {CPU_EPILOGUES}, got {choice!r}")
    if choice == "native":
        from .native import native_available

        return "native" if native_available() else "torch"
    return choice


# ---------------------------------------------------------------------------------------------
# (a) plain torch ops: in place where possible, every [C, V] pass counts on CPU.

def _transform_(z: Tensor, bias: Tensor | None, scale: float, softcap: float | None,
                temperature: float) -> Tensor | None:
    """``z <- T(z + b)`` in place; returns ``tanh`` of the softcap (for the jacobian) or None."""
    if bias is not None:
        z += bias
    if softcap is None:
        factor = scale / temperature
        if factor != 1.0:
            z *= factor
        return None
    th = z.mul_(scale / softcap).tanh_()
    return th


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[c, v] b[c, v]`` without a ``[C, V]`` product (a batched GEMV)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


PARTIALS = ("m", "s1", "zy", "u", "s2", "sumz", "maxbefore")  # rows of the [7, C] layout
Partials = dict  # name -> fp32 [C]; "u" only with entropy, "s2"/"sumz"/"maxbefore" with stats


def torch_forward_partials(logits: Tensor, labels: Tensor, bias: Tensor | None, logit_scale: float,
                           softcap: float | None, temperature: float, with_entropy: bool,
                           with_stats: bool) -> Partials:
    z = logits
    th = _transform_(z, bias, logit_scale, softcap, temperature)
    if th is not None:
        z = th.mul_(softcap / temperature)
    width = z.shape[1]
    inside = (labels >= 0) & (labels < width)  # labels relative to the block
    zy = z.gather(1, labels.clamp(0, width - 1)[:, None]).squeeze(1).masked_fill_(~inside, 0.0)
    m = z.amax(-1, keepdim=True)
    res: Partials = {"zy": zy}
    if with_stats:
        res["sumz"] = z.sum(-1)
        cols = torch.arange(width, device=z.device)
        res["maxbefore"] = z.masked_fill(cols[None, :] >= labels[:, None], float("-inf")).amax(-1)
    d = z.sub_(m)  # z - m, in place
    # exp(z - m): a new tensor when z - m is still needed, else in place.
    e = d.exp() if (with_entropy or with_stats) else d.exp_()
    res["s1"] = e.sum(-1)
    res["m"] = m.squeeze(1)
    if with_entropy:
        res["u"] = _rowdot(e, d)
    if with_stats:
        res["s2"] = _rowdot(e, e)
    return res


def merge_partials(a: Partials | None, b: Partials) -> Partials:
    """Partials of two vocabulary blocks of the same rows -> partials of their union."""
    if a is None:
        return dict(b)
    m = torch.maximum(a["m"], b["m"])
    wa, wb = torch.exp(a["m"] - m), torch.exp(b["m"] - m)
    out = {"m": m, "s1": wa * a["s1"] + wb * b["s1"], "zy": a["zy"] + b["zy"]}
    if "u" in a:
        # u is relative to the block max: shift by (m_block - m) s1_block before scaling.
        out["u"] = wa * (a["u"] + (a["m"] - m) * a["s1"]) + wb * (b["u"] + (b["m"] - m) * b["s1"])
    if "s2" in a:
        out["s2"] = wa * wa * a["s2"] + wb * wb * b["s2"]
        out["sumz"] = a["sumz"] + b["sumz"]
        out["maxbefore"] = torch.maximum(a["maxbefore"], b["maxbefore"])
    return out


def finalize_partials(p: Partials, vocab_size: int) -> dict[str, Tensor]:
    """Merged partials of whole rows -> the op's per-token outputs (see the module docstring)."""
    log_s1 = torch.log(p["s1"])
    res = {"row_max": p["m"], "log_norm": log_s1, "logp": (p["zy"] - p["m"]) - log_s1}
    if "u" in p:
        res["entropy"] = log_s1 - p["u"] / p["s1"]
    if "s2" in p:
        res["mean_logit"] = p["sumz"] / vocab_size
        # First arg-max on ties: the label is the max and nothing before it reaches it.
        res["is_top1"] = ((p["zy"] >= p["m"]) & (p["maxbefore"] < p["zy"])).to(torch.int8)
        res["log_sum_p2"] = torch.log(p["s2"]) - 2.0 * log_s1
    return res


def torch_grad_inplace(logits: Tensor, labels: Tensor, row_max: Tensor, log_norm: Tensor,
                       grad_logp: Tensor, grad_entropy: Tensor | None,
                       expected_logit: Tensor | None, bias: Tensor | None, logit_scale: float,
                       softcap: float | None, temperature: float) -> Tensor:
    z = logits
    th = _transform_(z, bias, logit_scale, softcap, temperature)
    jac: Tensor | float
    if th is None:
        jac = logit_scale / temperature
    else:
        jac = (th * th).neg_().add_(1.0).mul_(logit_scale / temperature)  # one [C, V] temporary
        z = th.mul_(softcap / temperature)
    g = grad_logp[:, None]
    z_rel = z.sub_(row_max[:, None])
    if grad_entropy is not None:
        coef = (z_rel - expected_logit[:, None]).mul_(grad_entropy[:, None]).add_(g)
    else:
        coef = g
    dacc = z_rel.sub_(log_norm[:, None]).exp_().mul_(coef).neg_()  # -p coef, in the buffer
    inside = (labels >= 0) & (labels < dacc.shape[1])  # labels relative to the block
    rows = inside.nonzero().squeeze(1)
    dacc.index_put_((rows, labels[rows]), grad_logp[rows], accumulate=True)
    dacc *= jac
    return dacc


# ---------------------------------------------------------------------------------------------
# (b) torch.compile of the functional form (inductor fuses the passes into its own C++/Triton).

def _functional_partials(x: Tensor, labels: Tensor, bias: Tensor | None, scale: float,
                         softcap: float | None, temperature: float, with_entropy: bool,
                         with_stats: bool):
    z = x if bias is None else x + bias
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    m = z.amax(-1)
    d = z - m[:, None]
    e = torch.exp(d)
    cols = torch.arange(z.shape[1], device=z.device)[None, :]
    out = [m, e.sum(-1), torch.where(cols == labels[:, None], z, 0.0).sum(-1)]
    if with_entropy:
        out.append(torch.where(e > 0, e * d, 0.0).sum(-1))
    if with_stats:
        out.append((e * e).sum(-1))
        out.append(z.sum(-1))
        out.append(torch.where(cols < labels[:, None], z, float("-inf")).amax(-1))
    return out


def _functional_grad_(x: Tensor, labels: Tensor, row_max: Tensor, log_norm: Tensor, g: Tensor,
                      ge: Tensor | None, ez: Tensor | None, bias: Tensor | None,
                      scale: float, softcap: float | None, temperature: float) -> None:
    a = x if bias is None else x + bias
    a = a * scale
    if softcap is not None:
        th = torch.tanh(a / softcap)
        z = softcap * th / temperature
        jac = (scale / temperature) * (1.0 - th * th)
    else:
        z = a / temperature
        jac = scale / temperature
    zr = z - row_max[:, None]
    p = torch.exp(zr - log_norm[:, None])
    coef = g[:, None] if ge is None else g[:, None] + ge[:, None] * (zr - ez[:, None])
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]  # relative
    x.copy_((torch.where(onehot, g[:, None], 0.0) - p * coef) * jac)


@functools.cache
def _compiled(which: str):
    fn = _functional_partials if which == "forward" else _functional_grad_
    return torch.compile(fn, dynamic=True)


def _names(with_entropy: bool, with_stats: bool) -> list[str]:
    return ["m", "s1", "zy"] + (["u"] if with_entropy else []) + (
        ["s2", "sumz", "maxbefore"] if with_stats else [])


def compile_forward_partials(logits, labels, bias, logit_scale, softcap, temperature,
                             with_entropy, with_stats) -> Partials:
    out = _compiled("forward")(logits, labels, bias, logit_scale, softcap, temperature,
                               with_entropy, with_stats)
    return dict(zip(_names(with_entropy, with_stats), out))


# ---------------------------------------------------------------------------------------------
# (c) the C++ kernel and (d) Triton: thin adapters.

def _from_rows(out: Tensor, with_entropy: bool, with_stats: bool) -> Partials:
    return {name: out[PARTIALS.index(name)] for name in _names(with_entropy, with_stats)}


def native_forward_partials(logits, labels, bias, logit_scale, softcap, temperature,
                            with_entropy, with_stats) -> Partials:
    from .native import load_native

    out = load_native().forward_partials(logits, labels, bias, float(logit_scale),
                                         None if softcap is None else float(softcap),
                                         float(temperature), with_entropy, with_stats)
    return _from_rows(out, with_entropy, with_stats)


def _check_chunk(logits: Tensor, labels: Tensor) -> None:
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [C, V] fp32 tensor with contiguous rows, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [C]={logits.shape[0]}, got {tuple(labels.shape)}")


def chunk_forward_partials(
    logits: Tensor, labels: Tensor, *, bias: Tensor | None = None, logit_scale: float = 1.0,
    softcap: float | None = None, temperature: float = 1.0, with_entropy: bool = False,
    with_stats: bool = False, vocab_start: int = 0, impl: str = "auto",
) -> Partials:
    """One vocabulary block's partial statistics from its raw logits (module docstring).

    labels: ``[C]`` int64 absolute token ids (ignored tokens compacted away before);
    bias: the block's fp32 ``[Vb]`` slice (contiguous) or None.
    """
    _check_chunk(logits, labels)
    labels = (labels - vocab_start if vocab_start else labels).contiguous()
    impl = resolve_epilogue(impl, logits.device)
    args = (logits, labels, bias, float(logit_scale), softcap, float(temperature),
            bool(with_entropy), bool(with_stats))
    if impl == "native":
        return native_forward_partials(*args)
    if impl == "compile":
        return compile_forward_partials(*args)
    if impl == "triton":
        from ..kernels.chunk_epilogue import triton_forward_partials

        return _from_rows(triton_forward_partials(*args), with_entropy, with_stats)
    return torch_forward_partials(*args)


def chunk_forward_epilogue(
    logits: Tensor, labels: Tensor, *, bias: Tensor | None = None, logit_scale: float = 1.0,
    softcap: float | None = None, temperature: float = 1.0, with_entropy: bool = False,
    with_stats: bool = False, impl: str = "auto",
) -> dict[str, Tensor]:
    """One chunk's per-token outputs from the raw logits of whole rows (module docstring)."""
    part = chunk_forward_partials(logits, labels, bias=bias, logit_scale=logit_scale,
                                  softcap=softcap, temperature=temperature,
                                  with_entropy=with_entropy, with_stats=with_stats, impl=impl)
    return finalize_partials(part, logits.shape[1])


def chunk_grad_inplace(
    logits: Tensor, labels: Tensor, row_max: Tensor, log_norm: Tensor, grad_logp: Tensor, *,
    grad_entropy: Tensor | None = None, expected_logit: Tensor | None = None,
    bias: Tensor | None = None, logit_scale: float = 1.0, softcap: float | None = None,
    temperature: float = 1.0, vocab_start: int = 0, impl: str = "auto",
) -> Tensor:
    """Overwrite one chunk's raw logits by the gradient of the loss w.r.t. them; returns them.

    logits may be a vocabulary block ``[C, Vb]`` (columns ``vocab_start ..``; a column slice of a
    wider buffer is fine): the gradient is elementwise given the saved normaliser, and the
    label's one-hot term lands only in the block that holds the label. ``bias`` is then the
    block's slice.
    row_max, log_norm: the forward's normaliser pair for these rows; grad_logp, grad_entropy,
    expected_logit (E[z] - m = log_norm - entropy): fp32 ``[C]``.
    """
    _check_chunk(logits, labels)
    if (grad_entropy is None) != (expected_logit is None):
        raise ValueError("grad_entropy and expected_logit must be given together")
    labels = (labels - vocab_start if vocab_start else labels).contiguous()
    f32 = lambda t: None if t is None else t.float().contiguous()
    row_max, log_norm, grad_logp = f32(row_max), f32(log_norm), f32(grad_logp)
    grad_entropy, expected_logit = f32(grad_entropy), f32(expected_logit)
    impl = resolve_epilogue(impl, logits.device)
    if impl == "native":
        from .native import load_native

        load_native().grad_inplace(logits, labels, bias, float(logit_scale),
                                   None if softcap is None else float(softcap), float(temperature),
                                   row_max, log_norm, grad_logp, grad_entropy, expected_logit)
        return logits
    if impl == "compile":
        _compiled("grad")(logits, labels, row_max, log_norm, grad_logp, grad_entropy,
                          expected_logit, bias, float(logit_scale), softcap, float(temperature))
        return logits
    if impl == "triton":
        from ..kernels.chunk_epilogue import triton_grad_inplace

        triton_grad_inplace(logits, labels, row_max, log_norm, grad_logp, grad_entropy,
                            expected_logit, bias, float(logit_scale), softcap, float(temperature))
        return logits
    out = torch_grad_inplace(logits, labels, row_max, log_norm, grad_logp, grad_entropy,
                             expected_logit, bias, float(logit_scale), softcap, float(temperature))
    if out.data_ptr() != logits.data_ptr():  # never: every step above is in place
        logits.copy_(out)
    return logits
