"""Offline preference losses on sequence log-probabilities (docs/theory.md §6).

Pure torch. Every input is per *sequence*, shape (B,): ``chosen_logps`` and
``rejected_logps`` are Σ_t log π_θ(y_t|s_t) over the completion tokens (``tether.ops.kl.seq_sum`` of
per-token log-probs), ``ref_*`` the same under π_ref, ``*_lengths`` the number of counted completion
tokens. Losses are per example, (B,), to be minimised; reduce them (usually ``.mean()``) in the caller.

Notation: the log-ratio of one response is ``lr = logπ_θ(y) - logπ_ref(y)`` (``kl.log_ratio``: fp32, fp64
for fp64 inputs; reference detached: π_ref is frozen and receives no gradient here), the raw gap is
``Δ = lr(y_w) - lr(y_l)`` and the DPO logit is ``h = β·Δ``.

Where each loss goes (``TARGETS``). Let preferences follow a Bradley–Terry model
p(y ≻ y') = σ(r(y) - r(y')), and let pairs be drawn from a distribution μ (the data). Every loss here
only constrains the policy on responses that μ covers: outside supp(μ) the population loss is flat
and the minimiser is not identified (cf. Azar et al. 2023 on DPO's weak regularisation). On supp(μ):

- DPO, f-DPO (reverse KL) and robust DPO (with its assumed ε equal to the real flip rate) reach the
  reverse-KL optimum π*(y) ∝ π_ref(y)·exp(r(y)/β) of docs/theory.md §5.
- cDPO with ε > 0 reaches something else: per pair, σ(h) = (1-2ε)·p + ε, a smoothed probability,
  so implicit-reward gaps are shrunk towards 0 and capped at |h| ≤ logit(1-ε).
- IPO reaches π(y) ∝ π_ref(y)·exp(P(y ≻ μ)/β), a tilt by the bounded win-rate against μ, not by r.
- The other f-DPO variants reach the f-regularised optimum π = π_ref·(f′)⁻¹((r - λ)/β).
- Hinge learns only the ordering; SimPO has no reference and no KL anchor.
The tests check these claims by minimising the exact population loss on a small categorical problem.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from .kl import log_ratio
from .logprobs import upcast

LossType = Literal[
    "sigmoid",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "fdpo_reverse_kl",
    "fdpo_forward_kl",
    "fdpo_js",
    "fdpo_alpha",
    "simpo",
]
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "fdpo_reverse_kl",
    "fdpo_forward_kl",
    "fdpo_js",
    "fdpo_alpha",
    "simpo",
)
FDivergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js", "alpha")
_FDPO = {
    "fdpo_reverse_kl": "reverse_kl",
    "fdpo_forward_kl": "forward_kl",
    "fdpo_js": "js",
    "fdpo_alpha": "alpha",
}

_BT = "under a Bradley–Terry model p(y≻y') = σ(r(y) - r(y')) with pairs from μ, on supp(μ): "
TARGETS: dict[str, str] = {
    "sigmoid": _BT + "the reverse-KL optimum π* ∝ π_ref·exp(r/β) (DPO Eq. 4): the unique minimiser sets "
    "σ(h) = p, i.e. β·Δ = r(y_w) - r(y_l) on every pair, which is consistent across pairs.",
    "cdpo": _BT + "per pair σ(h) = (1-2ε)·p + ε, i.e. h = logit((1-2ε)σ(r_w - r_l) + ε): implicit-reward gaps "
    "shrunk towards 0 and capped at |h| ≤ logit(1-ε) (reached exactly when every label agrees, p = 1). "
    "This is π* only at ε = 0. With two responses it is a tilt of π_ref by a shrunk reward; with three or more "
    "the pairwise targets are generally not differences of any one reward, so the minimiser is a "
    "μ-weighted compromise and not of the form π_ref·exp(r'/β) for a BT-consistent r'.",
    "robust": _BT + "π* ∝ π_ref·exp(r/β) when the observed labels are BT labels flipped independently at "
    "exactly the assumed rate ε (the loss is then unbiased for the clean DPO loss, Chowdhury et al. 2024). "
    "If the true flip rate is lower (e.g. clean labels), it inverts noise that is not there: per pair "
    "σ(h) = (p - ε)/(1 - 2ε), which overshoots π*, and for p outside [ε, 1-ε] the loss has no minimiser "
    "(unbounded below as |h| → ∞).",
    "ipo": "for any preference model p(y≻y') (BT not needed), on supp(μ): π(y) ∝ π_ref(y)·exp(P(y≻μ)/β) with "
    "P(y≻μ) = E_{y'~μ} p(y≻y') (Azar et al. 2023, IPO with Ψ = identity): a tilt by the bounded win-rate "
    "against the data distribution μ, not by r, so it stays stochastic even under deterministic preferences. "
    "With ipo_length_normalize=True the same holds for the per-token log-ratio lr(y)/|y| instead of lr(y): "
    "π(y) = π_ref(y)·exp(|y|·(P(y≻μ)/β + c)) with c set by normalisation — a length-dependent target.",
    "hinge": _BT + "ordering only: per pair the expected hinge loss is minimised at h = +1 if p > 1/2 and h = -1 "
    "if p < 1/2 (the Bayes classifier), so reward magnitudes are lost; the log-ratio gaps are set by the "
    "margin 1/β, not by r. Not π*.",
    "fdpo_reverse_kl": _BT + "π* ∝ π_ref·exp(r/β): identical to 'sigmoid' (f′(u) = log u + 1, the +1 cancels).",
    "fdpo_forward_kl": _BT + "the forward-KL-regularised optimum π = π_ref·β/(λ - r) (f′(u) = -1/u), λ > max r "
    "set by normalisation (Wang et al. 2023): heavier tails than π*, never zero where π_ref > 0.",
    "fdpo_js": _BT + "the Jensen–Shannon-regularised optimum π = π_ref·(f′)⁻¹((r - λ)/β) with "
    "f′(u) = log(2u/(1+u)), λ set by normalisation (Wang et al. 2023).",
    "fdpo_alpha": _BT + "the α-divergence-regularised optimum π = π_ref·(1 - α(r - λ)/β)^(-1/α) (paper's α, "
    "f′(u) = (1 - u^-α)/α; α → 0 gives π*, α = 1 the forward-KL target), λ set by normalisation "
    "(Wang et al. 2023).",
    "simpo": "no reference and no KL anchor: the population loss depends only on the per-token log-likelihoods "
    "ℓ(y) = logπ_θ(y)/|y|, the labels and γ (paid in both orderings of a pair); π_ref plays no role, so it is not "
    "a KL-regularised optimum of any kind. When every label agrees (p = 1) it pushes ℓ(y_w) - ℓ(y_l) up without "
    "bound (Meng et al. 2024).",
}


# ----------------------------------------------------------------------------------------------------
# One small function per loss. Inputs are (B,) tensors; outputs (B,) per-example losses.
# ----------------------------------------------------------------------------------------------------


def dpo_sigmoid_loss(h: torch.Tensor) -> torch.Tensor:
    """DPO: -log σ(h), h = β·Δ (Rafailov et al. 2023, Eq. 7). dL/dh = -σ(-h). (B,) -> (B,)."""
    return -F.logsigmoid(h)  # Rafailov 2023 Eq. 7


def cdpo_loss(h: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; the DPO reference code's
    ``label_smoothing``): the DPO loss against a soft label 1 - ε. (B,) -> (B,).

        L = (1-ε)·(-log σ(h)) + ε·(-log σ(-h)),   dL/dh = σ(h) - (1-ε)

    so the loss is stationary (and minimal: it is convex in h) at h = logit(1-ε). Equivalently
    L = -log σ(h) + ε·h, since -log σ(-h) = -log σ(h) + h.
    """
    eps = label_smoothing
    return (1 - eps) * -F.logsigmoid(h) + eps * -F.logsigmoid(-h)  # docs/theory.md §6, cDPO row


def robust_dpo_loss(h: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan 2024, arXiv:2403.00409). ε = assumed flip rate. (B,) -> (B,).

        L = [(1-ε)·(-log σ(h)) - ε·(-log σ(-h))] / (1 - 2ε)

    If each label is flipped with probability ε, E_flip[L] = -log σ(h) exactly: an unbiased
    estimate of the clean DPO loss. Since -log σ(-h) = -log σ(h) + h, L = -log σ(h) - ε/(1-2ε)·h:
    convex with DPO's curvature, but unbounded below on any single example for ε > 0 (it keeps
    pushing h up); only its expectation under label noise has a minimiser.
    dL/dh = -[(1-ε)σ(-h) + εσ(h)] / (1 - 2ε).
    """
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(h) - eps * -F.logsigmoid(-h)) / (1 - 2 * eps)  # docs/theory.md §6, robust row


def ipo_loss(gap: torch.Tensor, *, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17, with τ = β): (Δ - 1/(2β))². dL/dΔ = 2(Δ - 1/(2β)). (B,) -> (B,).

    ``gap`` is the raw log-ratio gap Δ = lr_w - lr_l (not multiplied by β), or its per-token
    version lr_w/|y_w| - lr_l/|y_l| (see ``preference_loss(ipo_length_normalize=...)``).
    """
    return (gap - 1.0 / (2.0 * beta)) ** 2  # Azar 2023 Eq. 17


def hinge_loss(h: torch.Tensor) -> torch.Tensor:
    """SLiC-style hinge (Zhao et al. 2023, SLiC-HF calibration loss, margin 1): max(0, 1 - h). (B,) -> (B,).

    dL/dh = -1 for h < 1, 0 for h > 1.
    """
    return torch.relu(1.0 - h)  # docs/theory.md §6, hinge row


def f_divergence_score(lr: torch.Tensor, *, divergence: FDivergence, alpha: float = 0.5) -> torch.Tensor:
    """f′(u) at u = π_θ/π_ref = exp(lr), up to an additive constant that cancels in f′(u_w) - f′(u_l).

    (Wang et al. 2023, "Beyond Reverse KL", arXiv:2309.16240; docs/theory.md §6.) (B,) -> (B,).

    ============  ==========================  =================================  ====================
    divergence    f′(u)                       returned (constant dropped)        d/dlr
    ============  ==========================  =================================  ====================
    reverse_kl    log u + 1                   lr                                 1
    forward_kl    -1/u                        -exp(-lr)                          exp(-lr)
    js            log(2u/(1+u))               log σ(lr)  (drops log 2)           σ(-lr)
    alpha         (1 - u^-α)/α  (paper's α)   -expm1(-α·lr)/α  (α = 0: lr)      exp(-α·lr)
    ============  ==========================  =================================  ====================

    α convention: ``alpha`` is the paper's α, with α → 0 the reverse KL (DPO) and α = 1 the forward
    KL. TRL's ``f_alpha_divergence_coef`` is 1 - α (its f′(t) = (t^(c-1) - 1)/(c - 1)); both default
    to 0.5, where the two conventions happen to coincide — a trap when moving any other value.

    Hazard: forward_kl and alpha use exp(-lr) of a *sequence-sum* log-ratio, which overflows fp32
    for lr < -88 (or -88/α): the loss becomes inf (or nan when both sides overflow). Nothing is
    clamped here (a clamp would zero the gradient silently); TRL clamps the α exponent at 80.
    """
    if divergence == "reverse_kl":
        return lr
    if divergence == "forward_kl":
        return -torch.exp(-lr)
    if divergence == "js":
        return F.logsigmoid(lr)
    if divergence == "alpha":
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (paper's convention; 0 = reverse KL, 1 = forward KL), got {alpha}")
        if alpha == 0:
            return lr  # the α → 0 limit: (1 - e^{-α lr})/α → lr
        return -torch.expm1(-alpha * lr) / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}; choose from {F_DIVERGENCES}")


def fdpo_loss(
    chosen_lr: torch.Tensor, rejected_lr: torch.Tensor, *, beta: float, divergence: FDivergence, alpha: float = 0.5
) -> torch.Tensor:
    """f-DPO (Wang et al. 2023): -log σ(β·f′(u_w) - β·f′(u_l)), u = π_θ/π_ref. (B,), (B,) -> (B,).

    With ``divergence="reverse_kl"`` this is DPO exactly (same floating-point operations).
    """
    h = beta * (
        f_divergence_score(chosen_lr, divergence=divergence, alpha=alpha)
        - f_divergence_score(rejected_lr, divergence=divergence, alpha=alpha)
    )
    return -F.logsigmoid(h)  # docs/theory.md §6, f-DPO row


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (Meng, Xia & Chen 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised.

        L = -log σ(β·logπ(y_w)/|y_w| - β·logπ(y_l)/|y_l| - γ)

    γ is the target reward margin in reward units (the paper's γ, not γ/β). All (B,) -> (B,).
    Here as a contrast: no π_ref, hence no KL anchor (see ``TARGETS["simpo"]``).
    """
    z = (
        beta
        * (
            upcast(chosen_logps) / upcast(chosen_lengths).clamp(min=1)
            - upcast(rejected_logps) / upcast(rejected_lengths).clamp(min=1)
        )
        - gamma
    )
    return -F.logsigmoid(z)  # Meng 2024 Eq. 6


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------


def check_loss_type(loss_type: str) -> None:
    """``loss_type`` is a preference loss (``LOSS_TYPES``): the one check of the rule (``UserError``)."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}; set --loss_type")


def check_loss_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """The loss type and the options it reads: β > 0, label_smoothing only where it means something
    (cdpo: [0, 0.5]; robust: [0, 0.5)). ``preference_loss`` and DPO's config check both run it."""
    check_loss_type(loss_type)
    if not beta > 0:
        raise UserError(f"beta must be > 0, got {beta}; set --beta")
    if loss_type == "cdpo" and not 0.0 <= label_smoothing <= 0.5:
        raise UserError(f"cdpo needs label_smoothing in [0, 0.5], got {label_smoothing}; set --label_smoothing")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise UserError(
            f"robust needs label_smoothing (assumed flip rate) in [0, 0.5), got {label_smoothing}; "
            "set --label_smoothing"
        )
    if loss_type not in ("cdpo", "robust") and label_smoothing != 0.0:
        raise UserError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            "it applies to 'cdpo' (soft labels) and 'robust' (assumed flip rate) only: set --label_smoothing 0"
        )


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    *,
    beta: float,
    loss_type: LossType,
    label_smoothing: float = 0.0,
    ipo_length_normalize: bool = False,
    alpha: float = 0.5,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example preference loss and its stats (docs/theory.md §6).

    Args:
        chosen_logps, rejected_logps: (B,) Σ_t log π_θ over the completion tokens of y_w and y_l.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under π_ref (detached here). Required for
            every loss except ``simpo``, which ignores them.
        chosen_lengths, rejected_lengths: (B,) counted completion tokens (clamped to ≥ 1). Required by
            ``simpo`` and by ``ipo`` with ``ipo_length_normalize``.
        beta: β > 0; the KL coefficient (DPO/cDPO/robust/hinge/f-DPO), IPO's τ, SimPO's reward scale.
        loss_type: one of ``LOSS_TYPES``; what each converges to is in ``TARGETS``.
        label_smoothing: ε. ``cdpo``: soft-label weight, in [0, 0.5]. ``robust``: assumed label-flip
            rate, in [0, 0.5). Must be 0 for every other loss (raises otherwise).
        ipo_length_normalize: IPO on per-token log-ratios lr/|y| (TRL; the IPO authors' reported
            setting) instead of sequence sums (the DPO reference code). Only for ``ipo``.
        alpha: the paper's α for ``fdpo_alpha`` (TRL's coefficient is 1 - α; see ``f_divergence_score``).
        simpo_gamma: SimPO's target margin γ.
    Returns:
        ``(losses (B,) fp32 — fp64 for fp64 inputs, stats)`` with stats, all (B,) and detached:
        ``chosen_rewards`` / ``rejected_rewards`` — the implicit reward β·(logπ_θ - logπ_ref) of each
        response (for ``simpo``: its own reward β·logπ_θ/|y|, Meng et al. Eq. 4); ``margins`` =
        chosen - rejected; ``accuracy`` = 1.0 where chosen reward > rejected reward, else 0.0.
    """
    check_loss_options(loss_type, beta, label_smoothing)
    if ipo_length_normalize and loss_type != "ipo":
        raise ValueError("ipo_length_normalize applies to loss_type='ipo' only")
    shape = chosen_logps.shape
    for name, t in (
        ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like chosen_logps")
    needs_lengths = loss_type == "simpo" or ipo_length_normalize
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type={loss_type!r} (ipo_length_normalize={ipo_length_normalize}) needs "
            "chosen_lengths and rejected_lengths"
        )

    if loss_type == "simpo":
        losses = simpo_loss(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, gamma=simpo_gamma
        )
        chosen_rewards = beta * upcast(chosen_logps.detach()) / upcast(chosen_lengths).clamp(min=1)
        rejected_rewards = beta * upcast(rejected_logps.detach()) / upcast(rejected_lengths).clamp(min=1)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        chosen_lr = log_ratio(chosen_logps, ref_chosen_logps.detach())  # (B,) lr(y_w)
        rejected_lr = log_ratio(rejected_logps, ref_rejected_logps.detach())  # (B,) lr(y_l)
        h = beta * (chosen_lr - rejected_lr)  # (B,) the DPO logit β·Δ
        if loss_type == "sigmoid":
            losses = dpo_sigmoid_loss(h)
        elif loss_type == "cdpo":
            losses = cdpo_loss(h, label_smoothing=label_smoothing)
        elif loss_type == "robust":
            losses = robust_dpo_loss(h, label_smoothing=label_smoothing)
        elif loss_type == "hinge":
            losses = hinge_loss(h)
        elif loss_type == "ipo":
            if ipo_length_normalize:
                gap = chosen_lr / upcast(chosen_lengths).clamp(min=1) - rejected_lr / upcast(rejected_lengths).clamp(
                    min=1
                )
            else:
                gap = chosen_lr - rejected_lr
            losses = ipo_loss(gap, beta=beta)
        else:
            losses = fdpo_loss(chosen_lr, rejected_lr, beta=beta, divergence=_FDPO[loss_type], alpha=alpha)
        chosen_rewards = beta * chosen_lr.detach()
        rejected_rewards = beta * rejected_lr.detach()

    margins = chosen_rewards - rejected_rewards
    stats = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": margins,
        "accuracy": (margins > 0).float(),
    }
    return losses, stats
