"""Rows for the tables (plain dicts), rendered as a rich table on a terminal or Markdown when
piped, and written as CSV. Every table is titled PREDICTION; assumptions go under it."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence

from .predict import Prediction

LABEL = "PREDICTION (cost model; nothing here was measured on a GPU)"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def summary_row(pred: Prediction, skip_for_floor: float | None, measured_ms: float | None = None,
                ) -> dict:
    p = pred.problem
    row = {
        "device": pred.rates.key, "model": p.name, "N": p.n, "D": p.d, "V": p.v,
        "softcap": "" if p.softcap is None else f"{p.softcap:g}", "strategy": pred.strategy,
        "skip": f"{p.skip:.2f}", "fwd ms": _ms(pred.forward_s), "bwd ms": _ms(pred.backward_s),
        "total ms": _ms(pred.total_s), "floor ms": _ms(pred.floor_s),
        "% of floor": f"{100 * pred.floor_fraction:.0f}%", "TFLOP/s (6NDV)": f"{pred.tflops:.0f}",
        "bound": pred.dominant,
        "skip for floor": "-" if skip_for_floor is None else f"{skip_for_floor:.2f}",
    }
    if measured_ms is not None:
        row["measured ms"] = "-" if math.isnan(measured_ms) else f"{measured_ms:.2f}"
    return row


def launch_rows(pred: Prediction) -> list[dict]:
    """One row per launch: counts (all ``count`` launches together) and predicted time."""
    out = []
    for t in pred.times:
        l = t.launch
        out.append({
            "device": pred.rates.key, "model": pred.problem.name, "strategy": pred.strategy,
            "skip": f"{pred.problem.skip:.2f}", "launch": l.name, "phase": l.phase,
            "engine": l.engine, "count": l.count, "grid": l.grid or "-",
            "TC GFLOP": f"{l.tc_flops * l.count / 1e9:.0f}",
            "HBM GB": f"{l.hbm_bytes * l.count / 1e9:.2f}",
            "atomics (M)": f"{l.atomics * l.count / 1e6:.0f}",
            "compute ms": _ms(t.compute_s), "memory ms": _ms(t.memory_s),
            "atomics ms": _ms(t.atomics_s), "stall ms": _ms(t.stall_s), "ms": _ms(t.total_s),
            "bound": t.bound, "L2 assumption": l.l2,
        })
    return out


def csv_rows(pred: Prediction, skip_for_floor: float | None) -> list[dict]:
    """Machine-readable rows: one per launch (level=launch) and one total (level=total)."""
    p, r = pred.problem, pred.rates
    base = {"label": "PREDICTION", "device": r.key, "model": p.name, "n": p.n, "d": p.d, "v": p.v,
            "softcap": p.softcap or "", "strategy": pred.strategy, "skip": p.skip}
    rows = []
    for t in pred.times:
        l = t.launch
        rows.append({**base, "level": "launch", "launch": l.name, "phase": l.phase,
                     "engine": l.engine, "count": l.count, "grid": l.grid,
                     "tc_flops": l.tc_flops * l.count, "hbm_bytes": l.hbm_bytes * l.count,
                     "atomics": l.atomics * l.count, "compute_ms": t.compute_s * 1e3,
                     "memory_ms": t.memory_s * 1e3, "atomics_ms": t.atomics_s * 1e3,
                     "stall_ms": t.stall_s * 1e3, "ms": t.total_s * 1e3, "bound": t.bound,
                     "l2": l.l2})
    tot = pred.totals()
    rows.append({**base, "level": "total", "launch": "", "phase": "forward+backward",
                 "engine": "", "count": tot["launches"], "grid": "",
                 "tc_flops": tot["tc_flops"], "hbm_bytes": tot["hbm_bytes"],
                 "atomics": tot["atomics"], "ms": pred.total_s * 1e3,
                 "forward_ms": pred.forward_s * 1e3, "backward_ms": pred.backward_s * 1e3,
                 "floor_ms": pred.floor_s * 1e3, "floor_fraction": pred.floor_fraction,
                 "bound": pred.dominant,
                 "skip_for_floor": "" if skip_for_floor is None else skip_for_floor})
    return rows


CSV_COLUMNS = ["label", "level", "device", "model", "n", "d", "v", "softcap", "strategy", "skip",
               "launch", "phase", "engine", "count", "grid", "tc_flops", "hbm_bytes", "atomics",
               "compute_ms", "memory_ms", "atomics_ms", "stall_ms", "ms", "forward_ms",
               "backward_ms", "floor_ms", "floor_fraction", "skip_for_floor", "bound", "l2"]


def write_csv(path: str, rows: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def markdown(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    out = [f"**{title}**", "", "| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def rich_table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None):
    from rich.table import Table

    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    return table


def pivot(rows: Sequence[dict], strategies: Sequence[str]) -> list[dict]:
    """Compact form: one line per (device, model, skip), one column per strategy,
    'total ms (% of floor)'."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        key = (r["device"], r["model"], r["N"], r["D"], r["V"], r["skip"])
        line = lines.setdefault(key, {"device": r["device"],
                                      "model (N x D x V)": f"{r['model']} ({r['N']}x{r['D']}x{r['V']})",
                                      "skip": r["skip"], "floor ms": r["floor ms"]})
        line[r["strategy"]] = f"{r['total ms']} ({r['% of floor']})"
    return [{**line, **{s: line.get(s, "-") for s in strategies}} for line in lines.values()]
