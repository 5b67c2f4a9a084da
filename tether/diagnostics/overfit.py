"""The overfit-DPO detector: the training loss has saturated while the KL to the reference keeps growing.

Why (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (IPO), arXiv:2310.12036, §4.2; docs/theory.md §11): DPO's loss on a pair is -log σ(h),
h = β·(log-ratio of y_w - log-ratio of y_l). When every training pair's preference is deterministic
(each pair seen with one label, as in any finite data set), the empirical minimiser has h → +∞ on
every pair: σ(h) → 1 and the loss → 0 for *any* β, so β no longer bounds how far π_θ moves; the
log-ratios (and the KL to π_ref) keep growing for as long as training continues. Measured:
on 25 Stack Exchange pairs at lr 5e-4 the loss reached 0 and β = 0.5 ended with *more* KL than
β = 0.05 (29.8 against 17.9 nats).

The signal, from the metrics the DPO trainer already logs (a pure function of their history):

- **saturated**: the running mean of the last ``window`` training losses is below
  ``SATURATION_LOSS`` = -ln 0.95 ≈ 0.0513. For a loss of the form -log σ(z), exp(-mean loss) is the
  geometric mean of the implied preference probabilities σ(z_i) on the training pairs, so this says:
  the model is ≥ 95% sure of the training labels on (geometric) average;
- **KL growing**: ``kl/ref`` rose at each of the last ``growth_evals`` - 1 evaluations, and (when the
  standard errors are logged) by more than ``z`` combined standard errors from the first to the last
  of them.

It fires only on both: a low loss with a stable KL is a converged run, and a growing KL with a high
loss is a run still learning. Remedies: ``loss_type=ipo`` (a squared loss with a finite target
margin 1/(2β): β keeps its meaning) or ``cdpo`` (label smoothing ε caps the target margin at
logit(1-ε)), fewer epochs (max_steps), a lower learning_rate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

SATURATION_LOSS = -math.log(0.95)
"""Mean -log σ(z) below which the implied preference probability (geometric mean) exceeds 0.95."""

SATURATING_LOSSES = ("sigmoid", "fdpo_reverse_kl", "fdpo_forward_kl", "fdpo_js", "fdpo_alpha", "simpo")
"""Loss types of the form -log σ(z) with an unbounded logit z: their minimum 0 is reached only as z → ∞.
(ipo and cdpo have finite target margins, hinge's gradient vanishes at margin 1/β, robust is a
difference of two such terms: the detector is off for them.)"""

REMEDIES = (
    "loss_type=ipo or loss_type=cdpo (with label_smoothing, e.g. 0.1), fewer epochs (a smaller max_steps), "
    "or a lower learning_rate"
)


@dataclass(frozen=True)
class OverfitVerdict:
    """What ``dpo_overfit`` decided and from what."""

    flagged: bool  # saturated and kl_growing
    saturated: bool
    kl_growing: bool
    running_loss: float  # mean of the last ``window`` training losses (nan without any)
    kls: tuple  # the kl/ref values the growth test looked at

    @property
    def implied_preference(self) -> float:
        """exp(-running loss): the geometric mean of σ(z_i) over the recent training pairs."""
        return math.exp(-self.running_loss) if math.isfinite(self.running_loss) else float("nan")


def dpo_overfit(
    history: Sequence[Mapping],
    *,
    loss_threshold: float = SATURATION_LOSS,
    window: int = 10,
    growth_evals: int = 3,
    z: float = 2.0,
) -> OverfitVerdict:
    """Decide from a run's metric history (rows in step order, as logged: ``loss`` on training steps,
    ``kl/ref`` and optionally ``kl/ref_stderr`` on evaluations) whether DPO is overfitting (module doc).

    ``window``: training losses averaged; ``growth_evals`` (≥ 2): evaluations whose kl/ref must rise
    one after another; ``z``: standard errors the total rise must exceed, when ``kl/ref_stderr`` is logged
    (0 = any rise)."""
    if growth_evals < 2 or window < 1:
        raise ValueError("growth_evals must be >= 2 and window >= 1")
    losses = [float(h["loss"]) for h in history if h.get("loss") is not None]
    recent = losses[-window:]
    running = sum(recent) / len(recent) if recent else float("nan")
    saturated = bool(recent) and running < loss_threshold
    evals = [h for h in history if h.get("kl/ref") is not None][-growth_evals:]
    kls = tuple(float(h["kl/ref"]) for h in evals)
    growing = len(kls) == growth_evals and all(b > a for a, b in zip(kls, kls[1:]))
    if growing and z > 0:
        se = [h.get("kl/ref_stderr") for h in (evals[0], evals[-1])]
        if all(s is not None and math.isfinite(s) for s in se):
            growing = kls[-1] - kls[0] > z * math.hypot(*se)
    return OverfitVerdict(saturated and growing, saturated, growing, running, kls)


class OverfitMonitor:
    """The detector as the DPO trainer runs it: ``record(metrics)`` after every step, ``check(step)`` at
    evaluations -> {"dpo/overfit": 0.0 | 1.0}, with one warning (naming the remedies) the first time it fires.
    Disabled ({} from ``check``) for loss types outside ``SATURATING_LOSSES``."""

    def __init__(self, loss_type: str, **kwargs):
        self.enabled = loss_type in SATURATING_LOSSES
        self.kwargs = kwargs
        self.history: list[dict] = []
        self.warned = False

    def record(self, metrics: Mapping) -> None:
        """One step's metrics. Without ``kl/ref`` (kl_prompts=0), an eval_hook's ``eval/kl`` is the same
        measurement (exact sequence KL of samples on held-out prompts) and is used instead."""
        src = "kl/ref" if "kl/ref" in metrics else "eval/kl"
        row = {"loss": metrics.get("loss"), "kl/ref": metrics.get(src), "kl/ref_stderr": metrics.get(f"{src}_stderr")}
        self.history.append({k: v for k, v in row.items() if v is not None})

    def check(self, step: int) -> dict:
        if not self.enabled:
            return {}
        v = dpo_overfit(self.history, **self.kwargs)
        if v.flagged and not self.warned:
            self.warned = True
            log.warning(
                "dpo/overfit at step %d: the training loss has saturated (running mean %.4f, implied preference "
                "probability %.3f) while kl/ref keeps growing (%s): with deterministic preferences β no longer bounds "
                "the drift (Azar et al. 2023, IPO). Remedies: %s",
                step,
                v.running_loss,
                v.implied_preference,
                " -> ".join(f"{k:.3g}" for k in v.kls),
                REMEDIES,
            )
        return {"dpo/overfit": float(v.flagged)}
