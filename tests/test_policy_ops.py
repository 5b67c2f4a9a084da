"""Online-RL math (tether.ops.policy): hand-computed GAE, whitening, PPO surrogate and value losses,
GRPO / RLOO advantages, token rewards, loss aggregation invariances, and the best-of-n KL bound.
Every expected number is derived in the test's docstring."""

from __future__ import annotations

import math

import pytest
import torch

from tether.ops.policy import (
    aggregate_loss,
    best_of_n_kl_bound,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    rloo_advantages,
    token_rewards,
)

GARBAGE = 99.0  # written into padding: it must never reach a result


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------- GAE


def _gae_batch():
    """Row 0: three counted tokens, r = (0, 0, 1), V = (0.5, 0.25, 0.5), then two padding positions.
    Row 1: two counted tokens, r = (0, 2), V = (1, 1), then padding. Padding holds garbage."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, GARBAGE, GARBAGE], [0.0, 2.0, GARBAGE, GARBAGE, GARBAGE]])
    values = torch.tensor([[0.5, 0.25, 0.5, GARBAGE, GARBAGE], [1.0, 1.0, GARBAGE, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return rewards, values, mask


def test_gae_by_hand_gamma1_lambda095():
    """γ = 1, λ = 0.95, V after the last token = 0.
    Row 0: δ2 = 1 - 0.5 = 0.5; δ1 = 0 + 0.5 - 0.25 = 0.25; δ0 = 0 + 0.25 - 0.5 = -0.25.
           A2 = 0.5; A1 = 0.25 + 0.95·0.5 = 0.725; A0 = -0.25 + 0.95·0.725 = 0.43875.
           returns = A + V = (0.93875, 0.975, 1.0).
    Row 1: δ1 = 2 - 1 = 1; δ0 = 0 + 1 - 1 = 0; A1 = 1; A0 = 0 + 0.95·1 = 0.95; returns = (1.95, 2.0)."""
    adv, ret = gae(*_gae_batch(), gamma=1.0, lam=0.95)
    _close(adv, [[0.43875, 0.725, 0.5, 0, 0], [0.95, 1.0, 0, 0, 0]])
    _close(ret, [[0.93875, 0.975, 1.0, 0, 0], [1.95, 2.0, 0, 0, 0]])


def test_gae_by_hand_gamma09_lambda05():
    """γ = 0.9, λ = 0.5 (γλ = 0.45).
    Row 0: δ2 = 1 - 0.5 = 0.5; δ1 = 0 + 0.9·0.5 - 0.25 = 0.2; δ0 = 0 + 0.9·0.25 - 0.5 = -0.275.
           A2 = 0.5; A1 = 0.2 + 0.45·0.5 = 0.425; A0 = -0.275 + 0.45·0.425 = -0.08375.
           returns = (0.41625, 0.675, 1.0).
    Row 1: δ1 = 2 - 1 = 1; δ0 = 0 + 0.9·1 - 1 = -0.1; A1 = 1; A0 = -0.1 + 0.45 = 0.35; returns = (1.35, 2.0)."""
    adv, ret = gae(*_gae_batch(), gamma=0.9, lam=0.5)
    _close(adv, [[-0.08375, 0.425, 0.5, 0, 0], [0.35, 1.0, 0, 0, 0]])
    _close(ret, [[0.41625, 0.675, 1.0, 0, 0], [1.35, 2.0, 0, 0, 0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda1_is_reward_to_go_minus_value(gamma):
    """λ = 1: A_t = Σ_l γ^l δ_{t+l} telescopes to Σ_{k≥t} γ^{k-t} r_k - V_t, so returns = discounted reward-to-go.
    Rows of different lengths, including prompt positions (False) before the completion."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    starts, ends = [0, 2, 1, 0], [7, 5, 2, 4]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(starts, ends)):
        mask[b, s:e] = True
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    expected = torch.zeros(B, T)
    for b, (s, e) in enumerate(zip(starts, ends)):
        for t in range(s, e):
            expected[b, t] = sum(gamma ** (k - t) * rewards[b, k] for k in range(t, e))
    _close(ret, expected, atol=1e-5)
    _close(adv, torch.where(mask, expected - values, 0.0), atol=1e-5)


def test_gae_rejects_masks_with_holes():
    with pytest.raises(ValueError, match="contiguous"):
        gae(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), gamma=1.0, lam=1.0)


# ------------------------------------------------------------------------------------- whitening


def test_masked_mean_and_whiten():
    """Counted values (1, 2, 3, 4) (padding garbage): mean 2.5, population variance (2.25+0.25+0.25+2.25)/4 = 1.25.
    whiten -> (v - 2.5)/sqrt(1.25); shift_mean=False adds 2.5 back. Result has mean 0 and variance 1."""
    v = torch.tensor([[1.0, 2.0, GARBAGE], [3.0, 4.0, float("inf")]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    _close(masked_mean(v, m), 2.5)
    _close(masked_mean(v, m, dim=-1), [1.5, 3.5])
    s = math.sqrt(1.25)
    w = masked_whiten(v, m, eps=0.0)
    _close(w, [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])
    _close(masked_mean(w, m), 0.0)
    _close(masked_mean(w**2, m), 1.0)
    _close(
        masked_whiten(v, m, shift_mean=False, eps=0.0),
        [[-1.5 / s + 2.5, -0.5 / s + 2.5, 0.0], [0.5 / s + 2.5, 1.5 / s + 2.5, 0.0]],
    )


# ------------------------------------------------------------------------------------------ PPO


def test_ppo_clipped_surrogate_values_grads_clipfrac():
    """clip ε = 0.2, L = max(-A·ρ, -A·clip(ρ, 0.8, 1.2)), dL/dlogπ = -A·ρ when the unclipped term is selected, else 0.
      ρ = 1.1, A = +1: inside the clip range, L = -1.1, grad -1.1
      ρ = 1.5, A = +1: -1.5 vs -1.2 -> clipped, L = -1.2, grad 0
      ρ = 0.5, A = +1: -0.5 vs -0.8 -> unclipped (pessimistic), L = -0.5, grad -0.5
      ρ = 0.5, A = -1: 0.5 vs 0.8 -> clipped, L = 0.8, grad 0
      ρ = 1.5, A = -1: 1.5 vs 1.2 -> unclipped, L = 1.5, grad +1.5
      ρ = 0.9, A = -1: inside, L = 0.9, grad 0.9
    clipfrac = 2/6. approx_kl_old = mean of (ρ - 1) - log ρ over the six counted tokens (k3, r = ρ).
    A padding token with a huge log-ratio and garbage advantage must contribute nothing."""
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.0], [0.5, 1.5, 0.9, 1.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, GARBAGE], [-1.0, -1.0, -1.0, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    old = torch.full((2, 4), -2.0)
    logps = (old + ratios.log()).clone()
    logps[:, 3] = 500.0  # padding: exp would overflow if it were not masked before the exp
    logps.requires_grad_()
    loss, stats = ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    loss.sum().backward()
    _close(loss.detach(), [[-1.1, -1.2, -0.5, 0.0], [0.8, 1.5, 0.9, 0.0]])
    _close(logps.grad, [[-1.1, 0.0, -0.5, 0.0], [0.0, 1.5, 0.9, 0.0]])
    _close(stats["clipfrac"], 2 / 6)
    counted = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]
    _close(stats["approx_kl_old"], sum(r - 1 - math.log(r) for r in counted) / 6)


def test_ppo_policy_loss_takes_per_sequence_advantages():
    """A (B,) advantage is broadcast over tokens: equal to passing it repeated per token."""
    g = torch.Generator().manual_seed(1)
    logps, old = torch.randn(3, 5, generator=g) - 2, torch.randn(3, 5, generator=g) - 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    adv = torch.randn(3, generator=g)
    a, _ = ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    b, _ = ppo_policy_loss(logps, old, adv[:, None].expand(3, 5), mask, clip=0.2)
    assert torch.equal(a, b)


def test_ppo_value_loss_clipping():
    """clip ε = 0.2, V_old = 0, L = 0.5·max((V - R)², (V_clip - R)²), dL/dV = (V - R) when unclipped selected, else 0.
      V = 0.1, R = 1: V_clip = 0.1, both 0.81 -> L = 0.405, grad -0.9 (not counted as clipped: equal)
      V = 0.5, R = 1: 0.25 vs (0.2 - 1)² = 0.64 -> clipped, L = 0.32, grad 0
      V = 0.5, R = 0: 0.25 vs 0.04 -> unclipped, L = 0.125, grad 0.5
      V = -0.5, R = 1: 2.25 vs 1.44 -> unclipped, L = 1.125, grad -1.5
    vf_clipfrac = 1/4."""
    values = torch.tensor([[0.1, 0.5, 0.5, -0.5, GARBAGE]], requires_grad=True)
    old = torch.zeros(1, 5)
    returns = torch.tensor([[1.0, 1.0, 0.0, 1.0, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=0.2)
    loss.sum().backward()
    _close(loss.detach(), [[0.405, 0.32, 0.125, 1.125, 0.0]])
    _close(values.grad, [[-0.9, 0.0, 0.5, -1.5, 0.0]])
    _close(stats["vf_clipfrac"], 0.25)


def test_reinforce_loss():
    """L_t = -A·logπ_t, dL/dlogπ_t = -A. A = (0.5, -2) per sequence; logπ = ((-1, -2), (-3, pad))."""
    logps = torch.tensor([[-1.0, -2.0], [-3.0, GARBAGE]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, _ = reinforce_loss(logps, torch.tensor([0.5, -2.0]), mask)
    loss.sum().backward()
    _close(loss.detach(), [[0.5, 1.0], [-6.0, 0.0]])
    _close(logps.grad, [[-0.5, -0.5], [2.0, 0.0]])


# --------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    """Groups of 3, prompt-major. (1, 2, 3): mean 2, Bessel std 1 -> (-1, 0, 1).
    (0, 0, 6): mean 2, deviations (-2, -2, 4), Bessel variance (4 + 4 + 16)/2 = 12, std 2√3
    -> (-1/√3, -1/√3, 2/√3). (5, 5, 5): std 0 -> advantage 0 with ε > 0 (not nan).
    scale=False only centres: (-1, 0, 1), (-2, -2, 4), (0, 0, 0)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0, 5.0, 5.0, 5.0])
    r3 = 1 / math.sqrt(3)
    _close(group_advantages(scores[:6], group_size=3, eps=0.0), [-1, 0, 1, -r3, -r3, 2 * r3])
    _close(group_advantages(scores[6:], group_size=3), [0.0, 0.0, 0.0])
    _close(group_advantages(scores, group_size=3, scale=False), [-1, 0, 1, -2, -2, 4, 0, 0, 0])
    with pytest.raises(ValueError, match="divid"):
        group_advantages(scores, group_size=4)


def test_rloo_advantages_by_hand_and_equivalence():
    """k = 3, scores (1, 2, 6): A_0 = 1 - (2+6)/2 = -3, A_1 = 2 - 3.5 = -1.5, A_2 = 6 - 1.5 = 4.5.
    Identity: r_i - (S - r_i)/(k-1) = (k r_i - S)/(k-1) = k/(k-1)·(r_i - S/k)."""
    _close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), group_size=3), [-3.0, -1.5, 4.5])
    g = torch.Generator().manual_seed(2)
    for k in (2, 4, 8):
        scores = torch.randn(5 * k, generator=g)
        grouped = scores.view(-1, k)
        expected = k / (k - 1) * (grouped - grouped.mean(-1, keepdim=True))
        _close(rloo_advantages(scores, group_size=k), expected.reshape(-1), atol=1e-5)


# ------------------------------------------------------------------------------------ token rewards


def test_token_rewards_places_score_at_last_counted_token():
    """β = 0.1, rewards_t = -0.1·kl_t on counted tokens, + score at each row's last counted token.
    Row 0: 3 tokens, kl (1, 2, 3), score 2 -> (-0.1, -0.2, -0.3 + 2).
    Row 1: 1 token, kl 4, score -1 -> (-0.4 - 1).
    Row 2: prompt position first (False), tokens at 1..2, kl (1, 1), score 5 -> (0, -0.1, -0.1 + 5, 0).
    Row 3: no counted token -> all zero, the score is dropped.
    The KL is detached: rewards carry no gradient."""
    kl = torch.tensor(
        [[1.0, 2.0, 3.0, GARBAGE], [4.0, GARBAGE, GARBAGE, GARBAGE], [GARBAGE, 1.0, 1.0, GARBAGE], [GARBAGE] * 4],
        requires_grad=True,
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0, 7.0])
    rewards = token_rewards(scores, kl, mask, beta=0.1)
    _close(rewards, [[-0.1, -0.2, 1.7, 0.0], [-1.4, 0.0, 0.0, 0.0], [0.0, -0.1, 4.9, 0.0], [0.0] * 4])
    assert not rewards.requires_grad


# ------------------------------------------------------------------------------------ aggregation


def test_aggregate_loss_modes_by_hand():
    """Per-token loss ((1, 2, 3), (4, pad, pad)), 4 counted tokens in 2 sequences.
    token_mean = 10/4 = 2.5; seq_mean_token_mean = (6/3 + 4/1)/2 = 3; seq_sum = (6 + 4)/2 = 5."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    _close(aggregate_loss(loss, mask, mode="token_mean"), 2.5)
    _close(aggregate_loss(loss, mask, mode="seq_mean_token_mean"), 3.0)
    _close(aggregate_loss(loss, mask, mode="seq_sum"), 5.0)


def _lm_like_batch():
    g = torch.Generator().manual_seed(3)
    B, T = 6, 8
    x = torch.randn(B, T, 4, generator=g)
    lengths = torch.tensor([8, 1, 5, 3, 7, 2])  # very unequal, so per-shard means differ from the global one
    mask = torch.arange(T)[None, :] < lengths[:, None]
    w = torch.randn(4, generator=g)
    return x, mask, w


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum"])
def test_aggregate_loss_sharded_and_accumulated_equal_full_batch(mode):
    """Per-token loss = (x·w)² for a parameter w. With the global token / sequence counts passed in,
    (a) the sum over two shards (what an all-reduce SUM of gradients gives) and (b) accumulating the
    gradients of 6 micro-batches of one sequence each both equal the full batch, in value and gradient."""
    x, mask, w = _lm_like_batch()
    counts = {"num_tokens": int(mask.sum()), "num_seqs": mask.shape[0]}

    def run(parts):
        wp = w.clone().requires_grad_()
        total = 0.0
        for rows in parts:
            value = aggregate_loss(((x[rows] @ wp) ** 2), mask[rows], mode=mode, **counts)
            value.backward()  # gradients accumulate in wp.grad, as in gradient accumulation
            total = total + value.detach()
        return total, wp.grad

    full = run([slice(0, 6)])
    for parts in ([slice(0, 3), slice(3, 6)], [slice(i, i + 1) for i in range(6)]):
        got = run(parts)
        torch.testing.assert_close(got[0], full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], full[1], atol=1e-5, rtol=1e-5)


def test_aggregate_loss_local_token_mean_is_not_the_full_batch_mean():
    """The failure the global count prevents: averaging per-shard token means weights tokens of short
    shards more (the torchtune #2307 class of bug). Shards hold 14 and 12 tokens here; the results differ."""
    x, mask, w = _lm_like_batch()
    loss = (x @ w) ** 2
    full = aggregate_loss(loss, mask, mode="token_mean")
    local = (
        aggregate_loss(loss[:3], mask[:3], mode="token_mean") + aggregate_loss(loss[3:], mask[3:], mode="token_mean")
    ) / 2
    assert (full - local).abs() > 1e-3


# ------------------------------------------------------------------------------------- best of n


def test_best_of_n_kl_bound():
    """log n - (n-1)/n: n = 1 -> 0; n = 2 -> log 2 - 1/2; n = 4 -> log 4 - 3/4.
    Exactness for distinct outcomes: best-of-n over K equally likely outcomes ranked 1..K picks rank i with
    probability (i/K)^n - ((i-1)/K)^n; its exact KL to uniform is below the bound and tends to it as K grows
    (K = 3: gap > 1e-2; K = 10^5: gap < 1e-6, it shrinks like 1/K)."""
    assert best_of_n_kl_bound(1) == 0.0
    assert abs(best_of_n_kl_bound(2) - (math.log(2) - 0.5)) < 1e-12
    assert abs(best_of_n_kl_bound(4) - (math.log(4) - 0.75)) < 1e-12
    for n in (2, 4, 16):
        bound = best_of_n_kl_bound(n)
        gaps = []
        for K in (3, 100_000):
            i = torch.arange(1, K + 1, dtype=torch.float64)
            p = (i / K) ** n - ((i - 1) / K) ** n
            kl = (p * (p * K).log()).sum().item()
            assert kl <= bound + 1e-12
            gaps.append(bound - kl)
        assert gaps[0] > 1e-2 and gaps[1] < 1e-6
    with pytest.raises(ValueError):
        best_of_n_kl_bound(0)


def test_masked_std_by_hand():
    """values [1, 3 | 5, x] with x masked out: mean 3, population variance ((1-3)² + 0 + (5-3)²)/3 = 8/3,
    so std = sqrt(8/3 + eps); whitening divides by exactly this."""
    from tether.ops.policy import masked_std

    v = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    m = torch.tensor([[True, True], [True, False]])
    assert abs(float(masked_std(v, m, eps=0.0)) - math.sqrt(8 / 3)) < 1e-6
    w = masked_whiten(v, m, eps=0.0)
    assert abs(float(w[0, 0]) - (1 - 3) / math.sqrt(8 / 3)) < 1e-6 and float(w[1, 1]) == 0.0
