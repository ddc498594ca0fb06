"""Patch any loaded Hugging Face causal LM so that a forward with labels returns per-token
log-probs computed by :func:`apo_kernels.linear_logprobs`, never the ``[B, T, V]`` logits.

One patch for every architecture: the model is split into its backbone (``model.base_model``,
whatever its attribute is called) and its output embedding (``get_output_embeddings()``), and
what the architecture does to its logits after the head (final tanh softcapping, logit scales
and multipliers) is read from the config by :func:`head_transform`.

Usage::

    from apo_kernels.integrations.transformers import patch_model

    patch_model(model)                                  # once, after loading (before or after PEFT)
    out = model(input_ids, attention_mask=mask, labels=labels)
    out.logprobs        # [B, T-1] fp32, log p(labels[:, 1:] | prefix), 0 where labels == -100
    out.loss            # mean NLL over labelled tokens: the loss the unpatched model returns
    model.generate(...)                                 # unchanged (no labels: original forward)

Everything without ``labels`` (generation, a plain forward) goes to the original forward, and
``model(..., labels=labels, fused_logprobs=False)`` asks for the original logits path.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..ops import LinearLogprobsOutput, linear_logprobs
from ..ops.checks import check_options, check_real
from .head_call import UnsupportedHeadLayout, call_head, fsdp2_owner, is_fsdp_sharded, not_a_view
from .zero3 import full_shape, is_zero3_gathered

__all__ = [
    "STAT_OUTPUTS",
    "HeadTransform",
    "LogprobsCausalLMOutput",
    "backbone",
    "head_transform",
    "hidden_states",
    "is_patched",
    "output_head",
    "patch_model",
    "unpatch_model",
    "unwrap_model",
    "verify_patch",
]

# Extra per-token fields a patched forward can return besides the log-probs.
STAT_OUTPUTS = ("entropy", "mean_logit", "is_top1", "log_sum_p2")
_PATCH_ATTR = "_apo_kernels_patch"


class HeadTransform(NamedTuple):
    """What a model does to ``hidden @ W.T + b`` before the softmax.

    logit_scale: multiplier applied first (Cohere ``logit_scale``, Granite ``1/logits_scaling``,
        Falcon-H1 ``lm_head_multiplier``, ...); 1.0 when the model has none.
    softcap: tanh softcap ``c * tanh(z / c)`` (Gemma 2/3 ``final_logit_softcapping``) or None.
    """

    logit_scale: float = 1.0
    softcap: float | None = None


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def head_transform(config: Any) -> HeadTransform:
    """Read the post-head logit transform of a transformers config (multimodal: its text config).

    Conventions, checked against the modelling code of transformers 5:

    - ``final_logit_softcapping`` (Gemma 2/3/4, VaultGemma, nanochat, ...): tanh softcap.
    - ``logit_scale`` (Cohere, Cohere2): logits multiplied; MPT's config has a ``logit_scale``
      that its forward ignores, so it is ignored here too.
    - ``output_multiplier`` (Muse Glimmer) and ``lm_head_multiplier`` (Falcon-H1): multiplied.
    - ``logits_scaling``: Granite (all variants) and MiniCPM3 divide by it, HyperCLOVA X
      multiplies by it.

    Returns:
        :class:`HeadTransform`. Use :func:`verify_patch` to check an architecture not listed.
    """
    cfg = _text_config(config)
    model_type = str(getattr(cfg, "model_type", "") or "")
    softcap = getattr(cfg, "final_logit_softcapping", None)
    softcap = float(softcap) if softcap else None  # 0 / None both mean "no softcap"

    scale = None
    if model_type.startswith("cohere"):
        scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None and getattr(cfg, name, None) is not None:
            scale = getattr(cfg, name)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scaling = float(cfg.logits_scaling)
        scale = scaling if model_type.startswith("hyperclovax") else 1.0 / scaling
    return HeadTransform(logit_scale=1.0 if scale is None else float(scale), softcap=softcap)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside a PEFT / DDP / FSDP / DeepSpeed / compile wrapper.

    LoRA layers are injected in place, so the unwrapped model still runs the adapters.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif (isinstance(getattr(model, "module", None), nn.Module)
              and not hasattr(getattr(model, "config", None), "model_type")):
            # DDP / DataParallel / DeepSpeed's engine (whose `config` is its own JSON, not a
            # transformers config); a transformers model with a submodule named `module` stays.
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile
        else:
            break
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head (``base_model``: ``model.model`` for Llama, ...)."""
    inner = unwrap_model(model)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise ValueError(
            f"`model` ({type(inner).__name__}) has no separate backbone (`base_model`): "
            "apo-kernels needs a transformers causal LM (a backbone plus an output embedding)"
        )
    return body


def output_head(model: nn.Module, *, gather: bool = True) -> tuple[Tensor, Tensor | None]:
    """The output embedding's ``weight [V, D]`` and ``bias [V]`` (or None).

    Tied embeddings need nothing special: the head's weight is the input embedding's parameter,
    so its gradient accumulates in one place. With FSDP2 the head's parameters are DTensors;
    ``gather=True`` returns their full (differentiable) tensors, gathered once per call, except
    a weight sharded by FSDP2 that needs a gradient: its gradient would skip FSDP's
    reduce-scatter, so that raises (the patched forward runs the head inside its FSDP group
    instead, see :mod:`apo_kernels.integrations.head_call`). A tensor-parallel head (DTensor
    ``Shard(0)`` on a 1-D mesh that is not FSDP2's own sharding: transformers' ``tp_plan``,
    ``ColwiseParallel``, the TP shard FSDP2 x TP unshards) is returned sharded:
    ``linear_logprobs`` runs vocabulary-parallel on it.

    Raises:
        ValueError: the model has no output embedding, or a head this module cannot read.
        UnsupportedHeadLayout (a ValueError): an FSDP2-sharded weight gathered with gradients on.
    """
    head = _head_module(model)
    weight = getattr(head, "weight", None)
    # full_shape: a ZeRO-3 partitioned weight is 1-D with 0 elements outside its module's forward.
    if not isinstance(weight, Tensor) or len(full_shape(weight)) != 2:
        raise ValueError(
            f"the output embedding of `model` ({type(head).__name__}) has no 2-D `weight` [V, D]"
        )
    bias = getattr(head, "bias", None)
    if not isinstance(bias, Tensor):
        bias = None
    if gather:
        for t in (weight, bias):
            if t is not None and not is_zero3_gathered(t):
                raise ValueError(
                    f"the LM head's weight is partitioned by DeepSpeed ZeRO-3 (full shape "
                    f"{list(full_shape(t))}, {t.numel()} elements on this rank) and this call reads "
                    "it outside the head module's hooks: use `patch_model`, `compute_preference_loss`, "
                    "`PreferenceTrainer` or `precompute_ref_logps` (they call the head through its "
                    "module, and gather a reference model's head while they use it), TRL with "
                    "`apo_kernels.integrations.trl.enable()`, or gather it yourself with "
                    "`deepspeed.zero.GatheredParameters` for a forward without backward"
                )
    if gather and torch.is_grad_enabled() and weight.requires_grad:
        _refuse_fsdp_sharded(model, head, weight)
    if gather and not _tensor_parallel_head(model, weight):
        weight, bias = _full_tensor(weight), _full_tensor(bias)
    return weight, bias


def _refuse_fsdp_sharded(model: nn.Module, head: nn.Module, weight: Tensor) -> None:
    """Gathering an FSDP-sharded head with ``full_tensor()`` where gradients flow gives a gradient
    that skips FSDP's reduce-scatter (silently wrong): refuse and say what works. (Without
    gradients, e.g. a frozen reference model, gathering is exact.)"""
    if fsdp2_owner(model, head, weight) is not None:
        raise UnsupportedHeadLayout(
            "the LM head weight is sharded by an FSDP2 group whose forward is not running, and "
            "gathering it here would make its gradient skip FSDP's reduce-scatter: use the "
            "patched model (`patch_model(model)`, then `model(..., labels=...)`) or "
            "`compute_preference_loss`, which run the head inside its FSDP group"
        )


def _head_module(model: nn.Module) -> nn.Module:
    """The output embedding module (``get_output_embeddings()``) of the model inside wrappers, checked."""
    inner = unwrap_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"`model` ({type(inner).__name__}) has no output embedding "
            "(get_output_embeddings() returned None): apo-kernels needs a causal LM with an LM head"
        )
    if hasattr(head, "lora_A"):
        # PEFT LoRA on the head itself: `.weight` would be the frozen base weight only.
        raise ValueError(
            "LoRA on the LM head is not supported: target the attention/MLP modules instead, or "
            "merge the head adapter before patching"
        )
    return head


def _tensor_parallel_head(model: nn.Module, weight: Tensor) -> bool:
    """A vocabulary-parallel head (tensor parallelism: transformers' ``tp_plan`` styles
    ``colwise_gather_output`` / ``colwise_rep`` / ``colwise``, or torch's ``ColwiseParallel``):
    weight a DTensor ``Shard(0)`` on a 1-D (TP) mesh. Kept sharded: ``linear_logprobs`` takes it
    as is (vocabulary-parallel over the mesh's group).

    The same placement is also FSDP2's own sharding of a parameter across the data-parallel
    mesh (each rank then holds its own batch): that one is gathered (or run inside its FSDP
    group), never taken for a vocabulary shard. Under FSDP2 x TP (a 2-D mesh) the parameter
    FSDP unshards for the forward is the TP shard, which is vocabulary-parallel again."""
    from ..ops.vocab_parallel import is_vocab_sharded

    return is_vocab_sharded(weight) and not is_fsdp_sharded(model, weight)


def _full_tensor(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """Run only the backbone: ``[B, T, D]`` last hidden states (no cache, no logits).

    ``inputs`` are the usual model kwargs (``input_ids``, ``attention_mask``, ``position_ids``, ...).
    """
    inputs.pop("logits_to_keep", None)
    inputs["use_cache"] = False
    out = backbone(model)(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class LogprobsCausalLMOutput:
    """What a patched forward with labels returns (attribute and dict-style access).

    loss: 0-dim fp32, ``-sum(logprobs) / num_items`` (``num_items_in_batch`` or the number of
        labelled tokens): the causal-LM loss the unpatched model returns.
    logprobs: fp32 ``[B, T-1]`` (``[B, T]`` with ``shift_labels``), 0 where the label is ignored.
    entropy, mean_logit, is_top1, log_sum_p2: same shape, when requested (see ``linear_logprobs``).
    label_mask: bool, where the label is not ``ignore_index``.
    logits: always None (kept so code reading ``.logits`` fails loudly rather than oddly).
    hidden_states, attentions: the backbone's, when it returned them.
    """

    loss: Tensor | None = None
    logprobs: Tensor | None = None
    entropy: Tensor | None = None
    mean_logit: Tensor | None = None
    is_top1: Tensor | None = None
    log_sum_p2: Tensor | None = None
    label_mask: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: Any = None
    attentions: Any = None

    def __getitem__(self, key: str | int | slice) -> Any:
        # An int or slice indexes the fields that are set, in order, as transformers'
        # ModelOutput does: HF's Trainer reads the loss of a non-dict output as `outputs[0]`.
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are set (not None), in declaration order (``loss`` first)."""
        return tuple(getattr(self, k) for k in self.keys())


@dataclass(frozen=True)
class _PatchState:
    original_forward: Any
    transform: HeadTransform
    temperature: float
    outputs: tuple[str, ...]
    ignore_index: int
    op_kwargs: dict


def _check_outputs(outputs: Any, name: str) -> tuple[str, ...]:
    outputs = tuple(outputs or ())
    bad = [o for o in outputs if o not in STAT_OUTPUTS]
    if bad:
        raise ValueError(f"`{name}` may hold {list(STAT_OUTPUTS)}; got unknown {bad}")
    return outputs


def patch_model(
    model: nn.Module,
    *,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = (),
    ignore_index: int = -100,
    transform: HeadTransform | None = None,
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str = "auto",
    verify: bool = False,
) -> nn.Module:
    """Make ``model(..., labels=labels)`` return log-probs from our fused op (in place).

    Args:
        model: a transformers causal LM, possibly inside PEFT / DDP wrappers (the inner
            ``PreTrainedModel`` is patched, so wrapping it afterwards works too).
        temperature: the logits are divided by it (sampling temperature, as TRL does).
        outputs: extra per-token fields computed on every labelled call, among
            ``STAT_OUTPUTS``; a call may ask for more with ``logprob_outputs=(...)``.
        ignore_index: label value that marks positions not scored.
        transform: override the logit transform read from the config (:func:`head_transform`).
        filter_eps, deterministic, backend: passed to :func:`apo_kernels.linear_logprobs`.
        verify: run :func:`verify_patch` on a short random input and raise if the patched
            log-probs differ from the model's own logits (architectures not known here).

    Returns:
        The model passed in (patched in place; patching twice only updates the options).
    """
    check_real("`temperature`", temperature, low=0.0, low_open=True, desc="a positive finite number")
    check_options(ignore_index, filter_eps, backend)  # fail at patch time, not at the first batch
    inner = unwrap_model(model)
    output_head(inner, gather=False)  # fail now, clearly, when there is no usable head
    backbone(inner)
    state = getattr(inner, _PATCH_ATTR, None)
    original = state.original_forward if state is not None else inner.forward
    new_state = _PatchState(
        original_forward=original,
        transform=transform if transform is not None else head_transform(inner.config),
        temperature=float(temperature),
        outputs=_check_outputs(outputs, "outputs"),
        ignore_index=int(ignore_index),
        op_kwargs=dict(filter_eps=filter_eps, deterministic=deterministic, backend=backend),
    )
    object.__setattr__(inner, _PATCH_ATTR, new_state)
    if state is None:
        inner.forward = types.MethodType(_make_forward(type(inner).forward), inner)
    if verify:
        verify_patch(inner)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model` (no-op on a model that is not patched)."""
    inner = unwrap_model(model)
    if getattr(inner, _PATCH_ATTR, None) is not None:
        del inner.forward  # the instance attribute; the class's forward shows through again
        object.__delattr__(inner, _PATCH_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_model` has patched this model (or the model inside the wrapper)."""
    return getattr(unwrap_model(model), _PATCH_ATTR, None) is not None


def _make_forward(class_forward: Any) -> Any:
    # `wraps` keeps the original signature: `generate` validates its kwargs against it, and HF's
    # Trainer reads it to decide which dataset columns to keep.
    @functools.wraps(class_forward)
    def forward(self, *args: Any, labels: Tensor | None = None, shift_labels: Tensor | None = None,
                num_items_in_batch: Any = None, fused_logprobs: bool = True,
                logprob_outputs: tuple[str, ...] = (), **kwargs: Any) -> Any:
        state: _PatchState = getattr(self, _PATCH_ATTR)
        if not fused_logprobs or (labels is None and shift_labels is None):
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return state.original_forward(*args, **kwargs)
        return _logprobs_forward(self, state, args, kwargs, labels, shift_labels, num_items_in_batch,
                                 _check_outputs(logprob_outputs, "logprob_outputs"))

    return forward


def _logprobs_forward(
    model: nn.Module, state: _PatchState, args: tuple, kwargs: dict, labels: Tensor | None,
    shift_labels: Tensor | None, num_items_in_batch: Any, extra_outputs: tuple[str, ...],
) -> LogprobsCausalLMOutput:
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    kwargs["use_cache"] = False
    out = backbone(model)(*args, **kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:  # pre-shifted (context / sequence parallel): score every position
        targets = shift_labels
    wanted = set(state.outputs) | set(extra_outputs)

    def head_op(_weight: Tensor, _bias: Tensor | None, hidden: Tensor, targets: Tensor) -> tuple:
        # Runs inside the forward of the module that manages the head weight when it is sharded
        # (the FSDP2 group of the head, the head itself under ZeRO-3): the weight is then whole,
        # and that module's hooks route dW through FSDP's / DeepSpeed's reduce-scatter (and
        # re-gather it before our backward). output_head re-reads it from the module and
        # applies the gathering policy for other layouts.
        weight, bias = output_head(model)
        # A device_map can put the head on another device than the end of the backbone.
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(weight.dtype)  # e.g. an fp32 head on a bf16 backbone
        res = linear_logprobs(
            hidden, weight, targets, bias, ignore_index=state.ignore_index,
            temperature=state.temperature, logit_scale=state.transform.logit_scale,
            softcap=state.transform.softcap, return_entropy="entropy" in wanted,
            return_stats=bool(wanted - {"entropy"}), **state.op_kwargs,
        )
        return (res, None, None, None, None) if isinstance(res, Tensor) else tuple(res)

    # Not views: an FSDP2 root hooks this forward's outputs (see head_call.not_a_view).
    res = LinearLogprobsOutput(*(None if t is None else not_a_view(t)
                                 for t in call_head(model, _head_module(model), head_op, hidden, targets)))
    targets = targets.to(res.logprobs.device)
    mask = targets != state.ignore_index
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if isinstance(denom, Tensor):
        denom = denom.to(res.logprobs.device)
    loss = -res.logprobs.sum() / denom
    return LogprobsCausalLMOutput(
        loss=loss,
        logprobs=res.logprobs,
        entropy=res.entropy if "entropy" in wanted else None,
        mean_logit=res.mean_logit if "mean_logit" in wanted else None,
        is_top1=res.is_top1 if "is_top1" in wanted else None,
        log_sum_p2=res.log_sum_p2 if "log_sum_p2" in wanted else None,
        label_mask=mask,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


@torch.no_grad()
def verify_patch(model: nn.Module, *, seq_len: int = 8, atol: float | None = None) -> float:
    """Compare a patched model's log-probs with its own logits on a short random sequence.

    Catches architectures that transform their logits in a way :func:`head_transform` does not
    know. The model must be patched and its weights materialised on one device.

    Returns:
        the largest absolute difference of per-token log-probs (fp32).

    Raises:
        ValueError: the model is not patched, or the difference exceeds ``atol`` (default 1e-3
            for fp32 weights, 5e-2 for half precision).
    """
    inner = unwrap_model(model)
    state: _PatchState | None = getattr(inner, _PATCH_ATTR, None)
    if state is None:
        raise ValueError("`model` is not patched: call patch_model(model) first")
    weight, _ = output_head(inner, gather=False)  # only its shape, dtype, device (ZeRO-3 safe)
    vocab = full_shape(weight)[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(weight.device)
    was_training = inner.training
    inner.eval()
    try:
        logits = state.original_forward(input_ids=ids, use_cache=False).logits[:, :-1].float()
        ref = torch.log_softmax(logits / state.temperature, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        ours = inner(input_ids=ids, labels=ids).logprobs
    finally:
        inner.train(was_training)
    diff = float((ours - ref).abs().max())
    tol = atol if atol is not None else (1e-3 if weight.dtype == torch.float32 else 5e-2)
    if not diff <= tol:
        raise ValueError(
            f"patched log-probs of {type(inner).__name__} differ from its logits by {diff:.3g} (> {tol}): "
            f"its logit transform is not {state.transform}; pass `transform=HeadTransform(...)`"
        )
    return diff

