"""Compile every kernel configuration the launchers can pick for real GPUs, on any machine.

Triton compiles for a CUDA target without a GPU present; ``cuobjdump`` (shipped inside
triton's package) then reports registers, shared memory and local memory (spills) of the
cubin. The interpreter accepts code the compiler rejects, so this is what catches layout,
shared-memory and register problems in CI. Used by tests/test_kernel_compile.py and
``apo-kernels check --compile``.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import linear_logprobs_bwd as bwd
from . import linear_logprobs_fwd as fwd
from . import preference_head as head
from .configs import TileConfig, all_configs, forward_config

_PTR_TYPES = {"rows_ptr": "*i64", "labels_ptr": "*i64", "top1_ptr": "*i8", "cu_ptr": "*i64"}
_INPUT_PTRS = ("h_ptr", "w_ptr", "b_ptr")
_FLOATS = ("scale", "softcap", "inv_temp", "filter_eps", "inv_v", "beta")
_TRITON_DTYPE = {torch.float32: ("fp32", tl.float32), torch.float16: ("fp16", tl.float16),
                 torch.bfloat16: ("bf16", tl.bfloat16)}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    dtype: str
    flags: str
    config: TileConfig
    registers: int
    shared_bytes: int
    local_bytes: int  # stack + local memory per thread: > 0 means register spills
    has_tensor_core_mma: bool


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> tuple[dict, dict]:
    name, _ = _TRITON_DTYPE[dtype]
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in _INPUT_PTRS:
            sig[arg] = f"*{name}"
        elif arg.endswith("_ptr"):
            sig[arg] = _PTR_TYPES.get(arg, "*fp32")
        elif arg in _FLOATS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    missing = [a for a in constexprs if a not in kernel.arg_names]
    if missing:
        raise KeyError(f"{kernel.__name__}: unknown constexprs {missing}")
    return sig, constexprs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    def field(key: str) -> int:
        match = re.search(rf"{key}:(\d+)", text)
        return int(match.group(1)) if match else 0
    # Spilled registers land in the stack frame (STACK) or in local memory (LOCAL).
    return field("REG"), field("STACK") + field("LOCAL")


def _kernel_variants(dtype: torch.dtype, cfg: TileConfig, family: str, full_flags: bool):
    """(kernel, constexprs) pairs for one config: every flag on, or every flag off."""
    _, tl_dtype = _TRITON_DTYPE[dtype]
    flag = bool(full_flags)
    base = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                DOT_DTYPE=tl_dtype, INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                stride_hd=1, stride_wd=1, HAS_BIAS=flag, HAS_SOFTCAP=flag, WITH_ENTROPY=flag)
    if family == "forward":
        yield fwd._forward_kernel, dict(base, WITH_STATS=flag, RECORD_TILE_MAX=flag)
        return
    grads = dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=flag)
    # PRESKIP is only used without an entropy gradient; "all" still compiles it with one.
    preskip = dict(PRESKIP=flag, COUNT_SKIPS=flag, FWD_BLOCK_V=forward_config(dtype).block_v)
    yield bwd._backward_atomic_kernel, dict(base, FILTER=flag, GROUP_N=cfg.group_n, **grads,
                                            **preskip)
    yield bwd._backward_dh_kernel, dict(base, FILTER=flag)
    yield bwd._backward_dw_kernel, dict(base, FILTER=flag, COMPUTE_DW=True, COMPUTE_DB=flag)


def compile_all(archs: tuple[int, ...] = (80, 90), full_flags_only: bool = False):
    """Compile every (kernel, config, dtype) the launchers can pick, with all optional features
    on and (unless ``full_flags_only``) all off. Yields a ``CompileResult`` per cubin."""
    for arch, (family, entries), full in itertools.product(
            archs, all_configs().items(), (True,) if full_flags_only else (True, False)):
        for cfg, dtype in entries:
            for kernel, constexprs in _kernel_variants(dtype, cfg, family, full):
                sig, consts = _signature(kernel, dtype, constexprs)
                src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": cfg.num_warps,
                                                   "num_stages": cfg.num_stages})
                regs, local = _resource_usage(compiled.asm["cubin"])
                ptx = compiled.asm["ptx"]
                yield CompileResult(
                    kernel=kernel.__name__, arch=arch, dtype=_TRITON_DTYPE[dtype][0],
                    flags="all" if full else "none", config=cfg, registers=regs,
                    shared_bytes=compiled.metadata.shared, local_bytes=local,
                    has_tensor_core_mma=("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx))
    # The merge, label-term and loss-head kernels have no tile configuration to pick.
    for arch in archs:
        # Every block size with one loss, every loss with the largest block (the loss only
        # changes scalar code).
        head_variants = [(code, block) for code in head.LOSS_CODES.values() for block in head.BLOCKS
                         if block == head.BLOCKS[-1] or code == head.LOSS_CODES["apo_zero"]]
        for loss_code, block in head_variants:
            name = next(k for k, v in head.LOSS_CODES.items() if v == loss_code)
            for kernel, consts in (
                    (head._preference_head_fwd, dict(LOSS=loss_code, HAS_W=True, REF_TOKENS=True,
                                                     BLOCK=block)),
                    (head._preference_head_bwd, dict(LOSS=loss_code, HAS_W=True, HAS_GRAD_SEQ=True,
                                                     BLOCK=block))):
                sig, consts = _signature(kernel, torch.float32, consts)
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                regs, local = _resource_usage(compiled.asm["cubin"])
                yield CompileResult(kernel.__name__, arch, "fp32", name,
                                    TileConfig(1, 0, block, 4, 1), regs,
                                    compiled.metadata.shared, local, False)
        consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, COMPUTE_DH=True, COMPUTE_DW=True,
                      COMPUTE_DB=True, BLOCK_D=bwd._LABEL_BLOCK_D, stride_hd=1, stride_wd=1)
        for dtype in (torch.bfloat16, torch.float32):
            sig, consts = _signature(bwd._label_term_kernel, dtype, consts)
            compiled = triton.compile(
                ASTSource(fn=bwd._label_term_kernel, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            regs, local = _resource_usage(compiled.asm["cubin"])
            yield CompileResult("_label_term_kernel", arch, _TRITON_DTYPE[dtype][0], "all",
                                TileConfig(1, 1, bwd._LABEL_BLOCK_D, 4, 1), regs,
                                compiled.metadata.shared, local, False)
        consts = dict(WITH_ENTROPY=True, WITH_STATS=True, BLOCK=128)
        sig, consts = _signature(fwd._merge_kernel, torch.float32, consts)
        compiled = triton.compile(ASTSource(fn=fwd._merge_kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        regs, local = _resource_usage(compiled.asm["cubin"])
        yield CompileResult("_merge_kernel", arch, "fp32", "all", TileConfig(128, 0, 0, 4, 1),
                            regs, compiled.metadata.shared, local, False)


def main() -> None:
    """``python -m apo_kernels.kernels.compile_check [ARCH ...]``: one JSON line per cubin.

    Kernels must be imported without TRITON_INTERPRET (the interpreter replaces them with
    objects that cannot compile), so tests run this in a subprocess.
    """
    import dataclasses
    import json
    import sys

    archs = tuple(int(a) for a in sys.argv[1:]) or (80, 90)
    for result in compile_all(archs=archs):
        print(json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main()
