"""A missing optional dependency: one line naming the extra, exit code 2, before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from clair_testlib import student_answer

from apo_kernels._optional import MissingDependency, require
from apo_kernels.clair.cli import main
from apo_kernels.cli import main as top_main

HINT = "pip install 'apo-kernels[clair]'"


def hide(monkeypatch, module: str) -> None:
    """Make ``import module`` fail as if it were not installed (its submodules too, since an
    imported submodule would otherwise still be found in ``sys.modules``)."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q1: what is 1?"}) + "\n")
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"prompt": "Q1: what is 1?", "response": student_answer(1)})
                    + "\n")
    revs = tmp_path / "r.jsonl"
    revs.write_text(json.dumps({"prompt": "Q1", "original": "a", "revision": "b"}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": "a b", "rejected": "a c"}) + "\n")
    return {"prompts": str(prompts), "gens": str(gens), "revs": str(revs),
            "pairs": str(pairs), "out": str(tmp_path / "o")}


# (module hidden, command line, what the message names)
RUN = ("run -i {prompts} -o {out} --model student --base-url {url} --reviser-model teacher "
       "--reviser-base-url {url}")
CASES = [
    ("httpx", "generate -i {prompts} -o {out} --model student --base-url {url}",
     "CLAIR requests to a server needs httpx"),
    ("httpx", "revise -i {gens} -o {out} --reviser-model teacher --reviser-base-url {url}",
     "CLAIR requests to a server needs httpx"),
    ("transformers", "generate -i {prompts} -o {out} --model /no/such/model",
     "CLAIR with a local model (no --base-url) needs transformers"),
    ("gguf", "generate -i {prompts} -o {out} --model /no/such/dir --gguf-file m.gguf",
     "--gguf-file needs gguf"),
    ("accelerate", "generate -i {prompts} -o {out} --model /no/such/dir --gguf-file m.gguf",
     "--gguf-file needs accelerate"),
    ("gguf", "revise -i {gens} -o {out} --reviser-model /no/such/dir --reviser-gguf-file m.gguf",
     "--reviser-gguf-file needs gguf"),
    ("tqdm", "generate -i {prompts} -o {out} --model student --base-url {url}",
     "CLAIR progress output needs tqdm"),
    ("datasets", "build -i {revs} -o {out}",
     "writing an HF datasets directory (or pass --no-hf-dataset) needs datasets"),
    ("rapidfuzz", "report {pairs}", "clair report's contrastiveness report needs rapidfuzz"),
    ("matplotlib", "report {pairs} --plots-dir {out}",
     "clair report's histograms needs matplotlib"),
    ("rapidfuzz", RUN, "clair run's contrastiveness report needs rapidfuzz"),
    ("matplotlib", RUN, "clair run's histograms needs matplotlib"),
]


@pytest.mark.parametrize("module, cmd, what", CASES,
                         ids=[f"{c[1].split()[0]}-{c[0]}" for c in CASES])
def test_missing_dependency_is_one_line_and_exit_2(module, cmd, what, files, chat_server,
                                                   monkeypatch, capsys):
    hide(monkeypatch, module)
    sub = cmd.split()[0]
    argv = ["clair", *cmd.format(url=chat_server.base_url, **files).split()]
    rc = top_main(argv + (["--no-progress"] if sub != "report" else []))  # the real entry point
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"apo-kernels clair {sub}: error: {what}: {HINT}\n"
    assert chat_server.calls == []  # checked before any work: nothing sent, nothing written
    assert not Path(files["out"]).exists() or not any(Path(files["out"]).iterdir())


def test_without_optional_paths_no_dependency_is_needed(files, monkeypatch, capsys):
    """--no-hf-dataset needs no datasets; report without --plots-dir needs no matplotlib."""
    hide(monkeypatch, "datasets")
    hide(monkeypatch, "matplotlib")
    assert main(["clair", "build", "-i", files["revs"], "-o", files["out"],
                 "--no-hf-dataset"]) == 0
    assert main(["clair", "report", files["pairs"]]) == 0
    capsys.readouterr()


def test_lazy_imports_raise_the_same_line(tmp_path, monkeypatch, capsys):
    """Reached through the Python API or an input only seen at run time (an HF datasets
    directory given to report), the message is the same."""
    from apo_kernels.clair.report import pair_metrics

    hide(monkeypatch, "rapidfuzz")
    with pytest.raises(MissingDependency, match=r"^the CLAIR contrastiveness report needs "
                                                r"rapidfuzz: pip install 'apo-kernels\[clair\]'$"):
        pair_metrics("a", "b")
    monkeypatch.undo()
    d = tmp_path / "ds"
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    hide(monkeypatch, "datasets")
    assert main(["clair", "report", str(d)]) == 2
    assert capsys.readouterr().err == (
        f"apo-kernels clair report: error: reading an HF datasets directory needs datasets: "
        f"{HINT}\n")


def test_require():
    assert require("json", "clair") is json
    with pytest.raises(MissingDependency) as info:
        require("no_such_module_xyz.sub", "bench", what="the plots")
    assert str(info.value) == "the plots needs no_such_module_xyz: pip install 'apo-kernels[bench]'"
    assert isinstance(info.value, ImportError)
