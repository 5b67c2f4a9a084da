"""The reward-hacking monitor (tether/diagnostics/hacking.py): rank correlation, Gao et al.'s fit, the turn detector."""

import math

import pytest
import torch

from tether.diagnostics.hacking import HackingMonitor, average_ranks, fit_gao, reward_hacking, spearman


def test_average_ranks_ties_share_the_mean_rank():
    # sorted: 1 (rank 1), 2, 2 (ranks 2 and 3 -> 2.5 each), 3 (rank 4)
    assert average_ranks(torch.tensor([2.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 1.0, 4.0, 2.5]


def test_spearman_hand_values():
    """x = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4], centred [-1.5, 0, 0, 1.5], Σ² = 4.5;
    y = [4, 1, 3, 2] -> ranks [4, 1, 3, 2], centred [1.5, -1.5, 0.5, -0.5], Σ² = 5;
    Σ xy = -2.25 + 0 + 0 - 0.75 = -3  ->  ρ = -3 / sqrt(22.5) = -0.632455532..."""
    rho = spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([4.0, 1, 3, 2]))
    assert rho == pytest.approx(-3 / math.sqrt(22.5), abs=1e-12)
    # monotone (not linear) relation: ρ = 1 exactly; reversed: -1
    x = torch.tensor([0.1, 0.5, 2.0, 7.0])
    assert spearman(x, x.exp()) == pytest.approx(1.0, abs=1e-12)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(spearman(x, torch.ones(4)))  # a constant has no ranking
    assert math.isnan(spearman(x[:1], x[:1]))


@pytest.mark.parametrize("kind,alpha,beta", [("rl", 1.3, 0.4), ("bon", 0.9, 0.2), ("rl", 0.5, -0.1)])
def test_fit_gao_recovers_noiseless_coefficients(kind, alpha, beta):
    kl = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]

    def curve(k):
        d = math.sqrt(k)
        f = d if kind == "bon" else (math.log(d) if d > 0 else 0.0)
        return d * (alpha - beta * f)

    fit = fit_gao(kl, [curve(k) for k in kl], kind)
    assert fit.alpha == pytest.approx(alpha, abs=1e-9) and fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit["alpha"] == fit.alpha and dict(fit)["peak_kl"] == fit.peak_kl
    assert fit.rmse < 1e-9
    if beta <= 0:
        assert fit.peak_kl == math.inf
    elif kind == "rl":  # α − β(log d + 1) = 0  ->  d* = exp(1.3/0.4 − 1) = e^2.25, KL* = e^4.5
        assert fit.peak_kl == pytest.approx(math.exp(4.5), rel=1e-9)
        assert fit.peak_reward == pytest.approx(0.4 * math.exp(2.25), rel=1e-9)
    else:  # α − 2βd = 0  ->  d* = 0.9/0.4 = 2.25, KL* = 5.0625, R* = α²/(4β) = 1.0125
        assert fit.peak_kl == pytest.approx(5.0625, rel=1e-9)
        assert fit.peak_reward == pytest.approx(1.0125, rel=1e-9)
    assert fit.predict(2.0) == pytest.approx(curve(2.0), abs=1e-9)


def test_fit_gao_least_squares_on_noisy_points_matches_lstsq():
    kl = [0.25, 1.0, 2.25, 4.0, 9.0]
    r = [0.3, 0.9, 1.1, 1.0, 0.7]
    fit = fit_gao(kl, r, "bon")
    d = torch.tensor(kl, dtype=torch.float64).sqrt()
    A = torch.stack([d, -d * d], 1)
    sol = torch.linalg.lstsq(A, torch.tensor(r, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    assert (fit.alpha, fit.beta) == pytest.approx(sol.tolist(), abs=1e-10)


def test_fit_gao_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        fit_gao([1, 2], [1, 2], "ppo")
    with pytest.raises(ValueError, match="same length"):
        fit_gao([1, 2], [1], "rl")
    with pytest.raises(ValueError, match=">= 0"):
        fit_gao([-1, 2], [1, 2], "rl")
    with pytest.raises(ValueError, match="determine"):
        fit_gao([0.0, 4.0], [0.0, 1.0], "rl")  # one non-zero point: two unknowns


def _history(gold, proxy, se=0.05, kl=None):
    kl = kl if kl is not None else [float(i) for i in range(len(gold))]
    rows = []
    for k, g, x in zip(kl, gold, proxy):
        row = {"eval/kl": k, "eval/reward/gold": g, "eval/reward/proxy": x}
        if se is not None:
            row.update({"eval/reward/gold_stderr": se, "eval/reward/proxy_stderr": se})
        rows.append(row)
    return rows


def _first_flag(history, **kw):
    for n in range(1, len(history) + 1):
        if reward_hacking(history[:n], proxy="proxy", gold="gold", **kw).flagged:
            return n
    return None


def test_reward_hacking_fires_on_the_turn():
    """Gold peaks at evaluation 3 (KL 3) and falls; proxy keeps rising; se 0.05 everywhere.
    After 5 evals the peak is among the last two (patience 2): not yet. After 6: tail = (0.7, 0.5),
    mean 0.6, se sqrt(2·0.05²)/2 = 0.0354; drop 0.9 − 0.6 = 0.3 > 3·hypot(0.0354, 0.05) = 0.184;
    proxy rise (4+5)/2 − 3 = 1.5 > 0.184: fires at the 6th evaluation, naming KL 3."""
    h = _history([0.0, 0.5, 0.8, 0.9, 0.7, 0.5, 0.3], [0.0, 1, 2, 3, 4, 5, 6])
    assert _first_flag(h) == 6
    v = reward_hacking(h[:6], proxy="proxy", gold="gold")
    assert (v.peak, v.kl_at_peak, v.kl_now) == (3, 3.0, 5.0)
    assert v.gold_now == pytest.approx(0.6) and v.proxy_now == pytest.approx(4.5)


def test_reward_hacking_ignores_noise_within_standard_errors():
    """A gold plateau wobbling by ~1 se (0.86 peak, then 0.82, 0.80, 0.84, 0.81) beside a rising proxy:
    the largest drop of a two-eval mean is 0.86 − 0.81 = 0.05 < 0.184: never fires. Without standard
    errors only the ordering test is left, and the same history fires (at 6 evals): the errors matter."""
    gold = [0.0, 0.5, 0.8, 0.86, 0.82, 0.80, 0.84, 0.81]
    proxy = [0.0, 1, 2, 3, 4, 5, 6, 7]
    assert _first_flag(_history(gold, proxy)) is None
    assert _first_flag(_history(gold, proxy, se=None)) == 6


def test_reward_hacking_needs_the_proxy_to_rise():
    """Both rewards fall together (a collapsing policy, not a hacked proxy): no flag."""
    h = _history([0.0, 0.5, 0.9, 0.6, 0.3, 0.1], [0.0, 1, 2, 1.5, 1.0, 0.5])
    assert _first_flag(h) is None


def test_hacking_monitor_warns_once_with_the_kl(caplog):
    h = _history([0.0, 0.5, 0.8, 0.9, 0.7, 0.5, 0.3], [0.0, 1, 2, 3, 4, 5, 6], kl=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    mon = HackingMonitor("proxy", ["gold"])
    with caplog.at_level("WARNING", logger="tether.diagnostics.hacking"):
        out = [mon.check(h[:n], step=n)["eval/hacking"] for n in range(1, len(h) + 1)]
    assert out == [0.0] * 5 + [1.0, 1.0]
    warnings = [r.getMessage() for r in caplog.records if "eval/hacking" in r.getMessage()]
    assert len(warnings) == 1 and "stopped rising at KL 2 nats" in warnings[0] and "Gao" in warnings[0]


def test_demo_ppo_on_proxy_history_is_not_flagged():
    """A demo PPO-on-proxy run (target 8; the settings of docs/diagnostics.md's forgetting table): gold
    0.099, 0.097, 0.234, 0.169, 0.256 and proxy 0.152 → 1.670 at KL 0 … 12.4. The gold's dip at step 30
    recovers at step 40, so the best gold is the last evaluation and nothing fires (no standard errors
    were logged: the ordering test alone)."""
    kl = [0.0, 5.95, 14.72, 16.65, 12.44]
    h = _history([0.099, 0.097, 0.234, 0.169, 0.256], [0.152, 0.521, 1.828, 1.923, 1.670], se=None, kl=kl)
    assert _first_flag(h) is None
