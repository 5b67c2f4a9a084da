"""``tether certify``: the whole certification suite (every KL-regularised method against the exact
target its theory predicts), its command line, its power to catch a broken method, and the targets
it certifies against (tether.oracle.certify_targets) checked against independent derivations."""

import json
import math

import pytest
import torch

from tether.commands import certify as command
from tether.ops.policy import group_advantages
from tether.ops.preference import LOSS_TYPES
from tether.oracle import (
    certify,
    forward_kl_optimum,
    forward_kl_optimum_sequence,
    make_problem,
    optimal_policy,
    sequence_kl,
    tilted_sequence_probs,
)
from tether.oracle.certify_targets import (
    beta_for_kl,
    bt_preferences,
    cdpo_optimum_sequence,
    f_optimum_sequence,
    group_advantage_table,
    grpo_fixed_point,
    ipo_optimum_sequence,
    local_kl_optimum,
    optimum_kl,
)

EXACT = 1e-10  # two exact float64 computations of the same quantity (actual agreement ~1e-14)


@pytest.fixture(scope="module")
def certificate():
    """The whole suite, once (2 forked workers; the rows trained by the shipped trainers dominate)."""
    return certify.run_certification(jobs=2)


SHIPPED = {
    "ppo",
    "grpo",
    "rloo",
    "dpo",
    "cdpo",
    "robust_dpo",
    "ipo",
    "hinge",
    "simpo",
    "fdpo_reverse_kl",
    "fdpo_forward_kl",
    "fdpo_js",
    "fdpo_alpha",
    "adaptive_kl",
    "constraint_kl",
    "scheduled_beta",
}


@pytest.mark.slow
def test_every_configuration_meets_its_expectation(certificate):
    failed = [(c.name, c.expected, c.kl_to_target, c.kl_to_optimum, c.note) for c in certificate if not c.ok]
    assert not failed, failed
    for c in certificate:
        if c.method == "best_of_n":
            continue
        if c.expected == "converges" or c.expected.startswith("biased: reaches"):
            assert c.kl_to_target < c.tolerance, c.name  # what ok means, restated
        if c.expected.startswith("biased") or c.expected.startswith("no KL anchor"):
            assert c.kl_to_optimum > certify.SEPARATION, c.name  # ... and not π*
        if c.tolerance > certify.TOLERANCE and c.method != "best_of_n":
            assert "tolerance_why" in c.config, c.name  # every looser bar says why
        # J(π) = β log Z - β KL[π‖π*] (docs/theory.md §5): the gap and the distance agree when β is fixed
        if c.objective_gap is not None and c.trainer == "" and isinstance(c.config.get("beta"), float):
            beta = c.config.get("optimum_beta", c.config["beta"])
            assert c.objective_gap == pytest.approx(beta * c.kl_to_optimum, rel=1e-6, abs=1e-12), c.name


@pytest.mark.slow
def test_every_trainer_row_is_trained_by_the_shipped_trainer(certificate):
    """The rows of PPO, GRPO, RLOO, DPO and its variants, and the controllers name the shipped function
    that trained them; only the estimator-theory rows (pg_*) use the exact tier, and best-of-n trains nothing."""
    for c in certificate:
        if c.method in SHIPPED:
            assert c.trainer.startswith(("tether.trainers.online.train_online", "tether.trainers.dpo.train_dpo")), (
                c.name
            )
        elif c.method.startswith("pg_kl"):
            assert c.trainer == "", c.name
    assert any("2 processes" in c.trainer for c in certificate)


@pytest.mark.slow
def test_the_suite_covers_what_tether_ships(certificate):
    methods = {c.method for c in certificate}
    assert SHIPPED | {"pg_kl_loss_k3", "best_of_n"} <= methods
    loss_types = {c.config.get("loss_type") for c in certificate}
    assert set(LOSS_TYPES) <= loss_types  # every preference loss (simpo as "no KL anchor")
    grid = {
        (c.config.get("kl_estimator"), c.config.get("kl_placement"))
        for c in certificate
        if c.method.startswith("pg_kl")
    }
    for est in ("k1", "k2", "k3", "exact"):
        assert {(est, "reward"), (est, "loss"), (est, "loss_is")} <= grid, est
    grpo = {(c.config["kl_estimator"], c.config["kl_placement"]) for c in certificate if c.method == "grpo"}
    assert {("k3", "loss"), ("k2", "loss"), ("k3", "loss_is")} <= grpo
    by_name = {c.name: c for c in certificate}
    # the configurations users run
    assert by_name["ppo_temperature"].config["temperature"] == 0.7
    assert by_name["ppo_bf16"].config["dtype"] == "bfloat16" and by_name["ppo_lora"].config["lora_r"] == 4
    assert by_name["ppo_grad_accum"].config["grad_accum"] == 4
    assert by_name["dpo"].config["reference"] == "precomputed" and by_name["dpo_sync"].config["reference"] == "sync"
    # the named biased targets are the ones theory gives (docs/theory.md §3)
    assert by_name["pg_kl_loss_k3"].target == "forward_kl_optimum"
    assert by_name["pg_kl_loss_exact"].target == "local_kl_optimum"
    assert by_name["pg_kl_loss_k1"].target == "reward_max"
    assert by_name["grpo_k3"].target == "forward_kl_optimum"
    assert by_name["ipo"].target.startswith("ipo_optimum") and by_name["dpo"].target.startswith("reverse_kl_optimum")
    assert by_name["simpo"].expected.startswith("no KL anchor")
    assert "β trajectory =" in by_name["scheduled_beta"].note
    # top-k / top-p (docs/theory.md §3): the fixed reference by default, the restricted form's bias shown
    for name in ("ppo_top_k", "ppo_top_p", "ppo_top_k_t1", "ppo_top_p_t1", "ppo_top_k_branches"):
        assert (
            by_name[name].target == "fixed_reference_optimum" and by_name[name].config["kl_reference_filter"] == "none"
        )
    assert by_name["ppo_top_k_branches_restricted"].target == "restricted_reference_optimum"
    assert by_name["adaptive_kl_top_p"].config["top_p"] == 0.9
    # a sampler that is not the trainer (docs/theory.md §3): each corrected row has an uncorrected twin
    from tether.oracle.certify_mismatch import CORRECTED_ROWS

    for name in CORRECTED_ROWS:
        twin = name.replace("seq_tis", "uncorrected").replace("token_tis", "uncorrected")
        assert (
            by_name[name].config["behaviour_correction"] != "none"
            and by_name[twin].config["behaviour_correction"] == "none"
        )
    assert {by_name[name].method for name in CORRECTED_ROWS} == {"ppo", "grpo", "rloo"}
    # position-dependent β: PPO (k1, exact) and RLOO against the soft backup with β_t = β·w_t
    for name in ("ppo_beta_position_decay", "rloo_beta_position_weights", "ppo_exact_beta_position_decay"):
        assert by_name[name].target == "position_beta_optimum" and by_name[name].kl_to_optimum > certify.SEPARATION


def test_json_table_only_and_plot(tmp_path, capsys):
    out, png = tmp_path / "cert.json", tmp_path / "curves.png"
    assert command.main(["--only", "pg_kl_loss_k3,best_of_n", "--json", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"pg_kl_loss_k3", "best_of_n"}
    assert len(rows) == 1 + 3  # the k3-in-loss row + best-of-n (n = 2, 4, 16)
    for r in rows:
        assert {
            "method",
            "config",
            "target",
            "kl_to_target",
            "kl_to_optimum",
            "tolerance",
            "ok",
            "objective_gap",
            "steps",
            "expected",
            "trainer",
        } <= set(r)
        assert r["ok"] is True
    assert {r["trainer"] for r in rows if r["method"] == "best_of_n"} == {"tether.ops.best_of_n.best_of_n_kl_exact"}
    table = capsys.readouterr().out
    assert "KL[π‖target]" in table and "objective gap" in table and table.count(" ok") >= 4
    assert command.main(["--only", "no_such_method"]) == 2  # unknown names are an error, listing the choices
    assert "choose from" in capsys.readouterr().err


def test_a_flipped_kl_sign_fails_the_certificate(monkeypatch, capsys):
    """Break the shipped KL-in-the-reward function (+β·kl instead of -β·kl): training now *rewards*
    divergence from π_ref; the estimator row and a shipped-trainer row fail, and the command exits 1."""
    import tether.ops.policy as policy_ops

    real = policy_ops.kl_reward_penalty
    monkeypatch.setattr(policy_ops, "kl_reward_penalty", lambda kl, mask, *, beta: -real(kl, mask, beta=beta))
    (cert,) = certify.run_certification(["pg_kl_reward_k1"])
    assert not cert.ok and cert.kl_to_target > 1.0
    assert command.main(["--only", "ppo_k1", "--jobs", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_broken_preference_loss_fails(monkeypatch):
    """DPO with the logit's sign flipped prefers the rejected responses: the shipped DPO row is not π*."""
    import tether.ops.preference as pref

    monkeypatch.setattr(pref, "dpo_sigmoid_loss", lambda h: -torch.nn.functional.logsigmoid(-h))
    (cert,) = certify.run_certification(["dpo"])
    # The trainer and the dataset's exact minimiser share the broken loss, so they agree with each other;
    # the row fails because that minimiser is no longer the closed-form π* (and neither is the policy).
    assert not cert.ok and cert.kl_to_optimum > 0.1


def test_best_of_n_enumeration_is_independent_and_exact():
    """π_bon by enumerating n-tuples equals the closed form for a hand case: two outcomes with π_ref =
    (½, ½), rewards (0, 1), n = 2: the better one is kept unless both draws are the worse: (¼, ¾);
    KL = ¼ ln ½ + ¾ ln 1.5 = 0.130812 (docs/theory.md §7's 0.131). With a tie the mass is shared."""
    q = certify.best_of_n_enumerated(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), 2)
    torch.testing.assert_close(q, torch.tensor([0.25, 0.75], dtype=torch.float64))
    kl = float((q * (q / 0.5).log()).sum())
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)
    tie = certify.best_of_n_enumerated(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.25, 0.25, 0.5]), 3)
    assert float(tie[0]) == pytest.approx(float(tie[1])) and float(tie[2]) == pytest.approx(0.125)
    f64 = dict(dtype=torch.float64)
    draw_by_draw = certify.best_of_n_enumerated(
        torch.tensor([0.3, -1.0, 2.0], **f64), torch.tensor([0.2, 0.5, 0.3], **f64), 5
    )
    torch.testing.assert_close(draw_by_draw.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(draw_by_draw[2]) == pytest.approx(1 - 0.7**5, abs=1e-12)  # the best outcome, drawn at least once


# ---- the targets, against independent derivations ------------------------------------------------------------


def test_local_kl_optimum_is_pistar_for_single_tokens_and_not_for_sequences():
    """T = 1: 'states held fixed' changes nothing, π(a) ∝ π_ref(a) e^{r(a)/β} = π*. T = 2 by hand: at a
    one-word prefix s the local solution is the tilt of π_ref(·|s) by r/β (as π*), but at the root it
    tilts by the *expected reward* E_π[r | a] instead of π*'s soft value β log E_ref[e^{r/β} | a]."""
    one = make_problem(4, 1, n_prompts=2, seed=3)
    assert (
        sequence_kl(local_kl_optimum(one.ref, one.rewards, 0.7), optimal_policy(one.ref, one.rewards, 0.7)).max()
        < EXACT
    )
    pb = make_problem(3, 2, n_prompts=1, seed=1)
    beta, sp = 0.6, pb.space
    local = local_kl_optimum(pb.ref, pb.rewards, beta)
    ref_p = pb.ref.probs()[0]
    r = {y: float(pb.rewards[0, k]) for k, y in enumerate(sp.sequences)}
    for s_idx, s in enumerate(sp.prefixes[1:], start=1):  # leaves' parents: tilt by r
        w = torch.tensor([ref_p[s_idx, a] * math.exp(r[s + (a,)] / beta) for a in range(3)])
        assert torch.allclose(local.probs()[0, s_idx], w / w.sum(), atol=EXACT)
    pi_s = local.probs()[0]
    q_root = [r[(0,)]] + [sum(float(pi_s[sp.prefix_index[(a,)], b]) * r[(a, b)] for b in range(3)) for a in (1, 2)]
    w = torch.tensor([ref_p[0, a] * math.exp(q_root[a] / beta) for a in range(3)])
    assert torch.allclose(local.probs()[0, 0], w / w.sum(), atol=EXACT)
    assert sequence_kl(local, optimal_policy(pb.ref, pb.rewards, beta)).item() > 1e-4


def test_grpo_fixed_point_reduces_to_the_forward_kl_optimum_without_its_quirks():
    """Centred advantages (no std), no 1/|y| weighting, G = 2: Ã(y) = (r(y) - E_π r)/2, a constant shift of
    r/2, so the fixed point is exact.forward_kl_optimum with β·G/(G-1) = 2β. With the quirks it is not."""
    pb = make_problem(3, 3, n_prompts=2, seed=0)
    plain = grpo_fixed_point(pb.ref, pb.rewards, 0.5, group_size=2, scale=False, length_weighted=False)
    assert sequence_kl(plain, forward_kl_optimum(pb.ref, pb.rewards, 1.0)).max() < EXACT
    default = grpo_fixed_point(pb.ref, pb.rewards, 0.5, group_size=2)
    assert sequence_kl(default, forward_kl_optimum(pb.ref, pb.rewards, 1.0)).mean() > 1e-3


def test_group_advantage_table_matches_the_shipped_group_advantages():
    """Ã(y) from the definition == the π-weighted mean of ops.policy.group_advantages over enumerated groups."""
    torch.manual_seed(0)
    rewards = torch.randn(1, 5, dtype=torch.float64)
    probs = torch.softmax(torch.randn(1, 5, dtype=torch.float64), -1)
    for G, scale in ((2, True), (3, True), (3, False)):
        table = group_advantage_table(rewards, probs, group_size=G, scale=scale)
        tuples = torch.cartesian_prod(*[torch.arange(5)] * G)
        adv = group_advantages(rewards[0, tuples].reshape(-1), group_size=G, scale=scale).view(-1, G)[:, 0]
        w = probs[0, tuples[:, 1:]].prod(-1)
        want = torch.zeros(5, dtype=torch.float64).index_add_(0, tuples[:, 0], w * adv)
        assert torch.allclose(table[0], want, atol=EXACT)


def test_preference_targets():
    """f-DPO forward KL == exact.forward_kl_optimum_sequence; reverse KL == the tilt; α → 0 approaches it;
    cDPO at ε = 0 is π*; IPO's target satisfies the least-squares normal equations of Azar et al.
    (Σ_{y'} μ(y')[lr(y) - lr(y') - (p(y≻y') - 1/2)/β] = 0 for every y)."""
    pb = make_problem(3, 2, n_prompts=2, seed=5)
    ref, r, beta = pb.ref, pb.rewards, 0.8
    tilt = tilted_sequence_probs(ref, r, beta)
    assert torch.allclose(
        f_optimum_sequence(ref, r, beta, divergence="forward_kl"), forward_kl_optimum_sequence(ref, r, beta), atol=EXACT
    )
    assert torch.allclose(f_optimum_sequence(ref, r, beta, divergence="reverse_kl"), tilt, atol=EXACT)
    assert (f_optimum_sequence(ref, r, beta, divergence="alpha", alpha=1e-4) - tilt).abs().max() < 1e-3
    assert torch.allclose(
        f_optimum_sequence(ref, r, beta, divergence="alpha", alpha=1.0),
        forward_kl_optimum_sequence(ref, r, beta),
        atol=1e-8,
    )  # α = 1 is the forward KL
    for div in ("js", "alpha"):
        assert torch.allclose(
            f_optimum_sequence(ref, r, beta, divergence=div).sum(-1), torch.ones(2, dtype=torch.float64)
        )
    assert torch.allclose(cdpo_optimum_sequence(ref, r, beta, label_smoothing=0.0), tilt, atol=1e-9)
    assert (cdpo_optimum_sequence(ref, r, beta, label_smoothing=0.2) - tilt).abs().max() > 1e-3
    mu = ref.sequence_probs().detach()
    lr = ipo_optimum_sequence(ref, r, beta).log() - mu.log()
    resid = (mu[:, None, :] * (lr[:, :, None] - lr[:, None, :] - (bt_preferences(r) - 0.5) / beta)).sum(-1)
    assert resid.abs().max() < EXACT


def test_beta_for_kl_inverts_the_optimum_kl():
    pb = make_problem(3, 3, n_prompts=2, seed=0)
    b = beta_for_kl(pb.ref, pb.rewards, 0.5)
    assert optimum_kl(pb.ref, pb.rewards, b) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="not reachable"):
        beta_for_kl(pb.ref, pb.rewards, 1e6)


def test_verdict_rules():
    """verdict() itself: 'converges' needs the tolerance; 'biased: reaches' also needs distance from π*."""
    assert certify.verdict("converges", 1e-4, 1e-4, 1e-3)
    assert not certify.verdict("converges", 2e-3, 2e-3, 1e-3)
    assert not certify.verdict("converges", float("nan"), 0.0, 1e-3)
    assert certify.verdict("biased: reaches x", 1e-5, 0.5, 1e-3)
    assert not certify.verdict("biased: reaches x", 1e-5, 1e-3, 1e-3)  # it reached π*: not the predicted bias
    assert not certify.verdict("biased: not π*", None, 1e-4, 1e-3)
    assert not certify.verdict("converges", 1e-5, 1e-5, 1e-3, extra=False)  # e.g. a controller's β did not settle
    assert certify.verdict("bounded: x", 0.3, None, 0.5) and not certify.verdict("bounded: x", 0.6, None, 0.5)


# ---- top-k / top-p rows (docs/theory.md §3; tether.oracle.certify_filters) ----------------------------------


def test_fixed_reference_optimum_is_the_soft_backup_of_the_unnormalised_restricted_reference():
    """Within fixed sets F(s), the optimum of E[r] - β KL[π‖π^τ_ref] by enumeration (certify_targets) equals
    an independent token-level derivation: the soft backup V(s) = β log Σ_{a∈F(s)} π^τ_ref(a|s) e^{Q(s,a)/β}
    with the *unnormalised* restricted reference, π(a|s) = π^τ_ref(a|s) e^{(Q - V)/β} on F(s). Its objective
    J = E_π[r] - β KL[π‖π^τ_ref] equals V(root) = β log Z_F, and the restricted optimum does worse. The
    restricted-reference optimum differs for T > 1 and coincides at T = 1 (the cost -log m is a constant)."""
    from tether.oracle.certify_targets import (
        filter_sets,
        fixed_reference_kl,
        fixed_reference_optimum,
        restricted_reference_optimum,
    )
    from tether.oracle.tabular import TabularPolicy

    beta, tau = 0.5, 0.7
    for T, top in ((3, {"top_k": 2}), (3, {"top_p": 0.8}), (1, {"top_k": 3})):
        pr = make_problem(3 if T == 3 else 5, T, n_prompts=2, seed=0)
        sp = pr.space
        sets = filter_sets(pr.ref, temperature=tau, **top)
        got = fixed_reference_optimum(pr.ref, pr.rewards, beta, sets, temperature=tau)
        logq = torch.log_softmax(pr.ref.table.detach() / tau, -1).masked_fill(~sets, float("-inf"))
        V = torch.zeros(sp.n_prompts, sp.n_prefixes, dtype=torch.float64)
        table = torch.zeros(sp.n_prompts, sp.n_prefixes, sp.vocab_size, dtype=torch.float64)
        for s in reversed(range(sp.n_prefixes)):  # prefixes are ordered by length: children first
            q = torch.where(
                sp.child_seq[s] >= 0, pr.rewards[:, sp.child_seq[s].clamp(min=0)], V[:, sp.child_prefix[s].clamp(min=0)]
            )  # (P, V)
            V[:, s] = beta * torch.logsumexp(logq[:, s] + q / beta, -1)
            table[:, s] = logq[:, s] + (q - V[:, s, None]) / beta
        backup = TabularPolicy(sp, table, trainable=False)
        assert float(sequence_kl(got, backup).abs().max()) < EXACT, (T, top)
        J = (got.sequence_probs() * pr.rewards).sum(-1) - beta * fixed_reference_kl(got, pr.ref, temperature=tau)
        torch.testing.assert_close(J, V[:, 0], rtol=0, atol=EXACT)  # V already carries β
        other = restricted_reference_optimum(pr.ref, pr.rewards, beta, sets, temperature=tau)
        J_other = (other.sequence_probs() * pr.rewards).sum(-1) - beta * fixed_reference_kl(
            other, pr.ref, temperature=tau
        )
        gap = float(sequence_kl(other, got).mean())
        if T == 1:
            assert gap < EXACT, top
        else:
            assert gap > 1e-4 and bool((J_other < J).all()), (top, gap)


def test_filter_rows_default_reaches_the_fixed_reference_optimum_and_restricted_shows_its_bias():
    """The two-branch rows and the T = 1 top-k row, trained by the shipped PPO (a few seconds each).
    Default: within SAMPLED_TOL of the fixed-reference optimum on the final sets. Restricted: within it of the
    restricted-reference optimum and more than SEPARATION from the fixed one: its bonus β·Σ_t -log m_t moves
    the branch split from 0.30 : 0.70 to 0.5 : 0.5 (the two optima are ~0.09 nats apart)."""
    from tether.oracle.certify_filters import filter_rows

    rows = {n: run for n, _, run in filter_rows(certify.Suite())}
    default, restricted = rows["ppo_top_k_branches"](), rows["ppo_top_k_branches_restricted"]()
    assert default.ok and default.kl_to_target < certify.SAMPLED_TOL, default.note
    assert restricted.ok and restricted.kl_to_target < certify.SAMPLED_TOL, restricted.note
    assert restricted.kl_to_optimum > certify.SEPARATION and default.kl_to_optimum < certify.SAMPLED_TOL
    assert restricted.config["kl_reference_filter"] == "restricted" and default.config["kl_reference_filter"] == "none"
    t1 = rows["ppo_top_k_t1"]()
    assert t1.ok, t1.note


# ---- position-dependent β (docs/theory.md §12; tether.oracle.certify_positions) ------------------------------


def test_position_beta_optimum_is_the_optimum_of_the_weighted_objective():
    """π*_w (soft backup with β_t = β·w_t) against independent facts: w ≡ 1 gives π*(β); at T = 1 it is
    π*(β·w_0); and J_w(π) = E_π[r - Σ_t β·w_t·log(π/π_ref)], computed by enumeration, has zero gradient
    at π*_w and is lower at perturbed policies (both exact in float64)."""
    from tether.oracle.certify_positions import position_beta_optimum, position_objective
    from tether.oracle.tabular import TabularPolicy

    problem, beta = make_problem(3, 3, n_prompts=2, seed=0), 0.5
    same = position_beta_optimum(problem.ref, problem.rewards, beta, [1.0, 1.0, 1.0])
    assert float(sequence_kl(same, optimal_policy(problem.ref, problem.rewards, beta)).max()) < EXACT
    single = make_problem(5, 1, n_prompts=2, seed=0)
    t1 = position_beta_optimum(single.ref, single.rewards, beta, [0.3])
    assert float(sequence_kl(t1, optimal_policy(single.ref, single.rewards, beta * 0.3)).max()) < EXACT
    g = torch.Generator().manual_seed(0)
    for w in ([1.0, 0.74, 0.55], [0.5, 1.0, 2.0]):
        target = position_beta_optimum(problem.ref, problem.rewards, beta, w)
        pol = TabularPolicy(problem.space, target.table.detach().clone())
        J = position_objective(pol, problem.ref, problem.rewards, beta, w)
        (grad,) = torch.autograd.grad(J.sum(), pol.table)
        assert float(grad.abs().max()) < EXACT, w
        for _ in range(5):
            other = TabularPolicy(
                problem.space,
                target.table.detach() + 0.1 * torch.randn(target.table.shape, generator=g, dtype=target.table.dtype),
            )
            assert bool((position_objective(other, problem.ref, problem.rewards, beta, w) < J.detach()).all())
        assert (
            float(sequence_kl(target, optimal_policy(problem.ref, problem.rewards, beta)).mean()) > certify.SEPARATION
        )
