"""``apo-kernels tune``: pick ``backend="auto"``'s strategy per shape on this GPU ahead of time."""

from __future__ import annotations

import argparse

from .check import _shape  # the NxDxV parser `check` and `bench` use

DEFAULT_SHAPES = ["4096x896x151936", "8192x896x151936", "4096x2048x128256", "4096x4096x128256"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="time the fused kernels against the chunked strategy on this GPU and cache the choice",
        description="For each NxDxV shape and dtype: run the kernels' first-use self-check on this "
                    "device, time the fused Triton kernels and the chunked torch strategy (forward + "
                    "backward), store the faster in the autotune cache ($APO_KERNELS_CACHE_DIR/"
                    "autotune.json, default ~/.cache/apo_kernels/autotune.json) and print the "
                    "choice. On CPU backend='auto' is always 'torch' (nothing to time).")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None, metavar="NxDxV",
                   help=f"tokens x hidden x vocab (default: {' '.join(DEFAULT_SHAPES)}); N is "
                        "bucketed to the next power of two")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..ops import autotune

    shapes = args.shapes or [_shape(s) for s in DEFAULT_SHAPES]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"autotune cache: {autotune.cache_path()}")
    if device.type != "cuda":
        print("no CUDA device: backend='auto' is 'torch' (the chunked strategy) here, nothing to time")
    rows = autotune.tune(shapes, dtypes, device)
    print(f"{'device':<28}{'dtype':<10}{'N':>7}{'D':>6}{'V':>8}  {'auto ->':<8} timings")
    for r in rows:
        secs = r["seconds"] or {}
        timing = ", ".join(f"{k} {v * 1e3:.2f} ms" if v is not None else f"{k} failed" for k, v in secs.items())
        print(f"{r['device'][:27]:<28}{r['dtype']:<10}{r['n']:>7}{r['d']:>6}{r['v']:>8}  {r['backend']:<8} {timing}")
    return 0
