"""``fused-owner``: the Hopper rebuild of issue 11 (being written; modelled from its design).

Kept rows compacted into a contiguous ``[M, D]`` buffer (TMA-friendly). Forward as before with
128x128 tiles (one program per SM), the vocabulary-split index fastest so the programs sharing a
token block run together and read its H block from L2. Backward chunked over the vocabulary in
chunks of ``Vc`` columns (16-bit ``dz`` buffer ``[M, Vc]`` within ``Options.owner_dz_budget_mib``),
per chunk: K1 recomputes the logit tiles the pre-skip keeps and writes their dz + a kept flag;
K2 ``dW[chunk] = dz.T @ H`` (each program owns its output tile, written once in fp32); K3
``dH += dz @ W[chunk]`` (owner, fp32 read-modify-write of ``[M, D]`` per chunk). K2 and K3 skip
unkept tiles (block-sparse K loop). Then the sparse label term (relaxed atomics). No tile atomics.
"""

from __future__ import annotations

from ..epilogue import backward_ops, forward_ops
from ..launch import Launch, cdiv, gemm_hbm, l2_hit
from ..problem import Options, Problem
from ..rates import DeviceRates
from .common import FP32, cast_to_input, label_term, zero_fill
from .fused_atomic import vocab_splits

BN = BV = 128
GROUP_N = 8


def chunk_columns(p: Problem, o: Options) -> tuple[int, int]:
    """(Vc, chunks): the widest multiple of 128 whose ``[M, Vc]`` 16-bit dz fits the budget."""
    vc = int(o.owner_dz_budget_mib * 2**20 // (p.n * p.in_bytes)) // BV * BV
    vc = max(BV, min(vc, cdiv(p.v, BV) * BV))
    return vc, cdiv(p.v, vc)


def forward(p: Problem, r: DeviceRates, o: Options) -> list[Launch]:
    tb, vt = cdiv(p.n, BN), cdiv(p.v, BV)
    block = BN * p.d * p.in_bytes
    splits, per_split = vocab_splits(tb, vt, r.sms)
    # ASSUMED launcher rule: enough splits that the live token blocks' H fits the usable L2
    # (r.sms / splits blocks run at once), else H re-reads spill to HBM at large D.
    need = cdiv(r.sms * block, r.l2_usable)
    if need > splits:
        per_split = cdiv(vt, min(vt, need))
        splits = cdiv(vt, per_split)
    grid, slots = tb * splits, r.sms
    concurrent_blocks = max(1, min(tb, slots // splits))
    working = concurrent_blocks * block
    hit = l2_hit(working, r.l2_usable)
    h_bytes = p.n * p.d * p.in_bytes + grid * max(per_split - 1, 0) * block * (1 - hit)
    w_bytes = max(1.0, grid / slots) * p.v * p.d * p.in_bytes
    alu, sfu = forward_ops(bool(p.softcap), o.with_entropy)
    partials = (7 if o.with_entropy else 3) * splits * p.n * FP32
    tile_max = p.n * vt * FP32
    return [
        Launch(name="forward tiles 128x128", phase="forward", engine="triton",
               tc=((2.0 * tb * BN * p.d * vt * BV, "triton-128x128"),),
               alu_ops=alu * float(p.n) * p.v, sfu_ops=sfu * float(p.n) * p.v,
               hbm_read=h_bytes + w_bytes, hbm_write=partials + tile_max, grid=grid, resident=1,
               l2=(f"{splits} splits of a token block run together: H block read from HBM once, "
                   f"re-read from L2 ({concurrent_blocks} blocks = {working / 1e6:.0f} MB live, "
                   f"hit {hit:.0%}); W once per wave")),
        Launch(name="merge splits", phase="forward", engine="triton", hbm_read=partials,
               hbm_write=4 * p.n * FP32, alu_ops=10.0 * splits * p.n, grid=cdiv(p.n, 128),
               resident=8, l2="streaming"),
    ]


def backward(p: Problem, r: DeviceRates, o: Options) -> list[Launch]:
    vc_max, chunks = chunk_columns(p, o)
    vc = p.v / chunks  # average chunk width (the last chunk is narrower)
    keep = 1.0 - p.skip
    tb = cdiv(p.n, BN)
    kept_logits = keep * p.n * vc
    gemm = 2.0 * p.d * kept_logits
    dz_bytes = kept_logits * p.in_bytes
    groups = cdiv(tb, GROUP_N)
    alu, sfu = backward_ops(bool(p.softcap), o.with_entropy)
    k1 = Launch(
        name=f"K1 recompute + dz (Vc={vc_max})", phase="backward", engine="triton",
        tc=((gemm, "triton-128x128"),), alu_ops=alu * kept_logits, sfu_ops=sfu * kept_logits,
        hbm_read=(p.n * p.d * p.in_bytes + groups * vc * p.d * p.in_bytes * keep
                  + p.n * vc / BV * FP32 + 4 * p.n * FP32),
        hbm_write=dz_bytes + tb * vc / BV, grid=int(tb * cdiv(vc, BV)), resident=1, count=chunks,
        l2=f"GROUP_N={GROUP_N} token blocks share each W tile in L2 ({groups} W passes per chunk); "
           "H read once per chunk; dz written for kept tiles only")
    a2, note2 = gemm_hbm(int(vc), p.d, dz_bytes, p.n * p.d * p.in_bytes, sms=r.sms,
                         l2_usable=r.l2_usable)
    k2 = Launch(
        name="K2 dW[chunk] = dz.T @ H (owner)", phase="backward", engine="triton",
        tc=((gemm, "triton-128x128"),), hbm_read=a2 + tb * vc / BV, hbm_write=vc * p.d * FP32,
        grid=int(cdiv(vc, BV) * cdiv(p.d, BN)), resident=1, count=chunks,
        l2=note2 + "; fp32 dW tile written once")
    a3, note3 = gemm_hbm(p.n, p.d, dz_bytes, vc * p.d * p.in_bytes * keep, sms=r.sms,
                         l2_usable=r.l2_usable)
    k3 = Launch(
        name="K3 dH += dz @ W[chunk] (owner)", phase="backward", engine="triton",
        tc=((gemm, "triton-128x128"),), hbm_read=a3 + tb * vc / BV + p.n * p.d * FP32,
        hbm_write=p.n * p.d * FP32, grid=int(tb * cdiv(p.d, BN)), resident=1, count=chunks,
        l2=note3 + "; fp32 dH read + written once per chunk")
    return [zero_fill("zero fp32 dH", p.n * p.d), k1, k2, k3, label_term(p, relaxed=True),
            cast_to_input("dH fp32 -> input dtype", p.n * p.d, p.in_bytes),
            cast_to_input("dW fp32 -> input dtype", p.v * p.d, p.in_bytes)]


def launches(p: Problem, r: DeviceRates, o: Options) -> list[Launch]:
    return forward(p, r, o) + backward(p, r, o)
