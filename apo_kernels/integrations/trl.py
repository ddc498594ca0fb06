"""Make TRL's trainers compute log-probs with apo-kernels: one line, ``enable()``.

TRL 1.16 routes every trainer that scores completions (DPO, KTO, SFT, GRPO, RLOO and the
experimental async GRPO) through one place: the forward that ``trl.trainer.utils.add_fused_lm_head``
installs on the model calls the module global ``trl.trainer.utils._ChunkedLogProbFunction``
with ``(hidden [N, D], weight [V, D], bias, targets [N], temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)`` and expects the tuple
``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``. Because the global is looked up
on every call, swapping it switches every trainer (already built or not) to our kernels, for
every loss type, with ``precompute_ref_log_probs``, PEFT reference adapters (TRL toggles the
adapter around the same forward) and the metrics TRL logs (entropy, mean logits, top-1).

We also swap ``trl.trainer.utils._use_triton`` (used there only to decide whether to drop the
``-100`` positions before scoring): our op compacts ignored tokens on every device, so the
prompt tokens cost nothing on CPU either.

Usage::

    from apo_kernels.integrations import trl as apo_trl

    apo_trl.enable()                 # before or after building the trainer
    trainer.train()
    apo_trl.disable()                # back to TRL's own head

    with apo_trl.enabled():          # or scoped
        trainer.train()
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..ops import LinearLogprobsOutput, linear_logprobs
from .head_call import (
    UnsupportedHeadLayout,
    _gathered_leaf,
    call_through,
    gathered_fsdp_param,
    gathered_tp_shard,
)

__all__ = ["ApoLogProbFunction", "disable", "enable", "enabled", "is_enabled"]

_TRL_OPTIONAL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_lock = threading.Lock()
_saved: dict[str, Any] = {}
_options: dict[str, Any] = {}


class ApoLogProbFunction:
    """Drop-in for TRL's ``ChunkedLogProbFunction``: same ``apply`` arguments and outputs.

    ``apply`` returns fp32 ``[N]`` tensors ``(log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1)`` (bool for ``is_top1``), the optional ones None unless named in ``outputs``;
    ``log_probs`` and ``entropy`` are differentiable, the rest are not. ``chunk_size`` (TRL's
    vocabulary tile width) is ignored: our op picks its own tiles.
    """

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float = 1.0,
        chunk_size: int = 0,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = _TRL_OPTIONAL,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        del chunk_size
        args = (temperature, final_logit_softcapping, logit_scale, outputs)
        source = gathered_fsdp_param(weight)
        if source is not None:
            # TRL gathered an FSDP2-sharded head with full_tensor(), whose gradient would skip
            # FSDP's reduce-scatter: recompute inside the forward of the head's FSDP group,
            # from the unsharded parameters (TRL's gathered copy then gets no gradient).
            owner, holder, name = source
            if bias is not None and _gathered_leaf(bias) is not getattr(holder, "bias", None):
                raise UnsupportedHeadLayout(
                    "TRL passed a head bias that is not the full_tensor() of the FSDP2-sharded "
                    f"head's own `bias` ({type(holder).__name__}): recomputing the head inside "
                    "its FSDP group would drop it; pass the head's bias unchanged")
            return call_through(owner, lambda h, t: _logprobs(
                h, getattr(holder, name), None if bias is None else getattr(holder, "bias", None), t, *args),
                hidden, targets)
        shard = gathered_tp_shard(weight)
        bias_shard = gathered_tp_shard(bias)
        if shard is not None and (bias is None or bias_shard is not None):
            # TRL gathered a tensor-parallel head (transformers' tp_plan: Shard(0) rows) with
            # full_tensor(): run vocabulary-parallel on the shard instead (V/P rows and
            # gradient per rank; the gather's copy gets no gradient).
            return _logprobs(hidden, shard, bias_shard, targets, *args)
        return _logprobs(hidden, weight, bias, targets, *args)


def _logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
              final_logit_softcapping: float | None, logit_scale: float, outputs: tuple[str, ...]
              ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``ApoLogProbFunction.apply`` on a weight that needs no FSDP routing."""
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if not autocast and weight.dtype != hidden.dtype:
        # TRL casts the head to the compute dtype (the hidden states' dtype outside autocast,
        # e.g. fp32 hidden states with `cast_lm_head_to_fp32`); a differentiable cast.
        weight = weight.to(hidden.dtype)
    want_entropy = "entropy" in outputs
    want_stats = any(o in outputs for o in ("log_sum_sq_probs", "mean_logits", "is_top1"))
    res = linear_logprobs(
        hidden, weight, targets, bias,
        ignore_index=-100,  # TRL passes only valid targets (or clamped ones): nothing is -100
        temperature=float(temperature),
        logit_scale=1.0 if logit_scale is None else float(logit_scale),
        softcap=final_logit_softcapping or None,
        return_entropy=want_entropy,
        return_stats=want_stats,
        **_options,
    )
    if not isinstance(res, LinearLogprobsOutput):
        return res, None, None, None, None
    return (
        res.logprobs,
        res.entropy if want_entropy else None,
        res.log_sum_p2 if "log_sum_sq_probs" in outputs else None,
        res.mean_logit if "mean_logits" in outputs else None,
        res.is_top1 if "is_top1" in outputs else None,
    )


def _always_compact(device: torch.device) -> bool:
    del device
    return True


def _trl_utils() -> Any:
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "apo_kernels.integrations.trl needs TRL: pip install 'apo-kernels[trl]'"
        ) from exc
    if not hasattr(trl_utils, "_ChunkedLogProbFunction") or not hasattr(trl_utils, "add_fused_lm_head"):
        import trl

        raise RuntimeError(
            f"TRL {getattr(trl, '__version__', '?')} has no fused LM head "
            "(`trl.trainer.utils._ChunkedLogProbFunction`); apo-kernels supports TRL >= 1.16"
        )
    return trl_utils


def enable(
    *,
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str = "auto",
) -> None:
    """Route TRL's fused LM head through :func:`apo_kernels.linear_logprobs` (process-wide).

    Args:
        filter_eps, deterministic, backend: passed to ``linear_logprobs`` on every call.

    Calling it again only updates the options. Raises ``ImportError`` without TRL and
    ``RuntimeError`` for a TRL without the fused head.
    """
    from ..ops.checks import check_options

    check_options(-100, filter_eps, backend)
    trl_utils = _trl_utils()
    with _lock:
        _options.clear()
        _options.update(filter_eps=filter_eps, deterministic=bool(deterministic), backend=backend)
        if not _saved:
            _saved["fn"] = trl_utils._ChunkedLogProbFunction
            _saved["use_triton"] = getattr(trl_utils, "_use_triton", None)
        trl_utils._ChunkedLogProbFunction = ApoLogProbFunction
        if _saved["use_triton"] is not None:
            trl_utils._use_triton = _always_compact


def disable() -> None:
    """Give TRL its own LM head back (no-op when not enabled)."""
    with _lock:
        if not _saved:
            return
        trl_utils = _trl_utils()
        trl_utils._ChunkedLogProbFunction = _saved["fn"]
        if _saved["use_triton"] is not None:
            trl_utils._use_triton = _saved["use_triton"]
        _saved.clear()
        _options.clear()


def is_enabled() -> bool:
    """Whether TRL currently uses apo-kernels."""
    return bool(_saved)


@contextlib.contextmanager
def enabled(**options: Any) -> Iterator[None]:
    """Context manager: ``enable(**options)`` inside, the previous state restored on exit."""
    was = is_enabled()
    previous = dict(_options)
    enable(**options)
    try:
        yield
    finally:
        if was:
            enable(**previous)
        else:
            disable()
