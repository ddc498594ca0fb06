"""Backward of the fused linear log-probs: vocabulary-chunked, each output tile owned by one
program, no tile atomics.

Gradient of the per-token outputs with respect to the transformed logits z (p = softmax(z),
g = dL/dlogp_t, e = dL/dH_t, E[z] = lse - H). Everything is taken relative to the row max m
saved by the forward (see there): p = exp((z - m) - log s1), z - E[z] = (z - m) - (log s1 - H).

    d logp / dz_v = [v = y] - p_v
    d H    / dz_v = p_v (E[z] - z_v)          (H = lse - sum_v p_v z_v)
    =>  dz_v = g [v = y] - p_v (g + e (z_v - E[z]))

then through the transform, ``dacc_v = dz_v * jac_v`` (see ``common.transform_logits``), and
``dH = dacc @ W``, ``dW = dacc^T @ h``, ``dbias = sum_t dacc``, accumulated in fp32.

Schedule (``triton_backward``). The kept hidden rows are compacted once into a contiguous
``h_c [M, D]`` (labels and per-token vectors likewise), then for each vocabulary chunk
``[v0, v0 + C)`` (C: ``configs.dz_chunk_columns``, the ``[M, C]`` dz buffer within a memory
budget):

1. ``_dz_kernel``, one program per (token block, vocabulary tile) of the chunk, grouped so a few
   token blocks sweep the chunk together (L2 reuse of both operands): recompute the logit
   tile (2 D FLOPs per entry), form ``dacc`` and write it to the dz buffer in the input dtype
   (the dtype the gradient GEMMs feed the tensor cores, as before) plus a kept flag per tile.
   A tile is not written (flag 0) when the filter finds every ``|dacc|`` at most
   ``filter_eps * (|g| + |e|) * scale / T``; with the pre-skip it is not even recomputed when
   the forward's per-tile max logit proves ``max p = exp(tile_max - lse) <= filter_eps``.
2. ``_dw_kernel``: ``dW[v0:v0+C] = dz^T @ h_c``, one program per (vocabulary tile, D tile)
   output, looping over the token blocks whose tile is kept (block-sparse, a list built from
   the flags), fp32 accumulator written once (no read-modify-write, no atomics); dbias is the
   column sum of the same dz tiles.
3. ``_dh_kernel``: ``dH_c += dz @ W[v0:v0+C]``, one program per (token tile, D tile) output,
   looping over the kept vocabulary tiles; fp32 read-modify-write of its own tile once per
   chunk (chunks run in order on one stream).

Every GEMM is a plain matmul of >= 64-row, >= 64-column tiles with contiguous operands, so it
compiles to wgmma with cp.async-pipelined loads (see ``launch_specs`` and docs/kernels.md).
FLOPs: 2 M D V (recompute) + 2 M D V (dW) + 2 M D V (dH), times the kept fraction.
Extra memory traffic per chunk: the dz buffer written once and read twice, dH_c read and
written once.

The label term ``g [v = y]`` rides inside the tiles, added in fp32 before dz is rounded to
the input dtype: at the label dz = g (1 - p), which is tiny when p -> 1. (The previous design
left it out of the tiles and added ``+g W[y]`` / ``+g h`` in a sparse per-token kernel; with a
16-bit dz buffer that cancels catastrophically: the tile's ``-p g`` is rounded to 2^-9 relative,
so dH_t keeps an error of ``g 2^-9 |W[y]|`` where the true gradient g (1 - p) W[y] is ~0, on
exactly the peaked on-policy tokens the filter is for; the interpreter, which now rounds dz
like the GPU, showed it.) So the pre-skip keeps every tile that holds a label of its token
block, and nothing anywhere is an atomic: the backward is deterministic (bit-identical run to
run) in every mode; ``deterministic=True`` costs nothing extra (the old deterministic mode
recomputed the logits twice, 8 N D V).
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ..ops import skip_stats
from .common import dot_dtype, input_precision, interpreter_active, round_to_bf16
from .configs import backward_config, backward_variants, dz_chunk_columns, dz_dtype, forward_config
from .launch_specs import LaunchSpec
from .logit_tile import transformed_logit_tile
from .fast_path import KernelBuffer, aligned, gemm_operands
from .operands import compact_rows

_RESIDUAL_BLOCK_D = 512  # the residual kernel streams single rows of h and W
_GEMM_GROUP = 8  # output-tile rows per L2 group in the gradient GEMMs' launch order
_USE_TMA = False  # experimental: tensor-descriptor operand loads in _dh_kernel (see docs/kernels.md)


@triton.jit
def _dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr, tmax_ptr,
    dz_ptr, flag_ptr, res_ptr,
    M, V, D, v_start, chunk_tiles, stride_hn, stride_wv, stride_dz, tmax_stride,
    scale, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, PRESKIP: tl.constexpr, FWD_BLOCK_V: tl.constexpr,
    LABEL_RESIDUAL: tl.constexpr, BF16_RNE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_V]`` tile of ``dacc`` for chunk columns ``[v_start, ...)``.

    When kept, writes ``dz[n, c] = dacc`` (all BLOCK_V columns, zeros past V). ``flag[pid_n,
    pid_v]``: 0 skipped before the recompute (left as initialised), 1 kept, 2 recomputed and
    dropped by the filter. All per-token vectors are compacted ``[M]``. No atomics.
    """
    # Grouped launch order: GROUP_N token blocks sweep the chunk's vocabulary tiles together,
    # so each W tile is read from HBM once per group and the group's h rows stay in L2.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_N * chunk_tiles
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < M
    n64 = n.to(tl.int64)
    tile_v0 = v_start + pid_v * BLOCK_V
    col = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v = v_start + col
    v_valid = v < V
    row_max = tl.load(max_ptr + n, mask=n_valid, other=0.0)
    log_norm = tl.load(lognorm_ptr + n, mask=n_valid, other=0.0)
    flag_ptr = flag_ptr + pid_n * chunk_tiles + pid_v
    worth_recomputing = True
    if PRESKIP:
        # Skip before the recompute: the forward recorded each token's max logit in each of
        # its (FWD_BLOCK_V-wide, a multiple of BLOCK_V) tiles, so p_v <= exp(tile_max - lse)
        # for every v here. Without an entropy gradient |dacc| = p |g| jac <= p |g| scale/T,
        # so p_bound <= filter_eps means the filter below would drop this tile anyway: the
        # result is identical, the 2 BLOCK_N BLOCK_V D recompute FLOPs are saved.
        tmax = tl.load(tmax_ptr + n64 * tmax_stride + tile_v0 // FWD_BLOCK_V,
                       mask=n_valid, other=float("-inf"))
        p_bound = tl.exp((tmax - row_max) - log_norm)
        # `<=` so that NaN counts as large, as in the filter.
        row_large = tl.where(p_bound <= filter_eps, 0, 1)
        # A label in the tile carries g (1 - p): never provably small.
        y = tl.load(labels_ptr + n, mask=n_valid, other=-1)
        row_large = tl.where((y >= tile_v0) & (y < tile_v0 + BLOCK_V), 1, row_large)
        worth_recomputing = tl.max(row_large) > 0
    if worth_recomputing:
        z, jac = transformed_logit_tile(
            h_ptr, w_ptr, b_ptr, n, n_valid, v, v_valid, D, stride_hn, stride_wv,
            scale, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D,
            DOT_DTYPE, INPUT_PRECISION)
        g = tl.load(g_ptr + n, mask=n_valid, other=0.0)
        z_rel = z - row_max[:, None]
        p = tl.exp(z_rel - log_norm[:, None])
        if WITH_ENTROPY:
            ez_rel = tl.load(ez_ptr + n, mask=n_valid, other=0.0)  # E[z] - m
            ge = tl.load(ge_ptr + n, mask=n_valid, other=0.0)
            dz = -p * (g[:, None] + ge[:, None] * (z_rel - ez_rel[:, None]))
            grad_scale = tl.abs(g) + tl.abs(ge)
        else:
            dz = -p * g[:, None]
            grad_scale = tl.abs(g)
        # The label term in fp32 before rounding dz: g (1 - p) at the label, no cancellation.
        y = tl.load(labels_ptr + n, mask=n_valid, other=-1)
        dz += tl.where(v[None, :] == y[:, None], g[:, None], 0.0)
        dacc = tl.where(n_valid[:, None] & v_valid[None, :], dz * jac, 0.0)
        if FILTER:
            threshold = filter_eps * grad_scale * (scale * inv_temp)
            # `<=` so that NaN counts as large: a NaN gradient is never filtered away.
            large = tl.where(tl.abs(dacc) <= threshold[:, None], 0, 1)
            # The label entry carries the exact one-hot term g (1 - p): whatever filter_eps,
            # a tile holding a label is never dropped (a per-row test: no extra tile registers).
            holds_label = n_valid & (y >= tile_v0) & (y < tile_v0 + BLOCK_V)
            large = tl.maximum(large, tl.where(holds_label, 1, 0)[:, None])
        else:
            large = tl.where(n_valid[:, None], 1, 0)  # pid_n < cdiv(M, BLOCK_N): some row is valid
        keep = tl.max(tl.max(large, 1), 0) > 0
        # Flags start at 0 (= skipped before the recompute): 1 kept, 2 dropped by the filter.
        tl.store(flag_ptr, tl.where(keep, 1, 2).to(tl.int8))
        if keep:
            if BF16_RNE:  # the interpreter's own cast truncates
                rounded = round_to_bf16(dacc).to(dz_ptr.dtype.element_ty)
            else:
                rounded = dacc.to(dz_ptr.dtype.element_ty)
            tl.store(dz_ptr + n64[:, None] * stride_dz + col[None, :], rounded, mask=n_valid[:, None])
            if LABEL_RESIDUAL:
                # What rounding dz to 16 bits lost at the label entry (the one large entry of
                # a row): added back exactly by _label_residual_kernel.
                at_label = v[None, :] == y[:, None]
                res = tl.sum(tl.where(at_label, dacc - rounded.to(tl.float32), 0.0), 1)
                in_tile = (y >= tile_v0) & (y < tile_v0 + BLOCK_V)
                tl.store(res_ptr + n, res, mask=n_valid & in_tile)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile ``(pid_m, pid_n)`` of program ``pid`` in GEMM-swizzled order: GROUP_M rows of
    tiles sweep the columns together, so both operands' K slices are shared through L2."""
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _dw_kernel(
    h_ptr, dz_ptr, list_ptr, count_ptr, dw_ptr, db_ptr,
    M, V, D, v_start, chunk_tiles, stride_hn, stride_dz, stride_list,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DZ_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``dW[v_start + c, d] = sum_t dz[t, c] h_c[t, d]`` (and ``db[v_start + c] = sum_t dz[t, c]``).

    Program = output tile (BLOCK_M vocabulary rows = one dz tile column, BLOCK_N of D). The K
    loop runs over the ``count`` kept token blocks of its column (``list``: their indices),
    each DZ_BLOCK_N tokens in BLOCK_K steps. The tile is written once: chunks are disjoint.
    """
    num_d = 1
    if COMPUTE_DW:
        num_d = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), chunk_tiles, num_d, GROUP_M)
    col = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_valid = d < D
    count = tl.load(count_ptr + pid_m)
    blocks = list_ptr + pid_m * stride_list
    SUB: tl.constexpr = DZ_BLOCK_N // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(0, count * SUB):
        blk = tl.load(blocks + i // SUB)
        t = blk * DZ_BLOCK_N + (i % SUB) * BLOCK_K + tl.arange(0, BLOCK_K)
        t_valid = t < M
        t64 = t.to(tl.int64)
        a = tl.load(dz_ptr + t64[:, None] * stride_dz + col[None, :], mask=t_valid[:, None], other=0.0)
        if COMPUTE_DW:
            b = tl.load(h_ptr + t64[:, None] * stride_hn + d[None, :],
                        mask=t_valid[:, None] & d_valid[None, :], other=0.0)
            acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        if COMPUTE_DB:
            db += tl.sum(a.to(tl.float32), 0)
    v = v_start + col
    v_valid = v < V
    if COMPUTE_DW:
        tl.store(dw_ptr + v.to(tl.int64)[:, None] * D + d[None, :], acc,
                 mask=v_valid[:, None] & d_valid[None, :])
    if COMPUTE_DB:
        if pid_n == 0:
            tl.store(db_ptr + v, db, mask=v_valid)


@triton.jit
def _dh_kernel(
    w_ptr, dz_ptr, list_ptr, count_ptr, dh_ptr,
    M, V, D, v_start, chunk_cols, stride_wv, stride_dz, stride_list,
    DZ_BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """``dH_c[t, d] += sum_c dz[t, c] W[v_start + c, d]`` over this chunk's kept tiles.

    Program = output tile (BLOCK_M tokens = one dz tile row, BLOCK_N of D). The K loop runs
    over the ``count`` kept vocabulary tiles of its row, each DZ_BLOCK_V columns in BLOCK_K
    steps; the fp32 tile is added to dH_c once (skipped when nothing was kept).
    ``USE_TMA``: operand tiles through tensor descriptors (TMA on sm_90; out-of-range rows of
    dz and W read as zeros by the hardware) instead of masked pointer loads (cp.async).
    """
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_valid = n < M
    n64 = n.to(tl.int64)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_valid = d < D
    count = tl.load(count_ptr + pid_m)
    blocks = list_ptr + pid_m * stride_list
    SUB: tl.constexpr = DZ_BLOCK_V // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA:
        dz_desc = tl.make_tensor_descriptor(dz_ptr, shape=[M, chunk_cols], strides=[stride_dz, 1],
                                            block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, D], strides=[stride_wv, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    for i in range(0, count * SUB):
        blk = tl.load(blocks + i // SUB)
        c0 = blk * DZ_BLOCK_V + (i % SUB) * BLOCK_K
        if USE_TMA:
            a = dz_desc.load([pid_m * BLOCK_M, c0])
            b = w_desc.load([v_start + c0, pid_n * BLOCK_N])
        else:
            col = c0 + tl.arange(0, BLOCK_K)
            v = v_start + col
            a = tl.load(dz_ptr + n64[:, None] * stride_dz + col[None, :], mask=n_valid[:, None], other=0.0)
            b = tl.load(w_ptr + v.to(tl.int64)[:, None] * stride_wv + d[None, :],
                        mask=(v < V)[:, None] & d_valid[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if count > 0:
        ptrs = dh_ptr + n64[:, None] * D + d[None, :]
        mask = n_valid[:, None] & d_valid[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _label_residual_kernel(
    h_ptr, w_ptr, order_ptr, end_ptr, labels_ptr, res_ptr, dh_ptr, dw_ptr, db_ptr,
    D, stride_hn, stride_wv,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds back the label entries' 16-bit rounding residual ``r_t`` (``_dz_kernel``), exactly:
    ``dH_t += r_t W[y_t]``, ``dW[y] += sum_{t: y_t = y} r_t h_t``, ``db[y] += sum_t r_t``.

    Program i takes the i-th token in label order (``order``: a stable sort of the labels).
    It owns its token's dH row; the first token of each run of equal labels owns ``dW[y]``
    and sums the run (``end``: one past the run's last position, or i for the others) in a
    fixed order: no atomics, deterministic.
    """
    i = tl.program_id(0)
    t = tl.load(order_ptr + i).to(tl.int64)
    y = tl.load(labels_ptr + t).to(tl.int64)
    r = tl.load(res_ptr + t)
    end = tl.load(end_ptr + i)
    if COMPUTE_DB:
        if end > i:
            total = 0.0
            for j in range(i, end):
                total += tl.load(res_ptr + tl.load(order_ptr + j))
            tl.store(db_ptr + y, tl.load(db_ptr + y) + total)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + y * stride_wv + d, mask=d_valid, other=0.0).to(tl.float32)
            ptrs = dh_ptr + t * D + d
            tl.store(ptrs, tl.load(ptrs, mask=d_valid, other=0.0) + r * w, mask=d_valid)
        if COMPUTE_DW:
            acc = tl.zeros((BLOCK_D,), tl.float32)
            for j in range(i, end):
                tj = tl.load(order_ptr + j).to(tl.int64)
                h = tl.load(h_ptr + tj * stride_hn + d, mask=d_valid, other=0.0).to(tl.float32)
                acc += tl.load(res_ptr + tj) * h
            if end > i:
                ptrs = dw_ptr + y * D + d
                tl.store(ptrs, tl.load(ptrs, mask=d_valid, other=0.0) + acc, mask=d_valid)


def _label_runs(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in stable label order, and for each position the end of its run of equal labels
    if it starts the run (else its own position). Deterministic, no host sync.

    Labels outside ``[0, vocab)`` (a vocabulary shard's tokens whose label another shard holds;
    their residual is 0) sort last and start no run: otherwise they would all share one label
    after clamping and one program would walk that whole run serially to add zeros."""
    inside = (labels >= 0) & (labels < vocab)
    keys = torch.where(inside, labels, torch.full_like(labels, vocab))
    sorted_keys, order = torch.sort(keys, stable=True)
    end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    positions = torch.arange(labels.numel(), device=labels.device)
    return order, torch.where(first & (sorted_keys < vocab), end, positions)


def _block_lists(flags: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From kept flags ``[token blocks, vocab tiles]``: for each index along the other dim, the
    kept indices along ``dim`` first in ascending order (stable sort: a fixed K order, so the
    GEMMs are deterministic), as int32 rows, and how many there are. No host sync."""
    skipped = (flags != 1).to(torch.uint8)
    order = torch.argsort(skipped, dim=dim, stable=True).to(torch.int32)
    counts = (flags == 1).sum(dim, dtype=torch.int32)
    return (order.T if dim == 0 else order).contiguous(), counts


def triton_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    grad_logp: torch.Tensor,
    expected_logit: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    filter_eps: float | None,
    deterministic: bool,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    tile_max: torch.Tensor | None = None,
) -> None:
    """Accumulate the gradients into fp32 buffers.

    Args:
        hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` | None, labels ``[N]``, rows ``[M]``:
            as in the forward.
        row_max, log_norm, grad_logp: fp32 ``[N]`` (m, log s1 of the forward, dL/dlogp), read
            at ``rows``.
        expected_logit, grad_entropy: fp32 ``[N]`` E_p[z] - m and dL/dH, or None without entropy.
        grad_hidden ``[N, D]``, grad_weight ``[V, D]``, grad_bias ``[V]``: zero-initialised
            contiguous fp32 buffers, or None when that gradient is not needed.
        tile_max: the forward's per-tile max logits (``triton_forward(tile_max=...)``, rows in
            compacted order) or None; with a filter and no entropy gradient, tiles it proves
            negligible are skipped before their recompute (the result is the same without it).
        deterministic: accepted for the API; this backward has no atomics and is bit-identical
            run to run whatever it says.
    """
    # The compiled fast path assumes aligned operands with D a multiple of 16 (fast_path):
    # operands are copied or zero-padded (logged at debug level), gradients written through
    # padded buffers, so every launch runs the variant the compile check proved.
    hidden, weight, d_padded = gemm_operands(hidden, weight)
    vectors = [None if t is None else aligned(t, name) for name, t in (
        ("bias", bias), ("labels", labels), ("rows", rows), ("row_max", row_max),
        ("log_norm", log_norm), ("grad_logp", grad_logp), ("expected_logit", expected_logit),
        ("grad_entropy", grad_entropy), ("tile_max", tile_max))]
    grads = (KernelBuffer(grad_hidden, "grad_hidden", d_padded),
             KernelBuffer(grad_weight, "grad_weight", d_padded), KernelBuffer(grad_bias, "grad_bias"))
    bias, labels, rows, row_max, log_norm, grad_logp, expected_logit, grad_entropy, tile_max = vectors
    _launch_backward(
        hidden, weight, bias, labels, rows, row_max, log_norm, grad_logp, expected_logit,
        grad_entropy, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
        filter_eps=filter_eps, grad_hidden=grads[0].tensor, grad_weight=grads[1].tensor,
        grad_bias=grads[2].tensor, tile_max=tile_max)
    for buffer in grads:
        buffer.finish()


def _launch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    grad_logp: torch.Tensor,
    expected_logit: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    filter_eps: float | None,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    tile_max: torch.Tensor | None = None,
) -> None:
    """``triton_backward`` on operands that meet the fast path (see there)."""
    num_rows = rows.numel()
    V, D = weight.shape
    cfg = backward_config(hidden.dtype)
    with_entropy = grad_entropy is not None
    h_c = compact_rows(hidden, rows)
    labels_c, row_max_c, log_norm_c, g_c = (compact_rows(t, rows) for t in (labels, row_max, log_norm, grad_logp))
    ez_c = compact_rows(expected_logit, rows) if with_entropy else row_max_c
    ge_c = compact_rows(grad_entropy, rows) if with_entropy else row_max_c
    if grad_hidden is not None:
        dh_c = grad_hidden if h_c is hidden else torch.zeros((num_rows, D), device=hidden.device,
                                                            dtype=torch.float32)
    fwd_block_v = forward_config(hidden.dtype).block_v
    preskip = (tile_max is not None and filter_eps is not None and not with_entropy
               and fwd_block_v % cfg.dz.block_v == 0)
    count = skip_stats.counting()
    skips = torch.zeros(2, device=hidden.device, dtype=torch.int64) if count else None
    # 16-bit dz: the label entries' rounding residual, added back after the chunks.
    buffer_dtype = dz_dtype(hidden.dtype)
    residual = buffer_dtype != torch.float32
    res = torch.zeros(num_rows if residual else 1, device=hidden.device, dtype=torch.float32)
    dummy = row_max_c
    align = math.lcm(cfg.dz.block_v, fwd_block_v)
    chunk = dz_chunk_columns(num_rows, V, torch.finfo(buffer_dtype).bits // 8, align)
    dz = torch.empty((num_rows, chunk), device=hidden.device, dtype=buffer_dtype)
    use_tma = _USE_TMA
    n_blocks = triton.cdiv(num_rows, cfg.dz.block_n)
    dot = dict(DOT_DTYPE=dot_dtype(hidden.dtype), INPUT_PRECISION=input_precision(hidden.dtype))
    total_tiles = 0
    for v_start in range(0, V, chunk):
        chunk_tiles = triton.cdiv(min(chunk, V - v_start), cfg.dz.block_v)
        flags = torch.zeros((n_blocks, chunk_tiles), device=hidden.device, dtype=torch.int8)
        total_tiles += n_blocks * chunk_tiles
        _dz_kernel[(n_blocks * chunk_tiles,)](
            h_c, weight, bias if bias is not None else dummy, labels_c, row_max_c, log_norm_c,
            ez_c, g_c, ge_c, tile_max if preskip else dummy, dz, flags, res,
            num_rows, V, D, v_start, chunk_tiles, h_c.stride(0), weight.stride(0), dz.stride(0),
            tile_max.stride(0) if preskip else 0,
            float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature), float(filter_eps or 0.0),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy,
            FILTER=filter_eps is not None, PRESKIP=preskip,
            FWD_BLOCK_V=fwd_block_v, LABEL_RESIDUAL=residual,
            BF16_RNE=interpreter_active() and buffer_dtype == torch.bfloat16,
            BLOCK_N=cfg.dz.block_n, BLOCK_V=cfg.dz.block_v, BLOCK_D=cfg.dz.block_d,
            GROUP_N=cfg.dz.group_n, num_warps=cfg.dz.num_warps, num_stages=cfg.dz.num_stages, **dot)
        if count:
            skips += torch.stack([(flags == 0).sum(), (flags == 2).sum()])
        if grad_weight is not None or grad_bias is not None:
            dw_list, dw_count = _block_lists(flags, 0)
            num_d = triton.cdiv(D, cfg.dw.block_n) if grad_weight is not None else 1
            _dw_kernel[(chunk_tiles * num_d,)](
                h_c, dz, dw_list, dw_count,
                grad_weight if grad_weight is not None else dummy,
                grad_bias if grad_bias is not None else dummy,
                num_rows, V, D, v_start, chunk_tiles, h_c.stride(0), dz.stride(0), dw_list.stride(0),
                COMPUTE_DW=grad_weight is not None, COMPUTE_DB=grad_bias is not None,
                DZ_BLOCK_N=cfg.dz.block_n, BLOCK_M=cfg.dw.block_m, BLOCK_N=cfg.dw.block_n,
                BLOCK_K=cfg.dw.block_k, GROUP_M=_GEMM_GROUP,
                num_warps=cfg.dw.num_warps, num_stages=cfg.dw.num_stages, **dot)
        if grad_hidden is not None:
            dh_list, dh_count = _block_lists(flags, 1)
            _dh_kernel[(n_blocks * triton.cdiv(D, cfg.dh.block_n),)](
                weight, dz, dh_list, dh_count, dh_c,
                num_rows, V, D, v_start, chunk, weight.stride(0), dz.stride(0), dh_list.stride(0),
                DZ_BLOCK_V=cfg.dz.block_v, BLOCK_M=cfg.dh.block_m, BLOCK_N=cfg.dh.block_n,
                BLOCK_K=cfg.dh.block_k, GROUP_M=_GEMM_GROUP, USE_TMA=use_tma,
                num_warps=cfg.dh.num_warps, num_stages=cfg.dh.num_stages, **dot)
    if count:
        before, after = skips.tolist()
        skip_stats.record(total_tiles, before, after)
    if residual:
        # A label outside [0, V) (a vocabulary shard's token whose label another shard holds)
        # has no label entry here, so its residual is 0 (never written): clamped into range,
        # the kernel adds exactly 0 to a real row instead of touching memory past W and dW.
        res_labels = labels_c.clamp(0, V - 1)
        order, end = _label_runs(labels_c, V)
        _label_residual_kernel[(num_rows,)](
            h_c, weight, order, end, res_labels, res,
            dh_c if grad_hidden is not None else dummy,
            grad_weight if grad_weight is not None else dummy,
            grad_bias if grad_bias is not None else dummy,
            D, h_c.stride(0), weight.stride(0),
            COMPUTE_DH=grad_hidden is not None, COMPUTE_DW=grad_weight is not None,
            COMPUTE_DB=grad_bias is not None, BLOCK_D=_RESIDUAL_BLOCK_D, num_warps=4)
    if grad_hidden is not None and dh_c is not grad_hidden:
        grad_hidden.index_copy_(0, rows, dh_c)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_DZ_TYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def launch_specs(exhaustive: bool = False) -> list[LaunchSpec]:
    """Every backward variant the launcher can pick on a GPU.

    dz kernel: per (config, dtype, precision), by default its flags at the corners (all on: the
    most live registers; all off) and the two common policy backwards (filtered with pre-skip,
    and softcap with an entropy gradient); ``exhaustive``: all 20 flag combinations the
    launcher can form (the pre-skip needs the filter and no entropy gradient). Gradient GEMMs:
    dW with/without dbias, dbias only, dH. Label residual kernel.
    """
    specs = []
    for cfg, dtype, precision in backward_variants():
        suffix = "." + (precision if dtype == torch.float32 else "mma")
        dot = dict(DOT_DTYPE=_TL[dtype], INPUT_PRECISION=precision)
        mma = dtype != torch.float32 or precision == "tf32"
        types = {"dz_ptr": _DZ_TYPE[dtype], "flag_ptr": "*i8"}
        names = ("HAS_BIAS", "HAS_SOFTCAP", "WITH_ENTROPY", "FILTER", "PRESKIP")
        residual = dtype != torch.float32
        # The launcher pre-skips only without an entropy gradient: "all" is every other flag.
        flag_sets = {"all": (1, 1, 1, 1, 0), "none": (0, 0, 0, 0, 0),
                     "preskip": (1, 1, 0, 1, 1)}
        if exhaustive:
            flag_sets = {"".join("BCEFP"[i] if f else "-" for i, f in enumerate(flags)): flags
                         for flags in itertools.product((0, 1), repeat=5)
                         if not flags[4] or (flags[3] and not flags[2])}
        for label, flags in flag_sets.items():
            specs.append(LaunchSpec(
                kernel=_dz_kernel, config=f"{cfg.dz.label}{suffix}.{label}", dtype=dtype,
                constexprs=dict(zip(names, map(bool, flags)), FWD_BLOCK_V=forward_config_block_v(dtype),
                                LABEL_RESIDUAL=residual, BF16_RNE=False,
                                BLOCK_N=cfg.dz.block_n, BLOCK_V=cfg.dz.block_v, BLOCK_D=cfg.dz.block_d,
                                GROUP_N=cfg.dz.group_n, **dot),
                num_warps=cfg.dz.num_warps, num_stages=cfg.dz.num_stages,
                # without a pre-skip the launcher passes tile-max stride 0 (divisible)
                divisible=("D", "stride_hn", "stride_wv", "stride_dz", "v_start")
                + (() if flags[4] else ("tmax_stride",)),
                # without a bias the launcher passes an fp32 placeholder
                types=types if flags[0] else {**types, "b_ptr": "*fp32"},
                expects_dot=mma, expects_pipelined=True))
        for label, dw, db in (("dw_db", True, True), ("dw", True, False), ("db", False, True)):
            specs.append(LaunchSpec(
                kernel=_dw_kernel, config=f"{cfg.dw.label}{suffix}.{label}", dtype=dtype,
                constexprs=dict(COMPUTE_DW=dw, COMPUTE_DB=db, DZ_BLOCK_N=cfg.dz.block_n,
                                BLOCK_M=cfg.dw.block_m, BLOCK_N=cfg.dw.block_n, BLOCK_K=cfg.dw.block_k,
                                GROUP_M=_GEMM_GROUP, **dot),
                num_warps=cfg.dw.num_warps, num_stages=cfg.dw.num_stages,
                divisible=("D", "stride_hn", "stride_dz", "v_start"),
                types={"dz_ptr": _DZ_TYPE[dtype], "list_ptr": "*i32", "count_ptr": "*i32"},
                expects_dot=mma and dw, expects_pipelined=dw))
        specs.append(LaunchSpec(
            kernel=_dh_kernel, config=f"{cfg.dh.label}{suffix}", dtype=dtype,
            constexprs=dict(DZ_BLOCK_V=cfg.dz.block_v, BLOCK_M=cfg.dh.block_m, BLOCK_N=cfg.dh.block_n,
                            BLOCK_K=cfg.dh.block_k, GROUP_M=_GEMM_GROUP, USE_TMA=False, **dot),
            num_warps=cfg.dh.num_warps, num_stages=cfg.dh.num_stages,
            divisible=("D", "stride_wv", "stride_dz", "v_start", "chunk_cols"),
            types={"w_ptr": "*" + _DZ_TYPE[dtype][1:], "dz_ptr": _DZ_TYPE[dtype], "list_ptr": "*i32",
                   "count_ptr": "*i32"},
            expects_dot=mma, expects_pipelined=True))
    for dtype in (torch.bfloat16, torch.float16):
        for db in (True, False):
            specs.append(LaunchSpec(
                kernel=_label_residual_kernel, config=f"d{_RESIDUAL_BLOCK_D}", dtype=dtype,
                constexprs=dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=db,
                                BLOCK_D=_RESIDUAL_BLOCK_D),
                num_warps=4, num_stages=3, divisible=("D", "stride_hn", "stride_wv"),
                variant="db" if db else "nodb",
                types={"order_ptr": "*i64", "end_ptr": "*i64",
                       **({} if db else {"db_ptr": "*fp32"})}))
    return specs


def forward_config_block_v(dtype: torch.dtype) -> int:
    """The GPU forward's vocabulary tile (the pre-skip's tile-max granularity)."""
    from .configs import forward_variants

    return next(cfg.block_v for cfg, d, _, _ in forward_variants() if d == dtype)
