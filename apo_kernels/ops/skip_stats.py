"""Count the vocabulary tiles the Triton backward skips, to measure gradient filtering on real
logits (how much it saves depends on the data: DESIGN.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class SkipStats:
    """Gradient tiles of the Triton backward (``BLOCK_N`` tokens x ``BLOCK_V`` vocabulary
    entries, summed over every vocabulary chunk): all of them, those skipped before the logit
    recompute (the forward's per-tile max proved every probability below ``filter_eps`` and
    the tile holds no label of its tokens), and those skipped after it (the recomputed
    gradient was below the threshold). A skipped tile costs neither its recompute (before)
    nor its two gradient GEMMs (either)."""

    tiles: int = 0
    skipped_before_recompute: int = 0
    skipped_after_recompute: int = 0

    @property
    def skipped_fraction(self) -> float:
        skipped = self.skipped_before_recompute + self.skipped_after_recompute
        return skipped / self.tiles if self.tiles else 0.0


_active: list[SkipStats] = []


@contextlib.contextmanager
def count_skipped_tiles() -> Iterator[SkipStats]:
    """``with count_skipped_tiles() as stats: loss.backward()`` fills ``stats``.

    Costs a device sync per backward launch while active; leave it off in training.
    """
    stats = SkipStats()
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)


def record(tiles: int, before: int, after: int) -> None:
    for stats in _active:
        stats.tiles += tiles
        stats.skipped_before_recompute += before
        stats.skipped_after_recompute += after


def counting() -> bool:
    return bool(_active)
