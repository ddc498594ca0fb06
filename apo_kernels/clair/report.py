"""How contrastive a preference dataset is: how much ``chosen`` and ``rejected`` differ.

CLAIR pairs should be close (high token Jaccard, small normalised edit distance, small length
change); pairs from two independent samples ranked by a judge are usually far apart. Works on
any preference dataset, so the two kinds can be compared side by side.

Per pair:

- ``token_jaccard``: |A ∩ B| / |A ∪ B| over the sets of word and punctuation tokens (1 = same
  vocabulary);
- ``char_levenshtein``: character edit distance (rapidfuzz), and ``char_levenshtein_norm`` =
  distance / max(len) in [0, 1];
- ``token_levenshtein_norm``: the same over token sequences;
- ``length_change``: len(chosen) - len(rejected) in characters, and ``length_change_rel`` =
  that / len(rejected).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._optional import require
from .io import ClairInputError, read_records, response_text

_TOKEN = re.compile(r"\w+|[^\w\s]")
METRICS = ("token_jaccard", "char_levenshtein", "char_levenshtein_norm",
           "token_levenshtein_norm", "length_change", "length_change_rel")
# The ones worth a histogram (the others are on a scale that depends on answer length).
PLOTTED = ("token_jaccard", "char_levenshtein_norm", "length_change_rel")


def tokenize(text: str) -> list[str]:
    """Word and punctuation tokens (case kept: a case fix is an edit)."""
    return _TOKEN.findall(text)


def pair_metrics(chosen: str, rejected: str) -> dict[str, float]:
    """Contrastiveness metrics of one pair (see the module docstring)."""
    Levenshtein = require("rapidfuzz.distance", "clair",
                          what="the CLAIR contrastiveness report").Levenshtein

    tc, tr = tokenize(chosen), tokenize(rejected)
    sc, sr = set(tc), set(tr)
    union = sc | sr
    jaccard = len(sc & sr) / len(union) if union else 1.0
    lev = Levenshtein.distance(chosen, rejected)
    longest = max(len(chosen), len(rejected))
    tok_longest = max(len(tc), len(tr))
    return {
        "token_jaccard": jaccard,
        "char_levenshtein": float(lev),
        "char_levenshtein_norm": lev / longest if longest else 0.0,
        "token_levenshtein_norm": (Levenshtein.distance(tc, tr) / tok_longest
                                   if tok_longest else 0.0),
        "length_change": float(len(chosen) - len(rejected)),
        "length_change_rel": (len(chosen) - len(rejected)) / max(len(rejected), 1),
    }


def load_pairs(path: str | os.PathLike[str], *, split: str | None = None,
               chosen_field: str = "chosen",
               rejected_field: str = "rejected") -> list[tuple[str, str]]:
    """(chosen, rejected) texts from a preference file or datasets directory, in the
    plain-string or chat-messages form (the last assistant turn is the answer)."""
    records = read_records(path, split=split)
    pairs = []
    for i, r in enumerate(records):
        for f, arg in ((chosen_field, "--chosen-field"), (rejected_field, "--rejected-field")):
            if f not in r:
                raise ClairInputError(f"{path}: record {i} has no field {f!r} (set it with "
                                      f"{arg}); fields found: {sorted(r)}")
        c, rj = response_text(r[chosen_field]), response_text(r[rejected_field])
        if c is None or rj is None:
            raise ClairInputError(f"{path}: record {i}: chosen/rejected must be strings or chat "
                                  "messages with an assistant turn")
        pairs.append((c, rj))
    return pairs


def _summary(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {k: float("nan") for k in ("mean", "median", "p10", "p90", "min", "max")}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max())}


def contrastiveness_report(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Per-pair metrics and their aggregates (mean, median, p10, p90, min, max)."""
    per_pair = [{"index": i, **pair_metrics(c, r)} for i, (c, r) in enumerate(pairs)]
    return {
        "n_pairs": len(per_pair),
        "identical_fraction": (sum(c == r for c, r in pairs) / len(pairs)) if pairs else 0.0,
        "aggregate": {m: _summary([p[m] for p in per_pair]) for m in METRICS},
        "pairs": per_pair,
    }


CELL_LEGEND = ("each cell: mean | median [p10, p90], where p10 and p90 are the 10th and 90th "
               "percentiles over pairs")


def _fmt(value: float, integer: bool) -> str:
    if integer:
        return str(round(value)) if math.isfinite(value) else str(value)  # no "-0" for -0.4
    return f"{value:.3f}"


def print_report(reports: dict[str, dict[str, Any]], console: Any = None) -> None:
    """A rich table: one row per metric, ``mean | median [p10, p90]`` per dataset, with the
    cell layout spelled out under the table."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    # Text, not markup strings: rich would take "[p10, p90]" (or a label in brackets) for a
    # style tag and drop it.
    table = Table(title="Contrastiveness of chosen vs rejected", show_lines=False,
                  caption=Text(CELL_LEGEND), caption_justify="left")
    table.add_column("metric")
    for label, rep in reports.items():
        table.add_column(Text(f"{label} (n={rep['n_pairs']})\nmean | median [p10, p90]"),
                         justify="right")
    for m in METRICS:
        cells = []
        integer = m in ("char_levenshtein", "length_change")
        for rep in reports.values():
            s = rep["aggregate"][m]
            cells.append(Text(f"{_fmt(s['mean'], integer)} | {_fmt(s['median'], integer)} "
                              f"[{_fmt(s['p10'], integer)}, {_fmt(s['p90'], integer)}]"))
        table.add_row(m, *cells)
    table.add_row("identical pairs", *[f"{r['identical_fraction']:.1%}" for r in reports.values()])
    console.print(table)


def write_json(reports: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")


def histogram_figure(reports: dict[str, dict[str, Any]], metric: str, bins: int = 30) -> Any:
    """One metric's histogram, datasets overlaid, the legend above the axes (never over bars).
    Returns the matplotlib figure (close it when done)."""
    matplotlib = require("matplotlib", "clair", what="CLAIR histograms")
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for label, rep in reports.items():
        vals = [p[metric] for p in rep["pairs"]]
        if vals:
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{label} (n={len(vals)})")
    ax.set_xlabel(metric)
    ax.set_ylabel("pairs")
    ax.set_title(f"chosen vs rejected: {metric}")
    if ax.get_legend_handles_labels()[0]:
        # "outside": constrained layout makes room for it between the title and the axes.
        fig.legend(loc="outside upper center", ncols=min(3, len(reports)), frameon=False)
    return fig


def write_histograms(reports: dict[str, dict[str, Any]],
                     out_dir: str | os.PathLike[str], bins: int = 30) -> list[str]:
    """One PNG per plotted metric, datasets overlaid. Returns the paths written."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in PLOTTED:
        fig = histogram_figure(reports, m, bins)
        path = out / f"hist_{m}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths
