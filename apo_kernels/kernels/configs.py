"""Tile configurations the launchers pick from, by device, dtype and shape.

Every configuration a GPU launcher can return is enumerated by ``forward_variants`` /
``backward_variants``; the kernel modules turn them into ``launch_specs()`` for the compile
check. The GPU entries are first choices read off the SASS, not yet tuned on a device (tuned
entries will name the device). Evidence (triton 3.9, compiled as the runtime launcher does:
pointers and ``D``/row strides marked ``tt.divisibility=16``; registers per thread / spill
bytes, sm_90 then sm_80, over the flag sets of ``launch_specs``; full table in
docs/kernels.md, reproduce with ``benchmarks/kernel_sass.py``):

- forward 16-bit 128x128x64, 8 warps, 3 stages: sm_90 194-255 / 0, ``HGMMA.64x128x16`` (4 per
  K step), 24 LDGSTS; sm_80 242-255 / 0, ``HMMA.16816``. With the entropy or ``return_stats``
  128-row tiles spill for some flag combinations (8-88 B; entropy alone spilled, entropy with
  every other flag did not: ptxas is not monotone, so every combination is compiled once with
  ``launch_specs(exhaustive=True)``), so those use 64x128x64: 186-190 / 0, ``HGMMA.64x64x16``.
  (128x128x32 with 4 stages spilled 88 B with entropy + tile max.)
- forward TF32 128x128x32 (entropy/stats 64x128x32): sm_90 196-255 / 0, ``HGMMA.64x128x8``.
- forward exact fp32 (FMA dots, torch's default without TF32) 64x128x16: 186-255 / 0 on both;
  32-row tiles were capped at 128 registers by ptxas and spilled 8-24 B.
- backward dz tile (recompute + logit gradient), 16-bit 64x128x64, 8 warps, 3 stages: 91-159
  registers, no spills on either arch in all 20 flag combinations, ``HGMMA.64x64x16``, 18
  LDGSTS (128-row tiles spilled 32-72 B on sm_80 with softcap + entropy). Its vocabulary tile
  is the forward's (the pre-skip's tile max lines up). TF32 64x128x16, exact fp32 64x128x16.
- backward gradient GEMMs, plain matmuls, 3 stages: dW = dz^T h 128x128x64, 8 warps: 97-166 /
  0, ``HGMMA.64x128x16`` (A transposed from shared memory), 19 LDGSTS; dH = dz W 64x128x64,
  4 warps (rows = the dz tile's): 186-192 / 0, ``HGMMA.64x128x16``, 27 LDGSTS.
  128x256 would give ``HGMMA.64x256x16`` for dW on sm_90 (166-194 / 0) but spills on sm_80
  (40 B with dbias) and for dH on both (192-288 B: the fp32 read-modify-write epilogue).

The dz buffer of the backward holds ``[M, chunk]`` gradient tiles; ``dz_chunk_columns`` picks
the chunk under a memory budget (``DZ_BUFFER_BYTES``, 512 MiB on a GPU). Under the interpreter
tiles are small (numpy cost grows with the tile) but still >= 16 (tl.dot's minimum), the
vocabulary is split eagerly and the dz chunk is two tiles wide, so tests exercise the
split-merge path, several vocabulary chunks and the sub-tile K steps of the gradient GEMMs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import interpreter_active


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one logit-tile kernel launch."""

    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden size step of the K loop
    num_warps: int
    num_stages: int
    group_n: int = 8  # token blocks per L2 group in the dz kernel's launch order

    @property
    def label(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_d}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class GemmConfig:
    """A plain ``[BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]`` matmul tiling."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class BackwardConfig:
    """The three backward launches' tilings.

    dz: the logit-gradient tile (``block_n`` tokens x ``block_v`` vocabulary entries); its
        kept flags are the block-sparsity unit of the two GEMMs.
    dw: ``dW[v-tile, d-tile] = sum_t dz[t, v-tile]^T h[t, d-tile]``: ``block_m`` (vocabulary)
        must equal ``dz.block_v`` and ``block_k`` (tokens) divide ``dz.block_n``.
    dh: ``dH[t-tile, d-tile] += sum_v dz[t-tile, v] W[v, d-tile]``: ``block_m`` (tokens) must
        equal ``dz.block_n`` and ``block_k`` (vocabulary) divide ``dz.block_v``.
    """

    dz: TileConfig
    dw: GemmConfig
    dh: GemmConfig

    def __post_init__(self) -> None:
        assert self.dw.block_m == self.dz.block_v and self.dz.block_n % self.dw.block_k == 0
        assert self.dh.block_m == self.dz.block_n and self.dz.block_v % self.dh.block_k == 0

    @property
    def label(self) -> str:
        return f"dz{self.dz.label}.dw{self.dw.label}.dh{self.dh.label}"


_INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1, group_n=2)
_INTERPRETER_BWD = BackwardConfig(
    dz=_INTERPRETER,
    dw=GemmConfig(block_m=64, block_n=32, block_k=16, num_warps=4, num_stages=1),
    dh=GemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1),  # 2 K steps per tile
)
# Keyed by the dot's operand kind: "16" (fp16/bf16), "tf32", "ieee" (fp32 FMA dots, exact).
_FWD = {
    "16": TileConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    "tf32": TileConfig(block_n=128, block_v=128, block_d=32, num_warps=8, num_stages=3),
    "ieee": TileConfig(block_n=64, block_v=128, block_d=16, num_warps=8, num_stages=3),
}
# With the entropy or the extra statistics (return_stats) more tile-sized temporaries are live:
# 128-row tiles sit at 255 registers and spill 8-88 B for some flag combinations (ptxas is not
# monotone in the flags: entropy alone spills, entropy with everything else does not), 64-row
# tiles stay near 190 registers.
_FWD_HEAVY = {
    "16": TileConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    "tf32": TileConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3),
    "ieee": _FWD["ieee"],
}
_BWD = {
    # 16-bit: the 128-row dz tile spills 32-72 B on sm_80 with softcap + entropy (a 128x128 fp32
    # tile is 16K registers; z, jac, p and dz make four); 64 rows are clean for all 20 flag
    # combinations on both. dH then has 64-row tiles: one warpgroup, HGMMA.64x128x16.
    "16": BackwardConfig(
        dz=TileConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
        dw=GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
        dh=GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)),
    # fp32 operands: the 128-row dz tile spills 16 B with bias + softcap + entropy on sm_90,
    # 64x128x32 8 B on sm_80 (ptxas capped it at 128 registers); 64x128x16 is clean for all 20
    # flag combinations on both. (The K step does not change the order of accumulation.)
    "tf32": BackwardConfig(
        dz=TileConfig(block_n=64, block_v=128, block_d=16, num_warps=8, num_stages=3),
        dw=GemmConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3),
        dh=GemmConfig(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3)),
    "ieee": BackwardConfig(
        dz=_FWD["ieee"],
        dw=GemmConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3),
        dh=GemmConfig(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3)),
}

# Programs to aim for in the forward: enough waves to fill every SM when N is small.
_INTERPRETER_TARGET_PROGRAMS = 8
_PROGRAMS_PER_SM = 2
# Share of L2 the token blocks being read at one time may take (the rest is for W tiles).
_L2_SHARE_FOR_H = 0.5
# Memory the backward's dz chunk buffer may use on a GPU.
DZ_BUFFER_BYTES = 512 * 2**20
# Tests set this to run the interpreter with the GPU's 16-bit dz buffer (see ``dz_dtype``).
DZ_16BIT_IN_INTERPRETER = False


def _kind(dtype: torch.dtype, precision: str | None) -> str:
    if dtype != torch.float32:
        return "16"
    if precision is None:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return precision


def forward_config(dtype: torch.dtype, heavy: bool = False, precision: str | None = None) -> TileConfig:
    """The forward's tiles; ``heavy``: with the entropy or the extra statistics.
    ``precision``: the fp32 dot precision (default: torch's TF32 flag)."""
    if interpreter_active():
        return _INTERPRETER
    return (_FWD_HEAVY if heavy else _FWD)[_kind(dtype, precision)]


def backward_config(dtype: torch.dtype, precision: str | None = None) -> BackwardConfig:
    if interpreter_active():
        return _INTERPRETER_BWD
    return _BWD[_kind(dtype, precision)]


_PRECISIONS = {torch.float32: ("ieee", "tf32"), torch.float16: ("ieee",), torch.bfloat16: ("ieee",)}


def forward_variants() -> list[tuple[TileConfig, torch.dtype, str, bool]]:
    """Every (config, dtype, dot precision, heavy) the GPU forward launcher can pick."""
    return [((_FWD_HEAVY if heavy else _FWD)[_kind(d, p)], d, p, heavy)
            for d, precisions in _PRECISIONS.items() for p in precisions for heavy in (False, True)]


def backward_variants() -> list[tuple[BackwardConfig, torch.dtype, str]]:
    """Every (config, dtype, dot precision) the GPU backward launcher can pick."""
    return [(_BWD[_kind(d, p)], d, p) for d, precisions in _PRECISIONS.items() for p in precisions]


def vocab_splits(num_token_blocks: int, num_vocab_tiles: int, device: torch.device,
                 block_bytes: int = 0) -> tuple[int, int]:
    """How many programs share one token block's vocabulary: ``(splits, tiles_per_split)``.

    Two reasons to split, whichever asks for more:
    - small N (a reference model's forward on a short batch) would leave most SMs idle;
    - L2 reuse: the split programs of one token block run together (split index fastest in
      the launch order), so only ``SMs / splits`` token blocks (``block_bytes`` each, the
      ``BLOCK_N x D`` rows every vocabulary tile re-reads) are in flight; enough splits keep
      them within half of L2, so ``h`` is read from L2 instead of HBM.
    Each split writes partial (max, sum-exp, ...) statistics that a merge kernel combines with
    a stable log-add. No split is left empty.
    """
    if interpreter_active() or device.type != "cuda":
        target, l2_splits = _INTERPRETER_TARGET_PROGRAMS, 1
    else:
        props = torch.cuda.get_device_properties(device)
        target = _PROGRAMS_PER_SM * props.multi_processor_count
        l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        l2_splits = math.ceil(props.multi_processor_count * block_bytes / (_L2_SHARE_FOR_H * l2))
    splits = max(1, l2_splits, -(-target // max(num_token_blocks, 1)))
    splits = min(num_vocab_tiles, splits)
    tiles_per_split = -(-num_vocab_tiles // splits)
    splits = -(-num_vocab_tiles // tiles_per_split)
    return splits, tiles_per_split


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the backward's dz buffer: the input dtype on a GPU (the dtype the gradient
    GEMMs feed the tensor cores); fp32 under the interpreter, like every dot operand there
    (``common.dot_dtype``), unless a test asks for the GPU's rounding with ``DZ_16BIT_IN_INTERPRETER``."""
    if dtype == torch.float32 or (interpreter_active() and not DZ_16BIT_IN_INTERPRETER):
        return torch.float32
    return dtype


def dz_chunk_columns(num_rows: int, vocab: int, elem_bytes: int, align: int) -> int:
    """Vocabulary columns per backward chunk: the ``[M, chunk]`` dz buffer stays within
    ``DZ_BUFFER_BYTES`` (at least one ``align``-wide tile; ``align`` is a multiple of the dz
    tile and of the forward tile, so chunks start on tile boundaries). Interpreter: two tiles,
    so small tests still cross chunk boundaries."""
    if interpreter_active():
        cols = 2 * align
    else:
        cols = DZ_BUFFER_BYTES // max(1, num_rows * elem_bytes) // align * align
    cols = max(align, cols)
    return min(cols, -(-vocab // align) * align)


# The pre-skip reads the forward's per-tile max at the forward's tile width, which must be one
# width for every forward config (tile_max_columns does not know the flags) and a multiple of
# the dz tile's.
assert len({c.block_v for c in (*_FWD.values(), *_FWD_HEAVY.values())}) == 1
assert all(_FWD["16"].block_v % b.dz.block_v == 0 for b in _BWD.values())
