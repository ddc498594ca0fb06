"""fp32 epilogue work per logit, counted from the kernels' source (``kernels/common.py``,
``linear_logprobs_fwd.py``, ``linear_logprobs_bwd.py``): lane operations on the fp32 pipes
(FMA/add/mul/max/select/compare/convert, one each) and MUFU operations (``ex2``, ``rcp``).

``tl.exp`` is a multiply by log2(e) plus ``MUFU.EX2``; a fp32 ``/`` is ``MUFU.RCP`` plus a
multiply (approximate division); ``accurate_tanh`` is abs, exp(-2|x|), (1-e)/(1+e), a degree-7
odd polynomial for small |x| and three selects. Per-row work (once per BLOCK_V logits) is left out.
"""

from __future__ import annotations

# (alu, sfu) per logit
_FWD = (9, 1)        # scale, mask, row max, z - m, exp, sum, label compare/select/add
_BWD = (11, 1)       # scale, z - m, - log s1, exp, -p*g, *jac, mask, |dz| filter (3), to 16-bit
_SOFTCAP = (16, 2)   # accurate_tanh + the softcap multiplies
_SOFTCAP_JAC = (2, 0)  # 1 - tanh^2 in the backward
_ENTROPY_FWD = (4, 0)
_ENTROPY_BWD = (3, 0)
_LOAD_CONVERT = (1, 0)  # a 16-bit logit loaded by a separate epilogue pass and widened


def forward_ops(softcap: bool, entropy: bool = False, from_buffer: bool = False) -> tuple[int, int]:
    """(alu, sfu) per logit of the forward's online logsumexp (+ target logit)."""
    parts = [_FWD] + ([_SOFTCAP] if softcap else []) + ([_ENTROPY_FWD] if entropy else [])
    parts += [_LOAD_CONVERT] if from_buffer else []
    return sum(a for a, _ in parts), sum(s for _, s in parts)


def backward_ops(softcap: bool, entropy: bool = False, from_buffer: bool = False) -> tuple[int, int]:
    """(alu, sfu) per logit of forming dz = -p (g + ...) * jac from a (recomputed) logit."""
    parts = [_BWD] + ([_SOFTCAP, _SOFTCAP_JAC] if softcap else [])
    parts += ([_ENTROPY_BWD] if entropy else []) + ([_LOAD_CONVERT] if from_buffer else [])
    return sum(a for a, _ in parts), sum(s for _, s in parts)
