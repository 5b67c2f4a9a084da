"""GRPO: group-normalised advantages and the KL in the loss (Shao et al. 2024, DeepSeekMath §4.1).

The loop is ``online.train_online``; this file is GRPO's two pieces:

- ``prepare``: the ``samples_per_prompt`` = G completions of a prompt form a group; each gets the
  outcome advantage (r_i - mean_group) / (std_group + ε) on every token (``ops.policy.group_advantages``;
  ``scale_rewards=False`` only centres, as Dr. GRPO argues). No value model, no KL in the reward.
- ``loss``: clipped surrogate with π_old (PPO Eq. 7) + β x the per-token KL term in the loss
  (``ops.kl.kl_loss_term``), aggregated as DeepSeekMath Eq. 3 does: 1/G Σ_i 1/|o_i| Σ_t
  (``loss_aggregation=seq_mean_token_mean``; ``token_mean`` is DAPO's choice).

Which KL, and the bias of each choice (docs/theory.md §3; ``ops.kl.ESTIMATORS``), set by ``kl_estimator`` and
``kl_placement``:

- ``k3`` + ``loss`` (the paper's default): the value is unbiased for KL[π_θ‖π_ref], but its gradient is
  the *forward* KL's, ∇KL[π_ref(·|s)‖π_θ(·|s)], at the states π_θ visits — a mass-covering regulariser
  different from the reverse KL the objective (docs/theory.md §1) penalises. Fixed point:
  ``oracle.forward_kl_optimum`` (certified by ``tether certify``).
- ``k2`` + ``loss``, ``k3`` + ``loss_is``, ``k1`` + ``loss_is``, ``exact`` + ``loss``: all give the
  *local* gradient Σ_t E_{s_t}[∇KL_t] with the visited states held fixed — ∇KL[π_θ‖π_ref] for a single
  token, but on sequences it misses how early tokens change later states (Tang & Munos,
  arXiv:2506.09477), so they converge to ``oracle.certify_targets.local_kl_optimum``, not π* (certified).
  The π_θ/π_old weight (DeepSeek-V3.2; TRL ``use_bias_correction_kl``) corrects the token distribution
  off-policy, not the state distribution.
- ``k1`` + ``loss`` has zero expected gradient (no regularisation) and is rejected.
- With the defaults (std-scaled group advantages, ``seq_mean_token_mean``) GRPO's fixed point is
  neither π* nor the forward-KL optimum: ``oracle.certify_targets.grpo_fixed_point``.

For the exact reverse-KL optimum use PPO or RLOO (KL in the reward).

``kl/ref`` reports the exact sequence KL of the rollout whatever is chosen here; ``grpo/kl_loss`` is
the token mean of the term as applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserError
from ..ops.kl import ESTIMATORS, kl_loss_term
from ..ops.policy import aggregate_loss, group_advantages, masked_mean, ppo_policy_loss
from ..ops.positions import weight_by_position
from .method import Counts, LossInputs, OnlineMethod, Prepared, beta_weights
from .mismatch import loss_weights
from .online import OnlineConfig, train_online
from .result import TrainResult

KL_PLACEMENTS = ("loss", "loss_is")


@dataclass
class GRPOConfig(OnlineConfig):
    """Config of ``tether grpo`` (OnlineConfig's fields plus these)."""

    beta: float = 0.04
    """β of the KL term in the loss (DeepSeekMath: 0.04)."""
    samples_per_prompt: int = 4
    """Group size G: completions per prompt (>= 2)."""
    kl_estimator: str = "k3"
    """KL term in the loss: k3 (the paper; gradient of the *forward* KL) | k2 (reverse-KL gradient on-policy) | k1
    (only with loss_is) | exact. See the module docstring."""
    kl_placement: str = "loss"
    """loss: the estimator's value differentiated as is | loss_is: weighted by π_θ/π_old (k3 + loss_is gives the
    per-token reverse-KL gradient; on sequences it is local: see the module docstring)."""
    scale_rewards: bool = True
    """Divide group-centred scores by the group std (DeepSeekMath); False only centres them (Dr. GRPO)."""
    loss_aggregation: str = "seq_mean_token_mean"
    """seq_mean_token_mean (DeepSeekMath Eq. 3) | token_mean (DAPO) | seq_sum."""

    method: ClassVar[str] = "grpo"


def prepare(*, scores: torch.Tensor, kl_tokens=None, mask=None, values=None, cfg: GRPOConfig, beta: float) -> Prepared:
    """Group-normalised outcome advantages (B,); the KL is not in the reward. scores (B,)."""
    return Prepared(group_advantages(scores, group_size=cfg.samples_per_prompt, scale=cfg.scale_rewards))


def loss(x: LossInputs, *, cfg: GRPOConfig, beta: float, counts: Counts) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate with π_old (PPO Eq. 7) + β x the per-token KL term (DeepSeekMath Eq. 3), with
    ``kl_clamp_input``/``kl_clamp_output`` applied to the KL term (``grpo/kl_clamped_frac`` logs how often)."""
    pg, pg_stats = ppo_policy_loss(x.logps, x.old_logps, x.advantages, x.mask, clip=cfg.clip_eps)  # (B, T)
    full = ESTIMATORS[cfg.kl_estimator].needs_logits  # exact: reads both full distributions
    kl = kl_loss_term(
        x.logps,
        x.ref_logps,
        x.mask,
        estimator=cfg.kl_estimator,
        old_logps=x.old_logps if cfg.kl_placement == "loss_is" else None,
        logits=x.logits if full else None,
        ref_logits=x.ref_logits if full else None,
        exact=x.kl_exact if full else None,  # the chunked head's (chunked_head): the same KL, no (B, T, V) logits
        clamp_input=cfg.kl_clamp_input,
        clamp_output=cfg.kl_clamp_output,
    )
    # behaviour_correction (trainers/mismatch.py): both terms are over the sampled token, so both take the
    # weight; a loss-side KL sampled from μ needs it to stay the stated gradient (with loss_is: π_θ/μ)
    w = loss_weights(x, cfg).weights  # (B, T), 1 with behaviour_correction: none
    per_token = w * (pg + beta * weight_by_position(kl.per_token, beta_weights(cfg, x.mask)))
    total = aggregate_loss(
        per_token, x.mask, mode=cfg.loss_aggregation, num_tokens=counts.tokens, num_seqs=counts.seqs, weights=x.weights
    )
    stats = {
        "policy_loss": masked_mean(pg, x.mask).detach(),
        "clipfrac": pg_stats["clipfrac"],
        "approx_kl_old": pg_stats["approx_kl_old"],
        "kl_loss": masked_mean(kl.per_token, x.mask).detach(),
        "kl_clamped_frac": kl.clamped_frac.detach(),
    }
    return total, stats


def validate(cfg: GRPOConfig) -> None:
    if cfg.samples_per_prompt < 2:
        raise UserError(f"GRPO needs samples_per_prompt >= 2 (a group to normalise over), got {cfg.samples_per_prompt}")
    if cfg.kl_placement not in KL_PLACEMENTS:
        raise UserError(f"kl_placement must be one of {KL_PLACEMENTS}, got {cfg.kl_placement!r}")
    if cfg.kl_estimator == "k1" and cfg.kl_placement == "loss":
        raise UserError(
            "kl_estimator=k1 with kl_placement=loss has zero expected gradient (no regularisation, docs/theory.md §3); "
            "use kl_placement=loss_is, or k3/k2"
        )


GRPO = OnlineMethod(
    name="grpo", prepare=prepare, loss=loss, validate=validate, prepare_reads_scores=lambda cfg: False
)  # advantages from the rewards alone


def train_grpo(cfg: GRPOConfig, **kwargs) -> TrainResult:
    """``train_online(cfg, method=GRPO, **kwargs)``: see its docstring for the arguments and result."""
    return train_online(cfg, method=GRPO, **kwargs)
