"""The sampler is not the trainer: the online loop's hooks for the behaviour policy μ (``ops.behaviour``).

Every generation backend returns log μ of the tokens it drew (``batch.behaviour_logps``). Each step the
loop logs ``mismatch/*`` (KL[μ‖π_old], the ratio π_old/μ, what the correction cut: ``add_mismatch_stats``),
and each method's loss multiplies its terms by the weights of ``behaviour_correction``
(``loss_weights``; docs/theory.md §3):

- PPO, RLOO: the clipped surrogate by ``weights`` (the KL in the reward rides on the advantages, so the
  same weight corrects it); the exact estimator's direct term, a function of the state only, by
  ``state_weights``.
- GRPO: the clipped surrogate and the KL in the loss by ``weights`` (with ``kl_placement: loss_is`` the
  KL's weight becomes π_θ/π_old · π_old/μ = π_θ/μ, the DeepSeek-V3.2 form).
"""

from __future__ import annotations

from typing import Optional

from ..errors import UserError
from ..ops.behaviour import CORRECTION_NAMES, CorrectionWeights, correction_weights, mismatch_stats


def check_correction(cfg) -> None:
    """One-line UserErrors for ``behaviour_correction`` / ``behaviour_cap``."""
    name = getattr(cfg, "behaviour_correction", "none")
    if name not in CORRECTION_NAMES:
        raise UserError(
            f"behaviour_correction must be one of {', '.join(CORRECTION_NAMES)}, got {name!r}; "
            "set --behaviour_correction"
        )
    cap = getattr(cfg, "behaviour_cap", 2.0)
    if not (isinstance(cap, (int, float)) and cap > 1.0 and cap < float("inf")):
        raise UserError(
            f"behaviour_cap must be a finite number > 1 (the cap C of the truncation, the band [1/C, C] "
            f"of the masking), got {cap!r}; set e.g. --behaviour_cap 2"
        )


def _weights(old_logps, behaviour_logps, mask, cfg) -> CorrectionWeights:
    name = getattr(cfg, "behaviour_correction", "none")
    if behaviour_logps is None:
        if name != "none":
            raise UserError(
                f"behaviour_correction={name} needs the sampler's own log-probs, and this generation "
                "backend returns none (batch.behaviour_logps); use a backend that does, or set "
                "behaviour_correction: none"
            )
        behaviour_logps = old_logps  # μ unknown: no correction, weights 1
    return correction_weights(old_logps, behaviour_logps, mask, correction=name, cap=getattr(cfg, "behaviour_cap", 2.0))


def loss_weights(x, cfg) -> CorrectionWeights:
    """The correction weights of a micro-batch (a ``LossInputs``: old_logps, behaviour_logps, mask), detached."""
    return _weights(x.old_logps, x.behaviour_logps, x.mask, cfg)


def add_mismatch_stats(sums: dict, counts: dict, ro, cfg) -> None:
    """Add the rollout's ``mismatch/*`` (sum, count) pairs to ``sums``/``counts`` in place (nothing when
    the backend returned no behaviour log-probs)."""
    mu: Optional[object] = ro.behaviour_logps
    if mu is None or ro.old_logps is None:
        return
    mu = mu.to(ro.old_logps.device)
    s, c = mismatch_stats(ro.old_logps, mu, ro.mask, _weights(ro.old_logps, mu, ro.mask, cfg))
    sums.update(s)
    counts.update(c)
