"""Regression benchmarks of the CPU paths (pytest-benchmark); not part of the test run.

    python -m pytest benchmarks/test_regression.py --benchmark-only
    python -m pytest benchmarks/test_regression.py --benchmark-autosave            # store a baseline
    python -m pytest benchmarks/test_regression.py --benchmark-compare --benchmark-compare-fail=median:15%

``testpaths`` is ``tests/``, so a plain ``pytest`` never collects this file. Shapes are small
(a fraction of a second per round on 2 cores); the ordinary way is measured alongside as the
yardstick, since absolute CPU times drift with the machine and its load.
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import fused_linear_preference_loss, linear_logprobs
from apo_kernels.bench.inputs import make_bench_inputs
from apo_kernels.bench.providers import ordinary_logprobs
from apo_kernels.bench.specs import Spec

pytest.importorskip("pytest_benchmark", reason="needs the bench extra: pip install 'apo-kernels[bench]'")

SHAPES = {"small-v": (512, 128, 8192), "large-v": (256, 256, 32000)}


def _inputs(mode: str, shape: tuple[int, int, int], grad: bool):
    inp = make_bench_inputs(Spec("ours-torch", mode, *shape), torch.device("cpu"))
    if grad:
        inp.hidden.requires_grad_(True)
        inp.weight.requires_grad_(True)
    return inp


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["ours-torch", "ordinary"])
def test_forward(benchmark, shape, impl):
    inp = _inputs("forward", SHAPES[shape], grad=False)
    fn = (lambda: linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="torch")) \
        if impl == "ours-torch" else (lambda: ordinary_logprobs(inp.hidden, inp.weight, inp.labels))
    with torch.no_grad():
        out = benchmark(fn)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["ours-torch", "ordinary"])
def test_forward_backward(benchmark, shape, impl):
    inp = _inputs("forward+backward", SHAPES[shape], grad=True)

    def step():
        inp.hidden.grad = inp.weight.grad = None
        if impl == "ours-torch":
            out = linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="torch")
        else:
            out = ordinary_logprobs(inp.hidden, inp.weight, inp.labels)
        out.sum().backward()

    benchmark(step)
    assert torch.isfinite(inp.weight.grad).all()


def test_preference_step(benchmark):
    inp = _inputs("preference", (512, 128, 8192), grad=True)

    def step():
        inp.hidden.grad = inp.weight.grad = None
        fused_linear_preference_loss(inp.hidden, inp.weight, inp.labels, ref_hidden=inp.ref_hidden,
                                     ref_weight=inp.ref_weight, loss_type="apo_zero",
                                     compute_metrics=False, backend="torch").loss.backward()

    benchmark(step)
    assert torch.isfinite(inp.hidden.grad).all()
