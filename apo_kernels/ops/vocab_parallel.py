"""Vocabulary-parallel ``linear_logprobs``: the LM head split by rows across a process group.

Megatron's layout: rank ``r`` of the group holds ``weight [V_r, D]`` (and ``bias [V_r]``), the
contiguous rows ``[off_r, off_r + V_r)`` of the full ``[V, D]`` head in group-rank order
(uneven shards allowed, as ``torch.chunk`` and ``DTensor`` make them); ``labels`` are global
token ids; ``hidden`` and ``labels`` are replicated in the group. Every rank returns the full
outputs; the backward gives every rank the full ``dH`` (all-reduced) and its own ``dW``/``db``.

    1. One ``all_gather`` of a small float64 vector per rank: V_r (-> offsets, V), N, D, the
       options, and checksums of ``hidden``, ``labels`` and ``weight`` (the same head on every
       rank is the whole head passed by mistake: raises). A rank whose inputs differ (not
       replicated: e.g. an FSDP-sharded weight passed as a vocabulary shard, where each rank
       holds its own batch) makes EVERY rank raise, so nothing is silently wrong and no rank
       hangs in a later collective.
    2. Each rank runs the ordinary single-head passes (``logprobs_passes``) on its shard, with
       labels relative to the shard; a token whose label another shard holds gets the label
       ``V_r`` (outside the shard: no one-hot term, no label logit).
    3. One ``all_gather`` of the per-token partials ``[K, N]`` fp32 (logp where owned, row max
       m_r, log s1 ln_r, and when asked entropy, mean logit, is_top1, log sum p^2), merged
       identically on every rank: lse_r = m_r + ln_r, lse = logsumexp_r lse_r,
       w_r = exp(lse_r - lse), logp = logp_owner + log w_owner, entropy = sum_r w_r (H_r -
       log w_r) (mixture entropy), mean = sum_r mean_r V_r / V, log sum p^2 = logsumexp_r
       (2 log w_r + lsp2_r), is_top1 = top1_owner and no earlier shard's max reaches the label
       logit and no later shard's max exceeds it (first arg-max over increasing ids).
    4. Backward: the single-head backward on the shard against the GLOBAL normaliser (row max
       M = max_r m_r, log s1 = lse - M, E[z] from the global entropy), then
       ``all_reduce(SUM)`` of dH (fp32, before the cast to the input dtype).

Communication per call: 2 small all-gathers forward (``[16]`` float64 and ``[K, N]`` fp32 per
rank, K <= 7), one ``[N, D]`` fp32 all-reduce backward. Memory per rank scales with V/P.

This is a ``torch.autograd.Function`` around ``torch.distributed`` collectives, not a custom
op: ``torch.compile`` graph-breaks here (the single-head path stays one opaque custom op).
Every rank must call it with the same options and run the backward (as with any tensor-
parallel layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backend import resolve_backend
from .checks import (
    check_label_values,
    check_linear_inputs,
    check_options,
    check_same_dtype,
    check_transform,
)
from .logprobs_passes import autocast_operands, backward_pass, filter_plan, forward_pass

__all__ = ["intended_group", "is_vocab_sharded", "resolve_dtensor_inputs", "share_input_errors",
           "vocab_parallel_logprobs"]

# Relative tolerance of the replication check of `hidden` (identical tensors give identical
# float64 sums; a sharded batch differs at O(1)).
_REPLICATION_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# DTensor inputs.

def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _layout(t: Tensor) -> str:
    return f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh"


def _is_vocab_shard(t: Tensor) -> bool:
    from torch.distributed.tensor import Shard

    # type() is: _StridedShard (FSDP2 x TP) subclasses Shard and is not a plain row split.
    return (t.device_mesh.ndim == 1 and len(t.placements) == 1
            and type(t.placements[0]) is Shard and t.placements[0].dim == 0)


def is_vocab_sharded(weight: object) -> bool:
    """Whether ``weight`` is a DTensor placed ``Shard(0)`` on a 1-D mesh (a vocabulary shard)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(weight, dtensor) and _is_vocab_shard(weight)


def intended_group(weight: object, group: object) -> object:
    """The process group a call with this ``weight`` and ``vocab_parallel_group`` runs over: the
    argument, else the mesh group of a ``Shard(0)`` DTensor weight, else None (one process).
    Never raises: it only tells callers whom to warn when their own input checks fail."""
    if group is not None:
        return group
    if is_vocab_sharded(weight):
        try:
            return weight.device_mesh.get_group()
        except (RuntimeError, ValueError):  # not a usable mesh: resolve_dtensor_inputs says why
            return None
    return None


def share_input_errors(group: object, error: Optional[BaseException], device: object = None) -> None:
    """Raise on EVERY rank of ``group`` when any rank found a problem in its inputs.

    A caller that validates its arguments before its first collective (the preference loss:
    loss options, layouts, the reference) would otherwise raise on the ranks whose inputs are
    wrong (e.g. labels that are not replicated) and leave the others waiting in that collective
    until the process-group timeout. One all-reduce of a flag per call; nothing without a group.
    ``device``: where the flag goes, the device of the caller's tensors (this rank's GPU under
    NCCL, as the op's own collectives use); else this process's current CUDA device under NCCL.
    """
    if group is None or not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    if not (isinstance(device, torch.device) and device.type == "cuda"):
        on_gpu = torch.cuda.is_available() and "nccl" in str(dist.get_backend(group))
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    flag = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if flag.item() != 0:
        raise ValueError(
            f"another rank of vocab_parallel_group rejected its inputs (see its error); this rank "
            f"({dist.get_rank(group)}) stops too so that no rank waits in a collective")


def resolve_dtensor_inputs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], group: object,
    names: tuple[str, str, str] = ("hidden", "weight", "bias"),
) -> tuple[Tensor, Tensor, Optional[Tensor], object]:
    """DTensor inputs -> local tensors (differentiably: gradients come back as DTensors with
    the same placements) and the vocabulary-parallel group (None: single process).

    ``weight`` ``Shard(0)`` on a 1-D mesh: its local rows, group = the mesh's group. ``bias``:
    the same layout on the same mesh. ``hidden``: replicated on every mesh dimension. Any
    other layout raises ValueError naming it.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return hidden, weight, bias, group
    nh, nw, nb = names
    mesh = None
    if isinstance(weight, dtensor):
        if not _is_vocab_shard(weight):
            raise ValueError(
                f"`{nw}` is a DTensor with {_layout(weight)}: only Shard(0) on a 1-D mesh (a "
                "vocabulary-parallel head, rows split across ranks) is supported; redistribute "
                "it, or pass .full_tensor() for a whole head")
        mesh = weight.device_mesh
        mesh_group = mesh.get_group()
        if group is not None and (dist.get_process_group_ranks(group)
                                  != dist.get_process_group_ranks(mesh_group)):
            raise ValueError(
                f"vocab_parallel_group (ranks {dist.get_process_group_ranks(group)}) is not the "
                f"group of `{nw}`'s device mesh (ranks {dist.get_process_group_ranks(mesh_group)})")
        mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if mesh_ranks != dist.get_process_group_ranks(mesh_group):
            # DTensor gives the i-th block of rows to mesh coordinate i; the op orders the
            # blocks by rank in the group, which sorts its ranks: taking one order for the
            # other would put every label in the wrong block (silently wrong log-probs).
            raise ValueError(
                f"`{nw}` is a DTensor on a device mesh whose rank order {mesh_ranks} is not its "
                f"process group's order {dist.get_process_group_ranks(mesh_group)}: the "
                "vocabulary-parallel op takes the blocks of rows in group-rank order; use a "
                "mesh in increasing rank order, or pass the local rows with "
                "vocab_parallel_group= in group-rank order")
        group = mesh_group
        weight = weight.to_local()
    if isinstance(bias, dtensor):
        if mesh is None or not _is_vocab_shard(bias) or bias.device_mesh != mesh:
            raise ValueError(
                f"`{nb}` is a DTensor with {_layout(bias)}: it must be Shard(0) on the 1-D mesh "
                f"of a vocabulary-parallel `{nw}` (a DTensor placed Shard(0) likewise)")
        bias = bias.to_local()
    if isinstance(hidden, dtensor):
        from torch.distributed.tensor import Replicate

        if not all(isinstance(p, Replicate) for p in hidden.placements):
            raise ValueError(
                f"`{nh}` is a DTensor with {_layout(hidden)}: the head needs every rank's "
                "hidden states replicated (e.g. redistribute(placements=[Replicate()]) after "
                "sequence parallelism)")
        hidden = hidden.to_local()
    return hidden, weight, bias, group


# ---------------------------------------------------------------------------------------------
# Step 1: what the ranks agree on.

# Layout of the per-rank metadata vector (float64; the label checksum travels as int64 bits).
(_ERR, _VR, _N, _D, _GRAD, _FLAGS, _SCALE, _CAP, _TEMP, _IGNORE, _LABELS, _HSUM, _HABS, _HSQ,
 _WSUM, _WABS) = range(16)
_META = 16


def _hidden_checksums(hidden: Tensor) -> Tensor:
    """float64 ``[sum h, sum |h|, sum h^2]`` over ``[N, D]``: reductions accumulated in float64
    (``dtype=``), no float64 copy of ``hidden``."""
    h = hidden.detach()
    return torch.stack((h.sum(dtype=torch.float64),
                        torch.linalg.vector_norm(h, 1, dtype=torch.float64),
                        torch.linalg.vector_norm(h, 2, dtype=torch.float64).square()))


def _labels_checksum(labels: Tensor) -> Tensor:
    """int64 ``sum_i labels_i (2 i + 1)`` (wrapping): values and order, compared exactly."""
    weights = torch.arange(labels.numel(), device=labels.device, dtype=torch.int64) * 2 + 1
    return (labels * weights).sum().reshape(1)


@dataclass(frozen=True)
class _Group:
    """The agreed facts: this rank, the shards' sizes and offsets (group-rank order)."""

    group: object
    rank: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def vocab(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


def _agree(group, hidden: Optional[Tensor], labels: Optional[Tensor], weight: Optional[Tensor],
           vocab_r: int, error: Optional[BaseException], device: torch.device, needs_grad: bool,
           flags: int, options: tuple[float, float, float, int]) -> _Group:
    meta = torch.zeros(_META, device=device, dtype=torch.float64)
    meta[_ERR] = float(error is not None)
    if error is None:
        meta[_VR], meta[_N], meta[_D] = vocab_r, hidden.shape[0], hidden.shape[1]
        meta[_GRAD], meta[_FLAGS] = float(needs_grad), flags
        meta[_SCALE:_IGNORE + 1] = torch.tensor(options, dtype=torch.float64)
        meta[_LABELS:_LABELS + 1] = _labels_checksum(labels).view(torch.float64)
        meta[_HSUM:_HSQ + 1] = _hidden_checksums(hidden)
        w = weight.detach()  # one read of this rank's rows: is it the same head on every rank?
        meta[_WSUM] = w.sum(dtype=torch.float64)
        meta[_WABS] = torch.linalg.vector_norm(w, 1, dtype=torch.float64)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    table = torch.stack(gathered).cpu()  # [P, 16]: one host sync per call
    failed = [r for r in range(world) if table[r, _ERR] != 0]
    if failed:
        if error is not None:
            raise error
        raise ValueError(
            f"rank(s) {failed} of vocab_parallel_group rejected their inputs (see their error); "
            f"this rank ({rank}) stops too so that no rank waits in a collective")
    sizes = tuple(int(v) for v in table[:, _VR])
    _check_agreement(table, rank, sizes)
    offsets = tuple(int(sum(sizes[:r])) for r in range(world))
    return _Group(group, rank, sizes, offsets)


def _check_agreement(table: Tensor, rank: int, sizes: tuple[int, ...]) -> None:
    """Raise the same ValueError on every rank when the ranks' inputs are not one layout."""
    def differs(col: int) -> list[int]:
        ref = table[0, col]
        return [r for r in range(table.shape[0]) if not (
            table[r, col] == ref or (torch.isnan(table[r, col]) and torch.isnan(ref)))]

    for col, what in ((_N, "number of tokens"), (_D, "hidden size D")):
        if differs(col):
            values = [int(v) for v in table[:, col]]
            raise ValueError(f"the {what} differs across vocab_parallel_group ({values} by rank): "
                             "`hidden` must be replicated in the group")
    if differs(_FLAGS) or any(differs(c) for c in range(_SCALE, _IGNORE + 1)):
        raise ValueError(
            "the ranks of vocab_parallel_group called linear_logprobs with different options "
            "(return_entropy/return_stats, logit_scale, softcap, temperature or ignore_index)")
    if differs(_GRAD):
        raise ValueError("`hidden` requires grad on some ranks of vocab_parallel_group and not "
                         "on others: the backward all-reduces dH, every rank must take part")
    # The label checksum is int64 bits carried in a float64 slot: compare the bits. (As floats,
    # every negative checksum, e.g. any batch with ignore_index -100, is a NaN, and NaNs would
    # have to be treated as equal: differing labels would pass unseen.)
    label_sums = table[:, _LABELS].contiguous().view(torch.int64)
    bad_labels = [r for r in range(table.shape[0]) if label_sums[r] != label_sums[0]]
    if bad_labels:
        raise ValueError(
            f"`labels` differ across vocab_parallel_group (rank(s) {bad_labels} vs rank 0): "
            "labels are global token ids replicated in the group")
    w = table[:, _WSUM:_WABS + 1]
    if table.shape[0] > 1 and bool((w == w[0]).all()) and bool(w[0, 1] > 0):
        # Identical non-zero rows on every rank: the whole head passed with the group (it would
        # be taken for P blocks of a P*V vocabulary: every log-prob off by log P).
        raise ValueError(
            f"every rank of vocab_parallel_group passed the same `weight` ({sizes[0]} rows): "
            "vocab_parallel_group means each rank holds its own block of rows of the head. Pass "
            "this rank's rows (e.g. torch.chunk(weight, P)[rank]), or the whole head without "
            "vocab_parallel_group")
    h = table[:, _HSUM:_HSQ + 1]
    scale = h[0, 1].abs() + 1e-30  # sum |h| bounds |sum h|; sum h^2 against itself
    bad = [r for r in range(1, h.shape[0])
           if not bool((h[r] == h[0]).all())  # identical (also with inf entries, inf - inf = nan)
           and not (bool((h[r, 0] - h[0, 0]).abs() <= _REPLICATION_RTOL * scale)
                   and bool((h[r, 1] - h[0, 1]).abs() <= _REPLICATION_RTOL * scale)
                   and bool((h[r, 2] - h[0, 2]).abs() <= _REPLICATION_RTOL * (h[0, 2].abs() + 1e-30)))
           and not bool(torch.isnan(h[r]).any() and torch.isnan(h[0]).any())]
    if bad:
        raise ValueError(
            f"`hidden` is not replicated across vocab_parallel_group: rank(s) {bad} hold other "
            f"hidden states than rank 0 (float64 checksums {h[bad[0]].tolist()} vs "
            f"{h[0].tolist()}). Each rank must pass the same hidden states and labels (an "
            "FSDP-sharded weight passed as a vocabulary shard?)")


# ---------------------------------------------------------------------------------------------
# Steps 2-4: the autograd Function.

@dataclass(frozen=True)
class _Plan:
    shards: _Group
    backend: str
    logit_scale: float
    softcap: Optional[float]
    temperature: float
    with_entropy: bool
    with_stats: bool
    filter_eps: Optional[float]
    deterministic: bool
    record_tile_max: bool


def _merge(parts: Tensor, owner: Tensor, plan: _Plan) -> dict[str, Tensor]:
    """``parts [P, K, N]`` fp32 (rows: logp where owned, m, ln, [entropy], [mean, top1, lsp2])
    -> the global per-token outputs (fp32 ``[N]``; ``row_max``/``log_norm``: the global pair).
    Computed in float64 ([P, N] values: cheap), rounded once."""
    num = parts.shape[2]
    cols = torch.arange(num, device=parts.device)
    m, ln = parts[:, 1].double(), parts[:, 2].double()  # [P, N]
    big_m = m.amax(0)
    lse_rel = (m - big_m) + ln  # lse_r - M
    log_norm = torch.logsumexp(lse_rel, 0)  # lse - M
    log_w = lse_rel - log_norm  # log of shard r's share of the probability mass
    out = {"row_max": big_m.float(), "log_norm": log_norm.float(),
           "logp": (parts[owner, 0, cols].double() + log_w[owner, cols]).float()}
    k = 3
    w = log_w.exp()
    if plan.with_entropy:
        h_r = parts[:, k].double()
        mix = torch.where(w > 0, w * (h_r - log_w), torch.zeros((), dtype=w.dtype, device=w.device))
        out["entropy"] = mix.sum(0).float()
        k += 1
    if plan.with_stats:
        sizes = torch.tensor(plan.shards.sizes, device=parts.device, dtype=torch.float64)
        out["mean_logit"] = ((parts[:, k].double() * sizes[:, None]).sum(0) / plan.shards.vocab).float()
        own_top1 = parts[owner, k + 1, cols] != 0
        m_own = parts[owner, 1, cols]
        ranks = torch.arange(parts.shape[0], device=parts.device)[:, None]
        earlier = ranks < owner[None, :]
        # The first arg-max over increasing ids: an earlier shard may not reach the label's
        # logit (= m_own when the label is its shard's top-1), a later one may not exceed it.
        others_ok = torch.where(earlier, parts[:, 1] < m_own, parts[:, 1] <= m_own).all(0)
        out["is_top1"] = own_top1 & others_ok
        out["log_sum_p2"] = torch.logsumexp(2.0 * log_w + parts[:, k + 2].double(), 0).float()
    return out


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], local_labels: Tensor,
                rows: Tensor, ignored: Tensor, owner: Tensor, plan: _Plan):
        outputs, tile_max = forward_pass(
            hidden, weight, bias, local_labels, rows, ignored, backend=plan.backend,
            logit_scale=plan.logit_scale, softcap=plan.softcap, temperature=plan.temperature,
            with_entropy=plan.with_entropy, with_stats=plan.with_stats,
            record_tile_max=plan.record_tile_max)
        owned = owner == plan.shards.rank
        stack = [torch.where(owned, outputs["logp"], 0.0), outputs["row_max"], outputs["log_norm"]]
        if plan.with_entropy:
            stack.append(outputs["entropy"])
        if plan.with_stats:
            stack += [outputs["mean_logit"], (outputs["is_top1"] != 0) & owned, outputs["log_sum_p2"]]
        local = torch.stack([t.float() for t in stack])  # [K, N]
        gathered = [torch.empty_like(local) for _ in plan.shards.sizes]
        dist.all_gather(gathered, local, group=plan.shards.group)
        merged = _merge(torch.stack(gathered), owner, plan)
        for name, value in merged.items():
            merged[name] = value.masked_fill(ignored, 0)
        def absent(dtype: torch.dtype = torch.float32) -> Tensor:  # one fresh tensor each
            return hidden.new_empty((0,), dtype=dtype)

        entropy = merged["entropy"] if plan.with_entropy else absent()
        ctx.save_for_backward(hidden, weight, bias, local_labels, rows, merged["row_max"],
                              merged["log_norm"], entropy if plan.with_entropy else None,
                              tile_max if plan.record_tile_max else None)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        extras = ((merged["mean_logit"], merged["is_top1"], merged["log_sum_p2"]) if plan.with_stats
                  else (absent(), absent(torch.bool), absent()))
        ctx.mark_non_differentiable(*extras)
        return (merged["logp"], entropy) + extras

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_non_differentiable):
        hidden, weight, bias, local_labels, rows, row_max, log_norm, entropy, tile_max = ctx.saved_tensors
        plan: _Plan = ctx.plan
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if not (needs_hidden or needs_weight or needs_bias):
            return (None, None, None) + nones
        if grad_logp is None:
            grad_logp = torch.zeros_like(row_max)
        if not plan.with_entropy:
            grad_entropy = None
        grad_hidden, grad_weight, grad_bias = backward_pass(
            grad_logp, grad_entropy, hidden, weight, local_labels, bias, rows, row_max, log_norm,
            entropy if grad_entropy is not None else None, tile_max,
            logit_scale=plan.logit_scale, softcap=plan.softcap, temperature=plan.temperature,
            backend=plan.backend, filter_eps=plan.filter_eps, deterministic=plan.deterministic,
            needs_hidden=needs_hidden, needs_weight=needs_weight, needs_bias=bool(needs_bias))
        if grad_hidden is not None:
            # Every shard's share of dL/dH, summed in fp32 before the cast.
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=plan.shards.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias) + nones


# Not traced by torch.compile: collectives, a host sync for the agreement check and a
# data-dependent plan; a graph break here runs it eagerly, like any TP collective layer.
@torch.compiler.disable
def vocab_parallel_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], group: object, *,
    ignore_index: int, temperature: float, logit_scale: float, softcap: Optional[float],
    return_entropy: bool, return_stats: bool, filter_eps: float | str | None,
    deterministic: bool, backend: str,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``linear_logprobs`` over a vocabulary shard (module docstring); local tensors only
    (``resolve_dtensor_inputs`` first). Options are checked here, with the tensors: an invalid
    option on one rank makes every rank raise (none waits in the first collective).

    hidden ``[..., D]`` and labels ``[...]`` (global ids) replicated in ``group``; weight
    ``[V_r, D]``, bias ``[V_r]``: this rank's rows. Returns ``(logprobs, entropy, mean_logit,
    is_top1, log_sum_p2)`` shaped like ``labels`` (None where not asked for).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group needs torch.distributed initialised "
                           "(init_process_group) in every process of the group")
    error: Optional[BaseException] = None
    options = (0.0, 0.0, 0.0, 0.0)
    try:
        # Local problems are shared through the first collective: every rank raises together.
        check_transform(logit_scale, softcap, temperature)
        check_options(ignore_index, filter_eps, backend)
        check_linear_inputs(hidden, weight, labels, bias)  # an empty shard (V_r = 0) too
        hidden, weight = autocast_operands(hidden, weight)
        check_same_dtype(hidden, weight)
        options = (float(logit_scale), -1.0 if softcap is None else float(softcap),
                   float(temperature), float(ignore_index))
    except Exception as exc:  # noqa: BLE001 - any type is shared, then raised here as it is
        error = exc
    flat_hidden = flat_labels = None
    needs_grad = False
    if error is None:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1).long()
        needs_grad = torch.is_grad_enabled() and flat_hidden.requires_grad
    tensors = [t for t in (hidden, weight) if isinstance(t, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    vocab_r = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    shards = _agree(group, flat_hidden, flat_labels, weight, vocab_r, error, device,
                    needs_grad, int(bool(return_entropy)) + 2 * int(bool(return_stats)), options)
    ignored = flat_labels == ignore_index
    rows = (~ignored).nonzero().squeeze(1)
    check_label_values(flat_labels, rows, shards.vocab)  # labels agree: every rank raises alike
    resolved = resolve_backend(backend, hidden.device, shape=(
        flat_hidden.dtype, flat_hidden.shape[-1], weight.shape[0], flat_labels.numel()))
    eps, record_tile_max = filter_plan(resolved, hidden.dtype, filter_eps, (hidden, weight, bias))
    ends = torch.tensor([o + s for o, s in zip(shards.offsets, shards.sizes)], device=flat_labels.device)
    owner = torch.bucketize(flat_labels.clamp(0, shards.vocab - 1), ends, right=True)
    owned = ~ignored & (owner == shards.rank)
    local_labels = torch.where(owned, flat_labels - shards.offsets[shards.rank],
                               torch.full_like(flat_labels, weight.shape[0]))
    plan = _Plan(shards, resolved, float(logit_scale), None if softcap is None else float(softcap),
                 float(temperature), bool(return_entropy), bool(return_stats),
                 eps, bool(deterministic), record_tile_max)
    logp, entropy, mean_logit, is_top1, log_sum_p2 = _VocabParallelLogprobs.apply(
        flat_hidden, weight, bias, local_labels, rows, ignored, owner, plan)
    shape = labels.shape
    return (logp.view(shape), entropy.view(shape) if return_entropy else None,
            mean_logit.view(shape) if return_stats else None,
            is_top1.view(shape) if return_stats else None,
            log_sum_p2.view(shape) if return_stats else None)
