"""Tile configurations the launchers pick from, by device, dtype and shape.

Every configuration a launcher can return is listed in ``all_configs`` so the compile test
(tests/test_kernel_compile.py) builds each one for sm_80 and sm_90 and checks it for spills.

The GPU entries are first choices from the arithmetic below, not yet tuned on a device
(tuning on Hopper is its own issue; tuned entries will name the device they were tuned on):
- forward, 16-bit: a 128x128 logit tile in fp32 registers (64 KiB over 8 warps) with 64-wide
  K steps keeps 3 stages of operands at 3 * (128*64 + 64*128) * 2 B = 96 KiB of shared memory,
  within sm_80's 164 KiB and sm_90's 228 KiB.
- backward, 16-bit: the tile also keeps the logit gradient (64x128) live across the K loop of
  the two gradient GEMMs, so token blocks are halved.
- fp32 inputs: half the tile in each dimension (operands are twice the bytes; dots in tf32/ieee).
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


_INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1)
_FWD_16BIT = TileConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_FWD_FP32 = TileConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=3)
_BWD_16BIT = TileConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3)
_BWD_FP32 = TileConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=2)

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
