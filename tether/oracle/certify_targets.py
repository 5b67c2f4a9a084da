"""Targets for ``tether certify`` that ``exact.py`` does not already give: what each biased or
differently-regularised method provably converges to on a tabular problem (pure torch, float64).

Every function here is derived from the theory (docs/theory.md §3, §5, §6; ``tether.ops.kl.ESTIMATORS``;
``tether.ops.preference.TARGETS``), independently of the training code it certifies: the loops in
``certify_online`` / ``certify_preference`` run the shipped math functions, these compute where the
theory says those loops must end.

Per-state fixed points of "policy gradient of the reward + β x a per-token KL term in the loss".
With the states held fixed, a per-token loss term contributes at each prefix s only the gradient of
a per-state penalty F_s(π(·|s)) (docs/theory.md §3), while the reward reaches s through the score function
with Q(s, a) = E_π[r | s·a], the expected *reward* below s·a (no future penalty: the future penalty
terms are losses, not rewards). The zero of d(s)·[Σ_a π(a|s) (Q(s, a) - V(s)) ∇log π(a|s) - β ∇F_s]
at every visited state is solved by backward induction from the leaves, one state at a time, with
the hard backup V(s) = Σ_a π(a|s) Q(s, a):

- F_s = KL[π(·|s)‖π_ref(·|s)] (k2 or exact in the loss, k1/k3 with the π_θ/π_old weight):
  π(a|s) ∝ π_ref(a|s) exp(Q(s, a)/β) — ``local_kl_optimum``. For T = 1 this is π*; for T > 1 it
  differs from π*, whose Q is the *soft* value that also pays the future KL (Tang & Munos,
  arXiv:2506.09477).
- F_s = KL[π_ref(·|s)‖π(·|s)] (k3 in the loss, GRPO): ``exact.forward_kl_optimum``; with GRPO's
  own advantages and aggregation: ``grpo_fixed_point``.
- F_s = E_{π(·|s)}[lr²/2] (k2 with the π_θ/π_old weight) is not convex in π(·|s) and vanishes as a
  token's probability goes to 0, so low-reward tokens can be driven out: no target is computed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .exact import optimal_policy, sequence_kl
from .tabular import DTYPE, TabularPolicy, TabularSpace

# ---- per-state fixed points (KL terms in the loss) ------------------------------------------------------


def _backward(
    ref: TabularPolicy, rewards: torch.Tensor, solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> TabularPolicy:
    """Backward induction over prefixes: ``solve(logp_ref (P, n, V), q (P, n, V)) -> log π (P, n, V)``
    at the n prefixes of one length, with q(s, a) the expected reward below s·a under the solution."""
    sp: TabularSpace = ref.space
    logp_ref = ref.log_probs().detach()
    table = torch.zeros(sp.n_prompts, sp.n_prefixes, sp.vocab_size, dtype=DTYPE)
    values = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)  # E_π[r | s]
    terminal = sp.child_seq >= 0  # (S, V)
    for k in reversed(range(sp.horizon)):  # children (length k+1) are solved before their parents
        ids = sp.prefixes_by_length[k]
        q = torch.where(
            terminal[ids], rewards[:, sp.child_seq[ids].clamp(min=0)], values[:, sp.child_prefix[ids].clamp(min=0)]
        )  # (P, n_k, V)
        logpi = solve(logp_ref[:, ids], q)
        table[:, ids] = logpi
        values[:, ids] = (logpi.exp() * q).sum(-1)  # hard backup: no future penalty in the reward
    return TabularPolicy(sp, table, trainable=False)


def local_kl_optimum(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> TabularPolicy:
    """Fixed point of "score-function reward gradient + β ∇ Σ_t KL_t with the states held fixed":
    π(a|s) ∝ π_ref(a|s) exp(Q(s, a)/β), Q the expected reward below s·a under π (hard backup).

    Stationarity at s: π(a|s)(Q(s, a) - V(s)) = β π(a|s)(log(π(a|s)/π_ref(a|s)) - KL_s), using
    ∇_{θ_s} KL_s = π(·|s) ⊙ (log(π/π_ref) - KL_s); hence log π(a|s) = log π_ref(a|s) + Q(s, a)/β + c_s.
    π* solves the same equation with the soft Q that also pays β x the future KL; they agree at T = 1.
    """
    _check_beta(beta)
    return _backward(ref, rewards, lambda logp_ref, q: torch.log_softmax(logp_ref + q / beta, dim=-1))


# ---- GRPO's own fixed point (DeepSeekMath §4.1.2 advantages, Eq. 3 aggregation) ----------------------------


def group_advantage_table(
    rewards: torch.Tensor, seq_probs: torch.Tensor, *, group_size: int, scale: bool, eps: float = 1e-4
) -> torch.Tensor:
    """Ã(y) = E[A_1 | y_1 = y], the expected GRPO advantage of a sequence when the other G - 1 members of
    its group are drawn from π: (P, K). A_i = (r_i - mean_g)/(std_g + ε) (Bessel std; ``scale=False``:
    r_i - mean_g), by enumerating every group (K^G of them). Written from the definition, independently
    of ``tether.ops.policy.group_advantages``."""
    P, K = rewards.shape
    G = group_size
    tuples = torch.cartesian_prod(*[torch.arange(K)] * G).reshape(-1, G)  # (K^G, G)
    r = rewards[:, tuples]  # (P, K^G, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    others = seq_probs[:, tuples[:, 1:]].prod(-1)  # (P, K^G) probability of members 2..G
    out = torch.zeros(P, K, dtype=DTYPE)
    return out.index_add_(1, tuples[:, 0], others * adv[..., 0])  # Σ over groups whose first member is y


def _hyperbolic_normalised(weights: torch.Tensor, offsets: torch.Tensor, iters: int = 64) -> torch.Tensor:
    """π_a = w_a / (μ - o_a) with μ > max o_a set by Σ_a π_a = 1 (unique: the sum falls from ∞ to 0 in μ);
    over the last dim, w_a > 0. Bisection on t = μ - max o in [w_m, Σ w] (m an argmax of o); 64 halvings reach float64
    resolution."""
    o_max = offsets.max(-1, keepdim=True).values
    gap = o_max - offsets  # ≥ 0
    lo = (weights * (gap == 0)).sum(-1, keepdim=True)  # Σ over argmaxes: g(lo) ≥ 1
    hi = weights.sum(-1, keepdim=True)  # g(hi) ≤ 1
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = (weights / (mid + gap)).sum(-1, keepdim=True) > 1.0
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    pi = weights / (0.5 * (lo + hi) + gap)
    return pi / pi.sum(-1, keepdim=True)


def grpo_fixed_point(
    ref: TabularPolicy,
    rewards: torch.Tensor,
    beta: float,
    *,
    group_size: int,
    scale: bool = True,
    length_weighted: bool = True,
    eps: float = 1e-4,
    iters: int = 100,
    tol: float = 1e-12,
) -> TabularPolicy:
    """Where on-policy GRPO with the k3 KL in the loss converges (DeepSeekMath Eq. 3), exactly.

    The expected gradient at the logits θ_s of a prefix s, with groups drawn from π and the loss
    1/G Σ_i c(y_i) Σ_t [-A_i ∇log π(y_{i,t}|s_t) + β ∇k3_t], c(y) = 1/|y| (``length_weighted``:
    ``seq_mean_token_mean``) or 1 (``token_mean``/``seq_sum``, up to a positive constant):

    - reward part: by exchangeability E[A_1 c(y_1) ∇log π(y_1)] = Σ_y π(y) R(y) ∇log π(y) with
      R(y) = c(y)·Ã(y), Ã = ``group_advantage_table``: d(s) π(·|s) ⊙ (Q_R(s, ·) - V_R(s));
    - KL part: ∇_{θ_s} k3(a|s) = (1 - π_ref(a|s)/π(a|s)) (e_a - π(·|s)), weighted by
      c(s, a) = E_π[c(y) | s·a]: d(s) Σ_a c(s, a)(π(a|s) - π_ref(a|s))(e_a - π(·|s)).

    Setting their difference to 0: π(a|s) = β c(s, a) π_ref(a|s) / (μ_s + β c(s, a) - Q_R(s, a)), μ_s
    the normaliser (summing (μ_s + βc_a - Q_a)π_a = βc_a π_ref,a over a shows it is consistent); with
    c ≡ 1 this is ``exact.forward_kl_optimum`` for the reward R. Q_R and c below s depend only on the
    policy below s (backward induction); Ã depends on the whole π through the other group members, so
    an outer fixed-point iteration on Ã closes the loop (on the certification problem it contracts by
    ~0.35 per iteration; it stops when Ã moves by less than ``tol`` and raises if it never does).
    """
    _check_beta(beta)
    sp: TabularSpace = ref.space
    length = sp.seq_mask.sum(-1).to(DTYPE)  # (K,)
    c_seq = (1.0 / length if length_weighted else torch.ones_like(length)).expand(sp.n_prompts, -1)  # (P, K)
    probs = ref.sequence_probs().detach()
    adv = group_advantage_table(rewards, probs, group_size=group_size, scale=scale, eps=eps)
    logp_ref = ref.log_probs().detach()
    terminal = sp.child_seq >= 0
    for _ in range(iters):
        R = c_seq * adv  # (P, K)
        table = torch.zeros(sp.n_prompts, sp.n_prefixes, sp.vocab_size, dtype=DTYPE)
        v_R = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)  # E[R | s]
        v_c = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)  # E[c | s]
        for k in reversed(range(sp.horizon)):
            ids = sp.prefixes_by_length[k]
            seq_ids, kid = sp.child_seq[ids].clamp(min=0), sp.child_prefix[ids].clamp(min=0)
            q = torch.where(terminal[ids], R[:, seq_ids], v_R[:, kid])  # (P, n_k, V)
            c = torch.where(terminal[ids], c_seq[:, seq_ids], v_c[:, kid])
            pi = _hyperbolic_normalised(beta * c * logp_ref[:, ids].exp(), q - beta * c)
            table[:, ids] = pi.log()
            v_R[:, ids], v_c[:, ids] = (pi * q).sum(-1), (pi * c).sum(-1)
        policy = TabularPolicy(sp, table, trainable=False)
        new = group_advantage_table(
            rewards, policy.sequence_probs().detach(), group_size=group_size, scale=scale, eps=eps
        )
        change = float((new - adv).abs().max())
        adv = new
        if change < tol:
            return policy
    raise RuntimeError(f"grpo_fixed_point did not converge (last change {change:.1e})")


# ---- the reverse-KL optimum at the β a controller settles on ---------------------------------------------


def optimum_kl(ref: TabularPolicy, rewards: torch.Tensor, beta: float) -> float:
    """Mean over prompts of KL[π*_β‖π_ref] (the sequence KL a controller is fed at the optimum)."""
    return float(sequence_kl(optimal_policy(ref, rewards, beta), ref).mean())


def beta_for_kl(ref: TabularPolicy, rewards: torch.Tensor, kl: float, *, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The β with mean KL[π*_β‖π_ref] = ``kl``, by bisection on log β (the KL falls as β grows:
    d KL/d β = -Var_{π*}(r)/β³ < 0 for a non-constant reward)."""
    if not optimum_kl(ref, rewards, hi) < kl < optimum_kl(ref, rewards, lo):
        raise ValueError(f"KL {kl} is not reachable with beta in [{lo}, {hi}]")
    a, b = math.log(lo), math.log(hi)
    for _ in range(100):
        m = 0.5 * (a + b)
        a, b = (m, b) if optimum_kl(ref, rewards, math.exp(m)) > kl else (a, m)
    return math.exp(0.5 * (a + b))


# ---- preference-loss targets (tether.ops.preference.TARGETS), sequence level --------------------------------


def bt_preferences(rewards: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry p(y ≻ y') = σ(r(y) - r(y')): (P, K) -> (P, K, K), [x, i, j] = p(y_i ≻ y_j)."""
    return torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])


def _inverse_normalised(
    logp_ref: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    log_u: Callable[[torch.Tensor], torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    iters: int = 200,
) -> torch.Tensor:
    """log π(y) = log π_ref(y) + log_u((r(y) - λ)/β) with λ ∈ (lo, hi) such that Σ π = 1 (bisection;
    log_u increasing, so the mass falls in λ). (P, K) -> (P, K)."""

    def mass(lam):
        return torch.logsumexp(logp_ref + log_u((rewards - lam) / beta), dim=-1, keepdim=True).exp()

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = mass(mid) > 1.0
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    out = logp_ref + log_u((rewards - 0.5 * (lo + hi)) / beta)
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


def f_optimum_sequence(
    ref: TabularPolicy, rewards: torch.Tensor, beta: float, *, divergence: str, alpha: float = 0.5
) -> torch.Tensor:
    """argmax of E_π[r] - β D_f(π‖π_ref) over sequence distributions (Wang et al. 2023, "Beyond
    Reverse KL", Thm 1): π(y) = π_ref(y)·(f′)⁻¹((r(y) - λ)/β), λ set by Σ π = 1. (P, K) probabilities.

    f′ (paper): reverse_kl log u + 1; forward_kl -1/u; js log(2u/(1+u)); alpha (1 - u^{-α})/α. The
    inverses, as log u of z = (r - λ)/β: reverse z - 1; forward -log(-z) (z < 0);
    js z - log(2 - e^z) (z < log 2); alpha -log(1 - αz)/α (z < 1/α).
    """
    _check_beta(beta)
    logp_ref = ref.sequence_log_probs().detach()
    r_max = rewards.amax(-1, keepdim=True)
    if divergence == "reverse_kl":
        return torch.softmax(logp_ref + rewards / beta, dim=-1)
    if divergence == "forward_kl":

        def log_u(z):
            return -torch.log(-z)

        edge = r_max  # z < 0  <=>  λ > max r
    elif divergence == "js":

        def log_u(z):
            return z - torch.log(2.0 - z.exp())

        edge = r_max - beta * math.log(2.0)  # z < log 2
    elif divergence == "alpha":
        if not alpha > 0:
            raise ValueError("f_optimum_sequence: alpha must be > 0 (alpha = 0 is reverse_kl)")

        def log_u(z):
            return -torch.log1p(-alpha * z) / alpha

        edge = r_max - beta / alpha  # z < 1/α
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    span = (rewards.amax(-1, keepdim=True) - rewards.amin(-1, keepdim=True)) + 10.0 * beta
    lo = edge + 1e-300  # the mass is +∞ at the edge ...
    hi = edge + span
    while bool((torch.logsumexp(logp_ref + log_u((rewards - hi) / beta), -1, keepdim=True).exp() > 1.0).any()):
        hi = hi + span  # ... and falls to 0 as λ grows: widen until bracketed
    return _inverse_normalised(logp_ref, rewards, beta, log_u, lo, hi).exp()


def ipo_optimum_sequence(
    ref: TabularPolicy, rewards: torch.Tensor, beta: float, *, length_normalize: bool = False
) -> torch.Tensor:
    """IPO's target (Azar et al. 2023, Ψ = identity) for pairs y, y' ~ π_ref ⊗ π_ref and BT labels:
    the least-squares fit of lr(y) - lr(y') to (p(y ≻ y') - 1/2)/β under the product measure μ⊗μ is
    lr(y) = P(y ≻ μ)/β + c, P(y ≻ μ) = Σ_{y'} μ(y') p(y ≻ y'). (P, K) probabilities.

    With ``length_normalize`` the fitted quantity is lr(y)/|y|, so lr(y) = |y|·(P(y ≻ μ)/β + c), c set
    by normalisation (bisection: Σ_y π_ref(y) e^{|y|(g/β + c)} increases in c).
    """
    _check_beta(beta)
    sp = ref.space
    logp_ref = ref.sequence_log_probs().detach()
    win = (bt_preferences(rewards) * logp_ref.exp()[:, None, :]).sum(-1)  # (P, K) P(y ≻ μ)
    if not length_normalize:
        return torch.softmax(logp_ref + win / beta, dim=-1)
    length = sp.seq_mask.sum(-1).to(DTYPE)  # (K,)
    lo = torch.full((rewards.shape[0], 1), -1.0 / beta - 50.0, dtype=DTYPE)
    hi = torch.full_like(lo, 50.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        big = torch.logsumexp(logp_ref + length * (win / beta + mid), -1, keepdim=True) > 0.0
        lo, hi = torch.where(big, lo, mid), torch.where(big, mid, hi)
    out = logp_ref + length * (win / beta + 0.5 * (lo + hi))
    return torch.softmax(out, dim=-1)


def soft_label_bt_sequence(ref: TabularPolicy, labels: torch.Tensor, beta: float, *, iters: int = 50) -> torch.Tensor:
    """Minimiser over sequence distributions of the expected logistic loss with soft labels
    q(y ≻ y') (``labels`` (P, K, K), q + qᵀ = 1), pairs from μ⊗μ with μ = π_ref, logit h = β(u(y) - u(y')),
    u = log π/π_ref: Σ_{y,y'} μ(y)μ(y')[-q log σ(h) - (1-q) log σ(-h)] (cDPO's TARGETS entry: per pair
    the minimiser wants σ(h) = q; across three or more sequences it is this convex compromise).
    Newton's method on u (strictly convex up to a constant shift, fixed by Σ_y μ(y) u(y) = 0). (P, K) probabilities.
    """
    _check_beta(beta)
    logp_ref = ref.sequence_log_probs().detach()
    mu = logp_ref.exp()  # (P, K)
    w = mu[:, :, None] * mu[:, None, :]  # (P, K, K)
    u = torch.zeros_like(mu)
    for _ in range(iters):
        s = torch.sigmoid(beta * (u[:, :, None] - u[:, None, :]))  # (P, K, K)
        grad = 2.0 * beta * (w * (s - labels)).sum(-1)  # both orders of each pair
        curv = 2.0 * beta**2 * w * s * (1 - s)  # (P, K, K)
        hess = torch.diag_embed(curv.sum(-1)) - curv + mu[:, :, None] * mu[:, None, :]  # + μμᵀ pins the shift
        u = u - torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    return torch.softmax(logp_ref + u, dim=-1)


def cdpo_optimum_sequence(
    ref: TabularPolicy, rewards: torch.Tensor, beta: float, *, label_smoothing: float
) -> torch.Tensor:
    """cDPO's target (``TARGETS["cdpo"]``): the soft-label fit with q = (1 - 2ε)·p + ε, p the BT label
    probability (E over the label of cDPO's dL/dh is σ(h) - q). ε = 0 gives π*. (P, K) probabilities."""
    eps = label_smoothing
    return soft_label_bt_sequence(ref, (1 - 2 * eps) * bt_preferences(rewards) + eps, beta)


def as_policy(ref: TabularPolicy, seq_probs: torch.Tensor) -> TabularPolicy:
    """A frozen autoregressive policy with the given (P, K) sequence distribution."""
    return TabularPolicy.from_sequence_probs(ref.space, seq_probs, trainable=False)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


__all__ = [
    "as_policy",
    "beta_for_kl",
    "bt_preferences",
    "cdpo_optimum_sequence",
    "f_optimum_sequence",
    "group_advantage_table",
    "grpo_fixed_point",
    "ipo_optimum_sequence",
    "local_kl_optimum",
    "optimum_kl",
    "soft_label_bt_sequence",
    "filter_sets",
    "filtered_policy",
    "fixed_reference_optimum",
    "restricted_reference_optimum",
    "fixed_reference_kl",
    "beta_for_fixed_reference_kl",
]


# ---- sampling filters: the optimum of the fixed-reference objective within fixed sets (docs/theory.md §3) ----


def filter_sets(policy: TabularPolicy, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(P, S, V) bool: the token set F(s) the sampler's top-k/top-p keeps at every state of ``policy``
    (``tether.ops.logprobs.allowed_set``, the rule the sampler records; all True without a filter)."""
    from tether.ops.logprobs import allowed_set

    return allowed_set(policy.table.detach(), temperature=temperature, top_k=top_k, top_p=top_p)


def filtered_policy(policy: TabularPolicy, sets: torch.Tensor, *, temperature: float = 1.0) -> TabularPolicy:
    """π^{τ,F}: softmax(table/τ) restricted to ``sets`` (P, S, V) and renormalised, frozen: the policy
    as the sampler draws from it."""
    return TabularPolicy(
        policy.space, (policy.table.detach() / temperature).masked_fill(~sets, float("-inf")), trainable=False
    )


def fixed_reference_optimum(
    ref: TabularPolicy, rewards: torch.Tensor, beta: float, sets: torch.Tensor, *, temperature: float = 1.0
) -> TabularPolicy:
    """argmax over policies π supported on the sets F(s) (P, S, V) of E_π[r] - β KL[π‖π^τ_ref], the KL to the
    fixed, tempered, unfiltered reference (docs/theory.md §3). By enumeration: π(y) ∝ π^τ_ref(y)·e^{r(y)/β} on
    the sequences whose every token lies in its state's set, 0 elsewhere (the tilt of §5 restricted to
    the allowed sequences: J(π) = β log Z_F - β KL[π‖that] for every such π). Token by token it is
    the soft backup with the *unnormalised* restricted reference, V(s) = β log Σ_{a∈F(s)} π^τ_ref(a|s) e^{Q/β},
    so a state's V pays -log π^τ_ref(F(s)): branches whose sets hold little reference mass are discounted."""
    _check_beta(beta)
    sp = ref.space
    logq = torch.log_softmax(ref.table.detach() / temperature, -1).masked_fill(~sets, float("-inf"))  # (P, S, V)
    seq = logq[:, sp.seq_prefix_ids, sp.seq_tokens].masked_fill(~sp.seq_mask, 0.0).sum(-1)  # (P, K)
    return as_policy(ref, torch.softmax(seq + rewards / beta, -1))


def restricted_reference_optimum(
    ref: TabularPolicy, rewards: torch.Tensor, beta: float, sets: torch.Tensor, *, temperature: float = 1.0
) -> TabularPolicy:
    """The optimum when the KL is to the reference restricted to each state's set and renormalised
    (``kl_reference_filter: restricted``): π* of §5 with π^{τ,F}_ref as the reference, i.e. π(y) ∝
    π^τ_ref(y)·e^{r(y)/β} / Π_t π^τ_ref(F(s_t)|s_t). The objective pays a bonus β·Σ_t -log π^τ_ref(F(s_t)) to
    sequences through states whose sets hold little reference mass (docs/theory.md §3)."""
    _check_beta(beta)
    logq = torch.log_softmax(ref.table.detach() / temperature, -1).masked_fill(~sets, float("-inf"))
    return optimal_policy(TabularPolicy(ref.space, logq, trainable=False), rewards, beta)


def fixed_reference_kl(policy: TabularPolicy, ref: TabularPolicy, *, temperature: float = 1.0) -> torch.Tensor:
    """KL[π‖π^τ_ref] per prompt (P,), π a filtered policy (zeros outside its sets): what kl/ref measures."""
    return sequence_kl(policy, TabularPolicy(ref.space, ref.table.detach() / temperature, trainable=False))


def beta_for_fixed_reference_kl(
    ref: TabularPolicy,
    rewards: torch.Tensor,
    kl: float,
    sets: torch.Tensor,
    *,
    temperature: float = 1.0,
    lo: float = 1e-3,
    hi: float = 1e3,
) -> float:
    """The β whose ``fixed_reference_optimum`` within ``sets`` has mean KL[π‖π^τ_ref] = ``kl``, by bisection in
    log β (dKL/dβ = -Var/β³ < 0 within fixed sets, as in §4). The KL tends to the sets' own cost
    -log π^τ_ref(allowed sequences) as β → ∞, so ``kl`` must exceed it."""

    def kl_at(b: float) -> float:
        return float(
            fixed_reference_kl(
                fixed_reference_optimum(ref, rewards, b, sets, temperature=temperature), ref, temperature=temperature
            ).mean()
        )

    floor = kl_at(hi)
    if not kl > floor:
        raise ValueError(f"KL target {kl} is below what the sets alone cost ({floor:.4f} nats at β = {hi})")
    a, b = math.log(lo), math.log(hi)
    for _ in range(100):
        m = (a + b) / 2
        a, b = (m, b) if kl_at(math.exp(m)) > kl else (a, m)
    return math.exp((a + b) / 2)
