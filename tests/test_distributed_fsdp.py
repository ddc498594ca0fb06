"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): a patched model gives the one-process
log-probs, entropy, loss, gradients and weights after two optimizer steps, for every wrapping of
the LM head (tied and untied), and refuses layouts it cannot make correct.

One ``torchrun`` launch runs every case (startup costs seconds); each case is reported as its
own test. The worker is ``tests/distributed/fsdp_head.py`` (see its docstring for the cases).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

from distributed.fsdp_head import CASES, CASES_4
from distributed.launch import run_torchrun


def _launch(cases: tuple[str, ...], nproc: int) -> str:
    """The workers' output for ``cases``, whether or not some failed."""
    try:
        return run_torchrun("fsdp_head.py", *cases, nproc=nproc, timeout=600)
    except AssertionError as err:  # some case failed: its test below reports which
        return str(err)


@pytest.fixture(scope="module")
def output_2() -> str:
    return _launch(CASES, 2)


@pytest.fixture(scope="module")
def output_4() -> str:
    return _launch(CASES_4, 4)


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_matches_one_process(output_2: str, case: str) -> None:
    _expect_ok(output_2, case)


@pytest.mark.parametrize("case", CASES_4)
def test_fsdp2_on_4_ranks_matches_one_process(output_4: str, case: str) -> None:
    _expect_ok(output_4, case)


def _expect_ok(fsdp_output: str, case: str) -> None:
    lines = [line for line in fsdp_output.splitlines() if line.startswith(f"CASE {case} ")]
    if not any(line.startswith(f"CASE {case} ok") for line in lines):
        mine = [line for line in fsdp_output.splitlines() if line.startswith((f"{case} ", f"{case}:"))]
        pytest.fail(f"FSDP2 case {case}: {lines or 'no verdict'}\n" + "\n".join(mine[:20])
                    + f"\n--- worker output (tail) ---\n{fsdp_output[-3000:]}")
