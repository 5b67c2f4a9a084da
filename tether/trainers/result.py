"""What every training function returns: one ``TrainResult`` (sft, rm, dpo, ppo, grpo, rloo).

``eval_hook`` has one meaning in every loop that takes it (``train_dpo``, ``train_online``):
``eval_hook(step, policy, *, beta) -> metrics`` is the run's *sampled* evaluation. When given, it runs
instead of the built-in one (the online methods' ``eval/kl`` and ``eval/reward/<name>``; DPO's ``kl/ref``
from sampled completions), at the same points: step 0 of a fresh run when ``eval_every`` > 0, every
``eval_every`` steps and the last step, on the main process only. The evaluations that sample nothing
(DPO's held-out pair metrics, the forgetting probe) and the diagnostics (reward hacking, DPO overfit)
still run, and everything lands in the same row of ``eval_history`` and of the metrics log. The demo
and ``tether sweep`` evaluate every method with one protocol this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

_FIELDS = ("final", "metrics", "history", "eval_history")


@dataclass
class TrainResult:
    """The outcome of one training run.

    ``result["key"]`` reads a field (``final``, ``metrics``, ``history``, ``eval_history``), else a fact of
    ``info``, else the last step's metric (``result["loss"]``, ``result["eval/loss"]``), as the dicts the
    train functions used to return were read."""

    final: str
    """The saved model folder (``OUTPUT_DIR/final``)."""
    metrics: dict
    """The last step's metrics, with its evaluation's where one ran (always at the last step)."""
    history: list = field(default_factory=list)
    """Every step's metrics, ``{"step": s, **metrics}``, from step 1 (a resumed run restores the earlier steps
    from its checkpoint)."""
    eval_history: list = field(default_factory=list)
    """Every evaluation's metrics, ``{"step": s, **metrics}`` (step 0: the starting policy, when evaluated)."""
    info: dict = field(default_factory=dict)
    """Facts about the run that are not step metrics (DPO: ``train_pairs``, ``eval_pairs``, ``skipped_rows``...)."""

    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            return getattr(self, key)
        if key in self.info:
            return self.info[key]
        return self.metrics[key]

    def __contains__(self, key: object) -> bool:
        return key in _FIELDS or key in self.info or key in self.metrics

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def summary(self, keys: Optional[Sequence[str]] = None) -> dict:
        """``{"final", **info, **metrics}``: what the ``tether`` training commands print as JSON. ``keys``:
        only these metrics (those present) and every ``eval/`` one; None: all of them."""
        metrics = (
            self.metrics
            if keys is None
            else {k: v for k, v in self.metrics.items() if k in keys or k.startswith("eval/")}
        )
        return {"final": self.final, **self.info, **metrics}
