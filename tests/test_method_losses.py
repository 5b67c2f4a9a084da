"""Each online method's ``loss`` (the function ``train_online`` calls, and through it ``tether certify``)
pinned on hand-computed values and gradients. The inputs are built by hand as ``LossInputs``: the
methods are pure functions of tensors, so no model, rollout or reference is needed.

Shared numbers (B = 1 row, T = 2 counted tokens, ε = 0.2):
    log ρ = logps - old_logps = (ln 1.5, ln 0.5), A = (1, -1)
    token 0: ρA = 1.5, clip(ρ)A = 1.2 -> L = -min(1.5, 1.2) = -1.2, clipped (gradient 0)
    token 1: ρA = -0.5, clip(ρ)A = -0.8 -> L = -min(-0.5, -0.8) = 0.8, clipped (gradient 0)
so the clipped surrogate is (-1.2, 0.8): token mean -0.2, sum -0.4; both tokens clipped.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.trainers.grpo import GRPOConfig
from tether.trainers.grpo import loss as grpo_loss
from tether.trainers.method import Counts, LossInputs
from tether.trainers.ppo import PPOConfig
from tether.trainers.ppo import loss as ppo_loss
from tether.trainers.rloo import RLOOConfig
from tether.trainers.rloo import loss as rloo_loss


def _inputs(*, log_ratio=(math.log(1.5), math.log(0.5)), adv=(1.0, -1.0), ref_shift=(0.0, 0.0), **kw) -> LossInputs:
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    logps = (old + torch.tensor([log_ratio], dtype=torch.float64)).requires_grad_(True)
    ref = logps.detach() - torch.tensor([ref_shift], dtype=torch.float64)  # logps - ref_logps = ref_shift
    return LossInputs(
        logps=logps,
        old_logps=old,
        ref_logps=ref,
        mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=torch.tensor([adv], dtype=torch.float64),
        **kw,
    )


ONE = Counts(tokens=2.0, seqs=1.0)


def test_ppo_loss_clipped_surrogate_plus_value_loss():
    """Value loss (0.5·max((V-R)², (V_clip-R)²), ε_v = 0.2): V = (1, 0), V_old = (0, 0), R = (0.5, 1):
    token 0: V_clip = 0.2 -> max(0.25, 0.09) = 0.25 -> 0.125; token 1: V = V_clip = 0 -> 1 -> 0.5.
    Value token mean 0.3125; total = -0.2 + vf_coef 0.1 x 0.3125 = -0.16875. The policy gradient is 0
    (both tokens clipped); dL/dV = vf_coef x (V - R)/N = 0.1 x (0.5, -1)/2 = (0.025, -0.05)."""
    values = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    x = _inputs(
        values=values,
        old_values=torch.zeros(1, 2, dtype=torch.float64),
        returns=torch.tensor([[0.5, 1.0]], dtype=torch.float64),
    )
    cfg = PPOConfig(clip_eps=0.2, clip_value=0.2, vf_coef=0.1, loss_aggregation="token_mean")
    loss, stats = ppo_loss(x, cfg=cfg, beta=0.1, counts=ONE)
    assert float(loss) == pytest.approx(-0.16875, abs=1e-12)
    assert float(stats["clipfrac"]) == 1.0
    loss.backward()
    assert float(x.logps.grad.abs().max()) == 0.0
    torch.testing.assert_close(values.grad, torch.tensor([[0.025, -0.05]], dtype=torch.float64))


def test_ppo_loss_unclipped_gradient_is_minus_advantage_times_ratio():
    """Inside the clip range (log ρ = 0, ρ = 1): L_t = -A_t·ρ_t, dL/dlogps_t = -A_t·ρ_t / N = (-0.5, 0.5)."""
    x = _inputs(
        log_ratio=(0.0, 0.0),
        values=torch.zeros(1, 2, dtype=torch.float64),
        old_values=torch.zeros(1, 2, dtype=torch.float64),
        returns=torch.zeros(1, 2, dtype=torch.float64),
    )
    loss, _ = ppo_loss(x, cfg=PPOConfig(vf_coef=0.0), beta=0.1, counts=ONE)
    loss.backward()
    torch.testing.assert_close(x.logps.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_ppo_exact_estimator_adds_its_direct_term_scaled_by_adv_scale():
    """kl_estimator=exact in the reward: loss += β/adv_scale x token mean of the exact KL_t. With V = 2
    logits (0, 0) for the policy and (ln 3, 0) for the reference at both positions: KL[(½,½)‖(¾,¼)] =
    ½ ln(2/3) + ½ ln 2 = 0.143841; β = 0.5, adv_scale = 2 -> + 0.25 x 0.143841 = 0.035960."""
    logits = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.tensor([[[math.log(3), 0.0]] * 2], dtype=torch.float64)
    common = dict(
        values=torch.zeros(1, 2, dtype=torch.float64),
        old_values=torch.zeros(1, 2, dtype=torch.float64),
        returns=torch.zeros(1, 2, dtype=torch.float64),
        adv_scale=2.0,
        logits=logits,
        ref_logits=ref_logits,
    )
    cfg = PPOConfig(vf_coef=0.0, kl_estimator="exact")
    with_term, _ = ppo_loss(_inputs(**common), cfg=cfg, beta=0.5, counts=ONE)
    without, _ = ppo_loss(_inputs(**common), cfg=PPOConfig(vf_coef=0.0, kl_estimator="k1"), beta=0.5, counts=ONE)
    kl = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert float(with_term - without) == pytest.approx(0.25 * kl, abs=1e-12)
    with pytest.raises(ValueError, match="needs_ref_logits"):
        ppo_loss(_inputs(**{**common, "ref_logits": None}), cfg=cfg, beta=0.5, counts=ONE)


def test_grpo_loss_k3_in_loss_value_and_gradient():
    """k3 in the loss (DeepSeekMath Eq. 3), lr = logps - ref_logps = (ln 2, 0): k3 = e^{-lr} - 1 + lr =
    (ln 2 - ½, 0) = (0.193147, 0); β = 0.1 -> per-token (-1.2 + 0.0193147, 0.8);
    seq_mean_token_mean over 1 sequence: (-1.2 + 0.0193147 + 0.8)/2 = -0.190343.
    Gradient: the surrogate is clipped (0); d(β k3)/dlogps = β(1 - e^{-lr}) = (0.05, 0), / n_i = 2 -> (0.025, 0)."""
    x = _inputs(ref_shift=(math.log(2), 0.0))
    cfg = GRPOConfig(kl_estimator="k3", kl_placement="loss", loss_aggregation="seq_mean_token_mean", clip_eps=0.2)
    loss, stats = grpo_loss(x, cfg=cfg, beta=0.1, counts=ONE)
    assert float(loss) == pytest.approx((-1.2 + 0.1 * (math.log(2) - 0.5) + 0.8) / 2, abs=1e-12)
    assert float(stats["kl_loss"]) == pytest.approx((math.log(2) - 0.5) / 2, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(x.logps.grad, torch.tensor([[0.025, 0.0]], dtype=torch.float64))


def test_grpo_loss_k3_clamp_reaches_the_loss():
    """kl_clamp_output = 0.1 clamps k3 = 0.193 to 0.1 on token 0 (its gradient becomes 0): half the tokens."""
    x = _inputs(ref_shift=(math.log(2), 0.0))
    cfg = GRPOConfig(kl_estimator="k3", loss_aggregation="token_mean", kl_clamp_output=0.1)
    loss, stats = grpo_loss(x, cfg=cfg, beta=0.1, counts=ONE)
    assert float(stats["kl_clamped_frac"]) == 0.5
    assert float(loss) == pytest.approx((-1.2 + 0.1 * 0.1 + 0.8) / 2, abs=1e-12)
    loss.backward()
    assert float(x.logps.grad.abs().max()) == 0.0


def test_grpo_loss_is_weighting():
    """k1 x π_θ/π_old (loss_is): value ρ·lr with ρ = (1.5, 0.5), lr = (ln 2, 0) -> (1.5 ln 2, 0) x β = 0.1;
    gradient d(ρ·lr)/dlogps = ρ(lr + 1) -> (1.5(ln 2 + 1), 0.5) x β / N (token_mean, N = 2)."""
    x = _inputs(ref_shift=(math.log(2), 0.0))
    cfg = GRPOConfig(kl_estimator="k1", kl_placement="loss_is", loss_aggregation="token_mean")
    loss, _ = grpo_loss(x, cfg=cfg, beta=0.1, counts=ONE)
    assert float(loss) == pytest.approx((-1.2 + 0.1 * 1.5 * math.log(2) + 0.8) / 2, abs=1e-12)
    loss.backward()
    want = torch.tensor([[1.5 * (math.log(2) + 1), 0.5]], dtype=torch.float64) * 0.1 / 2
    torch.testing.assert_close(x.logps.grad, want)


def test_rloo_loss_sequence_sum_and_gradient():
    """seq_sum over S = 1: (-1.2 + 0.8)/1 = -0.4. Inside the clip (log ρ = 0) with A = (3,) per sequence:
    L = -3·(ρ_0 + ρ_1), dL/dlogps = (-3, -3)."""
    loss, _ = rloo_loss(_inputs(), cfg=RLOOConfig(clip_eps=0.2), beta=0.05, counts=ONE)
    assert float(loss) == pytest.approx(-0.4, abs=1e-12)
    x = _inputs(log_ratio=(0.0, 0.0))
    x.advantages = torch.tensor([3.0], dtype=torch.float64)
    loss, _ = rloo_loss(x, cfg=RLOOConfig(), beta=0.05, counts=ONE)
    loss.backward()
    torch.testing.assert_close(x.logps.grad, torch.tensor([[-3.0, -3.0]], dtype=torch.float64))
