"""The tabular oracle: its enumeration and policy interface, the exact optimum computed two ways
(docs/theory.md §5), exact KLs and objectives, the forward-KL optimum that "k3 in the loss" targets
(docs/theory.md §3), and exact best-of-n (docs/theory.md §7)."""

import itertools
import math

import pytest
import torch

from tether.oracle import (
    TabularPolicy,
    TabularSpace,
    best_of_n_kl,
    best_of_n_kl_bound,
    best_of_n_probs,
    count_rewards,
    expected_kl_gradient,
    expected_reward,
    forward_kl_optimum,
    forward_kl_optimum_sequence,
    forward_objective,
    length_rewards,
    log_partition,
    make_problem,
    objective,
    optimal_policy,
    random_rewards,
    reward_of,
    sequence_kl,
    soft_values,
    statewise_kl,
    tilted_sequence_probs,
)

EXACT = 1e-10  # the brief's agreement level for two exact float64 computations (actual: ~1e-15)
F64 = torch.float64


def _grad(value, pol):
    (g,) = torch.autograd.grad(value.sum(), pol.table)
    return g


# ---- the space and the policy interface ----------------------------------------------------------------


def test_enumeration_by_hand():
    """V = 3 (eos = 0, words 1, 2), T = 2: prefixes (), (1,), (2,); complete sequences: (0,), then
    each one-word prefix followed by 0, 1 or 2: 1 + 2·3 = 7. In general S = Σ_{k<T} (V-1)^k and
    K = S + (V-1)^T (V=6, T=5: S = 781, K = 3906)."""
    sp = TabularSpace(3, 2)
    assert sp.prefixes == [(), (1,), (2,)]
    assert sp.sequences == [(0,), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert sp.seq_tokens.tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    assert sp.seq_mask[:2].tolist() == [[True, False], [True, True]]
    big = TabularSpace(6, 5, eos=3)
    assert (big.n_prefixes, big.n_sequences) == (781, 3906)
    for bad in [dict(vocab_size=1, horizon=2), dict(vocab_size=3, horizon=0), dict(vocab_size=3, horizon=2, eos=3)]:
        with pytest.raises(ValueError):
            TabularSpace(**bad)
    with pytest.raises(ValueError, match="enumerates at most"):
        TabularSpace(12, 6)


def test_masks_prefixes_and_sequence_ids():
    sp = TabularSpace(3, 3)
    tokens = torch.tensor([[1, 0, 0], [0, 0, 0], [2, 1, 2], [2, 2, 0]])
    assert sp.completion_mask(tokens).tolist() == [
        [True, True, False],
        [True, False, False],
        [True, True, True],
        [True, True, True],
    ]
    pid = sp.prefix_ids(tokens)
    assert [[sp.prefixes[i] for i in row] for row in pid.tolist()][2] == [(), (2,), (2, 1)]
    ids = sp.sequence_ids(tokens)
    assert [sp.sequences[i] for i in ids.tolist()] == [(1, 0), (0,), (2, 1, 2), (2, 2, 0)]
    with pytest.raises(ValueError, match="not complete"):
        TabularSpace(3, 3).sequence_ids(torch.tensor([[1, 1]]))


def test_policy_interface_is_consistent():
    """logits (B, T, V) at (x, y_<t); logps = log_softmax gathered; Σ_t logps over every sequence =
    sequence_log_probs, which sums to 1; state_probs = mass of the sequences through each prefix."""
    prob = make_problem(4, 3, n_prompts=3, seed=5)
    pol = TabularPolicy.random(prob.space, seed=9, scale=2.0)
    sp, comp = prob.space, prob.space.all_completions()
    logits = pol.logits(comp.prompt_ids, comp.tokens)
    assert logits.shape == (3 * sp.n_sequences, 3, 4)
    lp = pol.log_probs()
    b, t = 40, 2  # any row/position: the logits are the table row of that prompt and prefix
    assert torch.equal(logits[b, t], pol.table[comp.prompt_ids[b], sp.prefix_ids(comp.tokens)[b, t]])
    logps = pol.logps(comp.prompt_ids, comp.tokens, comp.mask)
    want = lp[comp.prompt_ids[:, None], sp.prefix_ids(comp.tokens), comp.tokens].masked_fill(~comp.mask, 0)
    torch.testing.assert_close(logps, want, rtol=1e-14, atol=1e-14)  # two fp64 log-softmax routes
    seq = pol.sequence_log_probs()
    torch.testing.assert_close(logps.sum(-1).view(3, -1), seq, rtol=0, atol=1e-14)
    torch.testing.assert_close(seq.exp().sum(-1), torch.ones(3, dtype=F64), rtol=0, atol=1e-14)
    through = torch.tensor(
        [[float(y[: len(s)] == s and len(y) > len(s)) for y in sp.sequences] for s in sp.prefixes], dtype=F64
    )  # (S, K): does sequence y pass through prefix s
    torch.testing.assert_close(pol.state_probs(), seq.exp() @ through.T, rtol=0, atol=1e-14)


def test_sampling_matches_exact_probabilities():
    """40000 samples per prompt: each sequence's frequency is within 5 standard errors
    sqrt(p(1-p)/N) of its exact probability (binomial; 2·15 cells, fixed seed)."""
    prob = make_problem(3, 3, n_prompts=2, seed=1)
    pol = TabularPolicy.random(prob.space, seed=2)
    N = 40000
    s = pol.sample(N, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.mask, prob.space.completion_mask(s.tokens))
    ids = prob.space.sequence_ids(s.tokens, s.mask)
    K = prob.space.n_sequences
    freq = torch.bincount(s.prompt_ids * K + ids, minlength=2 * K).to(F64).view(2, K) / N
    p = pol.sequence_probs().detach()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-12).all()
    one = pol.sample(3, generator=torch.Generator().manual_seed(0), prompt_ids=torch.tensor([1, 1, 0]))
    assert one.prompt_ids.tolist() == [1, 1, 0] and one.tokens.shape == (3, 3)


def test_constructors():
    sp = TabularSpace(3, 2, n_prompts=2)
    a, b = (
        TabularPolicy.dirichlet(sp, seed=3, concentration=0.3),
        TabularPolicy.dirichlet(sp, seed=3, concentration=0.3),
    )
    assert torch.equal(a.table, b.table)
    torch.testing.assert_close(TabularPolicy.from_probs(sp, a.probs().detach()).probs(), a.probs(), rtol=0, atol=1e-15)
    seq = TabularPolicy.random(sp, seed=4).sequence_probs().detach()
    torch.testing.assert_close(TabularPolicy.from_sequence_probs(sp, seq).sequence_probs(), seq, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        TabularPolicy.from_probs(sp, torch.full((2, sp.n_prefixes, 3), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="logit table"):
        TabularPolicy(sp, torch.zeros(1, 1, 3))
    assert not TabularPolicy.random(sp, seed=0, trainable=False).table.requires_grad


def test_rewards_by_hand():
    """V = 3, T = 2, sequences (0,), (1,0), (1,1), (1,2), (2,0), (2,1), (2,2).
    count of token 1: 0, 1, 2, 1, 0, 1, 0. length (non-eos tokens): 0, 1, 2, 2, 1, 2, 2."""
    sp = TabularSpace(3, 2, n_prompts=2)
    assert count_rewards(sp, 1)[1].tolist() == [0, 1, 2, 1, 0, 1, 0]
    assert length_rewards(sp, per_token=0.5)[0].tolist() == [0, 0.5, 1, 1, 0.5, 1, 1]
    r = random_rewards(sp, seed=0)
    assert r.shape == (2, 7) and torch.equal(r, random_rewards(sp, seed=0))
    comp = sp.all_completions()
    assert torch.equal(reward_of(r, sp, comp), r.reshape(-1))
    with pytest.raises(ValueError, match="unknown reward"):
        make_problem(reward="bogus")


# ---- the reverse-KL optimum ----------------------------------------------------------------------------


def test_optimum_v2_t1_by_hand():
    """V = 2 (eos = 0, word 1), T = 1: the sequences are (0,) and (1,). π_ref = (1/4, 3/4), r = (0, 1),
    β = 1/2: π*(1) = (3/4)e² / (1/4 + (3/4)e²) = 0.956836..., Z = 1/4 + (3/4)e² = 5.79179...,
    max J = β log Z = 0.878220..."""
    sp = TabularSpace(2, 1)
    ref = TabularPolicy.from_probs(sp, torch.tensor([[[0.25, 0.75]]], dtype=F64), trainable=False)
    r = torch.tensor([[0.0, 1.0]], dtype=F64)
    Z = 0.25 + 0.75 * math.exp(2.0)
    want = torch.tensor([[0.25 / Z, 0.75 * math.exp(2.0) / Z]], dtype=F64)
    assert want[0, 1].item() == pytest.approx(0.956836, abs=1e-6)
    torch.testing.assert_close(tilted_sequence_probs(ref, r, 0.5), want, rtol=1e-14, atol=0)
    torch.testing.assert_close(optimal_policy(ref, r, 0.5).sequence_probs(), want, rtol=1e-14, atol=0)
    assert log_partition(ref, r, 0.5).item() == pytest.approx(math.log(Z), rel=1e-14)
    assert soft_values(ref, r, 0.5)[0, 0].item() == pytest.approx(0.5 * math.log(Z), rel=1e-14)
    assert 0.5 * math.log(Z) == pytest.approx(0.878220, abs=1e-6)


PROBLEMS = [  # (V, T, seed, reward, β): vocabularies 2-6, horizons 1-5, three reward kinds
    (2, 1, 0, "random", 0.5),
    (2, 5, 1, "count", 0.3),
    (3, 3, 2, "random", 0.1),
    (4, 2, 3, "length", 1.0),
    (5, 4, 4, "random", 2.0),
    (6, 3, 5, "count", 0.05),
    (6, 5, 6, "random", 0.7),
]


@pytest.mark.parametrize("V, T, seed, reward, beta", PROBLEMS)
def test_tilt_and_soft_bellman_agree(V, T, seed, reward, beta):
    """Two independent computations of π* (enumeration vs backup on the tree) agree to 1e-10 in
    probability and log-probability; V(root) = β log Z; J(π*) = β log Z; and for any π the gap
    β log Z - J(π) = β KL[π‖π*] (docs/theory.md §5)."""
    prob = make_problem(V, T, n_prompts=2, seed=seed, reward=reward, eos=seed % V)
    ref, r = prob.ref, prob.rewards
    tilt = tilted_sequence_probs(ref, r, beta)
    star = optimal_policy(ref, r, beta)
    assert (star.sequence_probs() - tilt).abs().max() < EXACT
    assert (star.sequence_log_probs() - tilt.log()).abs().max() < EXACT
    logZ = log_partition(ref, r, beta)
    assert (soft_values(ref, r, beta)[:, 0] - beta * logZ).abs().max() < EXACT
    assert (objective(star, ref, r, beta) - beta * logZ).abs().max() < EXACT
    pi = TabularPolicy.random(prob.space, seed=seed + 50)
    gap = beta * logZ - objective(pi, ref, r, beta)
    assert (gap - beta * sequence_kl(pi, star)).abs().max() < EXACT
    assert (gap > 0).all()


def test_optimum_is_a_maximum():
    """∇J(π*) = 0 and J(π*) ≥ J(π* perturbed) for random perturbations of its logits."""
    prob = make_problem(3, 3, seed=7)
    star = optimal_policy(prob.ref, prob.rewards, 0.3)
    trainable = TabularPolicy(prob.space, star.table.detach())
    assert _grad(objective(trainable, prob.ref, prob.rewards, 0.3), trainable).abs().max() < 1e-12
    best = objective(star, prob.ref, prob.rewards, 0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = TabularPolicy(prob.space, star.table + 0.1 * torch.randn(star.table.shape, generator=g, dtype=F64))
        assert (objective(noisy, prob.ref, prob.rewards, 0.3) < best).all()


def test_length_reward_invites_length_hacking():
    """r = number of non-eos tokens: π* = π_ref·e^{len/β}/Z shifts mass to long sequences, more so
    as β falls (E_π*[len] grows toward T = 4)."""
    prob = make_problem(3, 4, seed=8, reward="length")
    lengths = length_rewards(prob.space)
    e_ref = expected_reward(prob.ref, lengths)
    e = [expected_reward(optimal_policy(prob.ref, prob.rewards, b), lengths) for b in (2.0, 0.5, 0.1)]
    assert (e_ref < e[0]).all() and (e[0] < e[1]).all() and (e[1] < e[2]).all()
    assert (e[2] > 3.9).all()


# ---- exact KLs ---------------------------------------------------------------------------------------------


def test_sequence_kl_chain_rule_and_basics():
    """KL over sequences = Σ_s d_p(s) KL[p(·|s)‖q(·|s)] (chain rule); KL[p‖p] = 0; KL ≥ 0; both directions."""
    sp = TabularSpace(4, 3, n_prompts=2)
    p, q = TabularPolicy.random(sp, seed=1), TabularPolicy.random(sp, seed=2)
    for a, b in [(p, q), (q, p)]:
        assert (sequence_kl(a, b) - statewise_kl(a, b)).abs().max() < 1e-12
        assert (sequence_kl(a, b) > 0).all()
    assert sequence_kl(p, p.frozen_copy()).abs().max() < 1e-15
    # hand: T = 1, p = (1/2, 1/2), q = (1/4, 3/4): KL[p‖q] = ½ log(4/3), KL[q‖p] = ¼ log(1/2) + ¾ log(3/2)
    one = TabularSpace(2, 1)
    p1 = TabularPolicy.from_probs(one, torch.tensor([[[0.5, 0.5]]], dtype=F64))
    q1 = TabularPolicy.from_probs(one, torch.tensor([[[0.25, 0.75]]], dtype=F64))
    assert sequence_kl(p1, q1).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)
    assert sequence_kl(q1, p1).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-14)


# ---- the forward-KL optimum ------------------------------------------------------------------------------


def test_forward_optimum_v2_t1_by_hand():
    """π_ref = (1/4, 3/4), r = (0, 1), β = 1/2: π(y) = β π_ref(y)/(λ - r(y)) gives π0 = 0.125/λ,
    π1 = 0.375/(λ - 1); Σ = 1 ⇔ λ² - 1.5λ + 0.125 = 0 ⇔ λ = (1.5 + √1.75)/2 = 1.411437...
    (the root above max r = 1), π0 = 0.088562..., π1 = 0.911437... (= 1 - π0)."""
    sp = TabularSpace(2, 1)
    ref = TabularPolicy.from_probs(sp, torch.tensor([[[0.25, 0.75]]], dtype=F64), trainable=False)
    r = torch.tensor([[0.0, 1.0]], dtype=F64)
    lam = (1.5 + math.sqrt(1.75)) / 2
    want = torch.tensor([[0.125 / lam, 0.375 / (lam - 1)]], dtype=F64)
    assert want.sum().item() == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(forward_kl_optimum_sequence(ref, r, 0.5), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(forward_kl_optimum(ref, r, 0.5).sequence_probs(), want, rtol=1e-13, atol=0)


def _k3_loss_residual(pol, prob, beta):
    """Expected on-policy update of [reward through the score function] - β·[k3 in the loss], exact:
    ∇E_π[r] - β E[∇ Σ_t k3_t]."""
    return _grad(expected_reward(pol, prob.rewards), pol) - beta * expected_kl_gradient(
        pol, prob.ref, estimator="k3", placement="loss"
    )


@pytest.mark.parametrize("V, T, seed, reward, beta", PROBLEMS[:5])
def test_forward_optimum_sequence_level_is_the_argmax_of_j_fwd(V, T, seed, reward, beta):
    """At π = β π_ref/(λ - r): sums to 1, ∇J_fwd = 0 in any parameterisation (here the tabular
    autoregressive one), and random perturbations lower J_fwd = E[r] - β KL[π_ref‖π]."""
    prob = make_problem(V, T, n_prompts=2, seed=seed, reward=reward)
    seq = forward_kl_optimum_sequence(prob.ref, prob.rewards, beta)
    assert (seq.sum(-1) - 1).abs().max() < 1e-14
    pol = TabularPolicy.from_sequence_probs(prob.space, seq)
    assert _grad(forward_objective(pol, prob.ref, prob.rewards, beta), pol).abs().max() < EXACT
    best = forward_objective(pol, prob.ref, prob.rewards, beta)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        noisy = TabularPolicy(prob.space, pol.table + 0.05 * torch.randn(pol.table.shape, generator=g, dtype=F64))
        assert (forward_objective(noisy, prob.ref, prob.rewards, beta) < best).all()


@pytest.mark.parametrize("V, T, seed, reward, beta", PROBLEMS[:5])
def test_forward_optimum_token_level_is_the_k3_loss_fixed_point(V, T, seed, reward, beta):
    """The expected on-policy update with k3 in the loss vanishes at ``forward_kl_optimum`` (to 1e-10,
    through the project's own k3 code). For T > 1 that point is not the sequence-level argmax of J_fwd
    (the update does not vanish there, and J_fwd's gradient does not vanish at the token-level point);
    for T = 1 they are the same distribution."""
    prob = make_problem(V, T, n_prompts=2, seed=seed, reward=reward)
    tok = TabularPolicy(prob.space, forward_kl_optimum(prob.ref, prob.rewards, beta).table.detach())
    assert _k3_loss_residual(tok, prob, beta).abs().max() < EXACT
    seq = forward_kl_optimum_sequence(prob.ref, prob.rewards, beta)
    seq_pol = TabularPolicy.from_sequence_probs(prob.space, seq)
    diff = (tok.sequence_probs() - seq).abs().max()
    if T == 1:
        assert diff < EXACT
    else:
        assert diff > 1e-3
        assert _k3_loss_residual(seq_pol, prob, beta).abs().max() > 1e-3
        assert _grad(forward_objective(tok, prob.ref, prob.rewards, beta), tok).abs().max() > 1e-3


def test_forward_and_reverse_optima_differ():
    """Forward KL is mass-covering: the forward optimum keeps more mass on low-reward sequences than
    the reverse one (hyperbolic, not exponential, tilt), at the same β."""
    prob = make_problem(3, 2, seed=3)
    rev = tilted_sequence_probs(prob.ref, prob.rewards, 0.2)
    fwd = forward_kl_optimum_sequence(prob.ref, prob.rewards, 0.2)
    worst = prob.rewards.argmin(-1, keepdim=True)
    assert (fwd.gather(-1, worst) > rev.gather(-1, worst)).all()


@pytest.mark.slow
def test_k3_loss_dynamics_converge_to_the_token_level_target():
    """Exact on-policy gradient ascent (reward through the score function, β·k3 in the loss), from
    π_ref: converges to ``forward_kl_optimum`` (max |Δ log π| < 1e-3 after 1000 steps; the rate is
    linear, ~1e-2 per 100 steps at step size 5), not to the sequence-level argmax."""
    prob = make_problem(3, 3, seed=1)
    beta = 0.5
    target = forward_kl_optimum(prob.ref, prob.rewards, beta).log_probs()
    seq_target = (
        TabularPolicy.from_sequence_probs(prob.space, forward_kl_optimum_sequence(prob.ref, prob.rewards, beta))
        .log_probs()
        .detach()
    )
    pol = TabularPolicy(prob.space, prob.ref.table.detach())
    for _ in range(1000):
        g = _k3_loss_residual(pol, prob, beta)
        with torch.no_grad():
            pol.table += 5.0 * g
    assert (pol.log_probs() - target).abs().max() < 1e-3
    assert (pol.log_probs() - seq_target).abs().max() > 0.1


# ---- best-of-n -----------------------------------------------------------------------------------------------


def test_best_of_n_by_hand():
    """π_ref = (1/2, 1/2), r = (0, 1), n = 2: the best is outcome 1 unless both draws are 0:
    π_bon = (1/4, 3/4); KL = ¼ log(1/2) + ¾ log(3/2) = 0.130812... < log 2 - 1/2 = 0.193147..."""
    p, r = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    torch.testing.assert_close(best_of_n_probs(r, p, n=2), torch.tensor([0.25, 0.75], dtype=F64), rtol=1e-15, atol=0)
    kl = best_of_n_kl(r, p, n=2).item()
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-14)
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5, rel=1e-15)
    assert kl < best_of_n_kl_bound(2)
    assert best_of_n_kl_bound(1) == 0.0 and best_of_n_kl(r, p, n=1).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_best_of_n_matches_brute_force_with_ties(n):
    """All K^n ordered draws enumerated, the kept one uniform among the tied best draws."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)
    r = torch.tensor([1.0, 2.0, 2.0, 0.0, 1.0], dtype=F64)  # two ties
    brute = torch.zeros(5, dtype=F64)
    for draw in itertools.product(range(5), repeat=n):
        prob = math.prod(p[i].item() for i in draw)
        top = max(r[i].item() for i in draw)
        best = [i for i in draw if r[i].item() == top]
        for i in best:
            brute[i] += prob / len(best)
    torch.testing.assert_close(best_of_n_probs(r, p, n=n), brute, rtol=1e-13, atol=1e-15)


def test_best_of_n_kl_bound_is_an_upper_bound_tight_without_atoms():
    """Beirami et al. 2024: KL[π_bon‖π_ref] ≤ log n - (n-1)/n, with equality only when the reward has
    no atoms. On a discrete problem it is strict for n ≥ 2 (even with all outcomes distinct), and the
    gap closes as the largest atom vanishes: uniform over M distinct outcomes, gap → 0 (~1/M²)."""
    prob = make_problem(4, 3, n_prompts=3, seed=2)
    ref_p = prob.ref.sequence_probs().detach()
    for rewards in (prob.rewards, count_rewards(prob.space, 1)):  # distinct, then heavily tied
        for n in (2, 4, 16, 64):
            q = best_of_n_probs(rewards, ref_p, n=n)
            assert (q.sum(-1) - 1).abs().max() < 1e-13
            kl = best_of_n_kl(rewards, ref_p, n=n)
            assert (kl < best_of_n_kl_bound(n)).all()
    for n in (2, 8):
        gaps = []
        for M in (10, 100, 1000):
            u = torch.full((M,), 1.0 / M, dtype=F64)
            gaps.append(best_of_n_kl_bound(n) - best_of_n_kl(torch.arange(M, dtype=F64), u, n=n).item())
        assert gaps[0] > gaps[1] > gaps[2] > 0
        assert gaps[2] < 1e-5
    const = torch.zeros(5, dtype=F64)  # all tied: best-of-n is π_ref itself
    assert best_of_n_kl(const, torch.full((5,), 0.2, dtype=F64), n=8).item() == pytest.approx(0.0, abs=1e-15)


def test_best_of_n_reward_grows_with_n():
    prob = make_problem(3, 3, seed=4)
    p = prob.ref.sequence_probs().detach()
    e = [(best_of_n_probs(prob.rewards, p, n=n) * prob.rewards).sum(-1) for n in (1, 2, 4, 8)]
    assert all((a < b).all() for a, b in zip(e, e[1:]))
    torch.testing.assert_close(e[0], (p * prob.rewards).sum(-1), rtol=1e-14, atol=0)
