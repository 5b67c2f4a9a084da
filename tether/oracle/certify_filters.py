"""Certificate rows for top-k / top-p sampling (docs/theory.md §3): the shipped PPO trainer samples the
filtered policy π^{τ,F}_θ and penalises its KL to the fixed reference π^τ_ref; these rows check where it
ends, by enumeration.

What a row certifies. The sampler's sets F(s) are functions of the policy's own logits, and no
gradient reaches a token outside them (its logit is not in the sampled distribution), so the trainer
optimises the distribution *within* the sets; which sets it ends with is not something a gradient
chooses. With the sets held fixed the objective E[r] - β KL[π‖π^τ_ref] has a unique optimum on them,
π^τ_ref·e^{r/β} renormalised over the allowed sequences (``certify_targets.fixed_reference_optimum``).
Each row reads the sets of the policy the trainer saved (``filter_sets``: the sampler's rule), and
checks that the policy as sampled (``filtered_policy``) is that optimum for those sets; the note says
at how many states the sets moved during training (none, on these problems).

- ``ppo_top_k``, ``ppo_top_p``, ``ppo_top_k_t1``, ``ppo_top_p_t1``: top-k = 2 and top-p = 0.8 (the
  latter at τ = 0.7) on the certificate's problem (T = 3) and on a single-token problem (T = 1, V = 5).
- ``ppo_top_k_branches`` and ``ppo_top_k_branches_restricted``: a two-branch problem where the
  restricted reference's bias shows. Both branches pay the same reward; below one of them the
  reference is spread (its top-2 holds a third of the mass), below the other it is peaked. The
  fixed-reference optimum discounts the spread branch by that mass; the restricted form pays it a
  bonus instead and ends at ``restricted_reference_optimum``, far from the fixed one.
- ``adaptive_kl_top_p``: the adaptive controller under top-p = 0.8, fed kl/ref (the fixed-reference KL),
  lands on the β whose fixed-reference optimum within the sets has the target KL.
"""

from __future__ import annotations

import time

import torch

from . import shipped
from .certify_targets import (
    beta_for_fixed_reference_kl,
    filter_sets,
    filtered_policy,
    fixed_reference_kl,
    fixed_reference_optimum,
    restricted_reference_optimum,
)
from .exact import sequence_kl
from .tabular import TabularPolicy, TabularProblem, TabularSpace, make_problem

BRANCH_BETA = 0.5


def branch_problem() -> TabularProblem:
    """V = 5 (eos = 0, words 1-4), T = 2, one prompt. At the root the reference puts 0.45 on each of the
    branch tokens 1 and 2 (top-2 = {1, 2}). Below 1 it is nearly uniform over the 5 tokens (its top-2
    holds 0.425 of the mass); below 2 it is peaked (top-2 holds 0.99). Every sequence through either
    branch pays reward 1, so only the KL separates them: the fixed-reference optimum puts
    0.45·0.425 : 0.45·0.99 = 0.30 : 0.70 on the branches, the restricted one 0.5 : 0.5."""
    space = TabularSpace(5, 2, eos=0, n_prompts=1)
    probs = torch.full((1, space.n_prefixes, 5), 0.2, dtype=torch.float64)
    probs[0, 0] = torch.tensor([0.04, 0.45, 0.45, 0.03, 0.03])
    for s, prefix in enumerate(space.prefixes):
        if prefix == (1,):  # no ties: top-k keeps every token tied with the k-th
            probs[0, s] = torch.tensor([0.18, 0.215, 0.21, 0.2, 0.195])
        elif prefix == (2,):
            probs[0, s] = torch.tensor([0.004, 0.9, 0.09, 0.003, 0.003])
    ref = TabularPolicy.from_probs(space, probs, trainable=False)
    rewards = torch.ones(1, space.n_sequences, dtype=torch.float64)
    for k, seq in enumerate(space.sequences):
        if seq in ((0,), ()):  # stopping at the root: no branch
            rewards[0, k] = 0.0
    return TabularProblem(space, ref, rewards)


def _ppo(problem: TabularProblem, beta: float, **kw):
    from tether.trainers.ppo import PPOConfig

    base = dict(beta=beta, kl_estimator="k1", num_epochs=4, lam=1.0, gamma=1.0)
    return shipped.online_config(PPOConfig, problem, **{**base, **kw})


def filter_row(
    problem: TabularProblem,
    *,
    name: str,
    label: str,
    filters: dict,
    beta: float,
    expected: str,
    tolerance: float,
    tolerance_why: str,
    reference_filter: str = "none",
    **overrides,
):
    """Train PPO (k1 in the reward) with ``filters`` on ``problem`` with the shipped trainer, read back the
    sets of the saved policy, and judge the policy as sampled against the optimum of its objective
    within those sets: ``fixed_reference_optimum`` (default) or, with ``reference_filter="restricted"``,
    ``restricted_reference_optimum``. ``kl_to_optimum`` is always the distance to the fixed-reference
    optimum (what the default objective asks for); the note gives the other one."""
    from .certificate import Certificate, verdict

    t0 = time.perf_counter()
    tau = filters.get("temperature", 1.0)
    cfg = _ppo(problem, beta, kl_reference_filter=reference_filter, **filters, **overrides)
    run = shipped.run_online(problem, cfg)
    sets = filter_sets(run.policy, **filters)
    policy = filtered_policy(run.policy, sets, temperature=tau)
    visited = policy.state_probs().detach() > 0  # (P, S) states the sampled policy reaches
    moved = int(((sets != filter_sets(problem.ref, **filters)).any(-1) & visited).sum())
    fixed = fixed_reference_optimum(problem.ref, problem.rewards, beta, sets, temperature=tau)
    restricted = restricted_reference_optimum(problem.ref, problem.rewards, beta, sets, temperature=tau)
    kl_fixed = float(sequence_kl(policy, fixed).mean())
    kl_restricted = float(sequence_kl(policy, restricted).mean())
    target = "restricted_reference_optimum" if reference_filter == "restricted" else "fixed_reference_optimum"
    kl_target = kl_restricted if reference_filter == "restricted" else kl_fixed
    gap = float(sequence_kl(restricted, fixed).mean())
    note = (
        f"sets of the saved policy: {int(sets.sum(-1).float().mean() * 100) / 100} tokens per state on average, "
        f"changed during training at {moved} of the {int(visited.sum())} states it visits; "
        f"KL[π‖fixed-reference optimum] = {kl_fixed:.1e}, KL[π‖restricted-reference optimum] = {kl_restricted:.1e} "
        f"(the two optima are {gap:.3f} apart); final kl/ref = {run.history[-1]['kl/ref']:.3f}, "
        f"kl/filter_cost = {run.history[-1].get('kl/filter_cost', float('nan')):.3f}"
    )
    config = {
        k: getattr(cfg, k)
        for k in (
            "beta",
            "kl_estimator",
            "num_epochs",
            "temperature",
            "top_k",
            "top_p",
            "kl_reference_filter",
            "max_steps",
            "learning_rate",
        )
    }
    config.update(
        {
            "trainer_config": "PPOConfig",
            "optimum_beta": beta,
            "tolerance_why": tolerance_why,
            "problem": f"V={problem.space.vocab_size}, T={problem.space.horizon}, {problem.space.n_prompts} prompt(s)",
            "certifies": "the distribution within the sets the trained policy ends with (a gradient does not "
            "choose the sets; docs/theory.md §3)",
        }
    )
    return Certificate(
        method="ppo",
        config=config,
        target=target,
        expected=expected,
        kl_to_target=kl_target,
        kl_to_optimum=kl_fixed,
        objective_gap=beta * kl_fixed,
        tolerance=tolerance,
        steps=cfg.max_steps,
        ok=verdict(expected, kl_target, kl_fixed, tolerance),
        note=note,
        seconds=time.perf_counter() - t0,
        name=name,
        label=label,
        trainer=run.trainer,
        curve=[],
    )


def filter_rows(suite) -> list:
    """(name, method, run) of every top-k/top-p row."""
    from .certificate import BETA, SAMPLED_TOL, SAMPLED_WHY

    single = make_problem(5, 1, n_prompts=2, seed=0)
    rows = []

    def add(name, problem, label, **kw):
        def run():
            return filter_row(problem() if callable(problem) else problem, name=name, label=label, **kw)

        rows.append((name, "ppo", run))

    common = dict(expected="converges", tolerance=SAMPLED_TOL, tolerance_why=SAMPLED_WHY)
    add("ppo_top_k", suite.problem, "k1 in reward, top-k 2 (T = 3)", filters={"top_k": 2}, beta=BETA, **common)
    add(
        "ppo_top_p",
        suite.problem,
        "k1 in reward, top-p 0.8, temperature 0.7 (T = 3)",
        filters={"top_p": 0.8, "temperature": 0.7},
        beta=BETA,
        **common,
    )
    add("ppo_top_k_t1", single, "k1 in reward, top-k 3 of 5 (T = 1)", filters={"top_k": 3}, beta=BETA, **common)
    add("ppo_top_p_t1", single, "k1 in reward, top-p 0.8 (T = 1)", filters={"top_p": 0.8}, beta=BETA, **common)
    add(
        "ppo_top_k_branches",
        branch_problem,
        "k1 in reward, top-k 2, two branches (default: fixed reference)",
        filters={"top_k": 2},
        beta=BRANCH_BETA,
        **common,
    )
    add(
        "ppo_top_k_branches_restricted",
        branch_problem,
        "k1 in reward, top-k 2, two branches, kl_reference_filter: restricted",
        filters={"top_k": 2},
        beta=BRANCH_BETA,
        reference_filter="restricted",
        expected="biased: reaches restricted_reference_optimum (the reference "
        "restricted to the policy's sets pays a bonus β·Σ_t -log π_ref(F_t) to the spread branch)",
        tolerance=SAMPLED_TOL,
        tolerance_why=SAMPLED_WHY,
    )
    add_controller = ("adaptive_kl_top_p", "adaptive_kl", lambda: controller_row(suite, top_p=0.9, kl_target=1.0))
    rows.append(add_controller)
    return rows


def controller_row(suite, *, top_p: float, kl_target: float, horizon: int = 2560):
    """The adaptive controller (Ziegler et al. 2019) under top-p, fed kl/ref = KL[π^{F}_θ‖π_ref] (the fixed
    reference, filter cost included). It must end at β̂, the β whose fixed-reference optimum within the
    final sets has KL = ``kl_target`` (``beta_for_fixed_reference_kl``), |β - β̂|/β̂ < 5%, and the policy as
    sampled within ``SAMPLED_TOL`` of that optimum. Horizon 2560 episodes (128 a step): a saturated
    controller can move β by e^{±1.5} over the 150 steps, enough to settle from β = 1. Fed the restricted
    KL instead (without the filter cost), the same run ends at β = 0.44 against β̂ = 0.62, 0.105 nats from
    the target (``tests/test_certify_mutations.py``)."""
    from .certificate import SAMPLED_TOL, SAMPLED_WHY, Certificate, verdict

    t0 = time.perf_counter()
    problem = suite.problem
    filters = {"top_p": top_p}
    cfg = _ppo(problem, 1.0, kl_target=kl_target, kl_horizon=horizon, max_steps=150, **filters)
    run = shipped.run_online(problem, cfg)
    sets = filter_sets(run.policy, **filters)
    policy = filtered_policy(run.policy, sets)
    b_hat = beta_for_fixed_reference_kl(problem.ref, problem.rewards, kl_target, sets)
    target = fixed_reference_optimum(problem.ref, problem.rewards, b_hat, sets)
    kl_target_dist = float(sequence_kl(policy, target).mean())
    beta = run.history[-1]["beta"]
    kl = float(fixed_reference_kl(policy, problem.ref).mean())
    settled = abs(beta - b_hat) / b_hat < 0.05
    note = (
        f"final β = {beta:.4f} (β̂ = {b_hat:.4f} for the final sets), final KL[π^F‖π_ref] = {kl:.4f} (target "
        f"{kl_target}), of which filter cost {run.history[-1].get('kl/filter_cost', float('nan')):.3f} (last rollout)"
    )
    config = {
        "beta": "controlled",
        "kl_target": kl_target,
        "kl_horizon": cfg.kl_horizon,
        "top_p": top_p,
        "kl_estimator": cfg.kl_estimator,
        "max_steps": cfg.max_steps,
        "trainer_config": "PPOConfig",
        "optimum_beta": b_hat,
        "tolerance_why": SAMPLED_WHY + "; also |β - β̂|/β̂ < 5% at the end",
        "certifies": "the controller's fixed point measured by the fixed-reference KL, within the final sets",
    }
    return Certificate(
        method="adaptive_kl",
        config=config,
        target="fixed_reference_optimum(β̂)",
        expected="converges",
        kl_to_target=kl_target_dist,
        kl_to_optimum=kl_target_dist,
        objective_gap=b_hat * kl_target_dist,
        tolerance=SAMPLED_TOL,
        steps=cfg.max_steps,
        ok=verdict("converges", kl_target_dist, kl_target_dist, SAMPLED_TOL, settled),
        note=note,
        seconds=time.perf_counter() - t0,
        name="adaptive_kl_top_p",
        label=f"Ziegler controller, KL target {kl_target} (fixed reference), top-p {top_p}",
        trainer=run.trainer,
        curve=[],
    )
