#!/usr/bin/env python
"""Turn a benchmark CSV into the README's markdown table.

    python benchmarks/to_markdown.py results/cpu-x86_64-2core/bench.csv --n 1024 --logits peaked
    python benchmarks/to_markdown.py bench.csv --mode forward+backward --out table.md

Columns: median time (20th-80th percentile), achieved TFLOP/s (2NDV forward, 6NDV
forward+backward, 8NDV preference step), percent of the matmul rate measured in the same run,
peak memory (inputs + peak above them), that peak over the floor (inputs + their gradients),
and time and memory relative to the ordinary way. Skipped and failed rows are left out unless
``--skipped`` (then they show their reason).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--mode", default=None, help="only this mode")
    parser.add_argument("--n", type=int, default=None, help="only this number of tokens")
    parser.add_argument("--logits", default="peaked", help="peaked, flat or all")
    parser.add_argument("--baseline", default="ordinary", help="provider the last column compares with")
    parser.add_argument("--skipped", action="store_true", help="also list skipped/failed rows")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)

    from apo_kernels.bench.report import markdown_table, read_csv

    rows = read_csv(args.csv)
    ok = [r for r in rows if r["status"] == "ok"]
    first = ok[0] if ok else rows[0]
    header = (f"Device: {first['device']}; {first['dtype']}; torch {first['torch_version']}, "
              f"triton {first['triton_version']}, trl {first['trl_version']}, liger-kernel "
              f"{first['liger_version']}, cut-cross-entropy {first['cce_version']}; "
              f"GEMM rate {first['gemm_tflops']:.3f} TFLOP/s.\n\n")
    table = header + markdown_table(rows, mode=args.mode, n=args.n,
                                    logits=None if args.logits == "all" else args.logits,
                                    baseline=args.baseline, include_skipped=args.skipped)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
