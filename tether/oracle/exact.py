"""Exact solutions and exact divergences on a tabular language (pure torch, float64).

Everything is per prompt: functions return (P,) or (P, ...) tensors; sum or average over prompts
at the call site. Notation as in docs/theory.md: r(x, y) the reward of a complete sequence, β > 0.

Reverse-KL optimum (docs/theory.md §5; DPO Eq. 4; Korbak et al. 2022), computed two independent ways:

- sequence level, by enumeration: π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x);
- token level, soft Bellman backup on the tree: V(s) = β log Σ_a π_ref(a|s) exp(Q(s, a)/β) with
  Q(s, a) = r(s·a) if s·a is complete, else V(s·a); π*(a|s) = π_ref(a|s) exp((Q(s, a) - V(s))/β).

Both give the same distribution, V(root) = β log Z, and for any π:
J(π) = E_π[r] - β KL[π‖π_ref] = β log Z - β KL[π‖π*], so the gap β log Z - J(π) = β KL[π‖π*] ≥ 0.

Forward-KL optimum (what "k3 as a loss term" targets, docs/theory.md §3): see ``forward_kl_optimum``.

Best-of-n (docs/theory.md §7; Stiennon et al. 2020 fn. 15; Beirami et al. 2024): see ``best_of_n_probs``.
"""

from __future__ import annotations

import torch

from tether.ops.logprobs import exact_kl_from_logits

from .tabular import DTYPE, TabularPolicy, TabularSpace


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _xlogratio(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_k p_k (log p_k - log q_k) over the last dim, with 0·log 0 = 0 and NaN-free gradients."""
    on = p > 0
    diff = torch.where(on, logp, 0.0) - torch.where(on, logq, 0.0)  # mask the inputs, not the product
    return (p * diff).sum(-1)


# ---- reverse-KL-regularised optimum ------------------------------------------------------------------


def log_partition(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log Z(x) = log Σ_y π_ref(y|x) exp(r(x, y)/β), by enumeration: (P,)."""
    _check_beta(beta)
    return torch.logsumexp(ref.sequence_log_probs().detach() + rewards / beta, dim=-1)


def tilted_sequence_probs(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """π*(y|x) ∝ π_ref(y|x) exp(r(x, y)/β) over the enumerated sequences (docs/theory.md §5): (P, K)."""
    _check_beta(beta)
    return torch.softmax(ref.sequence_log_probs().detach() + rewards / beta, dim=-1)


def _soft_q(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Bellman backup from the leaves: (V (P, S), Q (P, S, V_vocab))."""
    sp = ref.space
    logp_ref = ref.log_probs().detach()
    values = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)
    q = torch.zeros(sp.n_prompts, sp.n_prefixes, sp.vocab_size, dtype=DTYPE)
    terminal = sp.child_seq >= 0  # (S, V)
    for k in reversed(range(sp.horizon)):  # children (length k+1) are final before their parents
        ids = sp.prefixes_by_length[k]
        q_k = torch.where(
            terminal[ids], rewards[:, sp.child_seq[ids].clamp(min=0)], values[:, sp.child_prefix[ids].clamp(min=0)]
        )  # (P, n_k, V)
        q[:, ids] = q_k
        values[:, ids] = beta * torch.logsumexp(logp_ref[:, ids] + q_k / beta, dim=-1)
    return values, q


def soft_values(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """V(x, s) of every prefix by the soft Bellman backup (docs/theory.md §5): (P, S); [:, 0] = β log Z."""
    _check_beta(beta)
    return _soft_q(ref, rewards, beta)[0]


def optimal_policy(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> TabularPolicy:
    """π*(a|s) = π_ref(a|s) exp((Q(s, a) - V(s))/β) from the soft Bellman backup, as a (frozen)
    ``TabularPolicy`` whose logits are the normalised log-probabilities."""
    _check_beta(beta)
    values, q = _soft_q(ref, rewards, beta)
    table = ref.log_probs().detach() + (q - values[..., None]) / beta  # (P, S, V)
    return TabularPolicy(ref.space, table, trainable=False)


# ---- exact divergences and objectives --------------------------------------------------------------


def sequence_kl(p: TabularPolicy, q: TabularPolicy) -> torch.Tensor:
    """KL[p(·|x)‖q(·|x)] between sequence distributions, by enumeration: (P,). Differentiable in
    both; reverse KL[π‖π_ref] is ``sequence_kl(pi, ref)``, forward KL[π_ref‖π] ``sequence_kl(ref, pi)``."""
    logp, logq = p.sequence_log_probs(), q.sequence_log_probs()
    return _xlogratio(logp.exp(), logp, logq)


def statewise_kl(p: TabularPolicy, q: TabularPolicy, *, state_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_s w(s) KL[p(·|s)‖q(·|s)] over the prefixes: (P,).

    ``state_probs`` (P, S) are the weights w; default ``p.state_probs()``, which makes this the
    sequence KL[p‖q] by the chain rule. ``state_probs=pi.state_probs().detach()`` gives the
    "states held fixed" quantities of docs/theory.md §3: with p = π it is what per-token KL terms
    differentiate, Σ_t E_{s_t~π}[KL_t]; with p = π_ref, q = π it is the forward KL *at the states π
    visits*, which is not KL[π_ref‖π] for T > 1 (that one weights states by π_ref's visits).
    """
    w = p.state_probs() if state_probs is None else state_probs
    per_state = exact_kl_from_logits(p.table, q.table)  # (P, S): the tables are (B, T, V)-shaped logits
    return (w * per_state).sum(-1)


def expected_reward(policy: TabularPolicy, rewards: torch.Tensor) -> torch.Tensor:
    """E_{y~π(·|x)}[r(x, y)]: (P,)."""
    return (policy.sequence_probs() * rewards).sum(-1)


def objective(policy: TabularPolicy, ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """J(π) = E_π[r] - β KL[π‖π_ref] (docs/theory.md §1), exact: (P,). Maximised by π*, max = β log Z."""
    return expected_reward(policy, rewards) - beta * sequence_kl(policy, ref)


def forward_objective(policy: TabularPolicy, ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """J_fwd(π) = E_π[r] - β KL[π_ref‖π], exact: (P,). Maximised by ``forward_kl_optimum_sequence``."""
    return expected_reward(policy, rewards) - beta * sequence_kl(ref, policy)


# ---- forward-KL-regularised optimum -----------------------------------------------------------------


def _forward_normalised(logp_ref: torch.Tensor, q: torch.Tensor, beta: float, iters: int = 200) -> torch.Tensor:
    """log π with π_k = β p_k / (λ - q_k), Σ π = 1, λ > max_{p_k > 0} q_k; over the last dim.

    g(λ) = Σ_k β p_k / (λ - q_k) falls from +∞ to 0 on (q_max, ∞), so the root is unique; with
    t = λ - q_max it lies in [β·P(q = q_max), β] (g ≥ β P(q = q_max)/t, and g(q_max + β) ≤ Σ p = 1).
    Bisection on t to float64 resolution, vectorised over the leading dims.
    """
    p = logp_ref.exp()
    on = p > 0
    q_on = torch.where(on, q, -torch.inf)
    q_max = q_on.max(dim=-1, keepdim=True).values
    gap = torch.where(on, q_max - q, 0.0)  # ≥ 0 on the support
    lo = beta * (p * (q_on == q_max)).sum(-1, keepdim=True)
    hi = torch.full_like(lo, beta)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        too_small = (beta * p / (mid + gap)).sum(-1, keepdim=True) > 1  # g(λ) > 1: the root is to the right
        lo, hi = torch.where(too_small, mid, lo), torch.where(too_small, hi, mid)
    pi = beta * p / (0.5 * (lo + hi) + gap)
    return (pi / pi.sum(-1, keepdim=True)).log()


def forward_kl_optimum_sequence(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """argmax over sequence distributions of J_fwd(π) = E_π[r] - β KL[π_ref‖π]: (P, K) probabilities.

    Derivation. J_fwd is strictly concave on the simplex (β Σ_y π_ref(y) log π(y) is concave). With
    a multiplier λ for Σ_y π(y) = 1, stationarity in π(y) reads r(y) + β π_ref(y)/π(y) = λ, so

        π(y) = β π_ref(y) / (λ - r(y)),   λ > max_{y: π_ref(y) > 0} r(y),   Σ_y π(y) = 1,

    a 1-D root problem per prompt with a unique solution (see ``_forward_normalised``). Unlike the
    reverse-KL tilt, π keeps every sequence π_ref can produce (forward KL is mass-covering) and
    grows only hyperbolically, not exponentially, in the reward.
    """
    _check_beta(beta)
    return _forward_normalised(ref.sequence_log_probs().detach(), rewards, beta).exp()


def forward_kl_optimum(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> TabularPolicy:
    """The policy on-policy training with "k3 as a loss term" (GRPO, DeepSeekMath Eq. 3) converges
    to: the zero of E[score-function reward gradient] - β E[∇ Σ_t k3_t] on a tabular softmax policy.

    What the k3 loss term's expected gradient is (docs/theory.md §3). At a state s, with a ~ π_θ(·|s),
    lr = log π_θ(a|s) - log π_ref(a|s), k3 = e^{-lr} - 1 + lr, the samples held fixed:
    ∇k3 = (1 - π_ref(a|s)/π_θ(a|s)) ∇log π_θ(a|s), and
    E_a[∇k3] = Σ_a (π_θ - π_ref)(a|s) ∇log π_θ(a|s) = -Σ_a π_ref(a|s) ∇log π_θ(a|s) = ∇ KL[π_ref(·|s)‖π_θ(·|s)].
    Summed over the tokens of sequences drawn from π_θ, the expected gradient is

        Σ_s d_θ(s) ∇_θ KL[π_ref(·|s)‖π_θ(·|s)]       (d_θ(s): probability that π_θ visits s),

    the forward KL at the states *π_θ* visits, with d_θ not differentiated. The gradient of the
    sequence-level KL[π_ref‖π_θ] = Σ_s d_ref(s) KL[π_ref(·|s)‖π_θ(·|s)] weights states by d_ref
    instead, so for T > 1 the k3 loss does not ascend J_fwd and its fixed point is not
    ``forward_kl_optimum_sequence``. (For T = 1 the two coincide.)

    The fixed point. With logits θ_s per state, the reward part is d_θ(s) Σ_a π(a|s)(Q(s, a) - V(s)) e_a
    (policy-gradient theorem; Q(s, a) the expected final reward after s·a under π, V(s) = E_a Q(s, a))
    and the KL part d_θ(s) (π(·|s) - π_ref(·|s)). Their difference vanishes at every visited state iff

        π(a|s) (Q(s, a) - V(s) - β) = -β π_ref(a|s)   ⇔   π(a|s) = β π_ref(a|s) / (λ_s - Q(s, a)),

    with λ_s = V(s) + β, which is exactly the normaliser making Σ_a π(a|s) = 1 (multiply by λ_s - Q
    and sum). Every state π_ref reaches is reached by this π (π > 0 where π_ref > 0), so the
    condition must hold everywhere. Q(s, ·) depends on π only below s, so backward induction from the
    leaves, one 1-D root problem per state (as in the sequence case with r replaced by Q), solves it
    exactly: a "forward-KL Bellman backup" with the hard expectation V(s) = Σ_a π(a|s) Q(s, a).

    Returns a frozen ``TabularPolicy`` with the normalised log-probabilities as logits.
    """
    _check_beta(beta)
    sp: TabularSpace = ref.space
    logp_ref = ref.log_probs().detach()
    table = torch.zeros(sp.n_prompts, sp.n_prefixes, sp.vocab_size, dtype=DTYPE)
    values = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)  # expected reward under the fixed point
    terminal = sp.child_seq >= 0
    for k in reversed(range(sp.horizon)):
        ids = sp.prefixes_by_length[k]
        q_k = torch.where(
            terminal[ids], rewards[:, sp.child_seq[ids].clamp(min=0)], values[:, sp.child_prefix[ids].clamp(min=0)]
        )  # (P, n_k, V)
        logpi = _forward_normalised(logp_ref[:, ids], q_k, beta)
        table[:, ids] = logpi
        values[:, ids] = (logpi.exp() * q_k).sum(-1)
    return TabularPolicy(sp, table, trainable=False)


# ---- best-of-n: the exact computations live with the rest of the best-of-n math -----------------------

from tether.ops.best_of_n import best_of_n_kl_bound, best_of_n_probs  # noqa: E402,F401
from tether.ops.best_of_n import best_of_n_kl_exact as best_of_n_kl  # noqa: E402,F401
