#!/usr/bin/env python
"""Run the whole op-level benchmark suite on this device and write CSV, plots and table.

    python benchmarks/run_suite.py                       # -> benchmarks/results/<device>/
    python benchmarks/run_suite.py --budget-s 360 --out $OUT   # on a lent GPU (gpu_one_call.sh)

Everything after the known options is passed on to ``apo-kernels bench`` (e.g. ``--tokens 256``,
``--providers ours ordinary``, ``--reps 3``). Writes ``bench.csv`` (one row per provider x
shape x mode x logits), ``bench.md`` (the README table) and, unless ``--no-plots``,
``<mode>_<logits>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: results/<device slug>)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of the sweep")
    parser.add_argument("--no-plots", action="store_true", help="CSV and table only")
    args, rest = parser.parse_known_args(argv)

    from apo_kernels.bench.env import device_slug
    from apo_kernels.bench.runner import probe
    from apo_kernels.cli import main as cli

    out = args.out
    if out is None:  # the slug needs the device, which only a worker looks at
        out = os.path.join(HERE, "results", device_slug(probe("float32").env))
    os.makedirs(out, exist_ok=True)
    cmd = ["bench", "--suite", "--csv", os.path.join(out, "bench.csv"),
           "--markdown", os.path.join(out, "bench.md")]
    if not args.no_plots:
        cmd += ["--plots", out]
    if args.budget_s is not None:
        cmd += ["--budget-s", str(args.budget_s)]
    return cli(cmd + rest)


if __name__ == "__main__":
    sys.exit(main())
