"""Benchmark inputs, built directly on the device (the lm_head of Gemma-2 alone is 1.2 GB).

Flat logits: ``hidden ~ N(0, 1)``, ``weight ~ N(0, 1/D)``, uniform labels: every token's
distribution is close to uniform (p ~ 1/V), which no trained model produces and which hides
what gradient filtering saves.

Peaked logits (what a trained model shows on its own answers), the recipe of
:func:`apo_kernels.verify.make_inputs`: each label's weight row is pushed by 6 along the mean
direction of the hidden states that predict it, so the label's logit stands about 6 above the
rest and p(label) is high while most other p are tiny; then 20% of the labels are redrawn
uniformly, so some tokens are "surprised" as in real text.

The preference mode adds the reference model: its hidden states are the policy's plus noise of
scale 0.1 and its head the policy's plus noise of scale 0.1/sqrt(D) (a reference close to the
policy, as at the start of preference training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .specs import Spec, sequence_layout


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, D] (preference: [2B, T, D])
    weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [N] (preference: [2B, T])
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.labels, self.ref_hidden, self.ref_weight)
                if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def grad_nbytes(self) -> int:
        """Bytes of the gradients a training step must produce (dH, dW), in the input dtype."""
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def make_bench_inputs(spec: Spec, device: torch.device) -> Inputs:
    """Inputs for ``spec`` on ``device``, deterministic in ``spec.seed``."""
    n, d, v = spec.n, spec.d, spec.v
    dtype = getattr(torch, spec.dtype)
    g = torch.Generator(device=device).manual_seed(spec.seed)
    hidden = torch.randn(n, d, generator=g, device=device)
    weight = torch.randn(v, d, generator=g, device=device).mul_(d**-0.5)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if spec.logits == "peaked":
        push = torch.zeros(v, d, device=device).index_add_(0, labels, hidden)
        push.div_(push.norm(dim=1, keepdim=True).add_(1e-6))
        weight.add_(push, alpha=6.0)
        del push
        flip = torch.rand(n, generator=g, device=device) < 0.2
        labels = torch.where(flip, torch.randint(0, v, (n,), generator=g, device=device), labels)
    ref_hidden = ref_weight = None
    if spec.mode == "preference":
        ref_hidden = hidden + 0.1 * torch.randn(n, d, generator=g, device=device)
        ref_weight = weight + (0.1 * d**-0.5) * torch.randn(v, d, generator=g, device=device)
        pairs, seq = sequence_layout(n)
        hidden, labels = hidden.view(2 * pairs, seq, d), labels.view(2 * pairs, seq)
        ref_hidden = ref_hidden.view(2 * pairs, seq, d).to(dtype)
        ref_weight = ref_weight.to(dtype)
    return Inputs(hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(), labels.contiguous(),
                  ref_hidden, ref_weight)
