#!/usr/bin/env python
"""Plot a benchmark CSV: one PNG per (mode, logits), time and peak memory vs N, a line per provider.

    python benchmarks/plot.py benchmarks/results/cpu-x86_64-2core/bench.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="a CSV written by apo-kernels bench / run_suite.py")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = parser.parse_args(argv)

    from apo_kernels.bench.report import plot, read_csv

    written = plot(read_csv(args.csv), args.out or os.path.dirname(os.path.abspath(args.csv)))
    if not written:
        print("no successful rows to plot", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
