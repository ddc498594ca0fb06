"""``apo-kernels bench``: time, peak memory and TFLOP/s of ours against every alternative."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .check import _shape

QUICK_CPU_PROVIDERS = ["ours", "ours-torch", "ordinary"]
QUICK_CPU_MODES = ["forward", "forward+backward"]


def register(subparsers) -> None:
    from ..bench.providers import PROVIDERS
    from ..bench.specs import HEADS, LOGITS, MODES

    p = subparsers.add_parser(
        "bench", help="time, peak memory and TFLOP/s against the ordinary way, TRL, Liger, CCE",
        description="Benchmark linear_logprobs and the fused preference loss against the ordinary "
                    "way (eager and torch.compile), TRL's chunked log-prob function, Liger-Kernel "
                    "and cut-cross-entropy on this device. Each measurement runs in a subprocess "
                    "so peak memory (above the inputs) is its own; providers that cannot run here "
                    "are listed with the reason. Without options it finishes in about a minute on "
                    "a 2-core CPU; --suite runs the whole sweep for this device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", action="store_true",
                   help="the whole sweep: every head x N, every provider and mode, peaked and "
                        "flat logits (CPU: heads scaled down, N 256-1024; GPU: N 4k-32k)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="NxDxV",
                   help="custom shapes (default on CPU: 1024x128x8192 512x256x32000)")
    p.add_argument("--heads", nargs="+", default=None, choices=list(HEADS),
                   help="lm_head shapes of real models (scaled D/4, V/16 on CPU unless --full-size)")
    p.add_argument("--full-size", action="store_true", help="real head sizes on CPU too")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="N values for --heads/--suite (default: 4096-32768 on GPU, 256-1024 on CPU; "
                        "with --heads on GPU alone: 16384)")
    p.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                   help="default: every provider on CUDA or with --suite; ours, ours-torch, "
                        "ordinary on CPU")
    p.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                   help="default: all on CUDA or with --suite; forward, forward+backward on CPU")
    p.add_argument("--logits", nargs="+", default=None, choices=list(LOGITS),
                   help="peaked (trained-model-like) and/or flat (random) logits; default peaked "
                        "(both with --suite)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (after a warm-up)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting measurements after this many seconds (the rest: skipped)")
    p.add_argument("--timeout-s", type=float, default=900, help="limit for one measurement")
    p.add_argument("--isolate", default="auto", choices=["auto", "process", "batch", "shared"],
                   help="process: one subprocess per measurement (CPU default; peak RSS is per "
                        "process); batch: one per provider's consecutive shapes (GPU default); "
                        "shared: one for everything (quickest start, for smoke tests)")
    p.add_argument("--csv", default=None, help="write the rows to this CSV (rewritten after each row)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots here (needs matplotlib: the bench extra)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown table here")
    p.add_argument("--quiet", action="store_true", help="no table, only progress lines")
    p.set_defaults(func=run)


def _specs(args: argparse.Namespace, cuda: bool):
    from ..bench.specs import HEADS, MODES, scaled_heads
    from ..bench.suite import QUICK_CPU_SHAPES, TARGET_TOKENS, build_specs

    quick = not (args.suite or args.shapes or args.heads)
    heads = None
    if args.heads or (args.suite and args.full_size):
        names = args.heads or list(HEADS)
        full = cuda or args.full_size
        heads = {k: HEADS[k] for k in names} if full else scaled_heads(names=names)
    tokens = args.tokens
    if tokens is None and (args.heads or quick) and cuda:
        tokens = [TARGET_TOKENS]
    small = not (cuda or args.suite)  # a CPU run that is not the suite: keep it about a minute
    providers = args.providers or (QUICK_CPU_PROVIDERS if small else None)
    modes = args.modes or (QUICK_CPU_MODES if small else list(MODES))
    logits = args.logits or (["peaked", "flat"] if args.suite else ["peaked"])
    shapes = args.shapes or (QUICK_CPU_SHAPES if quick and not cuda else None)
    return build_specs(cuda=cuda, heads=heads, shapes=shapes, tokens=tokens, providers=providers,
                       modes=modes, logits=logits, dtype=args.dtype, reps=args.reps)


def _print_table(rows, console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("head (N x D x V)", "mode", "logits", "provider", "median ms", "p20-p80", "TFLOP/s",
                "% GEMM", "peak MiB", "x floor", "vs ordinary: speed-up, memory"):
        table.add_column(col)
    key = lambda r: (r.head, r.n, r.d, r.v, r.mode, r.logits)
    base = {key(r): r for r in rows if r.provider == "ordinary" and r.status == "ok"}
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.status != "ok":
            skipped.setdefault((r.provider, f"{r.status}: {r.error}"), []).append(r.mode)
            continue
        b = base.get(key(r))
        rel = (f"{b.median_ms / r.median_ms:.2f}x, {r.peak_total_mib / b.peak_total_mib:.2f}x"
               if b and r.provider != "ordinary" else "")
        table.add_row(f"{r.head} ({r.n}x{r.d}x{r.v})", r.mode, r.logits, r.provider,
                      f"{r.median_ms:.2f}", f"{r.p20_ms:.2f}-{r.p80_ms:.2f}", f"{r.tflops:.3f}",
                      f"{r.pct_of_gemm:.1f}", f"{r.peak_total_mib:.1f}", f"{r.mem_vs_floor:.2f}", rel)
    console.print(table)
    for (prov, reason), modes in skipped.items():
        console.print(f"[yellow]{prov}[/yellow] ({', '.join(dict.fromkeys(modes))}) {reason}")


def _argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, found before the first measurement (a suite takes an
    hour; failing at its end over an argument wastes it), or None."""
    if args.reps < 1:
        return f"--reps must be >= 1, got {args.reps}"
    if args.tokens is not None and min(args.tokens) < 1:
        return f"--tokens must be positive, got {args.tokens}"
    for flag, value in (("--budget-s", args.budget_s), ("--timeout-s", args.timeout_s)):
        if value is not None and not value > 0:
            return f"{flag} must be > 0, got {value}"
    for flag, path in (("--csv", args.csv), ("--markdown", args.markdown)):
        if path and os.path.isdir(path):
            return f"{flag} {path} is a directory; give a file name"
    if args.plots:
        if os.path.exists(args.plots) and not os.path.isdir(args.plots):
            return f"--plots {args.plots} is a file; give a directory"
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            return "--plots needs matplotlib: pip install 'apo-kernels[bench]'"
    return None


def _report_rows(rows, csv_path: str | None) -> list[dict]:
    """Rows as the report functions take them (dicts, numbers parsed), through the CSV: the
    user's, or a temporary one when --plots/--markdown come without --csv."""
    import tempfile

    from ..bench.report import read_csv, write_csv

    if csv_path:
        return read_csv(csv_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.csv")
        write_csv(rows, path)
        return read_csv(path)


def _print_markdown(rows, title: str) -> None:
    """The table as plain Markdown, for a pipe or a file: rich would cut every cell to fit 80
    columns there."""
    from ..bench.report import markdown_table

    print(f"{title}\n")
    print(markdown_table(_report_rows(rows, None), logits=None), end="")
    reasons = {}
    for r in rows:
        if r.status != "ok":
            reasons.setdefault((r.provider, f"{r.status}: {r.error}"), []).append(r.mode)
    for (prov, reason), modes in reasons.items():
        print(f"\n- {prov} ({', '.join(dict.fromkeys(modes))}) {reason}", end="")
    print()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from ..bench.report import markdown_table, plot, write_csv
    from ..bench.runner import probe, run_specs

    # Progress lines are not wrapped at 80 columns when piped (soft_wrap).
    console = Console(soft_wrap=not sys.stdout.isatty())
    problem = _argument_error(args)
    if problem:
        console.print(f"[red]error:[/red] {escape(problem)}", highlight=False)
        return 2
    t0 = time.monotonic()
    default_dtype = args.dtype or "float32"
    info = probe(default_dtype)  # in a worker: this process never touches the GPU
    env = info.env
    try:
        specs = _specs(args, env["device_kind"] == "cuda")
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    console.print(f"{env['device']}: {info.gemm_dtype} GEMM {info.gemm_tflops:.3f} TFLOP/s; "
                  f"torch {env['torch']}, triton {env['triton']}, trl {env['trl']}, "
                  f"liger-kernel {env['liger-kernel']}, cut-cross-entropy {env['cut-cross-entropy']}; "
                  f"{len(specs)} measurements")
    rows = []
    reasons_shown: set[tuple[str, str]] = set()

    def on_row(row) -> None:
        rows.append(row)
        if args.csv:
            write_csv(rows, args.csv)
        if row.status == "skipped":  # each reason once: a suite skips hundreds of rows alike
            if (row.provider, row.error) in reasons_shown:
                return
            reasons_shown.add((row.provider, row.error))
        what = (f"{row.median_ms:9.2f} ms {row.peak_total_mib:9.1f} MiB" if row.status == "ok"
                else f"{row.status}: {row.error}")
        console.print(escape(f"[{len(rows):3d}/{len(specs)}] {row.provider:16s} {row.mode:16s} "
                             f"{row.head} {row.n}x{row.d}x{row.v} {row.logits}: {what}"),
                      highlight=False)

    rows_done = run_specs(specs, info, isolate=args.isolate, timeout_s=args.timeout_s,
                          budget_s=args.budget_s, on_row=on_row)
    if args.csv:
        write_csv(rows_done, args.csv)  # in spec order
        console.print(f"wrote {args.csv}")
    if not args.quiet:
        title = f"{env['device']} ({rows_done[0].dtype}); GEMM {info.gemm_tflops:.3f} TFLOP/s"
        if console.is_terminal:
            _print_table(rows_done, console, title)
        else:
            _print_markdown(rows_done, title)
    if args.plots or args.markdown:
        data = _report_rows(rows_done, args.csv)
        if args.plots:
            for path in plot(data, args.plots):
                console.print(f"wrote {path}")
        if args.markdown:
            os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(markdown_table(data, logits=None))
            console.print(f"wrote {args.markdown}")
    console.print(f"done in {time.monotonic() - t0:.0f} s")
    return 0 if any(r.status == "ok" for r in rows_done) else 1
