"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): a patched model gives the one-process
log-probs, entropy, loss, gradients and weights after two optimizer steps, for every wrapping of
the LM head (tied and untied), and refuses layouts it cannot make correct.

One ``torchrun`` launch runs every case (startup costs seconds); each case is reported as its
own test. The worker is ``tests/distributed/fsdp_head.py`` (see its docstring for the cases).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from distributed.fsdp_head import CASES, CASES_4
from distributed.launch import expect_case_ok, run_cases


def _launch(cases: tuple[str, ...], nproc: int, results: Path) -> str:
    return run_cases("fsdp_head.py", cases, nproc=nproc, results=results, results_env="APO_FSDP_RESULTS",
                     timeout=600)


@pytest.fixture(scope="module")
def output_2(tmp_path_factory) -> str:
    return _launch(CASES, 2, tmp_path_factory.mktemp("fsdp2") / "results.txt")


@pytest.fixture(scope="module")
def output_4(tmp_path_factory) -> str:
    return _launch(CASES_4, 4, tmp_path_factory.mktemp("fsdp4") / "results.txt")


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_matches_one_process(output_2: str, case: str) -> None:
    _expect_ok(output_2, case)


@pytest.mark.parametrize("case", CASES_4)
def test_fsdp2_on_4_ranks_matches_one_process(output_4: str, case: str) -> None:
    _expect_ok(output_4, case)


def _expect_ok(report: str, case: str) -> None:
    expect_case_ok(report, case, "FSDP2")
