"""KL monitoring in the trainers (docs/diagnostics.md) on the real stories260K: β = 0 still logs
kl/ref (TRL drops the metric then), the rollout's kl/by_position buckets add up to kl/ref, and a logged
gold reward beside the optimised proxy brings reward/rank_corr/<name>, eval/reward/<name>_stderr and
eval/hacking."""

from __future__ import annotations

import math

import pytest

from tether.ops.positions import BUCKET_LABELS
from tether.rewards import CallableSource
from tether.trainers.grpo import GRPOConfig, train_grpo
from tether.trainers.ppo import PPOConfig, train_ppo
from tether.trainers.rloo import RLOOConfig, train_rloo

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl",
    "Tom was",
    "The sun was",
    "Lily saw a",
    "The cat",
    "In the park,",
    "Ben and Mia",
    "The big tree",
    "Sam had a",
    "At night,",
]


def _length(completions):
    return [float(len(c)) for c in completions]


def _words(completions):
    return [float(len(c.split())) for c in completions]


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_beta_zero_logs_kl_ref_and_position_buckets(method, stories_path, tmp_path):
    """Two steps at β = 0 with lr 1e-2 (so the second rollout's policy has moved): kl/ref is in every row
    and > 0 at step 2 (exact KL, ≥ 0); kl/penalty is 0; the four kl/by_position buckets add up to kl/ref
    (a decomposition of the same float64 sums, so to float rounding). A length reward is logged beside
    the optimised VADER: reward/rank_corr/words lies in [-1, 1] and the evaluation carries its stderr
    and eval/hacking (0: two evaluations cannot show a turn)."""
    cls, train = {"ppo": (PPOConfig, train_ppo), "grpo": (GRPOConfig, train_grpo), "rloo": (RLOOConfig, train_rloo)}[
        method
    ]
    cfg = cls(
        model=stories_path,
        output_dir=str(tmp_path / method),
        beta=0.0,
        batch_size=8,
        samples_per_prompt=2 if method != "ppo" else 1,
        max_new_tokens=8,
        learning_rate=1e-2,
        max_steps=2,
        eval_every=2,
        eval_max_prompts=4,
        eval_samples=2,
        progress=False,
        sample_every=0,
        seed=0,
        **({"kl_placement": "loss"} if method == "grpo" else {}),
    )
    res = train(
        cfg,
        prompts=PROMPTS,
        reward=CallableSource(_length, name="len"),
        log_rewards=[CallableSource(_words, name="words")],
    )
    h = res["history"]
    assert [r["step"] for r in h] == [1, 2]
    for r in h:
        assert r["beta"] == 0.0 and r["kl/penalty"] == 0.0
        parts = [r[f"kl/by_position/{b}"] for b in BUCKET_LABELS]
        assert sum(parts) == pytest.approx(r["kl/ref"], rel=1e-6, abs=1e-9)
        assert parts[2] == parts[3] == 0.0  # 8 tokens: nothing at positions 16+
        assert 0.0 < r["reward/rank_corr/words"] <= 1.0
    assert h[1]["kl/ref"] > 1e-3, h[1]["kl/ref"]
    ev = res["eval_history"][-1]
    assert ev["eval/kl"] > 0 and math.isfinite(ev["eval/reward/words_stderr"]) and ev["eval/reward/words_stderr"] > 0
    assert h[-1]["eval/hacking"] == 0.0


def test_dpo_refuses_beta_zero_and_logs_kl_ref_at_small_beta(stories_path, assets_dir, tmp_path):
    """DPO's loss -log σ(β·margin) is the constant log 2 at β = 0 (ops/preference.py divides or scales by β):
    a fixed β = 0 is a one-line UserError before any weights load, pointing to the online trainers. At a
    tiny β (1e-6, effectively unpenalised) the evaluation still measures kl/ref with its standard error."""
    from tether.data.preference import sentiment_pairs
    from tether.errors import UserError
    from tether.trainers.dpo import DPOConfig, train_dpo

    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    rows = sentiment_pairs(pos, neg, n=16, seed=0)
    kw = dict(
        model=stories_path,
        max_steps=2,
        eval_every=2,
        batch_size=4,
        learning_rate=1e-2,
        max_length=48,
        eval_pairs=4,
        kl_prompts=4,
        kl_samples=1,
        kl_max_new_tokens=8,
        progress=False,
        seed=0,
    )
    with pytest.raises(UserError, match="beta=0.0.*--beta 0"):
        train_dpo(DPOConfig(output_dir=str(tmp_path / "zero"), beta=0.0, **kw), rows=rows)
    res = train_dpo(DPOConfig(output_dir=str(tmp_path / "tiny"), beta=1e-6, reference="copy", **kw), rows=rows)
    assert res["beta"] == 1e-6 and res["kl/ref"] >= 0.0 and math.isfinite(res["kl/ref_stderr"])


@pytest.mark.slow  # six 2-step runs: ~20-40 s on 2 loaded cores
@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_position_weights_of_one_are_bit_identical_and_others_change_the_penalty(method, stories_path, tmp_path):
    """w = (1) given explicitly reproduces the default run exactly (every metric of every step: the same
    floats). w = (4, 2, 1) changes the training: with the exact KL in PPO's reward the applied penalty is
    β Σ_t w_t kl_t > β·kl/ref (the default's penalty equals β·kl/ref)."""
    cls, train = (PPOConfig, train_ppo) if method == "ppo" else (GRPOConfig, train_grpo)
    base = dict(
        model=stories_path,
        beta=0.1,
        batch_size=8,
        max_new_tokens=8,
        learning_rate=1e-2,
        max_steps=2 if method == "ppo" else 3,
        eval_every=0,
        progress=False,
        sample_every=0,
        seed=0,
        kl_estimator="exact" if method == "ppo" else "k3",
        **({"samples_per_prompt": 2} if method == "grpo" else {}),
    )
    runs = {
        name: train(cls(output_dir=str(tmp_path / name), **base, **kw), prompts=PROMPTS)["history"]
        for name, kw in [
            ("default", {}),
            ("ones", {"beta_position_weights": [1.0]}),
            ("weighted", {"beta_position_weights": [4.0, 2.0, 1.0]}),
        ]
    }
    for a, b in zip(runs["default"], runs["ones"]):
        assert a == b
    assert runs["weighted"][0]["kl/ref"] == runs["default"][0]["kl/ref"] == 0.0  # the same first rollout, from π_ref
    # ppo: the first update differs (exact KL in the reward); grpo: a loss-side k3 has zero gradient at
    # π_θ = π_ref, so the first update is the same and the second differs
    d, w = runs["default"][-1], runs["weighted"][-1]
    assert w["kl/ref"] != d["kl/ref"]
    if method == "ppo":  # exact per-token KLs are ≥ 0: β Σ w_t kl_t > β Σ kl_t = β·kl/ref when w ≥ 1, > 1 early
        assert d["kl/penalty"] == pytest.approx(0.1 * d["kl/ref"], rel=1e-5)
        assert w["kl/penalty"] > 0.1 * w["kl/ref"] * (1 + 1e-4) > 0
