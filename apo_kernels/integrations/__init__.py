"""Integrations with Hugging Face models and trainers (heavy imports stay in the submodules).

- :mod:`apo_kernels.integrations.transformers`: patch any causal LM so a forward with labels
  returns per-token log-probs from our fused op (``patch_model``).
- :mod:`apo_kernels.integrations.trl`: ``enable()`` / ``disable()`` / ``enabled()`` make TRL's
  trainers (DPO, KTO, SFT, GRPO, RLOO) compute log-probs with our kernels.
- :mod:`apo_kernels.integrations.collator`, :mod:`apo_kernels.integrations.trainer`: the light
  path without TRL (preference collator, ``PreferenceTrainer``, reference log-prob precompute).
- :mod:`apo_kernels.integrations.tiny`: a tiny model and tokenizer built in code (tests, demos).
- :mod:`apo_kernels.integrations.data`, :mod:`apo_kernels.integrations.models`: load a preference
  dataset from disk, and a trainable causal LM (a local directory or a GGUF file, dequantised).
"""
