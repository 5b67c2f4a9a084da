"""The reward-hacking monitor (docs/diagnostics.md): the gold reward stops rising while the proxy still rises.

Gao, Schulman & Hilton 2022 (arXiv:2210.10760; docs/theory.md §8): optimising a learned proxy reward
raises the gold (true) reward only up to a point; past it, the proxy keeps rising and the gold falls.
As a function of d = sqrt(KL[π‖π_init]) they fit

    RL:          R_gold(d) = d·(α − β_g·log d)        (Gao et al. Eq. 2, their "R_RL")
    best-of-n:   R_gold(d) = d·(α − β_g·d)            (Gao et al. Eq. 1, their "R_bon")

(β_g is their fitted coefficient, not the KL coefficient β). Both are linear in (α, β_g), so the least-
squares fit is a 2×2 normal-equation solve (``fit_gao``). R_gold is the gold reward *relative to the
initial policy* (R(0) = 0): subtract the step-0 gold score before fitting.

Three pieces, all pure functions of numbers the trainers already log:

- ``spearman(x, y)``: the rank correlation between the proxy and a gold reward over one batch
  (``reward/rank_corr/<name>``); when it drops, the proxy no longer orders samples the way the gold does;
- ``fit_gao(kl, reward, kind)``: the coefficients and the KL at the curve's peak;
- ``reward_hacking(history, proxy=, gold=)``: over the evaluation history, the first evaluation at which
  the gold has fallen from its best value by more than ``z`` combined standard errors while the proxy
  has risen since that best value by more than ``z`` combined standard errors (``eval/hacking``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

GAO_KINDS = ("rl", "bon")


# --------------------------------------------------------------------------------------------------
# Rank correlation


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given the mean of the ranks they span (the "fractional" ranking
    Spearman's coefficient uses). (n,) -> (n,) float64."""
    x = x.detach().double().flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:  # walk runs of equal values in sorted order
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two (n,) tensors: the Pearson correlation of their average ranks
    (ties share the mean rank). nan when n < 2 or either tensor is constant (its ranks have no spread)."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman: x and y need the same length, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Gao et al.'s curves


@dataclass(frozen=True)
class GaoFit:
    """A least-squares fit of gold ≈ d·(α − β_g·f(d)), d = sqrt(KL); f(d) = log d (``rl``) or d (``bon``)."""

    kind: str
    alpha: float
    beta: float  # Gao et al.'s β (β_g), not the KL coefficient
    peak_kl: float  # KL at the curve's maximum; inf when β_g <= 0 (the fitted curve never turns)
    peak_reward: float  # the curve's value there (inf when it never turns)
    rmse: float  # root mean squared residual of the fit

    def __getitem__(self, key: str):
        """``fit["alpha"]`` as well as ``fit.alpha``: callers (the sweep report) may treat it as a dict."""
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return ("kind", "alpha", "beta", "peak_kl", "peak_reward", "rmse")

    def predict(self, kl: float) -> float:
        d = math.sqrt(kl)
        return d * (self.alpha - self.beta * _shape(d, self.kind))


def _shape(d: float, kind: str) -> float:
    """f(d) in d·(α − β_g·f(d)); d·log d → 0 as d → 0, so the RL column is 0 at d = 0."""
    if kind == "bon":
        return d
    return math.log(d) if d > 0 else 0.0


def fit_gao(kl: Sequence[float], reward: Sequence[float], kind: str = "rl") -> GaoFit:
    """Fit Gao et al.'s gold-reward curve to evaluation points (docs/theory.md §8).

    ``kl``: (n,) KL[π‖π_init] at each evaluation (nats, ≥ 0); ``reward``: (n,) the gold reward there,
    *relative to the initial policy* (R(0) = 0); ``kind``: "rl" (d·(α − β_g log d)) or "bon"
    (d·(α − β_g d)), d = sqrt(KL).

    The model is linear in θ = (α, β_g) with columns a_i = d_i and b_i = −d_i·f(d_i), so the least-squares
    solution solves the normal equations [[Σa², Σab], [Σab, Σb²]] θ = [Σa·r, Σb·r] by Cramer's rule.
    Peak (dR/dd = 0): rl: α − β_g(log d + 1) = 0 → d* = exp(α/β_g − 1), R* = β_g·d*;
    bon: α − 2β_g d = 0 → d* = α/(2β_g), R* = α²/(4β_g). KL* = d*². β_g ≤ 0: no peak (inf).

    Raises ValueError on mismatched lengths, an unknown kind, a negative or non-finite KL, or points that
    do not determine both coefficients (fewer than two distinct non-zero d, or, for rl, all at d = 1)."""
    if kind not in GAO_KINDS:
        raise ValueError(f"fit_gao: kind must be one of {GAO_KINDS}, got {kind!r}")
    kl, reward = [float(k) for k in kl], [float(r) for r in reward]
    if len(kl) != len(reward):
        raise ValueError(f"fit_gao: kl and reward need the same length, got {len(kl)} and {len(reward)}")
    if any(not math.isfinite(k) or k < 0 for k in kl) or any(not math.isfinite(r) for r in reward):
        raise ValueError("fit_gao: every kl must be finite and >= 0 and every reward finite")
    ds = [math.sqrt(k) for k in kl]
    a = ds
    b = [-d * _shape(d, kind) for d in ds]
    saa = sum(x * x for x in a)
    sbb = sum(x * x for x in b)
    sab = sum(x * y for x, y in zip(a, b))
    sar = sum(x * r for x, r in zip(a, reward))
    sbr = sum(x * r for x, r in zip(b, reward))
    det = saa * sbb - sab * sab
    if not det > 1e-12 * max(saa * sbb, 1e-300):
        raise ValueError(
            "fit_gao: the points do not determine α and β_g (need at least two distinct KL > 0"
            + (", not all at KL = 1" if kind == "rl" else "")
            + ")"
        )
    alpha = (sar * sbb - sbr * sab) / det
    beta = (saa * sbr - sab * sar) / det
    if beta > 0:
        if kind == "rl":
            d_star = math.exp(min(alpha / beta - 1, 350.0))
            r_star = beta * d_star
        else:
            d_star = alpha / (2 * beta) if alpha > 0 else 0.0
            r_star = d_star * (alpha - beta * d_star)
        peak_kl, peak_r = d_star * d_star, r_star
    else:
        peak_kl = peak_r = float("inf")
    res = [r - (alpha * x + beta * y) for x, y, r in zip(a, b, reward)]
    rmse = math.sqrt(sum(e * e for e in res) / len(res))
    return GaoFit(kind, alpha, beta, peak_kl, peak_r, rmse)


# --------------------------------------------------------------------------------------------------
# The turn detector


@dataclass(frozen=True)
class HackingVerdict:
    """What ``reward_hacking`` decided and from what (indices into the evaluations that carry both rewards)."""

    flagged: bool
    peak: int  # evaluation with the best gold reward so far (-1 without evaluations)
    kl_at_peak: float  # eval/kl there: the KL at which the gold stopped rising
    kl_now: float
    gold_peak: float
    gold_now: float  # mean over the last ``patience`` evaluations
    proxy_peak: float
    proxy_now: float  # mean over the last ``patience`` evaluations


def _mean_se(rows: Sequence[Mapping], key: str) -> tuple[float, Optional[float]]:
    """Mean of rows[key] and its standard error sqrt(Σ se²)/k from rows[key + "_stderr"] (None if any is missing)."""
    vals = [float(r[key]) for r in rows]
    ses = [r.get(f"{key}_stderr") for r in rows]
    se = (
        math.sqrt(sum(float(s) ** 2 for s in ses)) / len(ses)
        if all(s is not None and math.isfinite(s) for s in ses)
        else None
    )
    return sum(vals) / len(vals), se


def reward_hacking(
    history: Sequence[Mapping], *, proxy: str, gold: str, z: float = 3.0, patience: int = 2
) -> HackingVerdict:
    """Has the gold reward stopped rising while the proxy still rises? A pure function of the evaluation
    history (rows in step order with ``eval/kl``, ``eval/reward/<proxy>``, ``eval/reward/<gold>`` and,
    optionally, their ``_stderr``).

    Let p be the evaluation with the highest gold reward and "now" the last ``patience`` evaluations
    (p must precede them). It fires when, at every one of those evaluations, the gold is below its value
    at p and the proxy above its value at p, and (where standard errors are logged) the mean gold over
    them is more than ``z`` combined standard errors below the peak and the mean proxy more than ``z``
    above it: sqrt(se_p² + se_now²), se_now = sqrt(Σ se_i²)/patience. Noise within the standard errors
    does not fire it; a plateau of the gold with a rising proxy fires only once the gold falls clearly.
    z = 3 rather than 2 because p is the maximum of several noisy values, which biases the peak upward
    by about one standard error for ~5-10 evaluations."""
    if patience < 1:
        raise ValueError("patience must be >= 1")
    gk, pk = f"eval/reward/{gold}", f"eval/reward/{proxy}"
    evals = [h for h in history if h.get(gk) is not None and h.get(pk) is not None and h.get("eval/kl") is not None]
    nan = float("nan")
    if not evals:
        return HackingVerdict(False, -1, nan, nan, nan, nan, nan, nan)
    golds = [float(h[gk]) for h in evals]
    p = max(range(len(golds)), key=lambda i: (golds[i], -i))  # the first maximum
    tail = evals[-patience:]
    g_now, g_se = _mean_se(tail, gk)
    x_now, x_se = _mean_se(tail, pk)
    g_peak, g_pse = _mean_se([evals[p]], gk)
    x_peak, x_pse = _mean_se([evals[p]], pk)
    flagged = p < len(evals) - patience and len(evals) > patience
    flagged = flagged and all(float(h[gk]) < g_peak for h in tail) and all(float(h[pk]) > x_peak for h in tail)
    if flagged and g_se is not None and g_pse is not None:
        flagged = g_peak - g_now > z * math.hypot(g_se, g_pse)
    if flagged and x_se is not None and x_pse is not None:
        flagged = x_now - x_peak > z * math.hypot(x_se, x_pse)
    return HackingVerdict(
        bool(flagged), p, float(evals[p]["eval/kl"]), float(evals[-1]["eval/kl"]), g_peak, g_now, x_peak, x_now
    )


class HackingMonitor:
    """The detector as the online trainers run it: ``check(eval_history, step)`` after each evaluation ->
    {"eval/hacking": 0.0 | 1.0} (1 when any logged reward shows the turn), with one warning per logged
    reward the first time it fires, naming the KL at which its gold reward stopped rising and, with at
    least three evaluations, the peak KL of Gao et al.'s RL curve fitted to them."""

    def __init__(self, proxy: str, golds: Sequence[str], **kwargs):
        self.proxy, self.golds, self.kwargs = proxy, list(golds), kwargs
        self.warned: set[str] = set()

    def check(self, eval_history: Sequence[Mapping], step: int) -> dict:
        flagged = False
        for g in self.golds:
            v = reward_hacking(eval_history, proxy=self.proxy, gold=g, **self.kwargs)
            flagged = flagged or v.flagged
            if v.flagged and g not in self.warned:
                self.warned.add(g)
                log.warning(
                    "eval/hacking at step %d: the gold reward %r stopped rising at KL %.3g nats (%.4g there, "
                    "%.4g now at KL %.3g) while the proxy %r still rises (%.4g -> %.4g): the policy is "
                    "exploiting the proxy (Gao et al. 2022). Stop here or raise beta.%s",
                    step,
                    g,
                    v.kl_at_peak,
                    v.gold_peak,
                    v.gold_now,
                    v.kl_now,
                    self.proxy,
                    v.proxy_peak,
                    v.proxy_now,
                    self._fit_note(eval_history, g),
                )
        return {"eval/hacking": float(flagged)}

    @staticmethod
    def _fit_note(eval_history: Sequence[Mapping], gold: str) -> str:
        rows = [h for h in eval_history if h.get(f"eval/reward/{gold}") is not None and h.get("eval/kl") is not None]
        if len(rows) < 3:
            return ""
        g0 = float(rows[0][f"eval/reward/{gold}"])  # relative to the first evaluation (step 0: the initial policy)
        try:
            fit = fit_gao(
                [max(float(h["eval/kl"]), 0.0) for h in rows],
                [float(h[f"eval/reward/{gold}"]) - g0 for h in rows],
                "rl",
            )
        except ValueError:
            return ""
        return f" Gao et al.'s RL curve fitted to the {len(rows)} evaluations peaks at KL {fit.peak_kl:.3g}."
