"""The online method contract: what PPO, GRPO, RLOO (and any method added to ``tether.registry``)
supply to the one rollout-and-update loop of ``online.train_online``, and what it hands them.

A method is an ``OnlineMethod``: ``prepare`` turns a rollout's tensors into advantages (``Prepared``),
``loss`` turns one micro-batch (``LossInputs``) into its share of the update's loss. Both are pure
functions of tensors, so the loop, the unit tests and the exact certificate (``tether.oracle``) call
the very same functions. This module imports no loop code: a method's file needs only it and
``tether.ops``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ops.kl import ESTIMATORS, kl_loss_term
from ..ops.positions import position_weights


@dataclass(frozen=True)
class Counts:
    """Global normalisers of one optimiser update (all processes, all micro-batches). With row
    ``weights`` (``LossInputs.weights``) they are the weighted counts: Σ w for sequences, Σ w·|y| for
    tokens."""

    tokens: float
    seqs: float


@dataclass
class Prepared:
    """What a method's ``prepare`` returns for a rollout (nothing is written into the rollout).

    ``adv_scale`` is what the advantages were divided by (whitening; 1 otherwise): a loss-side term
    that must stay in the reward's units next to whitened advantages (the exact estimator's direct
    term) is divided by it too, so the loss reads it from here rather than from a side channel."""

    advantages: torch.Tensor  # (B, T) per token, or (B,) per sequence
    returns: Optional[torch.Tensor] = None  # (B, T) value targets (PPO)
    rewards: Optional[torch.Tensor] = None  # (B, T) per-token rewards with the KL in them (PPO, RLOO)
    adv_scale: object = 1.0  # float, or (B, 1) tensor (leave-one-out whitening, ppo.prepare)
    stats: dict = field(default_factory=dict)  # local token-mean scalars; the loop logs them as "<method>/<key>"

    def select(self, idx) -> "Prepared":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        scale = pick(self.adv_scale) if isinstance(self.adv_scale, torch.Tensor) else self.adv_scale
        return Prepared(pick(self.advantages), pick(self.returns), pick(self.rewards), scale, self.stats)


@dataclass
class LossInputs:
    """Everything a method's ``loss`` sees for one micro-batch: tensors only (no model, no config
    object beyond the method's own). Built by ``online.loss_inputs``; unit tests and the exact
    certificate build it by hand.

    Shapes: B completions, T completion positions, V vocabulary. ``logits``/``logps``/``values``
    carry gradients (the current policy and value model); the rest are detached rollout data."""

    logps: torch.Tensor  # (B, T) log π_θ of the sampled tokens (sampling filters applied), 0 off-mask
    old_logps: torch.Tensor  # (B, T) log π_old at rollout
    ref_logps: (
        torch.Tensor
    )  # (B, T) log π^τ_ref: tempered, unfiltered (restricted to F_t with kl_reference_filter: restricted)
    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B, T) or (B,)
    adv_scale: object = 1.0  # Prepared.adv_scale: float or (B, 1)
    logits: Optional[torch.Tensor] = None  # (B, T, V) policy logits (exact estimator in a loss)
    ref_logits: Optional[torch.Tensor] = None  # (B, T, V), present when method.needs_ref_logits(cfg)
    kl_exact: Optional[torch.Tensor] = None  # (B, T) exact KL[π_θ‖π^τ_ref] per token with its gradient, in place of
    # logits/ref_logits when the update scores through the chunked LM head (ops.head.head_scores; chunked_head)
    values: Optional[torch.Tensor] = None  # (B, T) current value predictions (PPO)
    old_values: Optional[torch.Tensor] = None  # (B, T) values at rollout (PPO value clipping)
    returns: Optional[torch.Tensor] = None  # (B, T) value targets (PPO)
    behaviour_logps: Optional[torch.Tensor] = None  # (B, T) log μ: the sampler's own log-probs (behaviour_correction)
    weights: Optional[torch.Tensor] = None  # (B,) row weights for ``aggregate_loss``; None = each row counts once
    # (the trainers sample, so None; the exact certificate's "infinite batch" weights each enumerated row by its
    # probability under π_old, with weighted Counts: the N -> ∞ limit of a sampled batch)


def estimator_needs_logits(cfg) -> bool:
    """The config's KL estimator reads full distributions (``ESTIMATORS[...].needs_logits``: exact)."""
    return ESTIMATORS[cfg.kl_estimator].needs_logits


@dataclass(frozen=True)
class OnlineMethod:
    """What distinguishes PPO, GRPO and RLOO. Composition, not inheritance: the loop calls these, and
    so does the exact tier of ``tether certify`` (``oracle.certify_online``, on a tabular policy).

    prepare(*, scores, kl_tokens, mask, values, cfg, beta) -> Prepared: advantages (and returns /
        rewards) from the rollout's tensors; pure (it mutates nothing).
    loss(x: LossInputs, *, cfg, beta, counts) -> (loss, stats): the micro-batch's share of the
        update's loss (divided by the global ``counts``; ``aggregate_loss(..., weights=x.weights)``)
        and token-mean stats under plain keys ("policy_loss", "clipfrac", ...): the loop logs them as
        "<name>/<key>" and reads "approx_kl_old" (k3 of KL[π_old‖π_θ]) for ``target_kl_old``.
    needs_ref_logits(cfg) -> bool: the loss needs the reference's full distributions (default: the
        estimator's ``needs_logits``); the loop then fetches them once per rollout.
    prepare_reads_scores(cfg) -> bool: ``prepare`` reads the models' scores of the rollout (the KL in
        the reward, values), not only the rewards; decides when the scoring pass can be skipped
        (``online.scores_from_update``).
    validate(cfg) raises ``UserError`` on invalid settings. make_aux (optional, PPO-ptx) builds an extra
    term ``aux(policy, update_index, dist) -> stats`` that backpropagates itself.
    """

    name: str
    prepare: Callable
    loss: Callable
    validate: Callable = lambda cfg: None
    uses_value_model: Callable = lambda cfg: False
    needs_ref_logits: Callable = estimator_needs_logits
    prepare_reads_scores: Callable = lambda cfg: True
    make_aux: Optional[Callable] = None


def beta_weights(cfg, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """w_t (T,) multiplying β at completion position t (cfg.beta_position_decay / beta_position_weights;
    ``ops.positions.position_weights``), or None when w ≡ 1: the KL-in-reward (rollout kl_tokens, PPO/RLOO's
    exact direct term) and KL-in-loss (GRPO) placements all weight through here, consistently."""
    return position_weights(
        mask.shape[-1],
        decay=getattr(cfg, "beta_position_decay", 0.0),
        weights=getattr(cfg, "beta_position_weights", None),
        device=mask.device,
    )


def reward_kl_direct_term(cfg, x: LossInputs) -> Optional[torch.Tensor]:
    """(B, T) the loss-side term a KL *in the reward* needs with this estimator (``ESTIMATORS[...]
    .reward_direct_term``: exact), unscaled by β; None when the estimator needs none (k1, k2, k3)."""
    if not ESTIMATORS[cfg.kl_estimator].reward_direct_term:
        return None
    return exact_kl_direct_term(x)


def exact_kl_direct_term(x: LossInputs) -> torch.Tensor:
    """(B, T) exact per-token KL_t(s_t; θ) with gradient through the policy's logits.

    Why: with ``kl_estimator=exact`` *in the reward*, each KL_t is a function of the state s_t only,
    not of the sampled token y_t, so the score-function gradient sees only how earlier tokens change
    later states, never the direct dependence of KL_t on π_θ(·|s_t). The full gradient of
    E[Σ_t KL_t] is that score-function part plus Σ_t ∇KL_t at fixed states (Tang & Munos,
    arXiv:2506.09477; docs/theory.md §3). PPO and RLOO add β / adv_scale x this term to their loss.
    (k1 needs no such term: E_π[∇log π] = 0.) The reference logits are the fixed π^τ_ref; with
    ``kl_reference_filter: restricted`` the restricted KL differs from this one by -log π^τ_ref(F_t),
    a constant at fixed F_t, so the gradient is the same."""
    if x.kl_exact is None and (x.logits is None or x.ref_logits is None):
        raise ValueError("the exact KL term needs policy and reference logits (method.needs_ref_logits) or kl_exact")
    return kl_loss_term(
        x.logps, x.ref_logps, x.mask, estimator="exact", logits=x.logits, ref_logits=x.ref_logits, exact=x.kl_exact
    ).per_token
