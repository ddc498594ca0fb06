"""The benchmark suite on tiny shapes: rows, columns, skip reasons, errors, plots, markdown.

Timings are not asserted (they belong to the benchmark); what is asserted is that every
(provider, mode) pair gets exactly one row, that successful rows carry sane numbers and correct
log-probs, that rows that cannot run say why, and that the report scripts produce files.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

# The CLI runs below write plots (and the report scripts draw them): matplotlib, the bench extra.
pytest.importorskip("matplotlib", reason="needs the bench extra: pip install 'apo-kernels[bench]'")

from apo_kernels.bench import (  # noqa: E402
    BenchRow,
    Probe,
    Spec,
    build_specs,
    environment,
    markdown_table,
    read_csv,
    run_specs,
)
from apo_kernels.bench.inputs import make_bench_inputs
from apo_kernels.bench.providers import all_providers
from apo_kernels.bench.specs import sequence_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# liger-dpo is left out here: on CPU its first call spends ~30 s in torch.compile.
ALL = ["ours", "ours-torch", "ordinary", "trl", "liger-flce", "cce"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run over every provider and mode at a tiny shape, all in one worker process."""
    out = tmp_path_factory.mktemp("bench")
    proc = _run("-m", "apo_kernels.cli", "bench", "--shapes", "64x32x256", "--providers", *ALL,
                "--modes", "forward", "forward+backward", "preference", "--logits", "peaked",
                "--reps", "1", "--isolate", "shared", "--quiet", "--csv", str(out / "bench.csv"),
                "--plots", str(out), "--markdown", str(out / "bench.md"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_csv_has_one_row_per_provider_and_mode(tiny_run):
    out, _ = tiny_run
    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == BenchRow.columns()
        rows = list(reader)
    got = [(r["provider"], r["mode"]) for r in rows]
    expected = [(p, m) for p in ALL for m in ("forward", "forward+backward", "preference")
                if m in all_providers()[p].modes]
    assert sorted(got) == sorted(expected)
    assert len(set(got)) == len(got)
    for r in rows:
        assert r["device"] and r["torch_version"] == torch.__version__ and r["status"] in ("ok", "skipped")
        assert (r["n"], r["d"], r["v"]) == ("64", "32", "256")


def test_successful_rows_are_sane(tiny_run):
    rows = read_csv(str(tiny_run[0] / "bench.csv"))
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"ours-torch", "ordinary"}
    for r in ok:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        factor = {"forward": 2, "forward+backward": 6, "preference": 8}[r["mode"]]
        assert r["flops"] == factor * 64 * 32 * 256
        assert math.isclose(r["tflops"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12, rel_tol=1e-6)
        assert r["gemm_tflops"] > 0 and r["pct_of_gemm"] > 0
        assert r["peak_total_mib"] >= r["input_mib"] > 0
        assert r["mem_floor_mib"] >= r["input_mib"]
        if r["mode"] == "forward":
            assert r["mem_floor_mib"] == pytest.approx(r["input_mib"])
        else:
            assert r["mem_floor_mib"] > r["input_mib"]  # + dH, dW
        if r["mode"] != "preference":
            assert r["max_abs_err"] < 1e-4, r  # the provider really computed log-probs


def test_rows_that_cannot_run_say_why(tiny_run):
    rows = read_csv(str(tiny_run[0] / "bench.csv"))
    skipped = {(r["provider"], r["mode"]): r["error"] for r in rows if r["status"] == "skipped"}
    for (provider, _), reason in skipped.items():
        assert reason, provider
    if not torch.cuda.is_available():
        for mode in ("forward", "forward+backward", "preference"):
            assert "CUDA" in skipped[("ours", mode)]
        for provider in ("liger-flce", "cce"):
            assert "CUDA" in skipped[(provider, "forward")] or "not installed" in skipped[(provider, "forward")]


def test_plots_and_markdown_are_written(tiny_run):
    out, _ = tiny_run
    for name in ("forward_peaked.png", "forward_backward_peaked.png", "preference_peaked.png"):
        assert (out / name).stat().st_size > 5000, name
    text = (out / "bench.md").read_text()
    assert text.startswith("| head (N x D x V) |") and "ours-torch" in text and "x, " in text


def _script(name: str):
    """Load a script of benchmarks/ as a module (in-process: no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_scripts(tiny_run, tmp_path, capsys):
    csv_path = str(tiny_run[0] / "bench.csv")
    assert _script("plot").main([csv_path, "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3
    with pytest.raises(FileNotFoundError):
        _script("plot").main([str(tmp_path / "missing.csv")])
    md = tmp_path / "t.md"
    assert _script("to_markdown").main([csv_path, "--mode", "forward", "--skipped", "--out", str(md)]) == 0
    text = md.read_text()
    assert "Device:" in text and "| ordinary |" in text and "forward+backward" not in text
    assert "skipped" in text or torch.cuda.is_available()


def _probe() -> Probe:
    return Probe(environment(), gemm_tflops=1.0, gemm_dtype="float32")


def test_a_failing_provider_becomes_an_error_row_and_the_worker_goes_on():
    bad = Spec("ordinary", "forward", 8, 8, 16, dtype="no_such_dtype", reps=1)  # raises in the worker
    good = Spec("ordinary", "forward", 8, 8, 16, reps=1)
    rows = run_specs([bad, good], _probe(), isolate="batch")
    assert rows[0].status == "error" and "no_such_dtype" in rows[0].error
    assert rows[1].status == "ok" and rows[1].median_ms > 0 and rows[1].gemm_tflops == 1.0


def test_time_budget_skips_the_rest():
    info = _probe()
    rows = run_specs([Spec("ordinary", "forward", 8, 8, 16, reps=1)], info, budget_s=0.0)
    assert rows[0].status == "skipped" and "budget" in rows[0].error


def test_suite_order_and_structure():
    specs = build_specs(cuda=True, logits=("peaked", "flat"))
    assert specs[0].n == 16384 and {s.n for s in specs} == {4096, 8192, 16384, 32768}
    assert all(s.provider in ("ours", "ours-torch", "cce") for s in specs if s.logits == "flat")
    assert not any(s.provider == "liger-dpo" and s.mode != "preference" for s in specs)
    assert any(s.provider == "liger-dpo" for s in specs)
    assert not any(s.provider == "liger-flce" and s.mode == "preference" for s in specs)
    gemma = [s for s in specs if s.head == "gemma-2-2b"]
    assert gemma and all(s.softcap == 30.0 for s in gemma) and all(s.dtype == "bfloat16" for s in specs)
    cpu = build_specs(cuda=False)
    assert {s.dtype for s in cpu} == {"float32"} and max(s.n for s in cpu) <= 1024
    assert all("/4x16" in s.head for s in cpu)  # scaled heads never pass for the real ones
    with pytest.raises(ValueError, match="provider"):
        build_specs(cuda=False, providers=["nope"])


def test_sequence_layout():
    assert sequence_layout(4096) == (2, 1024)
    assert sequence_layout(64) == (1, 32)
    b, t = sequence_layout(6000)
    assert 2 * b * t == 6000 and t <= 1024
    with pytest.raises(ValueError):
        sequence_layout(7)


def test_peaked_inputs_are_peaked_and_flat_ones_are_not():
    def label_prob(kind: str) -> float:
        inp = make_bench_inputs(Spec("ordinary", "forward", 512, 64, 2048, logits=kind), torch.device("cpu"))
        logp = torch.log_softmax(inp.hidden @ inp.weight.T, -1).gather(-1, inp.labels[:, None])
        return float(logp.exp().median())

    assert label_prob("peaked") > 0.3
    assert label_prob("flat") < 10 / 2048


def test_markdown_speedup_column():
    base = dict(head="h", n=4, d=2, v=8, mode="forward", logits="peaked", status="ok", error="",
                p20_ms=1.0, p80_ms=1.0, tflops=1.0, pct_of_gemm=1.0, mem_vs_floor=1.0)
    rows = [dict(base, provider="ordinary", median_ms=4.0, peak_total_mib=10.0),
            dict(base, provider="ours-torch", median_ms=2.0, peak_total_mib=5.0)]
    text = markdown_table(rows)
    assert "| 2.00x, 0.50x |" in text
