"""transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")`` /
``DistributedConfig(tp_size=...)``) on 2 CPU processes (gloo), and FSDP2 x TP on 4: a patched
model gives the one-process log-probs, entropy, loss, gradients and weights after two optimizer
steps, runs the head vocabulary-parallel (V/P rows per rank), refuses TP ranks fed different
batches, and trains under the HF Trainer.

One ``torchrun`` launch per world size runs every case; each case is reported as its own test.
The worker is ``tests/distributed/hftp_patch_model.py`` (see its docstring for the cases).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from distributed.hftp_patch_model import CASES, CASES_4
from distributed.launch import expect_case_ok, run_cases


def _launch(cases: tuple[str, ...], nproc: int, results: Path) -> str:
    return run_cases("hftp_patch_model.py", cases, nproc=nproc, results=results, results_env="APO_HFTP_RESULTS",
                     timeout=300)


@pytest.fixture(scope="module")
def output_2(tmp_path_factory) -> str:
    return _launch(CASES, 2, tmp_path_factory.mktemp("hftp2") / "results.txt")


@pytest.fixture(scope="module")
def output_4(tmp_path_factory) -> str:
    return _launch(CASES_4, 4, tmp_path_factory.mktemp("hftp4") / "results.txt")


@pytest.mark.parametrize("case", CASES)
def test_hf_tensor_parallel_matches_one_process(output_2: str, case: str) -> None:
    _expect_ok(output_2, case)


@pytest.mark.parametrize("case", CASES_4)
def test_hf_fsdp_x_tensor_parallel_matches_one_process(output_4: str, case: str) -> None:
    _expect_ok(output_4, case)


def _expect_ok(report: str, case: str) -> None:
    expect_case_ok(report, case, "transformers TP")
