"""Make real inputs meet what the compiled fast path assumes, on purpose and logged.

Triton's launcher specialises every call on its arguments: a tensor whose data pointer is
16-byte aligned and an integer divisible by 16 are marked ``tt.divisibility=16``, an integer
equal to 1 becomes a compile-time constant. The GEMM kernels are checked (``compile_check``,
the SASS gates) with their operand pointers aligned, a unit inner stride, and ``D`` and the row
strides divisible by 16 (``FAST_PATH_DIVISIBLE``): only then are the 16-bit operand loads
vectorised and software-pipelined (``cp.async``). An input that breaks one of these would
silently compile a different, much slower variant, so the launchers call ``gemm_operands``
first, which

- zero-pads ``D`` to a multiple of 16 (both operands; zero columns add nothing to any logit,
  and the padded gradient columns are dropped), and
- copies an operand whose data pointer is misaligned, whose inner stride is not 1, or whose
  row stride is not a multiple of 16 elements into a fresh contiguous tensor,

and logs each action at debug level on the ``apo_kernels`` logger. ``aligned`` does the same
for the small per-token vectors (a copy of ``[N]`` floats), so every launch compiles the
variant the check proved.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("apo_kernels")

#: Integer arguments of the GEMM kernels that the fast path needs divisible by 16.
FAST_PATH_DIVISIBLE: tuple[str, ...] = ("D", "stride_hn", "stride_wv")
ALIGN_BYTES = 16
DIVISOR = 16


def _misaligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN_BYTES != 0


def aligned(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` itself when its data pointer is 16-byte aligned, else an aligned contiguous copy."""
    if t.numel() == 0 or not _misaligned(t):
        return t
    logger.debug("apo_kernels fast path: copying %s %s (data pointer not 16-byte aligned)",
                 name, tuple(t.shape))
    return t.clone(memory_format=torch.contiguous_format)


def padded_size(d: int) -> int:
    return -(-d // DIVISOR) * DIVISOR


def _layout_problem(t: torch.Tensor) -> str | None:
    if t.shape[0] > 0 and _misaligned(t):
        return "data pointer not 16-byte aligned"
    if t.shape[1] > 1 and t.stride(1) != 1:
        return f"inner stride {t.stride(1)} != 1"
    if t.shape[0] > 1 and t.stride(0) % DIVISOR != 0:
        return f"row stride {t.stride(0)} not a multiple of {DIVISOR} elements"
    return None


def gemm_operand(t: torch.Tensor, name: str, d_padded: int) -> torch.Tensor:
    """A ``[rows, D]`` operand as the fast path needs it: ``[rows, d_padded]`` (zero columns
    appended), unit inner stride, row stride a multiple of 16, 16-byte-aligned data."""
    d = t.shape[1]
    if d != d_padded:
        logger.debug("apo_kernels fast path: zero-padding %s %s to D=%d (D not a multiple of %d)",
                     name, tuple(t.shape), d_padded, DIVISOR)
        return F.pad(t, (0, d_padded - d)).contiguous()
    problem = _layout_problem(t)
    if problem is None:
        return t
    logger.debug("apo_kernels fast path: copying %s %s to a contiguous tensor (%s)",
                 name, tuple(t.shape), problem)
    return t.contiguous() if t.stride(1) != 1 or not t.is_contiguous() else t.clone()


def gemm_operands(hidden: torch.Tensor,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(hidden, weight, D_padded)`` meeting the fast path's assumptions (see the module)."""
    d_padded = padded_size(weight.shape[1])
    return (gemm_operand(hidden, "hidden", d_padded), gemm_operand(weight, "weight", d_padded),
            d_padded)


class KernelBuffer:
    """A buffer the kernel may write (``.tensor``) standing in for ``target`` when the target
    is misaligned, not contiguous, or narrower than the padded ``D``; ``finish()`` copies the
    result back (the stand-in starts as a copy of the target, so accumulation works too)."""

    def __init__(self, target: torch.Tensor | None, name: str, d_padded: int | None = None):
        self.target = target
        self.tensor = target
        if target is None or target.numel() == 0:
            return
        pad = d_padded is not None and target.shape[-1] != d_padded
        if pad:
            logger.debug("apo_kernels fast path: %s %s written through a buffer padded to D=%d",
                         name, tuple(target.shape), d_padded)
            self.tensor = F.pad(target, (0, d_padded - target.shape[-1])).contiguous()
        elif _misaligned(target) or not target.is_contiguous():
            logger.debug("apo_kernels fast path: %s %s written through an aligned contiguous "
                         "buffer", name, tuple(target.shape))
            self.tensor = target.clone(memory_format=torch.contiguous_format)

    def finish(self) -> None:
        if self.tensor is not self.target:
            self.target.copy_(self.tensor[..., : self.target.shape[-1]])
