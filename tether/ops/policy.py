"""Online-RL math: token rewards, GAE, PPO losses, group / leave-one-out advantages, loss aggregation.

Pure torch; docs/theory.md §1 and §7. Shapes: B sequences, T positions; ``mask`` (B, T) is
True where a completion token counts. Per-token tensors come back fp32 (fp64 for fp64 inputs, as
``logprobs.upcast``) and zero where ``mask`` is False.
Per-token losses are *not* reduced here: ``aggregate_loss`` does that once, with global counts.

Where this deviates from a paper, and why:
- ``masked_whiten`` uses the population variance (openai/lm-human-preferences ``whiten``); TRL uses
  the Bessel-corrected one. The difference is a factor sqrt(n/(n-1)) on the scale.
- ``group_advantages`` divides by the Bessel-corrected group std plus ε (TRL, verl); DeepSeekMath
  only writes std(r). Dr. GRPO (Liu et al. 2025) argues for ``scale=False``.
- ``gae`` treats the value after a sequence's last counted token as 0 (the episode ends there), as
  openai/lm-human-preferences and TRL's PPO do.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from .best_of_n import best_of_n_kl_bound  # noqa: F401  (re-exported: the bound lives with best-of-n)
from .kl import k3, kl_reward_penalty, log_ratio
from .logprobs import upcast

AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_sum"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_sum")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, *, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True; 0 where nothing counts. (B, T), (B, T) -> () or reduced ``dim``.

    Masked-out entries are replaced (not multiplied) by 0, so inf/nan in padding cannot leak in.
    """
    mask = mask.bool()
    total = torch.where(mask, upcast(values), 0.0)
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_std(values: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """sqrt(population variance + eps) over the counted entries: the scale ``masked_whiten`` divides by.
    (B, T), (B, T) -> ()."""
    mask = mask.bool()
    mean = masked_mean(values, mask)
    return (masked_mean((upcast(values) - mean) ** 2, mask) + eps).sqrt()


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the counted entries; (B, T), (B, T) -> (B, T), zero outside mask.

    Population variance (openai/lm-human-preferences ``whiten``). ``shift_mean=False`` adds the mean
    back: only the scale changes (used for rewards, where the sign carries meaning). Statistics are over
    this tensor only: sharded callers whiten per shard unless they pass globally reduced values.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    out = (upcast(values) - mean) / masked_std(values, mask, eps=eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def masked_whiten_loo(
    values: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whiten each row with the statistics of the *other* rows: (values_i - mean_{-i}) / std_{-i}, where
    mean_{-i} and the population variance var_{-i} are over the counted entries of every row but i.
    (B, T), (B, T) -> (whitened (B, T), zero outside mask; scale (B, 1) = sqrt(var_{-i} + eps)).

    Why: ``masked_whiten`` divides by the batch's own σ̂, which depends on every sample, so
    E[∇log π(y_i)·A_i/σ̂] is not a multiple of E[∇log π(y_i)·A_i]: a bias that does not vanish at the
    optimum when the advantages keep fluctuating there (the exact estimator in the reward; k1's
    penalised returns are all equal at π*). With i.i.d. rows, mean_{-i} and std_{-i} are independent of
    row i, so row i's contribution is E[1/std_{-i}]·E[∇log π(y_i)·A_i] (the shift is a baseline): an
    unbiased direction with one positive scale, the same for every row. A row-level term kept in the
    advantages' units (the exact direct term) is divided by the same per-row scale. Needs B ≥ 2."""
    mask = mask.bool()
    if mask.shape[0] < 2:
        raise ValueError("leave-one-out whitening needs at least 2 rows")
    x = torch.where(mask, upcast(values), 0.0)
    n_i, s_i, q_i = mask.sum(-1).to(x.dtype), x.sum(-1), (x * x).sum(-1)  # (B,) per row
    n = (n_i.sum() - n_i).clamp(min=1)  # (B,) counted entries of the other rows
    mean = (s_i.sum() - s_i) / n
    var = ((q_i.sum() - q_i) / n - mean * mean).clamp(min=0.0)
    scale = (var + eps).sqrt()[:, None]  # (B, 1)
    return torch.where(mask, (x - mean[:, None]) / scale, 0.0), scale


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True, -1 for a row with none. (B, T) bool -> (B,) int64."""
    pos = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return torch.where(mask, pos, -1).amax(-1)


def token_rewards(scores: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Per-token rewards of KL-penalised PPO-RLHF (docs/theory.md §1; Stiennon et al. 2020; Ouyang et al. 2022 Eq. 2).

        rewards_t = -β·sg(kl_t)  on every counted token,  + scores  at each sequence's last counted token

    Args:
        scores: (B,) reward-model score per sequence (detached: rewards are constants for the gradient).
        kl_tokens: (B, T) per-token KL estimate (e.g. ``kl.kl_per_token(...).per_token``).
        mask: (B, T) True on completion tokens. Any layout with one contiguous run per row works (prompt
            positions False, padding False); the score goes at the row's last True.
    Returns:
        (B, T) fp32 rewards, zero outside ``mask``; a row with no counted token gets no score.
    """
    mask = mask.bool()
    rewards = kl_reward_penalty(kl_tokens, mask, beta=beta)  # (B, T) -β·sg(kl), 0 outside mask
    last = _last_index(mask)  # (B,)
    has_tokens = last >= 0
    add = torch.where(has_tokens, upcast(scores.detach()), 0.0)  # (B,)
    return rewards.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), add.unsqueeze(-1))  # (B, T)


def _check_one_run(mask: torch.Tensor) -> None:
    m = mask.int()
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # False→True transitions per row
    if bool((starts > 1).any()):
        raise ValueError(
            "gae needs one contiguous run of True per row (prompt/padding False around it); "
            "a mask with holes would bootstrap across the gap"
        )


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences (Schulman et al. 2016; PPO paper Eq. 11–12).

        δ_t = r_t + γ·V_{t+1} - V_t          (V after the last counted token = 0: the episode ends)
        A_t = δ_t + γλ·A_{t+1}               (= Σ_l (γλ)^l δ_{t+l})
        returns_t = A_t + V_t                 (the value-function target; λ = 1 gives reward-to-go)

    Args:
        rewards: (B, T) per-token rewards (``token_rewards``). Detached.
        values: (B, T) V(s_t) from the critic at the same positions. Detached.
        mask: (B, T) True on counted tokens, one contiguous run per row (raises otherwise).
        gamma, lam: discount γ and GAE λ (docs/theory.md §7: γ = 1, λ = 0.95).
    Returns:
        ``(advantages, returns)``, both (B, T) fp32, zero outside ``mask``, no grad.
    """
    mask = mask.bool()
    _check_one_run(mask)
    r = torch.where(mask, upcast(rewards.detach()), 0.0)  # (B, T)
    v = torch.where(mask, upcast(values.detach()), 0.0)  # (B, T); 0 past the end = terminal value
    T = r.shape[-1]
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,) A_{t+1}; 0 on trailing padding since r = v = 0 there
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v - v[:, t]  # PPO Eq. 12
        running = delta + gamma * lam * running  # PPO Eq. 11, recursively
        adv[:, t] = running
    adv = torch.where(mask, adv, 0.0)
    return adv, torch.where(mask, adv + v, 0.0)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, per token, negated to a loss (Schulman et al. 2017, Eq. 7).

        ρ_t = π_θ/π_old,   L_t = max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε))

    Args:
        logps: (B, T) log π_θ of the sampled tokens (with grad).
        old_logps: (B, T) log π_old, the behaviour policy that sampled them (detached).
        advantages: (B, T) per token, or (B,) per sequence (broadcast over T). Detached.
        mask: (B, T) True where a token counts.
        clip: ε (docs/theory.md §7: 0.2).
    Returns:
        ``(per-token loss (B, T) fp32, zero outside mask, stats)``; stats are scalars over the counted
        tokens of this batch: ``clipfrac`` — fraction of tokens where the clipped term is selected (its
        gradient is 0); ``approx_kl_old`` — k3 estimate of KL[π_old‖π_θ] (Schulman 2020; samples are from
        π_old, r = π_θ/π_old, k3 = (r - 1) - log r).
    """
    mask = mask.bool()
    lr = torch.where(mask, log_ratio(logps, old_logps.detach()), 0.0)  # (B, T) log ρ; 0 in padding: no inf
    ratio = torch.exp(lr)  # (B, T)
    adv = upcast(advantages.detach())
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1), broadcast over T
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.where(mask, torch.maximum(unclipped, clipped), 0.0)  # PPO Eq. 7, negated
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl_old": masked_mean(k3(-lr.detach()), mask),  # k3 with r = exp(-(-lr)) = π_θ/π_old
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per token (openai/baselines ppo2; openai/lm-human-preferences):

        V_clip = V_old + clip(V - V_old, -ε, ε),   L_t = 0.5·max((V - R)², (V_clip - R)²)

    Args:
        values: (B, T) current critic output (with grad).
        old_values: (B, T) critic output at rollout time (detached).
        returns: (B, T) targets R from ``gae`` (detached).
        mask: (B, T) True where a token counts.
        clip: ε, in value units (lm-human-preferences: 0.2).
    Returns:
        ``(per-token loss (B, T) fp32, zero outside mask, stats)`` with ``vf_clipfrac``: fraction of counted
        tokens where the clipped term is larger (its gradient is 0).
    """
    mask = mask.bool()
    v = upcast(values)
    old = upcast(old_values.detach())
    ret = upcast(returns.detach())
    v_clipped = old + (v - old).clamp(-clip, clip)
    unclipped = (v - ret) ** 2
    clipped_sq = (v_clipped - ret) ** 2
    loss = torch.where(mask, 0.5 * torch.maximum(unclipped, clipped_sq), 0.0)
    stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped).float(), mask).detach()}
    return loss, stats


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 2 or scores.shape[0] % group_size != 0:
        raise ValueError(f"need group_size >= 2 dividing B exactly; got B={scores.shape[0]}, group_size={group_size}")
    return upcast(scores.detach()).view(-1, group_size)  # (B/G, G)


def group_advantages(scores: torch.Tensor, *, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath §4.1.2): (r_i - mean_g) / (std_g + ε).

    Args:
        scores: (B,) one score per completion; the ``group_size`` completions of one prompt are
            contiguous (prompt-major, as ``repeat_interleave`` lays them out).
        group_size: G ≥ 2, completions per prompt; must divide B.
        scale: divide by the (Bessel-corrected) group std; ``False`` only centres (Dr. GRPO).
        eps: added to the std, so a group with identical scores gets advantage 0, not nan (TRL: 1e-4).
    Returns:
        (B,) fp32 per-sequence advantages, no grad.
    """
    g = _groups(scores, group_size)  # (B/G, G)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"):

        A_i = r_i - (1/(k-1)) Σ_{j≠i} r_j  =  k/(k-1) · (r_i - mean_j r_j)

    The baseline excludes the sample itself, so it is independent of it and the estimator stays
    unbiased. Args: scores (B,) with the ``group_size`` = k ≥ 2 samples of one prompt contiguous.
    Returns (B,) fp32, no grad.
    """
    g = _groups(scores, group_size)  # (B/k, k)
    k = g.shape[-1]
    baseline = (g.sum(-1, keepdim=True) - g) / (k - 1)  # mean of the others
    return (g - baseline).reshape(-1)


def reinforce_loss(
    logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score-function (REINFORCE) loss per token: L_t = -A·log π_θ(y_t|s_t) (Williams 1992).

    With a per-sequence advantage and ``aggregate_loss(mode="seq_sum")`` this is the RLOO loss
    -A_i·log π_θ(y_i) of Ahmadian et al. 2024. On-policy only (no importance ratio).

    Args:
        logps: (B, T) log π_θ of the sampled tokens (with grad).
        advantages: (B,) per sequence or (B, T) per token (detached).
        mask: (B, T) True where a token counts.
    Returns:
        ``(per-token loss (B, T) fp32, zero outside mask, {})`` — no stats of its own.
    """
    mask = mask.bool()
    adv = upcast(advantages.detach())
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1)
    logps = torch.where(mask, upcast(logps), 0.0)
    return torch.where(mask, -adv * logps, 0.0), {}


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: AggregationMode,
    num_tokens: Optional[Union[int, float, torch.Tensor]] = None,
    num_seqs: Optional[Union[int, float, torch.Tensor]] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar. Counts are arguments so shards and micro-batches agree.

    Modes:
        ``token_mean``: Σ_{i,t} L_it / N, N = ``num_tokens`` — the counted tokens of the *whole* batch
            (all ranks, all accumulation micro-batches). Summing this over shards or micro-batches gives
            exactly the full-batch token mean (OpenRLHF passes the global count likewise).
        ``seq_mean_token_mean``: Σ_i (Σ_t L_it / n_i) / S, n_i = counted tokens of row i, S = ``num_seqs``
            (GRPO, DeepSeekMath Eq. 3: 1/G Σ_i 1/|o_i| Σ_t).
        ``seq_sum``: Σ_{i,t} L_it / S — per-sequence sums averaged over sequences (the sequence-level
            objective of REINFORCE/RLOO and of the DPO-style sequence log-prob).
    Defaults (``None``) are this call's own counts: mask.sum() and B. Pass the global ones when the batch
    is split. Under DDP, which *averages* gradients over W ranks, multiply the result by W (or divide the
    global count by W). ``weights`` (B,), optional: row i's losses count w_i times (pass the weighted
    counts Σ w_i·n_i and Σ w_i); the exact certificate weights every enumerated completion by its
    probability this way. Returns a () fp32 tensor.
    """
    mask = mask.bool()
    loss = torch.where(mask, upcast(per_token_loss), 0.0)  # (B, T)
    if weights is not None:
        loss = loss * weights[:, None]
    if mode == "token_mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return loss.sum() / torch.as_tensor(n, dtype=loss.dtype, device=loss.device).clamp(min=1)
    n_seq = mask.shape[0] if num_seqs is None else num_seqs
    n_seq = torch.as_tensor(n_seq, dtype=loss.dtype, device=loss.device).clamp(min=1)
    if mode == "seq_mean_token_mean":
        per_seq = loss.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum() / n_seq
    if mode == "seq_sum":
        return loss.sum() / n_seq
    raise ValueError(f"unknown aggregation mode {mode!r}; choose from {AGGREGATION_MODES}")
