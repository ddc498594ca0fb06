"""Run our head op through the hooks of the module that manages the head's weight.

A patched model never calls its ``lm_head`` module: the fused op reads ``lm_head.weight``
directly. Under parameter sharding that is wrong whenever the weight belongs to a group whose
hooks never ran. FSDP2 with ``fully_shard(lm_head)``: the weight is still a sharded ``DTensor``,
and gathering it with ``full_tensor()`` gives the right forward but a gradient that never goes
through FSDP's reduce-scatter (each rank keeps its own local-batch gradient: silently wrong).

The fix is forward redirection: find the module whose hooks manage the weight (its *owner*),
temporarily make the owner's ``forward`` our computation, and call the owner. Its pre-forward
unshards the weight (and casts it under a mixed-precision policy), its post-forward reshards and
registers the pre-backward unshard on our outputs, and its post-backward reduce-scatters our
``dW`` exactly as for the module's own forward.

Who the owner is depends on the wrapper; each wrapper is one *rule* in :data:`HEAD_OWNER_RULES`,
``rule(model, head, weight) -> nn.Module | None``: the module to call, or None when the rule
does not apply or the weight is usable as it is (already unsharded). A rule raises
:class:`UnsupportedHeadLayout` for a layout it recognises but cannot make correct. Adding a
wrapper is one function appended to that list (DeepSpeed ZeRO-3 is one: "the weight has
``ds_id``: the owner is the head module", :mod:`.zero3`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .zero3 import zero3_head_owner

__all__ = [
    "HEAD_OWNER_RULES",
    "UnsupportedHeadLayout",
    "call_head",
    "call_through",
    "fsdp2_owner",
    "fsdp_root",
    "gathered_fsdp_param",
    "gathered_tp_shard",
    "head_owner",
    "is_fsdp_sharded",
    "not_a_view",
    "tensor_parallel_params",
]

OwnerRule = Callable[[nn.Module, nn.Module, Tensor], "nn.Module | None"]
HeadFn = Callable[..., Sequence["Tensor | None"]]


class UnsupportedHeadLayout(ValueError):
    """A sharding layout of the LM head whose gradient apo-kernels cannot make correct."""


def _fsdp_states(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``(module, FSDPState)`` for every FSDP2 module in ``model`` (each state once)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return []
    seen: set[int] = set()
    found = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            if id(state) not in seen:
                seen.add(id(state))
                found.append((module, state))
    return found


def _param_groups(state: Any) -> list[Any]:
    # torch >= 2.10 has a list (per-parameter meshes); older releases one group or None.
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _managing_state(model: nn.Module, weight: Tensor) -> tuple[Any, Any] | None:
    """The FSDP2 state and ``FSDPParam`` that manage ``weight`` in any of its states (sharded,
    resharded to a smaller mesh after forward, unsharded), or None.

    Reads FSDP2 internals (``FSDPParam`` of torch 2.13, tested; the single-group layout of
    older releases is read too); when they are not the ones known here, a DTensor weight
    raises rather than being gathered behind FSDP's back.
    """
    try:
        for _module, state in _fsdp_states(model):
            for group in _param_groups(state):
                for fsdp_param in group.fsdp_params:
                    forms = (fsdp_param.sharded_param,
                             getattr(fsdp_param, "_sharded_post_forward_param", None),
                             getattr(fsdp_param, "_unsharded_param", None))
                    if any(f is weight for f in forms):
                        return state, fsdp_param
    except AttributeError as err:
        if _is_dtensor(weight):
            raise UnsupportedHeadLayout(
                f"cannot tell whether FSDP2 shards the LM head weight in this torch version "
                f"({err}); apo-kernels was tested with the FSDP2 internals of torch 2.13"
            ) from err
    return None


def is_fsdp_sharded(model: nn.Module, weight: Tensor) -> bool:
    """Whether ``weight`` is an FSDP2 parameter in its sharded form (FSDP's own ``Shard(0)``
    across the data-parallel mesh), as opposed to its unsharded form or a parameter FSDP does
    not manage. Under FSDP2 x tensor parallelism the unsharded form is itself a DTensor: the
    tensor-parallel shard, ``Shard(0)`` on the TP mesh for a vocabulary-parallel head."""
    if not _is_dtensor(weight):  # FSDP2's sharded forms are DTensors: skip the module walk
        return False
    found = _managing_state(model, weight)
    return found is not None and getattr(found[1], "_unsharded_param", None) is not weight


def tensor_parallel_params(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that tensor parallelism shards: DTensors that FSDP2 does
    not manage, or that were DTensors already when FSDP2 took them (FSDP2 x TP)."""
    names = []
    for name, param in model.named_parameters():
        if _is_dtensor(param):
            found = _managing_state(model, param)
            if found is None or getattr(found[1], "is_dtensor", False):
                names.append(name)
    return names


def _is_dtensor(t: object) -> bool:
    # A per-call import (a dict lookup once loaded), not a cached function: torch.compile warns
    # on functools.cache wrappers in traced code.
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def fsdp2_owner(model: nn.Module, head: nn.Module, weight: Tensor) -> nn.Module | None:
    """FSDP2 rule: the ``fully_shard`` module to call when ``weight`` is currently sharded.

    None when no FSDP2 group manages the weight, or when it is unsharded now (its group's
    pre-forward already ran: root / final-norm / embedding groups during the model's forward):
    then the op reads the plain unsharded parameter and FSDP's post-backward reduce-scatters
    its gradient as for any module's.

    Raises:
        UnsupportedHeadLayout: the weight is sharded and the group's hooks cannot be run for
            the head alone (it belongs to a module whose forward is running, e.g. the root
            called through its backbone only).
    """
    if not _is_dtensor(weight):
        # Sharded forms (also resharded to a smaller mesh) are DTensors; a plain tensor is
        # unsharded or unmanaged: usable as it is, without walking every module.
        return None
    found = _managing_state(model, weight)
    if found is None:
        return None
    state, fsdp_param = found
    if getattr(fsdp_param, "_unsharded_param", None) is weight:
        return None  # unsharded now: the owner's pre-forward has run
    return _module_to_call(state, fsdp_param, head)


def _module_to_call(state: Any, fsdp_param: Any, head: nn.Module | None) -> nn.Module:
    """The module of ``state``'s group to call for ``fsdp_param``: the head itself if it is in
    the group (its hooks then see "the head ran"), else the group's module that holds the
    parameter, when it does not contain the head (calling an ancestor of the running code)."""
    modules = tuple(getattr(state, "_modules", ()))
    info = fsdp_param._module_info
    holders = [info.module, *getattr(info, "shared_modules", ())]
    candidates = ([head] if head is not None else []) + [m for m in holders if m is not head]
    for module in candidates:
        if module in modules and not any(_is_ancestor(module, h) for h in [*holders, head] if h is not None):
            return module
    names = ", ".join(type(m).__name__ for m in modules) or "?"
    raise UnsupportedHeadLayout(
        f"the LM head weight is sharded by an FSDP2 group ({names}) whose hooks cannot be run "
        "for the head alone (the group's module contains the running model, e.g. the root "
        "called through its backbone only): call the model itself (`model(..., labels=...)`), "
        "or wrap the head in its own group: fully_shard(model.lm_head) before fully_shard(model)"
    )


def _is_ancestor(module: nn.Module, head: nn.Module) -> bool:
    return module is not head and any(m is head for m in module.modules())


def gathered_fsdp_param(weight: Tensor) -> tuple[nn.Module, nn.Module, str] | None:
    """When ``weight`` is ``p.full_tensor()`` (or a cast of it) of a parameter ``p`` that an
    FSDP2 group holds sharded, ``(module to call, module holding p, p's attribute name)``;
    else None.

    For callers handed an already gathered head (TRL's fused forward gathers a sharded
    ``lm_head.weight`` itself): the gather's gradient would skip FSDP's reduce-scatter, so the
    caller recomputes through :func:`call_through` on the returned module, reading the
    unsharded parameter from the holder. Finds the FSDP state through torch's registry of
    composable states (private; None when it is missing).
    """
    param = _gathered_leaf(weight)
    if param is None:
        return None
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return None
    seen: set[int] = set()
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if state is None or id(state) in seen or not hasattr(state, "_modules"):
            continue
        seen.add(id(state))
        for group in _param_groups(state):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                forms = (getattr(fsdp_param, "sharded_param", None),
                         getattr(fsdp_param, "_sharded_post_forward_param", None))
                if any(f is param for f in forms):
                    info = fsdp_param._module_info
                    return _module_to_call(state, fsdp_param, None), info.module, info.param_name
    return None


# The autograd nodes of ``p.full_tensor()`` (torch 2.13), optionally followed by a dtype cast.
_FULL_TENSOR_CHAIN = ("_ToTorchTensorBackward", "RedistributeBackward")


def gathered_tp_shard(weight: Tensor | None) -> Tensor | None:
    """When ``weight`` is ``p.full_tensor()`` (or a dtype cast of it) of a parameter ``p`` placed
    ``Shard(0)`` on a 1-D mesh (a tensor-parallel, vocabulary-split head), ``p``; else None.

    For callers handed an already gathered head (TRL's fused forward gathers any DTensor
    ``lm_head.weight`` with ``full_tensor()``): ``p`` itself runs vocabulary-parallel, holding
    ``V/P`` rows instead of the whole head and its full-size gradient. Only the exact autograd
    chain of a gather (and a cast) is accepted, so any other computation on the weight is
    never mistaken for it. Check :func:`gathered_fsdp_param` first: an FSDP2-sharded
    parameter has the same placement and is not a vocabulary shard.
    """
    leaf = _gathered_leaf(weight)
    if leaf is None:
        return None
    from ..ops.vocab_parallel import is_vocab_sharded

    return leaf if is_vocab_sharded(leaf) else None


def _single_input(node: Any) -> Any:
    inputs = [n for n, _ in node.next_functions if n is not None]
    return inputs[0] if len(inputs) == 1 else None


def _gathered_leaf(weight: Tensor | None) -> Tensor | None:
    """The DTensor parameter ``p`` when ``weight`` is exactly ``p.full_tensor()`` (optionally
    followed by a dtype cast) with ``p``'s full shape; else None. Only the exact autograd chain
    of a gather is accepted: a slice, transpose or scaling of the gathered weight is some other
    computation and must never be recomputed from ``p``."""
    if weight is None or not weight.requires_grad or weight.grad_fn is None:
        return None
    node = weight.grad_fn
    if type(node).__name__ == "ToCopyBackward0":
        node = _single_input(node)
    for name in _FULL_TENSOR_CHAIN:
        if node is None or type(node).__name__ != name:
            return None
        node = _single_input(node)
    leaf = getattr(node, "variable", None)
    if leaf is None or not _is_dtensor(leaf) or tuple(leaf.shape) != tuple(weight.shape):
        return None
    return leaf


def _fsdp1_rule(model: nn.Module, head: nn.Module, weight: Tensor) -> nn.Module | None:
    """FSDP1 (``FullyShardedDataParallel``, deprecated): refused when it holds the head sharded
    where we read it (a head in its own unit, or a root unit whose forward is not running);
    a head in the root unit, read during the model's forward, is unsharded and correct."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    if isinstance(head, FullyShardedDataParallel) or (
        weight.numel() == 0 and any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    ):
        raise UnsupportedHeadLayout(
            "FSDP1 (FullyShardedDataParallel) holds the LM head sharded here (a head wrapped in its "
            "own unit, or the backbone and head called outside the root unit's forward): its "
            "gradient would bypass FSDP's reduce-scatter. Use FSDP2 (torch.distributed.fsdp."
            "fully_shard; accelerate: fsdp_version: 2), or keep the head in the root FSDP1 unit "
            "and call the patched model itself"
        )
    return None


def _zero3_rule(model: nn.Module, head: nn.Module, weight: Tensor) -> nn.Module | None:
    """DeepSpeed ZeRO-3: the head module itself (see :func:`.zero3.zero3_head_owner`)."""
    return zero3_head_owner(head)


# Tried in order; the first to return a module decides. Other wrappers append their rule.
HEAD_OWNER_RULES: list[OwnerRule] = [fsdp2_owner, _fsdp1_rule, _zero3_rule]


def head_owner(model: nn.Module, head: nn.Module, weight: Tensor | None = None) -> nn.Module | None:
    """The module to call so that its hooks make ``head``'s weight usable, or None (use it as is).

    Args:
        model: the module tree searched for wrappers (the patched model).
        head: the output embedding module (``model.get_output_embeddings()``).
        weight: its weight (default ``head.weight``).

    Raises:
        UnsupportedHeadLayout: a rule recognises the layout and cannot make it correct.
    """
    weight = head.weight if weight is None else weight
    for rule in HEAD_OWNER_RULES:
        owner = rule(model, head, weight)
        if owner is not None:
            return owner
    return None


def call_head(model: nn.Module, head: nn.Module, fn: HeadFn, *inputs: Tensor) -> tuple[Tensor | None, ...]:
    """``fn(weight, bias, *inputs)``, run inside the hooks of the head weight's owner if needed.

    Args:
        model: searched for the owner (see :func:`head_owner`).
        head: the output embedding module; ``fn`` receives its ``weight`` and ``bias`` (or None)
            as they are while the owner's forward runs (unsharded, cast by a mixed-precision
            policy).
        fn: returns a tuple of tensors or None (None entries are carried around the hooks,
            which only take tensors).
        inputs: tensors passed through the owner's call (floating ones are cast by FSDP's
            ``cast_forward_inputs``; those requiring grad anchor its post-backward hook).

    Returns:
        ``fn``'s tuple.
    """
    owner = head_owner(model, head)
    if owner is None:
        return tuple(fn(head.weight, _bias(head), *inputs))
    # Inside the owner's forward its pre-hook has swapped the unsharded weight into `head`.
    return call_through(owner, lambda *args: fn(head.weight, _bias(head), *args), *inputs)


# Eager under torch.compile (a graph break): swapping `forward` on an instance is not something
# Dynamo can trace (it raised AttributeError on the restore), and the owner's hooks (FSDP2's,
# DeepSpeed's) run eagerly under torch.compile anyway.
@torch.compiler.disable
def call_through(module: nn.Module, fn: Callable[..., Sequence[Tensor | None]],
                 *inputs: Tensor) -> tuple[Tensor | None, ...]:
    """``fn(*inputs)`` run as ``module``'s forward: ``module(*inputs)`` with its hooks.

    ``module.forward`` is replaced by an instance attribute for this one call and restored
    exactly (another wrapper's instance ``forward`` included), also when ``fn`` raises. Hooks
    flatten and map over outputs, so ``fn`` returns a tuple of tensors or None; the None
    entries are carried around the call.
    """
    absent: list[int] = []

    def redirected(*args: Tensor) -> tuple[Tensor, ...]:
        out = tuple(fn(*args))
        absent[:] = [i for i, t in enumerate(out) if t is None]
        return tuple(not_a_view(t) for t in out if t is not None)

    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = redirected
    try:
        with _without_tensor_parallel_hooks(module):
            present = list(module(*inputs))
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward
    it = iter(present)
    return tuple(None if i in absent else next(it) for i in range(len(present) + len(absent)))


def not_a_view(t: Tensor) -> Tensor:
    """``t``, or a copy of it when it is a view that requires grad.

    FSDP2 registers its pre-backward hook on each grad-requiring output of a wrapped module and
    warns for views: an in-place op on a view would drop that hook (no re-gather before
    backward). The op's outputs are ``[B, T]`` views of ``[N]`` results; copying them costs
    ``N`` elements each, nothing next to the head's ``N x V`` work.
    """
    return t.clone() if t.requires_grad and t._base is not None else t


def _is_tensor_parallel_hook(hook: Any) -> bool:
    """A forward (pre-)hook that ``distribute_module`` registers for a tensor-parallel style
    (``ColwiseParallel`` & co. via ``parallelize_module``): its input/output functions."""
    return (getattr(hook, "__module__", None) == "torch.distributed.tensor._api"
            and getattr(hook, "__qualname__", "").startswith("distribute_module."))


@contextlib.contextmanager
def _without_tensor_parallel_hooks(module: nn.Module) -> Iterator[None]:
    """Hide ``module``'s tensor-parallel input/output hooks for one redirected call.

    They belong to the module's own forward (a ``ColwiseParallel`` head: make the input a
    replicated DTensor and pass ONLY it on, redistribute the single logits output), not to our
    op, which takes the weight's ``Shard(0)`` rows and replicated hidden states as they are
    (exactly as when the head is not called at all: tensor parallelism without FSDP). Under
    FSDP2 x TP with the head in its own ``fully_shard`` group, running them dropped every input
    but the first (a TypeError inside the op). FSDP's and DeepSpeed's hooks stay.
    """
    tables = (module._forward_pre_hooks, module._forward_hooks)
    saved = [dict(t) for t in tables]
    hidden = [[k for k, h in t.items() if _is_tensor_parallel_hook(h)] for t in tables]
    if not any(hidden):
        yield
        return
    for table, keys in zip(tables, hidden):
        for key in keys:
            del table[key]
    try:
        yield
    finally:
        for table, before in zip(tables, saved):  # the same hooks, in the same order
            table.clear()
            table.update(before)


def fsdp_root(model: nn.Module, contains: nn.Module) -> nn.Module | None:
    """The outermost FSDP2 module of ``model`` (itself or its first ``fully_shard`` module in
    pre-order), when it strictly contains ``contains`` (e.g. the backbone) and is not running
    its forward now; else None (``contains`` itself the outermost: calling it runs its hooks).

    Code that calls a model's backbone and head separately (not ``model(...)``) must run inside
    this module's forward (:func:`call_through`): only its pre-forward unshards the parameters
    that the root group holds (embeddings, final norm, a head in the root group).
    """
    for module, state in _fsdp_states(model):
        training_state = getattr(getattr(state, "_training_state", None), "name", "IDLE")
        if (training_state == "FORWARD" or module is contains
                or not any(m is contains for m in module.modules())):
            return None
        return module
    return None


def _bias(head: nn.Module) -> Tensor | None:
    bias = getattr(head, "bias", None)
    return bias if isinstance(bias, Tensor) else None
