"""ZeRO-3 layout rules without DeepSpeed: a head whose parameters carry DeepSpeed's attributes.

The real thing (two processes, DeepSpeed's CPU accelerator) is tests/test_distributed_zero3.py;
these check the parts that do not need it: which module owns the head, the clear errors, the
backward's guard against a parameter released between forward and backward, and that the
patched forward really calls the head module (so DeepSpeed's hooks run) and puts it back.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apo_kernels import linear_logprobs
from apo_kernels.integrations.zero3 import full_shape, is_zero3_gathered, zero3_head_owner

transformers = pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

from apo_kernels.integrations.transformers import output_head, patch_model


def _mark_zero3(param: nn.Parameter, ds_id: int) -> None:
    """DeepSpeed's attributes on a parameter ZeRO-3 manages (its data left whole: 'gathered')."""
    param.ds_id = ds_id
    param.ds_shape = param.shape


def _partition(param: nn.Parameter) -> None:
    """What ZeRO-3 does after a module's forward: the data becomes 0 elements, ds_shape stays."""
    param.data = torch.empty(0, dtype=param.dtype)


def _tiny(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def test_plain_head_has_no_owner():
    assert zero3_head_owner(nn.Linear(4, 5)) is None
    w = torch.randn(5, 4)
    assert full_shape(w) == (5, 4) and is_zero3_gathered(w)


def test_owner_is_the_head_when_deepspeed_hooked_it():
    head = nn.Linear(4, 5, bias=True)
    _mark_zero3(head.bias, 1)  # any one of its parameters is enough
    head.ds_id = 3  # set on a module by DeepSpeed's hook registration
    assert zero3_head_owner(head) is head


def test_partitioned_head_without_hooks_is_a_clear_error():
    head = nn.Linear(4, 5, bias=False)
    _mark_zero3(head.weight, 0)
    with pytest.raises(ValueError, match=r"ZeRO-3 partitioned parameters but no DeepSpeed module hooks.*deepspeed.initialize"):
        zero3_head_owner(head)


def test_full_shape_and_gathered_state_of_a_partitioned_parameter():
    p = nn.Parameter(torch.randn(7, 3))
    _mark_zero3(p, 0)
    assert is_zero3_gathered(p)
    _partition(p)
    assert p.shape == (0,) and full_shape(p) == (7, 3) and not is_zero3_gathered(p)


@pytest.mark.parametrize("tied", [False, True])
def test_output_head_on_a_partitioned_head(tied):
    model = _tiny(tied)
    weight = model.lm_head.weight
    _mark_zero3(weight, 0)
    _partition(weight)
    # patch time only needs the shape: ZeRO-3 models are partitioned at load time
    # (from_pretrained under HfDeepSpeedConfig), before patch_model sees them.
    patch_model(model)
    assert output_head(model, gather=False)[0] is weight
    with pytest.raises(ValueError, match=r"partitioned by DeepSpeed ZeRO-3 \(full shape \[53, 16\], 0 elements"):
        output_head(model)


def test_backward_refuses_a_weight_released_after_forward():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = nn.Parameter(torch.randn(11, 8, generator=g))
    labels = torch.randint(0, 11, (6,), generator=g)
    logp = linear_logprobs(hidden, weight, labels, backend="torch")
    _partition(weight)  # ZeRO-3's release after the head's forward, without its re-gather
    with pytest.raises(RuntimeError, match=r"`weight` was \[11, 8\] in the forward but is \[0\] in the backward"):
        logp.sum().backward()


@pytest.mark.parametrize("tied", [False, True])
def test_patched_forward_calls_the_head_module_and_restores_it(tied):
    """With the head marked as DeepSpeed-managed, the op runs inside ``lm_head.__call__`` (its
    hooks fire around it, its output passes through forward hooks), gives the same log-probs and
    gradients as the unmarked model, and the head's own forward is back afterwards."""
    plain, marked = _tiny(tied), _tiny(tied)
    for m in (plain, marked):
        patch_model(m, backend="torch")
    head = marked.lm_head
    _mark_zero3(head.weight, 0)
    head.ds_id = 0
    seen = []
    head.register_forward_pre_hook(lambda mod, args: seen.append(("pre", args[0].shape, args[1].shape)))
    # A forward hook may replace the outputs (DeepSpeed wraps each output tensor in an autograd
    # Function that re-gathers the parameters on backward): count the gradient through it.
    through = []

    def post(mod, args, out):  # a tuple of the present outputs, log-probs first
        through.append(out[0])
        return (out[0] * 1.0, *out[1:])

    head.register_forward_hook(post)
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :3] = -100
    a, b = plain(input_ids=ids, labels=labels), marked(input_ids=ids, labels=labels)
    assert seen == [("pre", torch.Size([2, 8, 16]), torch.Size([2, 8]))] and len(through) == 1
    assert "forward" not in vars(head)  # the class's forward shows through again
    torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(plain.named_parameters(), marked.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=0, msg=name)
    assert marked.lm_head.weight.grad.abs().sum() > 0


def test_head_forward_restored_after_an_error():
    model = _tiny()
    patch_model(model, backend="torch")
    head = model.lm_head
    _mark_zero3(head.weight, 0)
    head.ds_id = 0
    ids = torch.randint(0, 53, (1, 5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        model(input_ids=ids, labels=torch.full_like(ids, 999))  # label out of range
    assert "forward" not in vars(head)


def test_unwrap_sees_through_a_deepspeed_engine():
    """DeepSpeed's engine keeps the model as ``.module`` and its own JSON config as ``.config``
    (unlike DDP): patching the engine must patch the transformers model inside it."""
    from apo_kernels.integrations.transformers import is_patched, unwrap_model

    class Engine(nn.Module):  # the two attributes unwrap_model sees on deepspeed.DeepSpeedEngine
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = {"zero_optimization": {"stage": 3}}

    model = _tiny()
    engine = Engine(model)
    assert unwrap_model(engine) is model
    assert patch_model(engine, backend="torch") is engine
    assert is_patched(model) and "forward" not in vars(engine)


def test_gathered_for_forward_leaves_other_tensors_alone_without_deepspeed(monkeypatch):
    import sys

    from apo_kernels.integrations.zero3 import gathered_for_forward

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any import of it now fails
    whole = nn.Parameter(torch.randn(5, 4))
    _mark_zero3(whole, 0)  # ZeRO-3, but whole already (inside its module's forward)
    with gathered_for_forward(torch.randn(3), whole, None):
        pass
    _partition(whole)
    with pytest.raises(ImportError), gathered_for_forward(whole):  # partitioned: needs DeepSpeed
        pass


def test_reference_model_partitioned_without_hooks_is_a_clear_error():
    from apo_kernels.integrations.trainer import compute_preference_loss

    policy, ref = _tiny(), _tiny()
    _mark_zero3(ref.lm_head.weight, 0)
    _partition(ref.lm_head.weight)
    ids = torch.randint(0, 53, (2, 6))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match=r"no DeepSpeed module hooks.*initialize_reference"):
        compute_preference_loss(policy, batch, ref_model=ref)


class _FakeDeepSpeed:
    """Stands in for the ``deepspeed`` module: records the config given to ``initialize``."""

    def __init__(self) -> None:
        self.configs: list[dict] = []

    def initialize(self, model: nn.Module, config: dict) -> tuple:
        self.configs.append(config)
        return nn.Sequential(model), None, None, None


def test_initialize_reference_config(monkeypatch):
    import sys

    from apo_kernels.integrations.zero3 import initialize_reference, is_deepspeed_engine

    fake = _FakeDeepSpeed()
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = _tiny()
    config = {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "bf16": {"enabled": True},
              "train_batch_size": "auto",
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": True}}
    engine = initialize_reference(model, config)
    # No optimizer, no scheduler, no "auto" left (nothing would fill them), a batch size DeepSpeed
    # insists on; the caller's config untouched; the reference frozen, in eval mode.
    assert fake.configs == [{"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                             "zero_optimization": {"stage": 3, "overlap_comm": True}}]
    assert config["optimizer"] == {"type": "AdamW"} and config["train_batch_size"] == "auto"
    assert not engine.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage 3.*stage 2"):
        initialize_reference(model, {"zero_optimization": {"stage": 2}})
    assert not is_deepspeed_engine(engine)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed: one line naming the extra
    with pytest.raises(ImportError, match=r"pip install 'apo-kernels\[zero3\]'"):
        initialize_reference(model, {"zero_optimization": {"stage": 3}})
