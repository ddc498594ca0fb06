"""The vocabulary-parallel head (``vocab_parallel_group=`` / a DTensor ``Shard(0)`` head).

The distributed cases run in ONE ``torchrun --nproc_per_node=2`` launch (gloo, CPU; startup
costs several seconds): ``tests/distributed/vp_ops.py`` compares every output and gradient
with one process and the float64 oracle (see its docstring for the cases). The tests below
it need no process group.
"""

from __future__ import annotations

import pytest
import torch

from apo_kernels import linear_logprobs
from apo_kernels.ops.logprobs_passes import backward_pass, forward_pass
from tests.distributed.launch import run_torchrun


def test_vocab_parallel_matches_one_process_on_two_ranks():
    out = run_torchrun("vp_ops.py", timeout=240)
    assert "rank 0: 0 failure(s)" in out and "rank 1: 0 failure(s)" in out, out[-3000:]


def test_group_without_torch_distributed_is_a_clear_error():
    hidden, weight = torch.randn(3, 16), torch.randn(5, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        linear_logprobs(hidden, weight, torch.tensor([0, 1, 2]), vocab_parallel_group=object())


def test_triton_label_residual_ignores_labels_outside_the_shard(poison_empty, monkeypatch):
    """A 16-bit Triton backward on a vocabulary shard: tokens whose label another shard holds
    carry the label V (outside [0, V)). The label-residual kernel must not read W[V] or write
    dW[V]: here the row past the shard is NaN, and reading it would make dH NaN (0 * NaN)."""
    from apo_kernels.kernels import configs

    monkeypatch.setattr(configs, "DZ_16BIT_IN_INTERPRETER", True)  # the GPU's bf16 dz + residual
    torch.manual_seed(0)
    n, d, vocab = 9, 16, 20
    hidden = torch.randn(n, d).bfloat16()
    storage = torch.randn(vocab + 1, d).bfloat16()
    storage[vocab] = float("nan")  # the memory just past the shard
    weight = storage[:vocab]
    labels = torch.randint(0, vocab, (n,))
    labels[::2] = vocab  # owned by another shard
    rows = torch.arange(n)
    ignored = torch.zeros(n, dtype=torch.bool)
    opts = dict(logit_scale=1.0, softcap=None, temperature=1.0)
    outs, tile_max = forward_pass(hidden, weight, None, labels, rows, ignored, backend="triton",
                                  with_entropy=False, with_stats=False, record_tile_max=True, **opts)
    grad_logp = torch.randn(n)
    dh, dw, _ = backward_pass(
        grad_logp, None, hidden, weight, labels, None, rows, outs["row_max"], outs["log_norm"],
        None, tile_max, backend="triton", filter_eps=2.0**-12, deterministic=False,
        needs_hidden=True, needs_weight=True, needs_bias=False, **opts)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    # The same as the chunked backend (exact, no residual kernel) to bf16 gradient rounding.
    dh_ref, dw_ref, _ = backward_pass(
        grad_logp, None, hidden, weight, labels, None, rows, outs["row_max"], outs["log_norm"],
        None, None, backend="torch", filter_eps=None, deterministic=False,
        needs_hidden=True, needs_weight=True, needs_bias=False, **opts)
    torch.testing.assert_close(dh, dh_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=2e-2, rtol=2e-2)


def test_label_runs_give_no_run_to_labels_outside_the_shard():
    """Out-of-shard labels (V, or any value outside [0, V)) sort last and start no run; in-shard
    labels form their runs as before (the first token of a run owns dW[y] and sums the run)."""
    from apo_kernels.kernels.linear_logprobs_bwd import _label_runs

    labels = torch.tensor([3, 7, 7, 3, 7, 7, 1, -1, 7])  # V = 7: 7 and -1 are outside
    order, end = _label_runs(labels, 7)
    assert order.tolist()[:3] == [6, 0, 3]  # label 1, then the run of 3s, in stable order
    assert end.tolist()[:3] == [1, 3, 2]  # run starts own [i, end); the 2nd 3 owns nothing
    assert sorted(order.tolist()[3:]) == [1, 2, 4, 5, 7, 8]  # outside: last ...
    assert end.tolist()[3:] == list(range(3, 9))  # ... and each its own position: no run
