"""Which specs a run measures: the quick default, the full suite for this device, custom shapes.

Suite order (it matters: a run that reaches its time budget skips the rest): on a GPU first every
provider at N=16384 (where the targets are set), then the other N; within a tier peaked logits
before flat ones, then provider by provider (so a worker serves consecutive shapes).
Flat logits are only run for providers whose speed can depend on the values (gradient
filtering: ours, cut-cross-entropy; ours-torch as a control).
"""

from __future__ import annotations

from collections.abc import Sequence

from .providers import PROVIDERS, all_providers
from .specs import CPU_TOKENS, GPU_TOKENS, HEADS, LOGITS, MODES, Spec, scaled_heads

FLAT_PROVIDERS = ("ours", "ours-torch", "cce")
TARGET_TOKENS = 16384
QUICK_CPU_SHAPES = ((1024, 128, 8192), (512, 256, 32000))


def suite_heads(cuda: bool) -> dict[str, tuple[int, int, float | None]]:
    """The real lm_head shapes on a GPU; scaled down on CPU."""
    return dict(HEADS) if cuda else scaled_heads()


def build_specs(*, cuda: bool, heads: dict[str, tuple[int, int, float | None]] | None = None,
                shapes: Sequence[tuple[int, int, int]] | None = None,
                tokens: Sequence[int] | None = None, providers: Sequence[str] | None = None,
                modes: Sequence[str] = MODES, logits: Sequence[str] = ("peaked",),
                dtype: str | None = None, reps: int = 5,
                flat_providers: Sequence[str] = FLAT_PROVIDERS) -> list[Spec]:
    """Specs for ``shapes`` (custom ``(N, D, V)``) or for ``heads`` x ``tokens``, in suite order."""
    dtype = dtype or ("bfloat16" if cuda else "float32")
    providers = list(providers or PROVIDERS)
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; choose from {list(PROVIDERS)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {list(MODES)}")
    for kind in logits:
        if kind not in LOGITS:
            raise ValueError(f"unknown logits kind {kind!r}; choose from {list(LOGITS)}")
    cells: list[tuple[int, str, int, int, float | None]] = []  # (N, head, D, V, softcap)
    if shapes:
        cells = [(n, "custom", d, v, None) for n, d, v in shapes]
    else:
        heads = heads if heads is not None else suite_heads(cuda)
        token_list = list(tokens or (GPU_TOKENS if cuda else CPU_TOKENS))
        if TARGET_TOKENS in token_list:  # the targets' N first
            token_list.remove(TARGET_TOKENS)
            token_list.insert(0, TARGET_TOKENS)
        cells = [(n, name, d, v, cap) for n in token_list for name, (d, v, cap) in heads.items()]
    known = all_providers()
    specs = []
    tiers: list[int] = []
    for n, *_ in cells:
        if n not in tiers:
            tiers.append(n)
    for n in tiers:
        for kind in logits:
            for p in providers:
                if kind == "flat" and len(logits) > 1 and p not in flat_providers:
                    continue
                for cn, head, d, v, cap in cells:
                    if cn != n:
                        continue
                    for m in modes:
                        if (m == "preference" and n % 2) or m not in known[p].modes:
                            continue  # structural: no row (a provider lacking a mode, odd N)
                        specs.append(Spec(p, m, n, d, v, softcap=cap, head=head, dtype=dtype,
                                          logits=kind, reps=reps))
    return specs
