"""``apo-kernels bench``'s arguments and output, without running a benchmark: the worker that
probes the machine and the measurements are replaced by fakes (a real run is in
test_benchmark.py)."""

from __future__ import annotations

import sys

import pytest

from apo_kernels.bench import Probe
from apo_kernels.bench.specs import BenchRow
from apo_kernels.cli import main

_ENV = {"device": "a long device name that takes many columns", "device_kind": "cpu", "torch": "2",
        "triton": "3", "trl": "1.16", "liger-kernel": "-", "cut-cross-entropy": "-"}


def _row(provider: str, mode: str, ms: float, status: str = "ok", error: str = "") -> BenchRow:
    return BenchRow(device=_ENV["device"], device_kind="cpu", torch_version="2", triton_version="3",
                    trl_version="1.16", liger_version="-", cce_version="-", provider=provider, mode=mode,
                    head="custom", dtype="float32", logits="peaked", n=1024, d=128, v=8192, softcap="",
                    status=status, median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, reps=5, flops=1e9,
                    tflops=0.123, gemm_tflops=1.0, pct_of_gemm=12.3, input_mib=4.0,
                    peak_above_inputs_mib=10.0, peak_total_mib=14.0, mem_floor_mib=8.0,
                    mem_vs_floor=1.75, error=error)


@pytest.fixture
def fake_runner(monkeypatch):
    """Replace the probe and the measurements; record whether they were reached."""
    import apo_kernels.bench.runner as runner

    calls = []

    def probe(dtype, timeout_s=300):
        calls.append("probe")
        return Probe(_ENV, 1.0, dtype)

    def run_specs(specs, info, *, on_row=None, **kw):
        calls.append("run_specs")
        rows = [_row("ordinary", "forward+backward", 20.0), _row("ours-torch", "forward+backward", 10.0),
                _row("liger-flce", "forward+backward", 0.0, "skipped", "needs CUDA (Triton kernels)")]
        for r in rows:
            if on_row:
                on_row(r)
        return rows

    monkeypatch.setattr(runner, "probe", probe)
    monkeypatch.setattr(runner, "run_specs", run_specs)
    return calls


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--markdown", "."], "is a directory"),
])
def test_bad_arguments_fail_before_any_measurement(fake_runner, capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().out
    assert fake_runner == []  # neither the probe nor a measurement ran


def test_plots_into_a_file_fails_before_any_measurement(fake_runner, tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    assert main(["bench", "--plots", str(target)]) == 2
    assert "give a directory" in capsys.readouterr().out
    assert fake_runner == []


def test_plots_without_matplotlib_names_the_extra(fake_runner, monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--plots", str(tmp_path)]) == 2
    assert "pip install 'apo-kernels[bench]'" in capsys.readouterr().out
    assert fake_runner == []


def test_plots_and_markdown_without_csv(fake_runner, tmp_path, capsys):
    """--plots/--markdown used to need --csv, and said so only after the whole benchmark."""
    pytest.importorskip("matplotlib", reason="needs the bench extra: pip install 'apo-kernels[bench]'")
    md = tmp_path / "bench.md"
    assert main(["bench", "--plots", str(tmp_path / "plots"), "--markdown", str(md)]) == 0
    assert fake_runner == ["probe", "run_specs"]
    assert list((tmp_path / "plots").glob("*.png"))
    assert "| ours-torch |" in md.read_text()


def test_table_is_plain_markdown_when_piped(fake_runner, capsys):
    """Not a terminal (capsys, like a pipe): every cell whole, no box drawing, no ellipsis."""
    assert not sys.stdout.isatty()
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "| head (N x D x V) | mode | logits | provider |" in out
    assert "| custom (1024x128x8192) | forward+backward | peaked | ours-torch | 10.00 (9.00-11.00) |" in out
    assert "vs ordinary: speed-up, memory ratio" in out and "2.00x, 1.00x" in out
    assert "liger-flce (forward+backward) skipped: needs CUDA (Triton kernels)" in out
    assert "…" not in out and "┃" not in out and "│" not in out
    # Progress lines are not wrapped either.
    assert any(line.startswith("[  2/") and "ours-torch" in line and "MiB" in line for line in out.splitlines())
