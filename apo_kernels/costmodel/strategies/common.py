"""Launches several strategies share: fp32 gradient buffers, the sparse label term."""

from __future__ import annotations

from ..launch import Launch
from ..problem import Problem

FP32 = 4


def zero_fill(name: str, elements: float, phase: str = "backward") -> Launch:
    """``torch.zeros`` of an fp32 buffer: a memset, write only."""
    return Launch(name=name, phase=phase, engine="torch", hbm_write=elements * FP32,
                  l2="streaming write, no reuse")


def cast_to_input(name: str, elements: float, in_bytes: int, phase: str = "backward") -> Launch:
    """The fp32 accumulator converted to the input dtype at the end (``.to(dtype)``)."""
    return Launch(name=name, phase=phase, engine="torch", hbm_read=elements * FP32,
                  hbm_write=elements * in_bytes, l2="streaming, no reuse")


def label_term(p: Problem, *, relaxed: bool) -> Launch:
    """One program per kept token t: ``dH_t += c W[y_t]`` (plain RMW of its own fp32 row),
    ``dW[y_t] += c h_t`` (fp32 atomics: tokens share labels). 4 warps, BLOCK_D = 256."""
    reads_per_token = p.d * p.in_bytes * (2 if p.softcap else 1) * 2  # h_t and W[y] (twice w/ softcap)
    rmw = p.d * FP32 * 2 * 2  # dH_t row and the dW[y] row, read + write each
    fences = 0.0 if relaxed else -(-p.d // 256)  # one fenced vector atomic per thread per chunk
    return Launch(
        name="label term (sparse)", phase="backward", engine="triton",
        alu_ops=p.n * p.d * 4.0, hbm_read=p.n * (reads_per_token + rmw / 2), hbm_write=p.n * rmw / 2,
        atomics=float(p.n) * p.d, fences_per_program=fences, grid=p.n, resident=16,
        l2="W[y] rows gathered from HBM (no reuse counted); dW[y] rows RMW in L2 then HBM")
