"""Backward of the fused linear log-probs: recompute each logit tile, never store one.

Gradient of the per-token outputs with respect to the transformed logits z (p = softmax(z),
g = dL/dlogp_t, e = dL/dH_t, E[z] = lse - H). Everything is taken relative to the row max m
saved by the forward (see there): p = exp((z - m) - log s1), z - E[z] = (z - m) - (log s1 - H).

    d logp / dz_v = [v = y] - p_v
    d H    / dz_v = p_v (E[z] - z_v)          (H = lse - sum_v p_v z_v)
    =>  dz_v = g [v = y] - p_v (g + e (z_v - E[z]))

then through the transform, ``dacc_v = dz_v * jac_v`` (see ``common.transform_logits``), and
``dH = dacc @ W``, ``dW = dacc.T @ h``, ``dbias = sum_t dacc``, accumulated in fp32.

Two schedules:
- atomic (default): one program per (token block, vocab block) tile, fp32 atomic adds into dH
  and dW. The label term ``g [v = y]`` is left out of the tiles and added by a per-token kernel
  as a sparse update (``dH_t += g_t jac_ty W[y_t]``, ``dW[y_t] += g_t jac_ty h_t``), so a tile only
  carries ``-p (...)`` and is skipped (no gradient GEMMs, no atomics) when every entry is below
  ``filter_eps`` times the token's gradient scale ``(|g| + |e|) * scale / T``.
  Atomic fp32 adds make the result order-dependent in its last bits. Every atomic is
  ``sem="relaxed"`` (a fire-and-forget ``REDG``): the default ``acq_rel`` fences each one
  with ``MEMBAR.ALL.GPU``, and nothing reads the sums before the kernel ends.
- deterministic: a dH kernel (one program per token block, looping over the vocabulary) and a
  dW kernel (one program per vocab block, looping over tokens); each owns its output rows, so
  no atomics, bit-identical results run to run. The logits are recomputed twice (8NDV FLOPs
  instead of 6NDV) and the label term stays inside the tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import skip_stats
from .common import accurate_tanh, dot_dtype, input_precision
from .configs import TileConfig, backward_config, config_choices, forward_config
from .fast_path import FAST_PATH_DIVISIBLE, KernelBuffer, aligned, gemm_operands
from .launch_specs import LaunchSpec
from .logit_tile import transformed_logit_tile

_LABEL_BLOCK_D = 256  # the label kernel streams one hidden row and one weight row


@triton.jit
def _logit_grad_tile(
    h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr,
    rows, n_valid, v, v_valid, D, stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    LABEL_IN_TILE: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Returns ``(dacc, keep)``: the fp32 gradient of the raw logit tile (zero outside the
    valid rows/columns) and whether any entry is large enough to be worth the GEMMs."""
    z, jac = transformed_logit_tile(
        h_ptr, w_ptr, b_ptr, rows, n_valid, v, v_valid, D,
        stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap, inv_temp,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
    row_max = tl.load(max_ptr + rows, mask=n_valid, other=0.0)
    log_norm = tl.load(lognorm_ptr + rows, mask=n_valid, other=0.0)
    g = tl.load(g_ptr + rows, mask=n_valid, other=0.0)
    z_rel = z - row_max[:, None]
    p = tl.exp(z_rel - log_norm[:, None])
    if WITH_ENTROPY:
        ez_rel = tl.load(ez_ptr + rows, mask=n_valid, other=0.0)  # E[z] - m
        ge = tl.load(ge_ptr + rows, mask=n_valid, other=0.0)
        dz = -p * (g[:, None] + ge[:, None] * (z_rel - ez_rel[:, None]))
        grad_scale = tl.abs(g) + tl.abs(ge)
    else:
        dz = -p * g[:, None]
        grad_scale = tl.abs(g)
    if LABEL_IN_TILE:
        y = tl.load(labels_ptr + rows, mask=n_valid, other=-1).to(tl.int64)
        is_label = v.to(tl.int64)[None, :] == y[:, None]
        dz += tl.where(is_label, g[:, None], 0.0)
    dacc = tl.where(n_valid[:, None] & v_valid[None, :], dz * jac, 0.0)
    keep = True
    if FILTER:
        threshold = filter_eps * grad_scale * (scale * inv_temp)
        # `<=` so that NaN counts as large: a NaN gradient is never filtered away.
        small = tl.abs(dacc) <= threshold[:, None]
        if LABEL_IN_TILE:
            # The label's one-hot term is exact: a tile holding a label is never skipped, only
            # the softmax part may be (as in the atomic mode, where it is outside the tiles).
            small = small & (is_label == 0)
        keep = tl.max(tl.where(small, 0, 1)) > 0
    return dacc, keep


@triton.jit
def _backward_atomic_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr,
    dh_ptr, dw_ptr, db_ptr, tmax_ptr, skips_ptr,
    M, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap, inv_temp, filter_eps, tmax_stride,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, PRESKIP: tl.constexpr, FWD_BLOCK_V: tl.constexpr,
    COUNT_SKIPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Grouped launch order: GROUP_N token blocks sweep the vocabulary together, so each W tile
    # is read from HBM once per group and the group's hidden rows stay in L2.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(M, BLOCK_N)
    num_v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < M
    rows = tl.load(rows_ptr + n, mask=n_valid, other=0).to(tl.int64)
    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_valid = v < V
    worth_recomputing = True
    if PRESKIP:
        # Skip before the recompute: the forward recorded each token's max logit in each of
        # its (FWD_BLOCK_V-wide, a multiple of BLOCK_V) tiles, so p_v <= exp(tile_max - lse)
        # for every v here. Without an entropy gradient |dacc| = p |g| jac <= p |g| scale/T,
        # so p_bound <= filter_eps means the filter below would drop this tile anyway: the
        # result is identical, the 2 N D V recompute FLOPs of the tile are saved.
        tmax = tl.load(tmax_ptr + rows * tmax_stride + (pid_v * BLOCK_V) // FWD_BLOCK_V,
                       mask=n_valid, other=float("-inf"))
        row_max = tl.load(max_ptr + rows, mask=n_valid, other=0.0)
        log_norm = tl.load(lognorm_ptr + rows, mask=n_valid, other=0.0)
        p_bound = tl.exp((tmax - row_max) - log_norm)
        # `<=` so that NaN counts as large, as in the filter.
        worth_recomputing = tl.max(tl.where(p_bound <= filter_eps, 0, 1)) > 0
        if COUNT_SKIPS:
            if not worth_recomputing:
                tl.atomic_add(skips_ptr, 1, sem="relaxed")
    if worth_recomputing:
        dacc, keep = _logit_grad_tile(
            h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr,
            rows, n_valid, v, v_valid, D, stride_hn, stride_hd, stride_wv, stride_wd,
            scale, softcap, inv_temp, filter_eps,
            HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, False, FILTER,
            BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        if COUNT_SKIPS:
            if not keep:
                tl.atomic_add(skips_ptr + 1, 1, sem="relaxed")
        if keep:
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + v, tl.sum(dacc, 0), mask=v_valid, sem="relaxed")
            dacc_op = dacc.to(DOT_DTYPE)
            v64 = v.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_valid = d < D
                if COMPUTE_DH:
                    w = tl.load(w_ptr + v64[:, None] * stride_wv + d[None, :] * stride_wd,
                                mask=v_valid[:, None] & d_valid[None, :], other=0.0)
                    dh = tl.dot(dacc_op, w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
                    tl.atomic_add(dh_ptr + rows[:, None] * D + d[None, :], dh,
                                  mask=n_valid[:, None] & d_valid[None, :], sem="relaxed")
                if COMPUTE_DW:
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + d[None, :] * stride_hd,
                                mask=n_valid[:, None] & d_valid[None, :], other=0.0)
                    dw = tl.dot(tl.trans(dacc_op), h.to(DOT_DTYPE),
                                input_precision=INPUT_PRECISION)
                    tl.atomic_add(dw_ptr + v64[:, None] * D + d[None, :], dw,
                                  mask=v_valid[:, None] & d_valid[None, :], sem="relaxed")


@triton.jit
def _backward_dh_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr, dh_ptr,
    M, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Deterministic dH: this program owns its token rows and sweeps the whole vocabulary."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < M
    rows = tl.load(rows_ptr + n, mask=n_valid, other=0).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_valid = v < V
        dacc, keep = _logit_grad_tile(
            h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr,
            rows, n_valid, v, v_valid, D, stride_hn, stride_hd, stride_wv, stride_wd,
            scale, softcap, inv_temp, filter_eps,
            HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, True, FILTER,
            BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        if keep:
            dacc_op = dacc.to(DOT_DTYPE)
            v64 = v.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_valid = d < D
                w = tl.load(w_ptr + v64[:, None] * stride_wv + d[None, :] * stride_wd,
                            mask=v_valid[:, None] & d_valid[None, :], other=0.0)
                ptrs = dh_ptr + rows[:, None] * D + d[None, :]
                mask = n_valid[:, None] & d_valid[None, :]
                cur = tl.load(ptrs, mask=mask, other=0.0)
                tl.store(ptrs, cur + tl.dot(dacc_op, w.to(DOT_DTYPE), input_precision=INPUT_PRECISION),
                         mask=mask)


@triton.jit
def _backward_dw_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr, dw_ptr, db_ptr,
    M, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    scale, softcap, inv_temp, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Deterministic dW and dbias: this program owns its vocab rows and sweeps all tokens."""
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_valid = v < V
    v64 = v.to(tl.int64)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, M, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_valid = n < M
        rows = tl.load(rows_ptr + n, mask=n_valid, other=0).to(tl.int64)
        dacc, keep = _logit_grad_tile(
            h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, lognorm_ptr, ez_ptr, g_ptr, ge_ptr,
            rows, n_valid, v, v_valid, D, stride_hn, stride_hd, stride_wv, stride_wd,
            scale, softcap, inv_temp, filter_eps,
            HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, True, FILTER,
            BLOCK_N, BLOCK_V, BLOCK_D, DOT_DTYPE, INPUT_PRECISION)
        if keep:
            if COMPUTE_DB:
                db += tl.sum(dacc, 0)
            if COMPUTE_DW:
                dacc_op = tl.trans(dacc.to(DOT_DTYPE))
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_valid = d < D
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + d[None, :] * stride_hd,
                                mask=n_valid[:, None] & d_valid[None, :], other=0.0)
                    ptrs = dw_ptr + v64[:, None] * D + d[None, :]
                    mask = v_valid[:, None] & d_valid[None, :]
                    cur = tl.load(ptrs, mask=mask, other=0.0)
                    tl.store(ptrs, cur + tl.dot(dacc_op, h.to(DOT_DTYPE), input_precision=INPUT_PRECISION),
                             mask=mask)
    if COMPUTE_DB:
        tl.store(db_ptr + v, db, mask=v_valid)


@triton.jit
def _label_term_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    D, stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The sparse label term the atomic kernel leaves out, one program per kept token t:
    ``c = g_t * jac(z_{t,y})``, ``dH_t += c W[y]``, ``dW[y] += c h_t``, ``db[y] += c``.

    Runs after the tile kernel on the same stream, so its plain read-modify-write of the
    token's own dH row cannot race; dW rows are shared by tokens with the same label (atomic).
    """
    t = tl.program_id(0)
    row = tl.load(rows_ptr + t).to(tl.int64)
    y = tl.load(labels_ptr + row).to(tl.int64)
    coef = tl.load(g_ptr + row) * (scale * inv_temp)
    if HAS_SOFTCAP:
        raw = 0.0
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + row * stride_hn + d * stride_hd, mask=d < D, other=0.0)
            w = tl.load(w_ptr + y * stride_wv + d * stride_wd, mask=d < D, other=0.0)
            raw += tl.sum(h.to(tl.float32) * w.to(tl.float32), 0)
        if HAS_BIAS:
            raw += tl.load(b_ptr + y).to(tl.float32)
        th = accurate_tanh(raw * scale / softcap)
        coef = coef * (1.0 - th * th)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + y, coef, sem="relaxed")
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + y * stride_wv + d * stride_wd, mask=d_valid, other=0.0)
            ptrs = dh_ptr + row * D + d
            tl.store(ptrs, tl.load(ptrs, mask=d_valid, other=0.0) + coef * w.to(tl.float32),
                     mask=d_valid)
        if COMPUTE_DW:
            h = tl.load(h_ptr + row * stride_hn + d * stride_hd, mask=d_valid, other=0.0)
            tl.atomic_add(dw_ptr + y * D + d, coef * h.to(tl.float32), mask=d_valid, sem="relaxed")


_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def launch_specs() -> list[LaunchSpec]:
    """Every variant ``triton_backward`` can launch on a GPU (see ``compile_check``).

    Per table row (``configs``: kernel, dtype, architecture), each kernel with every optional
    feature on (``all``: entropy gradient, filter, bias, softcap, dbias), off (``none``: exact,
    no bias) and, for the atomic kernel, the pre-skip path (``preskip``: filtered, no entropy
    gradient). fp16 builds only ``all`` (it differs from bf16 in the MMA type alone); fp32
    adds ``all`` with TF32 dots. Without a bias the launcher passes an fp32 placeholder for
    it; an unused tile-max buffer comes with stride 0 (divisible by 16, so marked).
    """
    rows: dict[tuple, list[int]] = {}
    for c in config_choices():
        if c.family == "backward":
            rows.setdefault((c.role, c.config, c.dtype, c.precision), []).append(c.arch)
    kernels = {"atomic": _backward_atomic_kernel, "dh": _backward_dh_kernel,
               "dw": _backward_dw_kernel}
    specs = []
    for (role, cfg, dtype, precision), archs in rows.items():
        variants = ["all", "none"] if dtype != torch.float16 else ["all"]
        if role == "atomic" and dtype != torch.float16:
            variants.append("preskip")
        if precision == "tf32":
            variants = ["all-tf32"]
        for variant in variants:
            on = variant.startswith("all")
            constexprs = dict(
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                DOT_DTYPE=_DOT_DTYPES[dtype],
                INPUT_PRECISION="tf32" if variant.endswith("tf32") else "ieee",
                stride_hd=1, stride_wd=1, HAS_BIAS=variant != "none",
                HAS_SOFTCAP=variant != "none", WITH_ENTROPY=on, FILTER=variant != "none")
            divisible = FAST_PATH_DIVISIBLE
            if role == "atomic":
                preskip = variant == "preskip"
                constexprs.update(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=variant != "none",
                                  PRESKIP=preskip, FWD_BLOCK_V=forward_config(dtype).block_v,
                                  COUNT_SKIPS=False, GROUP_N=cfg.group_n)
                divisible += () if preskip else ("tmax_stride",)
            elif role == "dw":
                constexprs.update(COMPUTE_DW=True, COMPUTE_DB=variant != "none")
            specs.append(LaunchSpec(
                kernel=kernels[role], config=cfg.label, dtype=dtype, variant=variant,
                constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                types={} if variant != "none" else {"b_ptr": "*fp32"}, divisible=divisible,
                expects_dot=True, expects_pipelined=True, archs=tuple(sorted(archs))))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for variant in ("all", "none"):
            on = variant == "all"
            specs.append(LaunchSpec(
                kernel=_label_term_kernel, config=f"{_LABEL_BLOCK_D}w4s3", dtype=dtype,
                variant=variant, num_warps=4, num_stages=3,
                constexprs=dict(HAS_BIAS=on, HAS_SOFTCAP=on, COMPUTE_DH=True, COMPUTE_DW=True,
                                COMPUTE_DB=on, BLOCK_D=_LABEL_BLOCK_D, stride_hd=1, stride_wd=1),
                types={} if on else {"b_ptr": "*fp32"}, divisible=FAST_PATH_DIVISIBLE))
    return specs


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
    """Accumulate the tile (non-label) part of the gradients into fp32 buffers.

    Args:
        hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` | None, labels ``[N]``, rows ``[M]``:
            as in the forward (any strides, alignment and D: see ``fast_path``).
        row_max, log_norm, grad_logp: fp32 ``[N]`` (m, log s1 of the forward, dL/dlogp), read
            at ``rows``.
        expected_logit, grad_entropy: fp32 ``[N]`` E_p[z] - m and dL/dH, or None without entropy.
        grad_hidden ``[N, D]``, grad_weight ``[V, D]``, grad_bias ``[V]``: zero-initialised
            contiguous fp32 buffers, or None when that gradient is not needed.
        tile_max: the forward's per-tile max logits (``triton_forward(tile_max=...)``) or None;
            used to skip tiles before their recompute in the filtered atomic mode without an
            entropy gradient (the result is the same as without it).

    Atomic mode applies the label term with a sparse per-token kernel after the tiles;
    deterministic mode keeps it inside the tiles.
    """
    # The compiled fast path assumes aligned operands with D a multiple of 16 (fast_path):
    # operands are copied or zero-padded, and gradients written through padded buffers.
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
        filter_eps=filter_eps, deterministic=deterministic, grad_hidden=grads[0].tensor,
        grad_weight=grads[1].tensor, grad_bias=grads[2].tensor, tile_max=tile_max)
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
    deterministic: bool,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    tile_max: torch.Tensor | None = None,
) -> None:
    """``triton_backward`` on inputs that already meet the fast path's assumptions."""
    num_rows = rows.numel()
    V, D = weight.shape
    with_entropy = grad_entropy is not None
    dummy = row_max
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy,
        FILTER=filter_eps is not None,
        DOT_DTYPE=dot_dtype(hidden.dtype), INPUT_PRECISION=input_precision(hidden.dtype),
    )

    def tiles(kernel: str) -> tuple[dict, TileConfig]:
        cfg = backward_config(hidden.dtype, kernel=kernel, device=hidden.device)
        return dict(flags, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages), cfg

    inputs = (
        hidden, weight, bias if bias is not None else dummy, rows, labels, row_max, log_norm,
        expected_logit if with_entropy else dummy, grad_logp,
        grad_entropy if with_entropy else dummy,
    )
    sizes = (num_rows, V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
             float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
             float(filter_eps or 0.0))
    if not deterministic:
        common, cfg = tiles("atomic")
        n_blocks, v_blocks = triton.cdiv(num_rows, cfg.block_n), triton.cdiv(V, cfg.block_v)
        fwd_block_v = forward_config(hidden.dtype).block_v
        preskip = (tile_max is not None and filter_eps is not None and not with_entropy
                   and fwd_block_v % cfg.block_v == 0)
        count = skip_stats.counting()
        skips = torch.zeros(2, device=hidden.device, dtype=torch.int32) if count else dummy
        _backward_atomic_kernel[(n_blocks * v_blocks,)](
            *inputs,
            grad_hidden if grad_hidden is not None else dummy,
            grad_weight if grad_weight is not None else dummy,
            grad_bias if grad_bias is not None else dummy,
            tile_max if preskip else dummy, skips,
            *sizes, tile_max.stride(0) if preskip else 0,
            COMPUTE_DH=grad_hidden is not None, COMPUTE_DW=grad_weight is not None,
            COMPUTE_DB=grad_bias is not None, PRESKIP=preskip, FWD_BLOCK_V=fwd_block_v,
            COUNT_SKIPS=count, GROUP_N=cfg.group_n, **common,
        )
        if count:
            before, after = skips.tolist()
            skip_stats.record(n_blocks * v_blocks, before, after)
        _label_term_kernel[(num_rows,)](
            hidden, weight, bias if bias is not None else dummy, rows, labels, grad_logp,
            grad_hidden if grad_hidden is not None else dummy,
            grad_weight if grad_weight is not None else dummy,
            grad_bias if grad_bias is not None else dummy,
            D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_DH=grad_hidden is not None, COMPUTE_DW=grad_weight is not None,
            COMPUTE_DB=grad_bias is not None, BLOCK_D=_LABEL_BLOCK_D, num_warps=4,
        )
        return
    if grad_hidden is not None:
        common, cfg = tiles("dh")
        _backward_dh_kernel[(triton.cdiv(num_rows, cfg.block_n),)](*inputs, grad_hidden, *sizes,
                                                                    **common)
    if grad_weight is not None or grad_bias is not None:
        common, cfg = tiles("dw")
        _backward_dw_kernel[(triton.cdiv(V, cfg.block_v),)](
            *inputs,
            grad_weight if grad_weight is not None else dummy,
            grad_bias if grad_bias is not None else dummy,
            *sizes,
            COMPUTE_DW=grad_weight is not None, COMPUTE_DB=grad_bias is not None, **common,
        )
