"""``apo-kernels check``: verify values and every gradient against float64, print a table."""

from __future__ import annotations

import argparse
import os
import sys


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like NxDxV (e.g. 37x48x509), got {text!r}") from None
    if min(n, d, v) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, d, v


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="verify values and gradients of each backend against float64",
        description="Compare linear_logprobs (log-probs, entropy, dH, dW, dbias) of every backend "
                    "available here with a float64 reference, by the rule |ours - oracle| <= "
                    "|same-dtype torch - oracle| + tol. Exit code 1 on any failure.")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="NxDxV",
                   help="token x hidden x vocab sizes (default: 37x48x509 200x64x1000 on CPU; "
                        "256x512x32000 4096x2048x128256 on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                   help="input dtypes (default: all three)")
    p.add_argument("--backends", nargs="+", default=None, choices=["torch", "triton"],
                   help="backends to check (default: every one available here; on CPU triton "
                        "runs under its interpreter)")
    p.add_argument("--softcap", type=float, default=None, help="tanh softcap (e.g. 30 for Gemma 2)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logit-scale", type=float, default=1.0)
    p.add_argument("--bias", action="store_true", help="include an LM-head bias")
    p.add_argument("--flat", action="store_true",
                   help="random (flat) logits instead of peaked ones like a trained model's")
    p.add_argument("--exact", action="store_true", help="disable gradient filtering")
    p.add_argument("--deterministic", action="store_true", help="deterministic backward")
    p.add_argument("--ignore-frac", type=float, default=0.2, help="fraction of ignored tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-preference", action="store_true",
                   help="skip the check of the fused preference loss (APO-zero, APO-down, DPO, IPO)")
    p.add_argument("--compile", action="store_true",
                   help="also compile every kernel variant the launchers can pick for sm_80 and "
                        "sm_90 (no GPU needed) and gate the SASS: tensor-core MMA, pipelined "
                        "loads, no spills, no fenced atomics (docs/compile_check.md)")
    p.add_argument("--dump-dir", default=None, metavar="DIR",
                   help="with --compile: write each cubin as DIR/<kernel>.<config>.sm<cc>.cubin "
                        "and the manifest DIR/compile.json")
    p.add_argument("--compile-arch", type=int, nargs="+", default=None, metavar="CC",
                   help="with --compile: compute capabilities (default: 80 90)")
    p.add_argument("--compile-modules", nargs="+", default=None, metavar="MODULE",
                   help="with --compile: kernel modules to build (default: every kernel module)")
    p.set_defaults(func=run)


def prepare_interpreter() -> None:
    """Without CUDA, Triton kernels run only through Triton's CPU interpreter, which must be
    switched on before triton is imported: the CLI calls this first thing for ``check``."""
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _rerun_interpreted(argv: list[str]) -> int:
    """Run ``check`` again in a fresh interpreter with ``TRITON_INTERPRET=1``: this process
    imported triton for the compiler (e.g. ``main`` called from a program that had imported it),
    and triton cannot be switched to its interpreter afterwards."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "apo_kernels.cli", *argv], env=env).returncode


def run(args: argparse.Namespace) -> int:
    import warnings

    import torch

    cuda = torch.cuda.is_available()
    backends = args.backends or ["torch", "triton"]
    if "triton" in backends and not cuda:
        prepare_interpreter()
        from ..ops.backend import triton_available

        if triton_available():
            from ..kernels.common import interpreter_active

            if not interpreter_active():
                return _rerun_interpreted(getattr(args, "argv", None) or ["check"])
        elif args.backends:
            print("apo-kernels check: --backends triton needs the triton package (Linux)",
                  file=sys.stderr)
            return 2
        else:
            backends = [b for b in backends if b != "triton"]  # no triton package: torch only
    # The interpreter evaluates masked-off lanes too (log(0), 0 * inf there, discarded after):
    # numpy's warnings about them say nothing about the results.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    from rich.console import Console
    from rich.table import Table

    from ..verify import check_linear_logprobs

    device = torch.device("cuda" if cuda else "cpu")
    shapes = args.shapes or ([(256, 512, 32000), (4096, 2048, 128256)] if cuda
                             else [(37, 48, 509), (200, 64, 1000)])
    dtypes = [getattr(torch, d) for d in (args.dtypes or ["float32", "float16", "bfloat16"])]
    table = Table(title=f"linear_logprobs vs float64 on {torch.cuda.get_device_name() if cuda else 'CPU'}")
    for col in ("backend", "dtype", "N x D x V", "quantity", "max |err|", "worst err - bound", "result"):
        table.add_column(col, justify="right" if "err" in col else "left")
    failures = 0
    for backend in backends:
        for dtype in dtypes:
            for shape in shapes:
                rows = check_linear_logprobs(
                    *shape, dtype=dtype, backend=backend, device=device, softcap=args.softcap,
                    temperature=args.temperature, logit_scale=args.logit_scale, bias=args.bias,
                    peaked=not args.flat, filter_eps=None if args.exact else "auto",
                    deterministic=args.deterministic, ignore_frac=args.ignore_frac, seed=args.seed)
                for r in rows:
                    failures += not r.passed
                    table.add_row(backend, str(dtype).removeprefix("torch."), "x".join(map(str, shape)),
                                  r.name, f"{r.max_error:.2e}", f"{r.max_excess:+.2e}",
                                  "[green]pass[/]" if r.passed else f"[red]FAIL[/] {r.detail}")
    console = Console()
    console.print(table)
    if not args.no_preference:
        failures += _preference_report(console, backends, dtypes, device, args.seed)
    if args.compile:
        failures += _compile_report(console, args.dump_dir, args.compile_arch, args.compile_modules)
    console.print("[green]all checks passed[/]" if not failures else f"[red]{failures} check(s) failed[/]")
    return 1 if failures else 0


def _compile_report(console, dump_dir: str | None = None, archs: list[int] | None = None,
                    modules: list[str] | None = None) -> int:
    """Compile in a subprocess: kernels imported under the interpreter cannot compile."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "apo_kernels.kernels.compile_check", "--json"]
    if dump_dir:
        cmd += ["--dump-dir", dump_dir]
    if archs:
        cmd += ["--arch", *map(str, archs)]
    if modules:
        cmd += ["--modules", *modules]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    entries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 1) or not entries:
        console.print(f"[red]compile check failed[/]\n{proc.stderr[-2000:]}")
        return 1
    from rich.table import Table

    table = Table(title="kernel variants compiled as the launcher would (no GPU needed): SASS")
    counted = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "ATOMG", "REDG", "MEMBAR")
    for col in ("kernel", "config", "sm", "regs", "smem KiB", "spills", *counted, "MEMBAR.GPU",
                "wgmma", "gates"):
        table.add_column(col)
    failures = 0
    for e in entries:
        failed = [k for k, v in e["gates"].items() if v is False]
        failures += bool(failed)
        table.add_row(e["kernel"], e["config"], e["target"].removeprefix("sm_"),
                      str(e["registers"]), f"{e['shared_memory'] / 1024:.0f}",
                      f"[red]{e['spills']}[/]" if e["spills"] else "0",
                      *(str(e[c]) for c in counted), str(e["MEMBAR_GPU"]),
                      ",".join(e["hgmma_shapes"]) or "-",
                      f"[red]FAIL {','.join(failed)}[/]" if failed else "[green]pass[/]")
    console.print(table)
    console.print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
    if dump_dir:
        console.print(f"cubins and compile.json written to {dump_dir}")
    return failures


def _preference_report(console, backends, dtypes, device, seed) -> int:
    """The fused preference loss (loss, dH, dW, dbias) against float64 with full logits."""
    from rich.table import Table

    from .check_preference import check_preference

    table = Table(title="fused preference loss vs float64 (full logits, log_softmax, gather, sum, formula)")
    for col in ("backend", "loss / dtype / quantity", "max |err|", "allowed", "result"):
        table.add_column(col)
    failures = 0
    for backend in backends:
        for row in check_preference(device=device, dtypes=dtypes, backend=backend, seed=seed):
            failures += not row["passed"]
            table.add_row(backend, row["name"], f"{row['max_abs_err']:.2e}", f"{row['tol']:.2e}",
                          "[green]pass[/]" if row["passed"] else "[red]FAIL[/]")
    console.print(table)
    return failures
