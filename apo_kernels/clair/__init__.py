"""CLAIR: Contrastive Learning from AI Revisions (APO paper, arXiv 2408.06266).

A preference pair is made from the target model's own answer: ``rejected = M(x)`` and
``chosen = Reviser(x, rejected)``, where a stronger model *minimally* revises the answer. The two
sides then differ only where the answer was weak, which is the contrast preference losses
(APO-zero, APO-down, DPO) learn from.

Steps, each usable alone (``apo-kernels clair generate|revise|build|report``) or together
(``apo-kernels clair run``):

- :func:`~apo_kernels.clair.pipeline.generate`: answers from a local HF model or any
  OpenAI-compatible chat-completions server;
- :func:`~apo_kernels.clair.pipeline.revise`: the reviser call with our CLAIR prompt;
- :func:`~apo_kernels.clair.pipeline.build`: ``prompt``/``chosen``/``rejected``/``rationale`` as
  JSONL and HF ``datasets`` directories, plain-string and chat-messages forms;
- :func:`~apo_kernels.clair.report.contrastiveness_report`: how different chosen and rejected are.

Model calls are resumable: each finished item is appended to a JSONL store keyed by a hash of
its input, so a killed run restarted with the same command skips what is done.

Heavy dependencies (httpx, transformers, datasets, matplotlib) are imported lazily.
"""

from __future__ import annotations

from .parse import ParseResult, parse_revision
from .prompts import DEFAULT_TEMPLATE, RevisionTemplate, load_template

__all__ = [
    "DEFAULT_TEMPLATE",
    "ParseResult",
    "RevisionTemplate",
    "load_template",
    "parse_revision",
]
