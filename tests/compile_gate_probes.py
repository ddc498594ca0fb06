"""Probe kernels for tests/test_kernel_compile.py: variants built so the SASS gates must fail.

Loaded by path (``compile_check --modules tests/compile_gate_probes.py``), never collected as a
test module. One small bf16 GEMM with a K loop whose result is added atomically into ``c``:
compiled as the launcher would (aligned, ``K`` and the row strides divisible by 16) with a
relaxed atomic it passes every gate; with the default ``acq_rel`` atomic it must fail
``relaxed_atomics``; with nothing marked divisible (a misaligned or odd-strided input) it must
fail ``pipelined``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from apo_kernels.kernels.launch_specs import LaunchSpec


@triton.jit
def _probe_gemm_atomic(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn,
                       SEM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :],
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k[:, None],
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.atomic_add(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                  mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), sem=SEM)


def launch_specs() -> list[LaunchSpec]:
    def spec(variant: str, sem: str, fast: bool) -> LaunchSpec:
        return LaunchSpec(kernel=_probe_gemm_atomic, config="64x64x32w4s3", dtype=torch.bfloat16,
                          variant=variant, constexprs=dict(SEM=sem, BLOCK=64, BLOCK_K=32),
                          num_warps=4, num_stages=3,
                          divisible=("K", "stride_am", "stride_bn") if fast else (),
                          aligned=fast, types={"a_ptr": "*bf16", "b_ptr": "*bf16"},
                          expects_dot=True, expects_pipelined=True)

    return [spec("relaxed", "relaxed", True), spec("acq_rel", "acq_rel", True),
            spec("unmarked", "relaxed", False)]
