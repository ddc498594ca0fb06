"""Compatibility entry point: the benchmark now lives in :mod:`apo_kernels.bench`.

``from apo_kernels.benchmark import BenchRow, write_csv, ordinary_logprobs`` keeps working;
``apo-kernels bench`` and ``benchmarks/run_suite.py`` are the ways to run it.
"""

from .bench import BenchRow, Spec, build_specs, ordinary_logprobs, probe, run_specs, write_csv

__all__ = ["BenchRow", "Spec", "build_specs", "ordinary_logprobs", "probe", "run_specs", "write_csv"]
