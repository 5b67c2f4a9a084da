"""PPO with the KL-penalised reward (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

The loop is ``online.train_online``; this file is PPO's two pieces:

- ``prepare``: per-token rewards ``r_t = -β·sg(kl_t)``, plus the score at the last completion token
  (docs/theory.md §1, ``ops.policy.token_rewards``) -> GAE(γ, λ) against the value model's V(s_t) (PPO paper
  Eq. 11-12, ``ops.policy.gae``) -> advantages whitened over the rollout (``masked_whiten``; with the exact
  estimator in the reward, each completion with the other completions' statistics, ``masked_whiten_loo``:
  the batch's own σ̂ would bias the update's direction, docs/theory.md §3).
- ``loss``: clipped surrogate (PPO Eq. 7) + ``vf_coef`` x clipped value loss (``ppo_value_loss``),
  optionally + PPO-ptx: ``-ptx_coef`` x the token-mean log-likelihood of pretraining text
  (InstructGPT Eq. 2, γ·E_{x~D_pretrain}[log π(x)]; the paper's γ = 27.8 multiplies a per-token
  mean here, so it is not directly comparable).

The KL estimator in the reward is ``kl_estimator`` (default k1: with a detached value in the reward its
policy gradient is the unbiased ∇KL[π_θ‖π_ref]; k2's and k3's are biased — docs/theory.md §3; exact's is
unbiased only together with its direct term, which the loss adds: ``method.exact_kl_direct_term``). β is
fixed, scheduled or adaptive (``beta``, ``beta_schedule``, ``kl_target``: Ziegler's controller).

Deviations: advantages are whitened with this process's statistics (as TRL does), so with N processes
the result differs slightly from one process; the value of the state after the last token is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..data.text import batch_indices, collate, load_text_examples, prepare_sft
from ..errors import UserError
from ..ops.kl import ESTIMATORS
from ..ops.policy import (
    aggregate_loss,
    gae,
    masked_mean,
    masked_std,
    masked_whiten,
    masked_whiten_loo,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from ..ops.positions import weight_by_position
from ..value import VALUE_MODELS
from .method import Counts, LossInputs, OnlineMethod, Prepared, beta_weights, reward_kl_direct_term
from .mismatch import loss_weights
from .online import OnlineConfig, train_online
from .result import TrainResult
from .sft import token_nll


@dataclass
class PPOConfig(OnlineConfig):
    """Config of ``tether ppo`` (OnlineConfig's fields plus these)."""

    beta: float = 0.05
    """Fixed β, or the initial β of the adaptive controller (Stiennon et al. B.1: 0.05)."""
    value_model: str = "critic"
    """critic (a separate copy of the policy backbone with a scalar head) | head (a scalar head on the policy's last
    hidden state)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (TRL: 0.1)."""
    clip_value: float = 0.2
    """Value-loss clip ε in value units (openai/lm-human-preferences: 0.2)."""
    gamma: float = 1.0
    """GAE discount γ (docs/theory.md §7: 1)."""
    lam: float = 0.95
    """GAE λ (docs/theory.md §7: 0.95)."""
    whiten_advantages: bool = True
    """Standardise advantages over the rollout (per process; with kl_estimator=exact each completion with the other
    completions' mean and std, which keeps the direction unbiased: docs/theory.md §3)."""
    num_epochs: int = 4
    """PPO epochs over each rollout."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight γ of the pretraining log-likelihood term (InstructGPT Eq. 2); 0 = off."""
    ptx_dataset: Optional[str] = None
    """PPO-ptx text: a text file (one example per line) or any dataset tether sft reads."""
    ptx_batch_size: int = 8
    """Pretraining examples per optimiser update (global; divides over processes)."""
    ptx_max_length: int = 64
    """Tokens per pretraining example (truncated)."""

    method: ClassVar[str] = "ppo"


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over counted tokens (openai/baselines ``explained_variance``): 1 = the
    critic predicts the returns, 0 = no better than a constant, < 0 = worse. (B, T) x3 -> ()."""

    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    return 1.0 - var(returns - values) / var(returns).clamp(min=1e-8)


def prepare(
    *,
    scores: torch.Tensor,
    kl_tokens: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    cfg: PPOConfig,
    beta: float,
) -> Prepared:
    """Per-token rewards -> GAE -> (whitened) advantages. scores (B,), kl_tokens / mask / values (B, T)."""
    rewards = token_rewards(scores, kl_tokens, mask, beta=beta)  # (B, T): -β·kl_t, + score at the end
    adv, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)  # (B, T) each
    scale = 1.0
    if cfg.whiten_advantages and ESTIMATORS[cfg.kl_estimator].reward_direct_term:
        # the batch's own σ̂ biases the direction where advantages fluctuate at the optimum (exact in the
        # reward, docs/theory.md §3): each row is whitened with the other rows' statistics instead
        adv, scale = masked_whiten_loo(adv, mask)  # (B, T), (B, 1)
    elif cfg.whiten_advantages:
        scale = float(masked_std(adv, mask))
        adv = masked_whiten(adv, mask)
    stats = {
        "explained_variance": float(explained_variance(values, returns, mask)),
        "returns": float(masked_mean(returns, mask)),
    }
    return Prepared(adv, returns=returns, rewards=rewards, adv_scale=scale, stats=stats)


def loss(x: LossInputs, *, cfg: PPOConfig, beta: float, counts: Counts) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO Eq. 7) + vf_coef x clipped value loss; with the exact estimator in the
    reward, + β/adv_scale x its direct term (``method.exact_kl_direct_term``)."""
    pg, pg_stats = ppo_policy_loss(x.logps, x.old_logps, x.advantages, x.mask, clip=cfg.clip_eps)  # (B, T)
    vf, vf_stats = ppo_value_loss(x.values, x.old_values, x.returns, x.mask, clip=cfg.clip_value)  # (B, T)
    cw = loss_weights(x, cfg)  # behaviour_correction: samples from μ, weighted back to π_old (trainers/mismatch.py)
    pg = cw.weights * pg  # the KL in the reward is in the advantages: corrected with the policy gradient
    direct = reward_kl_direct_term(cfg, x)  # exact: the direct part of ∇KL that a detached KL in the reward misses
    if direct is not None:  # a function of s_t only: it takes the state weight
        pg = pg + (beta / x.adv_scale) * cw.state_weights * weight_by_position(direct, beta_weights(cfg, x.mask))
    n = {"num_tokens": counts.tokens, "num_seqs": counts.seqs, "weights": x.weights}
    total = aggregate_loss(pg, x.mask, mode=cfg.loss_aggregation, **n) + cfg.vf_coef * aggregate_loss(
        vf, x.mask, mode="token_mean", **n
    )
    stats = {
        "policy_loss": masked_mean(pg, x.mask).detach(),
        "value_loss": masked_mean(vf, x.mask).detach(),
        "clipfrac": pg_stats["clipfrac"],
        "approx_kl_old": pg_stats["approx_kl_old"],
        "vf_clipfrac": vf_stats["vf_clipfrac"],
    }
    return total, stats


class PtxTerm:
    """PPO-ptx (InstructGPT Eq. 2): adds -ptx_coef x (token-mean log-likelihood of a batch of
    pretraining text) to every optimiser update, backpropagating it immediately. The batch of update
    k is a pure function of (seed, k); the mean is over the global batch (all processes)."""

    def __init__(self, cfg: PPOConfig, tok, dist):
        examples = load_text_examples(cfg.ptx_dataset, assets=cfg.assets)
        self.items = prepare_sft(
            tok,
            examples,
            max_length=cfg.ptx_max_length,
            packing=False,
            completion_only_loss=False,
            append_eos=True,
            seed=cfg.seed,
        )
        if not self.items:
            raise ValueError(f"ptx_dataset {cfg.ptx_dataset!r} gives no examples with two or more tokens")
        self.cfg, self.pad_id = cfg, tok.pad_token_id

    def __call__(self, policy, k: int, dist) -> dict:
        idx = dist.shard(batch_indices(k, self.cfg.ptx_batch_size, len(self.items), seed=self.cfg.seed + 1))
        batch = {key: v.to(dist.device) for key, v in collate([self.items[i] for i in idx], pad_id=self.pad_id).items()}
        nll, n = token_nll(policy, batch)  # Σ NLL over tokens, number of tokens
        n_global = dist.sum_float(n)
        (self.cfg.ptx_coef * nll / n_global).backward()  # -γ·mean log π(x) of the global batch
        return {"ptx_nll": dist.sum_float(nll.detach()) / n_global}


def validate(cfg: PPOConfig) -> None:
    if cfg.value_model not in VALUE_MODELS:
        raise UserError(f"value_model must be one of {VALUE_MODELS}, got {cfg.value_model!r}")
    if not (0.0 <= cfg.gamma <= 1.0 and 0.0 <= cfg.lam <= 1.0):
        raise UserError(f"gamma and lam must lie in [0, 1], got gamma={cfg.gamma}, lam={cfg.lam}")
    if cfg.ptx_coef < 0:
        raise UserError(f"ptx_coef must be >= 0, got {cfg.ptx_coef}")
    if cfg.ptx_coef > 0 and not cfg.ptx_dataset:
        raise UserError("ptx_coef > 0 needs ptx_dataset: a text file of pretraining examples (one per line)")


PPO = OnlineMethod(
    name="ppo",
    prepare=prepare,
    loss=loss,
    validate=validate,
    uses_value_model=lambda cfg: True,
    make_aux=lambda cfg, tok, dist: PtxTerm(cfg, tok, dist) if cfg.ptx_coef > 0 else None,
)


def train_ppo(cfg: PPOConfig, **kwargs) -> TrainResult:
    """``train_online(cfg, method=PPO, **kwargs)``: see its docstring for the arguments and result."""
    return train_online(cfg, method=PPO, **kwargs)
