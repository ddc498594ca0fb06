"""DeepSpeed ZeRO-3: which module must call the LM head, and what a partitioned head looks like.

Under ZeRO-3 every parameter is partitioned across the data-parallel ranks: outside its
module's forward a parameter holds 0 elements (``param.ds_shape`` keeps the full shape) and
DeepSpeed's module hooks gather it for the forward, release it after, gather it again when the
gradient reaches the module's outputs, and reduce-scatter its gradient. Reading
``lm_head.weight`` and handing it to our op outside those hooks gives a 0-element weight (or,
within a forward, one that is released before the backward runs: the backward then sees 0
elements). So the head is computed *through the head module*: its hooks gather the weight for
our forward, re-gather it before our backward, and route dW through ZeRO-3's reduce-scatter.

A frozen reference model needs only a forward, read while the *policy's* head op runs: its head
is held whole for that op with ``GatheredParameters`` (:func:`gathered_for_forward`), and a
reference is given DeepSpeed hooks by :func:`initialize_reference`.

Recognising the layout is duck-typed on DeepSpeed's attributes; ``deepspeed`` (an optional extra,
``pip install 'apo-kernels[zero3]'``) is imported only where a ZeRO-3 parameter must be gathered
or a reference initialised.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._optional import require

__all__ = [
    "full_shape",
    "gathered_for_forward",
    "initialize_reference",
    "is_deepspeed_engine",
    "is_zero3_gathered",
    "is_zero3_param",
    "zero3_head_owner",
]


def is_zero3_param(t: object) -> bool:
    """Whether ``t`` is a parameter that DeepSpeed ZeRO-3 partitions (it carries ``ds_id``)."""
    return isinstance(t, Tensor) and hasattr(t, "ds_id")


def full_shape(t: Tensor) -> torch.Size:
    """The unpartitioned shape: ``ds_shape`` for a ZeRO-3 parameter, else ``t.shape``."""
    return t.ds_shape if is_zero3_param(t) else t.shape


def is_zero3_gathered(t: Tensor) -> bool:
    """Whether a ZeRO-3 parameter currently holds all its elements (inside its module's
    forward, or inside ``deepspeed.zero.GatheredParameters``). True for any other tensor."""
    return not is_zero3_param(t) or t.numel() == math.prod(t.ds_shape)


def zero3_head_owner(head: nn.Module) -> nn.Module | None:
    """The module whose call gathers the LM head's ZeRO-3 parameters, or None (not ZeRO-3).

    The owner is the head itself: ``deepspeed.initialize`` installs its gather / release /
    pre-backward / post-backward hooks on every submodule, the head included (its tied weight
    too: a tied ``lm_head.weight`` is one of the head's own parameters).

    Args:
        head: the output embedding (``model.get_output_embeddings()``).

    Returns:
        ``head`` when its weight or bias is a ZeRO-3 parameter, None otherwise (ZeRO-1/2, DDP,
        one process: the parameters are whole and the op can use them directly).

    Raises:
        ValueError: the head's parameters are ZeRO-3 partitioned but the head carries no
            DeepSpeed hooks (built under ``deepspeed.zero.Init`` or loaded with
            ``HfDeepSpeedConfig`` but never passed to ``deepspeed.initialize``, or inside a
            module declared a ZeRO-3 leaf with ``set_z3_leaf_modules``): nothing would gather
            the weight for the backward.
    """
    params = [p for p in (getattr(head, "weight", None), getattr(head, "bias", None))
              if is_zero3_param(p)]
    if not params:
        return None
    if "ds_id" not in vars(head):  # DeepSpeed's hook registration sets module.ds_id
        raise ValueError(
            f"the LM head ({type(head).__name__}) has DeepSpeed ZeRO-3 partitioned parameters but "
            "no DeepSpeed module hooks, so nothing gathers its weight for the forward and backward: "
            "call the model through `deepspeed.initialize(model=...)` (the HF Trainer / Accelerate "
            "DeepSpeed plugin do this; for a frozen reference model: "
            "`apo_kernels.integrations.zero3.initialize_reference(model, ds_config)`, which "
            "PreferenceTrainer calls), and do not declare the head or its parents ZeRO-3 leaf "
            "modules (`set_z3_leaf_modules`)"
        )
    return head


@contextlib.contextmanager
def gathered_for_forward(*tensors: Tensor | None) -> Iterator[None]:
    """Hold the ZeRO-3 parameters among ``tensors`` whole for a computation without backward.

    For a frozen reference model's head, which our op reads under ``no_grad`` while the
    *policy's* head module is running (so the reference head's own hooks cannot be used:
    calling it would register its backward hooks on the policy's differentiable outputs).
    ``deepspeed.zero.GatheredParameters`` gathers them on entry and partitions them again on
    exit (no rank modifies them). Nothing computed inside may keep them for a backward: once
    partitioned again they hold 0 elements.

    Other tensors (not ZeRO-3, or already whole) are left alone, and without any ZeRO-3
    parameter DeepSpeed is not imported.
    """
    params = [t for t in tensors if t is not None and not is_zero3_gathered(t)]
    if not params:
        yield
        return
    # Present in practice: only DeepSpeed puts `ds_id` on a parameter.
    deepspeed = require("deepspeed", "zero3", "gathering a ZeRO-3 reference head")
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def initialize_reference(model: nn.Module, ds_config: dict[str, Any]) -> nn.Module:
    """A frozen reference model for a ZeRO-3 run: ``deepspeed.initialize`` without an optimizer.

    Its parameters are partitioned across the ranks like the policy's (a model that
    ``from_pretrained`` already partitioned while loading gets the hooks it lacks), and its
    module hooks gather each layer for the forward. Not for ZeRO-1/2 (the model is whole there:
    keep it as it is). Every rank must then run the reference on the same number of batches:
    its gathers are collectives.

    Args:
        model: the reference causal LM (fp32 or half; DeepSpeed casts it as ``ds_config`` says).
        ds_config: the training run's DeepSpeed config (the HF Trainer's, with its ``"auto"``
            values filled from the training arguments). Its optimizer and scheduler are dropped,
            and so is any value still ``"auto"`` (those are filled from the optimizer or the
            model at training start: DeepSpeed's defaults stand in).

    Returns:
        the DeepSpeed engine wrapping ``model``, in eval mode, parameters frozen.
    """
    def without_auto(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_auto(v) for k, v in value.items() if v != "auto"}
        return value

    config = without_auto({k: v for k, v in copy.deepcopy(ds_config).items()
                           if k not in ("optimizer", "scheduler")})
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"initialize_reference is for ZeRO stage 3; `ds_config` has stage {stage!r}")
    if "train_batch_size" not in config and "train_micro_batch_size_per_gpu" not in config:
        config["train_micro_batch_size_per_gpu"] = 1  # required by DeepSpeed, unused by a forward
    deepspeed = require("deepspeed", "zero3", "initialize_reference")
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def is_deepspeed_engine(model: object) -> bool:
    """Whether ``model`` is a DeepSpeed engine (duck-typed: no import of DeepSpeed)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)
