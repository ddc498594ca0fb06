"""``linear_logprobs``: per-token log-probs of labels under an LM head, never holding [N, V].

Two custom ops (``apo_kernels::linear_logprobs_fwd`` / ``_bwd``) carry the work, so
``torch.compile`` treats the whole thing as one opaque node instead of breaking the graph on
the data-dependent compaction of ignored tokens; autograd is registered on the forward op.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, overload

import torch
from torch import Tensor

from .backend import resolve_backend
from .checks import (
    check_label_values,
    check_linear_inputs,
    check_options,
    check_same_dtype,
    check_transform,
)
from .logprobs_passes import (
    autocast_operands,
    backward_pass,
    filter_plan,
    forward_pass,
    tile_max_buffer,
)
from .vocab_parallel import resolve_dtensor_inputs, vocab_parallel_logprobs


class LinearLogprobsOutput(NamedTuple):
    """Per-token results, each shaped like ``labels`` and 0 (False) at ignored positions.

    logprobs: fp32, ``log softmax(z)[label]``, differentiable.
    entropy: fp32, ``-sum_v p_v log p_v``, differentiable (None unless ``return_entropy``).
    mean_logit: fp32, mean over the vocabulary of the transformed logits z (None unless
        ``return_stats``); not differentiable.
    is_top1: bool, label is the first arg-max of z (None unless ``return_stats``).
    log_sum_p2: fp32, ``log sum_v p_v^2`` (None unless ``return_stats``); not differentiable.
    """

    logprobs: Tensor
    entropy: Optional[Tensor]
    mean_logit: Optional[Tensor]
    is_top1: Optional[Tensor]
    log_sum_p2: Optional[Tensor]


def _kept_rows(labels: Tensor, ignore_index: int) -> Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


_EMPTY = (0,)


@torch.library.custom_op("apo_kernels::linear_logprobs_fwd", mutates_args=())
def _forward_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
    ignore_index: int, logit_scale: float, softcap: Optional[float], temperature: float,
    with_entropy: bool, with_stats: bool, backend: str,
    filter_eps: Optional[float], deterministic: bool, record_tile_max: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden ``[N, D]``, labels ``[N]`` -> fp32 ``[N]`` logp, ``[2, N]`` normaliser (row max m
    and log s1 with lse = m + log s1, kept apart for the backward's precision), entropy,
    mean_logit, is_top1 (bool), log_sum_p2, and the Triton forward's per-tile max logits
    ``[N, tiles]`` (``record_tile_max``, for the backward's pre-skip; row i holds the i-th kept
    token, compacted order, rows past the kept count unused); optional ones are empty
    ``[0]`` when not asked for. ``filter_eps``/``deterministic`` are carried for the backward."""
    ignored = labels == ignore_index
    rows = (~ignored).nonzero().squeeze(1)
    check_label_values(labels, rows, weight.shape[0])
    outputs, tile_max = forward_pass(
        hidden, weight, bias, labels, rows, ignored, backend=backend, logit_scale=logit_scale,
        softcap=softcap, temperature=temperature, with_entropy=with_entropy,
        with_stats=with_stats, record_tile_max=record_tile_max)
    norm = torch.stack((outputs["row_max"], outputs["log_norm"]))

    def present(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        # Custom ops may not return aliased outputs: a fresh empty tensor for each absent one.
        if name in outputs:
            return outputs[name].to(dtype)
        return torch.empty(_EMPTY, device=hidden.device, dtype=dtype)

    return (outputs["logp"], norm, present("entropy"), present("mean_logit"),
            present("is_top1", torch.bool), present("log_sum_p2"), tile_max)


@_forward_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, logit_scale, softcap, temperature,
      with_entropy, with_stats, backend, filter_eps, deterministic, record_tile_max):
    n = labels.shape[0]

    def sized(present: bool, dtype: torch.dtype = torch.float32) -> Tensor:
        return hidden.new_empty((n,) if present else _EMPTY, dtype=dtype)

    return (sized(True), hidden.new_empty((2, n), dtype=torch.float32), sized(with_entropy),
            sized(with_stats), sized(with_stats, torch.bool), sized(with_stats),
            tile_max_buffer(hidden, n, weight.shape[0], record_tile_max))


@torch.library.custom_op("apo_kernels::linear_logprobs_bwd", mutates_args=())
def _backward_op(
    grad_logp: Tensor, grad_entropy: Optional[Tensor],
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
    norm: Tensor, entropy: Optional[Tensor], tile_max: Optional[Tensor],
    ignore_index: int, logit_scale: float, softcap: Optional[float], temperature: float,
    backend: str, filter_eps: Optional[float], deterministic: bool,
    needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` in the input dtypes
    (empty ``[0]`` where not needed), accumulated in fp32."""
    grad_hidden, grad_weight, grad_bias = backward_pass(
        grad_logp, grad_entropy, hidden, weight, labels, bias, _kept_rows(labels, ignore_index),
        norm[0], norm[1], entropy, tile_max, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, backend=backend, filter_eps=filter_eps,
        deterministic=deterministic, needs_hidden=needs_hidden, needs_weight=needs_weight,
        needs_bias=needs_bias)

    def cast(t: Optional[Tensor], like: Optional[Tensor]) -> Tensor:
        return t.to(like.dtype) if t is not None else hidden.new_empty(_EMPTY)

    return cast(grad_hidden, hidden), cast(grad_weight, weight), cast(grad_bias, bias)


@_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, labels, bias, norm, entropy, tile_max, ignore_index,
      logit_scale, softcap, temperature, backend, filter_eps, deterministic,
      needs_hidden, needs_weight, needs_bias):
    return (hidden.new_empty(hidden.shape if needs_hidden else _EMPTY),
            weight.new_empty(weight.shape if needs_weight else _EMPTY),
            (bias if bias is not None else weight).new_empty((weight.shape[0],) if needs_bias else _EMPTY))


def _setup_context(ctx, inputs, output) -> None:
    (hidden, weight, labels, bias, ignore_index, logit_scale, softcap, temperature,
     with_entropy, _with_stats, backend, filter_eps, deterministic, record_tile_max) = inputs
    logp, norm, entropy, mean_logit, is_top1, log_sum_p2, tile_max = output
    ctx.mark_non_differentiable(norm, mean_logit, is_top1, log_sum_p2, tile_max)
    # An output no loss used (e.g. entropy asked for as a metric, as TRL does) must arrive as
    # None, not as zeros: an entropy gradient switches off the backward's pre-skip.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, labels, bias, norm, entropy if with_entropy else None,
                          tile_max if record_tile_max else None)
    ctx.options = (ignore_index, logit_scale, softcap, temperature, backend, filter_eps,
                   deterministic)
    ctx.with_entropy = with_entropy
    ctx.param_shapes = (weight.shape, None if bias is None else bias.shape)


def _backward(ctx, grad_logp, _grad_norm, grad_entropy, *_non_differentiable):
    hidden, weight, labels, bias, norm, entropy, tile_max = ctx.saved_tensors
    shapes = (weight.shape, None if bias is None else bias.shape)
    if shapes != ctx.param_shapes:
        # A sharding wrapper (DeepSpeed ZeRO-3 re-partitions a parameter to 0 elements after its
        # module's forward) swapped the saved weight's storage between forward and backward.
        raise RuntimeError(
            f"apo_kernels.linear_logprobs: `weight` was {list(ctx.param_shapes[0])} in the forward "
            f"but is {list(weight.shape)} in the backward (bias {ctx.param_shapes[1]} -> "
            f"{shapes[1]}): a sharding wrapper (e.g. DeepSpeed ZeRO-3) released the parameter "
            "after the forward; call the op inside the owning module's forward so its hooks "
            "gather it again for the backward (patch_model does this for the LM head)"
        )
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    if not (needs_hidden or needs_weight or needs_bias):
        return (None,) * 14
    if grad_logp is None:
        grad_logp = torch.zeros_like(norm[0])
    if not ctx.with_entropy:
        grad_entropy = None
    grad_hidden, grad_weight, grad_bias = torch.ops.apo_kernels.linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, labels, bias, norm,
        entropy if grad_entropy is not None else None, tile_max, *ctx.options,
        needs_hidden, needs_weight, bool(needs_bias))
    return (grad_hidden if needs_hidden else None, grad_weight if needs_weight else None, None,
            grad_bias if needs_bias else None) + (None,) * 10


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@overload
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = ...,
                    *, return_entropy: Literal[False] = ..., return_stats: Literal[False] = ...,
                    **kwargs) -> Tensor: ...
@overload
def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = ...,
                    *, return_entropy: bool = ..., return_stats: bool = ...,
                    **kwargs) -> Tensor | LinearLogprobsOutput: ...


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    return_stats: bool = False,
    filter_eps: float | str | None = "auto",
    deterministic: bool = False,
    backend: str = "auto",
    vocab_parallel_group: object = None,
) -> Tensor | LinearLogprobsOutput:
    """Per-token ``log softmax(T(hidden @ weight.T + bias))[labels]`` without ``[N, V]`` logits.

    ``T(x) = softcap * tanh(logit_scale * x / softcap) / temperature`` (without softcap:
    ``logit_scale * x / temperature``), which covers Gemma's final softcapping, Cohere/Granite
    logit scales and sampling temperature.

    Args:
        hidden: ``[..., D]`` float32/float16/bfloat16 hidden states (any strides).
        weight: ``[V, D]`` LM head (output embedding), same dtype as ``hidden``.
        labels: ``[...]`` integer token ids (``hidden.shape[:-1]``), in ``[0, V)`` or
            ``ignore_index``. Ignored positions cost no compute, return 0 and get zero gradient.
        bias: optional ``[V]`` LM head bias (any float dtype; used in fp32).
        return_entropy: also return the (differentiable) entropy of each token's distribution.
        return_stats: also return mean logit, ``is_top1`` and ``log sum p^2`` (no gradient).
        filter_eps: backward gradient filter of the Triton backend, ``"auto"``, None or a
            number in ``[0, 1)``: a vocabulary tile is skipped when every entry of the softmax
            part of its logit gradient, ``p_v (g + e (z_v - E[z]))`` (times the transform's
            Jacobian), is at most ``filter_eps`` times the token's gradient scale
            ``(|g| + |e|) * logit_scale / temperature``. The label's one-hot term is exact and
            never filtered. ``"auto"``: 2^-12 for bf16, 2^-15 for fp16, exact (None) for fp32.
            ``None``: exact. The torch backend is always exact. From 1 on every tile would
            qualify whatever the data (``p <= 1``), so such values are refused.
        deterministic: bit-reproducible backward. The Triton backward has no atomics and is
            bit-reproducible in every mode now (docs/kernels.md); kept for the API and for
            backends that may need it.
        backend: ``"triton"`` (default on CUDA), ``"torch"`` (chunked fallback, default on CPU)
            or ``"auto"``.
        vocab_parallel_group: a ``torch.distributed`` process group over which the head is
            split by rows (Megatron's vocabulary parallelism): ``weight [V_r, D]`` / ``bias
            [V_r]`` are this rank's contiguous rows of the full head, in group-rank order
            (uneven shards allowed); ``labels`` are global ids in ``[0, sum V_r)``; ``hidden``
            and ``labels`` must be the same on every rank (checked: a clear error otherwise).
            Every rank gets the full outputs, the full ``dH`` and its own shard's ``dW``/``db``.
            A ``DTensor`` weight placed ``Shard(0)`` on a 1-D mesh selects this by itself (its
            mesh's group; gradients come back as DTensors); other DTensor layouts raise. See
            ``apo_kernels/ops/vocab_parallel.py`` and docs/vocab_parallel.md.

    Returns:
        fp32 log-probs shaped like ``labels`` when no extras are requested, else a
        ``LinearLogprobsOutput``. Gradients come back in the input dtypes, accumulated in fp32.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, like a matmul.
    """
    hidden, weight, bias, vocab_parallel_group = resolve_dtensor_inputs(
        hidden, weight, bias, vocab_parallel_group)
    if vocab_parallel_group is not None:  # checks its options itself, on every rank together
        parts = vocab_parallel_logprobs(
            hidden, weight, labels, bias, vocab_parallel_group, ignore_index=ignore_index,
            temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            return_entropy=return_entropy, return_stats=return_stats, filter_eps=filter_eps,
            deterministic=deterministic, backend=backend)
        return LinearLogprobsOutput(*parts) if return_entropy or return_stats else parts[0]
    check_linear_inputs(hidden, weight, labels, bias)
    hidden, weight = autocast_operands(hidden, weight)
    check_same_dtype(hidden, weight)
    check_transform(logit_scale, softcap, temperature)
    check_options(ignore_index, filter_eps, backend)
    resolved = resolve_backend(backend, hidden.device, shape=(
        hidden.dtype, hidden.shape[-1], weight.shape[0], labels.numel()))
    eps, record_tile_max = filter_plan(resolved, hidden.dtype, filter_eps, (hidden, weight, bias))

    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()  # kernels and gathers index with int64
    logp, _norm, entropy, mean_logit, is_top1, log_sum_p2, _tmax = torch.ops.apo_kernels.linear_logprobs_fwd(
        flat_hidden, weight, flat_labels, bias, int(ignore_index), float(logit_scale),
        None if softcap is None else float(softcap), float(temperature),
        bool(return_entropy), bool(return_stats), resolved,
        eps, bool(deterministic), record_tile_max)
    logp = logp.view(shape)
    if not (return_entropy or return_stats):
        return logp
    return LinearLogprobsOutput(
        logprobs=logp,
        entropy=entropy.view(shape) if return_entropy else None,
        mean_logit=mean_logit.view(shape) if return_stats else None,
        is_top1=is_top1.view(shape) if return_stats else None,
        log_sum_p2=log_sum_p2.view(shape) if return_stats else None,
    )
