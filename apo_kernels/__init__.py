"""apo-kernels: fused, exact, memory-lean log-probs and preference losses over an LM head."""

from __future__ import annotations

__version__ = "0.1.0"

from .ops import LinearLogprobsOutput, linear_logprobs

__all__ = ["__version__", "linear_logprobs", "LinearLogprobsOutput"]
