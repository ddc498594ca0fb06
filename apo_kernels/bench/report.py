"""Benchmark CSVs: write, read, the README table (markdown) and the plots (matplotlib)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence

from .specs import BenchRow

NUMERIC = {"n", "d", "v", "reps", "median_ms", "p20_ms", "p80_ms", "flops", "tflops", "gemm_tflops",
           "pct_of_gemm", "input_mib", "peak_above_inputs_mib", "peak_total_mib", "mem_floor_mib",
           "mem_vs_floor", "max_abs_err"}


def write_csv(rows: Iterable[BenchRow], path: str) -> None:
    """Write rows (all columns of :class:`BenchRow`, in order) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BenchRow.columns())
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_csv())
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def read_csv(path: str) -> list[dict]:
    """Rows as dicts, numeric columns as float/int (empty or 'nan' -> nan)."""
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict = dict(raw)
            for key in NUMERIC & row.keys():
                text = row[key]
                val = float(text) if text not in ("", None) else math.nan
                row[key] = int(val) if key in ("n", "d", "v", "reps") and not math.isnan(val) else val
            out.append(row)
    if not out:
        raise ValueError(f"{path} has no rows")
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(rows: Sequence[dict], *, mode: str | None = None, n: int | None = None,
                   logits: str | None = "peaked", baseline: str = "ordinary",
                   include_skipped: bool = False) -> str:
    """A markdown table: one line per (head, N, mode, provider), speed and memory vs ``baseline``."""
    sel = [r for r in rows if (mode is None or r["mode"] == mode) and (n is None or r["n"] == n)
           and (logits is None or r["logits"] == logits)]
    if not include_skipped:
        sel = [r for r in sel if r["status"] != "skipped"]
    base = {(r["head"], r["n"], r["d"], r["v"], r["mode"], r["logits"]): r for r in sel
            if r["provider"] == baseline and r["status"] == "ok"}
    lines = ["| head (N x D x V) | mode | logits | provider | median ms (p20-p80) | TFLOP/s | % of GEMM "
             f"| peak MiB | x floor | vs {baseline}: speed-up, memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        shape = f"{r['head']} ({r['n']}x{r['d']}x{r['v']})"
        if r["status"] != "ok":
            lines.append(f"| {shape} | {r['mode']} | {r['logits']} | {r['provider']} | "
                         f"{r['status']}: {r['error']} | | | | | |")
            continue
        b = base.get((r["head"], r["n"], r["d"], r["v"], r["mode"], r["logits"]))
        rel = ""
        if b is not None and r["provider"] != baseline:
            rel = (f"{b['median_ms'] / r['median_ms']:.2f}x, "
                   f"{r['peak_total_mib'] / b['peak_total_mib']:.2f}x")
        lines.append(
            f"| {shape} | {r['mode']} | {r['logits']} | {r['provider']} | {_fmt(r['median_ms'])} "
            f"({_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])}) | {_fmt(r['tflops'], 3)} | "
            f"{_fmt(r['pct_of_gemm'], 1)} | {_fmt(r['peak_total_mib'], 1)} | "
            f"{_fmt(r['mem_vs_floor'])} | {rel} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], out_dir: str) -> list[str]:
    """One PNG per (mode, logits): a row of panels per head, time and peak memory vs N, one line
    per provider. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for mode in dict.fromkeys(r["mode"] for r in ok):
        for kind in dict.fromkeys(r["logits"] for r in ok if r["mode"] == mode):
            sel = [r for r in ok if r["mode"] == mode and r["logits"] == kind]
            heads = list(dict.fromkeys((r["head"], r["d"], r["v"]) for r in sel))
            fig, axes = plt.subplots(len(heads), 2, figsize=(11, 3.2 * len(heads)), squeeze=False)
            for (head, d, v), (ax_t, ax_m) in zip(heads, axes):
                hs = [r for r in sel if (r["head"], r["d"], r["v"]) == (head, d, v)]
                for prov in dict.fromkeys(r["provider"] for r in hs):
                    pts = sorted((r["n"], r["median_ms"], r["peak_total_mib"]) for r in hs
                                 if r["provider"] == prov)
                    xs = [p[0] for p in pts]
                    ax_t.plot(xs, [p[1] for p in pts], marker="o", label=prov)
                    ax_m.plot(xs, [p[2] for p in pts], marker="o", label=prov)
                floor = sorted({(r["n"], r["mem_floor_mib"]) for r in hs})
                ax_m.plot([f[0] for f in floor], [f[1] for f in floor], "k--", label="floor")
                for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xlabel("tokens N")
                    ax.set_ylabel(label)
                    ax.set_title(f"{head}: D={d}, V={v}", fontsize=9)
                    ax.grid(True, which="both", alpha=0.3)
                ax_m.legend(fontsize=7)
            fig.suptitle(f"{mode}, {kind} logits, {sel[0]['dtype']} on {sel[0]['device']}", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{mode.replace('+', '_')}_{kind}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written
