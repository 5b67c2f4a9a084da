"""The behaviour policy μ: the distribution the sampler actually drew from, and corrections for μ ≠ π_old.

A generation backend samples with its own kernels, precision and batch shapes (a fast inference engine,
a lean decode step, bf16), or with stale weights (asynchronous rollouts). The tokens then come from a
behaviour policy μ that differs from π_old, the policy the trainer scores them with. Every backend
returns log μ(y_t|s_t) of the sampled tokens (``batch.behaviour_logps``: softmax of its own logits/τ
restricted to the stored set F_t); this module measures the mismatch and weights the loss so that its
expected gradient is the one the method states for samples from π_old (docs/theory.md §3, "The sampler
is not the trainer").

Pure torch. Per counted token, lr^μ_t = log π_old(y_t|s_t) - log μ(y_t|s_t) and the ratio
r_t = π_old/μ = exp(lr^μ_t); per sequence W = Π_t r_t = exp(Σ_t lr^μ_t). ``CORRECTIONS`` (beside
``ops.kl.ESTIMATORS``) states each correction's weight, source and gradient bias;
``correction_weights`` computes them; ``mismatch_stats`` the ``mismatch/*`` metrics.

Which terms take which weight (why ``CorrectionWeights`` has two):

- Every term whose expectation is over the *sampled token* y_t — the policy-gradient term (PPO's clipped
  surrogate, REINFORCE), a KL in the loss (k1/k2/k3, with or without π_θ/π_old: with it the product is
  π_θ/μ, the DeepSeek-V3.2 weight) — takes ``weights``. A detached KL in the *reward* enters only
  through the advantages, so it is corrected by the same weight as the policy gradient it rides on,
  and needs nothing of its own.
- A term that depends on the state s_t only, not on y_t — the exact estimator's direct term
  Σ_t ∇KL_t(s_t) — takes ``state_weights``: the state distribution needs the ratio of the tokens
  *before* t, which only a sequence-level correction carries (its W, whose later factors have mean 1);
  a token-level correction leaves it at 1, since multiplying a function of s_t by r_t corrects nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .kl import kl_per_token, seq_sum
from .logprobs import upcast

CORRECTION_NAMES: tuple[str, ...] = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")
RATIO_QUANTILES: tuple[float, ...] = (0.01, 0.5, 0.99)
"""Quantiles of the per-token ratio π_old/μ logged as mismatch/ratio_p01, _p50, _p99."""


@dataclass(frozen=True)
class CorrectionInfo:
    """One correction for a behaviour policy μ ≠ π_old: its weight, where it comes from, its gradient bias.

    Write g for a term whose expectation under π_old is the gradient a method states (the policy
    gradient with its advantage, a loss-side KL), r_t = π_old(y_t|s_t)/μ(y_t|s_t), W = Π_t r_t, and C
    the cap (``behaviour_cap``). Samples are from μ; the weight multiplies g."""

    name: str
    level: str  # "token" | "sequence" | "none"
    weight: str
    source: str
    bias: str


CORRECTIONS: dict[str, CorrectionInfo] = {
    "none": CorrectionInfo(
        "none",
        "none",
        weight="1",
        source="what a trainer does that ignores the sampler's log-probs",
        bias="E_μ[g] - E_{π_old}[g] = E_μ[(1 - r)·g] per token (with states and later tokens from μ too): "
        "unbounded in general; the fixed point moves with μ (the certificate's uncorrected rows measure it)",
    ),
    "token_tis": CorrectionInfo(
        "token_tis",
        "token",
        weight="min(r_t, C) per token",
        source="truncated importance sampling, Yao et al. 2025, 'Your efficient RL framework secretly brings "
        "you off-policy RL training' (C = 2 there); Ionides 2008 for truncated IS",
        bias="at a state, E_μ[min(r, C)·g] = E_{π_old}[g] - E_μ[(r - C)_+·g]: unbiased per token where r ≤ C. "
        "The states s_t and the tokens after t are still μ's, so for sequences (T > 1) it is not the "
        "π_old gradient even without truncation: the reward-to-go and the state distribution are μ's. Exact "
        "for single tokens (T = 1) when r ≤ C",
    ),
    "seq_tis": CorrectionInfo(
        "seq_tis",
        "sequence",
        weight="min(W, C) on every token of the sequence",
        source="sequence-level truncated IS, Liu et al. 2025, 'When Speed Kills Stability: Demystifying RL "
        "Collapse from the Training-Inference Mismatch'",
        bias="E_μ[min(W, C)·G] = E_{π_old}[G] - E_μ[(W - C)_+·G] for any function G of the sequence: "
        "unbiased whenever W ≤ C, for sequences too (states and reward-to-go included); the variance of W "
        "grows with the length, which is what C trades against the bias",
    ),
    "token_mis": CorrectionInfo(
        "token_mis",
        "token",
        weight="r_t if 1/C ≤ r_t ≤ C, else 0 (the token is dropped)",
        source="masked importance sampling: IcePop (Ling team 2025, two-sided token masking), Liu et al. 2025",
        bias="at a state, E_μ[r·1[r ∈ [1/C, C]]·g] = E_{π_old}[1[r ∈ [1/C, C]]·g]: the dropped tokens' share "
        "of the π_old gradient is missing, E_{π_old}[1[r ∉ [1/C, C]]·g]; states and later tokens stay μ's "
        "(as token_tis)",
    ),
    "seq_mis": CorrectionInfo(
        "seq_mis",
        "sequence",
        weight="W if 1/C ≤ W ≤ C, else 0 (the sequence is dropped)",
        source="sequence-level masked IS, Liu et al. 2025",
        bias="E_μ[W·1[W ∈ [1/C, C]]·G] = E_{π_old}[1[W ∈ [1/C, C]]·G]: unbiased for the kept sequences; the "
        "dropped ones' share E_{π_old}[1[W ∉ [1/C, C]]·G] is missing",
    ),
}


class CorrectionWeights(NamedTuple):
    """The weights of one batch, all detached (no gradient through μ or π_old); 1 off-mask, where every
    term is masked anyway (so ``none`` multiplies by exactly 1 everywhere)."""

    weights: torch.Tensor  # (B, T) multiplies terms over the sampled token (policy gradient, loss-side KL)
    state_weights: torch.Tensor  # (B, T) multiplies terms of the state alone (the exact direct term)
    cut: torch.Tensor  # (B, T) bool: counted tokens whose weight was truncated (TIS) or masked (MIS)
    cut_seq: torch.Tensor  # (B,) bool: sequences with a cut token (token level) or a cut weight (sequence level)


def behaviour_log_ratio(old_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lr^μ_t = log π_old(y_t|s_t) - log μ(y_t|s_t), detached, fp32 (fp64 if given fp64), 0 off-mask. (B, T) x3 ->
    (B, T)."""
    lr = upcast(old_logps.detach()) - upcast(behaviour_logps.detach())
    return lr.masked_fill(~mask.bool(), 0.0)


def correction_weights(
    old_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, *, correction: str, cap: float
) -> CorrectionWeights:
    """The weights of ``correction`` (``CORRECTIONS``) with cap C = ``cap`` > 1. (B, T) x3 -> CorrectionWeights.

    Computed in log space, so a sequence ratio W = exp(Σ_t lr^μ_t) never overflows before the cap."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTION_NAMES}, got {correction!r}")
    if not cap > 1.0:
        raise ValueError(f"cap must be > 1, got {cap}")
    mask = mask.bool()
    lr = behaviour_log_ratio(old_logps, behaviour_logps, mask)  # (B, T)
    ones = torch.ones_like(lr)
    log_c = math.log(cap)
    if correction == "none":
        no = torch.zeros_like(mask)
        return CorrectionWeights(ones, ones, no, no.any(-1))
    level = CORRECTIONS[correction].level
    x = lr if level == "token" else seq_sum(lr, mask)[:, None].expand_as(lr)  # (B, T) log r_t or log W
    if correction.endswith("tis"):
        cut = x > log_c
        w = torch.exp(x.clamp(max=log_c))
    else:  # mis: keep the band [1/C, C]
        cut = x.abs() > log_c
        w = torch.where(cut, torch.zeros_like(x), torch.exp(x.clamp(-log_c, log_c)))
    w, cut = torch.where(mask, w, ones), cut & mask
    state = w if level == "sequence" else ones
    return CorrectionWeights(w, state, cut, cut.any(-1))


def mismatch_stats(
    old_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, weights: CorrectionWeights
) -> tuple[dict, dict]:
    """The ``mismatch/*`` metrics of one batch as (sums, counts), reduced by the caller (sum / count).

    - ``kl_k1``, ``kl_k3``: mean sequence sum of KL[μ‖π_old] with μ as the sampling distribution
      (``ops.kl.kl_per_token(behaviour_logps, old_logps)``: k1 = log μ - log π_old per token, k3 =
      r - 1 - log r with r = π_old/μ); ``kl_k1_stderr``, ``kl_k3_stderr``: their standard errors over
      this batch's sequences (std/√n, n - 1 in the variance).
    - ``ratio_min``, ``ratio_p01``, ``ratio_p50``, ``ratio_p99``, ``ratio_max``: of r_t over counted tokens.
    - ``weight_mean``: token mean of the applied weight (1 with none); ``cut_token_frac``,
      ``cut_seq_frac``: fraction of counted tokens / sequences the correction truncated or masked.
    Batch statistics (stderr, quantiles, extremes) have count 1 (the caller's reduction averages them
    over processes); means have the batch's sequence or token count."""
    mask = mask.bool()
    B, n_tok = float(mask.shape[0]), float(mask.sum())
    sums, counts = {}, {}
    for est in ("k1", "k3"):
        seq = seq_sum(
            kl_per_token(behaviour_logps.detach(), old_logps.detach(), mask, estimator=est).per_token.double(), mask
        )  # (B,)
        sums[f"mismatch/kl_{est}"], counts[f"mismatch/kl_{est}"] = float(seq.sum()), B
        se = float(seq.std(unbiased=True) / math.sqrt(seq.numel())) if seq.numel() > 1 else 0.0
        sums[f"mismatch/kl_{est}_stderr"], counts[f"mismatch/kl_{est}_stderr"] = se, 1.0
    if n_tok:
        r = torch.exp(behaviour_log_ratio(old_logps, behaviour_logps, mask).double()[mask])  # (n,)
        q = torch.quantile(r, torch.tensor(RATIO_QUANTILES, dtype=r.dtype, device=r.device))
        per_batch = {
            "ratio_min": r.min(),
            "ratio_max": r.max(),
            **{f"ratio_p{round(p * 100):02d}": v for p, v in zip(RATIO_QUANTILES, q)},
        }
        for k, v in per_batch.items():
            sums[f"mismatch/{k}"], counts[f"mismatch/{k}"] = float(v), 1.0
    sums["mismatch/weight_mean"], counts["mismatch/weight_mean"] = float(weights.weights[mask].double().sum()), n_tok
    sums["mismatch/cut_token_frac"], counts["mismatch/cut_token_frac"] = float((weights.cut & mask).sum()), n_tok
    sums["mismatch/cut_seq_frac"], counts["mismatch/cut_seq_frac"] = float(weights.cut_seq.sum()), B
    return sums, counts
