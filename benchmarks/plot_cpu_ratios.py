"""Bar charts of the side-by-side CPU runs: speed and peak memory relative to the ordinary way.

``python benchmarks/plot_cpu_ratios.py`` reads ``benchmarks/results/cpu-chunked/cpu_chunked.csv``
(``benchmarks/cpu_chunked.py``) and ``benchmarks/results/cpu-preference/cpu-x86_64-2core.csv``
(``benchmarks/cpu_preference.py``) and writes ``ratios.png`` beside each. The ratios are the
medians of per-round ratios the scripts measured interleaved (A, B, A, B, ...), not ratios of
medians, so they survive a noisy shared machine.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _bars(ax, labels: list[str], values: list[float], title: str, target: float | None) -> None:
    ax.barh(labels, values, color=["#4c72b0" if v >= (target or 0) else "#c44e52" for v in values])
    ax.axvline(1.0, color="black", lw=0.8)
    if target is not None:
        ax.axvline(target, color="grey", ls="--", lw=0.8, label=f"target {target:g}x")
        ax.legend(loc="lower right", fontsize=8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()


def plot_chunked(csv_path: Path, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(csv_path) if r["provider"] != "ordinary"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6))
    for col, mode in enumerate(("forward", "forward+backward")):
        sel = [r for r in rows if r["mode"] == mode]
        names = [r["provider"] for r in sel]
        _bars(axes[0][col], names, [float(r["speed_vs_ordinary"]) for r in sel],
              f"{mode}: speed vs ordinary (higher is better)", 1.0 if mode == "forward" else 0.85)
        _bars(axes[1][col], names, [float(r["mem_vs_ordinary"]) for r in sel],
              f"{mode}: peak memory vs ordinary (lower is better)", None)
    r0 = rows[0]
    fig.suptitle(f"linear_logprobs, N={r0['n']} D={r0['d']} V={r0['v']} {r0['dtype']}, "
                 f"{r0['device']}, torch {r0['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_preference(csv_path: Path, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(csv_path) if r["provider"] != "ordinary"]
    names = [r["provider"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    _bars(axes[0], names, [float(r["speedup_vs_ordinary"]) for r in rows],
          "speed vs ordinary (higher is better)", 1.2)
    _bars(axes[1], names, [float(r["speedup_vs_liger"]) for r in rows],
          "speed vs Liger DPO loss (higher is better)", 1.1)
    _bars(axes[2], names, [float(r["mem_vs_ordinary"]) for r in rows],
          "peak memory vs ordinary (lower is better)", None)
    r0 = rows[0]
    fig.suptitle(f"preference step ({r0['pairs']} pairs x {r0['seq']} tokens, D={r0['d']} "
                 f"V={r0['v']} {r0['dtype']}), {r0['device']}, torch {r0['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunked", type=Path, default=RESULTS / "cpu-chunked" / "cpu_chunked.csv")
    parser.add_argument("--preference", type=Path,
                        default=RESULTS / "cpu-preference" / "cpu-x86_64-2core.csv")
    args = parser.parse_args()
    plot_chunked(args.chunked, args.chunked.with_name("ratios.png"))
    plot_preference(args.preference, args.preference.with_name("ratios.png"))


if __name__ == "__main__":
    main()
