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

from .common import interpreter_active


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
_FWD_16BIT = TileConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3)
_FWD_FP32 = TileConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=3)
_BWD_16BIT = TileConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2)
_BWD_FP32 = TileConfig(block_n=32, block_v=64, block_d=32, num_warps=8, num_stages=2)

# Programs to aim for in the forward: enough waves to fill every SM when N is small.
_INTERPRETER_TARGET_PROGRAMS = 8
_PROGRAMS_PER_SM = 2


def forward_config(dtype: torch.dtype) -> TileConfig:
    if interpreter_active():
        return _INTERPRETER
    return _FWD_FP32 if dtype == torch.float32 else _FWD_16BIT


def backward_config(dtype: torch.dtype) -> TileConfig:
    if interpreter_active():
        return _INTERPRETER
    return _BWD_FP32 if dtype == torch.float32 else _BWD_16BIT


def all_configs() -> dict[str, list[tuple[TileConfig, torch.dtype]]]:
    """Every (config, dtype) pair the GPU launchers can pick, per kernel family."""
    dtypes16 = (torch.float16, torch.bfloat16)
    return {
        "forward": [(_FWD_16BIT, d) for d in dtypes16] + [(_FWD_FP32, torch.float32)],
        "backward": [(_BWD_16BIT, d) for d in dtypes16] + [(_BWD_FP32, torch.float32)],
    }


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
