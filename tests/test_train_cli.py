"""``apo-kernels train`` end to end in a subprocess (tiny settings), and its clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers not installed")
pytest.importorskip("datasets", reason="datasets not installed")

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "apo_kernels.commands.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_train_tiny_saves_model_logs_metrics_and_reloads(tmp_path):
    out = tmp_path / "run"
    res = _train("--steps", "30", "--logging-steps", "10", "--output-dir", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert any(out.glob("*.safetensors"))
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in logs if "loss" in e]
    assert len(steps) == 3
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert key in steps[-1]
    assert steps[-1]["loss"] < steps[0]["loss"], steps  # apo_zero on the shipped pairs: it learns
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert "margin" in res.stderr and "model saved to" in res.stderr  # the progress lines

    # Train again from the saved model (its tokenizer and config), on a CLAIR-style messages directory.
    import datasets

    pairs = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
              "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
              "rejected": [{"role": "assistant", "content": f"It is {i + 2}."}],
              "rationale": "fixed the sum"} for i in range(8)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "dataset.messages"))
    again = _train("--model", str(out), "--dataset", str(tmp_path / "dataset.messages"), "--steps", "2",
                   "--batch-size", "4", "--loss-type", "sigmoid", "--packed", "--reference", "model",
                   "--output-dir", str(tmp_path / "run2"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run2" / "config.json").exists()


def test_train_bad_inputs_are_clear_errors(tmp_path, capsys):
    from apo_kernels.commands.train import main  # in-process: argument and data errors come first

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert main(["--dataset", str(bad), "--no-save", "--output-dir", str(tmp_path / "o")]) == 2
    assert "rejected" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--dataset", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["--loss-type", "nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["--dataset", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere" in capsys.readouterr().err
