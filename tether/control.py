"""β controllers: how the KL coefficient is chosen over training (MATH.md §4).

Each controller exposes ``value`` (the β to use now), ``update(kl=..., n_episodes=...)`` called
once per optimisation step *after* the step's KL is measured, and ``state_dict()`` /
``load_state_dict()`` so checkpoints restore it exactly. No torch: β is a Python float.

- ``FixedBeta``: β constant.
- ``ScheduledBeta``: β as a function of the step (linear, cosine, exponential, piecewise), e.g. the
  "start conservative and relax" pattern, β decreasing.
- ``AdaptiveKLController``: Ziegler et al. 2019 (openai/lm-human-preferences ``AdaptiveKLController``):
  e = clip(KL/KL_target - 1, -0.2, 0.2); β ← β·(1 + e·n/horizon), n = episodes in the batch, KL the
  mean *sequence-sum* KL.
- ``ConstraintBeta``: the Lagrangian form of "maximise reward s.t. KL ≤ budget": β is the dual
  variable, updated by projected dual ascent β ← max(0, β + η·(KL - budget)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence


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

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} β controller, this run uses {self.kind!r}")
        self.step = int(state["step"])
        self.value = float(state["value"])


class FixedBeta(BetaController):
    kind = "fixed"

    def __init__(self, beta: float) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
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
            raise ValueError(f"unknown beta schedule {schedule!r}; choose from {SCHEDULES}")
        if schedule == "exponential" and (start <= 0 or end <= 0):
            raise ValueError("the exponential beta schedule needs start > 0 and end > 0")
        if schedule == "piecewise":
            if len(values) != len(milestones) + 1:
                raise ValueError("piecewise beta schedule: need len(values) == len(milestones) + 1")
            if list(milestones) != sorted(milestones):
                raise ValueError("piecewise beta schedule: milestones must be increasing")
        if total_steps < 1:
            raise ValueError("beta schedule: total_steps must be >= 1")
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
    """

    kind = "adaptive"

    def __init__(self, init_beta: float, *, target: float, horizon: int = 10000, clip: float = 0.2) -> None:
        super().__init__()
        if target <= 0:
            raise ValueError(f"kl_target must be > 0, got {target}")
        if init_beta <= 0:
            raise ValueError("the adaptive KL controller needs an initial beta > 0 (it is multiplicative)")
        self.value, self.target, self.horizon, self.clip = float(init_beta), float(target), int(horizon), float(clip)

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        if kl is None:
            raise ValueError("AdaptiveKLController.update needs the measured mean sequence KL")
        self.step += 1
        error = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value


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
            raise ValueError(f"kl_budget must be > 0, got {budget}")
        self.value, self.budget, self.lr = float(init_beta), float(budget), float(lr)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def update(self, *, kl: Optional[float] = None, n_episodes: int = 1) -> float:
        if kl is None:
            raise ValueError("ConstraintBeta.update needs the measured mean sequence KL")
        self.step += 1
        self.value = min(max(self.value + self.lr * (kl - self.budget), self.beta_min), self.beta_max)
        return self.value


@dataclass
class BetaConfig:
    """How β is chosen. Used as a field group of every trainer's config."""

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
    kl_target: Optional[float] = None
    """If set, the adaptive (Ziegler) controller drives the mean sequence KL toward this value (nats)."""
    kl_horizon: int = 10000
    """Adaptive controller horizon (episodes)."""
    kl_budget: Optional[float] = None
    """If set, the constraint (Lagrangian) controller keeps the mean sequence KL at or below this."""
    kl_budget_lr: float = 0.01
    """Dual-ascent step size of the constraint controller."""


def build_controller(cfg: BetaConfig, *, total_steps: int = 1) -> BetaController:
    """The one place a BetaConfig becomes a controller."""
    chosen = [cfg.kl_target is not None, cfg.kl_budget is not None, cfg.beta_schedule not in ("none", None, "")]
    if sum(chosen) > 1:
        raise ValueError("choose at most one of kl_target (adaptive), kl_budget (constraint) and beta_schedule")
    if cfg.kl_target is not None:
        return AdaptiveKLController(cfg.beta, target=cfg.kl_target, horizon=cfg.kl_horizon)
    if cfg.kl_budget is not None:
        return ConstraintBeta(cfg.beta, budget=cfg.kl_budget, lr=cfg.kl_budget_lr)
    if chosen[2]:
        return ScheduledBeta(
            cfg.beta_schedule, start=cfg.beta, end=cfg.beta_end, total_steps=total_steps,
            milestones=cfg.beta_milestones, values=cfg.beta_values,
        )
    return FixedBeta(cfg.beta)
