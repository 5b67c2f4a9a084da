"""The demo's evaluation statistics and PPO starting β (tether/demo/task.py, tether/demo/pipeline.py,
engine.mean_stderr, control.initial_beta_for_kl): hand-derived values, and the evaluation with several
samples per prompt against the engine's own samples."""

from __future__ import annotations

import math

import pytest
import torch

from tether.control import initial_beta_for_kl
from tether.demo.pipeline import DemoConfig, initial_betas
from tether.demo.task import Prompt, evaluate_policy, within_prompt_variance
from tether.engine import evaluate, mean_stderr
from tether.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    """Sampling a 260K-parameter model: a second intra-op thread only adds synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Three prompts x two samples, prompt-major: per-prompt means 2, 2, 5.
SCORES = [1.0, 3.0, 2.0, 2.0, 6.0, 4.0]


def test_mean_stderr_per_prompt_hand_values():
    """Over prompts: the means 2, 2, 5 have mean 3, deviations -1, -1, 2, so s² = 6/2 = 3 and the
    standard error is sqrt(3/3) = 1. Over the six values as if independent: deviations -2, 0, -1, -1,
    3, 1, s² = 16/5, standard error sqrt(16/5/6) ≈ 0.73 (smaller: it ignores that a prompt's samples
    share the prompt)."""
    x = torch.tensor(SCORES)
    assert mean_stderr(x, per_prompt=2) == pytest.approx((3.0, 1.0), abs=1e-12)
    assert mean_stderr(x) == pytest.approx((3.0, math.sqrt(16 / 5 / 6)), abs=1e-12)
    assert mean_stderr(x, per_prompt=1) == mean_stderr(x)
    with pytest.raises(ValueError, match="whole number of prompts"):
        mean_stderr(x[:5], per_prompt=2)


def test_within_prompt_variance_hand_values():
    """Per prompt (k = 2, n - 1 = 1): (1-2)² + (3-2)² = 2, 0, (6-5)² + (4-5)² = 2; mean 4/3. With
    k = 1 it falls back to the variance over all values, 16/5."""
    assert within_prompt_variance(SCORES, 2) == pytest.approx(4 / 3, abs=1e-12)
    assert within_prompt_variance(SCORES, 1) == pytest.approx(16 / 5, abs=1e-12)


def test_initial_beta_for_kl_hand_value_and_the_tilt_it_approximates():
    """β₀ = sqrt(Var/(2·target)): Var 2, target 4 -> sqrt(1/4) = 0.5.

    Against the exact tilt of a two-point reward r = ±1 (probability 1/2 each, Var 1): with t = 1/β,
    π*(±1) ∝ e^{±t}/2, log Z = log cosh t, KL[π*‖π_ref] = t·E_π*[r] − log Z = t·tanh t − log cosh t
    = t²/2 − t⁴/4 + t⁶/9 − ... (cumulants: κ₂t²/2 + κ₄t⁴/8, κ₄ = −2). At β₀ = sqrt(1/(2·target)),
    t² = 2·target, so KL = target − target² + (8/9)·target³ − ...: for this *symmetric* reward (κ₃ = 0)
    the relative error is first order in the target, and (a bounded reward, whose tilt has less
    variance, 1 − tanh² t) the KL at β₀ is below the target. A skewed reward does worse: the next test."""
    assert initial_beta_for_kl(2.0, 4.0) == pytest.approx(0.5, abs=1e-15)
    for target in (1e-3, 0.1, 3.0):
        t = 1.0 / initial_beta_for_kl(1.0, target)
        kl = t * math.tanh(t) - math.log(math.cosh(t))
        assert kl < target
        if target < 0.2:  # an alternating series with shrinking terms: the next term bounds the rest
            assert kl == pytest.approx(target - target**2, abs=8 / 9 * target**3 + 1e-15)
    with pytest.raises(UserError, match="kl_target"):
        initial_beta_for_kl(1.0, 0.0)


def test_initial_beta_for_a_skewed_reward_misses_by_the_square_root_of_the_target():
    """docs/theory.md §4: with t = 1/β₀ = sqrt(2ε/κ₂), KL = κ₂t²/2 + κ₃t³/3 + ... = ε·(1 + (2√2/3)·γ·√ε + O(ε)),
    γ = κ₃/κ₂^{3/2} the reward's skewness under π_ref: the relative error is O(√ε), not second order.
    A rare success (Bernoulli p = 0.1: Var 0.09, γ = (1 − 2p)/sqrt(p(1 − p)) = 8/3), exact tilt
    π*(1) = p·e^t/Z, Z = 1 − p + p·e^t, KL = t·π*(1) − log Z: at β₀ the KL is 1.276, 1.968 and 2.428 times
    the target at ε = 0.01, 0.1, 0.5 (the first-order term predicts 1.251 at ε = 0.01). Above the target:
    a run started at β₀ overshoots at first."""
    p = 0.1
    ratios = []
    for eps in (0.01, 0.1, 0.5):
        t = 1.0 / initial_beta_for_kl(p * (1 - p), eps)
        log_z = math.log(1 - p + p * math.exp(t))
        kl = t * p * math.exp(t - log_z) - log_z
        ratios.append(kl / eps)
    assert [round(r, 2) for r in ratios] == [1.28, 1.97, 2.43]
    skew = (1 - 2 * p) / math.sqrt(p * (1 - p))
    first_order = 1 + 2 * math.sqrt(2) / 3 * skew * math.sqrt(0.01)
    # the √ε term is most of the error at ε = 0.01: the rest is O(ε), ~√ε = 0.1 of it (measured 0.09)
    assert abs(ratios[0] - first_order) < 0.15 * (ratios[0] - 1)
    assert ratios[0] - 1 > 10 * 0.01  # far above a second-order error (~ε)


def test_initial_betas_per_run():
    """PPO runs get β₀ from the proxy's spread, PPO-GT from the gold reward's, each under its own reference
    (the weak reference's PPO-GT from the weak reference's spread); DPO, best-of-n and the fixed-β ladder
    are untouched; ``ppo_init_beta`` overrides every adaptive run."""
    cfg = DemoConfig(
        dpo_betas=[0.1],
        ppo_kl_targets=[2.0],
        ppo_gt_kl_targets=[8.0],
        bon_ns=[2],
        ppo_seeds=[0, 3],
        ppo_seeds_at=[2.0],
        ladder_betas=[0.0],
    )
    spreads = {"sft": {"proxy": 4.0, "gold": 0.16}, "sft_weak": {"proxy": 1.0, "gold": 0.64}}
    specs = {s["run"]: s for s in initial_betas(cfg, cfg.runs(), spreads)}
    assert specs["ppo-kl2"]["init_beta"] == pytest.approx(1.0)  # sqrt(4 / 4)
    assert specs["ppo-kl2-seed3"]["init_beta"] == pytest.approx(1.0) and specs["ppo-kl2-seed3"]["seed"] == 3
    assert specs["ppo_gt-kl8"]["init_beta"] == pytest.approx(0.1)  # sqrt(0.16 / 16)
    assert specs["ppo_gt-kl8-weakref"]["init_beta"] == pytest.approx(0.2)  # sqrt(0.64 / 16)
    for run in ("dpo-beta0.1", "bon-n2", "ladder-beta0", "ladder-beta0-seed1", "ladder_small-beta0.05"):
        assert "init_beta" not in specs[run], run
    assert specs["ladder-beta0"]["beta"] == 0.0 and specs["ladder_small-beta0.05"]["proxy"] == "rm_small"
    fixed = DemoConfig(
        ppo_kl_targets=[2.0], ppo_gt_kl_targets=[8.0], ppo_init_beta=0.3, methods=["ppo", "ppo_gt"], ppo_seeds=[0]
    )
    assert [s["init_beta"] for s in initial_betas(fixed, fixed.runs(), spreads)] == [0.3, 0.3]


def test_evaluate_policy_with_several_samples_per_prompt(stories_path):
    """k = 3 samples of each of 4 prompts: the engine's samples (prompt-major), the KL and reward means
    over all 12, their standard errors over the 4 per-prompt means, and the samples shown are the
    first of each prompt."""
    from tether.modeling import load_causal_lm, load_tokenizer
    from tether.reference import FrozenReference
    from tether.rewards import CallableSource

    torch.manual_seed(0)
    tok, policy = load_tokenizer(stories_path), load_causal_lm(stories_path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape) * 0.01)
    reference = FrozenReference(load_causal_lm(stories_path))
    texts = ["Once upon a time", "The little dog", "Lily wanted to", "One day"]
    prompts = [Prompt(tok(t)["input_ids"], t) for t in texts]
    length = CallableSource(lambda completions: [float(len(c)) for c in completions], name="len")
    out = evaluate_policy(
        policy,
        reference,
        tok,
        prompts,
        gold=length,
        proxy=length,
        max_new_tokens=8,
        seed=3,
        samples_per_prompt=3,
        return_scores=True,
        n_keep=2,
    )
    res = evaluate(
        policy, reference, [p.ids for p in prompts], tokenizer=tok, seed=3, samples_per_prompt=3, max_new_tokens=8
    )
    lengths = torch.tensor([float(len(c)) for c in res["texts"]])
    kl = torch.tensor(res["per_sequence"]["exact"])
    assert out["scores"]["gold"] == lengths.tolist()
    assert (out["gold_reward"], out["gold_stderr"]) == mean_stderr(lengths.double().view(4, 3).mean(1))
    assert (out["kl"], out["kl_stderr"]) == mean_stderr(kl.double().view(4, 3).mean(1))
    assert out["kl"] == pytest.approx(res["estimators"]["exact"]["mean"], abs=1e-12)  # the same mean over 12
    assert out["kl"] > 0
    assert [s["completion"] for s in out["samples"]] == [res["texts"][0], res["texts"][3]]


def test_demo_help_has_examples_and_the_new_fields(capsys):
    """``tether demo --help`` prints (a field docstring with a bare % once broke argparse's help), with
    its examples and the evaluation / starting-β fields."""
    from tether.commands.demo import main as demo_main

    with pytest.raises(SystemExit) as e:
        demo_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "tether demo --quick --output_dir" in out and "--eval_samples" in out and "--ppo_init_beta" in out
    assert "at most 2% a step" in out  # the ppo_kl_horizon docstring, % and all


def test_best_of_n_points_share_one_draw(stories_path):
    """best_of_n_points draws max(ns) samples per row once, so the proxy score of the kept completion
    (the max of the first n) can only grow with n, row by row: the means are non-decreasing exactly, not
    just in expectation. KL bound log n - (n-1)/n; the standard errors are over the 3 prompts."""
    from tether.demo.task import best_of_n_points
    from tether.modeling import load_causal_lm, load_tokenizer
    from tether.rewards import CallableSource

    tok, model = load_tokenizer(stories_path), load_causal_lm(stories_path)
    texts = ["Once upon a time", "The little dog", "Lily wanted to"]
    prompts = [Prompt(tok(t)["input_ids"], t) for t in texts]
    proxy = CallableSource(lambda completions: [float(len(c)) for c in completions], name="proxy")
    gold = CallableSource(lambda completions: [float(c.count("a")) for c in completions], name="gold")
    pts = best_of_n_points(
        model, tok, prompts, [1, 2, 4], gold=gold, proxy=proxy, max_new_tokens=8, seed=1, samples_per_prompt=2
    )
    proxies = [pts[n]["proxy_reward"] for n in (1, 2, 4)]
    assert proxies == sorted(proxies) and proxies[0] < proxies[-1]
    for n in (1, 2, 4):
        assert pts[n]["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
        assert 0 <= pts[n]["kl"] <= pts[n]["kl_bound"] + 1e-9
        assert len(pts[n]["samples"]) == 3 and [s["prompt"] for s in pts[n]["samples"]] == texts
        assert pts[n]["gold_stderr"] >= 0
