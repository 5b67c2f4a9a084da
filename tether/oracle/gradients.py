"""Exact expected gradients of the KL terms of ``tether.ops.kl``, per placement (docs/theory.md §3).

The expectation over sampled completions is replaced by a sum over every complete sequence weighted
by its probability under the behaviour policy; the per-sequence term is built from the project's own
functions (``selective_logps``, ``kl_per_token``, ``kl_loss_term``), so the tests check the code the
trainers run, not a re-derivation of it.

Placements (``tether.ops.kl.EstimatorInfo``), samples y ~ π_b (π_b = π_θ on-policy), per token t:

- ``reward``: the detached per-token value enters the reward, and θ learns it through the score
  function with reward-to-go: g(y) = Σ_t ∇log π_θ(y_t|s_t) · Σ_{t'≥t} sg(kl_{t'}).
- ``loss``: the value is a loss term differentiated with the samples held fixed: g(y) = ∇ Σ_t kl_t.
- ``loss_is``: the same times π_θ(y_t|s_t)/π_old(y_t|s_t), π_old = π_b detached: g(y) = ∇ Σ_t w_t kl_t.

The expected gradient is Σ_x Σ_y π_b(y|x) g(x, y) (summed over prompts), returned with the shape of
``policy.table``. It is the gradient of the *penalty* (to be minimised), not of the objective.
"""

from __future__ import annotations

from typing import Optional

import torch

from tether.ops.kl import kl_loss_term, kl_per_token, kl_reward_penalty
from tether.ops.logprobs import selective_logps

from .tabular import Completions, TabularPolicy

PLACEMENTS = ("reward", "loss", "loss_is")


def kl_surrogate(
    policy: TabularPolicy,
    ref: TabularPolicy,
    completions: Completions,
    *,
    estimator: str,
    placement: str,
    old_logps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sequence surrogate s(y), (B,), whose gradient at the current θ is g(y) above.

    Args:
        completions: the sampled (or enumerated) completions, held fixed.
        estimator: k1 | k2 | k3 | exact (reverse KL[π_θ‖π_ref], ``tether.ops.kl``).
        placement: reward | loss | loss_is.
        old_logps: (B, T) log-probs under π_old for ``loss_is``; default: the current ones, detached
            (on-policy, where the weight is 1 in value and carries ∇log π_θ).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
    prompt_ids, tokens, mask = completions
    logits = policy.logits(prompt_ids, tokens)  # (B, T, V)
    ref_logits = ref.logits(prompt_ids, tokens).detach()  # (B, T, V)
    logps = selective_logps(logits, tokens).masked_fill(~mask, 0.0)  # (B, T)
    ref_logps = selective_logps(ref_logits, tokens).masked_fill(~mask, 0.0)  # (B, T)
    if placement == "reward":
        kl = kl_per_token(
            logps.detach(), ref_logps, mask, estimator=estimator, logits=logits.detach(), ref_logits=ref_logits
        ).per_token  # (B, T)
        rewards = kl_reward_penalty(kl, mask, beta=1.0)  # -sg(kl_t): what a trainer adds to the reward
        to_go = -rewards.flip(-1).cumsum(-1).flip(-1)  # Σ_{t' ≥ t} kl_{t'}: the penalty's return
        return (logps * to_go).masked_fill(~mask, 0.0).sum(-1)
    if placement == "loss_is" and old_logps is None:
        old_logps = logps.detach()
    out = kl_loss_term(
        logps,
        ref_logps,
        mask,
        estimator=estimator,
        logits=logits,
        ref_logits=ref_logits,
        old_logps=old_logps if placement == "loss_is" else None,
    )
    return out.per_token.sum(-1)


def expected_kl_gradient(
    policy: TabularPolicy,
    ref: TabularPolicy,
    *,
    estimator: str,
    placement: str,
    behaviour: Optional[TabularPolicy] = None,
) -> torch.Tensor:
    """E_{y~π_b}[g(y)] exactly, summed over prompts: a tensor shaped like ``policy.table``.

    ``behaviour`` is π_b, the policy the samples come from (π_old); default π_θ (on-policy). For
    ``loss_is`` its log-probs are the importance weights' denominators.
    """
    behaviour = policy if behaviour is None else behaviour
    comp = policy.space.all_completions()
    weights = behaviour.sequence_probs().detach().reshape(-1)  # (P*K,) prompt-major, as all_completions
    old_logps = None
    if placement == "loss_is":
        old_logps = behaviour.logps(comp.prompt_ids, comp.tokens, comp.mask).detach()
    surrogate = kl_surrogate(policy, ref, comp, estimator=estimator, placement=placement, old_logps=old_logps)
    (grad,) = torch.autograd.grad((weights * surrogate).sum(), policy.table)
    return grad
