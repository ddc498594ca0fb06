"""Compile every kernel variant the launchers can pick, as the runtime launcher would, and gate
the SASS. Runs on any machine: Triton compiles for a CUDA target without a GPU.

What it proves (see docs/compile_check.md): for each ``LaunchSpec`` that a module in
``KERNEL_MODULES`` declares through ``launch_specs()``, and for sm_80 and sm_90,

- ``tensor_core``: a kernel with a ``tl.dot`` on 16-bit (or TF32) operands issues tensor-core
  MMAs: ``HGMMA`` (wgmma) on sm_90, ``HMMA`` (mma.sync) on sm_80;
- ``pipelined``: a kernel with a K loop loads its operands asynchronously (``LDGSTS``, i.e.
  ``cp.async``, or ``UTMALDG``, i.e. TMA), which is what software pipelining emits;
- ``no_spills``: no stack or local memory (register spills);
- ``relaxed_atomics``: a kernel with global atomics (``ATOMG``/``REDG``) has no GPU- or
  system-scope ``MEMBAR``: the default ``acq_rel`` atomic costs ``MEMBAR.ALL.GPU`` per call.
  ``MEMBAR.ALL.CTA`` stays allowed: wgmma kernels emit it to order shared-memory writes before
  the async proxy reads them (``fence.proxy.async``), it never leaves the SM.

Specialisation mirrors ``triton.runtime.jit`` (3.9) exactly: the launcher's binder calls
``specialize_impl`` per argument, which gives a tensor ``("*bf16", "D")`` when its data pointer
is 16-byte aligned (else ``""``), an int ``("i32", "D")`` when divisible by 16 (``0`` too; i64
above 2**31-1), an int equal to 1 ``("constexpr", 1)`` (so a unit stride becomes a compile-time
constant), floats ``("fp32", None)``; ``_pack_args`` then builds ``attrs`` keyed by argument
paths ``(i,)`` for every argument whose second entry is a string (constexprs included), as
``[["tt.divisibility", 16]]`` for ``"D"`` and ``[]`` otherwise. ``source_for_spec`` builds the
same dicts from a ``LaunchSpec``: pointers aligned, ``spec.divisible`` ints marked, every other
int unmarked (the conservative case: an int that happens to be divisible at run time compiles
a variant with more marks), and ``launcher_source`` runs triton's own binder on real arguments
so ``--verify-launchers`` can compare the two (equal signature, constexprs and marks, and
identical cubins).

Import this module without ``TRITON_INTERPRET`` (the interpreter replaces kernels with objects
that cannot compile): tests and ``apo-kernels check --compile`` run it in a subprocess:
``python -m apo_kernels.kernels.compile_check [--arch 80 90] [--dump-dir DIR] [--jobs N]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import torch

from .launch_specs import LaunchSpec

#: Every module whose kernels are checked; each exposes ``launch_specs() -> list[LaunchSpec]``.
#: Names relative to this package (a dotted absolute name works too).
KERNEL_MODULES: tuple[str, ...] = ("linear_logprobs_fwd", "linear_logprobs_bwd", "preference_head",
                                   "chunk_epilogue")
ARCHS: tuple[int, ...] = (80, 90)
#: The SASS instructions the manifest counts (by opcode, any suffix).
COUNTED = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "ATOMG", "REDG", "MEMBAR")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointer types by naming convention (LaunchSpec.types overrides); the operand pointers take
# the spec's dtype, every other pointer is fp32.
_PTR_TYPES = {"rows_ptr": "*i64", "labels_ptr": "*i64", "top1_ptr": "*i8", "cu_ptr": "*i64"}
_INPUT_PTRS = ("h_ptr", "w_ptr", "b_ptr")
_FLOATS = ("scale", "softcap", "inv_temp", "filter_eps", "inv_v", "beta")
_DIVISIBLE = [["tt.divisibility", 16]]


# --------------------------------------------------------------------------- specialisation


def _module(name: str):
    """A kernel module by name (relative to this package, or dotted absolute) or file path."""
    if name.endswith(".py"):
        key = f"_compile_check_{os.path.splitext(os.path.basename(name))[0]}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module  # before exec: triton's JIT looks the module up
            spec.loader.exec_module(module)
        return sys.modules[key]
    return importlib.import_module(name if "." in name else f"{__package__}.{name}")


def collect_specs(modules: tuple[str, ...] = KERNEL_MODULES) -> list[tuple[str, int, LaunchSpec]]:
    """``(module, index, spec)`` for every spec of every module (index into its list)."""
    out = []
    for mod in modules:
        specs = _module(mod).launch_specs()
        out += [(mod, i, s) for i, s in enumerate(specs)]
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def spec_label(spec: LaunchSpec) -> str:
    """``<config>-<dtype>[-<variant>]``: unique per kernel, file-name safe."""
    dtype = dtype_name(spec.dtype)
    label = spec.config if dtype in spec.config else f"{spec.config}-{dtype}"
    return f"{label}-{spec.variant}" if spec.variant else label


def _arg_type(name: str, spec: LaunchSpec) -> str:
    if name in spec.types:
        return spec.types[name]
    if name.endswith("_ptr"):
        if name in _INPUT_PTRS:
            return f"*{dtype_name(spec.dtype)}"
        return _PTR_TYPES.get(name, "*fp32")
    return "fp32" if name in _FLOATS else "i32"


Source = tuple[dict[str, str], dict[tuple[int], Any], dict[tuple[int], list]]


def source_for_spec(spec: LaunchSpec) -> Source:
    """``(signature, constexprs, attrs)`` as triton's launcher builds them for this variant."""
    kernel = spec.kernel
    unknown = sorted(set(spec.constexprs) - set(kernel.arg_names))
    if unknown:
        raise KeyError(f"{spec.name}: constexprs name unknown arguments {unknown}")
    unknown = sorted(set(spec.divisible) - set(kernel.arg_names))
    if unknown:
        raise KeyError(f"{spec.name}: divisible names unknown arguments {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr or name in spec.constexprs:
            if name in spec.constexprs:
                value = spec.constexprs[name]
            elif param.has_default:
                value = param.default
            else:
                raise KeyError(f"{spec.name}: constexpr argument {name!r} has no value in the spec")
            signature[name] = "constexpr"
            constexprs[(i,)] = value
            attrs[(i,)] = []
            continue
        ty = _arg_type(name, spec)
        signature[name] = ty
        if ty.startswith("*"):
            attrs[(i,)] = list(_DIVISIBLE) if spec.aligned else []
        elif ty[0] in "iu" and ty != "u1":
            attrs[(i,)] = list(_DIVISIBLE) if name in spec.divisible else []
        # floats and bools carry no specialisation (no attrs entry), as in the launcher
    return signature, constexprs, attrs


def launcher_source(kernel, args: tuple, kwargs: dict, arch: int = 90):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` computes them
    for ``kernel[grid](*args, **kwargs)``, using triton's own binder (no GPU needed: CPU tensors
    carry data pointers like CUDA ones)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=kwargs.get("debug", False))
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options


@contextlib.contextmanager
def capture_launches(modules: tuple[str, ...] = KERNEL_MODULES) -> Iterator[list]:
    """Within the block, ``kernel[grid](...)`` of every kernel in ``modules`` records
    ``(kernel, args, kwargs)`` instead of running (outputs stay unwritten)."""
    import triton

    launches: list = []
    patched = []
    for mod in modules:
        for obj in vars(_module(mod)).values():
            is_kernel = isinstance(obj, triton.runtime.jit.JITFunction)
            if is_kernel and all(obj is not p for p, _ in patched):
                def run(*args, _kernel=obj, grid, warmup, **kwargs):
                    launches.append((_kernel, args, kwargs))
                patched.append((obj, obj.__dict__.get("run")))
                obj.run = run
    try:
        yield launches
    finally:
        for obj, old in patched:
            if old is None:
                del obj.run
            else:
                obj.run = old


# --------------------------------------------------------------------------- compile + SASS


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_source(kernel, signature, constexprs, attrs, arch: int, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def compile_spec(spec: LaunchSpec, arch: int):
    signature, constexprs, attrs = source_for_spec(spec)
    return compile_source(spec.kernel, signature, constexprs, attrs, arch,
                          {"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``SHARED``, ``STACK``, ``LOCAL`` of the cubin's kernel (cuobjdump)."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    out = {}
    for key in ("REG", "SHARED", "STACK", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        out[key] = int(match.group(1)) if match else 0
    return out


# "/*0a20*/   @!P2 LDGSTS.E.BYPASS.128 [R75+0x6000], ..." -> "LDGSTS.E.BYPASS.128"
_INSTRUCTION = re.compile(
    r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def sass_stats(sass: str) -> dict[str, Any]:
    """Counts of ``COUNTED`` opcodes, GPU/system-scope ``MEMBAR``s, local stores, and the
    distinct wgmma (``64x128x16``) and mma.sync (``16816``) shapes."""
    ops = _INSTRUCTION.findall(sass)
    # sm_80 spells the global reduction/atomic RED/ATOM (sm_90: REDG/ATOMG); ATOMS is shared.
    alias = {"RED": "REDG", "ATOM": "ATOMG"}
    base = collections.Counter(alias.get(op.split(".")[0], op.split(".")[0]) for op in ops)
    stats: dict[str, Any] = {name: base.get(name, 0) for name in COUNTED}
    stats["MEMBAR_GPU"] = sum(1 for op in ops if op.startswith("MEMBAR")
                              and (".GPU" in op or ".SYS" in op))
    stats["STL"] = base.get("STL", 0)
    stats["hgmma_shapes"] = sorted({op.split(".")[1] for op in ops if op.startswith("HGMMA.")})
    stats["hmma_shapes"] = sorted({op.split(".")[1] for op in ops if op.startswith("HMMA.")})
    return stats


def _tensor_core_operands(spec: LaunchSpec) -> bool:
    if spec.dtype in (torch.float16, torch.bfloat16):
        return True
    return spec.dtype == torch.float32 and spec.constexprs.get("INPUT_PRECISION") == "tf32"


def gates(spec: LaunchSpec, arch: int, entry: dict) -> dict[str, bool | None]:
    """Pass (True), fail (False) or not applicable (None) per gate; see the module docstring."""
    tensor_core = None
    if spec.expects_dot and _tensor_core_operands(spec):
        tensor_core = entry["HGMMA"] > 0 if arch >= 90 else entry["HMMA"] > 0
    atomics = entry["ATOMG"] + entry["REDG"] > 0
    return {
        "tensor_core": tensor_core,
        "pipelined": (entry["LDGSTS"] + entry["UTMALDG"] > 0) if spec.expects_pipelined else None,
        "no_spills": entry["spills"] == 0,
        "relaxed_atomics": entry["MEMBAR_GPU"] == 0 if atomics else None,
    }


def check_spec(spec: LaunchSpec, arch: int) -> tuple[dict, bytes]:
    """Compile one spec for one arch -> (manifest entry without ``cubin`` path, cubin bytes)."""
    start = time.perf_counter()
    compiled = compile_spec(spec, arch)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    stats = sass_stats(_cuobjdump(cubin, "-sass"))
    entry = {
        "kernel": spec.name, "config": spec_label(spec), "tile": spec.config,
        "variant": spec.variant, "dtype": dtype_name(spec.dtype), "target": f"sm_{arch}",
        "num_warps": spec.num_warps, "num_stages": spec.num_stages,
        # Triton's shared memory is dynamic (sized at launch): the compiler's figure, not
        # cuobjdump's static SHARED.
        "registers": usage["REG"], "shared_memory": compiled.metadata.shared,
        "spills": usage["STACK"] + usage["LOCAL"], **stats,
        "compile_s": round(time.perf_counter() - start, 2),
    }
    entry["gates"] = gates(spec, arch, entry)
    entry["passed"] = all(v is not False for v in entry["gates"].values())
    return entry, cubin


# --------------------------------------------------------------------------- parallel driver

_WORKER_SPECS: dict[str, list[LaunchSpec]] = {}


def _work(job: tuple[str, int, int]) -> tuple[dict, bytes]:
    mod, index, arch = job
    if mod not in _WORKER_SPECS:
        _WORKER_SPECS[mod] = _module(mod).launch_specs()
    return check_spec(_WORKER_SPECS[mod][index], arch)


def run_check(archs: tuple[int, ...] = ARCHS, modules: tuple[str, ...] = KERNEL_MODULES,
              dump_dir: str | None = None, jobs: int | None = None) -> list[dict]:
    """Compile every spec of ``modules`` for every arch (in ``jobs`` processes) and return the
    manifest entries; with ``dump_dir`` write ``<kernel>.<config>.sm<cc>.cubin`` files and
    ``compile.json`` there."""
    specs = collect_specs(modules)
    names = collections.Counter((s.name, spec_label(s)) for _, _, s in specs)
    dupes = [f"{k}.{c}" for (k, c), n in names.items() if n > 1]
    if dupes:
        raise ValueError(f"launch_specs() labels are not unique (set LaunchSpec.variant): {dupes}")
    work = [(mod, i, arch) for arch in archs for mod, i, s in specs
            if not s.archs or arch in s.archs]
    jobs = max(1, jobs or os.cpu_count() or 1)
    if jobs == 1:
        results = [_work(j) for j in work]
    else:
        import concurrent.futures
        import multiprocessing

        # spawn: a fresh interpreter per worker, no forked triton/torch state.
        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_work, work))
    entries = []
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    for entry, cubin in results:
        name = f"{entry['kernel']}.{entry['config']}.sm{entry['target'].removeprefix('sm_')}.cubin"
        entry = {**entry, "cubin": name}
        if dump_dir:
            with open(os.path.join(dump_dir, name), "wb") as f:
                f.write(cubin)
        entries.append(entry)
    if dump_dir:
        with open(os.path.join(dump_dir, "compile.json"), "w") as f:
            json.dump(entries, f, indent=1)
    return entries


# --------------------------------------------------------------------------- launcher check


def verify_launchers(archs: tuple[int, ...] = ARCHS, compile_pairs: int = 2) -> list[str]:
    """Run the real launchers on CPU tensors (kernels captured, not run), match every launch to
    a ``LaunchSpec`` and compare the launcher's own specialisation with the spec's; compile the
    first ``compile_pairs`` matches both ways and compare the cubins. Returns problems found.

    Every launch's tile configuration (the non-boolean constexprs and launch options) must be
    one a spec lists. Launches whose boolean flags equal a spec's (the ``all``/``none``/...
    sets the specs build) must agree with it exactly: signature, constexprs and divisibility
    marks. The shapes are chosen so every int the specs leave unmarked is not a multiple of 16
    here (M=199 kept tokens, V=900), and every spec must be matched by some launch.
    """
    # The module, not the function of the same name that apo_kernels.ops re-exports.
    op_module = importlib.import_module("apo_kernels.ops.linear_logprobs")
    modules = KERNEL_MODULES  # every kernel is captured, whichever module the ops reach
    specs = [s for _, _, s in collect_specs(modules)]
    problems: list[str] = []
    launches: list = []
    configs = importlib.import_module(f"{__package__}.configs")
    # A tile table keyed by architecture is steered through ``configs.device_arch``; a table
    # the same for every architecture has none.
    real_resolve, real_arch = op_module.resolve_backend, getattr(configs, "device_arch", None)
    op_module.resolve_backend = lambda backend, device, **kw: "triton"
    try:
        for arch in archs:
            if real_arch is not None:
                configs.device_arch = lambda device, _arch=arch: _arch  # the launchers' row
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for flags in ("all", "none", "preskip", "bias_grad"):
                    for deterministic in (False, True):
                        for tf32 in (False, True) if dtype == torch.float32 else (False,):
                            with capture_launches(modules) as captured:
                                _exercise(op_module, dtype, flags, deterministic, tf32)
                            launches += [(arch, *launch) for launch in captured]
    finally:
        op_module.resolve_backend = real_resolve
        if real_arch is not None:
            configs.device_arch = real_arch

    def tiles(kernel, consts: dict, warps: int, stages: int) -> tuple:
        return (kernel, warps, stages, repr(sorted(
            (k, v) for k, v in consts.items() if not isinstance(v, bool))))

    spec_sources = [(s, source_for_spec(s)) for s in specs]
    spec_tiles = {(arch, tiles(s.kernel, src[1], s.num_warps, s.num_stages))
                  for s, src in spec_sources for arch in (s.archs or archs)}
    matched, compiled, seen = set(), 0, set()
    for arch, kernel, args, kwargs in launches:
        sig, consts, attrs, options = launcher_source(kernel, args, kwargs, arch)
        key = (arch, kernel.__name__, repr(sorted(consts.items())), repr(sorted(sig.items())),
               repr(sorted(attrs.items())), options.num_warps, options.num_stages)
        if key in seen:
            continue
        seen.add(key)
        if (arch, tiles(kernel, consts, options.num_warps, options.num_stages)) not in spec_tiles:
            problems.append(f"{kernel.__name__} sm_{arch}: launched with a tile configuration no "
                            f"launch_specs() entry lists: {_named(kernel, consts)} "
                            f"(num_warps={options.num_warps}, num_stages={options.num_stages})")
            continue
        match = [(s, src) for s, src in spec_sources if s.kernel is kernel and src[1] == consts
                 and (s.num_warps, s.num_stages) == (options.num_warps, options.num_stages)
                 and (not s.archs or arch in s.archs)]
        if not match:
            continue  # a flag combination the check does not build (documented)
        # Constexprs need not name the dtype (a kernel without dots): prefer the same signature.
        spec, (s_sig, _, s_attrs) = next((m for m in match if m[1][0] == sig), match[0])
        matched.add(id(spec))
        if s_sig != sig:
            diff = {k: (s_sig.get(k), sig.get(k)) for k in sig if s_sig.get(k) != sig.get(k)}
            problems.append(f"{kernel.__name__} {spec_label(spec)}: signature spec vs "
                            f"launcher {diff}")
        if s_attrs != attrs:
            diff = {kernel.arg_names[k[0]]: (s_attrs.get(k), attrs.get(k))
                    for k in set(attrs) | set(s_attrs) if s_attrs.get(k) != attrs.get(k)}
            problems.append(f"{kernel.__name__} {spec_label(spec)}: divisibility marks spec vs "
                            f"launcher {diff}")
        elif s_sig == sig and compiled < compile_pairs and kernel.__name__ == "_forward_kernel":
            ours = compile_spec(spec, arch).asm["cubin"]
            theirs = compile_source(kernel, sig, consts, attrs, arch,
                                    dict(options.__dict__)).asm["cubin"]
            compiled += 1
            if ours != theirs:
                problems.append(f"{kernel.__name__} {spec_label(spec)}: cubins differ")
    # Kernels the exercised ops never launch (the preference head) are not judged here. A
    # spec with extra flag combinations (built for spill coverage: ptxas is not monotone in
    # the flags) need not be launched itself, but its tile configuration must be reachable.
    launched = {kernel for _, kernel, _, _ in launches}
    reached = {(s.kernel, s.config.split(".")[0], s.dtype, s.num_warps, s.num_stages)
               for s in specs if id(s) in matched}
    problems += [f"{s.name} {spec_label(s)}: no launcher call reaches this tile configuration"
                 for s in specs if id(s) not in matched and s.kernel in launched
                 and (s.kernel, s.config.split(".")[0], s.dtype, s.num_warps, s.num_stages)
                 not in reached and set(s.archs or archs) & set(archs)]
    if compiled == 0:
        problems.append("no cubin was compiled through the launcher's path for comparison")
    return problems


def _named(kernel, consts: dict) -> dict:
    return {kernel.arg_names[k[0]]: v for k, v in consts.items()}


def _exercise(op_module, dtype, flags: str, deterministic: bool, tf32: bool) -> None:
    """One forward + backward through the public op: ``all`` options on, ``none``, the
    pre-skip path (filtered, no entropy gradient), or ``bias_grad`` (pre-skip path, gradient
    for the bias only)."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 211, 64, 900
    # bias_grad: only the bias wants a gradient (a frozen head with a trained bias)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_(flags != "bias_grad")
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_(flags != "bias_grad")
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::17] = -100  # 199 kept rows
    extras = flags != "none"
    bias = torch.randn(v, generator=gen).to(dtype).requires_grad_() if extras else None
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32  # fp32 dots follow torch's TF32 flag
    try:
        out = op_module.linear_logprobs(
            hidden, weight, labels, bias, softcap=30.0 if extras else None,
            return_entropy=flags == "all", return_stats=flags == "all", backend="triton",
            filter_eps=2.0**-12 if extras else None, deterministic=deterministic)
        loss = out.logprobs.sum() + out.entropy.sum() if flags == "all" else out.sum()
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


# --------------------------------------------------------------------------- CLI


def format_table(entries: list[dict]) -> str:
    cols = ("kernel", "config", "target", "registers", "shared_memory", "spills", *COUNTED,
            "MEMBAR_GPU", "hgmma", "gates")
    rows = []
    for e in entries:
        failed = [k for k, v in e["gates"].items() if v is False]
        rows.append([e["kernel"], e["config"], e["target"], e["registers"], e["shared_memory"],
                     e["spills"], *(e[c] for c in COUNTED), e["MEMBAR_GPU"],
                     ",".join(e["hgmma_shapes"]) or "-",
                     "FAIL " + ",".join(failed) if failed else "ok"])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every gate passes, 1 when one fails, 2 on misuse."""
    parser = argparse.ArgumentParser(prog="python -m apo_kernels.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, help="compute capabilities (default 80 90)")
    parser.add_argument("--arch", dest="arch_opt", nargs="+", type=int, default=None)
    parser.add_argument("--modules", nargs="+", default=None,
                        help=f"kernel modules: names, dotted or .py paths (default: "
                             f"{' '.join(KERNEL_MODULES)})")
    parser.add_argument("--dump-dir", default=None, help="write cubins and compile.json here")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    parser.add_argument("--json", action="store_true", help="one JSON entry per line on stdout")
    parser.add_argument("--verify-launchers", action="store_true",
                        help="compare the launchers' own specialisation with the specs instead")
    args = parser.parse_args(argv)
    from .common import interpreter_active

    if interpreter_active():
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot compile)",
              file=sys.stderr)
        return 2
    if args.verify_launchers:
        problems = verify_launchers()
        print("\n".join(problems) if problems else "launchers match launch_specs()")
        return 1 if problems else 0
    archs = tuple(args.arch_opt or args.archs or ARCHS)
    start = time.perf_counter()
    entries = run_check(archs, tuple(args.modules or KERNEL_MODULES), args.dump_dir, args.jobs)
    elapsed = time.perf_counter() - start
    if args.json:
        for e in entries:
            print(json.dumps(e), flush=True)
    else:
        print(format_table(entries))
    failed = [e for e in entries if not e["passed"]]
    print(f"compile_check: {len(entries)} cubins for sm_{'/sm_'.join(map(str, archs))} in "
          f"{elapsed:.0f} s, {len(failed)} failing a gate", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
