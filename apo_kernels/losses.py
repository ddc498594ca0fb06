"""Preference losses over sequence log-probs: APO-zero, APO-down and the DPO family.

Every loss here takes four sequence log-probs per pair (policy chosen/rejected, reference
chosen/rejected; ``[B]`` each) and returns one loss per pair (``[B]``, float32 or float64); the
batch loss is their mean. The formulas reproduce TRL 1.16's ``DPOTrainer`` (``loss_type`` and
``f_divergence_type``) and the ``apo_zero_unpaired`` loss of its ``KTOTrainer``: same values and
gradients to fp32 rounding, on the same sequence log-probs.

Notation (per pair): ``r_w = logp_w - ref_logp_w`` and ``r_l = logp_l - ref_logp_l`` are the
chosen and rejected log-ratios, ``b = beta``, ``s_w, s_l`` the f-divergence scores of the
log-ratios (``s = r`` for the default reverse KL) and ``d = s_w - s_l``.

Where TRL's expression overflows (``exp`` of a large argument) we use an algebraically equal
form that stays finite, so for ``|r| > 50`` a loss here is finite wherever TRL's is, and finite
in some places where TRL's is NaN (``discopop`` multiplies ``inf * 0`` there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.checks import check_real

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "UNPAIRED_LOSS_TYPES",
    "preference_loss",
    "preference_rewards",
    "unpaired_preference_loss",
    "f_divergence_scores",
]

#: Every ``loss_type`` of TRL 1.16's DPOTrainer, plus ``apo_zero_unpaired`` (KTOTrainer) applied
#: to paired data.
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "apo_zero_unpaired",
)

#: f-divergence regularisers of f-DPO (arXiv 2309.16240) as named by TRL.
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: Only these losses depend on the log-ratios through the chosen-minus-rejected score difference,
#: where the f-DPO reparameterisation's ``beta * log Z(x)`` term cancels; the others have no valid
#: f-divergence generalisation (TRL rejects them too).
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)

#: Losses of KTOTrainer that score each completion on its own (``unpaired_preference_loss``).
UNPAIRED_LOSS_TYPES: tuple[str, ...] = ("apo_zero_unpaired",)

# Losses that need the completion token counts, and for which argument.
_NEEDS_LENGTHS = {"ipo": True, "sigmoid_norm": True, "sft": False}  # value: rejected needed too

# TRL clamps alpha-divergence exponents so exp() stays finite after casting back to the dtype.
_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def _check_vector(name: str, x: Tensor, size: int | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D [B] (one value per pair), got shape {tuple(x.shape)}")
    if size is not None and x.numel() != size:
        raise ValueError(
            f"`{name}` has {x.numel()} values but `chosen_logps` has {size}: chosen and rejected "
            "(and reference) log-probs must come in pairs"
        )


def _normalise_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> list[tuple[str, float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"`loss_type` is empty; choose one or more of {list(LOSS_TYPES)}")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"Unknown `loss_type` {t!r}; valid loss types are {list(LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(f"`loss_weights` must be a sequence of numbers, got {loss_weights!r}")
        weights = [check_real(f"`loss_weights[{i}]`", w) for i, w in enumerate(loss_weights)]
        if len(weights) != len(types):
            raise ValueError(
                f"`loss_weights` has {len(weights)} values for {len(types)} loss types {types}: "
                "give one weight per loss type"
            )
    return list(zip(types, weights))


def _validate_params(
    types: list[str],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
) -> None:
    check_real("`beta`", beta, low=0.0, low_open=True)
    check_real("`label_smoothing`", label_smoothing, low=0.0, high=1.0)
    if "robust" in types and not label_smoothing < 0.5:
        # The robust loss divides by (1 - 2*eps): eps = 0.5 is a division by zero and eps > 0.5
        # flips the sign of the loss. TRL only warns; a silent inf or a negated loss is worse.
        raise ValueError(
            f"`label_smoothing` must lie in [0, 0.5) for loss_type 'robust' (it is the probability "
            f"that a preference label is flipped), got {label_smoothing!r}"
        )
    if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            "`label_smoothing` must lie in (0, 1) for loss_type 'exo_pair' (it is EXO's epsilon; "
            f"the paper recommends 1e-3), got {label_smoothing!r}"
        )
    # Checked whatever the loss type: a wrong type is a mistake even where the value is unused.
    check_real("`discopop_tau`", discopop_tau, low=0.0, low_open=True)
    check_real("`f_alpha_divergence_coef`", f_alpha_divergence_coef)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"Unknown `f_divergence_type` {f_divergence_type!r}; valid types are {list(F_DIVERGENCE_TYPES)}"
        )
    if f_divergence_type != "reverse_kl":
        bad = sorted(set(types) - F_DIVERGENCE_LOSS_TYPES)
        if bad:
            raise ValueError(
                f"`f_divergence_type={f_divergence_type!r}` only applies to loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; {bad} have no f-divergence form. Use "
                "f_divergence_type='reverse_kl' with them."
            )


class _Expm1(torch.autograd.Function):
    """``expm1(x)`` whose gradient is ``exp(x)`` computed from ``x``.

    torch's own backward forms ``expm1(x) + 1``, which rounds to 0 (or to a few ulps of 1) once
    ``x`` is below about -17 in fp32: the f-divergence scores' gradients, ``exp(-r)`` and
    ``exp((a - 1) r)``, vanished at large log-ratios although they still multiply large factors
    (e.g. IPO's squared difference). ``exp(x)`` keeps its full relative precision down to
    fp32's smallest normal number. The backward is made of differentiable ops, so double
    backward works too.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.expm1(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x)


def _expm1(x: Tensor) -> Tensor:
    return _Expm1.apply(x)


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> Tensor:
    """The f-DPO score ``f'(pi/pi_ref)`` of log-ratios ``r`` (any shape, float).

    - ``reverse_kl``: ``r`` (standard DPO).
    - ``forward_kl``: ``f'(t) = 1 - 1/t`` -> ``1 - exp(-r)``.
    - ``js_divergence``: ``f'(t) = log(2t/(t+1))`` -> ``log 2 + logsigmoid(r)``.
    - ``alpha_divergence``: ``f'(t) = (t^(a-1) - 1)/(a-1)`` -> ``(exp((a-1) r) - 1)/(a-1)``, the
      exponent clamped above at 80 (11 in fp16) like TRL; ``a -> 1`` is the reverse-KL limit ``r``.

    Values use ``expm1`` (no cancellation near ``r = 0``) and gradients ``exp`` (no underflow at
    large ``|r|``), so both stay accurate in fp32 wherever they are representable.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -_expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((a - 1.0) * logratios, max=_ALPHA_CLAMP.get(logratios.dtype, 80.0))
        return _expm1(t) / (a - 1.0)
    raise ValueError(
        f"Unknown `f_divergence_type` {f_divergence_type!r}; valid types are {list(F_DIVERGENCE_TYPES)}"
    )


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Sequence log-probs are sums of thousands of terms: never evaluate the loss below fp32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | Sequence[str] = "apo_zero",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: Tensor | None = None,
    sft_chosen_logps: Tensor | None = None,
) -> Tensor:
    """Per-pair preference losses ``[B]``; their mean is TRL's batch loss.

    Args:
        chosen_logps, rejected_logps: policy sequence log-probs ``[B]`` (any float dtype;
            differentiable).
        ref_chosen_logps, ref_rejected_logps: reference sequence log-probs ``[B]`` (usually
            without grad; gradients flow into them too if they require it).
        loss_type: one name of :data:`LOSS_TYPES` or a list of them, summed with ``loss_weights``.
        beta: the KL strength ``b > 0`` (for ``ipo`` it is the paper's ``tau``).
        label_smoothing: flip probability for ``robust`` (in ``[0, 0.5)``) and ``aot``/
            ``aot_unpaired``; EXO's epsilon for ``exo_pair`` (must be ``> 0``).
        loss_weights: one weight per loss type (default 1.0 each).
        chosen_lengths, rejected_lengths: completion token counts ``[B]`` (int or float).
            ``ipo`` and ``sigmoid_norm`` divide the scores by them (clamped to >= 1, like TRL);
            ``sft`` needs ``chosen_lengths`` for its per-token mean.
        discopop_tau: temperature of the ``discopop`` mixing sigmoid.
        f_divergence_type, f_alpha_divergence_coef: f-DPO regulariser (see
            :func:`f_divergence_scores`); only for :data:`F_DIVERGENCE_LOSS_TYPES`.
        pair_weights: optional ``[B]`` multiplier of every pair's loss (TRL's WPO weighting
            ``w_chosen * w_rejected``, see :func:`apo_kernels.sequence.wpo_pair_weights`).
        sft_chosen_logps: the plain (unweighted) token sum of the chosen log-probs for ``sft``
            when ``chosen_logps`` was length-desensitised (``ld_alpha``); default ``chosen_logps``.

    Returns:
        ``[B]`` losses in float32 (float64 if the inputs are float64).

    ``sft`` (TRL: the mean NLL over all chosen completion tokens of the batch) is a batch-level
    scalar: every pair gets the same value ``-sum(chosen_logps) / sum(chosen_lengths)``, so the
    mean is that scalar and the gradient is ``-1 / sum(chosen_lengths)`` per chosen token.
    ``aot`` and ``aot_unpaired`` sort over the batch, so pair ``i``'s loss depends on the others.
    ``apo_zero_unpaired`` is KTO's loss on a batch of B desirable and B undesirable completions:
    ``(sigmoid(-b r_w) + sigmoid(b r_l)) / 2`` per pair, whose mean equals KTO's mean over 2B.
    """
    _check_vector("chosen_logps", chosen_logps, None)
    b_size = chosen_logps.numel()
    for name, t in (
        ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        _check_vector(name, t, b_size)
    pairs = _normalise_loss_types(loss_type, loss_weights)
    types = [t for t, _ in pairs]
    _validate_params(types, beta, label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef)

    dtype = _compute_dtype(chosen_logps)
    pc, pr = chosen_logps.to(dtype), rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    r_w, r_l = pc - rc, pr - rr  # chosen / rejected log-ratios
    s_w = f_divergence_scores(r_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_scores(r_l, f_divergence_type, f_alpha_divergence_coef)
    d = s_w - s_l
    b = float(beta)
    eps = float(label_smoothing)

    def lengths(name: str, x: Tensor | None) -> Tensor:
        if x is None:
            raise ValueError(
                f"loss_type {[t for t in types if t in _NEEDS_LENGTHS]} needs `{name}` (completion "
                "token counts per sequence, [B])"
            )
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x, device=pc.device)
        _check_vector(name, x, b_size)
        if (x < 0).any():
            raise ValueError(f"`{name}` must be >= 0 (token counts)")
        return x.to(dtype)

    total = torch.zeros_like(pc)
    for name, w in pairs:
        if name == "sigmoid":
            # -log sigmoid(b d) == softplus(-b d): finite for any d.
            loss = F.softplus(-b * d)
        elif name == "hinge":
            loss = torch.relu(1.0 - b * d)
        elif name == "ipo":
            # IPO (Azar et al., eq. 17) on per-token mean scores: (d_avg - 1/(2 tau))^2.
            lc = lengths("chosen_lengths", chosen_lengths).clamp(min=1.0)
            lr = lengths("rejected_lengths", rejected_lengths).clamp(min=1.0)
            loss = (s_w / lc - s_l / lr - 1.0 / (2.0 * b)) ** 2
        elif name == "exo_pair":
            # EXO-pref (K=2): KL(q || p) with q = softmax over {w, l} of b*scores, p = (1-eps, eps).
            x = b * d
            q_w, q_l = torch.sigmoid(x), torch.sigmoid(-x)
            loss = q_w * (F.logsigmoid(x) - math.log1p(-eps)) + q_l * (F.logsigmoid(-x) - math.log(eps))
        elif name == "nca_pair":
            u_w, u_l = b * r_w, b * r_l
            loss = F.softplus(-u_w) + 0.5 * F.softplus(u_w) + 0.5 * F.softplus(u_l)
        elif name == "robust":
            # Unbiased estimate under label flips with probability eps (Chowdhury et al.).
            x = b * d
            loss = ((1.0 - eps) * F.softplus(-x) - eps * F.softplus(x)) / (1.0 - 2.0 * eps)
        elif name == "bco_pair":
            loss = F.softplus(-b * r_w) + F.softplus(b * r_l)
        elif name == "sppo_hard":
            loss = (r_w - 0.5 / b) ** 2 + (r_l + 0.5 / b) ** 2
        elif name in ("aot", "aot_unpaired"):
            # Alignment via optimal transport: compare the sorted distributions over the batch.
            if name == "aot":
                delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
            else:
                delta = torch.sort(r_w, dim=0).values - torch.sort(r_l, dim=0).values
            x = b * delta
            loss = (1.0 - eps) * F.softplus(-x) + eps * F.softplus(x)
        elif name == "apo_zero":
            # APO-zero (eq. 7): push the chosen reward up and the rejected reward down.
            # 1 - sigmoid(x) is written sigmoid(-x): same value, no cancellation near 1.
            loss = torch.sigmoid(-b * r_w) + torch.sigmoid(b * r_l)
        elif name == "apo_down":
            # APO-down (eq. 8): lower the chosen, and the rejected more.
            loss = torch.sigmoid(b * r_w) + torch.sigmoid(-b * (r_w - r_l))
        elif name == "apo_zero_unpaired":
            loss = 0.5 * (torch.sigmoid(-b * r_w) + torch.sigmoid(b * r_l))
        elif name == "discopop":
            # DiscoPOP (Chris Lu et al., eq. 5): m = sigmoid(x/tau) mixes the logistic loss
            # -log sigmoid(x) and the exponential loss exp(-x):
            #   (1 - m) * softplus(-x) + m * exp(-x).
            # TRL evaluates exp(-x) * m directly, which is inf * 0 = NaN for x < -88 (fp32). We
            # use exp(-x + log m) = exp(-x + logsigmoid(x/tau)): the same number, finite always.
            x = b * d
            tau = float(discopop_tau)
            loss = torch.sigmoid(-x / tau) * F.softplus(-x) + torch.exp(-x + F.logsigmoid(x / tau))
        elif name == "sft":
            lc = lengths("chosen_lengths", chosen_lengths)
            src = pc if sft_chosen_logps is None else sft_chosen_logps.to(dtype)
            if sft_chosen_logps is not None:
                _check_vector("sft_chosen_logps", sft_chosen_logps, b_size)
            # A batch-level mean NLL over every chosen completion token; a batch with no chosen
            # token gives 0 (TRL: NaN from an empty mean).
            loss = (-src.sum() / lc.sum().clamp(min=1.0)).expand(b_size)
        elif name == "sigmoid_norm":
            lc = lengths("chosen_lengths", chosen_lengths).clamp(min=1.0)
            lr = lengths("rejected_lengths", rejected_lengths).clamp(min=1.0)
            loss = F.softplus(-b * (s_w / lc - s_l / lr))
        else:  # pragma: no cover - guarded by _normalise_loss_types
            raise AssertionError(name)
        total = total + w * loss

    if pair_weights is not None:
        _check_vector("pair_weights", pair_weights, b_size)
        total = total * pair_weights.to(dtype)
    return total


def preference_rewards(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> dict[str, Tensor]:
    """TRL's reward metrics (0-dim detached float tensors; call ``.item()`` to log them).

    ``rewards/chosen`` = mean ``b r_w``, ``rewards/rejected`` = mean ``b r_l``,
    ``rewards/accuracies`` = fraction of pairs with ``b r_w > b r_l``, ``rewards/margins`` = mean
    ``b (r_w - r_l)``, ``logps/chosen`` and ``logps/rejected`` = mean policy sequence log-probs.
    (TRL reports rewards as ``beta * log-ratio`` whatever the loss or f-divergence.)
    """
    beta = check_real("`beta`", beta, low=0.0, low_open=True)
    with torch.no_grad():
        dtype = _compute_dtype(chosen_logps)
        pc, pr = chosen_logps.detach().to(dtype), rejected_logps.detach().to(dtype)
        cr = beta * (pc - ref_chosen_logps.detach().to(dtype))
        rr = beta * (pr - ref_rejected_logps.detach().to(dtype))
        return {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).to(dtype).mean(),
            "rewards/margins": (cr - rr).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }


def unpaired_preference_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    loss_type: str = "apo_zero_unpaired",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTOTrainer's ``apo_zero_unpaired`` loss, one value per completion ``[N]`` (input order).

    ``logps``/``ref_logps``: policy / reference sequence log-probs ``[N]``; ``desirable``: bool
    ``[N]`` (KTO's ``label``). A desirable completion costs ``w_d * (1 - sigmoid(b r))``, an
    undesirable one ``w_u * sigmoid(b r)``. TRL's batch loss is the mean over all ``N`` (TRL
    concatenates desirable then undesirable before the mean; the mean is the same).
    """
    if loss_type not in UNPAIRED_LOSS_TYPES:
        raise ValueError(
            f"Unknown unpaired `loss_type` {loss_type!r}; valid unpaired loss types are "
            f"{list(UNPAIRED_LOSS_TYPES)}"
        )
    _check_vector("logps", logps, None)
    _check_vector("ref_logps", ref_logps, logps.numel())
    if not isinstance(desirable, Tensor) or desirable.shape != logps.shape:
        raise ValueError(f"`desirable` must be a bool tensor of shape {tuple(logps.shape)}")
    beta = check_real("`beta`", beta, low=0.0, low_open=True)
    desirable_weight = check_real("`desirable_weight`", desirable_weight, low=0.0)
    undesirable_weight = check_real("`undesirable_weight`", undesirable_weight, low=0.0)
    dtype = _compute_dtype(logps)
    x = beta * (logps.to(dtype) - ref_logps.to(dtype))
    desirable = desirable.to(torch.bool)
    return torch.where(desirable, desirable_weight * torch.sigmoid(-x), undesirable_weight * torch.sigmoid(x))
