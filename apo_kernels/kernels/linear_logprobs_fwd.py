"""Forward of the fused linear log-probs: logits tiles never leave the chip.

For a token t with transformed logits z_v (see ``common.transform_logits``) and label y:

    logp_t   = (z_y - m) - log s1,        lse = m + log s1,  s1 = sum_v exp(z_v - m)
    H_t      = lse - E_p[z] = log s1 - u / s1,               u  = sum_v exp(z_v - m) (z_v - m)
    log sum_v p_v^2 = log s2 - 2 log s1,                     s2 = sum_v exp(2 (z_v - m))
    mean_t   = (sum_v z_v) / V
    is_top1  = z_y >= max_v z_v  and  max_{v<y} z_v < z_y     (first arg-max on ties)

Online update when a tile raises the running max from m to m' (alpha = exp(m - m')):

    s1' = alpha s1 + sum_tile exp(z - m')
    s2' = alpha^2 s2 + sum_tile exp(2 (z - m'))
    u'  = alpha (u + (m - m') s1) + sum_tile exp(z - m') (z - m')

(u is kept relative to the running max, so H never forms lse - E[z] from two large numbers.)
The normaliser is kept as the pair (m, log s1) rather than lse = m + log s1: with peaked logits
|lse| is large and rounding it to fp32 costs ulp(lse) in every p = exp(z - lse) of the
backward, which for the label (p near 1) is the whole error of 1 - p. With the pair,
z - m is exact (Sterbenz) near the max and log s1 is small.
Each (token block, vocabulary split) program writes these partials; ``_merge_kernel`` combines
the splits with the same rule (alpha_s = exp(m_s - M)) and writes the per-token outputs.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .common import dot_dtype, input_precision
from .configs import forward_config, forward_variants, vocab_splits
from .launch_specs import LaunchSpec
from .logit_tile import transformed_logit_tile
from .fast_path import KernelBuffer, aligned, gemm_operands
from .operands import compact_rows

# Rows of the partial-statistics buffer [NUM_PARTIALS, splits, M].
_M, _S1, _ZY, _U, _S2, _SUMZ, _MAXBEFORE = range(7)
NUM_PARTIALS = 7
MERGE_BLOCK = 128


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, tmax_ptr,
    M, V, D, stride_hn, stride_wv, num_splits, tiles_per_split, part_stride,
    tmax_stride, scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr, RECORD_TILE_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one block of BLOCK_N compacted tokens x one vocabulary split.

    1-D launch, split index fastest: the ``num_splits`` programs that share a token block are
    consecutive, so they run at the same time and read that block of ``h`` from L2 (it is
    ``BLOCK_N x D``, re-read once per vocabulary tile), while programs of the same split in
    neighbouring token blocks stream the same ``W`` rows at about the same pace.
    """
    pid = tl.program_id(0)
    pid_n = pid // num_splits
    split = pid % num_splits
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < M
    y = tl.load(labels_ptr + n, mask=n_valid, other=-1).to(tl.int64)

    neg_inf = float("-inf")
    m = tl.full((BLOCK_N,), neg_inf, tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    s2 = tl.zeros((BLOCK_N,), tl.float32)
    sumz = tl.zeros((BLOCK_N,), tl.float32)
    maxbefore = tl.full((BLOCK_N,), neg_inf, tl.float32)

    v_start = split * tiles_per_split * BLOCK_V
    v_stop = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_valid = v < V
        z, _ = transformed_logit_tile(
            h_ptr, w_ptr, b_ptr, n, n_valid, v, v_valid, D,
            stride_hn, stride_wv, scale, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        z = tl.where(v_valid[None, :], z, neg_inf)
        tile_max = tl.max(z, 1)
        if RECORD_TILE_MAX:
            # Lets the backward bound max_v p = exp(tile_max - lse) and skip the whole tile,
            # recompute included (1/BLOCK_V of the logits' size).
            tl.store(tmax_ptr + n.to(tl.int64) * tmax_stride + v0 // BLOCK_V, tile_max, mask=n_valid)

        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # 0 at masked entries
        if WITH_ENTROPY:
            # s1 == 0 only before the first tile, where m = -inf and (m - m_new) * 0 is NaN.
            shift = tl.where(s1 > 0, (m - m_new) * s1, 0.0)
            pz = tl.where(v_valid[None, :], p * (z - m_new[:, None]), 0.0)
            u = alpha * (u + shift) + tl.sum(pz, 1)
        if WITH_STATS:
            s2 = s2 * alpha * alpha + tl.sum(p * p, 1)
            sumz += tl.sum(tl.where(v_valid[None, :], z, 0.0), 1)
            before = v.to(tl.int64)[None, :] < y[:, None]
            maxbefore = tl.maximum(maxbefore, tl.max(tl.where(before, z, neg_inf), 1))
        s1 = s1 * alpha + tl.sum(p, 1)
        zy += tl.sum(tl.where(v.to(tl.int64)[None, :] == y[:, None], z, 0.0), 1)
        m = m_new

    # Offsets stay in int32: the launcher checks NUM_PARTIALS * splits * M < 2**31.
    base = part_ptr + split * M + n
    stride = part_stride
    tl.store(base + 0 * stride, m, mask=n_valid)
    tl.store(base + 1 * stride, s1, mask=n_valid)
    tl.store(base + 2 * stride, zy, mask=n_valid)
    if WITH_ENTROPY:
        tl.store(base + 3 * stride, u, mask=n_valid)
    if WITH_STATS:
        tl.store(base + 4 * stride, s2, mask=n_valid)
        tl.store(base + 5 * stride, sumz, mask=n_valid)
        tl.store(base + 6 * stride, maxbefore, mask=n_valid)


@triton.jit
def _merge_kernel(
    part_ptr, rows_ptr, logp_ptr, max_ptr, lognorm_ptr, ent_ptr, mean_ptr, top1_ptr, lsp2_ptr,
    M, num_splits, part_stride, inv_v,
    WITH_ENTROPY: tl.constexpr, WITH_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_valid = n < M
    rows = tl.load(rows_ptr + n, mask=n_valid, other=0).to(tl.int64)
    stride = part_stride

    big_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        big_m = tl.maximum(big_m, tl.load(part_ptr + s * M + n, mask=n_valid, other=0.0))
    s1 = tl.zeros((BLOCK,), tl.float32)
    zy = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    sumz = tl.zeros((BLOCK,), tl.float32)
    maxbefore = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        base = part_ptr + s * M + n
        m_s = tl.load(base, mask=n_valid, other=0.0)
        s1_s = tl.load(base + 1 * stride, mask=n_valid, other=0.0)
        a = tl.exp(m_s - big_m)
        s1 += a * s1_s
        zy += tl.load(base + 2 * stride, mask=n_valid, other=0.0)
        if WITH_ENTROPY:
            u += a * (tl.load(base + 3 * stride, mask=n_valid, other=0.0) + (m_s - big_m) * s1_s)
        if WITH_STATS:
            s2 += a * a * tl.load(base + 4 * stride, mask=n_valid, other=0.0)
            sumz += tl.load(base + 5 * stride, mask=n_valid, other=0.0)
            maxbefore = tl.maximum(maxbefore, tl.load(base + 6 * stride, mask=n_valid, other=0.0))

    log_s1 = tl.log(s1)
    tl.store(logp_ptr + rows, (zy - big_m) - log_s1, mask=n_valid)
    tl.store(max_ptr + rows, big_m, mask=n_valid)
    tl.store(lognorm_ptr + rows, log_s1, mask=n_valid)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, log_s1 - u / s1, mask=n_valid)
    if WITH_STATS:
        tl.store(mean_ptr + rows, sumz * inv_v, mask=n_valid)
        top1 = (zy >= big_m) & (maxbefore < zy)
        tl.store(top1_ptr + rows, top1.to(tl.int8), mask=n_valid)
        tl.store(lsp2_ptr + rows, tl.log(s2) - 2.0 * log_s1, mask=n_valid)


def tile_max_columns(vocab_size: int, dtype: torch.dtype) -> int:
    """Columns of the per-tile max buffer: one per forward vocabulary tile."""
    return triton.cdiv(vocab_size, forward_config(dtype).block_v)


def triton_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    *,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
    with_stats: bool,
    outputs: dict[str, torch.Tensor],
    tile_max: torch.Tensor | None = None,
) -> None:
    """Fill ``outputs`` at ``rows``; entries of other rows are left as they are.

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16, any strides, alignment and D (the kept rows are
            compacted into a contiguous ``[M, D]`` copy unless every row is kept and ``hidden``
            is contiguous; D not a multiple of 16 is zero-padded: see ``fast_path``).
        weight: ``[V, D]`` same dtype (copied or padded likewise when it breaks the fast path).
        bias: ``[V]`` or None.
        labels: ``[N]`` int64 at every index in ``rows``: ``0 <= y < V``, or outside that range for
            a vocabulary shard's token whose label another shard holds (no label term: logp,
            is_top1 of that row are meaningless; the partition sums are right).
        rows: ``[M]`` int64, the sorted kept token indices (M >= 1).
        outputs: fp32 ``[N]`` tensors ``logp``, ``row_max`` (m), ``log_norm`` (log s1) and,
            when asked, ``entropy``,
            ``mean_logit``, ``log_sum_p2``; int8 ``[N]`` ``is_top1``.
        tile_max: optional fp32 ``[N, tile_max_columns(V, dtype)]`` (N >= M): row ``i < M``
            receives the ``i``-th kept token's max transformed logit in each forward vocabulary
            tile (compacted order, as the backward reads it), for the backward's pre-skip.
    """
    num_rows = rows.numel()
    V = weight.shape[0]
    cfg = forward_config(hidden.dtype, heavy=with_entropy or with_stats)
    h_c = compact_rows(hidden, rows)
    labels_c = aligned(compact_rows(labels, rows), "labels")
    # The compiled fast path assumes aligned operands with D a multiple of 16 (fast_path): an
    # input that breaks it is copied or zero-padded (logged at debug level), never run slow.
    h_c, weight, D = gemm_operands(h_c, weight)
    bias = aligned(bias, "bias") if bias is not None else None
    rows = aligned(rows, "rows")
    written = {name: KernelBuffer(t, name) for name, t in outputs.items()}
    outputs = {name: b.tensor for name, b in written.items()}
    tile_max_out = KernelBuffer(tile_max, "tile_max")
    tile_max = tile_max_out.tensor
    token_blocks = triton.cdiv(num_rows, cfg.block_n)
    splits, tiles_per_split = vocab_splits(token_blocks, triton.cdiv(V, cfg.block_v), hidden.device,
                                           block_bytes=cfg.block_n * D * hidden.element_size())
    if NUM_PARTIALS * splits * num_rows >= 2**31:
        raise ValueError(f"too many tokens for one launch ({num_rows}); split the batch")
    partials = torch.empty((NUM_PARTIALS, splits, num_rows), device=hidden.device, dtype=torch.float32)
    _forward_kernel[(token_blocks * splits,)](
        h_c, weight, bias if bias is not None else h_c, labels_c, partials,
        tile_max if tile_max is not None else partials,
        num_rows, V, D, h_c.stride(0), weight.stride(0),
        splits, tiles_per_split, splits * num_rows, tile_max.stride(0) if tile_max is not None else 0,
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=with_entropy, WITH_STATS=with_stats, RECORD_TILE_MAX=tile_max is not None,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_DTYPE=dot_dtype(hidden.dtype), INPUT_PRECISION=input_precision(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dummy = outputs["logp"]
    _merge_kernel[(triton.cdiv(num_rows, MERGE_BLOCK),)](
        partials, rows, outputs["logp"], outputs["row_max"], outputs["log_norm"],
        outputs.get("entropy", dummy), outputs.get("mean_logit", dummy),
        outputs.get("is_top1", dummy), outputs.get("log_sum_p2", dummy),
        num_rows, splits, splits * num_rows, 1.0 / V,
        WITH_ENTROPY=with_entropy, WITH_STATS=with_stats, BLOCK=MERGE_BLOCK,
    )
    for buffer in (*written.values(), tile_max_out):
        buffer.finish()


def launch_specs(exhaustive: bool = False) -> list[LaunchSpec]:
    """Every forward variant the launcher can pick on a GPU.

    Per (config, dtype, precision, heavy = entropy or stats): by default the optional features
    all on, all off, and the common policy forwards (tile max, with or without entropy);
    ``exhaustive``: every combination of the five feature flags (16 per config; a long
    compile, for a one-off check that no combination spills: ptxas is not monotone in them).
    """
    specs = []
    for cfg, dtype, precision, heavy in forward_variants():
        tl_dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
                    torch.bfloat16: tl.bfloat16}[dtype]
        if exhaustive:
            flag_sets = {"".join("BCESM"[i] if f else "-" for i, f in enumerate(flags)): flags
                         for flags in itertools.product((False, True), repeat=5)
                         if (flags[2] or flags[3]) == heavy}
        else:
            flag_sets = ({"all": (True,) * 5, "entropy_tmax": (False, False, True, False, True),
                          "stats": (False, False, False, True, False)} if heavy else
                         {"all": (True, True, False, False, True), "none": (False,) * 5,
                          "tmax": (False, False, False, False, True)})
        for label, (bias, cap, ent, with_stats, tmax) in flag_sets.items():
            specs.append(LaunchSpec(
                kernel=_forward_kernel,
                config=f"{cfg.label}.{precision if dtype == torch.float32 else 'mma'}."
                       f"{'heavy' if heavy else 'light'}.{label}",
                dtype=dtype,
                constexprs=dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, WITH_ENTROPY=ent, WITH_STATS=with_stats,
                                RECORD_TILE_MAX=tmax, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                                BLOCK_D=cfg.block_d, DOT_DTYPE=tl_dtype, INPUT_PRECISION=precision),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                # without a tile-max buffer the launcher passes stride 0 (divisible)
                divisible=("D", "stride_hn", "stride_wv") + (() if tmax else ("tmax_stride",)),
                expects_dot=dtype != torch.float32 or precision == "tf32",
                expects_pipelined=True))
    for label, on in (("all", True), ("none", False)):
        specs.append(LaunchSpec(
            kernel=_merge_kernel, config=f"b{MERGE_BLOCK}.{label}", dtype=torch.float32,
            constexprs=dict(WITH_ENTROPY=on, WITH_STATS=on, BLOCK=MERGE_BLOCK),
            # without stats the launcher passes an fp32 placeholder for the int8 output
            types={} if on else {"top1_ptr": "*fp32"}, num_warps=4, num_stages=3))
    return specs
