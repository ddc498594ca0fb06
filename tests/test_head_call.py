"""``integrations.head_call``: the owner-rule interface, in one process (FSDP2 itself is tested
under torchrun in test_distributed_fsdp.py).

A rule that names the head as owner must make the patched forward call the head module (its
hooks run: that is how a wrapper unshards and reduce-scatters), with the same results as the
direct call; the head's ``forward`` is restored afterwards, also when the op raises.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

from apo_kernels.integrations import head_call
from apo_kernels.integrations.head_call import (
    HEAD_OWNER_RULES,
    UnsupportedHeadLayout,
    call_head,
    head_owner,
)
from apo_kernels.integrations.transformers import patch_model

V, D = 53, 16


def _model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def head_rule(monkeypatch):
    """A rule naming the head as its own owner (what ZeRO-3's rule does) for a marked weight."""

    def rule(model, head, weight):
        return head if getattr(weight, "_test_owned", False) else None

    monkeypatch.setattr(head_call, "HEAD_OWNER_RULES", [rule, *HEAD_OWNER_RULES])


def test_owner_rule_routes_the_head_through_its_hooks(head_rule) -> None:
    model = _model()
    patch_model(model, backend="torch", outputs=("entropy",))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 7), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100

    direct = model(input_ids=ids, labels=labels)
    direct.loss.backward()
    want_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(("pre", [a.shape for a in args])))
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(("post", len(out))))
    model.lm_head.weight._test_owned = True
    assert head_owner(model, model.lm_head) is model.lm_head
    routed = model(input_ids=ids, labels=labels)
    routed.loss.backward()

    assert [s[0] for s in seen] == ["pre", "post"], seen
    assert seen[0][1][1] == labels[:, 1:].shape  # (hidden, targets) went through the call
    assert "forward" not in model.lm_head.__dict__  # the class's forward shows through again
    torch.testing.assert_close(routed.logprobs, direct.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(routed.entropy, direct.entropy, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight.grad, want_grad, rtol=0, atol=0)
    # the head module still works as a module afterwards
    h = torch.randn(3, D)
    torch.testing.assert_close(model.lm_head(h), h @ model.lm_head.weight.T)


def test_owner_call_under_torch_compile_matches_eager(head_rule) -> None:
    """torch.compile of a patched model whose head goes through its owner (ZeRO-3's layout):
    Dynamo used to trace the forward swap and fail restoring it (AttributeError); the call runs
    eagerly behind a graph break, with the eager loss and gradient and the owner's hook applied."""
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model = _model()
        patch_model(model, backend="torch")
        model.lm_head.weight._test_owned = True
        # Work done by the owner's hook (as a wrapper's would): hidden states doubled.
        model.lm_head.register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
        run = torch.compile(model, backend="eager") if compiled else model
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        assert "forward" not in model.lm_head.__dict__
        results.append((out.loss.detach(), model.lm_head.weight.grad))
    plain = _model()
    patch_model(plain, backend="torch")
    assert not torch.allclose(plain(input_ids=ids, labels=ids).loss, results[0][0])  # the hook mattered
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_call_head_carries_none_and_restores_forward_on_error(head_rule) -> None:
    head = torch.nn.Linear(D, V, bias=False)
    head.weight._test_owned = True
    own_forward = lambda x: x
    head.forward = own_forward
    h = torch.randn(4, D)

    out = call_head(head, head, lambda w, b, x: (None, x @ w.T, b), h)
    assert out[0] is None and out[2] is None
    torch.testing.assert_close(out[1], h @ head.weight.T)
    assert head.__dict__["forward"] is own_forward

    def boom(w, b, x):
        raise RuntimeError("op failed")

    with pytest.raises(RuntimeError, match="op failed"):
        call_head(head, head, boom, h)
    assert head.__dict__["forward"] is own_forward


def test_tensor_parallel_hooks_are_hidden_for_the_redirected_call(head_rule) -> None:
    """A ColwiseParallel head's input/output hooks (``distribute_module``'s) pass on only the
    first input and expect one logits tensor back: under FSDP2 x TP with the head in its own
    group they broke the routed call (TypeError inside the op). They are hidden for that one
    call, other hooks still run, and every hook table is restored exactly, also on error.
    (The real FSDP2 x TP layout: tests/distributed/vp_ops.py, group fsdp_tp_head.)"""
    head = torch.nn.Linear(D, V, bias=False)
    head.weight._test_owned = True

    def tp_like_pre(module, args):  # what ColwiseParallel's input function does to the inputs
        return args[:1]

    def tp_like_post(module, args, out):
        raise AssertionError("the tensor-parallel output hook ran")

    for fn in (tp_like_pre, tp_like_post):
        fn.__module__ = "torch.distributed.tensor._api"
        fn.__qualname__ = f"distribute_module.<locals>.{fn.__name__}"
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    head.register_forward_pre_hook(tp_like_pre)
    head.register_forward_hook(tp_like_post)
    before = [list(t.items()) for t in (head._forward_pre_hooks, head._forward_hooks)]
    h = torch.randn(4, D)
    out = call_head(head, head, lambda w, b, x, y: (x @ w.T, y), h, h)
    assert seen == [2]
    torch.testing.assert_close(out[0], h @ head.weight.T)
    assert [list(t.items()) for t in (head._forward_pre_hooks, head._forward_hooks)] == before

    def boom(w, b, x, y):
        raise RuntimeError("op failed")

    with pytest.raises(RuntimeError, match="op failed"):
        call_head(head, head, boom, h, h)
    assert [list(t.items()) for t in (head._forward_pre_hooks, head._forward_hooks)] == before
    with pytest.raises(AssertionError, match="output hook ran"):  # its own call: hooks back
        head(h)


def test_no_owner_calls_directly() -> None:
    head = torch.nn.Linear(D, V)
    assert head_owner(head, head) is None
    h = torch.randn(2, D)
    (z,) = call_head(head, head, lambda w, b, x: (x @ w.T + b,), h)
    torch.testing.assert_close(z, head(h))


def test_a_rule_can_refuse_a_layout(monkeypatch) -> None:
    def refuse(model, head, weight):
        raise UnsupportedHeadLayout("layout X: not supported")

    monkeypatch.setattr(head_call, "HEAD_OWNER_RULES", [refuse])
    model = _model()
    patch_model(model, backend="torch")
    ids = torch.randint(0, V, (1, 5))
    with pytest.raises(UnsupportedHeadLayout, match="layout X"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(ValueError):  # a ValueError, for callers that catch bad-input errors
        model(input_ids=ids, labels=ids)


def test_backbone_as_outermost_fsdp_module_runs_through_its_own_hooks():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    from tests.distributed.launch import run_torchrun

    assert "backbone-root ok" in run_torchrun("fsdp_backbone_root.py", nproc=1, timeout=180)
