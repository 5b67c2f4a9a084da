"""β controllers: how the KL coefficient is chosen over training (docs/theory.md §4).

Each controller exposes ``value`` (the β to use now), ``update(kl=..., n_episodes=...)`` called
once per optimisation step *after* the step's KL is measured, and ``state_dict()`` /
``load_state_dict()`` so checkpoints restore it exactly. No torch: β is a Python float.

- ``FixedBeta``: β constant.
- ``ScheduledBeta``: β as a function of the step (linear, cosine, exponential, piecewise), e.g. the
  "start conservative and relax" pattern, β decreasing.
- ``AdaptiveKLController``: Ziegler et al. 2019 (openai/lm-human-preferences ``AdaptiveKLController``):
  e = clip(KL/KL_target - 1, -0.2, 0.2); β ← β·(1 + e·n/horizon), n = episodes in the batch, KL the
  mean *sequence-sum* KL. Its horizon defaults to ``auto_kl_horizon``: scaled to the run's length, so
  that β can actually move over the run (Ziegler's 10000 episodes, ``kl_horizon: ziegler``, is for runs
  of ~10^5-10^6 episodes; at 8 episodes a step it moves β by 0.016% a step).
- ``ConstraintBeta``: the Lagrangian form of "maximise reward s.t. KL ≤ budget": β is the dual
  variable, updated by projected dual ascent β ← max(0, β + η·(KL - budget)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .config import config_group
from .errors import UserError

log = logging.getLogger(__name__)


class BetaController:
    """Base class: a β that may change with the step and the measured KL."""

    kind: str = "base"

    def __init__(self) -> None:
        self.step = 0
        self.value = 0.0

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        """Advance one optimisation step given the step's mean sequence KL; returns the new β."""
        self.step += 1
        return self.value

    def stats(self) -> dict:
        """Metrics of the last ``update`` (the fixed ``kl_ctl/*`` names; docs/metrics.md)."""
        return {}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise UserError(f"checkpoint holds a {state.get('kind')!r} β controller, this run uses {self.kind!r}")
        self.step = int(state["step"])
        self.value = float(state["value"])


class FixedBeta(BetaController):
    kind = "fixed"

    def __init__(self, beta: float) -> None:
        super().__init__()
        if beta < 0:
            raise UserError(f"beta must be >= 0, got {beta}; set --beta")
        self.value = float(beta)


SCHEDULES = ("linear", "cosine", "exponential", "piecewise")


class ScheduledBeta(BetaController):
    """β(step) from ``start`` to ``end`` over ``total_steps`` (held at ``end`` afterwards).

    - linear: start + (end - start)·s, s = min(step/total_steps, 1)
    - cosine: end + (start - end)·(1 + cos(π s))/2
    - exponential: start·(end/start)^s (geometric; start, end > 0)
    - piecewise: ``values[i]`` from ``milestones[i-1]`` on (``values[0]`` before the first milestone)
    """

    kind = "scheduled"

    def __init__(
        self,
        schedule: str,
        *,
        start: float = 0.1,
        end: float = 0.1,
        total_steps: int = 1,
        milestones: Sequence[int] = (),
        values: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise UserError(f"unknown beta schedule {schedule!r}; set --beta_schedule to one of {SCHEDULES} (or none)")
        if schedule == "exponential" and (start <= 0 or end <= 0):
            raise UserError("the exponential beta schedule needs start > 0 and end > 0")
        if schedule == "piecewise":
            if len(values) != len(milestones) + 1:
                raise UserError("piecewise beta schedule: need len(values) == len(milestones) + 1")
            if list(milestones) != sorted(milestones):
                raise UserError("piecewise beta schedule: milestones must be increasing")
        if total_steps < 1:
            raise UserError("beta schedule: total_steps must be >= 1")
        self.schedule, self.start, self.end, self.total_steps = schedule, float(start), float(end), int(total_steps)
        self.milestones, self.values = list(milestones), [float(v) for v in values]
        self.value = self.at(0)

    def at(self, step: int) -> float:
        s = min(step / self.total_steps, 1.0)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * s
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * s)) / 2
        if self.schedule == "exponential":
            return self.start * (self.end / self.start) ** s
        i = sum(1 for m in self.milestones if step >= m)
        return self.values[i]

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        self.step += 1
        self.value = self.at(self.step)
        return self.value


class AdaptiveKLController(BetaController):
    """Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2, and
    openai/lm-human-preferences ``train_policy.py::AdaptiveKLController``::

        e = clip(KL_seq / target - 1, -0.2, 0.2)
        β ← β · (1 + e · n_episodes / horizon)

    Released settings: init β 0.15, target 6 nats, horizon 10000 (124M model).

    ``stats()`` reports the step's unclipped error, whether it hit the clip, and the horizon. If the
    error has been clipped with the same sign for ``SATURATION_WARN_STEPS`` consecutive steps after
    half of ``total_steps`` (when given), β is moving as fast as the horizon allows and still not
    catching up: one warning says so.
    """

    kind = "adaptive"
    SATURATION_WARN_STEPS = 10

    def __init__(
        self,
        init_beta: float,
        *,
        target: float,
        horizon: int = 10000,
        clip: float = 0.2,
        total_steps: Optional[int] = None,
    ) -> None:
        super().__init__()
        if target <= 0:
            raise UserError(f"kl_target must be > 0, got {target}; set --kl_target (nats per sequence)")
        if init_beta <= 0:
            raise UserError("the adaptive KL controller needs an initial beta > 0 (it is multiplicative)")
        if horizon <= 0:
            raise UserError(f"kl_horizon must be > 0 episodes, got {horizon}")
        self.value, self.target, self.horizon, self.clip = float(init_beta), float(target), int(horizon), float(clip)
        self.total_steps = total_steps
        self.error: Optional[float] = None  # the last update's unclipped KL/target - 1
        self.saturated_run = 0  # consecutive updates clipped with the sign of ``error``
        self._warned = False

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        if kl is None:
            raise ValueError("AdaptiveKLController.update needs the measured mean sequence KL")
        self.step += 1
        raw = kl / self.target - 1.0
        error = min(max(raw, -self.clip), self.clip)
        self.value *= 1.0 + error * n_episodes / self.horizon
        same_side = self.error is not None and (raw > 0) == (self.error > 0)
        self.saturated_run = (self.saturated_run + 1 if same_side else 1) if abs(raw) >= self.clip else 0
        self.error = raw
        self._warn_if_stuck(n_episodes)
        return self.value

    def _warn_if_stuck(self, n_episodes: int) -> None:
        if self._warned or self.saturated_run < self.SATURATION_WARN_STEPS:
            return
        if self.total_steps is not None and 2 * self.step <= self.total_steps:
            return
        self._warned = True
        above = self.error > 0
        log.warning(
            "adaptive KL controller: the KL has been %s the target (%.3g nats) by more than %d%% for %d consecutive "
            "steps (step %d, beta now %.4g): beta moves at most %.2f%% a step with kl_horizon=%d and cannot keep up. "
            "Use a smaller kl_horizon%s.",
            "above" if above else "below",
            self.target,
            round(100 * self.clip),
            self.saturated_run,
            self.step,
            self.value,
            100 * self.clip * n_episodes / self.horizon,
            self.horizon,
            ", or a larger initial beta"
            if above
            else ", a smaller initial beta, or a larger learning rate (the target may be out of reach in this run)",
        )

    def stats(self) -> dict:
        if self.error is None:
            return {}
        return {
            "kl_ctl/error": self.error,
            "kl_ctl/saturated": float(abs(self.error) >= self.clip),
            "kl_ctl/horizon": float(self.horizon),
        }

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "horizon": self.horizon,
            "error": self.error,
            "saturated_run": self.saturated_run,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores β, the step and the horizon it was run with (a resumed run keeps its horizon even if
        ``kl_horizon: auto`` would now derive another from a changed max_steps; older checkpoints
        without one keep the configured horizon)."""
        super().load_state_dict(state)
        if state.get("horizon") is not None and int(state["horizon"]) != self.horizon:
            log.warning(
                "adaptive KL controller: the checkpoint's kl_horizon %s replaces the configured %s",
                state["horizon"],
                self.horizon,
            )
            self.horizon = int(state["horizon"])
        self.error = state.get("error")
        self.saturated_run = int(state.get("saturated_run", 0))


class ConstraintBeta(BetaController):
    """β as the Lagrange multiplier of KL ≤ budget: projected dual ascent
    β ← clip(β + η·(KL - budget), β_min, β_max). β grows while the constraint is violated and
    decays toward β_min once the KL is under budget (complementary slackness)."""

    kind = "constraint"

    def __init__(
        self, init_beta: float, *, budget: float, lr: float = 0.01, beta_min: float = 0.0, beta_max: float = 1e3
    ) -> None:
        super().__init__()
        if budget <= 0:
            raise UserError(f"kl_budget must be > 0, got {budget}; set --kl_budget (nats per sequence)")
        self.value, self.budget, self.lr = float(init_beta), float(budget), float(lr)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        if kl is None:
            raise ValueError("ConstraintBeta.update needs the measured mean sequence KL")
        self.step += 1
        self.value = min(max(self.value + self.lr * (kl - self.budget), self.beta_min), self.beta_max)
        return self.value


KL_HORIZONS = {"ziegler": 10000}
"""Named adaptive-controller horizons (episodes): Ziegler et al.'s released setting."""
AUTO_KL_LOG_RANGE = 5.0
"""ln(β_end/β_0) that ``auto_kl_horizon`` lets a run reach when every step's error is clipped (e^5 ≈ 150x)."""


def auto_kl_horizon(
    total_episodes: int, episodes_per_step: int, *, clip: float = 0.2, log_range: float = AUTO_KL_LOG_RANGE
) -> int:
    """The adaptive controller's horizon scaled to the run, so that β can move by e^±log_range over it.

    Derivation: a step whose error is clipped multiplies β by (1 ± clip·n/H), n = episodes per step;
    over N = total_episodes/n such steps ln(β_end/β_0) = N·ln(1 ± clip·n/H) ≈ ±clip·total_episodes/H.
    Setting that to ``log_range`` gives H = clip·total_episodes/log_range, rounded.

    Why e^5 (≈ 150x; measured with ``tether ppo --kl_target 3`` on stories260K, 60 steps of 8, the
    PPO defaults otherwise): the β a target needs is not known in advance, and the KL is below target
    for the first ~8 steps (the policy has not moved yet), so β first falls (0.05 -> ~0.027) and then
    has to climb past where it started: holding 3 nats took β ≈ 0.7, ln(0.7/0.027) ≈ 3.3 in ~50 steps.
    e^4 was just enough (mean KL of the last 10 steps +26%/+21% over the target, seeds 0/1), e^5
    better (+16%/+11%/+16%, seeds 0/1/2), e^6 too fast: the KL lags β by 10-20 steps (it can only
    fall as fast as the learning rate moves the policy), so β overshot to 1.9 (seed 1) with the KL
    still above target. The KL's step-to-step noise (~10% at 8 episodes, half the clip) moves log β
    by ~(n/H)·0.1 ≈ 0.04 a step at e^5: a random walk of ±13% over 10 steps, small against the
    0.08 a step of a saturated error.

    H is at least n: one step never moves β by more than the factor 1 ± clip (so short runs reach less
    than e^log_range)."""
    if total_episodes < 1 or episodes_per_step < 1:
        raise UserError(
            f"auto kl_horizon needs total_episodes >= 1 and episodes_per_step >= 1, "
            f"got {total_episodes} and {episodes_per_step}"
        )
    return max(round(clip * total_episodes / log_range), int(episodes_per_step))


def initial_beta_for_kl(reward_var: float, kl_target: float) -> float:
    """A starting β for an adaptive run that aims at ``kl_target`` nats: β₀ = sqrt(Var / (2·KL_target)),
    Var = E_x Var_{y~π_ref(·|x)}[r(x, y)], the reward's spread among one prompt's reference samples.

    Derivation (docs/theory.md §4-§5): at the optimum π*_β, dKL[π*_β‖π_ref]/dβ = −Var_{π*_β}(r)/β³ and the
    KL vanishes as β → ∞. Where π*_β is still close to π_ref, Var_{π*_β}(r) ≈ Var_{π_ref}(r), and
    integrating from β to ∞ gives KL ≈ Var/(2β²) per prompt (the leading, variance term of the tilt's
    cumulant expansion). Solving KL_target = Var/(2β²) gives β₀. It only starts the controller near the
    right scale: the next term makes the KL at β₀ off by a relative (2√2/3)·skewness·√KL_target, not a
    second-order amount (a rare-success reward, Bernoulli p = 0.1: 1.28x, 1.97x, 2.43x the target at
    0.01, 0.1, 0.5 nats; docs/theory.md §4), and a run of a few dozen steps is not at its optimum."""
    if reward_var <= 0 or kl_target <= 0:
        raise UserError(
            f"a starting beta from the reward's spread needs a within-prompt reward variance > 0 and "
            f"kl_target > 0, got {reward_var:g} and {kl_target:g}; if the reward is constant among one "
            f"prompt's reference samples, give the starting beta yourself (the demo's --ppo_init_beta)"
        )
    return math.sqrt(reward_var / (2.0 * kl_target))


def resolve_kl_horizon(
    horizon: Union[int, str, None], *, total_steps: int, episodes_per_step: Optional[int], clip: float = 0.2
) -> int:
    """``kl_horizon`` -> episodes: an integer as given, a name of ``KL_HORIZONS``, or ``auto`` (None too):
    ``auto_kl_horizon(total_steps·episodes_per_step, episodes_per_step)``."""
    if horizon is None or horizon == "auto":
        if episodes_per_step is None:
            raise UserError(
                "kl_horizon: auto needs the run's episodes per step (build_controller(episodes_per_step=...))"
            )
        return auto_kl_horizon(total_steps * episodes_per_step, episodes_per_step, clip=clip)
    if isinstance(horizon, str) and horizon in KL_HORIZONS:
        return KL_HORIZONS[horizon]
    if isinstance(horizon, int) and not isinstance(horizon, bool) and horizon > 0:
        return horizon
    raise UserError(
        f"kl_horizon must be a positive number of episodes, 'auto' or one of {sorted(KL_HORIZONS)}; got {horizon!r}"
    )


@config_group("beta", prefixes=("beta", "kl"))
@dataclass
class BetaScheduleConfig:
    """β fixed or on a schedule: the β group of a trainer that does not measure an on-policy KL every
    step (dpo). YAML may nest it: ``beta: {schedule: linear, end: 0.05}``."""

    beta: float = 0.1
    """Fixed β, or the initial β of the adaptive/constraint controllers."""
    beta_schedule: str = "none"
    """none | linear | cosine | exponential | piecewise: β over steps from `beta` to `beta_end`."""
    beta_end: float = 0.1
    """Final β of a schedule."""
    beta_milestones: list = field(default_factory=list)
    """Piecewise schedule: steps at which β switches to the next of `beta_values`."""
    beta_values: list = field(default_factory=list)
    """Piecewise schedule: the β values (one more than milestones)."""


@config_group("beta", prefixes=("beta", "kl"))
@dataclass
class BetaConfig(BetaScheduleConfig):
    """How β is chosen, controllers included: the β group of the online trainers (ppo, grpo, rloo),
    which measure the KL every step. YAML may nest it: ``beta: {beta: 0.05, target: 4}`` (kl_target)."""

    kl_target: Optional[float] = None
    """If set, the adaptive (Ziegler) controller drives the mean sequence KL toward this value (nats)."""
    kl_horizon: Optional[Union[int, str]] = "auto"
    """Adaptive controller horizon in episodes: auto (scaled to max_steps x batch_size so that β can move
    e^±5 over the run: tether.control.auto_kl_horizon), ziegler (10000, Ziegler et al.'s), or a number."""
    kl_budget: Optional[float] = None
    """If set, the constraint (Lagrangian) controller keeps the mean sequence KL at or below this."""
    kl_budget_lr: float = 0.01
    """Dual-ascent step size of the constraint controller."""


def build_controller(
    cfg: BetaScheduleConfig, *, total_steps: int = 1, episodes_per_step: Optional[int] = None
) -> BetaController:
    """The one place a BetaConfig (or a BetaScheduleConfig: fixed or scheduled β only) becomes a
    controller. ``total_steps``: the run's optimisation steps (schedules; the adaptive controller's auto
    horizon and warning); ``episodes_per_step``: the ``n_episodes`` each ``update`` will be given (the
    auto horizon)."""
    kl_target, kl_budget = getattr(cfg, "kl_target", None), getattr(cfg, "kl_budget", None)
    chosen = [kl_target is not None, kl_budget is not None, cfg.beta_schedule not in ("none", None, "")]
    if sum(chosen) > 1:
        raise UserError("choose at most one of kl_target (adaptive), kl_budget (constraint) and beta_schedule")
    if kl_target is not None:
        horizon = resolve_kl_horizon(cfg.kl_horizon, total_steps=total_steps, episodes_per_step=episodes_per_step)
        return AdaptiveKLController(cfg.beta, target=kl_target, horizon=horizon, total_steps=total_steps)
    if kl_budget is not None:
        return ConstraintBeta(cfg.beta, budget=cfg.kl_budget, lr=cfg.kl_budget_lr)
    if chosen[2]:
        return ScheduledBeta(
            cfg.beta_schedule,
            start=cfg.beta,
            end=cfg.beta_end,
            total_steps=total_steps,
            milestones=cfg.beta_milestones,
            values=cfg.beta_values,
        )
    return FixedBeta(cfg.beta)
