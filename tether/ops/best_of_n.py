"""Best-of-n: the distribution it induces and its KL to the reference, exactly and from samples.

Pure torch. Best-of-n draws n i.i.d. samples from π_ref and keeps the one with the
highest reward r; ties are broken uniformly at random (equivalently, the first of the tied samples:
the draws are exchangeable). Group outcomes into reward levels ℓ with reference mass p_ℓ and CDF
F_ℓ = Σ_{ℓ' ≤ ℓ} p_ℓ'. Then (Beirami et al. 2024, arXiv:2401.01879, Lemma 1, extended to ties):

    π_bon(level ℓ) = q_ℓ = F_ℓ^n - F_{ℓ-1}^n,        π_bon(y) = π_ref(y) · q_ℓ(y) / p_ℓ(y)

Because π_bon/π_ref depends on y only through its reward level,

    KL[π_bon‖π_ref] = Σ_ℓ q_ℓ log(q_ℓ / p_ℓ)                                               (exact)

For an atomless reward distribution this is ∫_0^1 n u^{n-1} log(n u^{n-1}) du = log n - (n-1)/n,
the analytic value of Stiennon et al. 2020 (footnote 15); with atoms (ties) it is smaller, so the
analytic value is an upper bound (Beirami et al. 2024, Theorem 1). ``best_of_n_kl_bound``
returns that bound.

Sample estimate (``best_of_n_kl_estimate``): from m reference samples of one prompt, reward values
seen at least twice are treated as atoms with mass (count / m) and values seen once as a continuous
part, whose CDF segment [a, b] contributes G(b) - G(a) with

    G(u) = u^n (log n + (n-1) log u - (n-1)/n),    G(0) = 0,    G(1) = log n - (n-1)/n.

With a single top atom of mass ε and the rest continuous this is exactly Beirami et al.'s proposed
estimator KL̂_n(ε) (their Section 4); with no repeated value it returns the bound; with one value it
returns 0. It is the exact KL of the estimated reward distribution, so it never exceeds the bound.
"""

from __future__ import annotations

import math

import torch


def _levels(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct values and, per input, the index of its level."""
    levels, inverse = torch.unique(rewards, sorted=True, return_inverse=True)
    return levels, inverse


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1)/n (Stiennon et al. 2020 fn. 15; Beirami et al. 2024): an upper bound on
    KL[π_bon‖π_ref].

    It is the exact KL when the reward's distribution under π_ref has no atoms: then
    F(r(y)) ~ U(0, 1), π_bon/π_ref = n F^{n-1} and KL = ∫_0^1 n u^{n-1} log(n u^{n-1}) du. With atoms
    (any discrete problem, even with all rewards distinct) Jensen makes the KL strictly smaller for
    n ≥ 2; the gap closes as the largest atom's mass goes to 0.
    """
    _check_n(n)
    return math.log(n) - (n - 1) / n


def best_of_n_probs(rewards: torch.Tensor, probs: torch.Tensor, *, n: int) -> torch.Tensor:
    """Exact π_bon over K outcomes of a known discrete reference, batched over leading dims.

    rewards, probs: (..., K) reward and π_ref of each outcome (probs sum to 1 over K).
    Returns (..., K) float64. With F(ρ) = P_ref(r ≤ ρ) and m the mass of the level {r = ρ}, the kept
    draw's level has probability F^n - (F - m)^n and, by exchangeability, within a level the mass is
    shared in proportion to π_ref: π_bon(y) = π_ref(y)·h, h = F^{n-1}(1 - (1 - m/F)^n)/(m/F)
    (written without the cancellation of F^n - (F-m)^n).
    """
    _check_n(n)
    p = probs.to(torch.float64)
    r = rewards.to(torch.float64)
    le = (r[..., None, :] <= r[..., :, None]).to(torch.float64)  # [i, j] = r_j <= r_i
    eq = (r[..., None, :] == r[..., :, None]).to(torch.float64)
    F = (le * p[..., None, :]).sum(-1)  # (..., K) P(r <= r_i)
    m = (eq * p[..., None, :]).sum(-1)  # (..., K) P(r == r_i)
    frac = (m / F).clamp(max=1.0)
    h = F.pow(n - 1) * -torch.expm1(n * torch.log1p(-frac)) / frac
    return torch.where(p > 0, p * h, 0.0)


def best_of_n_kl_exact(rewards: torch.Tensor, probs: torch.Tensor, *, n: int) -> torch.Tensor:
    """Exact KL[π_bon‖π_ref] for a known discrete reference: (..., K) -> (...) float64.
    Equals Σ_levels q log(q/m): only the levels' masses matter."""
    p = probs.to(torch.float64)
    q = best_of_n_probs(rewards, p, n=n)
    terms = torch.where(q > 0, q * (q.clamp(min=1e-300).log() - p.clamp(min=1e-300).log()), 0.0)
    return terms.sum(-1)


def _G(u: float, n: int) -> float:
    """Antiderivative of n u^{n-1} log(n u^{n-1}) with G(0) = 0."""
    if u <= 0.0:
        return 0.0
    return u**n * (math.log(n) + (n - 1) * math.log(u) - (n - 1) / n)


def best_of_n_kl_estimate(scores: torch.Tensor, *, n: int) -> torch.Tensor:
    """Estimate of KL[π_bon‖π_ref] for one prompt from m reference samples' rewards.

    scores: (m,) rewards of m i.i.d. samples from π_ref (m ≥ 1; the n used for selection, or more).
    Returns () float64: repeated values are atoms (mass count/m), single values a continuous part
    (module docstring). Biased at small m, exact as m → ∞ for a reward distribution whose atoms all
    have mass ≫ 1/m; always in [0, log n - (n-1)/n].
    """
    _check_n(n)
    m = scores.numel()
    if m == 0:
        raise ValueError("best_of_n_kl_estimate needs at least one sample")
    levels, inv = _levels(scores.flatten())
    counts = torch.bincount(inv, minlength=len(levels)).tolist()
    kl, F = 0.0, 0.0
    for c in counts:
        a, b = F, F + c / m
        if c >= 2:  # an atom: q log(q / p)
            q = b**n - a**n
            kl += q * (math.log(q) - math.log(c / m)) if q > 0 else 0.0
        else:  # continuous part of mass 1/m
            kl += _G(b, n) - _G(a, n)
        F = b
    return torch.tensor(max(kl, 0.0), dtype=torch.float64)


def _check_n(n: int) -> None:
    if n < 1 or int(n) != n:
        raise ValueError(f"n must be a positive integer, got {n}")
