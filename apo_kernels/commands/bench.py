"""``apo-kernels bench``: time and peak memory of linear_logprobs vs the ordinary way."""

from __future__ import annotations

import argparse

from .check import _shape


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time forward and forward+backward, and peak memory, against the ordinary way",
        description="Benchmark linear_logprobs against hidden @ weight.T, log_softmax, gather on "
                    "this device. Each measurement runs in its own subprocess so peak memory "
                    "(above the inputs) is its own. Defaults finish in about a minute on a "
                    "2-core CPU.")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="NxDxV",
                   help="default on CPU: 1024x128x8192 512x256x32000; on CUDA the lm_head shapes "
                        "of Qwen2.5-0.5B, Llama-3.2-1B and Llama-3-8B at N=16384")
    p.add_argument("--providers", nargs="+", default=None,
                   choices=["ours", "ours-torch", "ordinary"],
                   help="default: ours, ordinary (plus ours-torch on CUDA)")
    p.add_argument("--modes", nargs="+", default=["forward", "forward+backward"],
                   choices=["forward", "forward+backward"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (after a warm-up)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from ..benchmark import run_isolated, write_csv

    cuda = torch.cuda.is_available()
    shapes = args.shapes or ([(16384, 896, 151936), (16384, 2048, 128256), (16384, 4096, 128256)]
                             if cuda else [(1024, 128, 8192), (512, 256, 32000)])
    providers = args.providers or (["ours", "ours-torch", "ordinary"] if cuda else ["ours", "ordinary"])
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    jobs = [(s, m, p) for s in shapes for m in args.modes for p in providers]
    rows = [run_isolated(p, m, *s, dtype=dtype, reps=args.reps)
            for s, m, p in track(jobs, description="benchmarking", transient=True)]
    table = Table(title=f"linear_logprobs on {rows[0].device} ({dtype}; torch {rows[0].torch_version}, "
                        f"triton {rows[0].triton_version})")
    for col in ("N x D x V", "mode", "provider", "median ms", "p20-p80 ms", "peak MiB above inputs",
                "TFLOP/s", "vs ordinary"):
        table.add_column(col)
    ordinary = {(r.n, r.d, r.v, r.mode): r for r in rows if r.provider == "ordinary" and not r.error}
    for r in rows:
        if r.error:
            table.add_row(f"{r.n}x{r.d}x{r.v}", r.mode, r.provider, "-", "-", "-", "-", f"skipped: {r.error}")
            continue
        base = ordinary.get((r.n, r.d, r.v, r.mode))
        rel = (f"{base.median_ms / r.median_ms:.2f}x faster, {r.peak_mem_mib / max(base.peak_mem_mib, 1e-9):.2f}x mem"
               if base and r.provider != "ordinary" else "")
        table.add_row(f"{r.n}x{r.d}x{r.v}", r.mode, r.provider, f"{r.median_ms:.2f}",
                      f"{r.p20_ms:.2f}-{r.p80_ms:.2f}", f"{r.peak_mem_mib:.1f}", f"{r.tflops:.3f}", rel)
    Console().print(table)
    if args.csv:
        write_csv(rows, args.csv)
        Console().print(f"wrote {args.csv}")
    return 0
