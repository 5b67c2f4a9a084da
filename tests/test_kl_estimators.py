"""KL estimators (docs/theory.md §2) and what their gradients are in each placement (docs/theory.md §3), checked
exactly: expectations are sums over the whole support weighted by probabilities, not samples.

Two testbeds: small categoricals (T = 1), and a tabular autoregressive tree (``tether.oracle``, V = 3,
T = 3, two prompts) with every complete sequence enumerated. On the tree the per-token loss terms
differentiate with the states s_t held fixed, so they give

    G_local  = Σ_s d_θ(s) ∇_θ KL[π_θ(·|s)‖π_ref(·|s)]      (d_θ(s): probability π_θ visits s, not differentiated)
    G_fwdloc = Σ_s d_θ(s) ∇_θ KL[π_ref(·|s)‖π_θ(·|s)]

and not ∇KL_seq / ∇KL_fwd,seq (they coincide when T = 1). With one logit vector θ_s per state the
per-state gradients have closed forms, written out in ``_hand_local`` and used as ground truth:
∂KL[π‖ρ]/∂θ_s = π ⊙ (log π/ρ - KL) and ∂KL[ρ‖π]/∂θ_s = π - ρ.
"""

import math

import pytest
import torch

from tether.ops.kl import (
    ESTIMATOR_NAMES,
    ESTIMATORS,
    forward_k3,
    k1,
    k2,
    k3,
    kl_loss_term,
    kl_per_token,
    kl_reward_penalty,
    seq_sum,
)
from tether.ops.logprobs import selective_logps
from tether.oracle import TabularPolicy, expected_kl_gradient, kl_surrogate, sequence_kl
from tether.oracle.tabular import make_problem

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 sums of O(1) terms over at most a few hundred sequences


# ---- testbeds --------------------------------------------------------------------------------------


def _categorical(V=5, seed=0):
    """θ (trainable) and reference logits of one categorical, with its whole support as a batch of
    V one-token 'completions': tokens (V, 1), logits (V, 1, V), weights p(y) (V,)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(V, generator=g, dtype=torch.float64)
    tokens = torch.arange(V)[:, None]
    return theta, ref, tokens


def _cat_tokens(theta, ref, tokens, **kw):
    V = theta.shape[0]
    logits, ref_logits = theta.expand(V, 1, V), ref.expand(V, 1, V)
    logps, ref_logps = selective_logps(logits, tokens), selective_logps(ref_logits, tokens)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    return logps, ref_logps, mask, logits, ref_logits


def _tree(T=3, seed=0):
    """A V=3 tree with two prompts; π_θ and π_ref both random, not close (KL ~ 1 nat)."""
    prob = make_problem(3, T, n_prompts=2, seed=seed)
    pol = TabularPolicy.random(prob.space, seed=seed + 100)
    return prob.space, pol, prob.ref


def _grad(value, pol):
    (g,) = torch.autograd.grad(value.sum(), pol.table)
    return g


def _hand_local(pol, ref, states_from=None):
    """(G_local, G_fwdloc) from the closed-form per-state gradients, states weighted by
    ``states_from`` (default π_θ) visits, detached."""
    d = (pol if states_from is None else states_from).state_probs().detach()[..., None]  # (P, S, 1)
    lp, lr_ = pol.log_probs().detach(), ref.log_probs()
    p, r = lp.exp(), lr_.exp()
    kl_s = (p * (lp - lr_)).sum(-1, keepdim=True)
    return d * p * (lp - lr_ - kl_s), d * (p - r)


def _expect_tokens(pol, ref, fn):
    """E_{y~π_θ}[Σ_t fn(tokens...)] over every enumerated sequence, summed over prompts."""
    comp = pol.space.all_completions()
    logits, ref_logits = pol.logits(comp.prompt_ids, comp.tokens), ref.logits(comp.prompt_ids, comp.tokens)
    logps = selective_logps(logits, comp.tokens)
    ref_logps = selective_logps(ref_logits, comp.tokens)
    w = pol.sequence_probs().reshape(-1)
    return (w * fn(logps, ref_logps, comp.mask, logits, ref_logits)).sum()


# ---- values: E[estimator] by exact summation -----------------------------------------------------------


def test_values_on_a_categorical():
    """E_p[k1] = E_p[k3] = E_p[exact] = KL[p‖q]; E_p[k2] = Σ p lr²/2 ≠ KL; the forward estimators
    (importance-weighted, samples from p) have E = KL[q‖p] (k1, k3, exact) and Σ q lr²/2 (k2)."""
    theta, ref, tokens = _categorical()
    logps, ref_logps, mask, logits, ref_logits = _cat_tokens(theta, ref, tokens)
    lp, lq = theta.detach().log_softmax(-1), ref.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    kl_rev, kl_fwd = (p * (lp - lq)).sum(), (q * (lq - lp)).sum()
    k2_exact, fk2_exact = (p * (lp - lq) ** 2 / 2).sum(), (q * (lp - lq) ** 2 / 2).sum()
    expected = {
        ("k1", "reverse"): kl_rev,
        ("k3", "reverse"): kl_rev,
        ("exact", "reverse"): kl_rev,
        ("k2", "reverse"): k2_exact,
        ("k1", "forward"): kl_fwd,
        ("k3", "forward"): kl_fwd,
        ("exact", "forward"): kl_fwd,
        ("k2", "forward"): fk2_exact,
    }
    for (est, direction), want in expected.items():
        vals = kl_per_token(
            logps, ref_logps, mask, estimator=est, direction=direction, logits=logits, ref_logits=ref_logits
        ).per_token[:, 0]
        got = (p * vals).sum()
        assert got.item() == pytest.approx(want.item(), rel=1e-12), (est, direction)
    assert abs(k2_exact - kl_rev) > 1e-2  # k2 is biased: here ~25% off (π_θ and π_ref are far apart)


def test_values_on_a_tree():
    """E[Σ_t k1] = E[Σ_t k3] = E[Σ_t exact] = KL[π_θ‖π_ref] over sequences (chain rule: states are
    visited by π_θ, the distribution the samples come from). E[Σ_t k2] = Σ_s d(s) Σ_a π lr²/2.
    Forward: the per-token forward estimators give Σ_s d_θ(s) KL[π_ref(·|s)‖π_θ(·|s)] -- forward KL
    at the states *π_θ* visits -- which is not the sequence KL[π_ref‖π_θ] (states visited by π_ref);
    the sequence-level ratio R = Π_t r_t = exp(-Σ_t lr_t) in forward_k3 gives the latter."""
    space, pol, ref = _tree()
    kl_rev = sequence_kl(pol, ref).sum()
    kl_fwd = sequence_kl(ref, pol).sum()
    d = pol.state_probs()[..., None]
    lp, lq = pol.log_probs(), ref.log_probs()
    p, q = lp.exp(), lq.exp()
    kl_rev_states = (d * p * (lp - lq)).sum()
    kl_fwd_visited = (d * q * (lq - lp)).sum()
    k2_states = (d * p * (lp - lq) ** 2 / 2).sum()
    fk2_states = (d * q * (lp - lq) ** 2 / 2).sum()
    assert kl_rev.item() == pytest.approx(kl_rev_states.item(), rel=1e-12)
    for est, direction, want in [
        ("k1", "reverse", kl_rev),
        ("k3", "reverse", kl_rev),
        ("exact", "reverse", kl_rev),
        ("k2", "reverse", k2_states),
        ("k1", "forward", kl_fwd_visited),
        ("k3", "forward", kl_fwd_visited),
        ("exact", "forward", kl_fwd_visited),
        ("k2", "forward", fk2_states),
    ]:
        got = _expect_tokens(
            pol,
            ref,
            lambda lps, rlps, m, lg, rlg: seq_sum(
                kl_per_token(lps, rlps, m, estimator=est, direction=direction, logits=lg, ref_logits=rlg).per_token, m
            ),
        )
        assert got.item() == pytest.approx(want.item(), rel=1e-12), (est, direction)
    assert abs(kl_fwd_visited - kl_fwd) > 0.05  # the per-token forward sum is a different quantity for T > 1
    seq_fwd = _expect_tokens(pol, ref, lambda lps, rlps, m, lg, rlg: forward_k3(seq_sum(lps - rlps, m)))
    assert seq_fwd.item() == pytest.approx(kl_fwd.item(), rel=1e-12)


def test_k2_bias_is_third_order():
    """E_π[k2] - KL = E_π[k2 - k3] = E_π[lr³/6 - lr⁴/24 + ...]. With θ = θ_ref + ε·u, lr = O(ε), so
    the bias is c ε³ + O(ε⁴) while KL ~ ε²: halving ε divides the bias by 8 (to O(ε) = 1% here,
    hence the 5% tolerance) and the relative bias vanishes near π_ref, as docs/theory.md §2 says."""
    _, ref, tokens = _categorical(V=6, seed=3)
    u = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def bias_and_kl(eps):
        lp, lq = (ref + eps * u).log_softmax(-1), ref.log_softmax(-1)
        p = lp.exp()
        return (p * (k2(lp - lq) - k3(lp - lq))).sum().item(), (p * (lp - lq)).sum().item()

    b1, kl1 = bias_and_kl(1e-2)
    b2, kl2 = bias_and_kl(5e-3)
    assert b1 / b2 == pytest.approx(8.0, rel=0.05)
    assert kl1 / kl2 == pytest.approx(4.0, rel=0.05)
    assert abs(b1) / kl1 < 0.02


# ---- expected gradients per (estimator, placement) ------------------------------------------------------

# label -> phrase that ESTIMATORS must contain for that pair (the metadata agrees with the check)
TABLE = {
    ("k1", "reward"): ("rev", "∇ KL[π_θ‖π_ref] (correct"),
    ("k1", "loss"): ("zero", "0 in expectation"),
    ("k1", "loss_is"): ("local", "states held fixed"),
    ("k2", "reward"): ("k2_score", "minus its pathwise"),
    ("k2", "loss"): ("local", "states held fixed"),
    ("k2", "loss_is"): ("k2_local_value", "∇ E_{π_θ(·|s_t)}[lr²/2]"),
    ("k3", "reward"): ("rev_minus_fwdloc", "∇ KL[π_θ‖π_ref] - Σ_t E_{s_t~π_θ}[∇ KL[π_ref‖π_θ](s_t)]"),
    ("k3", "loss"): ("fwdloc", "Σ_t E_{s_t~π_θ}[∇ KL[π_ref(·|s_t)‖π_θ(·|s_t)]]"),
    ("k3", "loss_is"): ("local", "states held fixed"),
    ("exact", "reward"): ("rev_minus_local", "only the state-distribution part"),
    ("exact", "loss"): ("local", "states held fixed"),
    ("exact", "loss_is"): ("local", "as 'loss'"),
}


def _targets(pol, ref):
    """Ground truths, none of them computed through tether.ops.kl."""
    local, fwdloc = _hand_local(pol, ref)
    rev = _grad(sequence_kl(pol, ref), pol)
    lq = ref.log_probs()

    def k2_states(d):  # Σ_s d(s) Σ_a π(a|s) lr²/2
        lp = pol.log_probs()
        return (d[..., None] * lp.exp() * (lp - lq) ** 2 / 2).sum()

    k2_total = _grad(k2_states(pol.state_probs()), pol)  # ∇ E_θ[Σ_t k2_t], states differentiated too
    return {
        "rev": rev,
        "zero": torch.zeros_like(rev),
        "local": local,
        "fwdloc": fwdloc,
        "rev_minus_fwdloc": rev - fwdloc,
        "rev_minus_local": rev - local,
        "k2_score": k2_total - local,  # score part = total derivative - pathwise part (the k2 loss = local)
        "k2_local_value": _grad(k2_states(pol.state_probs().detach()), pol),
    }


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("pair", list(TABLE), ids=lambda p: f"{p[0]}-{p[1]}")
def test_expected_gradient_table(pair, T):
    """Each (estimator, placement)'s exact expected gradient, from the project's own per-token code
    (``tether.oracle.expected_kl_gradient``), equals its docs/theory.md §3 entry made precise for sequences."""
    space, pol, ref = _tree(T=T)
    label, phrase = TABLE[pair]
    got = expected_kl_gradient(pol, ref, estimator=pair[0], placement=pair[1])
    torch.testing.assert_close(got, _targets(pol, ref)[label], **TIGHT)
    info = ESTIMATORS[pair[0]]
    assert phrase in {"reward": info.grad_reward, "loss": info.grad_loss, "loss_is": info.grad_loss_is}[pair[1]]


def test_single_token_gradients_are_the_textbook_ones():
    """T = 1 (a categorical per prompt): 'local' is the full gradient, so docs/theory.md §3 holds verbatim:
    k1-reward = k2-loss = k3-loss_is = exact-loss = ∇KL_rev; k3-loss = ∇KL_fwd; k3-reward =
    ∇KL_rev - ∇KL_fwd; k1-loss = 0; and exact-reward = 0 (the per-state KL does not depend on the
    sampled token, so a detached copy of it in the reward carries no signal).
    Closed forms per prompt: ∇_θ KL[p‖q] = p ⊙ (log p/q - KL), ∇_θ KL[q‖p] = p - q."""
    space, pol, ref = _tree(T=1)
    lp, lq = pol.log_probs().detach(), ref.log_probs()
    p, q = lp.exp(), lq.exp()
    rev = p * (lp - lq - (p * (lp - lq)).sum(-1, keepdim=True))
    fwd = p - q
    torch.testing.assert_close(_grad(sequence_kl(pol, ref), pol), rev, **TIGHT)
    torch.testing.assert_close(_grad(sequence_kl(ref, pol), pol), fwd, **TIGHT)
    for (est, pl), want in {
        ("k1", "reward"): rev,
        ("k2", "loss"): rev,
        ("k3", "loss_is"): rev,
        ("exact", "loss"): rev,
        ("k1", "loss_is"): rev,
        ("k3", "loss"): fwd,
        ("k3", "reward"): rev - fwd,
        ("k1", "loss"): 0 * rev,
        ("exact", "reward"): 0 * rev,
    }.items():
        torch.testing.assert_close(expected_kl_gradient(pol, ref, estimator=est, placement=pl), want, **TIGHT)


def test_per_token_loss_misses_the_state_term_on_sequences():
    """For T = 3 the 'states held fixed' gradients differ from the sequence gradients (Tang & Munos
    2025), and the missing part is the state-distribution term: exact-loss + exact-reward = ∇KL_seq,
    and so is exact-loss + k1 with a strictly-future reward-to-go Σ_{t'>t} lr_{t'} (docs/theory.md §3's fix;
    including t' = t would count the local part twice)."""
    space, pol, ref = _tree(T=3)
    rev, fwd = _grad(sequence_kl(pol, ref), pol), _grad(sequence_kl(ref, pol), pol)
    local, fwdloc = _hand_local(pol, ref)
    assert (local - rev).abs().max() > 1e-2
    assert (fwdloc - fwd).abs().max() > 1e-2
    g = lambda est, pl: expected_kl_gradient(pol, ref, estimator=est, placement=pl)  # noqa: E731
    torch.testing.assert_close(g("exact", "loss") + g("exact", "reward"), rev, **TIGHT)

    comp = space.all_completions()
    logps = pol.logps(comp.prompt_ids, comp.tokens, comp.mask)
    ref_logps = ref.logps(comp.prompt_ids, comp.tokens, comp.mask)
    kl1 = kl_per_token(logps.detach(), ref_logps, comp.mask, estimator="k1").per_token
    future = kl1.flip(-1).cumsum(-1).flip(-1) - kl1  # Σ_{t' > t}
    w = pol.sequence_probs().detach().reshape(-1, 1)
    score = _grad((w * logps * future).sum(), pol)
    torch.testing.assert_close(g("exact", "loss") + score, rev, **TIGHT)


def test_score_plus_pathwise_is_the_total_derivative():
    """Product rule: for any per-token estimator k, 'reward' + 'loss' = ∇_θ E_{π_θ}[Σ_t k_t(θ)]. For
    the unbiased ones (k1, k3, exact) that total is ∇KL_seq, whatever each part is."""
    space, pol, ref = _tree(T=3, seed=1)
    rev = _grad(sequence_kl(pol, ref), pol)
    for est in ("k1", "k3", "exact"):
        total = expected_kl_gradient(pol, ref, estimator=est, placement="reward") + expected_kl_gradient(
            pol, ref, estimator=est, placement="loss"
        )
        torch.testing.assert_close(total, rev, **TIGHT)


def test_off_policy_importance_weight_gives_states_of_the_behaviour_policy():
    """Samples from π_old ≠ π_θ: with the per-token weight π_θ/π_old, k1 and k3 in the loss give
    Σ_s d_old(s) ∇KL(s) -- right at each state, states weighted by π_old -- as does 'exact' with or
    without the weight (its weight has mean 1 and KL_t does not depend on y_t). Without the weight k3
    gives something else."""
    space, pol, ref = _tree(T=3, seed=2)
    old = TabularPolicy.random(space, seed=7, trainable=False)
    local_old, _ = _hand_local(pol, ref, states_from=old)
    for est, pl in [("k1", "loss_is"), ("k3", "loss_is"), ("exact", "loss_is"), ("exact", "loss")]:
        got = expected_kl_gradient(pol, ref, estimator=est, placement=pl, behaviour=old)
        torch.testing.assert_close(got, local_old, **TIGHT)
    no_is = expected_kl_gradient(pol, ref, estimator="k3", placement="loss", behaviour=old)
    assert (no_is - local_old).abs().max() > 1e-2


def _per_sequence_grads(pol, ref, est, pl):
    comp = pol.space.all_completions()
    s = kl_surrogate(pol, ref, comp, estimator=est, placement=pl)
    return torch.stack([torch.autograd.grad(s[i], pol.table, retain_graph=True)[0] for i in range(s.shape[0])])


@pytest.mark.parametrize("est, pl, wrong", [("k1", "reward", "local"), ("k3", "loss", "fwd_seq")])
def test_monte_carlo_gradient_matches_exact(est, pl, wrong):
    """Sampled on-policy gradient (N = 20000 completions) vs the exact expectation. Tolerance per
    coordinate: 5 standard errors, σ_j/√N with σ_j the exact per-sample std (by enumeration). With
    42 coordinates and a CLT-normal error, P(any > 5σ) ≈ 42 · 5.7e-7; the seed is fixed anyway. The
    same samples must be > 5 standard errors away from the plausible wrong answer somewhere, so the
    check discriminates."""
    space, pol, ref = _tree(T=3, seed=3)
    N = 20000
    comp = pol.sample(N // space.n_prompts, generator=torch.Generator().manual_seed(0))
    mc = _grad(kl_surrogate(pol, ref, comp, estimator=est, placement=pl) / (N // space.n_prompts), pol)
    g = _per_sequence_grads(pol, ref, est, pl)  # (P*K, P, S, V)
    w = pol.sequence_probs().detach().reshape(-1, 1, 1, 1)
    exact = (w * g).sum(0)
    # per-sample variance of the prompt-summed estimate: each prompt's samples are independent
    var = (w * (g - 0) ** 2).sum(0) - ((w * g).view(space.n_prompts, -1, *g.shape[1:]).sum(1) ** 2).sum(0)
    se = (var.clamp(min=0) / (N // space.n_prompts)).sqrt()
    torch.testing.assert_close(exact, expected_kl_gradient(pol, ref, estimator=est, placement=pl), **TIGHT)
    assert ((mc - exact).abs() <= 5 * se + 1e-12).all()
    wrong_target = _hand_local(pol, ref)[0] if wrong == "local" else _grad(sequence_kl(ref, pol), pol)
    assert ((mc - wrong_target).abs() > 5 * se).any()


# ---- sign: the KL term pulls toward π_ref --------------------------------------------------------------


def test_one_step_on_the_kl_term_reduces_the_kl():
    """θ ← θ - η β g with g the expected gradient of the penalty: the exact KL goes down (and goes up
    for the opposite step, so the check can fail). Categorical (T = 1): every pair whose gradient is
    ∇KL_rev; k3-loss lowers the *forward* KL. Tree (T = 3): the full-gradient choices."""
    beta, lr = 0.1, 0.5

    def kl_after(pol, ref, g, sign, fwd=False):
        moved = TabularPolicy(pol.space, pol.table.detach() - sign * lr * beta * g, trainable=False)
        return (sequence_kl(ref, moved) if fwd else sequence_kl(moved, ref)).sum().item()

    for T, pairs in [
        (1, [("k1", "reward"), ("k2", "loss"), ("k3", "loss_is"), ("exact", "loss"), ("k3", "loss")]),
        (3, [("k1", "reward")]),
    ]:
        space, pol, ref = _tree(T=T, seed=4)
        for est, pl in pairs:
            fwd = (est, pl) == ("k3", "loss")
            before = (sequence_kl(ref, pol) if fwd else sequence_kl(pol, ref)).sum().item()
            g = expected_kl_gradient(pol, ref, estimator=est, placement=pl)
            assert kl_after(pol, ref, g, +1, fwd) < before < kl_after(pol, ref, g, -1, fwd), (T, est, pl)
    space, pol, ref = _tree(T=3, seed=4)
    g = expected_kl_gradient(pol, ref, estimator="exact", placement="loss") + expected_kl_gradient(
        pol, ref, estimator="exact", placement="reward"
    )
    before = sequence_kl(pol, ref).sum().item()
    assert kl_after(pol, ref, g, +1) < before < kl_after(pol, ref, g, -1)


def test_kl_loss_term_is_the_penalty_not_the_objective():
    """kl_loss_term returns what is *added* to the loss: its value is the (positive) KL estimate, and
    k2's per-token gradient is lr · ∂logps, pointing away from π_ref (descending it reduces lr²)."""
    logps = torch.tensor([[-0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    ref_logps = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = kl_loss_term(logps, ref_logps, mask, estimator="k2").per_token
    assert out.tolist() == [[0.125, 0.0]]  # (0.5)²/2
    (g,) = torch.autograd.grad(out.sum(), logps)
    assert g.tolist() == [[0.5, 0.0]]


# ---- clamps --------------------------------------------------------------------------------------------


def test_clamps_report_the_clamped_fraction_and_zero_the_gradient():
    """lr = [[0, 25, -25, 1], [3, 30(masked), 0(masked), 0(masked)]]: 5 counted tokens.
    k3 with clamp_input=20: |25|, |-25| clamped -> 2/5; the masked 30 does not count.
    k3 with clamp_output=1: k3(0)=0, k3(25)=24.0, k3(-25)=e^25-26, k3(1)=e^-1=0.368, k3(3)=e^-3+2=2.0498
    -> 25, -25 and 3 clamped: 3/5. A clamped token gets zero gradient; the others get k3'(lr) = 1 - e^{-lr}."""
    lr = torch.tensor([[0.0, 25.0, -25.0, 1.0], [3.0, 30.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    logps = lr.clone().requires_grad_(True)
    ref_logps = torch.zeros_like(lr)
    out = kl_per_token(logps, ref_logps, mask, estimator="k3", clamp_input=20.0)
    assert out.clamped_frac.item() == pytest.approx(2 / 5)
    assert out.per_token[0, 1].item() == pytest.approx(math.expm1(-20.0) + 20.0, rel=1e-14)
    assert out.per_token[1, 1].item() == 0.0  # masked
    out = kl_per_token(logps, ref_logps, mask, estimator="k3", clamp_output=1.0)
    assert out.clamped_frac.item() == pytest.approx(3 / 5)
    assert out.per_token[0, :3].tolist() == [0.0, 1.0, 1.0] and out.per_token[1, 0].item() == 1.0
    (g,) = torch.autograd.grad(out.per_token.sum(), logps)
    assert g[0, 1] == 0 and g[0, 2] == 0 and g[1, 0] == 0
    assert g[0, 3].item() == pytest.approx(1 - math.exp(-1.0), rel=1e-14)
    none = kl_per_token(logps, ref_logps, mask, estimator="k1")
    assert none.clamped_frac.item() == 0.0


def test_reward_penalty_is_minus_beta_kl_detached_and_masked():
    kl = torch.tensor([[0.5, -0.25, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    rewards = kl_reward_penalty(kl, mask, beta=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.025, 0.0], abs=1e-8)  # fp32 input: 1e-8 ≈ fp32 ulp at 0.05
    assert not rewards.requires_grad  # θ sees it only through the policy gradient


def test_unknown_estimator_and_missing_logits_raise():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown estimator"):
        kl_per_token(x, x, m, estimator="k4")
    with pytest.raises(ValueError, match="logits"):
        kl_per_token(x, x, m, estimator="exact")
    assert set(ESTIMATORS) == set(ESTIMATOR_NAMES)


# ---- under sampling filters (docs/theory.md §3) ------------------------------------------------------------

# estimator -> phrases ESTIMATORS[...].under_filters must contain (fixed reference π^τ_ref, restricted one)
FILTER_TABLE = {
    "k1": ("unbiased for KL[π^{τ,F}_θ‖π^τ_ref] with the fixed reference", "unbiased for KL[π^{τ,F}_θ‖π^{τ,F}_ref]"),
    "k2": ("biased", "biased"),
    "k3": (
        "biased by -(reference mass outside F_t) per token with the fixed reference",
        "Unbiased for KL[π^{τ,F}_θ‖π^{τ,F}_ref] with the restricted reference",
    ),
    "exact": ("exact for KL[π^{τ,F}_θ‖π^τ_ref]", "minus the filter cost"),
}


def _filtered_expectations(pol_probs, ref_probs, *, top_k=0, top_p=1.0):
    """E_p[estimator] by enumeration over the kept tokens, through the shipped scorer (``engine.score_rows``
    on the sampler's filter ``apply_sampling_filters``): p = π_θ filtered by top-k/top-p; the reference
    fixed (``reference_filter="none"``, the default) and restricted. Also the filter cost -log m."""
    from tether.engine import score_rows
    from tether.modeling import CompletionBatch
    from tether.ops.logprobs import apply_sampling_filters

    V = len(pol_probs)
    x = torch.tensor(pol_probs, dtype=torch.float64).log().expand(V, 1, V)  # one row per token v: (V, 1, V)
    y = torch.tensor(ref_probs, dtype=torch.float64).log().expand(V, 1, V)  # π_ref, unfiltered (as Reference.logits)
    p_logits = apply_sampling_filters(x, top_k=top_k, top_p=top_p)
    kept = p_logits[0, 0] > float("-inf")  # (V,) F
    w = torch.softmax(p_logits[0, 0], -1)  # p(v), 0 outside F
    ids = torch.stack([torch.zeros(V, dtype=torch.long), torch.arange(V)], 1)  # (V, 2): prompt token 0, then v
    b = CompletionBatch(ids, torch.ones_like(ids), kept[:, None].clone(), 1)  # tokens outside F are never sampled
    out = {"F": kept.nonzero().flatten().tolist()}
    for mode in ("none", "restricted"):
        row = score_rows(p_logits, y, b, estimators=ESTIMATOR_NAMES, reference_filter=mode)
        for est in ESTIMATOR_NAMES:
            out[mode, est] = float((w * row[f"kl/{est}"][:, 0]).sum())
        out["cost"] = float(row["filter_cost"][kept.nonzero()[0, 0], 0])
        out["kl/ref"] = float(row["kl_exact"][kept.nonzero()[0, 0], 0])  # what kl/ref and tether kl report
    return out


def test_values_under_sampling_filters():
    """docs/theory.md §3 worked example, exact expectations. π_θ = (0.5, 0.3, 0.2), π_ref = (0.2, 0.3, 0.5),
    τ = 1, top-k = 2: F = {a, b}, p = (0.625, 0.375), q = π_ref restricted = (0.4, 0.6),
    KL[p‖q] = 0.625 ln(0.625/0.4) + 0.375 ln(0.375/0.6) = 0.10268.
    Fixed reference q̃ = π_ref (tether's), m = q̃(F) = 0.5: E[k1] = exact = KL[p‖q̃] = KL[p‖q] - ln m = 0.79583,
    and E[k3] = KL[p‖q̃] - (1 - m) = 0.29583: k3 undercounts by the reference mass outside F.
    Restricted reference q: E[k1] = E[k3] = exact = KL[p‖q]; E[k2] = Σ p lr²/2 = 0.10366 (biased, +1%).
    A model against itself (π_ref = π_θ, same filter, m = 0.8): fixed E[k1] = exact = -ln 0.8 = 0.22314 =
    the filter cost, E[k3] = 0.22314 - 0.2 = 0.02314; restricted 0 for all four."""
    p, q = (0.625, 0.375), (0.4, 0.6)
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    k2 = sum(a * math.log(a / b) ** 2 / 2 for a, b in zip(p, q))
    got = _filtered_expectations((0.5, 0.3, 0.2), (0.2, 0.3, 0.5), top_k=2)
    want = {
        ("restricted", "k1"): kl,
        ("restricted", "k3"): kl,
        ("restricted", "exact"): kl,
        ("restricted", "k2"): k2,
        ("none", "k1"): kl - math.log(0.5),
        ("none", "exact"): kl - math.log(0.5),
        ("none", "k3"): kl - math.log(0.5) - 0.5,
        "cost": -math.log(0.5),
    }
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-12, abs=1e-14), key
    assert k2 > kl * 1.005  # k2 stays biased
    self_ = _filtered_expectations((0.5, 0.3, 0.2), (0.5, 0.3, 0.2), top_k=2)
    for est in ESTIMATOR_NAMES:
        assert self_["restricted", est] == 0.0, est  # exactly: identical restricted distributions
    assert self_["none", "k1"] == pytest.approx(-math.log(0.8), rel=1e-12)
    assert self_["none", "exact"] == pytest.approx(-math.log(0.8), rel=1e-12)
    assert self_["cost"] == pytest.approx(-math.log(0.8), rel=1e-12)
    assert self_["none", "k3"] == pytest.approx(-math.log(0.8) - 0.2, rel=1e-12)
    for est, (fixed, restricted) in FILTER_TABLE.items():
        assert fixed in ESTIMATORS[est].under_filters and restricted in ESTIMATORS[est].under_filters, est


def test_restricted_reference_hides_a_policy_that_left_the_reference_top_k():
    """docs/theory.md §3: top-k = 2, π_ref = (0.96, 0.02, 0.02), π_θ = (0.001, 0.4995, 0.4995). The policy's
    set is F = {b, c}, p = (1/2, 1/2); the restricted reference is (1/2, 1/2) too, so its KL is 0 with
    every estimator although the policy has left the reference's top token; the fixed reference gives
    KL[p‖π_ref] = 2·(1/2)·ln((1/2)/0.02) = ln 25 = 3.2189 nats = the filter cost -ln(0.04). With top-k = 1
    the restricted KL is 0 for every policy (p and the restricted reference are the same point mass)."""
    got = _filtered_expectations((0.001, 0.4995, 0.4995), (0.96, 0.02, 0.02), top_k=2)
    assert got["F"] == [1, 2]
    for est in ESTIMATOR_NAMES:
        assert got["restricted", est] == pytest.approx(0.0, abs=1e-15), est
    for est in ("k1", "exact"):
        assert got["none", est] == pytest.approx(math.log(25), rel=1e-12), est
    assert got["kl/ref"] == pytest.approx(math.log(25), rel=1e-12) and got["cost"] == pytest.approx(
        -math.log(0.04), rel=1e-12
    )
    assert round(got["kl/ref"], 2) == 3.22
    for pol in ((0.001, 0.5, 0.499), (0.2, 0.5, 0.3), (0.9, 0.06, 0.04)):  # no ties: top-k keeps ties
        one = _filtered_expectations(pol, (0.96, 0.02, 0.02), top_k=1)
        assert all(one["restricted", est] == 0.0 for est in ESTIMATOR_NAMES), pol
        a = max(range(3), key=lambda i: pol[i])
        assert one["none", "exact"] == pytest.approx(-math.log((0.96, 0.02, 0.02)[a]), rel=1e-12), pol


def test_restricted_reference_drops_to_zero_at_the_top_p_threshold():
    """docs/theory.md §3: top-p = 0.9, π_ref = (0.05, 0.6, 0.35). At π_θ = (0.899, 0.051, 0.050) the nucleus is
    {a, b}: p = (0.899, 0.051)/0.95, restricted reference (0.05, 0.6)/0.65, restricted KL
    0.94632·ln(0.94632/0.076923) + 0.05368·ln(0.05368/0.923077) = 2.222; to the fixed reference 2.653.
    At π_θ = (0.901, 0.050, 0.049) the nucleus is {a}: restricted KL 0.000 with every estimator (no penalty
    gradient at this state from then on), fixed -ln 0.05 = 2.996. (The second and third tokens are unequal
    on purpose: the sort breaks a tie either way.)"""
    ref = (0.05, 0.6, 0.35)
    below = _filtered_expectations((0.899, 0.051, 0.050), ref, top_p=0.9)
    p = (0.899 / 0.95, 0.051 / 0.95)
    restricted = p[0] * math.log(p[0] / (0.05 / 0.65)) + p[1] * math.log(p[1] / (0.6 / 0.65))
    fixed = p[0] * math.log(p[0] / 0.05) + p[1] * math.log(p[1] / 0.6)
    assert below["F"] == [0, 1]
    assert below["restricted", "exact"] == pytest.approx(restricted, rel=1e-12) and round(restricted, 2) == 2.22
    assert below["kl/ref"] == pytest.approx(fixed, rel=1e-12) and round(fixed, 2) == 2.65
    above = _filtered_expectations((0.901, 0.050, 0.049), ref, top_p=0.9)
    assert above["F"] == [0]
    assert all(above["restricted", est] == 0.0 for est in ESTIMATOR_NAMES)
    assert above["kl/ref"] == pytest.approx(-math.log(0.05), rel=1e-12) and round(above["kl/ref"], 2) == 3.00


# ---- Schulman's blog check (docs/theory.md §2) -----------------------------------------------------------------


def test_gaussian_blog_numbers():
    """q = N(0, 1) samples, p = N(μ, 1), μ = 1, true KL[q‖p] = μ²/2 = 0.5. In the repo's convention
    π_θ = q, π_ref = p: lr = log q(x) - log p(x) = μ²/2 - μx. Closed forms (x ~ N(0, 1)):
    k1: mean μ²/2, std μ -> std/true = 2.
    k2: Z = lr ~ N(μ²/2, μ²); E[Z²/2] = (μ² + μ⁴/4)/2 = 0.625 -> bias/true 0.25;
        Var(Z²/2) = (4m²s² + 2s⁴)/4 = (1 + 2)/4 -> std/true = sqrt(3) = 1.732.
    k3: Var(r - log r) = e^{μ²} - 1 - μ² = e - 2 -> std/true = 2 sqrt(e - 2) = 1.695.
    Numerically integrated (trapezoid, x in [-12, 12], 240001 points: the integrand's tails beyond
    12σ are < e^{-60}, and the rule is spectrally accurate for Gaussians), checked against the closed
    forms to 1e-9 and against docs/theory.md's rounded numbers to their last digit (1.73: ±0.005; 'about
    1.7': ±0.05)."""
    mu = 1.0
    x = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    w = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    lr = mu**2 / 2 - mu * x
    true = mu**2 / 2

    def mean_std(v):
        m = torch.trapezoid(w * v, x)
        return m.item(), torch.sqrt(torch.trapezoid(w * (v - m) ** 2, x)).item()

    m1, s1 = mean_std(k1(lr))
    m2, s2 = mean_std(k2(lr))
    m3, s3 = mean_std(k3(lr))
    assert torch.trapezoid(w, x).item() == pytest.approx(1.0, abs=1e-12)
    assert m1 == pytest.approx(true, abs=1e-9) and m3 == pytest.approx(true, abs=1e-9)
    assert s1 / true == pytest.approx(2.0, abs=1e-9)
    assert (m2 - true) / true == pytest.approx(0.25, abs=1e-9)
    assert s2 / true == pytest.approx(math.sqrt(3), abs=1e-9)
    assert s3 / true == pytest.approx(math.sqrt(math.e - 1 - mu**2) / true, abs=1e-9)
    assert s2 / true == pytest.approx(1.73, abs=0.005)  # docs/theory.md, 3 significant digits
    assert s3 / true == pytest.approx(1.7, abs=0.05)  # docs/theory.md, "about 1.7"


# ---- per token versus per sequence: exact is not always the lowest-variance sequence sum (docs/theory.md §2) ----


def _two_step_sums(bd: float):
    """Sequence sums of k1 and exact over the tree {a, b} x {c, d} (tokens 0-3), through the shipped
    ``kl_per_token`` / ``seq_sum``. π_ref is uniform at each step; π_θ puts (1 - bd)/3 on ac, ad, bc and
    ``bd`` on bd. Returns (probabilities, k1 sums, exact sums) over the sequences π_θ can emit."""
    seqs = [(0, 2), (0, 3), (1, 2), (1, 3)]
    mass = torch.tensor([(1 - bd) / 3] * 3 + [bd], dtype=torch.float64)
    keep = mass > 0
    pa = mass[:2].sum()
    first = torch.tensor([pa, 1 - pa, 0.0, 0.0], dtype=torch.float64)
    after = {0: mass[:2] / mass[:2].sum(), 1: mass[2:] / mass[2:].sum()}
    neg = float("-inf")
    logits = torch.full((4, 2, 4), neg, dtype=torch.float64)  # (sequence, position, token)
    ref_logits = torch.full((4, 2, 4), neg, dtype=torch.float64)
    tokens = torch.tensor(seqs)
    for i, (x, _) in enumerate(seqs):
        logits[i, 0, :2] = first[:2].log()
        logits[i, 1, 2:] = after[x].log()
        ref_logits[i, 0, :2] = 0.0  # uniform on {a, b}
        ref_logits[i, 1, 2:] = 0.0  # uniform on {c, d}
    mask = torch.ones(4, 2, dtype=torch.bool)
    logps, ref_logps = selective_logps(logits, tokens), selective_logps(ref_logits, tokens)
    sums = {
        est: seq_sum(
            kl_per_token(logps, ref_logps, mask, estimator=est, logits=logits, ref_logits=ref_logits).per_token, mask
        )
        for est in ("k1", "exact")
    }
    return mass[keep], sums["k1"][keep], sums["exact"][keep]


def _var(w, x):
    m = (w * x).sum()
    return float((w * (x - m) ** 2).sum())


def test_exact_is_lowest_variance_per_token_not_per_sequence():
    """π_ref uniform on {a, b} x {c, d}; π_θ = 1/3 on ac, ad, bc. Every k1 sum is log((1/3)/(1/4)) = log(4/3):
    variance 0. The exact sum is KL(root) + KL(state after the first token): 0 after a, log 2 after b
    (π_θ(·|b) = δ_c), so it is KL(root) + log 2 with probability 1/3: variance (log 2)²·(1/3)(2/3) = 0.1068.
    Both are unbiased for the sequence KL log(4/3). With 1e-3 on bd (the rest shared equally), measured
    by enumeration: k1 0.034, exact 0.101. Per token, at a fixed state, Var(exact) = 0 ≤ Var(k1)
    (Rao-Blackwell); the sequence sum is another matter: k1's per-token terms can cancel along a path."""
    w, k1_sum, exact_sum = _two_step_sums(0.0)
    assert k1_sum.tolist() == pytest.approx([math.log(4 / 3)] * 3, abs=1e-15)
    assert _var(w, k1_sum) == pytest.approx(0.0, abs=1e-30)
    assert _var(w, exact_sum) == pytest.approx(math.log(2) ** 2 * 2 / 9, rel=1e-12)
    assert round(_var(w, exact_sum), 3) == 0.107
    assert float((w * exact_sum).sum()) == pytest.approx(math.log(4 / 3), rel=1e-12)  # both unbiased
    w, k1_sum, exact_sum = _two_step_sums(1e-3)
    v1, ve = _var(w, k1_sum), _var(w, exact_sum)
    assert (round(v1, 3), round(ve, 3)) == (0.034, 0.101)
    assert float((w * k1_sum).sum()) == pytest.approx(float((w * exact_sum).sum()), rel=1e-12)
