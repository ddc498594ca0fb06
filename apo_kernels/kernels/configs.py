"""Tile configurations the launchers pick from, by device, dtype and shape.

Every configuration a launcher can return is listed in ``all_configs`` so the compile test
(tests/test_kernel_compile.py) builds each one for sm_80 and sm_90 and checks it for spills.

The GPU entries are first choices that compile for sm_80 and sm_90 without register spills
(checked by the compile test with every optional feature on), not yet tuned on a device;
tuned entries will name the device they were tuned on. What the compile check showed when
they were chosen (triton 3.9, registers per thread, spilled bytes):
- forward, 16-bit: 128x128 tiles spill on both archs (255 regs, 224-552 B: the tile's fp32
  logits, probabilities and the entropy/stat terms are all live); 64x128x32 with 8 warps
  does not (234-242 regs).
- backward, 16-bit: the tile's logit gradient stays live across the two gradient GEMMs;
  64x128 spills, 64x64x32 with 8 warps does not (140-220 regs).
- fp32 inputs: operands are twice the bytes; 64x64x32 forward and 32x64x32 backward (8 warps:
  with 4 the dW kernel spills 8 B on sm_90).
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
