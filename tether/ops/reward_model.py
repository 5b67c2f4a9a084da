"""Reward-model math: the Bradley–Terry preference loss and running reward statistics.

Pure torch. Sources:

- Bradley & Terry (1952); as a reward-model loss: Stiennon et al. 2020 Eq. 1, Ouyang et al. 2022
  Eq. 1: ``loss = -log σ(r(x, y_w) - r(x, y_l))``.
- Margin variant: Touvron et al. 2023 (Llama 2) Eq. 2: ``-log σ(r_w - r_l - m)``, m ≥ 0 a
  per-pair margin (larger for more clearly separated pairs).
- Running mean/variance: Chan, Golub & LeVeque (1979), the parallel (batch-merge) update, as used for
  reward normalisation by openai/lm-human-preferences and TRL's ``RunningMoments``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: Optional[torch.Tensor | float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean Bradley–Terry loss over pairs and its stats.

    chosen_scores, rejected_scores: (B,) scalar reward-model outputs ``scores`` for y_w and y_l.
    margin: optional (B,) tensor or float m (Llama 2 Eq. 2); None = plain BT (Stiennon Eq. 1).

    Returns ``(loss, stats)``: loss () = mean_b -log σ(s_w - s_l - m), computed with ``logsigmoid``
    so it is finite for any gap; stats (detached, each ()): ``accuracy`` = fraction with s_w > s_l
    (ties count as wrong, so an untrained constant model scores 0, not 0.5), ``margin`` = mean
    s_w - s_l, ``chosen`` / ``rejected`` = mean scores.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen and rejected scores must both be (B,), got {tuple(chosen_scores.shape)} and "
            f"{tuple(rejected_scores.shape)}"
        )
    gap = chosen_scores.float() - rejected_scores.float()  # (B,)
    logits = gap if margin is None else gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device)
    loss = -F.logsigmoid(logits).mean()  # Stiennon Eq. 1 / Llama 2 Eq. 2
    stats = {
        "accuracy": (gap > 0).float().mean().detach(),
        "margin": gap.mean().detach(),
        "chosen": chosen_scores.float().mean().detach(),
        "rejected": rejected_scores.float().mean().detach(),
    }
    return loss, stats


def update_moments(
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge a batch into running moments (Chan et al. 1979).

    mean, var, count: () float64 running mean, population variance and number of values seen so far
    (count 0 = empty); x: (B,) new values. Returns the updated (mean, var, count), equal (up to
    float64 rounding) to the mean and population variance of all values seen, in any batching.

        δ = mean_x - mean;  n = count + B
        mean' = mean + δ·B/n
        M2'   = var·count + var_x·B + δ²·count·B/n;   var' = M2'/n
    """
    x = x.detach().double().flatten()
    b = x.numel()
    if b == 0:
        return mean, var, count
    bmean = x.mean()
    bvar = x.var(unbiased=False)
    n = count + b
    delta = bmean - mean
    new_mean = mean + delta * b / n
    m2 = var * count + bvar * b + delta.pow(2) * count * b / n
    return new_mean, m2 / n, n


def weighted_reward_sum(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The total of several rewards: Σ_k w_k·r_k per completion, NaN entries ("not applicable") left out.

    rewards_per_func: (B, K) float32, one column per reward, NaN where a reward does not score that
    completion (a reward function's ``None``); weights: (K,) w_k. Returns (B,) float32
    ``(rewards_per_func * weights).nansum(dim=1)``: TRL's GRPOTrainer combines its ``reward_funcs`` with
    ``reward_weights`` exactly so. A row of all NaN sums to 0 here; callers refuse such rows first
    (``tether.rewards.WeightedRewards``).
    """
    if rewards_per_func.dim() != 2 or weights.shape != rewards_per_func.shape[1:]:
        raise ValueError(
            f"rewards_per_func must be (B, K) and weights (K,), got {tuple(rewards_per_func.shape)} and "
            f"{tuple(weights.shape)}"
        )
    return (rewards_per_func * weights.to(rewards_per_func.dtype).unsqueeze(0)).nansum(dim=1)


def nan_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the variance) of the non-NaN entries of ``x`` (any
    shape), in float64: TRL's ``nanmean`` / ``nanstd`` of one reward's column. (nan, nan) with no value,
    std nan with one."""
    v = x.detach().double().flatten()
    v = v[~torch.isnan(v)]
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = v.mean()
    var = float((v - mean).square().sum()) / (n - 1) if n > 1 else float("nan")
    return float(mean), math.sqrt(var)  # math.sqrt: correctly rounded
