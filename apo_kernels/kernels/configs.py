"""Tile configurations the launchers pick from, by device architecture, dtype and role.

Every configuration a launcher can return is a row of ``_TABLE``; the kernel modules'
``launch_specs()`` turn the rows into the variants ``compile_check`` builds for the row's
architecture (sm_80 rows for Ampere and older, sm_90 rows for Hopper and newer) and gates on
the SASS (tests/test_kernel_compile.py): tensor-core MMA, pipelined (``cp.async``) operand
loads, no spills, relaxed atomics, and on sm_90 every 16-bit wgmma at least 64 x 64.
Not yet tuned on a device: chosen from what the compiler emits. What the check showed for the
chosen rows (triton 3.9, compiled as the launcher compiles them: aligned pointers, ``D`` and
row strides divisible by 16; registers per thread, spilled bytes, wgmma shape per warp group):

- forward, 16-bit, ``light`` (no entropy/stats; bias, softcap, tile-max on) 128x128x32, 8 warps,
  3 stages: sm_90 230 regs, 0 B, ``HGMMA.64x128x16``, 12 ``LDGSTS``; sm_80 232 regs, 0 B, HMMA.
  With entropy and stats on (``heavy``) 128x128 spills (sm_90 255 regs, 8 B; sm_80 264 B), so
  heavy stays 64x128x32 w8: sm_90 188 regs, ``64x64x16``; sm_80 182 regs.
- backward, 16-bit, atomic tile kernel 128x128x64 w8 s2 on sm_90: 255 regs (pre-skip 231, none
  198), 0 B, ``64x128x16`` (logits) and ``64x64x16`` (dH, dW: n = BLOCK_D = 64), 32 ``LDGSTS``,
  17 ``REDG``, no GPU-scope ``MEMBAR``. On sm_80 it spills (320 B), so sm_80 uses 128x64x32 w8
  (190 regs). Deterministic dH 128x64x64 w8 (sm_90 242 regs, ``64x64x16``; 128x128 spills
  240 B) and dW 64x128x64 w8 (sm_90 250 regs, ``64x64x16``; 128x64 gives a 64x32 dW GEMM,
  128x128 spills 576 B); sm_80 128x64x64 w8 for both (221 / 206 regs).
- fp32, exact dots (torch's default, no TF32): CUDA-core FMAs, pipelined. Forward 64x64x32 w8
  (128-144 regs), heavy 32x64x32 (sm_90 w4 144 regs: 8 warps cap registers at 128 and spill
  16 B); backward atomic 32x64x32 w8 (70-107 regs), dH 64x64x32 w8 (sm_80 255 regs, 0 B), dW
  64x64x32 w8 on sm_90, 64x32x32 on sm_80 (64x64 spills 8 B there).
- fp32 with TF32 dots (``allow_tf32``): sm_90 64-row tiles with 4 warps so wgmma applies
  (forward 64x64x32 w4: ``64x64x8``; backward 64x64x32 w4: ``64x64x8`` and ``64x32x8``, 175-250
  regs; 32-row tiles fell back to ``mma.sync``); sm_80 keeps 64x64x32 / 32x64x32 w8.

Before these rows (and before ``sem="relaxed"``), the same check found: every atomic kernel
fenced (``MEMBAR.ALL.GPU`` + ``ATOMG`` per ``tl.atomic_add``: 17 per backward tile), the 16-bit
backward's wgmma 64x16x16 / 64x32x16, the fp32 TF32 dH kernel on ``mma.sync``, and spills of
8-16 B in the fp32 forward (all features) and four backward variants.
Under the interpreter tiles are small (numpy cost grows with the tile) but still >= 16 (tl.dot's
minimum), and the vocabulary is split eagerly so tests exercise the split-merge path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import input_precision, interpreter_active


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel launch."""

    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden size step of the K loop
    num_warps: int
    num_stages: int
    group_n: int = 8  # token blocks per L2 group in the backward's launch order

    @property
    def label(self) -> str:
        """``"64x128x32w8s3"``: BLOCK_N x BLOCK_V x BLOCK_D, warps, stages (file-name safe)."""
        return f"{self.block_n}x{self.block_v}x{self.block_d}w{self.num_warps}s{self.num_stages}"


_INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1)

#: Architectures the GPU configs are chosen for (and compiled for by the compile check):
#: sm_90 (Hopper: wgmma, one table) and sm_80 (Ampere: mma.sync; also any other pre-Hopper).
ARCHS = (80, 90)


def _t(text: str, group_n: int = 8) -> TileConfig:
    n, v, rest = text.split("x")
    d, rest = rest.split("w")
    w, stages = rest.split("s")
    return TileConfig(int(n), int(v), int(d), int(w), int(stages), group_n)


# (family, role, "16bit" | "fp32", arch) -> config. Forward roles: "light" (no entropy, no
# stats: the common training and reference pass) and "heavy" (entropy and/or stats keep more
# per-tile terms live). Backward roles: the atomic tile kernel and the deterministic dH / dW
# kernels. BLOCK_V of a dtype's forward configs must agree (the tile-max buffer has one column
# per forward vocabulary tile) and be a multiple of the atomic backward's BLOCK_V (pre-skip).
_TABLE: dict[tuple[str, str, str, int], TileConfig] = {
    ("forward", "light", "16bit", 90): _t("128x128x32w8s3"),
    ("forward", "heavy", "16bit", 90): _t("64x128x32w8s3"),
    ("forward", "light", "16bit", 80): _t("128x128x32w8s3"),
    ("forward", "heavy", "16bit", 80): _t("64x128x32w8s3"),
    ("forward", "light", "fp32", 90): _t("64x64x32w8s3"),
    ("forward", "heavy", "fp32", 90): _t("32x64x32w4s3"),
    ("forward", "light", "fp32", 80): _t("64x64x32w8s3"),
    ("forward", "heavy", "fp32", 80): _t("32x64x32w8s3"),
    ("forward", "light", "tf32", 90): _t("64x64x32w4s3"),
    ("forward", "heavy", "tf32", 90): _t("64x64x32w4s3"),
    ("forward", "light", "tf32", 80): _t("64x64x32w8s3"),
    ("forward", "heavy", "tf32", 80): _t("64x64x32w8s3"),
    ("backward", "atomic", "16bit", 90): _t("128x128x64w8s2"),
    ("backward", "dh", "16bit", 90): _t("128x64x64w8s2"),
    ("backward", "dw", "16bit", 90): _t("64x128x64w8s2"),
    ("backward", "atomic", "16bit", 80): _t("128x64x32w8s2"),
    ("backward", "dh", "16bit", 80): _t("128x64x64w8s2"),
    ("backward", "dw", "16bit", 80): _t("128x64x64w8s2"),
    ("backward", "atomic", "fp32", 90): _t("32x64x32w8s2"),
    ("backward", "dh", "fp32", 90): _t("64x64x32w8s2"),
    ("backward", "dw", "fp32", 90): _t("64x64x32w8s2"),
    ("backward", "atomic", "fp32", 80): _t("32x64x32w8s2"),
    ("backward", "dh", "fp32", 80): _t("64x64x32w8s2"),
    ("backward", "dw", "fp32", 80): _t("64x32x32w8s2"),
    ("backward", "atomic", "tf32", 90): _t("64x64x32w4s2"),
    ("backward", "dh", "tf32", 90): _t("64x64x32w4s2"),
    ("backward", "dw", "tf32", 90): _t("64x64x32w4s2"),
    ("backward", "atomic", "tf32", 80): _t("32x64x32w8s2"),
    ("backward", "dh", "tf32", 80): _t("32x64x32w8s2"),
    ("backward", "dw", "tf32", 80): _t("32x64x32w8s2"),
}
#: Row kind -> the dtypes it serves and the dot precision its kernels compile with (fp32 dots
#: follow torch's TF32 flag: ``common.input_precision``).
_KINDS = {"16bit": ((torch.float16, torch.bfloat16), "ieee"),
          "fp32": ((torch.float32,), "ieee"), "tf32": ((torch.float32,), "tf32")}

# Programs to aim for in the forward: enough waves to fill every SM when N is small.
_INTERPRETER_TARGET_PROGRAMS = 8
_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class ConfigChoice:
    """One row of the table: what a launcher picks for ``(family, role, dtype, arch)``."""

    family: str
    role: str
    dtype: torch.dtype
    precision: str  # INPUT_PRECISION of the dots: "ieee" or "tf32"
    arch: int
    config: TileConfig


def device_arch(device: torch.device | None) -> int:
    """The table's architecture for a device: 90 for sm_90 and newer, 80 below; 90 for a
    non-CUDA device (what the compile check's launcher verification compiles for)."""
    if device is None or device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _kind(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if input_precision(dtype) == "tf32" else "fp32"


def forward_config(dtype: torch.dtype, *, heavy: bool = False,
                   device: torch.device | None = None) -> TileConfig:
    """``heavy``: entropy or the extra statistics are computed. ``BLOCK_V`` depends on the
    dtype only (``tile_max_columns`` relies on it)."""
    if interpreter_active():
        return _INTERPRETER
    return _TABLE[("forward", "heavy" if heavy else "light", _kind(dtype), device_arch(device))]


def backward_config(dtype: torch.dtype, *, kernel: str = "atomic",
                    device: torch.device | None = None) -> TileConfig:
    """``kernel``: ``"atomic"`` (tile kernel), ``"dh"`` or ``"dw"`` (deterministic mode)."""
    if interpreter_active():
        return _INTERPRETER
    return _TABLE[("backward", kernel, _kind(dtype), device_arch(device))]


def config_choices() -> list[ConfigChoice]:
    """Every row of the GPU table, one per dtype (fp16 and bf16 share the 16-bit rows; fp32
    has rows for exact and for TF32 dots)."""
    return [ConfigChoice(family, role, dtype, _KINDS[kind][1], arch, cfg)
            for (family, role, kind, arch), cfg in _TABLE.items() for dtype in _KINDS[kind][0]]


def all_configs() -> dict[str, list[tuple[TileConfig, torch.dtype]]]:
    """Every distinct (config, dtype) pair the GPU launchers can pick, per kernel family."""
    out: dict[str, list[tuple[TileConfig, torch.dtype]]] = {"forward": [], "backward": []}
    for c in config_choices():
        if (c.config, c.dtype) not in out[c.family]:  # noqa: SIM102
            out[c.family].append((c.config, c.dtype))
    return out


def vocab_splits(num_token_blocks: int, num_vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """How many programs share one token block's vocabulary: ``(splits, tiles_per_split)``.

    Small N (a reference model's forward on a short batch) would otherwise leave most SMs idle;
    each split writes partial (max, sum-exp, ...) statistics that a merge kernel combines with
    a stable log-add. No split is left empty.
    """
    if interpreter_active() or device.type != "cuda":
        target = _INTERPRETER_TARGET_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(num_vocab_tiles, -(-target // max(num_token_blocks, 1))))
    tiles_per_split = -(-num_vocab_tiles // splits)
    splits = -(-num_vocab_tiles // tiles_per_split)
    return splits, tiles_per_split
