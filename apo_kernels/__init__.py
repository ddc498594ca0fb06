"""apo-kernels: fused, exact, memory-lean log-probs and preference losses over an LM head."""

from __future__ import annotations

__version__ = "0.1.0"

from .losses import LOSS_TYPES, preference_loss, preference_rewards, unpaired_preference_loss
from .ops import LinearLogprobsOutput, linear_logprobs
from .ops.preference_head import preference_head
from .ops.skip_stats import SkipStats, count_skipped_tiles
from .preference import FusedLinearPreferenceLoss, PreferenceLossOutput, fused_linear_preference_loss
from .sequence import packed_sequence_logps, padded_sequence_logps

__all__ = [
    "__version__",
    "linear_logprobs",
    "LinearLogprobsOutput",
    "preference_loss",
    "preference_rewards",
    "unpaired_preference_loss",
    "LOSS_TYPES",
    "FusedLinearPreferenceLoss",
    "fused_linear_preference_loss",
    "PreferenceLossOutput",
    "padded_sequence_logps",
    "packed_sequence_logps",
    "preference_head",
    "count_skipped_tiles",
    "SkipStats",
]
