"""Autograd-aware ops over the kernels: input checks, backend dispatch, custom ops."""

from .linear_logprobs import LinearLogprobsOutput, linear_logprobs

__all__ = ["linear_logprobs", "LinearLogprobsOutput"]
