"""Compile every ``launch_specs()`` entry of the linear-log-probs kernels for sm_80/sm_90 and
print what the compiler emitted: registers, spills, shared memory, MMA shapes, pipelined loads,
atomics. A developer's view of the same evidence ``apo-kernels check --compile`` gates on.

    env -u TRITON_INTERPRET PYTHONPATH=$PWD python benchmarks/kernel_sass.py [--arch 90 80] [-k NAME]

Must run without TRITON_INTERPRET (interpreted kernels cannot compile). Pointers are marked
16-byte aligned and the spec's ``divisible`` integers ``tt.divisibility=16``, as Triton's
runtime launcher does for aligned tensors and multiples of 16.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PTRS = {"rows_ptr": "*i64", "labels_ptr": "*i64", "top1_ptr": "*i8"}
_FLOATS = ("scale", "softcap", "inv_temp", "filter_eps", "inv_v", "beta")
_TOOL = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(spec) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, arg in enumerate(spec.kernel.arg_names):
        if arg in spec.constexprs:
            sig[arg] = "constexpr"
            continue
        if arg in spec.types:
            sig[arg] = spec.types[arg]
        elif arg in ("h_ptr", "w_ptr", "b_ptr"):
            sig[arg] = "*" + _DT[spec.dtype]
        elif arg.endswith("_ptr"):
            sig[arg] = _PTRS.get(arg, "*fp32")
        elif arg in _FLOATS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
        if sig[arg].startswith("*") or arg in spec.divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_spec(spec, arch: int) -> dict:
    sig, attrs = signature(spec)
    src = ASTSource(fn=spec.kernel, signature=sig, constexprs=spec.constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([_TOOL, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_TOOL, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", res)) else 0
    ops = [m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", sass, re.M)]
    count = collections.Counter(op.split(".")[0] for op in ops)
    shapes = sorted({op.split(".")[1] for op in ops if op.startswith("HGMMA.")})
    hmma = sorted({".".join(op.split(".")[1:2]) for op in ops if op.startswith("HMMA.")})
    return dict(kernel=spec.name, config=spec.config, dtype=_DT[spec.dtype], arch=arch,
                regs=field("REG"), spill=field("STACK") + field("LOCAL"), smem=k.metadata.shared,
                hgmma=count["HGMMA"], hgmma_shapes=",".join(shapes), hmma=count["HMMA"], hmma_shapes=",".join(hmma),
                ldgsts=count["LDGSTS"], utmaldg=count["UTMALDG"], atomg=count["ATOMG"],
                redg=count["REDG"], membar=count["MEMBAR"], ldg=count["LDG"],
                membar_gpu=sum(op.startswith("MEMBAR") and "GPU" in op for op in ops))


def all_specs(exhaustive: bool = False):
    from apo_kernels.kernels import linear_logprobs_bwd, linear_logprobs_fwd
    return linear_logprobs_fwd.launch_specs(exhaustive) + linear_logprobs_bwd.launch_specs(exhaustive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 80])
    ap.add_argument("-k", default="")
    ap.add_argument("--exhaustive", action="store_true", help="every feature-flag combination")
    args = ap.parse_args()
    cols = ["kernel", "config", "dtype", "arch", "regs", "spill", "smem", "hgmma", "hgmma_shapes",
            "hmma", "hmma_shapes", "ldgsts", "utmaldg", "atomg", "redg", "membar", "membar_gpu", "ldg"]
    print("\t".join(cols))
    for arch in args.arch:
        for spec in all_specs(args.exhaustive):
            if args.k and args.k not in f"{spec.name} {spec.config}":
                continue
            r = compile_spec(spec, arch)
            print("\t".join(str(r[c]) for c in cols), flush=True)


if __name__ == "__main__":
    main()
