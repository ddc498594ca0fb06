"""Test setup: Triton's interpreter on CPU, NaN-poisoned allocations, shared helpers."""

from __future__ import annotations

import os

# Must be set before triton is imported anywhere: kernels then run on CPU tensors through
# numpy. Tests of the CUDA path are marked `gpu` and skip without a device.
if os.environ.get("APO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floats (int: a sentinel) so an
    element a kernel forgets to write fails loudly instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-123456789 if t.dtype in (torch.int32, torch.int64) else 0)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
