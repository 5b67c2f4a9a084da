"""RLOO: REINFORCE with a leave-one-out baseline, KL in the reward (Ahmadian et al. 2024, "Back to
Basics"; Kool et al. 2019).

The loop is ``online.train_online``; this file is RLOO's two pieces:

- ``prepare``: each completion's sequence reward is its score minus β x the detached sequence sum of
  the per-token KL (k1 by default: ``ops.policy.token_rewards`` summed over the completion, docs/theory.md §1),
  and its advantage is that reward minus the mean of the other k - 1 completions of the same prompt
  (``ops.policy.rloo_advantages``). No value model.
- ``loss``: the sequence advantage on every token through the clipped surrogate (PPO Eq. 7) with
  ``loss_aggregation=seq_sum``: with one epoch and one minibatch ρ = 1 and this is exactly the RLOO
  gradient -A_i·∇log π_θ(y_i); with more updates per rollout the ratio corrects for π_old (as TRL's
  RLOOTrainer does).

The KL estimator sits in the reward as a detached value, so k1 gives the unbiased ∇KL[π_θ‖π_ref],
k2 and k3 biased ones (docs/theory.md §3), and exact an unbiased one only with its direct term, which the
loss adds (``method.exact_kl_direct_term``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserError
from ..ops.kl import seq_sum
from ..ops.policy import (
    aggregate_loss,
    masked_mean,
    masked_std,
    masked_whiten,
    ppo_policy_loss,
    rloo_advantages,
    token_rewards,
)
from ..ops.positions import weight_by_position
from .method import Counts, LossInputs, OnlineMethod, Prepared, beta_weights, reward_kl_direct_term
from .mismatch import loss_weights
from .online import OnlineConfig, train_online
from .result import TrainResult


@dataclass
class RLOOConfig(OnlineConfig):
    """Config of ``tether rloo`` (OnlineConfig's fields plus these)."""

    beta: float = 0.05
    """β of the detached sequence KL subtracted from the score (TRL RLOO: 0.05)."""
    samples_per_prompt: int = 4
    """k: completions per prompt (>= 2; the baseline of each is the mean of the other k - 1)."""
    kl_estimator: str = "k1"
    """KL in the reward: k1 (the paper; unbiased gradient; recommended) | exact (unbiased with its direct term, added
    to the loss; lower variance per token, but not always per sequence, and a noise floor at π*: docs/theory.md §2) |
    k2, k3 (biased, docs/theory.md §3)."""
    loss_aggregation: str = "seq_sum"
    """seq_sum (RLOO: one action per sequence) | token_mean | seq_mean_token_mean."""
    normalize_advantages: bool = False
    """Standardise the advantages over the rollout (per process; TRL normalize_advantages)."""

    method: ClassVar[str] = "rloo"


def prepare(
    *, scores: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor, values=None, cfg: RLOOConfig, beta: float
) -> Prepared:
    """Sequence reward score - β·Σ_t kl_t -> leave-one-out advantages (B,). scores (B,), kl_tokens / mask (B, T)."""
    rewards = token_rewards(scores, kl_tokens, mask, beta=beta)  # (B, T)
    seq_rewards = seq_sum(rewards, mask)  # (B,) score - β·Σ_t kl_t
    adv = rloo_advantages(seq_rewards, group_size=cfg.samples_per_prompt)  # (B,)
    scale = 1.0
    if cfg.normalize_advantages:
        ones = torch.ones_like(adv, dtype=torch.bool).unsqueeze(-1)  # (B, 1)
        scale = float(masked_std(adv.unsqueeze(-1), ones))
        adv = masked_whiten(adv.unsqueeze(-1), ones).squeeze(-1)  # (B, 1) -> (B,)
    return Prepared(adv, rewards=rewards, adv_scale=scale)


def loss(x: LossInputs, *, cfg: RLOOConfig, beta: float, counts: Counts) -> tuple[torch.Tensor, dict]:
    """The sequence advantage on every token through the clipped surrogate (PPO Eq. 7); with the exact
    estimator in the reward, + β/adv_scale x its direct term (``method.exact_kl_direct_term``)."""
    pg, pg_stats = ppo_policy_loss(x.logps, x.old_logps, x.advantages, x.mask, clip=cfg.clip_eps)  # (B, T)
    cw = loss_weights(x, cfg)  # behaviour_correction: samples from μ, weighted back to π_old (trainers/mismatch.py)
    pg = cw.weights * pg  # the KL in the reward is in the advantages: corrected with the policy gradient
    direct = reward_kl_direct_term(cfg, x)  # exact: the direct part of ∇KL that a detached KL in the reward misses
    if direct is not None:  # a function of s_t only: it takes the state weight
        pg = pg + (beta / x.adv_scale) * cw.state_weights * weight_by_position(direct, beta_weights(cfg, x.mask))
    total = aggregate_loss(
        pg, x.mask, mode=cfg.loss_aggregation, num_tokens=counts.tokens, num_seqs=counts.seqs, weights=x.weights
    )
    stats = {
        "policy_loss": masked_mean(pg, x.mask).detach(),
        "clipfrac": pg_stats["clipfrac"],
        "approx_kl_old": pg_stats["approx_kl_old"],
    }
    return total, stats


def validate(cfg: RLOOConfig) -> None:
    if cfg.samples_per_prompt < 2:
        raise UserError(
            f"RLOO needs samples_per_prompt >= 2 (the leave-one-out baseline), got {cfg.samples_per_prompt}"
        )


RLOO = OnlineMethod(name="rloo", prepare=prepare, loss=loss, validate=validate)


def train_rloo(cfg: RLOOConfig, **kwargs) -> TrainResult:
    """``train_online(cfg, method=RLOO, **kwargs)``: see its docstring for the arguments and result."""
    return train_online(cfg, method=RLOO, **kwargs)
