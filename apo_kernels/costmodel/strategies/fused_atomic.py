"""``fused-atomic``: the Triton kernels as they are today (before issue 11's rebuild).

Forward (``_forward_kernel``): 64x128x32 tiles, 8 warps (234-242 registers: one program per
SM), grid (token blocks, vocabulary splits) with the token block fastest, each program sweeping
its share of the vocabulary and re-loading its 64 x D block of H for every vocabulary tile;
then ``_merge_kernel``. Backward (``_backward_atomic_kernel``): one program per 64x64 tile
(GROUP_N = 8 token blocks sweep the vocabulary together), recompute, dz, then per 32-wide
D chunk ``dz @ W`` and ``dz.T @ h`` with fp32 ``tl.atomic_add`` into dH and dW (acq_rel:
MEMBAR.ALL.GPU around each), then the sparse label-term kernel.
``relaxed=True`` models the same kernels with ``sem="relaxed"`` atomics (issue 11, item 2 only).
"""

from __future__ import annotations

from ..epilogue import backward_ops, forward_ops
from ..launch import Launch, cdiv, l2_hit
from ..problem import Options, Problem
from ..rates import DeviceRates
from .common import FP32, cast_to_input, label_term, zero_fill

FWD_BN, FWD_BV, BWD_BN, BWD_BV, BLOCK_D, GROUP_N = 64, 128, 64, 64, 32, 8
PROGRAMS_PER_SM = 2  # the launcher's split target: 2 programs per SM
THREADS = 256


def vocab_splits(token_blocks: int, vocab_tiles: int, sms: int) -> tuple[int, int]:
    """Same rule as ``kernels.configs.vocab_splits``: (splits, tiles per split)."""
    target = PROGRAMS_PER_SM * sms
    splits = max(1, min(vocab_tiles, cdiv(target, max(token_blocks, 1))))
    per_split = cdiv(vocab_tiles, splits)
    return cdiv(vocab_tiles, per_split), per_split


def forward(p: Problem, r: DeviceRates, o: Options) -> list[Launch]:
    tb, vt = cdiv(p.n, FWD_BN), cdiv(p.v, FWD_BV)
    splits, per_split = vocab_splits(tb, vt, r.sms)
    grid, slots = tb * splits, r.sms
    n_pad, v_pad = tb * FWD_BN, vt * FWD_BV
    block = FWD_BN * p.d * p.in_bytes
    working = min(grid, slots) * block
    hit = l2_hit(working, r.l2_usable)
    h_bytes = grid * block + grid * max(per_split - 1, 0) * block * (1 - hit)
    w_bytes = max(1.0, grid / slots) * p.v * p.d * p.in_bytes / splits
    alu, sfu = forward_ops(bool(p.softcap), o.with_entropy)
    partials = (7 if o.with_entropy else 3) * splits * p.n * FP32
    tile_max = p.n * vt * FP32
    tiles = [Launch(
        name="forward tiles 64x128x32", phase="forward", engine="triton",
        tc=((2.0 * n_pad * p.d * v_pad, "triton-64x128"),),
        alu_ops=alu * float(p.n) * p.v, sfu_ops=sfu * float(p.n) * p.v,
        hbm_read=h_bytes + w_bytes, hbm_write=partials + tile_max, grid=grid, resident=1,
        l2=(f"H block (64xD) re-read per vocab tile; {min(grid, slots)} resident blocks = "
            f"{working / 1e6:.0f} MB, L2 hit {hit:.0%}; W read once per wave of programs "
            f"(they sweep in step), {splits} vocab splits"))]
    merge = Launch(name="merge splits", phase="forward", engine="triton", hbm_read=partials,
                   hbm_write=4 * p.n * FP32, alu_ops=10.0 * splits * p.n, grid=cdiv(p.n, 128),
                   resident=8, l2="streaming")
    return tiles + [merge]


def backward(p: Problem, r: DeviceRates, o: Options, *, relaxed: bool = False) -> list[Launch]:
    tb, vb = cdiv(p.n, BWD_BN), cdiv(p.v, BWD_BV)
    tiles = tb * vb
    keep = 1.0 - p.skip
    kept_logits = keep * tiles * BWD_BN * BWD_BV
    groups = cdiv(tb, GROUP_N)
    group_dh = GROUP_N * BWD_BN * p.d * (FP32 + p.in_bytes)
    hit = l2_hit(group_dh, r.l2_usable)
    reads = (groups * p.v * p.d * p.in_bytes * keep  # W per group of token blocks
             + p.n * p.d * p.in_bytes  # H once (the group's rows stay in L2)
             + p.n * cdiv(p.v, FWD_BV) * FP32  # the forward's tile maxima (pre-skip)
             + groups * p.v * p.d * FP32 * keep  # dW tiles: atomics RMW in L2, evicted per group
             + p.n * p.d * FP32 * (1 + (1 - hit) * vb * keep)  # dH rows
             + 4 * p.n * FP32)
    writes = groups * p.v * p.d * FP32 * keep + p.n * p.d * FP32 * (1 + (1 - hit) * vb * keep)
    alu, sfu = backward_ops(bool(p.softcap), o.with_entropy)
    per_tile_fences = 2 * cdiv(p.d, BLOCK_D) * cdiv(BWD_BN * BLOCK_D, THREADS * 4)
    launches = [zero_fill("zero fp32 dH", p.n * p.d), zero_fill("zero fp32 dW", p.v * p.d)]
    launches.append(Launch(
        name="backward tiles 64x64x32 + atomics", phase="backward", engine="triton",
        tc=((2.0 * p.d * kept_logits, "triton-64x64"), (4.0 * p.d * kept_logits, "triton-narrow")),
        alu_ops=alu * kept_logits, sfu_ops=sfu * kept_logits, hbm_read=reads, hbm_write=writes,
        atomics=kept_logits / BWD_BV * p.d + kept_logits / BWD_BN * p.d,
        fences_per_program=0.0 if relaxed else keep * per_tile_fences, grid=tiles, resident=1,
        l2=(f"GROUP_N={GROUP_N} token blocks sweep V together: W and the dW tiles (fp32 atomics, "
            f"RMW) go through HBM once per group ({groups} groups), H and the group's dH rows "
            f"({group_dh / 1e6:.0f} MB, hit {hit:.0%}) stay in L2; skipped tiles are assumed "
            "vocabulary-correlated (a skipped W tile is skipped by the whole group)")))
    launches.append(label_term(p, relaxed=relaxed))
    launches += [cast_to_input("dH fp32 -> input dtype", p.n * p.d, p.in_bytes),
                 cast_to_input("dW fp32 -> input dtype", p.v * p.d, p.in_bytes)]
    return launches


def launches(p: Problem, r: DeviceRates, o: Options, *, relaxed: bool = False) -> list[Launch]:
    return forward(p, r, o) + backward(p, r, o, relaxed=relaxed)
