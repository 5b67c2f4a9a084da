"""``tether certify``: every KL-regularised method tether ships, trained on a tabular problem small
enough to enumerate, and measured against the exact optimum its theory predicts (docs/theory.md §3-§7).

The problem: V = 3 tokens (one is eos), completions of at most T = 3 tokens, 2 prompts (15 complete
sequences each), π_ref with N(0, 1) logits and N(0, 1) rewards (the preference rows use T = 2).

Two tiers, and which rows use which:

- **The shipped trainers** (every PPO, GRPO, RLOO, DPO-family and β-controller row; ``trainer`` names
  the function): the problem is written as a Hugging Face causal LM (``oracle.lm``) and trained by
  ``tether.trainers.online.train_online`` or ``tether.trainers.dpo.train_dpo`` exactly as a user's
  run is — sampler, scoring, reference form, controller, temperature, dtype, LoRA, micro-batching,
  processes (``oracle.shipped``). The saved ``final/`` model is read back and its distance to the
  target computed by enumeration. Online rows use sampled batches (``shipped.SAMPLES`` per prompt);
  DPO rows use a finite dataset (``PreferenceData``) in full-batch steps.
- **The exact tier** (the estimator × placement rows ``pg_*``, REINFORCE with exact expectations,
  ``certify_online``): the theory of each KL estimator and placement, on the same ops functions the
  trainers call (``tether.ops.kl``, ``tether.ops.policy``), and best-of-n (``tether.ops.best_of_n``
  against an independent enumeration of n-tuples).

A row's verdict (``Certificate.ok``):

- expected "converges": KL[π_learned‖target] < tolerance (1e-3 for exact and DPO rows, ``SAMPLED_TOL``
  for sampled online rows, with the reason in the config). The target is π* (``reverse_kl_optimum``) or,
  for a method with another regulariser, that regulariser's optimum (IPO, cDPO, f-DPO;
  ``tether.ops.preference.TARGETS``).
- expected "biased: reaches X": the method's gradient is biased for the reverse-KL objective
  (docs/theory.md §3); it must reach X (KL[π‖X] < tolerance) *and* stay away from π*
  (KL[π‖π*] > ``SEPARATION``). Both distances are reported.
- expected "biased: not π*": theory gives no unique closed-form target; the row must stay away from π*
  *and* show the progress its own dynamics ask for (a fixed point approached, a loss reduced most of
  the way to its infimum, a divergence happening): an untrained policy fails every such row.
- expected "bounded": a trust region (PPO's clip) keeps the measured distance within the bound.
- best-of-n: its exact KL[π_bon‖π_ref] must match the enumeration and lie below log n - (n-1)/n.

Top-k / top-p rows (``certify_filters``): the policy as sampled, with the sets the trained policy ends
with, against the optimum of the fixed-reference objective within those sets (docs/theory.md §3).

Sampler-mismatch rows (``certify_mismatch``): the tokens come from a perturbed sampler μ ≠ π_old; with
``behaviour_correction`` on, PPO, GRPO and RLOO reach their on-policy targets; without it, the rows whose
limit depends on the sampling distribution (a KL in the loss, the exact estimator's direct term) miss
by more than ``SEPARATION``, and those with k1 in the reward reach π* anyway (their fixed point does not).

``steps`` counts optimiser steps of the trainer (gradient evaluations in the exact tier).
``objective_gap`` is β log Z - J(π) = β·KL[π‖π*] for the β whose π* the row compares to.
"""

from __future__ import annotations

import math
import time
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch

from tether.control import FixedBeta
from tether.ops.best_of_n import best_of_n_kl_exact
from tether.ops.kl import ESTIMATORS
from tether.ops.policy import best_of_n_kl_bound

from . import shipped
from .certificate import (  # noqa: F401 (re-exported: the rows' shared constants, Certificate, verdict)
    _SHOWN,
    BETA,
    BETA_PREF,
    PROBLEM,
    SAMPLED_TOL,
    SAMPLED_WHY,
    SEPARATION,
    TOLERANCE,
    Certificate,
    verdict,
)
from .certify_online import OnlineSetup, expected_update_norm, scores_of, train_online
from .certify_preference import PreferenceSetup, train_preference
from .certify_targets import (
    as_policy,
    beta_for_kl,
    cdpo_optimum_sequence,
    f_optimum_sequence,
    grpo_fixed_point,
    ipo_optimum_sequence,
    local_kl_optimum,
)
from .exact import (
    forward_kl_optimum,
    forward_kl_optimum_sequence,
    log_partition,
    objective,
    optimal_policy,
    sequence_kl,
)
from .tabular import TabularPolicy, TabularProblem, make_problem


class Suite:
    """The shared problem and its exact targets (computed once, lazily)."""

    def __init__(self, problem: Optional[TabularProblem] = None):
        self.problem = problem or make_problem(**PROBLEM)
        self._memo: dict = {}

    def memo(self, key: str, fn: Callable):
        """Compute a target once per suite, on first use (rows only build what they run)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    @property
    def ref(self) -> TabularPolicy:
        return self.problem.ref

    @property
    def rewards(self) -> torch.Tensor:
        return self.problem.rewards

    def optimum(self, beta: float) -> TabularPolicy:
        return self.memo(f"optimum {beta!r}", lambda: optimal_policy(self.ref, self.rewards, beta))

    @cached_property
    def y_max(self) -> torch.Tensor:
        return self.rewards.argmax(-1)  # (P,) the reward-maximising sequence of each prompt (N(0,1): unique)

    def kl(self, policy: TabularPolicy, target: TabularPolicy) -> float:
        return float(sequence_kl(policy, target).detach().mean())

    def gap(self, policy: TabularPolicy, beta: float) -> float:
        """β log Z - J(π) (docs/theory.md §5), mean over prompts."""
        return float(
            (beta * log_partition(self.ref, self.rewards, beta) - objective(policy, self.ref, self.rewards, beta))
            .detach()
            .mean()
        )

    def greedy_distance(self, policy: TabularPolicy) -> float:
        """KL[δ_{y_max}‖π] = -log π(y_max|x), mean over prompts: the distance to the reward-maximising
        (deterministic) policy; KL[π‖δ] is infinite until π is deterministic, so it is measured this way."""
        return float(-policy.sequence_log_probs().detach().gather(1, self.y_max[:, None]).mean())


# ---- online rows ------------------------------------------------------------------------------------------


def online_row(
    suite: Suite,
    *,
    name: str,
    method: str,
    label: str,
    setup: OnlineSetup,
    expected: str,
    target: str,
    target_policy: Optional[TabularPolicy],
    steps: int,
    lr: float = 0.1,
    lr_end: float = 2e-3,
    beta: float = BETA,
    tolerance: float = TOLERANCE,
    controller=None,
    seed: int = 0,
    n_episodes: int = 1,
    check: Optional[Callable] = None,
    extra_config: Optional[dict] = None,
    opt_beta: Optional[float] = None,
) -> Certificate:
    """Train one online configuration from π_ref and judge it. ``check(policy, trace) -> (extra_ok, note,
    β of π*)`` adds row-specific evidence (divergence, controllers). ``opt_beta``: the β whose π* the
    method would reach if unbiased (default ``beta``; GRPO's centred advantages scale it by G/(G-1))."""
    t0 = time.perf_counter()
    if target_policy is not None and not isinstance(target_policy, TabularPolicy):
        target_policy = target_policy()  # targets are built lazily, by the row that needs them
    controlled = controller is not None
    controller = controller or FixedBeta(beta)
    opt_beta = beta if opt_beta is None else opt_beta
    if target == "reward_max":
        distance = suite.greedy_distance
    else:
        distance = (
            (lambda p: suite.kl(p, target_policy))
            if target_policy is not None
            else (lambda p: suite.kl(p, suite.optimum(opt_beta)))
        )
    policy, trace = train_online(
        suite.problem,
        setup,
        controller,
        steps=steps,
        lr=lr,
        lr_end=lr_end,
        distance=distance,
        seed=seed,
        n_episodes=n_episodes,
    )
    extra_ok, note = True, ""
    if check is not None:
        extra_ok, note, opt_beta = check(policy, trace)
    optimum = suite.optimum(opt_beta)
    kl_opt = suite.kl(policy, optimum)
    kl_target = None
    if target == "reward_max":
        kl_target = suite.greedy_distance(policy)
    elif target_policy is not None:
        kl_target = suite.kl(policy, target_policy)
    config = {
        "algo": setup.algo,
        "beta": "controlled" if controlled else beta,
        **setup.describe(),
        "steps": steps,
        "adam_lr": f"{lr} -> {lr_end}",
        **({"optimum_beta": opt_beta} if opt_beta != beta else {}),
        **(extra_config or {}),
    }
    return Certificate(
        method=method,
        config=config,
        target=target,
        expected=expected,
        kl_to_target=kl_target,
        kl_to_optimum=kl_opt,
        objective_gap=suite.gap(policy, opt_beta),
        tolerance=tolerance,
        steps=steps * setup.epochs,
        ok=verdict(expected, kl_target, kl_opt, tolerance, extra_ok),
        note=note,
        seconds=time.perf_counter() - t0,
        name=name,
        label=label,
        curve=trace.curve,
    )


def _diverging_forward_kl(suite: Suite):
    """k3 in the reward ascends E r - β(KL[π‖π_ref] - Σ_t E KL[π_ref‖π](s_t)) (docs/theory.md §3), unbounded
    above: some token's probability is driven to 0 and the forward KL[π_ref‖π] grows without bound.
    Evidence: the final forward KL is far above π*'s and still rising over the last half."""

    def check(policy, trace):
        fwd_opt = float(sequence_kl(suite.ref, suite.optimum(BETA)).mean())
        fwd = float(sequence_kl(suite.ref, policy).detach().mean())
        ok = fwd > 5 * fwd_opt
        return (
            ok,
            f"forward KL[π_ref‖π] = {fwd:.1f} nats (π*: {fwd_opt:.2f}), min π(y) = "
            f"{float(policy.sequence_probs().detach().min()):.1e}",
            BETA,
        )

    return check


def online_rows(suite: Suite) -> list[tuple[str, str, Callable[[], Certificate]]]:
    """(name, method, run) for every online configuration."""
    ref, r = suite.ref, suite.rewards
    rows = []

    def add(name, method, label, **kw):
        rows.append((name, method, lambda: online_row(suite, name=name, method=method, label=label, **kw)))

    def pistar():
        return suite.optimum(BETA)

    def local():
        return suite.memo("local", lambda: local_kl_optimum(ref, r, BETA))

    def fwd():
        return suite.memo("forward", lambda: forward_kl_optimum(ref, r, BETA))

    rev = "reverse_kl_optimum"
    pg = dict(steps=200)

    # Policy gradient (REINFORCE, exact expectation, reward-to-go), KL in the reward: docs/theory.md §3 rows 1 and 5.
    for est in ("k1", "exact"):
        add(
            f"pg_kl_reward_{est}",
            f"pg_kl_reward_{est}",
            f"REINFORCE, {est} in reward" + (" (+ its direct term)" if ESTIMATORS[est].reward_direct_term else ""),
            setup=OnlineSetup("pg", est, "reward"),
            expected="converges",
            target=rev,
            target_policy=pistar,
            **pg,
        )

    def stationary(setup):
        """No closed form: the row must head for a fixed point of its own expected update, its exact
        ‖E∇‖ falling to at most 1/4 of its value at π_ref (an untrained policy scores 1). Measured: 0.21
        (k2 in reward) and 0.09 (k2 x π/π_old) after 200 steps; both keep drifting slowly (400 vs 1,500
        steps of k2 in the reward end 0.002 nats apart), so no tighter stationarity is claimed."""

        def check(policy, trace):
            g0 = expected_update_norm(suite.problem, setup, suite.ref, BETA)
            g1 = expected_update_norm(suite.problem, setup, policy, BETA)
            return g1 <= 0.25 * g0, f"‖E∇‖ = {g1:.1e} at the end, {g0:.1e} at π_ref (must fall to ≤ 1/4)", BETA

        return check

    add(
        "pg_kl_reward_k2",
        "pg_kl_reward_k2",
        "REINFORCE, k2 in reward",
        setup=OnlineSetup("pg", "k2", "reward"),
        expected="biased: not π* (score-function gradient of the biased value lr²/2: no KL target; must head for a "
        "fixed point of its expected update)",
        target="none",
        target_policy=None,
        check=stationary(OnlineSetup("pg", "k2", "reward")),
        **pg,
    )
    add(
        "pg_kl_reward_k3",
        "pg_kl_reward_k3",
        "REINFORCE, k3 in reward",
        setup=OnlineSetup("pg", "k3", "reward"),
        expected="biased: not π* (∇KL_rev - ∇KL_fwd: diverges)",
        target="none (diverges)",
        target_policy=None,
        check=_diverging_forward_kl(suite),
        **pg,
    )

    # Policy gradient of the score + β x KL term in the loss (states held fixed): docs/theory.md §3 rows 2-4, 6.
    add(
        "pg_kl_loss_k1",
        "pg_kl_loss_k1",
        "REINFORCE + k1 in loss",
        setup=OnlineSetup("pg", "k1", "loss"),
        expected="biased: reaches reward_max (k1's expected gradient is 0: no regularisation)",
        target="reward_max",
        target_policy=None,
        tolerance=0.1,
        steps=200,
        lr=0.2,
        lr_end=0.2,
        extra_config={
            "tolerance_why": "distance = -log π(y_max); unregularised ascent approaches the deterministic "
            "policy only asymptotically (logits grow without bound), so 0.1 nats = π(y_max) > 0.9"
        },
    )
    for est, place, tgt, tname in (
        ("k2", "loss", local, "local_kl_optimum"),
        ("k3", "loss", fwd, "forward_kl_optimum"),
        ("exact", "loss", local, "local_kl_optimum"),
        ("k1", "loss_is", local, "local_kl_optimum"),
        ("k3", "loss_is", local, "local_kl_optimum"),
        ("exact", "loss_is", local, "local_kl_optimum"),
    ):
        suffix = "_is" if place == "loss_is" else ""
        add(
            f"pg_kl_loss{suffix}_{est}",
            f"pg_kl_loss{suffix}_{est}",
            f"REINFORCE + {est} in loss" + (" x π/π_old" if suffix else ""),
            setup=OnlineSetup("pg", est, place),
            expected=f"biased: reaches {tname}",
            target=tname,
            target_policy=tgt,
            **pg,
        )
    add(
        "pg_kl_loss_is_k2",
        "pg_kl_loss_is_k2",
        "REINFORCE + k2 in loss x π/π_old",
        setup=OnlineSetup("pg", "k2", "loss_is"),
        expected="biased: not π* (per-state penalty Σπ·lr²/2: non-convex, vanishes as π → 0; must head for a "
        "fixed point of its expected update)",
        target="none",
        target_policy=None,
        check=stationary(OnlineSetup("pg", "k2", "loss_is")),
        **pg,
    )

    return rows


# ---- the shipped online trainers (train_online: PPO, GRPO, RLOO) on the tabular LM -----------------------


def trainer_row(
    suite: Suite,
    *,
    name: str,
    method: str,
    label: str,
    config: Callable,
    expected: str,
    target: str,
    target_policy,
    tolerance: float = SAMPLED_TOL,
    opt_beta: float = BETA,
    check: Optional[Callable] = None,
    transform: Optional[Callable] = None,
    runner: Optional[Callable] = None,
    extra_config: Optional[dict] = None,
    optimum: Optional[Callable] = None,
) -> Certificate:
    """Train with the shipped trainer (``shipped.run_online`` unless ``runner``) and judge the model it
    saved. ``config()`` builds the trainer's config; ``transform(policy)`` maps the learned table to the
    policy the target describes (e.g. the tempered one); ``check(run, policy) -> (ok, note, opt_beta)``
    adds row-specific evidence (β trajectories, divergence)."""
    t0 = time.perf_counter()
    cfg = config()
    run = (runner or shipped.run_online)(suite.problem, cfg)
    policy = transform(run.policy) if transform is not None else run.policy
    if target_policy is not None and not isinstance(target_policy, TabularPolicy):
        target_policy = target_policy()
    extra_ok, note = True, ""
    if check is not None:
        extra_ok, note, opt_beta = check(run, policy)
    kl_opt = suite.kl(policy, optimum() if optimum is not None else suite.optimum(opt_beta))
    kl_target = suite.kl(policy, target_policy) if target_policy is not None else None
    config_d = {k: getattr(cfg, k) for k in _SHOWN if hasattr(cfg, k)}
    config_d.update({"trainer_config": type(cfg).__name__, "optimum_beta": opt_beta, **(extra_config or {})})
    if tolerance > TOLERANCE and "tolerance_why" not in config_d:
        config_d["tolerance_why"] = SAMPLED_WHY
    return Certificate(
        method=method,
        config=config_d,
        target=target,
        expected=expected,
        kl_to_target=kl_target,
        kl_to_optimum=kl_opt,
        objective_gap=suite.gap(policy, opt_beta),
        tolerance=tolerance,
        steps=cfg.max_steps,
        ok=verdict(expected, kl_target, kl_opt, tolerance, extra_ok),
        note=note,
        seconds=time.perf_counter() - t0,
        name=name,
        label=label,
        trainer=run.trainer,
        curve=[],
    )


def trainer_rows(suite: Suite) -> list:
    """Every online configuration, trained by ``tether.trainers.online.train_online`` (sampled batches:
    ``shipped.SAMPLES`` completions per prompt per step)."""
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.rloo import RLOOConfig

    ref, r, P = suite.ref, suite.rewards, suite.problem
    rows = []

    def add(name, method, label, **kw):
        rows.append((name, method, lambda: trainer_row(suite, name=name, method=method, label=label, **kw)))

    def pistar():
        return suite.optimum(BETA)

    def ppo(**kw):
        base = dict(beta=BETA, kl_estimator="k1", num_epochs=4, lam=1.0, gamma=1.0)
        return lambda: shipped.online_config(PPOConfig, P, **{**base, **kw})

    rev = "reverse_kl_optimum"
    add(
        "ppo_k1",
        "ppo",
        "k1 in reward, GAE λ=1, critic baseline, whitened",
        config=ppo(),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_k1_critic",
        "ppo",
        "k1 in reward, GAE λ=0.95 (learned critic)",
        config=ppo(lam=0.95),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_exact",
        "ppo",
        "exact in reward (+ direct term)",
        config=ppo(kl_estimator="exact"),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )

    def near_fixed_point(frac):
        def check(run, policy):
            fp = _pg_fixed_point(suite, "k2")
            d, d0 = suite.kl(policy, fp), suite.kl(ref, fp)
            return (
                d < frac * d0,
                f"KL[π‖fixed point] = {d:.3f} = {d / d0:.1%} of π_ref's {d0:.2f} (must be < {frac:.0%})",
                BETA,
            )

        return check

    add(
        "ppo_k2",
        "ppo",
        "k2 in reward",
        config=ppo(kl_estimator="k2", max_steps=150),
        expected="biased: not π* (k2 in the reward has a family of fixed points, lr² being even; it must come within "
        "5% (in KL) of the one the exact expected update reaches from π_ref)",
        target="pg_k2_fixed_point",
        target_policy=lambda: _pg_fixed_point(suite, "k2"),
        check=near_fixed_point(0.05),
    )
    add(
        "ppo_k3",
        "ppo",
        "k3 in reward",
        config=ppo(kl_estimator="k3"),
        expected="biased: not π* (∇KL_rev - ∇KL_fwd: diverges)",
        target="none (diverges)",
        target_policy=None,
        check=lambda run, pol: _diverging_forward_kl(suite)(pol, None),
    )

    # GRPO, G = 2, μ = 2 epochs, KL in the loss. Centred advantages are (G-1)/G x the leave-one-out ones, so
    # GRPO at β behaves as an unbiased method at β·G/(G-1): β is set so that this effective β is BETA.
    G = 2
    beta_g = BETA * (G - 1) / G

    def grpo(**kw):
        base = dict(
            beta=beta_g,
            samples_per_prompt=G,
            num_epochs=2,
            scale_rewards=False,
            loss_aggregation="token_mean",
            max_steps=150,
        )
        return lambda: shipped.online_config(GRPOConfig, P, **{**base, **kw})

    def local():
        return suite.memo("local", lambda: local_kl_optimum(ref, r, BETA))

    def fwd():
        return suite.memo("forward", lambda: forward_kl_optimum(ref, r, BETA))

    add(
        "grpo_k3",
        "grpo",
        "k3 in loss (DeepSeekMath), centred adv.",
        config=grpo(kl_estimator="k3"),
        expected="biased: reaches forward_kl_optimum(βG/(G-1))",
        target="forward_kl_optimum",
        target_policy=fwd,
    )
    add(
        "grpo_k2",
        "grpo",
        "k2 in loss, centred adv.",
        config=grpo(kl_estimator="k2"),
        expected="biased: reaches local_kl_optimum(βG/(G-1))",
        target="local_kl_optimum",
        target_policy=local,
    )
    add(
        "grpo_k3_is",
        "grpo",
        "k3 in loss x π/π_old, centred adv.",
        config=grpo(kl_estimator="k3", kl_placement="loss_is"),
        expected="biased: reaches local_kl_optimum(βG/(G-1))",
        target="local_kl_optimum",
        target_policy=local,
    )
    add(
        "grpo_k3_one_update",
        "grpo",
        "k3 in loss, centred adv., one update per rollout (the update's forward scores)",
        config=grpo(kl_estimator="k3", num_epochs=1, learning_rate=0.1),
        expected="biased: reaches forward_kl_optimum(βG/(G-1))",
        target="forward_kl_optimum",
        target_policy=fwd,
        extra_config={
            "why": "μ = 1: π_old, the KL and the entropy come from the update's own forward, with no scoring "
            "pass (online.scores_from_update); the target is the μ = 2 row's"
        },
    )
    add(
        "grpo_deepseekmath",
        "grpo",
        "k3 in loss, std-scaled adv., seq_mean_token_mean (defaults)",
        config=grpo(kl_estimator="k3", scale_rewards=True, loss_aggregation="seq_mean_token_mean"),
        expected="biased: reaches grpo_fixed_point (E[A|y]/|y| reward, 1/|y|-weighted forward-KL backup)",
        target="grpo_fixed_point",
        target_policy=lambda: grpo_fixed_point(ref, r, beta_g, group_size=G, scale=True, length_weighted=True),
    )

    def rloo(**kw):
        # one update per rollout (REINFORCE): more steps and a larger step size than PPO's 4 epochs need
        base = dict(beta=BETA, samples_per_prompt=4, max_steps=150, learning_rate=0.1)
        return lambda: shipped.online_config(RLOOConfig, P, **{**base, **kw})

    add("rloo_k1", "rloo", "k1 in reward, k=4", config=rloo(), expected="converges", target=rev, target_policy=pistar)
    add(
        "rloo_exact",
        "rloo",
        "exact in reward (+ direct term), k=4",
        config=rloo(kl_estimator="exact"),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )

    # Configurations users run: each changes one setting of ppo_k1 and must still reach its target.
    tau = 0.7

    def tempered(table_scale):
        return lambda pol: TabularPolicy(pol.space, pol.table.detach() * table_scale, trainable=False)

    def pistar_tempered():
        return suite.memo("pistar tempered", lambda: optimal_policy(tempered(1 / tau)(ref), r, BETA))

    add(
        "ppo_temperature",
        "ppo",
        f"k1 in reward, temperature {tau}",
        config=ppo(temperature=tau, max_steps=100),
        expected="converges",
        target=f"reverse_kl_optimum of π_ref^(1/τ) (τ={tau})",
        target_policy=pistar_tempered,
        transform=tempered(1 / tau),
        optimum=pistar_tempered,
        extra_config={
            "why": "the trainer optimises the tempered policy π^(1/τ) against the "
            "tempered reference (docs/theory.md §3)"
        },
    )
    add(
        "ppo_grad_accum",
        "ppo",
        "k1 in reward, 4 micro-batches per update",
        config=ppo(grad_accum=4),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_lora",
        "ppo",
        "k1 in reward, LoRA r=4 on the logit table, LoRA-disabled reference",
        config=ppo(lora_r=4, lora_alpha=8, lora_target_modules=["lm_head"], reference="lora"),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_bf16",
        "ppo",
        "k1 in reward, bfloat16 weights",
        config=ppo(dtype="bfloat16"),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_offload",
        "ppo",
        "k1 in reward, CPU-offloaded reference",
        config=ppo(reference="offload"),
        expected="converges",
        target=rev,
        target_policy=pistar,
    )
    add(
        "ppo_2proc",
        "ppo",
        "k1 in reward, 2 processes (gloo)",
        config=ppo(),
        expected="converges",
        target=rev,
        target_policy=pistar,
        runner=lambda problem, cfg: shipped.run_online_distributed(problem, cfg, world_size=2),
    )

    # Moving references (docs/theory.md §14). A ProRL hard reset after a converged segment re-anchors the KL:
    # segment 2 optimises J - β KL[π‖π*(β)], whose optimum is π*(β)·e^{r/β}/Z = π_ref·e^{2r/β}/Z = π*(β/2).
    add(
        "ppo_ref_reset",
        "ppo",
        "k1 in reward, reference reset to the policy at step 60 of 120 (ProRL)",
        config=ppo(ref_reset_every=60, max_steps=120),
        expected="converges",
        target="reverse_kl_optimum(β/2)",
        target_policy=lambda: suite.optimum(BETA / 2),
        opt_beta=BETA / 2,
        extra_config={
            "why": "two segments, each converging to its reference's optimum: π_ref·e^{r/β}, then "
            "(π_ref·e^{r/β})·e^{r/β} = π*(β/2); 0.56 nats from π*(β)"
        },
    )

    def beyond_fixed_optimum(frac):
        def check(run, policy):
            J = lambda pol: float((pol.sequence_probs().detach() * r).sum(-1).mean())  # noqa: E731
            j, j_star, j_max = J(policy), J(pistar()), float(r.max(-1).values.mean())
            closed = (j - j_star) / (j_max - j_star)
            return (
                closed > frac,
                (
                    f"J(π) = {j:.3f}: {closed:.0%} of the way from J(π*(β)) = {j_star:.3f} to the "
                    f"greedy J_max = {j_max:.3f} (must be > {frac:.0%})"
                ),
                BETA,
            )

        return check

    add(
        "ppo_ref_lag",
        "ppo",
        "k1 in reward, rolling reference 10 steps behind",
        config=ppo(ref_lag=10),
        expected="biased: not π* (a trailing reference anchors nothing: only the greedy policy is a fixed point)",
        target="none (towards the greedy policy)",
        target_policy=None,
        check=beyond_fixed_optimum(0.5),
        extra_config={
            "why": "a stationary π = π_ref zeroes the KL gradient, so the rolling reference is a trust "
            "region over N steps (docs/theory.md §14); the reward must pass π*(β)'s by half the gap "
            "to J_max"
        },
    )

    # PPO's clip is a trust region: one rollout from π_ref optimised for 30 epochs must stay near π_ref.
    rows.append(
        (
            "ppo_clip_trust_region",
            "ppo",
            lambda: _trust_region_row(suite, ppo(num_epochs=30, max_steps=1, lr_schedule="constant")),
        )
    )

    # β controllers (tether.control, built from the trainer's config) driving the shipped PPO.
    kl_target = 0.5  # nats; π*(β = 0.5) has 0.99

    def beta_hat() -> float:
        return suite.memo("beta_hat", lambda: beta_for_kl(ref, r, kl_target))  # the β whose optimum has this KL

    def settles(kind, rel):
        def check(run, policy):
            beta, b_hat = run.history[-1]["beta"], beta_hat()
            kl = float(sequence_kl(policy, ref).detach().mean())  # the final policy's exact KL[π‖π_ref]
            ok = abs(beta - b_hat) / b_hat < rel
            return (
                ok,
                f"final β = {beta:.4f} (β̂ = {b_hat:.4f}), final KL[π‖π_ref] = {kl:.4f} ({kind} target {kl_target})",
                b_hat,
            )

        return check

    add(
        "adaptive_kl",
        "adaptive_kl",
        f"Ziegler controller, KL target {kl_target}",
        config=ppo(beta=1.0, kl_target=kl_target, kl_horizon=5120, max_steps=150),
        expected="converges",
        target="reverse_kl_optimum(β̂)",
        target_policy=lambda: suite.optimum(beta_hat()),
        check=settles("adaptive", 0.05),
        extra_config={"tolerance_why": SAMPLED_WHY + "; also |β - β̂|/β̂ < 5% at the end (β follows the sampled KL)"},
    )
    add(
        "constraint_kl",
        "constraint_kl",
        f"dual ascent, KL budget {kl_target}",
        config=ppo(beta=0.2, kl_budget=kl_target, kl_budget_lr=0.05, max_steps=150),
        expected="converges",
        target="reverse_kl_optimum(β̂)",
        target_policy=lambda: suite.optimum(beta_hat()),
        check=settles("budget", 0.05),
        extra_config={"tolerance_why": SAMPLED_WHY + "; also |β - β̂|/β̂ < 5% at the end"},
    )
    return rows


TRUST_REGION = 0.5  # nats: KL[π_1‖π_ref] after one rollout x 30 epochs with ε = 0.2


def _trust_region_row(suite: Suite, config: Callable) -> Certificate:
    """PPO's clipped surrogate (Eq. 7) stops each token's push once its ratio leaves [1-ε, 1+ε]: however
    many epochs run on one rollout, the policy stays near π_old. Measured with the shipped trainer: 0.23
    nats with ε = 0.2 and 1.59 nats with the clip removed (30 epochs, lr 0.05); the bound 0.5 sits
    between, 2x the first and 3x below the second (softmax coupling lets ratios overshoot the edge, so
    ε alone gives no closed-form bound)."""
    t0 = time.perf_counter()
    cfg = config()
    run = shipped.run_online(suite.problem, cfg)
    kl = suite.kl(run.policy, suite.ref)
    return Certificate(
        method="ppo",
        config={
            "num_epochs": cfg.num_epochs,
            "clip_eps": cfg.clip_eps,
            "max_steps": cfg.max_steps,
            "learning_rate": cfg.learning_rate,
            "trainer_config": "PPOConfig",
            "tolerance_why": _trust_region_row.__doc__.split("Measured")[1].strip(),
        },
        target="π_old = π_ref",
        expected=f"bounded: KL[π_1‖π_ref] <= {TRUST_REGION} (the clip's trust region)",
        kl_to_target=kl,
        kl_to_optimum=suite.kl(run.policy, suite.optimum(BETA)),
        objective_gap=None,
        tolerance=TRUST_REGION,
        steps=cfg.num_epochs,
        ok=verdict("bounded", kl, None, TRUST_REGION),
        note=f"KL[π_1‖π_ref] = {kl:.3f} after 1 rollout x {cfg.num_epochs} epochs",
        seconds=time.perf_counter() - t0,
        name="ppo_clip_trust_region",
        label=f"clip ε={cfg.clip_eps}: one rollout, {cfg.num_epochs} epochs",
        trainer=run.trainer,
        curve=[],
    )


def _pg_fixed_point(suite: Suite, estimator: str) -> TabularPolicy:
    """Where the exact expected update with ``estimator`` detached in the reward goes from π_ref (the
    exact tier, ``certify_online``): the prediction a sampled shipped trainer is checked against when
    theory gives no closed form (k2 in the reward has several fixed points: lr² is even)."""

    def solve():
        policy, _ = train_online(
            suite.problem,
            OnlineSetup("pg", estimator, "reward"),
            FixedBeta(BETA),
            steps=400,
            lr=0.1,
            lr_end=1e-3,
            distance=lambda p: 0.0,
        )
        return TabularPolicy(suite.problem.space, policy.table.detach(), trainable=False)

    return suite.memo(f"pg_fixed_point {estimator}", solve)


# ---- preference losses (tether.ops.preference), exact population loss ---------------------------------------


DPO_ROWS = 1000  # rows the preference dataset is rounded to (``PreferenceData``)


class PreferenceData:
    """The finite dataset the shipped DPO trainer sees, and its exact minimiser.

    The population (``certify_preference.population_pairs``: pairs from π_ref⊗π_ref, Bradley–Terry
    labels, optional flips) gives each unordered pair {i, j} a mass m and a win rate p = P(i ≻ j). The
    dataset has M = round(N·m/Σm) rows of that pair (N = ``DPO_ROWS``), round(M·p) of them with i
    chosen and the rest with j chosen; pairs left with only one direction are dropped (a pair seen
    one way only has no finite minimiser under the sigmoid-type losses). Its loss is the population
    loss with these weights; ``minimiser`` is its exact minimiser (full-batch L-BFGS on
    ``tether.ops.preference.preference_loss``, the function the trainer calls). The trainer row is
    judged against that minimiser, and the minimiser against the closed-form target (the rounding's
    own effect, ``ROUNDING_TOL``)."""

    def __init__(self, suite: Suite, setup: PreferenceSetup):
        from .certify_preference import Pairs, population_pairs

        pop = population_pairs(suite.problem, flip=setup.flip)
        w = {(int(c), int(r)): float(x) for c, r, x in zip(pop.chosen, pop.rejected, pop.weights)}
        unordered = [(i, j) for (i, j) in w if i < j]
        mass = torch.tensor([w[(i, j)] + w[(j, i)] for i, j in unordered], dtype=torch.float64)
        rows_per_pair = torch.round(mass / mass.sum() * DPO_ROWS).long().tolist()
        quantised = []  # (chosen, rejected, count), indices into all_completions()
        for (i, j), M in zip(unordered, rows_per_pair):
            c_ij = int(round(M * w[(i, j)] / (w[(i, j)] + w[(j, i)])))
            if c_ij >= 1 and M - c_ij >= 1:
                quantised += [(i, j, c_ij), (j, i, M - c_ij)]
        K = suite.problem.space.n_sequences
        self.rows = shipped.preference_rows(suite.problem, [(c // K, c % K, r % K, k) for c, r, k in quantised])
        c, r, k = (torch.tensor(col) for col in zip(*quantised))
        self.pairs = Pairs(c, r, k.to(pop.weights.dtype) / k.sum() * pop.weights.sum())  # same total mass
        self.population = pop
        self.kept = len(quantised) // 2, len(unordered)

    def minimiser(self, suite: Suite, setup: PreferenceSetup, *, stages: int = 1) -> TabularPolicy:
        """The exact minimiser of the dataset's loss; with ``stages`` > 1, of the loss whose reference is the
        previous stage's minimiser (a TR-DPO hard sync after convergence)."""

        def solve():
            problem = suite.problem
            for _ in range(stages):
                best = train_preference(problem, setup, BETA_PREF, steps=300, distance=lambda p: 0.0, pairs=self.pairs)[
                    0
                ]
                problem = TabularProblem(
                    problem.space, TabularPolicy(problem.space, best.table.detach(), trainable=False), problem.rewards
                )
            return best

        return suite.memo(f"pref minimiser {setup} x{stages}", solve)

    def loss(self, suite: Suite, setup: PreferenceSetup, policy: TabularPolicy, *, population: bool = False) -> float:
        from tether.ops.kl import seq_sum

        from .certify_preference import population_loss

        full = suite.problem.space.all_completions()
        with torch.no_grad():
            ref_seq = seq_sum(scores_of(suite.ref, full)[1], full.mask)
            return float(
                population_loss(
                    policy, suite.problem, self.population if population else self.pairs, setup, BETA_PREF, ref_seq
                )
            )


PREF_PROBLEM = dict(vocab_size=3, horizon=2, n_prompts=2, seed=0, reward="random")  # 7 sequences per prompt


def preference_rows(suite: Suite) -> list:
    """Every preference loss, trained by ``tether.trainers.dpo.train_dpo`` (precomputed reference unless the
    row says otherwise, full batch of the rounded dataset): it must reach the dataset's exact minimiser,
    which must lie within ``ROUNDING_TOL`` of the closed-form target (``ops.preference.TARGETS``)."""
    # A smaller tree than the online rows' (T = 2: 7 sequences, 21 pairs per prompt), so that every pair is
    # represented by enough rows of the finite dataset for its win rate to round finely.
    suite = suite.memo("preference suite", lambda: Suite(make_problem(**PREF_PROBLEM)))
    ref, r, beta = suite.ref, suite.rewards, BETA_PREF
    rows = []

    def add(
        name,
        method,
        label,
        setup,
        expected,
        target,
        target_seq,
        steps=100,
        lr=0.1,
        note="",
        extra=None,
        check_history=None,
        stages=1,
        progress=PROGRESS,
    ):
        """``target_seq``: the target's (P, K) sequence probabilities (None: π*). ``expected`` "biased: not
        π*" rows must also make ``PROGRESS`` of the way from π_ref to their own loss's infimum."""

        def run():
            t0 = time.perf_counter()
            pistar = suite.optimum(beta)
            target_policy = pistar if target_seq is None else as_policy(ref, target_seq())
            data = suite.memo(f"pref data {setup}", lambda: PreferenceData(suite, setup))
            cfg = shipped.dpo_config(
                suite.problem,
                len(data.rows),
                beta=beta,
                loss_type=setup.loss_type,
                label_smoothing=setup.label_smoothing,
                ipo_length_normalize=setup.ipo_length_normalize,
                f_alpha=setup.alpha,
                simpo_gamma=setup.simpo_gamma,
                max_steps=steps,
                learning_rate=lr,
                **(extra or {}),
            )
            trained = shipped.run_dpo(suite.problem, cfg, data.rows)
            policy = trained.policy
            history_ok, history_note = check_history(trained.history) if check_history else (True, "")
            kl_opt = suite.kl(policy, pistar)
            notes = [
                note() if callable(note) else note,
                history_note,
                f"{data.kept[0]} of {data.kept[1]} pairs kept, {len(data.rows)} rows",
            ]
            ok_extra, kl_target, shown_target = history_ok, None, target
            if expected.startswith("biased") or expected.startswith("no KL anchor"):
                progress_ok, progress_note = _progress(suite, setup, data, policy, progress)
                ok_extra = ok_extra and progress_ok
                notes.append(progress_note)
            else:
                best = data.minimiser(suite, setup, stages=stages)  # what this dataset's loss is minimised by, exactly
                rounding = suite.kl(best, target_policy)
                kl_target = suite.kl(policy, best)
                shown_target = f"{target} (of the finite dataset)"
                ok_extra = ok_extra and rounding < ROUNDING_TOL
                notes.append(
                    f"KL[dataset minimiser‖{target}] = {rounding:.1e} (< {ROUNDING_TOL:.0e}: rounding to rows); "
                    f"KL[trained‖{target}] = {suite.kl(policy, target_policy):.1e}"
                )
            config = {
                "beta": beta,
                **setup.describe(),
                "data": f"{len(data.rows)} explicit rows (PreferenceData)",
                "trainer_config": "DPOConfig",
                "reference": cfg.reference,
                "max_steps": steps,
                "learning_rate": f"{lr} (cosine)",
                "batch": "the whole dataset (deterministic full-batch steps)",
                **(extra or {}),
            }
            return Certificate(
                method=method,
                config=config,
                target=shown_target,
                expected=expected,
                kl_to_target=kl_target,
                kl_to_optimum=kl_opt,
                objective_gap=suite.gap(policy, beta),
                tolerance=TOLERANCE,
                steps=steps,
                ok=verdict(expected, kl_target, kl_opt, TOLERANCE, ok_extra),
                note="; ".join(n for n in notes if n),
                seconds=time.perf_counter() - t0,
                name=name,
                label=label,
                trainer=trained.trainer,
                curve=[],
            )

        rows.append((name, method, run))

    add("dpo", "dpo", "sigmoid (DPO)", PreferenceSetup("sigmoid"), "converges", "reverse_kl_optimum", None)
    add(
        "fdpo_reverse_kl",
        "fdpo_reverse_kl",
        "f-DPO, reverse KL",
        PreferenceSetup("fdpo_reverse_kl"),
        "converges",
        "reverse_kl_optimum",
        None,
    )

    def fwd_note():
        gap = (
            (f_optimum_sequence(ref, r, beta, divergence="forward_kl") - forward_kl_optimum_sequence(ref, r, beta))
            .abs()
            .max()
        )
        return f"f-divergence target = exact.forward_kl_optimum_sequence (max |Δπ| = {float(gap):.1e})"

    add(
        "fdpo_forward_kl",
        "fdpo_forward_kl",
        "f-DPO, forward KL",
        PreferenceSetup("fdpo_forward_kl"),
        "converges",
        "forward_kl_optimum_sequence",
        lambda: forward_kl_optimum_sequence(ref, r, beta),
        steps=250,
        note=fwd_note,
    )
    add(
        "fdpo_js",
        "fdpo_js",
        "f-DPO, Jensen-Shannon",
        PreferenceSetup("fdpo_js"),
        "converges",
        "js_optimum",
        lambda: f_optimum_sequence(ref, r, beta, divergence="js"),
        steps=200,
    )
    add(
        "fdpo_alpha",
        "fdpo_alpha",
        "f-DPO, α-divergence α=0.5",
        PreferenceSetup("fdpo_alpha", alpha=0.5),
        "converges",
        "alpha_optimum(α=0.5)",
        lambda: f_optimum_sequence(ref, r, beta, divergence="alpha", alpha=0.5),
    )
    eps = 0.1
    add(
        "cdpo",
        "cdpo",
        f"cDPO ε={eps}, clean labels",
        PreferenceSetup("cdpo", label_smoothing=eps),
        "converges",
        f"cdpo_optimum(ε={eps})",
        lambda: cdpo_optimum_sequence(ref, r, beta, label_smoothing=eps),
    )
    add(
        "robust_dpo",
        "robust_dpo",
        f"robust DPO ε={eps}, labels flipped at {eps}",
        PreferenceSetup("robust", label_smoothing=eps, flip=eps),
        "converges",
        "reverse_kl_optimum",
        None,
    )
    # ε = 0.2 here: with 7 sequences per prompt few pairs have p > 1 - 0.1, and ε = 0.1's overshoot stays
    # within SEPARATION of π*; at 0.2 the assumed-noise correction visibly overshoots.
    add(
        "robust_dpo_clean",
        "robust_dpo",
        "robust DPO ε=0.2, clean labels",
        PreferenceSetup("robust", label_smoothing=0.2),
        "biased: not π* (assumed noise absent: σ(h) = (p-ε)/(1-2ε) overshoots, no minimiser for p > 1-ε)",
        "none",
        None,
        progress=0.5,
        note="no minimiser: the loss keeps falling with longer runs, so the bar is half of what 600 exact "
        "full-batch Adam steps reach (measured: 70% in 100 trainer steps)",
    )
    add(
        "ipo",
        "ipo",
        "IPO, sequence sums",
        PreferenceSetup("ipo"),
        "converges",
        "ipo_optimum",
        lambda: ipo_optimum_sequence(ref, r, beta),
    )
    add(
        "ipo_length_normalized",
        "ipo",
        "IPO, per-token log-ratios",
        PreferenceSetup("ipo", ipo_length_normalize=True),
        "converges",
        "ipo_optimum(length-normalised)",
        lambda: ipo_optimum_sequence(ref, r, beta, length_normalize=True),
    )
    add(
        "hinge",
        "hinge",
        "SLiC hinge",
        PreferenceSetup("hinge"),
        "biased: not π* (ordering only; minimiser not unique)",
        "none",
        None,
    )
    add(
        "simpo",
        "simpo",
        "SimPO (reference-free)",
        PreferenceSetup("simpo"),
        "no KL anchor: not π* (π_ref plays no role in the loss)",
        "none",
        None,
    )
    add(
        "dpo_live_reference",
        "dpo",
        "sigmoid, live frozen-copy reference",
        PreferenceSetup("sigmoid"),
        "converges",
        "reverse_kl_optimum",
        None,
        extra={"reference": "copy"},
    )
    add(
        "dpo_sync",
        "dpo",
        "TR-DPO hard sync once, at step 100 of 200",
        PreferenceSetup("sigmoid"),
        "converges",
        "reverse_kl_optimum(β/2)",
        lambda: suite.optimum(beta / 2).sequence_probs().detach(),
        steps=200,
        note="after one hard sync θ_ref ← θ ≈ π*(β), the DPO optimum is π*(β)·e^{r/β}/Z = π*(β/2)",
        extra={"reference": "sync", "ref_sync_every": 100},
        stages=2,
    )

    def piecewise(history):
        """β as logged at each step is the value the step used: 2.0 for steps 1-100, then 1.0 (stated by hand)."""
        want = [2.0 if h["step"] <= 100 else 1.0 for h in history]
        got = [h["beta"] for h in history]
        ok = len(got) == 250 and got == want
        return (
            ok,
            f"β trajectory {'=' if ok else '≠'} the stated schedule over {len(got)} steps (2.0 to step 100, then 1.0)",
        )

    add(
        "scheduled_beta",
        "scheduled_beta",
        "piecewise β 2.0 -> 1.0 at step 100 (DPO)",
        PreferenceSetup("sigmoid"),
        "converges",
        "reverse_kl_optimum(β_end)",
        None,
        steps=250,
        check_history=piecewise,
        extra={"beta_schedule": "piecewise", "beta_milestones": [100], "beta_values": [2.0, 1.0]},
    )
    return rows


PROGRESS = 0.9  # "biased: not π*" preference rows: fraction of the way from L(π_ref) to the loss's infimum
ROUNDING_TOL = 1e-3  # KL[dataset minimiser‖closed-form target]: what rounding the population to DPO_ROWS rows may cost


def _progress(
    suite: Suite, setup: PreferenceSetup, data: PreferenceData, policy: TabularPolicy, required: float = PROGRESS
) -> tuple[bool, str]:
    """A row without a closed-form target must still do what its loss asks: reduce the dataset's loss
    by ``PROGRESS`` of the way from π_ref to the infimum found by a long exact (full-batch Adam) run.
    An untrained policy scores 0."""
    inf_policy = suite.memo(
        f"pref inf {setup}",
        lambda: train_preference(
            suite.problem,
            setup,
            BETA_PREF,
            steps=600,
            optimizer="adam",
            lr=0.1,
            distance=lambda p: 0.0,
            pairs=data.pairs,
        )[0],
    )
    l0, l1, linf = (data.loss(suite, setup, p) for p in (suite.ref, policy, inf_policy))
    frac = (l0 - l1) / (l0 - linf) if l0 > linf else float("nan")
    return (
        frac >= required,
        f"loss {l0:.4f} (π_ref) -> {l1:.4f} (trained), infimum ≈ {linf:.4f}: {frac:.0%} of the way (≥ {required:.0%} "
        "required)",
    )


# ---- best-of-n (docs/theory.md §7) ----------------------------------------------------------------------------------


def best_of_n_enumerated(rewards: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    """π_bon by enumeration, independent of ``tether.ops.best_of_n``: (K,), (K,) -> (K,) float64.

    n ≤ 4: every ordered n-tuple of sequences with its probability Π p(y_i), credited to the tuple's
    reward-maximiser (ties: shared equally among the tied members). Larger n: the same enumeration one
    draw at a time — the pair (best of the first m draws, draw m + 1) over all K x K values — which is
    the n-tuple sum regrouped (exact, O(n K²) instead of K^n)."""
    import itertools

    K = probs.shape[0]
    r, p = rewards.to(torch.float64), probs.to(torch.float64)
    if n <= 4:
        tuples = torch.tensor(list(itertools.product(range(K), repeat=n)), dtype=torch.long)  # (K^n, n)
        mass = p[tuples].prod(-1)  # (K^n,) probability of each ordered tuple
        rt = r[tuples]  # (K^n, n)
        winner = rt == rt.max(-1, keepdim=True).values  # (K^n, n) the tuple's maximisers
        share = mass[:, None] * winner / winner.sum(-1, keepdim=True)  # ties share the tuple's mass equally
        return torch.zeros(K, dtype=torch.float64).index_add(0, tuples.reshape(-1), share.reshape(-1))
    dist = p.clone()  # distribution of the best of m = 1 draws
    for _ in range(n - 1):
        new = torch.zeros(K, dtype=torch.float64)
        for i in range(K):
            for j in range(K):
                w = dist[i] * p[j]
                if r[j] > r[i]:
                    new[j] += w
                elif r[j] < r[i]:
                    new[i] += w
                else:
                    new[i] += w / 2
                    new[j] += w / 2
        dist = new
    return dist


def best_of_n_rows(suite: Suite) -> list:
    """Exact KL[π_bon‖π_ref] from ``tether.ops.best_of_n.best_of_n_kl_exact`` (what ``tether bon`` uses),
    checked against an independent enumeration of n-tuples (``best_of_n_enumerated``), below the bound
    log n - (n-1)/n, and approaching it as the largest atom of the reward distribution shrinks (a finer
    problem: V = 4, T = 4, a flatter π_ref, 121 sequences, largest mass 0.14 instead of 0.38)."""
    rows = []
    fine = make_problem(4, 4, n_prompts=1, seed=0, ref_scale=0.3)

    def exact_kl(problem, n):
        probs = problem.ref.sequence_probs().detach()  # (P, K)
        shipped_kl = torch.stack([best_of_n_kl_exact(problem.rewards[x], probs[x], n=n) for x in range(probs.shape[0])])
        enumerated = []
        for x in range(probs.shape[0]):
            q = best_of_n_enumerated(problem.rewards[x], probs[x], n if problem is suite.problem else min(n, 2))
            enumerated.append(float((torch.where(q > 0, q * (q / probs[x]).log(), 0.0)).sum()))
        if problem is not suite.problem and n > 2:
            return shipped_kl, 0.0  # the finer problem (121 sequences) is enumerated at n = 2 only
        return shipped_kl, float((shipped_kl - torch.tensor(enumerated, dtype=torch.float64)).abs().max())

    for n in (2, 4, 16):

        def run(n=n):
            t0 = time.perf_counter()
            bound = best_of_n_kl_bound(n)
            base, agree = exact_kl(suite.problem, n)
            fine_kl, agree_fine = exact_kl(fine, n)
            gap, gap_fine = bound - float(base.mean()), bound - float(fine_kl.mean())
            ok = max(agree, agree_fine) < 1e-10 and bool((base <= bound + 1e-12).all()) and 0 <= gap_fine < gap
            how = "every n-tuple" if n <= 4 else "draw by draw"
            return Certificate(
                method="best_of_n",
                config={
                    "n": n,
                    "bound": bound,
                    "kl_exact_per_prompt": base.tolist(),
                    "kl_exact_fine_problem": float(fine_kl.mean()),
                    "enumeration": how,
                },
                target="log n - (n-1)/n",
                expected="exact KL <= log n - (n-1)/n",
                kl_to_target=gap,
                kl_to_optimum=None,
                objective_gap=None,
                tolerance=bound,
                steps=0,
                ok=ok,
                note=f"KL[π_bon‖π_ref] = {float(base.mean()):.4f} <= bound {bound:.4f} (gap {gap:.4f}; finer problem: "
                f"{gap_fine:.4f}); tether.ops.best_of_n vs enumeration ({how}): {max(agree, agree_fine):.0e}",
                seconds=time.perf_counter() - t0,
                name=f"best_of_n_{n}",
                label=f"n={n}: bound - exact KL",
                trainer="tether.ops.best_of_n.best_of_n_kl_exact",
            )

        rows.append((f"best_of_n_{n}", "best_of_n", run))
    return rows


# ---- the suite -----------------------------------------------------------------------------------------------


def all_rows(suite: Suite) -> list:
    from .certify_filters import filter_rows  # top-k / top-p (docs/theory.md §3)
    from .certify_mismatch import mismatch_rows  # a sampler that is not the trainer (docs/theory.md §3)
    from .certify_positions import position_rows  # position-dependent β (docs/theory.md §12)

    return (
        online_rows(suite)
        + trainer_rows(suite)
        + filter_rows(suite)
        + mismatch_rows(suite)
        + position_rows(suite)
        + preference_rows(suite)
        + best_of_n_rows(suite)
    )


def names(suite: Optional[Suite] = None) -> list[tuple[str, str]]:
    """(name, method) of every configuration, in suite order."""
    return [(n, m) for n, m, _ in all_rows(suite or Suite())]


def select(rows: list, only: Optional[Sequence[str]]) -> list:
    """Rows whose name or method is in ``only`` (all when None); a configuration name wins over a method of
    the same name (``dpo`` is the DPO row; its other configurations are named ``dpo_*``). Unknown names
    raise, listing the choices."""
    if not only:
        return rows
    wanted = set(only)
    names = {n for n, _, _ in rows}
    known = names | {m for _, m, _ in rows}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose from: {', '.join(sorted({m for _, m, _ in rows}))} "
            f"(or a configuration: {', '.join(n for n, _, _ in rows)})"
        )
    methods = wanted - names
    return [row for row in rows if row[0] in wanted or row[1] in methods]


def run_certification(
    only: Optional[Sequence[str]] = None, *, progress: Optional[Callable[[Certificate], None]] = None, jobs: int = 1
) -> list[Certificate]:
    """Run every selected configuration (``only``: method or configuration names), in suite order.

    ``jobs`` > 1 spreads the configurations over that many forked processes (each is independent and
    seeded, so the results are identical to ``jobs=1``)."""
    rows = select(all_rows(Suite()), only)
    if jobs <= 1 or len(rows) <= 1:
        out = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead (restored afterwards)
        try:
            for _, _, run in rows:
                out.append(run())
                if progress is not None:
                    progress(out[-1])
        finally:
            torch.set_num_threads(threads)
        return out
    import importlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    wanted = [name for name, _, _ in rows]
    results: dict[str, Certificate] = {}
    importlib.import_module(
        "torch._dynamo"
    )  # torch.optim imports it on first use (~2 s): once here, inherited by the forks
    ctx = multiprocessing.get_context("fork")  # the children inherit the imported modules: no re-import
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_run_named, name) for name in wanted]
        for fut in as_completed(futures):
            cert = fut.result()
            results[cert.name] = cert
            if progress is not None:
                progress(cert)
    return [results[name] for name in wanted]


def _run_named(name: str) -> Certificate:
    """Worker entry point: rebuild the rows (closures do not pickle) and run one."""
    torch.set_num_threads(1)
    (run,) = [run for n, _, run in all_rows(Suite()) if n == name]
    return run()


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "—"
    return f"{x:.1e}" if abs(x) < 1e-2 or abs(x) >= 1e3 else f"{x:.3f}"


def format_table(certs: Sequence[Certificate], *, markdown: bool = False) -> str:
    """One row per configuration: method, configuration, expected target, KL[π‖target], KL[π‖π*],
    objective gap, steps, verdict."""
    head = (
        "method",
        "configuration",
        "expected target",
        "KL[π‖target]",
        "KL[π‖π*]",
        "objective gap",
        "steps",
        "verdict",
    )
    rows = [head]
    for c in certs:
        expect = c.target if c.expected == "converges" else c.expected
        rows.append(
            (
                c.method,
                c.label,
                expect,
                _fmt(c.kl_to_target),
                _fmt(c.kl_to_optimum),
                _fmt(c.objective_gap),
                str(c.steps),
                "ok" if c.ok else "FAIL",
            )
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)
