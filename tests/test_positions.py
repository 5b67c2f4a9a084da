"""The KL by completion position (tether/ops/positions.py) and the position-dependent β (docs/theory.md §12):
hand values on tiny tensors, and w ≡ 1 bit-identical to the unweighted path."""

import math

import pytest
import torch

from tether.errors import UserError
from tether.modeling import make_batch
from tether.ops.positions import (
    BUCKET_LABELS,
    bucket_of,
    position_bucket_sums,
    position_means,
    position_weights,
    weight_by_position,
)
from tether.trainers.online import LossInputs, _validate, beta_weights
from tether.trainers.rollout import Rollout, rollout_stats

torch.set_num_threads(1)

# two rows, lengths 5 and 2; per-token KL t+1 on row 0, 10·(t+1) on row 1 (masked-out values are garbage)
KL = torch.tensor([[1.0, 2, 3, 4, 5], [10.0, 20, 99, 99, 99]])
MASK = torch.tensor([[True] * 5, [True, True, False, False, False]])


def test_bucket_sums_and_position_means_by_hand():
    """Buckets 0-3 / 4-15 / 16-63 / 64+: row 0 gives 1+2+3+4 = 10 and 5, row 1 gives 10+20 = 30 -> sums
    (40, 5, 0, 0) over (6, 1, 0, 0) tokens. Per position: (11, 22, 3, 4, 5) over (2, 2, 1, 1, 1) rows."""
    assert BUCKET_LABELS == ("0-3", "4-15", "16-63", "64+")
    assert position_bucket_sums(KL, MASK) == ([40.0, 5.0, 0.0, 0.0], [6.0, 1.0, 0.0, 0.0])
    s, n = position_means(KL, MASK)
    assert s.tolist() == [11.0, 22.0, 3.0, 4.0, 5.0] and n.tolist() == [2.0, 2.0, 1.0, 1.0, 1.0]
    assert [bucket_of(x) for x in (0, 3, 4, 15, 16, 63, 64, 10**6)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_position_weights_by_hand():
    assert position_weights(5) is None  # w ≡ 1: the caller keeps its own tensor
    assert position_weights(5, weights=[4, 2, 1]).tolist() == [4.0, 2.0, 1.0, 1.0, 1.0]  # last one repeated
    assert position_weights(2, weights=[4, 2, 1]).tolist() == [4.0, 2.0]
    w = position_weights(3, decay=math.log(2))  # exp(-t·ln 2) = 2^-t
    assert w.tolist() == pytest.approx([1.0, 0.5, 0.25], abs=1e-7)
    assert weight_by_position(KL, None) is KL
    # Σ_t w_t KL_t on row 0 with w = (4, 2, 1, 1, 1): 4 + 4 + 3 + 4 + 5 = 20; row 1 (masked): 40 + 40 = 80
    wk = weight_by_position(KL, position_weights(5, weights=[4, 2, 1])).masked_fill(~MASK, 0.0)
    assert wk.sum(-1).tolist() == [20.0, 80.0]


def test_bad_position_weights_are_user_errors():
    from tether.trainers.ppo import PPO, PPOConfig

    for kw, field in [
        ({"beta_position_decay": -1.0}, "beta_position_decay"),
        ({"beta_position_weights": [1.0, -2.0]}, "beta_position_weights"),
        ({"beta_position_weights": [1.0], "beta_position_decay": 0.5}, "not both"),
    ]:
        with pytest.raises(UserError, match=field):
            _validate(PPOConfig(**kw), PPO)


def _rollout(kl_tokens, kl_exact, scores, metrics=None):
    B, T = kl_tokens.shape
    batch = make_batch([[1]] * B, [[5] * int(n) for n in MASK.sum(-1)], pad_id=0)
    z = torch.zeros(B, T)
    return Rollout(
        batch=batch,
        prompts=["p"] * B,
        completions=["c"] * B,
        no_eos=torch.zeros(B, dtype=torch.bool),
        scores=torch.tensor(scores),
        reward_metrics=metrics or {},
        old_logps=z,
        ref_logps=z,
        kl_tokens=kl_tokens.masked_fill(~MASK, 0.0),
        kl_exact=kl_exact.masked_fill(~MASK, 0.0),
        entropy=z,
    )


def test_kl_in_reward_uses_weighted_kl_and_stats_decompose_kl_ref():
    """PPO's per-token rewards are -β·w_t·kl_t (+ score at the last token); RLOO's sequence reward is
    score − β Σ_t w_t kl_t. With β = 0.5, w = (4, 2, 1, ...): row 0: 1 − 0.5·20 = −9; row 1: 2 − 0.5·80 = −38.
    rollout_stats: kl/by_position/<bucket> are per-sequence parts of the exact KL: (10 + 30)/2 = 20, 5/2 = 2.5,
    0, 0; they add up to kl/ref = (15 + 30)/2 = 22.5; kl/penalty is β Σ w_t kl_t averaged: 0.5·(20+80)/2 = 25."""
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.ppo import prepare as ppo_prepare
    from tether.trainers.rloo import RLOOConfig
    from tether.trainers.rloo import prepare as rloo_prepare

    w = position_weights(5, weights=[4, 2, 1])
    kl_w = weight_by_position(KL, w)
    ro = _rollout(kl_w, KL, [1.0, 2.0])
    prep = ppo_prepare(
        scores=ro.scores,
        kl_tokens=ro.kl_tokens,
        mask=ro.mask,
        values=torch.zeros(2, 5),
        cfg=PPOConfig(whiten_advantages=False, gamma=1.0, lam=1.0),
        beta=0.5,
    )
    assert prep.rewards.sum(-1).tolist() == [-9.0, -38.0]
    assert prep.rewards[0].tolist() == [-2.0, -2.0, -1.5, -2.0, 1.0 - 2.5]
    rl = rloo_prepare(
        scores=ro.scores,
        kl_tokens=ro.kl_tokens,
        mask=ro.mask,
        cfg=RLOOConfig(samples_per_prompt=2, normalize_advantages=False),
        beta=0.5,
    )
    assert rl.advantages.tolist() == [-9.0 - (-38.0), -38.0 - (-9.0)]  # leave-one-out with G = 2
    sums, counts = rollout_stats(ro, beta=0.5)
    mean = {k: sums[k] / counts[k] for k in sums}
    assert [mean[f"kl/by_position/{b}"] for b in BUCKET_LABELS] == [20.0, 2.5, 0.0, 0.0]
    assert mean["kl/ref"] == 22.5 == sum(mean[f"kl/by_position/{b}"] for b in BUCKET_LABELS)
    assert mean["kl/penalty"] == 25.0


def test_rank_corr_is_logged_per_logged_reward():
    """Optimised (first) source [1, 2] against gold [5, 3]: ranks reversed, ρ = −1; against a constant: no value."""
    ro = _rollout(
        KL,
        KL,
        [1.0, 2.0],
        metrics={
            "reward/proxy": torch.tensor([1.0, 2.0]),
            "reward/gold": torch.tensor([5.0, 3.0]),
            "reward/flat": torch.tensor([1.0, 1.0]),
        },
    )
    sums, counts = rollout_stats(ro, beta=0.0)
    assert sums["reward/rank_corr/gold"] == -1.0 and counts["reward/rank_corr/gold"] == 1.0
    assert counts["reward/rank_corr/flat"] == 0.0 and "reward/rank_corr/proxy" not in sums


def _loss_inputs(B=2, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    ref_logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref_logps = torch.log_softmax(ref_logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return dict(
        logps=logps,
        old_logps=logps.detach(),
        ref_logps=ref_logps,
        logits=logits,
        ref_logits=ref_logits,
        mask=MASK,
        advantages=torch.tensor([0.5, -0.5]),
    )


@pytest.mark.parametrize("estimator", ["k3", "exact"])
def test_grpo_kl_in_loss_weighted_by_hand_and_w1_bit_identical(estimator):
    """GRPO (KL in the loss, token_mean): loss = Σ_t [pg_t + β w_t kl_t] / n_tok over counted tokens. The
    weighted loss minus the unweighted one is β Σ_t (w_t − 1) kl_t / n_tok (pg cancels); w = (1,1,1,...)
    given explicitly is bit-identical to the default (no weights)."""
    from tether.ops.kl import kl_loss_term
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.grpo import loss as grpo_loss
    from tether.trainers.online import Counts

    kw = _loss_inputs()
    x = LossInputs(**kw)
    counts = Counts(tokens=float(MASK.sum()), seqs=2.0)
    base = dict(samples_per_prompt=2, kl_estimator=estimator, kl_placement="loss", loss_aggregation="token_mean")
    l0, _ = grpo_loss(x, cfg=GRPOConfig(**base), beta=0.3, counts=counts)
    l1, _ = grpo_loss(x, cfg=GRPOConfig(**base, beta_position_weights=[1.0]), beta=0.3, counts=counts)
    assert torch.equal(l0, l1)
    lw, _ = grpo_loss(x, cfg=GRPOConfig(**base, beta_position_weights=[3.0, 1.0]), beta=0.3, counts=counts)
    kl = kl_loss_term(
        x.logps, x.ref_logps, MASK, estimator=estimator, logits=x.logits, ref_logits=x.ref_logits
    ).per_token
    expect = 0.3 * 2.0 * float(kl[:, 0].detach().sum()) / float(MASK.sum())  # (w_0 − 1) = 2 at t = 0 only
    assert float(lw - l0) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert beta_weights(GRPOConfig(**base), MASK) is None
