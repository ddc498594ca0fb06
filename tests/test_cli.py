"""The apo-kernels command line: check's exit codes and table, bench's CSV."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from apo_kernels.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apo_kernels.cli", *args], capture_output=True,
                          text=True, timeout=600, env={"COLUMNS": "200", **__import__("os").environ})


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("check", "bench"):
        assert command in out


def test_check_passes_and_prints_a_table():
    proc = _cli("check", "--shapes", "19x24x130", "--dtypes", "float32", "bfloat16", "--bias",
                "--softcap", "7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for word in ("torch", "triton", "dweight", "dbias", "all checks passed"):
        assert word in proc.stdout


def test_check_fails_with_exit_code_1_when_the_rule_is_broken(monkeypatch, capsys):
    """Sabotage the torch backend's gradient; check must notice and exit 1."""
    import apo_kernels.chunked as reference

    real = reference.chunked_backward

    def broken(*args, **kwargs):
        real(*args, **kwargs)
        if kwargs.get("grad_weight") is not None:
            kwargs["grad_weight"].mul_(1.01)

    monkeypatch.setattr(reference, "chunked_backward", broken)
    assert main(["check", "--shapes", "9x8x40", "--dtypes", "float32", "--backends", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bad_shape_argument_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--shapes", "12x7"])
    assert exc.value.code == 2
    assert "NxDxV" in capsys.readouterr().err


def test_bench_writes_csv(tmp_path):
    import torch

    out = tmp_path / "bench.csv"
    proc = _cli("bench", "--shapes", "64x32x512", "--reps", "2", "--csv", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("ours", "ours-torch", "ordinary") for m in ("forward", "forward+backward")}
    for r in rows:
        assert r["device"] and r["torch_version"]
        if r["provider"] == "ours" and not torch.cuda.is_available():
            assert r["status"] == "skipped" and "CUDA" in r["error"]  # Triton kernels need a GPU
            continue
        assert r["status"] == "ok" and r["error"] == "" and float(r["median_ms"]) > 0


def _without_interpreter_env() -> dict:
    """The environment a user's shell has: no TRITON_INTERPRET (the conftest sets it here)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "COLUMNS": "200"}


_SMALL_CHECK = ("check", "--shapes", "9x16x70", "--dtypes", "float32", "bfloat16", "--no-preference")


def test_check_from_a_fresh_shell_runs_triton_through_the_interpreter():
    """`apo-kernels check` as typed in a shell: the command itself must switch Triton to its
    interpreter before anything imports triton (it crashed with "Cannot call @triton.jit'd
    outside of the scope of a kernel"), and print no warning."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    proc = subprocess.run([sys.executable, "-m", "apo_kernels.cli", *_SMALL_CHECK],
                          capture_output=True, text=True, timeout=600, env=_without_interpreter_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and "triton" in proc.stdout
    assert "Warning" not in proc.stderr and "requires_grad" not in proc.stderr, proc.stderr


def test_check_called_after_triton_was_imported_reruns_in_a_fresh_process():
    """`main(["check"])` from a program that had already imported triton for the compiler:
    triton cannot switch to its interpreter any more, so check reruns itself in a subprocess."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    code = ("import sys, triton; from apo_kernels.cli import main; "
            f"sys.exit(main({list(_SMALL_CHECK)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=_without_interpreter_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout and "InterpreterError" not in proc.stderr
