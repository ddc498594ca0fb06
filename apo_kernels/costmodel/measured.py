"""Measurements beside predictions: read a ``benchmarks/gpu_one_call.sh`` ``bench.csv``.

A row matches a prediction when its GPU (the ``device`` column names an H100 or H200), N, D, V
and mode agree and its status is ``ok``. Providers map to strategies: ``ordinary`` ->
``ordinary``, ``ours`` -> the strategy the library ran (``--ours-is``, default ``fused-atomic``);
other providers (trl, liger-flce, cce, ...) are shown as they are, with no prediction.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

from .rates import DEVICES

MODES = ("forward", "forward+backward", "preference")


@dataclass(frozen=True)
class Measurement:
    device: str  # a key of DEVICES
    provider: str
    mode: str
    n: int
    d: int
    v: int
    ms: float
    peak_mib: float
    gemm_tflops: float
    source: str  # the device string of the CSV


def device_key(name: str) -> str | None:
    """``h100`` / ``h200`` from an SXM GPU's name such as ``NVIDIA H100 80GB HBM3``, else None."""
    low = name.lower()
    if "pcie" in low or "nvl" in low:  # other clocks, SM counts and memory: not the SXM rates
        return None
    for key in DEVICES:
        if key in low:
            return key
    return None


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_measurements(path: str) -> tuple[list[Measurement], list[str]]:
    """``(measurements, notes)``: the ok rows on a known GPU, and why other rows were left out."""
    rows: list[Measurement] = []
    skipped: dict[str, int] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"device", "provider", "mode", "n", "d", "v", "status", "median_ms"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a bench.csv (missing columns {sorted(missing)})")
        for raw in reader:
            key = device_key(raw["device"])
            if raw["status"] != "ok":
                continue
            if key is None:
                skipped[raw["device"]] = skipped.get(raw["device"], 0) + 1
                continue
            rows.append(Measurement(
                device=key, provider=raw["provider"], mode=raw["mode"], n=int(raw["n"]),
                d=int(raw["d"]), v=int(raw["v"]), ms=_num(raw["median_ms"]),
                peak_mib=_num(raw.get("peak_above_inputs_mib")),
                gemm_tflops=_num(raw.get("gemm_tflops")), source=raw["device"]))
    notes = [f"{count} ok rows on {dev!r} left out (the model knows only H100/H200)"
             for dev, count in skipped.items()]
    return rows, notes


def provider_strategy(provider: str, ours_is: str) -> str | None:
    return {"ordinary": "ordinary", "ours": ours_is}.get(provider)
