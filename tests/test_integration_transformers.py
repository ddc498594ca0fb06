"""Patched forward of HF causal LMs: same per-token log-probs and gradients as the model's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the trl extra: pip install 'apo-kernels[trl]'")

from apo_kernels.integrations.transformers import (
    HeadTransform,
    head_transform,
    is_patched,
    output_head,
    patch_model,
    unpatch_model,
    verify_patch,
)

V, D = 211, 32
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _build(arch: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif arch == "llama_tied":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True))
    elif arch == "qwen2":  # Qwen2 with an lm_head bias added, to cover biased heads
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
        model.lm_head.bias = torch.nn.Parameter(torch.randn(V) * 0.5)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0, query_pre_attn_scalar=8)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif arch == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.25))
    elif arch == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0))
    else:
        raise AssertionError(arch)
    with torch.no_grad():  # larger head weights: peaked distributions, softcap actually active
        output_head(model)[0].mul_(8.0)
    return model.to(dtype).train()


def _inputs(batch: int = 2, length: int = 11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    attention = torch.ones_like(ids)
    if batch > 1:  # right padding on the second row
        labels[1, -2:] = -100
        attention[1, -2:] = 0
    return ids, labels, attention


def _reference(model, ids, labels, attention):
    """Per-token log-probs and loss from the model's own logits (unpatched path)."""
    extra = {"fused_logprobs": False} if is_patched(model) else {}
    out = model(input_ids=ids, attention_mask=attention, labels=labels, **extra)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    tok = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    return tok, out.loss


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


ARCHS = ["llama", "llama_tied", "qwen2", "gemma2", "cohere", "granite"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_forward_matches_logits(arch, dtype):
    model = _build(arch, dtype)
    ids, labels, attention = _inputs()
    ref_tok, ref_loss = _reference(model, ids, labels, attention)
    w = torch.randn(ref_tok.shape, generator=torch.Generator().manual_seed(2))
    (ref_tok * w).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()

    patch_model(model)
    assert is_patched(model)
    out = model(input_ids=ids, attention_mask=attention, labels=labels)
    assert out.logits is None and out.logprobs.dtype == torch.float32
    assert out.logprobs.shape == ref_tok.shape
    (out.logprobs * w).sum().backward()
    grads = _grads(model)

    # bf16: our op accumulates the logits in fp32, the reference rounds them to bf16 first.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.logprobs, ref_tok.float(), **tol)
    torch.testing.assert_close(out.loss, ref_loss.float(), **tol)
    assert (out.logprobs[~out.label_mask] == 0).all()
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp(min=1e-6)
        err = (grads[name] - g).abs().max() / scale
        assert err < (1e-3 if dtype == torch.float32 else 8e-2), (name, float(err))
    head_name = "lm_head.weight" if "lm_head.weight" in grads else "model.embed_tokens.weight"
    assert grads[head_name].abs().sum() > 0


def test_transform_read_from_configs():
    assert head_transform(transformers.Gemma2Config(final_logit_softcapping=30.0)) == HeadTransform(1.0, 30.0)
    assert head_transform(transformers.CohereConfig(logit_scale=0.0625)) == HeadTransform(0.0625, None)
    assert head_transform(transformers.GraniteConfig(logits_scaling=8.0)) == HeadTransform(0.125, None)
    assert head_transform(transformers.LlamaConfig()) == HeadTransform(1.0, None)
    assert head_transform(transformers.MptConfig()).logit_scale == 1.0  # MPT's forward ignores it


def test_generation_and_plain_forward_unchanged():
    model = _build("gemma2", torch.float32).eval()
    ids, _, _ = _inputs(1, 6)
    before = model(input_ids=ids).logits
    gen_before = model.generate(ids, max_new_tokens=4, do_sample=False)
    patch_model(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False), gen_before)
    unpatch_model(model)
    assert not is_patched(model) and "forward" not in vars(model)


def test_extra_outputs_and_shift_labels():
    model = _build("llama", torch.float32)
    ids, labels, attention = _inputs()
    patch_model(model, outputs=("entropy",))
    out = model(input_ids=ids, attention_mask=attention, labels=labels, logprob_outputs=("is_top1", "mean_logit"))
    logits = model(input_ids=ids, attention_mask=attention, labels=labels, fused_logprobs=False).logits[:, :-1]
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1) * out.label_mask
    torch.testing.assert_close(out.entropy, ent, rtol=1e-4, atol=1e-4)
    top1 = (logits.argmax(-1) == labels[:, 1:]) & out.label_mask
    assert torch.equal(out.is_top1, top1)
    torch.testing.assert_close(out.mean_logit, logits.mean(-1) * out.label_mask, rtol=1e-4, atol=1e-4)
    shifted = model(input_ids=ids, attention_mask=attention, shift_labels=torch.cat(
        [labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1))
    torch.testing.assert_close(shifted.logprobs[:, :-1], out.logprobs)
    with pytest.raises(ValueError, match="logprob_outputs"):
        model(input_ids=ids, labels=labels, logprob_outputs=("logits",))


def test_gradient_checkpointing_and_peft():
    peft = pytest.importorskip("peft", reason="needs the trl extra: pip install 'apo-kernels[trl]'")
    model = _build("llama", torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ids, labels, attention = _inputs()
    ref_tok, _ = _reference(lora, ids, labels, attention)
    ref_tok.sum().backward()
    ref = _grads(lora)
    lora.zero_grad()
    patch_model(lora)  # patches the model inside the PEFT wrapper
    out = lora(input_ids=ids, attention_mask=attention, labels=labels)
    out.logprobs.sum().backward()
    got = _grads(lora)
    assert set(got) == set(ref) and all("lora_" in n for n in got)
    torch.testing.assert_close(out.logprobs, ref_tok, rtol=1e-4, atol=1e-4)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-5, msg=name)
    with lora.disable_adapter():  # the reference path of PEFT trainers
        base = lora(input_ids=ids, attention_mask=attention, labels=labels).logprobs
    assert not torch.allclose(base, out.logprobs)


def test_verify_patch_catches_a_wrong_transform():
    model = _build("gemma2", torch.float32)
    patch_model(model, verify=True)  # right transform: passes
    assert verify_patch(model) < 1e-4
    with pytest.raises(ValueError, match="differ"):
        patch_model(model, transform=HeadTransform(1.0, None), verify=True)


def test_model_without_output_embedding_is_a_clear_error():
    body = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="output embedding"):
        patch_model(body)
    with pytest.raises(ValueError, match="temperature"):
        patch_model(_build("llama", torch.float32), temperature=0.0)
