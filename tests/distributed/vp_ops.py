"""Worker: the vocabulary-parallel ``linear_logprobs`` on 2 processes vs one process and float64.

Every case builds the full head from a fixed seed on every rank, splits it by rows in rank
order, runs the vocabulary-parallel op on this rank's rows and compares with the float64
oracle (tolerance rule: |ours - f64| <= |same-dtype torch - f64| + tol) and with the
one-process op on the whole head. A mismatch is recorded, never raised mid-case (the other rank
would wait in a collective); the worker exits 1 at the end if any case failed.

Usage: ``vp_ops.py [group ...]`` with groups ``op``, ``dtensor``, ``errors``, ``sgd``,
``preference``, ``patch_model``, ``fsdp_tp_head`` (default: all).
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist

from apo_kernels import linear_logprobs
from apo_kernels.reference import oracle_linear_logprobs

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(f"rank {dist.get_rank()}: {msg}")


def close(name: str, ours, exact, same, tol: float) -> None:
    """The tolerance rule, elementwise (float64)."""
    ours, exact, same = ours.double(), exact.double(), same.double()
    err = (ours - exact).abs()
    allowed = (same - exact).abs() + tol
    if not bool((err <= allowed).all()):
        i = int((err - allowed).argmax())
        fail(f"{name}: max excess {float((err - allowed).max()):.3g} at {i} "
             f"(ours {float(ours.flatten()[i]):.6g}, f64 {float(exact.flatten()[i]):.6g}, "
             f"same-dtype {float(same.flatten()[i]):.6g})")


def near(name: str, a, b, atol: float) -> None:
    diff = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    if not diff <= atol:
        fail(f"{name}: differs from one process by {diff:.3g} (> {atol})")


def split_sizes(vocab: int, world: int, how: str) -> list[int]:
    if how == "chunk":  # torch.chunk / DTensor: ceil-sized first shards
        step = -(-vocab // world)
        return [max(0, min(step, vocab - r * step)) for r in range(world)]
    if how == "small_first":
        return [3] + [vocab - 3 - (world - 2) * 5] + [5] * (world - 2)
    raise ValueError(how)


def make_case(seed: int, n: int, d: int, vocab: int, dtype, *, bias: bool, peaked: bool,
              labels_on: str, ignored: float, sizes: list[int], ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * (2.0 if peaked else 0.3)
    b = torch.randn(vocab, generator=gen) if bias else None
    if labels_on == "spread":
        labels = torch.randint(0, vocab, (n,), generator=gen)
    else:  # every label in one shard (the last)
        start = sum(sizes[:-1])
        labels = torch.randint(start, vocab, (n,), generator=gen)
    drop = torch.rand(n, generator=gen) < ignored
    labels[drop] = -100
    if peaked:  # some labels are the arg-max (is_top1 True), some not
        z = hidden @ weight.T
        top = z.argmax(-1)
        take = torch.rand(n, generator=gen) < 0.5
        labels = torch.where(take & ~drop, top, labels)
        if labels_on != "spread":
            labels = torch.where(labels < sum(sizes[:-1]), torch.full_like(labels, vocab - 1), labels)
            labels[drop] = -100
    if ties:
        # Shard 1's first row duplicates shard 0's first row, and both are the top logit of
        # most tokens: the label is top-1 only as the FIRST arg-max (the row of shard 0).
        u = hidden.mean(0)
        weight[0] = weight[sizes[0]] = 4.0 * u / u.norm()
        kept = ~drop
        labels = torch.where(kept, torch.where(torch.arange(n) % 2 == 0, 0, sizes[0]), labels)
    g = torch.randn(n, generator=gen)
    ge = torch.randn(n, generator=gen)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), cast(b) if b is not None else None, labels, g, ge


def run_op(case: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = case.get("dtype", torch.float32)
    n, d, vocab = case.get("n", 13), case.get("d", 16), case.get("vocab", 37)
    sizes = split_sizes(vocab, world, case.get("split", "chunk"))
    hidden, weight, bias, labels, g, ge = make_case(
        case["seed"], n, d, vocab, dtype, bias=case.get("bias", False), peaked=case.get("peaked", False),
        labels_on=case.get("labels_on", "spread"), ignored=case.get("ignored", 0.25), sizes=sizes,
        ties=case.get("ties", False))
    opts = dict(temperature=case.get("temperature", 1.0), softcap=case.get("softcap"),
                logit_scale=case.get("logit_scale", 1.0))
    entropy_grad = case.get("entropy_grad", True)
    off, size = sum(sizes[:rank]), sizes[rank]
    name = case["name"]
    backend = case.get("backend", "torch")
    needs = case.get("needs", "hwb")  # which inputs require grad

    def leaves(h, w, b):
        h = h.clone().requires_grad_("h" in needs)
        w = w.clone().requires_grad_("w" in needs)
        b = None if b is None else b.clone().requires_grad_("b" in needs)
        return h, w, b

    def loss_of(out):
        loss = (out.logprobs * g).sum()
        return loss + (out.entropy * ge).sum() if entropy_grad else loss

    # One process, whole head (the same backend).
    h1, w1, b1 = leaves(hidden, weight, bias)
    one = linear_logprobs(h1, w1, labels, b1, return_entropy=True, return_stats=True,
                          backend=backend, **opts)
    loss_of(one).backward()
    # Vocabulary-parallel, this rank's rows.
    hp, wp, bp = leaves(hidden, weight[off:off + size], None if bias is None else bias[off:off + size])
    vp = linear_logprobs(hp, wp, labels, bp, return_entropy=True, return_stats=True,
                         backend=backend, vocab_parallel_group=dist.group.WORLD, **opts)
    loss_of(vp).backward()
    # float64 oracle and same-dtype torch.
    results = {}
    for key, dt in (("exact", torch.float64), ("same", dtype if dtype != torch.float32 else torch.float32)):
        ho, wo, bo = leaves(hidden, weight, bias)
        o = oracle_linear_logprobs(ho, wo, labels, bo, dtype=dt, **opts)
        loss = (o["logp"] * g.to(o["logp"].dtype)).sum()
        if entropy_grad:
            loss = loss + (o["entropy"] * ge.to(o["logp"].dtype)).sum()
        loss.backward()
        results[key] = (o, ho.grad, wo.grad, None if bo is None else bo.grad)
    (ex, ex_h, ex_w, ex_b), (sm, sm_h, sm_w, sm_b) = results["exact"], results["same"]
    tol = TOL[dtype]
    for field in ("logprobs", "entropy", "mean_logit", "log_sum_p2"):
        key = "logp" if field == "logprobs" else field
        close(f"{name} {field}", getattr(vp, field).detach(), ex[key], sm[key], tol)
        near(f"{name} {field}", getattr(vp, field), getattr(one, field), 50 * tol)
    if not torch.equal(vp.is_top1, one.is_top1):
        fail(f"{name} is_top1: {vp.is_top1.int().tolist()} vs one process {one.is_top1.int().tolist()}")
    if not torch.equal(vp.is_top1, ex["is_top1"]):
        fail(f"{name} is_top1 differs from the float64 oracle")
    if (case.get("peaked") or case.get("ties")) and not bool(vp.is_top1.any()):
        fail(f"{name}: no top-1 label in a peaked case (the test would not see a wrong is_top1)")
    if "h" in needs:
        close(f"{name} dH", hp.grad, ex_h, sm_h, tol)
        near(f"{name} dH", hp.grad, h1.grad, 50 * tol)
    if "w" in needs:
        close(f"{name} dW", wp.grad, ex_w[off:off + size], sm_w[off:off + size], tol)
        near(f"{name} dW", wp.grad, w1.grad[off:off + size], 50 * tol)
    else:
        assert wp.grad is None
    if bias is not None and "b" in needs:
        close(f"{name} db", bp.grad, ex_b[off:off + size], sm_b[off:off + size], tol)


OP_CASES = [
    dict(name="fp32 torch plain", seed=1),
    dict(name="fp32 torch bias T softcap scale", seed=2, bias=True, temperature=0.7, softcap=3.0,
         logit_scale=1.3),
    dict(name="fp32 torch odd V uneven labels on one shard", seed=3, vocab=41, labels_on="last"),
    dict(name="fp32 torch small first shard peaked", seed=4, vocab=40, split="small_first",
         peaked=True, bias=True),
    dict(name="fp32 torch peaked labels on one shard", seed=5, vocab=39, peaked=True, labels_on="last"),
    dict(name="fp32 torch only weight grad, no entropy grad", seed=6, needs="w", entropy_grad=False),
    dict(name="fp32 torch only hidden grad all kept", seed=7, needs="h", ignored=0.0),
    dict(name="bf16 torch", seed=8, dtype=torch.bfloat16, bias=True, softcap=5.0),
    dict(name="fp16 torch ignored labels temperature", seed=15, dtype=torch.float16, bias=True,
         temperature=0.9, ignored=0.3),
    dict(name="fp32 torch ties across shards", seed=13, vocab=31, ties=True, softcap=20.0),
    dict(name="fp32 triton ties across shards", seed=14, vocab=31, ties=True, backend="triton"),
    dict(name="fp32 triton", seed=9, backend="triton", vocab=35, bias=True, temperature=0.8),
    dict(name="fp32 triton peaked softcap", seed=10, backend="triton", vocab=33, peaked=True,
         softcap=4.0, labels_on="last"),
    dict(name="bf16 triton filtered (label residual, pre-skip)", seed=11, backend="triton",
         dtype=torch.bfloat16, vocab=37, peaked=True, entropy_grad=False),
    dict(name="bf16 triton with entropy grad", seed=12, backend="triton", dtype=torch.bfloat16,
         vocab=30, bias=True),
]


def group_op() -> None:
    from apo_kernels.kernels import configs

    for case in OP_CASES:
        # 16-bit Triton cases: the GPU's bf16 dz buffer and label-residual kernel (the
        # interpreter's default dz is fp32).
        configs.DZ_16BIT_IN_INTERPRETER = case.get("backend") == "triton" and case.get("dtype") == torch.bfloat16
        try:
            run_op(case)
        except Exception:  # noqa: BLE001 - reported, the run goes on
            fail(f"{case['name']}: {traceback.format_exc()}")
        finally:
            configs.DZ_16BIT_IN_INTERPRETER = False


def group_dtensor() -> None:
    """A DTensor head Shard(0) (bias too) and a Replicate DTensor hidden, without the argument;
    the gradients come back as DTensors with the same placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    hidden, weight, bias, labels, g, ge = make_case(21, 11, 16, 35, torch.float32, bias=True,
                                                    peaked=False, labels_on="spread", ignored=0.2,
                                                    sizes=[18, 17])
    w_dt = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    b_dt = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_()
    h_dt = distribute_tensor(hidden.clone(), mesh, [Replicate()]).requires_grad_()
    out = linear_logprobs(h_dt, w_dt, labels, b_dt, return_entropy=True, softcap=6.0)
    ((out.logprobs * g).sum() + (out.entropy * ge).sum()).backward()
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    one = linear_logprobs(h1, w1, labels, b1, return_entropy=True, softcap=6.0)
    ((one.logprobs * g).sum() + (one.entropy * ge).sum()).backward()
    near("dtensor logprobs", out.logprobs, one.logprobs, 1e-5)
    near("dtensor entropy", out.entropy, one.entropy, 1e-5)
    for name, leaf, ref, placement in (("dW", w_dt, w1, Shard(0)), ("db", b_dt, b1, Shard(0)),
                                       ("dH", h_dt, h1, Replicate())):
        grad = leaf.grad
        if type(grad).__name__ != "DTensor" or tuple(grad.placements) != (placement,):
            fail(f"dtensor {name}: gradient {type(grad).__name__} "
                 f"{getattr(grad, 'placements', None)}, expected a DTensor placed {placement}")
            continue
        near(f"dtensor {name}", grad.full_tensor(), ref.grad, 1e-5)


def expect_error(name: str, fn, *fragments: str) -> None:
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        missing = [f for f in fragments if f not in msg]
        if missing:
            fail(f"{name}: error lacks {missing}: {msg}")
        return
    except Exception as exc:  # noqa: BLE001
        fail(f"{name}: {type(exc).__name__} instead of ValueError: {exc}")
        return
    fail(f"{name}: no error")


def group_errors() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    grp = dist.group.WORLD
    hidden, weight, _, labels, _, _ = make_case(31, 9, 16, 30, torch.float32, bias=False,
                                                peaked=False, labels_on="spread", ignored=0.0,
                                                sizes=[15, 15])
    shard = weight[rank * 15:(rank + 1) * 15]
    # An FSDP-like layout: each rank has its own batch (hidden differs) and a row shard.
    own = hidden + rank
    expect_error("non-replicated hidden", lambda: linear_logprobs(
        own, shard, labels, vocab_parallel_group=grp), "not replicated", "FSDP")
    other = labels.clone()
    other[0] = (other[0] + rank) % 30
    expect_error("non-replicated labels", lambda: linear_logprobs(
        hidden, shard, other, vocab_parallel_group=grp), "labels", "differ")
    # Ignored positions (-100) make the int64 label checksum negative: it must still be compared
    # exactly (carried in a float64 slot, a negative checksum is a NaN bit pattern).
    ignored = labels.clone()
    ignored[-3:] = -100
    ignored[0] = (ignored[0] + rank) % 30
    expect_error("non-replicated labels with ignored positions", lambda: linear_logprobs(
        hidden, shard, ignored, vocab_parallel_group=grp), "labels", "differ")
    bad = labels.clone()
    bad[3] = 30  # = V: out of the global range (in range of no shard)
    expect_error("label out of the global range", lambda: linear_logprobs(
        hidden, shard, bad, vocab_parallel_group=grp), "[0, 30)", "position 3")
    # One rank with an empty shard: every rank raises (none waits in a collective).
    rows = weight[:30] if rank == 0 else weight[:0]
    expect_error("empty shard", lambda: linear_logprobs(
        hidden, rows, labels, vocab_parallel_group=grp), "")
    # Options that differ between ranks.
    expect_error("different options", lambda: linear_logprobs(
        hidden, shard, labels, temperature=1.0 + rank, vocab_parallel_group=grp), "options")
    # An invalid option on ONE rank: that rank names it, the others stop too (they used to wait
    # in the first all_gather until the process group's timeout).
    expect_error("invalid option on one rank", lambda: linear_logprobs(
        hidden, shard, labels, temperature=0.0 if rank == 1 else 1.0, vocab_parallel_group=grp),
        "temperature" if rank == 1 else "rejected their inputs")
    mesh = init_device_mesh("cpu", (world,))
    expect_error("Shard(1) weight", lambda: linear_logprobs(
        hidden, distribute_tensor(weight, mesh, [Shard(1)]), labels), "Shard(dim=1)", "1-D mesh")
    expect_error("Replicate weight", lambda: linear_logprobs(
        hidden, distribute_tensor(weight, mesh, [Replicate()]), labels), "Replicate")
    partial = DTensor.from_local(weight / world, mesh, [Partial()])
    expect_error("Partial weight", lambda: linear_logprobs(hidden, partial, labels), "Partial")
    mesh2 = init_device_mesh("cpu", (1, world))
    w2 = distribute_tensor(weight, mesh2, [Replicate(), Shard(0)])
    expect_error("2-D mesh weight", lambda: linear_logprobs(hidden, w2, labels), "2-D mesh")
    h_sp = distribute_tensor(hidden, mesh, [Shard(0)])
    expect_error("sequence-sharded hidden DTensor", lambda: linear_logprobs(
        h_sp, distribute_tensor(weight, mesh, [Shard(0)]), labels), "hidden", "Shard(dim=0)")
    # A mesh whose rank order is not the group's (DTensor gives block i to mesh coordinate i,
    # the op orders blocks by group rank): was silently wrong (log-probs off by up to 5 nats).
    from torch.distributed.device_mesh import DeviceMesh

    reversed_mesh = DeviceMesh("cpu", torch.arange(world).flip(0))
    expect_error("mesh in reversed rank order", lambda: linear_logprobs(
        hidden, distribute_tensor(weight, reversed_mesh, [Shard(0)]), labels), "rank order")
    # The whole head on every rank with the group: was taken for P blocks (log-probs - log P).
    expect_error("whole head with vocab_parallel_group", lambda: linear_logprobs(
        hidden, weight, labels, vocab_parallel_group=grp), "same `weight`")
    # fused_linear_preference_loss with the group: a WHOLE reference head (a reference loaded
    # separately) was taken for a block of a 2V-row vocabulary (reference log-probs off by
    # log 2 per token, silently).
    from apo_kernels import fused_linear_preference_loss

    pairs = labels[:8].view(4, 2)
    expect_error("whole ref_weight with vocab_parallel_group", lambda: fused_linear_preference_loss(
        hidden[:8].view(4, 2, -1), shard, pairs, ref_hidden=hidden[:8].view(4, 2, -1),
        ref_weight=weight, vocab_parallel_group=grp), "ref_weight", "rows")
    # Checks the preference loss runs before its first collective, failing on ONE rank: every
    # rank raises (the others used to wait in the first all_gather until the timeout).
    expect_error("invalid beta on one rank", lambda: fused_linear_preference_loss(
        hidden[:8].view(4, 2, -1), shard, pairs, ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2), beta=-1.0 if rank == 1 else 0.1, vocab_parallel_group=grp),
        "beta" if rank == 1 else "rejected its inputs")
    empty = pairs.clone()
    if rank == 0:
        empty[:] = -100  # labels not replicated: no completion token on this rank only
    expect_error("no completion token on one rank", lambda: fused_linear_preference_loss(
        hidden[:8].view(4, 2, -1), shard, empty, ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2), vocab_parallel_group=grp),
        "no completion token" if rank == 0 else "rejected its inputs")
    # An input that is not a tensor on one rank (AttributeError inside the checks, not a
    # TypeError/ValueError): shared all the same.
    try:
        fused_linear_preference_loss(
            hidden[:8].view(4, 2, -1), shard, pairs, ref_chosen_logps=[0.0, 0.0] if rank == 1 else torch.zeros(2),
            ref_rejected_logps=torch.zeros(2), vocab_parallel_group=grp)
        fail("ref_chosen_logps a list on one rank: no error")
    except Exception as exc:  # noqa: BLE001 - rank 1: its own error, whatever its type
        if rank == 0 and not (isinstance(exc, ValueError) and "rejected its inputs" in str(exc)):
            fail(f"ref_chosen_logps a list on rank 1: rank 0 got {type(exc).__name__}: {exc}")
    # After all the errors the group still works (no rank left behind in a collective).
    out = linear_logprobs(hidden, shard, labels, vocab_parallel_group=grp)
    near("after errors", out, linear_logprobs(hidden, weight, labels), 1e-5)


def group_sgd() -> None:
    """A tiny model (replicated backbone + vocabulary-sharded head): weights after two SGD steps
    match one process."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(41)
    d, vocab, n = 16, 29, 12
    backbone = torch.nn.Linear(d, d)
    head = torch.nn.Linear(d, vocab)  # with bias
    sizes = split_sizes(vocab, world, "chunk")
    off, size = sum(sizes[:rank]), sizes[rank]
    gen = torch.Generator().manual_seed(42)
    batches = [(torch.randn(n, d, generator=gen), torch.randint(0, vocab, (n,), generator=gen))
               for _ in range(2)]
    one = [torch.nn.Parameter(p.detach().clone()) for p in (*backbone.parameters(), *head.parameters())]
    par = [torch.nn.Parameter(p.detach().clone()) for p in backbone.parameters()] + [
        torch.nn.Parameter(head.weight.detach()[off:off + size].clone()),
        torch.nn.Parameter(head.bias.detach()[off:off + size].clone())]
    opts = [torch.optim.SGD(one, lr=0.5), torch.optim.SGD(par, lr=0.5)]
    for x, y in batches:
        for params, opt, group in ((one, opts[0], None), (par, opts[1], dist.group.WORLD)):
            opt.zero_grad()
            h = torch.tanh(x @ params[0].T + params[1])
            logp = linear_logprobs(h, params[2], y, params[3], vocab_parallel_group=group)
            (-logp.mean()).backward()
            opt.step()
    for name, a, b in (("backbone weight", par[0], one[0]), ("backbone bias", par[1], one[1]),
                       ("head weight", par[2], one[2][off:off + size]),
                       ("head bias", par[3], one[3][off:off + size])):
        near(f"sgd {name}", a.detach(), b.detach(), 1e-5)
    moved = float((one[2] - head.weight).abs().max())
    if not moved > 1e-3:
        fail(f"sgd: the head hardly moved ({moved}); the test would not see a wrong gradient")


def group_preference() -> None:
    """fused_linear_preference_loss on a vocabulary shard (group argument, then a DTensor head
    through the module form) vs one process: loss, metrics, gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from apo_kernels import FusedLinearPreferenceLoss, fused_linear_preference_loss

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(51)
    b, t, d, vocab = 2, 7, 16, 33
    hidden = torch.randn(2 * b, t, d, generator=gen)
    ref_hidden = hidden + 0.1 * torch.randn(2 * b, t, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    labels = torch.randint(0, vocab, (2 * b, t), generator=gen)
    labels[:, :2] = -100  # prompts
    labels[1, 5:] = -100  # padding
    sizes = split_sizes(vocab, world, "chunk")
    off, size = sum(sizes[:rank]), sizes[rank]
    cases = [
        ("apo_zero", dict(loss_type="apo_zero", beta=0.2)),
        ("sigmoid + WPO weights, softcap", dict(loss_type="sigmoid", use_weighting=True, softcap=4.0)),
        ("apo_down + sft, mean reduction", dict(loss_type=["apo_down", "sft"], loss_weights=[1.0, 0.5],
                                                reduction="mean")),
        ("apo_zero triton", dict(loss_type="apo_zero", backend="triton", temperature=0.9)),
    ]
    mesh = init_device_mesh("cpu", (world,))
    for name, kw in cases:
        try:
            leaves1 = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
            one = fused_linear_preference_loss(*leaves1[:2], labels, leaves1[2], ref_hidden=ref_hidden, **kw)
            one.loss.backward()
            for how in ("group", "dtensor"):
                if how == "group":
                    leaves = [hidden.clone().requires_grad_(), weight[off:off + size].clone().requires_grad_(),
                              bias[off:off + size].clone().requires_grad_()]
                    vp = fused_linear_preference_loss(leaves[0], leaves[1], labels, leaves[2],
                                                      ref_hidden=ref_hidden, vocab_parallel_group=dist.group.WORLD,
                                                      **kw)
                else:
                    leaves = [hidden.clone().requires_grad_(),
                              distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_(),
                              distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_()]
                    vp = FusedLinearPreferenceLoss(**kw)(leaves[0], leaves[1], labels, leaves[2],
                                                         ref_hidden=ref_hidden)
                vp.loss.backward()
                tag = f"preference {name} ({how})"
                near(f"{tag} loss", vp.loss, one.loss, 1e-5)
                near(f"{tag} ref logps", vp.ref_chosen_logps, one.ref_chosen_logps, 1e-4)
                if set(vp.metrics) != set(one.metrics) or not vp.metrics:
                    fail(f"{tag}: metrics {sorted(vp.metrics)} vs {sorted(one.metrics)}")
                for key in one.metrics:
                    near(f"{tag} metric {key}", vp.metrics.get(key, torch.tensor(float('nan'))),
                         one.metrics[key], 1e-4)
                grads = [x.grad.to_local() if hasattr(x.grad, "to_local") else x.grad for x in leaves]
                near(f"{tag} dH", grads[0], leaves1[0].grad, 1e-5)
                near(f"{tag} dW", grads[1], leaves1[1].grad[off:off + size], 1e-5)
                near(f"{tag} db", grads[2], leaves1[2].grad[off:off + size], 1e-5)
        except Exception:  # noqa: BLE001
            fail(f"preference {name}: {traceback.format_exc()}")


def group_patch_model() -> None:
    """patch_model on a tiny Llama whose lm_head is tensor-parallel (ColwiseParallel: weight
    Shard(0)): the head stays sharded, log-probs and gradients match one process."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from apo_kernels.integrations.transformers import output_head, patch_model

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(61)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    one = LlamaForCausalLM(config)
    tp = copy.deepcopy(one)
    parallelize_module(tp, init_device_mesh("cpu", (world,)), {"lm_head": ColwiseParallel()})
    patch_model(one, outputs=("entropy",))
    patch_model(tp, outputs=("entropy",))
    head_weight, _ = output_head(tp)
    if type(head_weight).__name__ != "DTensor":
        fail(f"patch_model TP: output_head gathered the tensor-parallel head ({type(head_weight).__name__})")
    gen = torch.Generator().manual_seed(62)
    ids = torch.randint(0, 67, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    outs = []
    for model in (one, tp):
        out = model(input_ids=ids, labels=labels)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        outs.append(out)
    near("patch_model TP logprobs", outs[1].logprobs, outs[0].logprobs, 1e-5)
    near("patch_model TP entropy", outs[1].entropy, outs[0].entropy, 1e-5)
    near("patch_model TP loss", outs[1].loss, outs[0].loss, 1e-6)
    sizes = split_sizes(67, world, "chunk")
    off, size = sum(sizes[:rank]), sizes[rank]
    grad = tp.lm_head.weight.grad
    near("patch_model TP lm_head dW", grad.to_local(), one.lm_head.weight.grad[off:off + size], 1e-5)
    for name, p in one.named_parameters():
        if "lm_head" in name:
            continue
        q = dict(tp.named_parameters())[name]
        near(f"patch_model TP grad {name}", q.grad, p.grad, 1e-5)


def group_compile() -> None:
    """``torch.compile`` around the vocabulary-parallel op: the op runs eagerly behind a graph
    break (collectives, a host sync), with the eager values and gradients and no Dynamo warning
    from tracing into it."""
    import warnings

    sizes = split_sizes(33, dist.get_world_size(), "chunk")
    hidden, full, _, labels, g, ge = make_case(31, 13, 16, 33, torch.float32, bias=False, peaked=False,
                                               labels_on="spread", ignored=0.2, sizes=sizes)
    off = sum(sizes[:dist.get_rank()])
    weight = full[off:off + sizes[dist.get_rank()]]

    def f(h, w):
        out = linear_logprobs(h, w, labels, return_entropy=True, vocab_parallel_group=dist.group.WORLD)
        return (out.logprobs * g).sum() + (out.entropy * ge).sum()

    results = []
    for fn in (f, torch.compile(f)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss = fn(h, w)
            loss.backward()
        dynamo = [str(x.message)[:120] for x in seen if "Dynamo" in str(x.message)]
        if dynamo:
            fail(f"compile: Dynamo warned: {dynamo}")
        results.append((loss.detach(), h.grad, w.grad))
    for name, eager, compiled in zip(("loss", "dH", "dW"), *results):
        near(f"compile {name}", compiled, eager, 1e-6 * (1 + float(eager.abs().max())))


def group_fsdp_tp_head() -> None:
    """FSDP2 x TP with torch's own APIs: ``ColwiseParallel`` on ``lm_head`` over the ``tp`` mesh,
    then the head in its OWN ``fully_shard`` group over ``dp`` (size 1 here: 2 ranks are one TP
    group). The patched forward runs the head through that group's forward, where
    ColwiseParallel's input/output hooks must not run (they passed on only the hidden states:
    a TypeError inside the op). Log-probs, loss and every gradient vs one process."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from apo_kernels.integrations.transformers import patch_model

    world = dist.get_world_size()
    torch.manual_seed(71)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    one = LlamaForCausalLM(config)
    par = copy.deepcopy(one)
    patch_model(one)
    patch_model(par)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    parallelize_module(par, mesh["tp"], {"lm_head": ColwiseParallel()})
    fully_shard(par.lm_head, mesh=mesh["dp"])
    fully_shard(par, mesh=mesh["dp"])
    gen = torch.Generator().manual_seed(72)
    ids = torch.randint(0, 67, (2, 9), generator=gen)
    labels = ids.clone()
    labels[1, :4] = -100
    outs = []
    for model in (one, par):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        outs.append(out)
    near("FSDP2 x TP head group logprobs", outs[1].logprobs, outs[0].logprobs, 1e-5)
    near("FSDP2 x TP head group loss", outs[1].loss, outs[0].loss, 1e-6)
    grads = {n: p.grad for n, p in par.named_parameters()}
    for name, p in one.named_parameters():
        grad = grads[name]
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        near(f"FSDP2 x TP head group grad {name}", grad, p.grad, 1e-5)


GROUPS = {"op": group_op, "dtensor": group_dtensor, "errors": group_errors, "sgd": group_sgd,
          "preference": group_preference, "patch_model": group_patch_model, "compile": group_compile,
          "fsdp_tp_head": group_fsdp_tp_head}


def main(argv: list[str]) -> int:
    dist.init_process_group("gloo")
    for name in argv or list(GROUPS):
        try:
            GROUPS[name]()
        except Exception:  # noqa: BLE001
            fail(f"group {name}: {traceback.format_exc()}")
    dist.barrier()
    rank = dist.get_rank()
    for line in FAILURES:
        print(line, flush=True)
    print(f"rank {rank}: {len(FAILURES)} failure(s)", flush=True)
    dist.destroy_process_group()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
