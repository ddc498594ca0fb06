"""Sequence log-probs whose gradients are formed in the forward pass (the single-pass strategy).

A preference loss depends on the per-token log-probs only through a few sequence sums
(``seq_s = sum_t w_t logp_t`` and, for ``sft`` with LD-DPO weights, the plain sums), and for
every loss whose gradient is separable across pairs the gradient with respect to pair ``i``'s
sums depends only on pair ``i`` (and on constants known before the pass: reference log-probs,
lengths). So with chunks of whole pairs (chosen sequence ``i`` and rejected sequence ``B + i``)
one pass per chunk does everything:

    z = h_c @ W.T (vendor GEMM) -> log-probs + stats (epilogue) -> this chunk's sequence sums
    -> g_t = dL/dlogp_t (autograd over a few scalars of ``loss_fn``) -> dz = g (onehot - p) in
    place -> dH_c = dz @ W, dW += dz.T @ h_c (fp32)

6NDV FLOPs instead of the recompute's 8NDV, and one ``[chunk, V]`` buffer live at a time.

The backward does not trust that the caller's loss is the one predicted in the forward: it
receives the true gradients of the sequence sums, and

- when they are ``c`` times the predicted ones (the loss, or any multiple of it: training), it
  returns ``c`` times the stored dH/dW/dbias (no FLOP);
- otherwise (another loss on ``chosen_logps``, per-pair weights on ``losses``, ...) it adds the
  exact gradient of the residual ``grad - c * predicted`` by the recompute backward of the
  ``linear_logprobs`` op. The result is exact either way: a gradient cannot silently be wrong
  because it was formed before the loss was known (Liger-Kernel#968, #678).

A pair with more tokens than one chunk holds (long sequences, big vocabularies) is done in two
phases for that pair only: a forward over sub-chunks, then the recompute backward (8NDV).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import pair_chunk_epilogue as epi

__all__ = ["DEFAULT_PAIR_CHUNK_BYTES", "SinglePassPlan", "single_pass_sequence_logps"]

#: Bytes of fp32 ``[chunk, V]`` buffers one chunk of pairs may hold (the logits block and, with
#: entropy, its exponentials): a chunk gets as many whole pairs as fit, at least one. A pair
#: larger than this takes the recompute path (see the module docstring); the environment
#: variable ``APO_KERNELS_PAIR_CHUNK_MIB`` overrides it (read at each call).
DEFAULT_PAIR_CHUNK_BYTES = 256 * 2**20
_BUFFERS_PER_CHUNK = 2

#: Residual gradients below this fraction of the largest incoming gradient are rounding (the
#: predicted and the true gradient come from the same formulas on the same numbers).
_RESIDUAL_RTOL = 1e-5

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class SinglePassPlan:
    """Everything about the batch the pass needs besides the tensors that get gradients.

    labels: ``[N]`` int64 (``ignore_index`` at non-completion positions).
    seq_ids: ``[N]`` int64 non-decreasing sequence id of each position, ``2B`` sequences,
        chosen first (TRL's order).
    token_weights: ``[N]`` fp32 weight of each token in its sequence sum (0 where ignored).
    loss_fn: ``(seq [2B], plain [2B], lsp2 [2B]) -> losses [B]``: the per-pair losses from the
        weighted sequence sums, the plain (weight 1) sums and the per-sequence sum of
        ``log sum p^2`` over completion tokens (for WPO weights). Its mean is the loss whose
        gradient the forward forms; it must be separable across pairs (each pair's gradient
        depends on its own entries only, up to constants).
    need_plain: whether ``loss_fn`` reads ``plain`` / ``lsp2`` (else they are not tracked).
    """

    labels: Tensor
    seq_ids: Tensor
    num_seqs: int
    token_weights: Tensor
    loss_fn: LossFn
    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    with_entropy: bool = False
    with_stats: bool = False
    need_plain: bool = False
    chunk_bytes: int | None = None  # default: DEFAULT_PAIR_CHUNK_BYTES (read at call time)


class SinglePassOutput(dict):
    """``seq``, ``plain`` (``[2B]`` fp32, differentiable), ``lsp2`` (``[2B]``, no gradient: the
    per-sequence sums of ``log sum p^2`` over completion tokens, zero unless ``need_plain``) and per-token ``[N]`` fp32 ``logp``,
    ``entropy``, ``mean_logit``, ``is_top1`` (bool), ``log_sum_p2`` (no gradient; 0 at ignored
    positions; absent ones None)."""


def _env_chunk_bytes() -> int | None:
    text = os.environ.get("APO_KERNELS_PAIR_CHUNK_MIB")
    if not text:
        return None
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not mib > 0:
        raise ValueError(f"APO_KERNELS_PAIR_CHUNK_MIB must be a positive number of MiB, got {text!r}")
    return int(mib * 2**20)


def _groups(counts: Tensor, b: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive pair ranges ``[i0, i1)`` whose kept tokens fit ``max_tokens`` (>= 1 pair)."""
    per_pair = (counts[:b] + counts[b:]).tolist()
    groups, start, total = [], 0, 0
    for i, c in enumerate(per_pair):
        if i > start and total + c > max_tokens:
            groups.append((start, i))
            start, total = i, 0
        total += c
    if b > start:
        groups.append((start, b))
    return groups


class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: SinglePassPlan):
        n, vocab = plan.labels.shape[0], weight.shape[0]
        s, b = plan.num_seqs, plan.num_seqs // 2
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        any_grad = needs_h or needs_w or needs_b
        f32 = dict(device=hidden.device, dtype=torch.float32)
        w32 = weight.float()  # no copy for fp32 weights
        b32 = None if bias is None else bias.float()

        kept = (plan.labels != plan.ignore_index).nonzero().squeeze(1)
        kept_ids = plan.seq_ids[kept]
        counts = torch.bincount(kept_ids, minlength=s)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        budget = plan.chunk_bytes or _env_chunk_bytes() or DEFAULT_PAIR_CHUNK_BYTES
        max_tokens = max(1, budget // (vocab * 4 * _BUFFERS_PER_CHUNK))

        tok = {"logp": torch.zeros(n, **f32), "row_max": torch.zeros(n, **f32),
               "log_norm": torch.zeros(n, **f32)}
        if plan.with_entropy:
            tok["entropy"] = torch.zeros(n, **f32)
        if plan.with_stats:
            tok["mean_logit"] = torch.zeros(n, **f32)
            tok["is_top1"] = torch.zeros(n, device=hidden.device, dtype=torch.bool)
            tok["log_sum_p2"] = torch.zeros(n, **f32)
        seq, plain, lsp2 = (torch.zeros(s, **f32) for _ in range(3))
        pred_seq, pred_plain = torch.zeros(s, **f32), torch.zeros(s, **f32)
        grad_h = torch.zeros(hidden.shape, **f32) if needs_h else None
        grad_w = torch.zeros(weight.shape, **f32) if needs_w else None
        grad_b = torch.zeros(vocab, **f32) if needs_b else None
        deferred: list[Tensor] = []  # positions of oversized pairs: recompute backward

        def record(pos: Tensor, st: epi.ChunkStats) -> None:
            ids, wt = plan.seq_ids[pos], plan.token_weights[pos]
            for name in ("logp", "row_max", "log_norm", "entropy", "mean_logit", "is_top1", "log_sum_p2"):
                if name in tok:
                    tok[name][pos] = getattr(st, name)
            seq.index_add_(0, ids, torch.where(wt != 0, st.logp * wt, 0.0))
            if plan.need_plain:
                plain.index_add_(0, ids, st.logp)
                lsp2.index_add_(0, ids, st.log_sum_p2)

        def predicted(i0: int, i1: int) -> tuple[Tensor, Tensor]:
            """d(mean loss)/d(sequence sums) of pairs [i0, i1), from the sums known so far."""
            with torch.enable_grad():
                x_seq = seq.detach().clone().requires_grad_(True)
                x_plain = plain.detach().clone().requires_grad_(plan.need_plain)
                loss = plan.loss_fn(x_seq, x_plain, lsp2).mean()
                wrt = [x_seq, x_plain] if plan.need_plain else [x_seq]
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            gs = grads[0] if grads[0] is not None else torch.zeros_like(seq)
            gp = grads[1] if plan.need_plain and grads[1] is not None else torch.zeros_like(seq)
            for lo, hi in ((i0, i1), (b + i0, b + i1)):
                pred_seq[lo:hi], pred_plain[lo:hi] = gs[lo:hi], gp[lo:hi]
            return gs, gp

        groups = _groups(counts, b, max_tokens)
        sizes = [starts[i1] - starts[i0] + starts[b + i1] - starts[b + i0] for i0, i1 in groups]
        rows = min(max(sizes, default=0), max_tokens)
        # Two [rows, V] workspaces reused by every chunk (logits, probabilities / dz): a fresh
        # allocation per chunk costs its page faults, as much as a pass over the block on CPU.
        z_buf = torch.empty((rows, vocab), **f32)
        p_buf = torch.empty((rows, vocab), **f32)

        def logits(idx: Tensor) -> Tensor:
            return torch.mm(hidden[idx].float(), w32.T, out=z_buf[: idx.numel()])

        for i0, i1 in groups:
            pos = torch.cat([kept[starts[i0]:starts[i1]], kept[starts[b + i0]:starts[b + i1]]])
            if pos.numel() == 0:
                continue
            if pos.numel() <= max_tokens:
                stats, state = epi.forward_stats_(
                    logits(pos), plan.labels[pos], bias=b32,
                    logit_scale=plan.logit_scale, softcap=plan.softcap, temperature=plan.temperature,
                    with_entropy=plan.with_entropy, with_stats=plan.with_stats or plan.need_plain,
                    p_out=p_buf[: pos.numel()])
                record(pos, stats)
                if not any_grad:
                    continue
                gs, gp = predicted(i0, i1)
                ids = plan.seq_ids[pos]
                g = gs[ids] * plan.token_weights[pos] + gp[ids]
                dz = epi.logit_grad_(state, plan.labels[pos], g)
                del state
                if grad_h is not None:
                    grad_h[pos] = torch.mm(dz, w32)
                if grad_w is not None:
                    grad_w.addmm_(dz.T, hidden[pos].float())
                if grad_b is not None:
                    grad_b += dz.sum(0)
                del dz
            else:  # one pair larger than a chunk: forward by sub-chunks, recompute backward
                for lo in range(0, pos.numel(), max_tokens):
                    sub = pos[lo:lo + max_tokens]
                    stats, state = epi.forward_stats_(
                        logits(sub), plan.labels[sub], bias=b32,
                        logit_scale=plan.logit_scale, softcap=plan.softcap,
                        temperature=plan.temperature, with_entropy=plan.with_entropy,
                        with_stats=plan.with_stats or plan.need_plain, p_out=p_buf[: sub.numel()])
                    del state
                    record(sub, stats)
                if any_grad:
                    predicted(i0, i1)
                    deferred.append(pos)

        z_buf = p_buf = None  # frees both workspaces (not `del`: the closure `logits` shares the cell)
        if deferred and any_grad:
            pos = torch.cat(deferred)
            ids = plan.seq_ids[pos]
            g = torch.zeros(n, **f32)
            g[pos] = pred_seq[ids] * plan.token_weights[pos] + pred_plain[ids]
            dh, dw, db = _recompute_backward(g, hidden, weight, bias, plan, tok, needs_h, needs_w, needs_b)
            for acc, d in ((grad_h, dh), (grad_w, dw), (grad_b, db)):
                if acc is not None:
                    acc += d

        ctx.plan = plan
        ctx.stored = (grad_h, grad_w, grad_b)
        ctx.pred = torch.cat([pred_seq, pred_plain])
        ctx.save_for_backward(hidden, weight, bias, torch.stack([tok["row_max"], tok["log_norm"]]))
        extras = [tok.get(k) for k in ("logp", "entropy", "mean_logit", "is_top1", "log_sum_p2")]
        extras = [hidden.new_empty(0, dtype=torch.float32) if t is None else t for t in extras]
        ctx.mark_non_differentiable(lsp2, *extras)
        ctx.set_materialize_grads(False)
        return (seq, plain, lsp2, *extras)

    @staticmethod
    def backward(ctx, grad_seq, grad_plain, *_non_differentiable):
        hidden, weight, bias, norm = ctx.saved_tensors
        plan: SinglePassPlan = ctx.plan
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        zero = torch.zeros(plan.num_seqs, device=norm.device, dtype=torch.float32)
        got = torch.cat([zero if grad_seq is None else grad_seq.float(),
                         zero if grad_plain is None else grad_plain.float()])
        # After the stored gradients were handed over (a retained graph's second backward),
        # everything is recomputed: the prediction counts as zero.
        pred = ctx.pred if ctx.stored is not None else torch.zeros_like(got)
        denom = torch.dot(pred, pred)
        c = float(torch.dot(got, pred) / denom) if float(denom) > 0 else 0.0
        if abs(c - 1.0) <= 1e-6:  # the loss itself: hand the stored gradients over, no copy
            c = 1.0
        residual = got - c * pred
        scale = float(got.abs().max()) if got.numel() else 0.0
        grads = [None, None, None]
        if c != 0.0:
            for i, needed in enumerate((needs_h, needs_w, needs_b)):
                stored = ctx.stored[i]
                if needed and stored is not None:
                    grads[i] = stored if c == 1.0 else stored * c
            if c == 1.0:
                # Autograd may keep these very tensors as .grad and add into them in place: never
                # hand them out twice.
                ctx.stored = None
        if scale > 0 and float(residual.abs().max()) > _RESIDUAL_RTOL * scale:
            s = plan.num_seqs
            ids = plan.seq_ids
            g = residual[:s][ids] * plan.token_weights
            if plan.need_plain:
                g = g + torch.where(plan.labels != plan.ignore_index, residual[s:][ids], 0.0)
            tok = {"row_max": norm[0], "log_norm": norm[1]}
            extra = _recompute_backward(g, hidden, weight, bias, plan, tok, needs_h, needs_w, needs_b)
            grads = [x if d is None else (d if x is None else x + d) for x, d in zip(grads, extra)]
        out = []
        for g_, like in zip(grads, (hidden, weight, bias)):
            out.append(None if g_ is None else g_.to(like.dtype))
        return out[0], out[1], out[2], None


def _recompute_backward(g, hidden, weight, bias, plan, tok, needs_h, needs_w, needs_b):
    """Exact gradients of ``sum_t g_t logp_t`` by the linear_logprobs op's recompute backward
    (torch strategy), fp32; None where not needed."""
    from . import linear_logprobs as _register  # noqa: F401  (registers the custom ops)

    norm = torch.stack([tok["row_max"], tok["log_norm"]])
    dh, dw, db = torch.ops.apo_kernels.linear_logprobs_bwd(
        g.float().contiguous(), None, hidden, weight, plan.labels, bias, norm, None, None,
        int(plan.ignore_index), float(plan.logit_scale),
        None if plan.softcap is None else float(plan.softcap), float(plan.temperature),
        "torch", None, True, bool(needs_h), bool(needs_w), bool(needs_b and bias is not None))
    return (dh.float() if needs_h else None, dw.float() if needs_w else None,
            db.float() if needs_b and bias is not None else None)


def single_pass_sequence_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: SinglePassPlan
) -> SinglePassOutput:
    """hidden ``[N, D]`` (float), weight ``[V, D]`` (same dtype), bias ``[V]`` or None ->
    :class:`SinglePassOutput`. Gradients of ``seq``/``plain`` reach hidden/weight/bias."""
    seq, plain, lsp2_seq, logp, entropy, mean_logit, is_top1, lsp2 = _SinglePass.apply(hidden, weight, bias, plan)
    return SinglePassOutput(
        seq=seq, plain=plain, lsp2=lsp2_seq, logp=logp,
        entropy=entropy if plan.with_entropy else None,
        mean_logit=mean_logit if plan.with_stats else None,
        is_top1=is_top1 if plan.with_stats else None,
        log_sum_p2=lsp2 if plan.with_stats else None,
    )
