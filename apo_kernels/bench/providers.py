"""Every way of computing per-token log-probs over an LM head that the benchmark compares.

A provider maps ``(hidden [N, D], weight [V, D], labels [N], softcap)`` to log-probs ``[N]``
(fp32, differentiable), and a preference batch to the APO-zero loss. Providers whose library
ships its own preference loss (ours, Liger) use it; the others sum their per-token log-probs per
sequence and apply :func:`apo_kernels.preference_loss` (microseconds next to the head).

Whether a provider can run is decided without importing it (:meth:`Provider.skip_reason`), so
the parent process never pays for imports; an import that fails in the worker is reported as
that row's error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .inputs import Inputs
from .specs import MODES, PREFERENCE_BETA, PREFERENCE_LOSS, Spec

LogprobFn = Callable[[Tensor, Tensor, Tensor, "float | None"], Tensor]


def ordinary_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor,
                      softcap: float | None = None) -> Tensor:
    """What people write: full logits, (softcap,) fp32 log-softmax, gather."""
    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def sequence_preference_loss(logprobs: LogprobFn, inp: Inputs, softcap: float | None) -> Tensor:
    """APO-zero loss of a padded batch from any per-token log-prob function."""
    from ..losses import preference_loss

    rows, seq, d = inp.hidden.shape
    pairs = rows // 2
    policy = logprobs(inp.hidden.reshape(-1, d), inp.weight, inp.labels.reshape(-1), softcap)
    with torch.no_grad():
        ref = logprobs(inp.ref_hidden.reshape(-1, d), inp.ref_weight, inp.labels.reshape(-1), softcap)
    policy, ref = policy.view(rows, seq).sum(-1), ref.view(rows, seq).sum(-1)
    losses = preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:],
                             loss_type=PREFERENCE_LOSS, beta=PREFERENCE_BETA)
    return losses.mean()


@dataclass
class Provider:
    """A benchmarked implementation. Subclasses fill in :meth:`logprobs` / :meth:`preference`."""

    name: str
    description: str
    module: str | None = None  # top-level module that must be importable
    needs_cuda: bool = False
    cuda_reason: str = ""
    modes: tuple[str, ...] = MODES
    supports_softcap: bool = True
    mode_note: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def skip_reason(self, spec: Spec, cuda: bool) -> str | None:
        """Why ``spec`` cannot run here (``None`` if it can). Imports nothing."""
        if spec.mode not in self.modes:
            return f"{self.name} has no {spec.mode} mode" + (f" ({self.mode_note})" if self.mode_note else "")
        if spec.softcap is not None and not self.supports_softcap:
            return f"{self.name} has no logit softcap option"
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed (pip install it to compare)"
        if self.needs_cuda and not cuda:
            return f"needs a CUDA GPU: {self.cuda_reason}"
        return None

    def logprobs(self, hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None) -> Tensor:
        raise NotImplementedError

    def preference(self, inp: Inputs, softcap: float | None) -> Tensor:
        return sequence_preference_loss(self.logprobs, inp, softcap)


class Ours(Provider):
    def __init__(self, backend: str) -> None:
        triton = backend == "triton"
        super().__init__(
            name="ours" if triton else "ours-torch",
            description=("apo_kernels Triton kernels (fused forward/backward, gradient filtering)"
                         if triton else "apo_kernels chunked pure-torch fallback"),
            needs_cuda=triton,
            cuda_reason="our Triton kernels compile for CUDA (the CPU interpreter is a test tool)")
        self.backend = backend

    def logprobs(self, hidden, weight, labels, softcap):
        from .. import linear_logprobs

        return linear_logprobs(hidden, weight, labels, softcap=softcap, backend=self.backend)

    def preference(self, inp, softcap):
        from .. import fused_linear_preference_loss

        return fused_linear_preference_loss(
            inp.hidden, inp.weight, inp.labels, ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight,
            loss_type=PREFERENCE_LOSS, beta=PREFERENCE_BETA, softcap=softcap,
            compute_metrics=False, backend=self.backend).loss


class Ordinary(Provider):
    def __init__(self, compiled: bool) -> None:
        super().__init__(
            name="ordinary-compile" if compiled else "ordinary",
            description=("hidden @ weight.T, log_softmax, gather under torch.compile" if compiled
                         else "hidden @ weight.T, fp32 log_softmax, gather (eager)"))
        self.compiled = compiled

    def _fn(self, key: str, fn: Callable) -> Callable:
        if not self.compiled:
            return fn
        if key not in self._cache:
            self._cache[key] = torch.compile(fn)
        return self._cache[key]

    def logprobs(self, hidden, weight, labels, softcap):
        return self._fn("logprobs", ordinary_logprobs)(hidden, weight, labels, softcap)

    def preference(self, inp, softcap):
        def step(h, w, y, rh, rw):
            return sequence_preference_loss(ordinary_logprobs, Inputs(h, w, y, rh, rw), softcap)

        return self._fn(f"preference-{softcap}", step)(
            inp.hidden, inp.weight, inp.labels, inp.ref_hidden, inp.ref_weight)


class TrlChunked(Provider):
    def __init__(self) -> None:
        super().__init__(
            name="trl", module="trl",
            description="TRL's ChunkedLogProbFunction (cuBLAS tiles + Triton fold; torch fold on CPU), "
                        "the head of its DPOTrainer")

    def logprobs(self, hidden, weight, labels, softcap):
        from trl.kernels import ChunkedLogProbFunction

        if "chunk" not in self._cache:
            try:  # the vocabulary chunk DPOTrainer itself uses
                from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
            except ImportError:
                chunk = 32768
            self._cache["chunk"] = chunk
        return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self._cache["chunk"],
                                            softcap, 1.0, ())[0]


class LigerCrossEntropy(Provider):
    def __init__(self) -> None:
        super().__init__(
            name="liger-flce", module="liger_kernel", needs_cuda=True,
            cuda_reason="Liger's fused linear cross entropy is a Triton kernel",
            modes=("forward", "forward+backward"), mode_note="Liger's preference step is liger-dpo",
            description="Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='none'), negated "
                        "(its preference step is liger-dpo)")

    def logprobs(self, hidden, weight, labels, softcap):
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        key = f"loss-{softcap}"
        if key not in self._cache:
            self._cache[key] = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)
        return -self._cache[key](weight, hidden, labels).float()


class LigerDPO(Provider):
    def __init__(self) -> None:
        super().__init__(
            name="liger-dpo", module="liger_kernel", modes=("preference",), supports_softcap=False,
            mode_note="it is a preference loss",
            description="Liger-Kernel LigerFusedLinearDPOLoss(loss_type='apo_zero'): chunked pure "
                        "torch under torch.compile, chunks of whole pairs")

    def preference(self, inp, softcap):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        if "loss" not in self._cache:
            self._cache["loss"] = LigerFusedLinearDPOLoss(
                loss_type=PREFERENCE_LOSS, beta=PREFERENCE_BETA, use_ref_model=True)
        out = self._cache["loss"](inp.weight, inp.hidden, inp.labels,
                                  ref_input=inp.ref_hidden, ref_weight=inp.ref_weight)
        return out[0] if isinstance(out, tuple) else out


class CutCrossEntropy(Provider):
    def __init__(self) -> None:
        super().__init__(
            name="cce", module="cut_cross_entropy", needs_cuda=True,
            cuda_reason="cut-cross-entropy's fused kernels are Triton (its torch_compile fallback is "
                        "the ordinary way under torch.compile)",
            description="Apple's cut-cross-entropy linear_cross_entropy(reduction='none'), negated "
                        "(default gradient filter)")

    def logprobs(self, hidden, weight, labels, softcap):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(hidden, weight, labels, softcap=softcap, reduction="none").float()


def all_providers() -> dict[str, Provider]:
    """Fresh provider objects by name, in the order tables and plots show them."""
    provs = [Ours("triton"), Ours("torch"), Ordinary(False), Ordinary(True), TrlChunked(),
             LigerCrossEntropy(), LigerDPO(), CutCrossEntropy()]
    return {p.name: p for p in provs}


PROVIDERS = tuple(all_providers())
