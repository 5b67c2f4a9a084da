"""KL estimators between the policy π_θ and the reference π_ref, and where they go.

Pure torch. Sources: Schulman, "Approximating KL Divergence" (2020) for k1/k2/k3;
Amini et al. 2025 (arXiv:2504.10637) for the Rao-Blackwellised exact estimator; docs/theory.md §2–3 for
the value-versus-gradient table that ``ESTIMATORS`` encodes and the tests check numerically.

Samples are always drawn from π_θ (or from π_old in off-policy inner epochs). Per sampled token,
``lr_t = logps_t - ref_logps_t``; with r_t = π_ref/π_θ = exp(-lr_t):

=========  ==================================  ==================================
estimator  reverse KL[π_θ‖π_ref] per token     forward KL[π_ref‖π_θ] per token
=========  ==================================  ==================================
k1         lr                                  r·(-lr)               (importance-weighted k1)
k2         lr²/2                               r·lr²/2               (importance-weighted k2)
k3         r - 1 - log r = e^{-lr} - 1 + lr     r·log r - (r - 1)
exact      Σ_v π_θ (log π_θ - log π_ref)        Σ_v π_ref (log π_ref - log π_θ)
=========  ==================================  ==================================

Names of reductions are distinct on purpose (docs/theory.md §2): ``seq_sum`` is the sequence KL that
Ziegler, Stiennon and the DPO paper's Figure 2 report; ``token_mean`` is a different quantity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch

from ..errors import UserError
from .logprobs import exact_kl_from_logits, upcast

Estimator = Literal["k1", "k2", "k3", "exact"]
Direction = Literal["reverse", "forward"]
Placement = Literal["reward", "loss", "loss_is"]
ESTIMATOR_NAMES: tuple[str, ...] = ("k1", "k2", "k3", "exact")
REFERENCE_FILTERS: tuple[str, ...] = ("none", "restricted")
"""The reference of the KL under top-k/top-p (docs/theory.md §3). ``none`` (default): the fixed process
π^τ_ref, tempered and unfiltered. ``restricted``: π^τ_ref restricted to the policy's sampled set F_t and
renormalised, a reference that moves with θ; its KL drops the filter cost E Σ_t -log π^τ_ref(F_t)."""


def check_estimator(name: str, *, field: str = "kl_estimator") -> None:
    """``name`` is a KL estimator (``ESTIMATOR_NAMES``): the one check of the rule, a ``UserError`` naming ``field``."""
    if name not in ESTIMATOR_NAMES:
        raise UserError(
            f"{field}={name!r} is an unknown estimator; choose from {', '.join(ESTIMATOR_NAMES)} (set --{field})"
        )


def check_reference_filter(name: str) -> None:
    """``name`` is a reference of the KL under top-k/top-p (``REFERENCE_FILTERS``): the one check of the rule."""
    if name not in REFERENCE_FILTERS:
        raise UserError(
            f"kl_reference_filter={name!r} is not one of {', '.join(REFERENCE_FILTERS)}; set "
            "--kl_reference_filter none (the fixed reference, default) or restricted"
        )


@dataclass(frozen=True)
class EstimatorInfo:
    """What an estimator's value and gradient are, per placement (docs/theory.md §3, on-policy).

    Placements: ``reward`` — the detached per-token value is subtracted from the reward and reaches
    θ through the score-function (policy-gradient) estimator; ``loss`` — the value is added to the
    loss and differentiated by autograd with the samples held fixed; ``loss_is`` — the same, times
    the importance weight π_θ/π_old (old detached), as needed off-policy.

    Sequences versus single tokens. A per-token loss term is differentiated with the states
    s_t = (x, y_<t) held fixed, so at best it gives Σ_t E_{s_t~π_θ}[∇ KL_t(s_t)], KL_t(s) the
    per-state KL: the gradient of KL[π_θ‖π_ref] for T = 1, but on sequences it misses how early
    tokens change the distribution of later states (Tang & Munos, arXiv:2506.09477). The full
    sequence gradient is ∇KL_seq = Σ_t E[∇KL_t] + E[Σ_t ∇log π_θ(y_t|s_t) Σ_{t'>t} KL_{t'}(s_{t'})].
    The strings below say which one each pair gives; ``tests/test_kl_estimators.py`` checks every
    pair exactly on an enumerated autoregressive tree (``tether.oracle``).

    Under sampling filters (``under_filters``; docs/theory.md §3): with temperature τ and top-k/top-p
    the sampled policy is p = π^{τ,F}_θ, softmax(logits/τ) restricted to the sampler's set F_t, and
    the reference is the fixed process q̃ = π^τ_ref (same τ, whole vocabulary), with mass
    m_t = q̃(F_t) ≤ 1 on the set. The KL tether reports and penalises is KL[p‖q̃] = Σ_t E[KL[p‖q̃|_F] - log m_t]
    (q̃|_F: q̃ restricted to F_t and renormalised; -log m_t is the filter cost). Since Σ_{F_t} p·r = m_t,
    the control variate of k3 no longer has mean 0: ``under_filters`` states each estimator's bias for
    KL[p‖q̃] (and for the ``restricted`` reference, ``REFERENCE_FILTERS``). Without top-k/top-p, m_t = 1
    and nothing changes. ``tests/test_kl_estimators.py`` checks these by exact enumeration.
    """

    name: str
    value: str  # what E_{π_θ}[value] equals
    grad_reward: str
    grad_loss: str
    grad_loss_is: str
    under_filters: str  # its value under τ/top-k/top-p: fixed reference π^τ_ref (tether) vs restricted
    needs_logits: bool = (
        False  # reads the full distributions (logits of policy and reference), not only the sampled token
    )
    reward_direct_term: bool = (
        False  # in the reward (detached) it misses ∇KL_t at fixed states: a loss must add that term
    )


_LOCAL = "Σ_t E_{s_t~π_θ}[∇ KL_t(s_t)] with states held fixed"

ESTIMATORS: dict[str, EstimatorInfo] = {
    "k1": EstimatorInfo(
        "k1",
        value="unbiased for KL[π_θ‖π_ref] (per token, so the sequence sum is unbiased for the sequence KL); "
        "can be negative per sample; highest variance per token (its sequence sum need not be: docs/theory.md §2)",
        grad_reward="∇ KL[π_θ‖π_ref] (correct, for sequences too, with reward-to-go)",
        grad_loss="0 in expectation: no regularisation at all",
        grad_loss_is=f"{_LOCAL}: ∇ KL[π_θ‖π_ref] for single tokens (T = 1); on sequences it misses the "
        "state-distribution part, like 'exact' in the loss",
        under_filters="unbiased for KL[π^{τ,F}_θ‖π^τ_ref] with the fixed reference tether uses (lr_t = "
        "log π^{τ,F}_θ(y_t) - log π^τ_ref(y_t)); that KL includes the filter cost Σ_t E[-log m_t], > 0 even for a "
        "model against itself. With the restricted reference: unbiased for KL[π^{τ,F}_θ‖π^{τ,F}_ref] = that KL "
        "minus the filter cost",
    ),
    "k2": EstimatorInfo(
        "k2",
        value="biased: E[lr²/2] ≥ 0 = KL + O(lr³), ≈ KL only when π_θ is close to π_ref; low variance",
        grad_reward="score-function gradient of a biased value: ∇ E_{π_θ}[Σ_t lr_t²/2] minus its pathwise "
        "part ('loss'); no KL target",
        grad_loss=f"{_LOCAL} (per state E[lr ∇log π] = ∇ KL_t): ∇ KL[π_θ‖π_ref] for single tokens (T = 1, "
        "on-policy); on sequences the same as 'exact' in the loss",
        grad_loss_is="Σ_t E_{s_t}[∇ E_{π_θ(·|s_t)}[lr²/2]] — biased (differentiates the biased value)",
        under_filters="biased, as without filters, with either reference: E[lr²/2] ≠ KL[π^{τ,F}_θ‖π^τ_ref] (for a "
        "model against itself, lr_t = -log m_t on every token: Σ_t E[(log m_t)²/2] instead of the filter cost)",
    ),
    "k3": EstimatorInfo(
        "k3",
        value="unbiased for KL[π_θ‖π_ref]; ≥ 0; low variance near π_ref",
        grad_reward="∇ KL[π_θ‖π_ref] - Σ_t E_{s_t~π_θ}[∇ KL[π_ref‖π_θ](s_t)] (biased; = ∇ KL[π_θ‖π_ref] - "
        "∇ KL[π_ref‖π_θ] for T = 1)",
        grad_loss="Σ_t E_{s_t~π_θ}[∇ KL[π_ref(·|s_t)‖π_θ(·|s_t)]]: the forward KL (GRPO, DeepSeekMath Eq. 3) "
        "at the states π_θ visits; = ∇ KL[π_ref‖π_θ] for T = 1 only (the sequence forward KL weights "
        "states by π_ref's visits). Its fixed point: tether.oracle.forward_kl_optimum",
        grad_loss_is=f"{_LOCAL}: ∇ KL[π_θ‖π_ref] for single tokens (T = 1; DeepSeek-V3.2 / TRL "
        "use_bias_correction_kl); on sequences like 'exact' in the loss",
        under_filters="biased by -(reference mass outside F_t) per token with the fixed reference tether uses: "
        "E[k3] = KL[π^{τ,F}_θ‖π^τ_ref] - Σ_t E[1 - m_t] (Σ_F π r = m_t, so r - 1 has mean m_t - 1); still ≥ 0; "
        "the bias is at most the filter cost, since 1 - m ≤ -log m. Unbiased for KL[π^{τ,F}_θ‖π^{τ,F}_ref] with "
        "the restricted reference",
    ),
    "exact": EstimatorInfo(
        "exact",
        value="unbiased for KL[π_θ‖π_ref] (Rao-Blackwellised k1); ≥ 0 per token; lowest variance per token "
        "(given the state), but a sequence sum can vary more than k1's (docs/theory.md §2)",
        grad_reward="only the state-distribution part, ∇ KL[π_θ‖π_ref] - Σ_t E[∇ KL_t] (states fixed): 0 for "
        "T = 1, since KL_t does not depend on the token sampled at s_t. Use it together with 'loss' "
        "(their sum is ∇ KL[π_θ‖π_ref])",
        grad_loss=f"{_LOCAL}: misses early tokens' effect on later states (Tang & Munos, arXiv:2506.09477); "
        "add the same values in the reward, or k1 with strictly-future reward-to-go Σ_{t'>t}, for the "
        "full gradient",
        grad_loss_is="as 'loss' (states from π_old): the weight π_θ(y_t|s_t)/π_old(y_t|s_t) has mean 1 at "
        "s_t and KL_t does not depend on y_t, so it corrects neither tokens nor states",
        under_filters="exact for KL[π^{τ,F}_θ‖π^τ_ref] per state with the fixed reference tether uses: "
        "Σ_{v∈F_t} π^{τ,F}_θ(v)(log π^{τ,F}_θ(v) - log π^τ_ref(v)) (tokens outside F_t have probability 0); "
        "with the restricted reference, the same minus the filter cost -log m_t",
        needs_logits=True,
        reward_direct_term=True,
    ),
}


def log_ratio(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """lr_t = log π_θ(y_t|s_t) - log π_ref(y_t|s_t) in fp32 (fp64 if given fp64). (B, T), (B, T) -> (B, T)."""
    return upcast(logps) - upcast(ref_logps)


def k1(lr: torch.Tensor) -> torch.Tensor:
    """k1 = lr (Schulman 2020). Unbiased for the reverse KL; sign-indefinite."""
    return lr


def k2(lr: torch.Tensor) -> torch.Tensor:
    """k2 = lr²/2 (Schulman 2020). Biased value; its on-policy autograd gradient is unbiased."""
    return 0.5 * lr * lr


def k3(lr: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = exp(-lr) (Schulman 2020). Unbiased, ≥ 0.

    Written as expm1(-lr) + lr for accuracy near lr = 0.
    """
    return torch.expm1(-lr) + lr


def forward_k1(lr: torch.Tensor) -> torch.Tensor:
    """Importance-weighted k1 for KL[π_ref‖π_θ] from π_θ samples: r·log r, r = exp(-lr)."""
    return torch.exp(-lr) * (-lr)


def forward_k2(lr: torch.Tensor) -> torch.Tensor:
    """Importance-weighted k2 for KL[π_ref‖π_θ] from π_θ samples: r·lr²/2 (biased like k2)."""
    return torch.exp(-lr) * 0.5 * lr * lr


def forward_k3(lr: torch.Tensor) -> torch.Tensor:
    """r·log r - (r - 1) with r = exp(-lr): unbiased for KL[π_ref‖π_θ] from π_θ samples, ≥ 0."""
    r = torch.exp(-lr)
    return r * (-lr) - torch.expm1(-lr)


_SAMPLED = {
    ("k1", "reverse"): k1,
    ("k2", "reverse"): k2,
    ("k3", "reverse"): k3,
    ("k1", "forward"): forward_k1,
    ("k2", "forward"): forward_k2,
    ("k3", "forward"): forward_k3,
}


class KLTokens(NamedTuple):
    """Per-token KL values and what happened to them."""

    per_token: torch.Tensor  # (B, T) fp32, zero where mask is False
    clamped_frac: torch.Tensor  # () fp32, fraction of counted tokens whose input or output was clamped
    clamped: Optional[torch.Tensor] = None  # (B, T) bool, True on counted tokens that were clamped


def kl_per_token(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: Estimator = "k1",
    direction: Direction = "reverse",
    logits: Optional[torch.Tensor] = None,
    ref_logits: Optional[torch.Tensor] = None,
    clamp_input: Optional[float] = None,
    clamp_output: Optional[float] = None,
    exact: Optional[torch.Tensor] = None,
) -> KLTokens:
    """Per-token KL estimate for the sampled completion tokens.

    Args:
        logps, ref_logps: (B, T) log-probs of the sampled tokens under π_θ and π_ref.
        mask: (B, T) bool, True where the token counts.
        estimator: k1 | k2 | k3 | exact (see module docstring and ``ESTIMATORS``).
        direction: ``reverse`` = KL[π_θ‖π_ref] (the RLHF penalty), ``forward`` = KL[π_ref‖π_θ], both
            per token at the sampled state. For ``reverse`` the sequence sum is unbiased for the
            sequence KL (chain rule, states visited by π_θ). For ``forward`` it is unbiased for
            Σ_t E_{s_t~π_θ} KL[π_ref(·|s_t)‖π_θ(·|s_t)], which is the sequence KL[π_ref‖π_θ] only
            for single tokens: the latter weights states by π_ref's visits.
        logits, ref_logits: (B, T, V) logits at the same positions; required for ``exact``.
        exact: (B, T) the exact reverse KL per token already computed (``ops.head.head_scores``' ``kl_exact``,
            with its gradient), used by ``exact`` instead of ``logits``/``ref_logits`` (reverse only).
        clamp_input: clamp lr to [-c, c] before the estimator (verl uses 20 for k3).
        clamp_output: clamp the value to [-c, c] (verl/OpenRLHF use 10). Clamping zeroes the
            gradient of the clamped tokens, so the clamped fraction is reported.
    Returns:
        ``KLTokens(per_token (B, T) fp32, clamped_frac (), clamped (B, T) bool)``; ``clamped`` lets a
        caller reduce the fraction over several batches or processes (sum of clamped / sum of mask).
    """
    mask = mask.bool()
    clamped = torch.zeros_like(mask)
    check_estimator(estimator, field="estimator")
    if ESTIMATORS[estimator].needs_logits and exact is not None:
        if direction != "reverse":
            raise ValueError("a precomputed exact= KL is the reverse one; pass logits for direction='forward'")
        vals = exact
    elif ESTIMATORS[estimator].needs_logits:
        if logits is None or ref_logits is None:
            raise ValueError("estimator='exact' needs the full logits of policy and reference (logits=, ref_logits=)")
        if direction == "reverse":
            vals = exact_kl_from_logits(logits, ref_logits)
        else:
            vals = exact_kl_from_logits(ref_logits, logits)
    else:
        key = (estimator, direction)
        if key not in _SAMPLED:
            raise ValueError(f"unknown direction {direction!r} for estimator {estimator!r}; choose reverse or forward")
        lr = log_ratio(logps, ref_logps)
        if clamp_input is not None:
            clamped = clamped | (lr.abs() > clamp_input)
            lr = lr.clamp(-clamp_input, clamp_input)
        vals = _SAMPLED[key](lr)
    if clamp_output is not None:
        clamped = clamped | (vals.abs() > clamp_output)
        vals = vals.clamp(-clamp_output, clamp_output)
    vals = vals.masked_fill(~mask, 0.0)
    n = mask.sum().clamp(min=1)
    clamped = clamped & mask
    return KLTokens(vals, clamped.sum().float() / n, clamped)


def seq_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over counted tokens: (B, T) -> (B,). The sequence KL of docs/theory.md §2."""
    return (values * mask).sum(-1)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all counted tokens of the batch: (B, T) -> (). Not the sequence KL."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def importance_weight(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """π_θ/π_old per token, with π_old detached: equals 1 in value on-policy, carries ∇ log π_θ."""
    return torch.exp(upcast(logps) - upcast(old_logps.detach()))


def kl_loss_term(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: Estimator,
    old_logps: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    ref_logits: Optional[torch.Tensor] = None,
    clamp_input: Optional[float] = None,
    clamp_output: Optional[float] = None,
    exact: Optional[torch.Tensor] = None,
) -> KLTokens:
    """The KL placed in the loss, per token (placement ``loss`` or, with ``old_logps``, ``loss_is``).

    Returns the per-token term to be *added* to the loss (multiplied by β by the caller), with
    gradients through ``logps`` (and ``logits``, or the precomputed ``exact``, for exact). With ``old_logps``
    each token is weighted by π_θ/π_old (detached denominator), which makes k1 and k3 give the per-state gradient
    ∇KL[π_θ(·|s_t)‖π_ref(·|s_t)] at each sampled state, as needed when samples come from π_old
    (docs/theory.md §3); summed over a sequence that is ∇KL[π_θ‖π_ref] with the states held fixed, not
    the full sequence gradient (see ``EstimatorInfo``). The gradient each choice gives is in
    ``ESTIMATORS[estimator]``.
    """
    out = kl_per_token(
        logps,
        ref_logps.detach(),
        mask,
        estimator=estimator,
        direction="reverse",
        logits=logits,
        ref_logits=None if ref_logits is None else ref_logits.detach(),
        clamp_input=clamp_input,
        clamp_output=clamp_output,
        exact=exact,
    )
    vals = out.per_token
    if old_logps is not None:
        vals = importance_weight(logps, old_logps) * vals
    return KLTokens(vals.masked_fill(~mask.bool(), 0.0), out.clamped_frac, out.clamped)


def kl_reward_penalty(kl_tokens: torch.Tensor, mask: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Per-token rewards from the KL placed in the reward (placement ``reward``): -β·sg(kl_t).

    docs/theory.md §1: ``rewards_t = -β·kl_t`` on every completion token; the caller adds the sequence
    score at the last token. The value is detached, so θ receives the KL only through the
    policy-gradient estimator — which is what makes k1 (and exact) unbiased here.
    """
    return (-beta * upcast(kl_tokens.detach())).masked_fill(~mask.bool(), 0.0)
