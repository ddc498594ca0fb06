"""Benchmark suite: our op and preference step against every alternative, on this device.

Modules: ``specs`` (what a measurement is, shapes, FLOP counts), ``inputs`` (flat and peaked
logits), ``providers`` (ours, the ordinary way, TRL, Liger-Kernel, cut-cross-entropy),
``measure`` (timing, peak memory, matmul rate), ``runner`` (subprocess isolation, time budget),
``suite`` (which specs), ``report`` (CSV, markdown table, plots). ``apo-kernels bench`` and the
scripts in ``benchmarks/`` drive it.
"""

from .env import device_slug, environment
from .providers import PROVIDERS, ordinary_logprobs
from .report import markdown_table, plot, read_csv, write_csv
from .runner import Probe, probe, run_specs
from .specs import HEADS, MODES, BenchRow, Spec
from .suite import build_specs

__all__ = [
           "HEADS",
           "MODES",
           "PROVIDERS",
           "BenchRow",
           "Probe",
           "Spec",
           "build_specs",
           "device_slug",
           "environment",
           "markdown_table",
           "ordinary_logprobs",
           "plot",
           "probe",
           "read_csv",
           "run_specs",
           "write_csv",
]
