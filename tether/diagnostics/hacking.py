"""The reward-hacking monitor (issue 14, point 4): the gold reward stops rising while the proxy still rises.

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
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # mean of ranks i+1 .. j+1
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
        raise ValueError("fit_gao: the points do not determine α and β_g (need at least two distinct KL > 0"
                         + (", not all at KL = 1" if kind == "rl" else "") + ")")
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
