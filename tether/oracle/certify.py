"""``tether certify``: every KL-regularised method tether ships, trained on a tabular problem small
enough to enumerate, and measured against the exact optimum (MATH.md §3-§7).

The problem: V = 3 tokens (one is eos), completions of at most T = 3 tokens, 2 prompts (15 complete
sequences each), π_ref with N(0, 1) logits and N(0, 1) rewards, float64. Each method starts from
π_ref and runs the *shipped* math (``tether.ops.kl``, ``tether.ops.policy``,
``tether.ops.preference``, ``tether.control``) on the tabular policy's per-token logps/logits; see
``certify_online`` and ``certify_preference`` for how, and ``certify_targets`` / ``exact`` for the
targets. Expectations are exact (every sequence weighted by its probability: the infinite batch)
except in the rows marked "sampled".

A row's verdict (``Certificate.ok``):

- expected "converges": KL[π_learned‖target] < tolerance (1e-3 for exact runs; sampled runs and the
  controllers state theirs). The target is π* (``reverse_kl_optimum``) or, for a method with another
  regulariser, that regulariser's optimum (IPO, cDPO, f-DPO; ``tether.ops.preference.TARGETS``).
- expected "biased: reaches X": the method's gradient is biased for the reverse-KL objective
  (MATH.md §3); it must reach X (KL[π‖X] < tolerance) *and* stay away from π*
  (KL[π‖π*] > ``SEPARATION``). Both distances are reported.
- expected "biased: not π*": theory gives no closed-form target (or says it diverges); the row
  checks only KL[π‖π*] > ``SEPARATION`` (and, for a divergence, that the divergence is happening).
- best-of-n: its exact KL[π_bon‖π_ref] (``tether.ops.best_of_n``, cross-checked against
  ``exact.best_of_n_kl``) must lie below the bound log n - (n-1)/n.

``steps`` counts gradient evaluations: optimiser updates for the online methods (outer steps x
epochs), L-BFGS function evaluations or Adam steps for the preference losses. ``objective_gap`` is
β log Z - J(π) = β·KL[π‖π*] for the β whose π* the row compares to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch

from tether.control import AdaptiveKLController, ConstraintBeta, FixedBeta, ScheduledBeta
from tether.ops.best_of_n import best_of_n_kl_exact
from tether.ops.policy import best_of_n_kl_bound

from .certify_online import OnlineSetup, train_online
from .certify_preference import PreferenceSetup, train_preference
from .certify_targets import (
    as_policy, beta_for_kl, cdpo_optimum_sequence, f_optimum_sequence, grpo_fixed_point, ipo_optimum_sequence,
    local_kl_optimum,
)
from .exact import (
    best_of_n_kl, forward_kl_optimum, forward_kl_optimum_sequence, log_partition, objective, optimal_policy, sequence_kl,
)
from .tabular import TabularPolicy, TabularProblem, make_problem

TOLERANCE = 1e-3  # KL[π‖target] for exact-expectation runs (the brief's bar)
SEPARATION = 1e-2  # a biased method must end at least this far (KL[π‖π*]) from π*: 10x the tolerance
BETA = 0.5  # online methods: KL[π*‖π_ref] = 0.99 nats on this problem
BETA_PREF = 1.0  # preference losses: KL[π*‖π_ref] = 0.21 nats; their targets (forward KL, JS) lie far out at 0.5
PROBLEM = dict(vocab_size=3, horizon=3, n_prompts=2, seed=0, reward="random")
SAMPLED_WHY = ("Monte-Carlo gradient noise: with 256 samples per prompt and the learning rate decayed to 2e-3 the "
               "policy ends 0.7e-3-1.6e-3 nats from π* over seeds 0-4 (both sampled rows); 1e-2 is 6x the worst of "
               "those and still 6x below the nearest biased target (local_kl_optimum, 0.061), so a biased "
               "gradient cannot pass")


@dataclass
class Certificate:
    """One certified configuration (one row of the table, one object of the JSON)."""

    method: str
    config: dict
    target: str
    expected: str
    kl_to_target: Optional[float]  # KL[π_learned‖target] (None when theory gives no target)
    kl_to_optimum: Optional[float]  # KL[π_learned‖π*] of the same β (None for best-of-n: nothing is trained)
    objective_gap: Optional[float]  # β log Z - J(π) = β KL[π‖π*] ≥ 0, mean over prompts
    tolerance: float
    steps: int
    ok: bool
    note: str = ""
    seconds: float = 0.0
    name: str = ""  # unique id of the configuration (what --only also accepts)
    label: str = ""  # the configuration in a few words, for the table
    curve: list = field(default_factory=list)  # [(step, distance plotted)], not written to JSON

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        return d


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
        """β log Z - J(π) (MATH.md §5), mean over prompts."""
        return float((beta * log_partition(self.ref, self.rewards, beta) - objective(policy, self.ref, self.rewards, beta)).detach().mean())

    def greedy_distance(self, policy: TabularPolicy) -> float:
        """KL[δ_{y_max}‖π] = -log π(y_max|x), mean over prompts: the distance to the reward-maximising
        (deterministic) policy; KL[π‖δ] is infinite until π is deterministic, so it is measured this way."""
        return float(-policy.sequence_log_probs().detach().gather(1, self.y_max[:, None]).mean())


# ---- the verdict ------------------------------------------------------------------------------------------


def verdict(expected: str, kl_to_target: Optional[float], kl_to_optimum: Optional[float], tolerance: float,
            extra: bool = True) -> bool:
    """The rules of the module docstring; ``extra``: the row's own additional evidence (controllers'
    settled β, a divergence actually happening)."""
    reached = kl_to_target is not None and math.isfinite(kl_to_target) and kl_to_target < tolerance
    away = kl_to_optimum is not None and kl_to_optimum > SEPARATION  # NaN compares False: not away
    if expected == "converges":
        return reached and extra
    if expected.startswith("biased: reaches"):
        return reached and away and extra
    if expected.startswith("biased") or expected.startswith("no KL anchor"):
        return away and extra
    raise ValueError(f"unknown expectation {expected!r}")


# ---- online rows ------------------------------------------------------------------------------------------


def online_row(suite: Suite, *, name: str, method: str, label: str, setup: OnlineSetup, expected: str, target: str,
               target_policy: Optional[TabularPolicy], steps: int, lr: float = 0.1, lr_end: float = 2e-3,
               beta: float = BETA, tolerance: float = TOLERANCE, controller=None, seed: int = 0, n_episodes: int = 1,
               check: Optional[Callable] = None, extra_config: Optional[dict] = None,
               opt_beta: Optional[float] = None) -> Certificate:
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
        distance = (lambda p: suite.kl(p, target_policy)) if target_policy is not None else (lambda p: suite.kl(p, suite.optimum(opt_beta)))
    policy, trace = train_online(suite.problem, setup, controller, steps=steps, lr=lr, lr_end=lr_end,
                                 distance=distance, seed=seed, n_episodes=n_episodes)
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
    config = {"algo": setup.algo, "beta": "controlled" if controlled else beta, **setup.describe(), "steps": steps,
              "adam_lr": f"{lr} -> {lr_end}", **({"optimum_beta": opt_beta} if opt_beta != beta else {}), **(extra_config or {})}
    return Certificate(
        method=method, config=config, target=target, expected=expected, kl_to_target=kl_target, kl_to_optimum=kl_opt,
        objective_gap=suite.gap(policy, opt_beta), tolerance=tolerance, steps=steps * setup.epochs,
        ok=verdict(expected, kl_target, kl_opt, tolerance, extra_ok), note=note, seconds=time.perf_counter() - t0,
        name=name, label=label, curve=trace.curve)


def _diverging_forward_kl(suite: Suite):
    """k3 in the reward ascends E r - β(KL[π‖π_ref] - Σ_t E KL[π_ref‖π](s_t)) (MATH.md §3), unbounded
    above: some token's probability is driven to 0 and the forward KL[π_ref‖π] grows without bound.
    Evidence: the final forward KL is far above π*'s and still rising over the last half."""
    def check(policy, trace):
        fwd_opt = float(sequence_kl(suite.ref, suite.optimum(BETA)).mean())
        fwd = float(sequence_kl(suite.ref, policy).detach().mean())
        ok = fwd > 5 * fwd_opt
        return ok, f"forward KL[π_ref‖π] = {fwd:.1f} nats (π*: {fwd_opt:.2f}), min π(y) = {float(policy.sequence_probs().detach().min()):.1e}", BETA

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

    # Policy gradient (REINFORCE, exact expectation, reward-to-go), KL in the reward: MATH.md §3 rows 1 and 5.
    for est in ("k1", "exact"):
        add(f"pg_kl_reward_{est}", f"pg_kl_reward_{est}", f"REINFORCE, {est} in reward" + (" (+ its direct term)" if est == "exact" else ""),
            setup=OnlineSetup("pg", est, "reward"), expected="converges", target=rev, target_policy=pistar, **pg)
    add("pg_kl_reward_k2", "pg_kl_reward_k2", "REINFORCE, k2 in reward", setup=OnlineSetup("pg", "k2", "reward"),
        expected="biased: not π* (score-function gradient of the biased value lr²/2: no KL target)", target="none",
        target_policy=None, **pg)
    add("pg_kl_reward_k3", "pg_kl_reward_k3", "REINFORCE, k3 in reward", setup=OnlineSetup("pg", "k3", "reward"),
        expected="biased: not π* (∇KL_rev - ∇KL_fwd: diverges)", target="none (diverges)", target_policy=None,
        check=_diverging_forward_kl(suite), **pg)

    # Policy gradient of the score + β x KL term in the loss (states held fixed): MATH.md §3 rows 2-4, 6.
    add("pg_kl_loss_k1", "pg_kl_loss_k1", "REINFORCE + k1 in loss", setup=OnlineSetup("pg", "k1", "loss"),
        expected="biased: reaches reward_max (k1's expected gradient is 0: no regularisation)", target="reward_max",
        target_policy=None, tolerance=0.1, steps=200, lr=0.2, lr_end=0.2,
        extra_config={"tolerance_why": "distance = -log π(y_max); unregularised ascent approaches the deterministic "
                      "policy only asymptotically (logits grow without bound), so 0.1 nats = π(y_max) > 0.9"})
    for est, place, tgt, tname in (
        ("k2", "loss", local, "local_kl_optimum"), ("k3", "loss", fwd, "forward_kl_optimum"),
        ("exact", "loss", local, "local_kl_optimum"), ("k1", "loss_is", local, "local_kl_optimum"),
        ("k3", "loss_is", local, "local_kl_optimum"), ("exact", "loss_is", local, "local_kl_optimum"),
    ):
        suffix = "_is" if place == "loss_is" else ""
        add(f"pg_kl_loss{suffix}_{est}", f"pg_kl_loss{suffix}_{est}",
            f"REINFORCE + {est} in loss" + (" x π/π_old" if suffix else ""), setup=OnlineSetup("pg", est, place),
            expected=f"biased: reaches {tname}", target=tname, target_policy=tgt, **pg)
    add("pg_kl_loss_is_k2", "pg_kl_loss_is_k2", "REINFORCE + k2 in loss x π/π_old", setup=OnlineSetup("pg", "k2", "loss_is"),
        expected="biased: not π* (per-state penalty Σπ·lr²/2: non-convex, vanishes as π → 0)", target="none",
        target_policy=None, **pg)

    # PPO (clipped surrogate, 4 epochs over the exact rollout, token_mean), KL in the reward (tether.trainers.ppo).
    ppo = dict(steps=80, lr=0.1, lr_end=1e-3)
    add("ppo_k1", "ppo", "k1 in reward, GAE λ=1 (reward-to-go)", setup=OnlineSetup("ppo", "k1", "reward", epochs=4, aggregation="token_mean"),
        expected="converges", target=rev, target_policy=pistar, **ppo)
    add("ppo_k1_critic", "ppo", "k1 in reward, GAE λ=0.95, exact critic", setup=OnlineSetup("ppo", "k1", "reward", epochs=4, aggregation="token_mean", gae_lambda=0.95),
        expected="converges", target=rev, target_policy=pistar, **ppo)
    add("ppo_exact", "ppo", "exact in reward (+ direct term)", setup=OnlineSetup("ppo", "exact", "reward", epochs=4, aggregation="token_mean"),
        expected="converges", target=rev, target_policy=pistar, **ppo)
    add("ppo_k2", "ppo", "k2 in reward", setup=OnlineSetup("ppo", "k2", "reward", epochs=4, aggregation="token_mean"),
        expected="biased: not π* (k2 in the reward: no KL target)", target="none", target_policy=None, **ppo)
    add("ppo_k3", "ppo", "k3 in reward", setup=OnlineSetup("ppo", "k3", "reward", epochs=4, aggregation="token_mean"),
        expected="biased: not π* (∇KL_rev - ∇KL_fwd: diverges)", target="none (diverges)", target_policy=None,
        check=_diverging_forward_kl(suite), **ppo)
    add("ppo_k1_sampled", "ppo", "k1 in reward, sampled 256/prompt, whitened",
        setup=OnlineSetup("ppo", "k1", "reward", epochs=4, aggregation="token_mean", sampled=256, whiten=True),
        expected="converges", target=rev, target_policy=pistar, steps=100, lr=0.05, lr_end=2e-3, tolerance=1e-2,
        extra_config={"tolerance_why": SAMPLED_WHY})

    # GRPO: group of G = 2 (every ordered pair, exact), clipped surrogate with μ = 2 epochs, KL in the loss.
    # Centred advantages are (G-1)/G x the leave-one-out ones, so GRPO at β behaves as an unbiased method
    # at β·G/(G-1): β is set so that this effective β is BETA, and π* below is π*(BETA).
    G = 2
    beta_g = BETA * (G - 1) / G
    grpo = dict(steps=120, lr=0.1, lr_end=2e-3, beta=beta_g)
    drgrpo = dict(group_size=G, epochs=2, scale_rewards=False, aggregation="token_mean")
    add("grpo_k3", "grpo", "k3 in loss (DeepSeekMath), centred adv.", setup=OnlineSetup("grpo", "k3", "loss", **drgrpo),
        expected="biased: reaches forward_kl_optimum(βG/(G-1))", target="forward_kl_optimum", target_policy=fwd,
        opt_beta=BETA, **grpo)
    add("grpo_k2", "grpo", "k2 in loss, centred adv.", setup=OnlineSetup("grpo", "k2", "loss", **drgrpo),
        expected="biased: reaches local_kl_optimum(βG/(G-1))", target="local_kl_optimum", target_policy=local,
        opt_beta=BETA, **grpo)
    add("grpo_k3_is", "grpo", "k3 in loss x π/π_old, centred adv.", setup=OnlineSetup("grpo", "k3", "loss_is", **drgrpo),
        expected="biased: reaches local_kl_optimum(βG/(G-1))", target="local_kl_optimum", target_policy=local,
        opt_beta=BETA, **grpo)
    add("grpo_deepseekmath", "grpo", "k3 in loss, std-scaled adv., seq_mean_token_mean (defaults)",
        setup=OnlineSetup("grpo", "k3", "loss", group_size=G, epochs=2, scale_rewards=True, aggregation="seq_mean_token_mean"),
        expected="biased: reaches grpo_fixed_point (E[A|y]/|y| reward, 1/|y|-weighted forward-KL backup)",
        target="grpo_fixed_point", target_policy=lambda: grpo_fixed_point(ref, r, beta_g, group_size=G, scale=True, length_weighted=True),
        **grpo)

    # RLOO: k = 2 (every ordered pair), leave-one-out baseline, KL in the reward, seq_sum (tether.trainers.rloo).
    rloo = dict(steps=200)
    add("rloo_k1", "rloo", "k1 in reward, k=2", setup=OnlineSetup("rloo", "k1", "reward", group_size=2),
        expected="converges", target=rev, target_policy=pistar, **rloo)
    add("rloo_exact", "rloo", "exact in reward (+ direct term), k=2", setup=OnlineSetup("rloo", "exact", "reward", group_size=2),
        expected="converges", target=rev, target_policy=pistar, **rloo)
    add("rloo_k1_sampled", "rloo", "k1 in reward, k=4, sampled 256/prompt",
        setup=OnlineSetup("rloo", "k1", "reward", group_size=4, sampled=256),
        expected="converges", target=rev, target_policy=pistar, steps=200, lr=0.05, lr_end=2e-3, tolerance=1e-2,
        extra_config={"tolerance_why": SAMPLED_WHY})
    return rows


# ---- β controllers (tether.control) driving exact PPO -------------------------------------------------------


def controller_rows(suite: Suite) -> list:
    """The adaptive (Ziegler) controller must settle on the β̂ whose optimum has the target KL, and the
    policy on π*(β̂); the constraint (dual-ascent) controller likewise, from a β that violates the budget;
    a cosine schedule must end at π*(β_end). All drive exact PPO (k1 in the reward, 2 epochs)."""
    ref, r = suite.ref, suite.rewards
    kl_target = 0.5  # nats; π*(β = 0.5) has 0.99
    setup = OnlineSetup("ppo", "k1", "reward", epochs=2, aggregation="token_mean")
    steps = 200

    def beta_hat() -> float:
        return suite.memo("beta_hat", lambda: beta_for_kl(ref, r, kl_target))  # the β whose optimum has this KL

    def settles(kind):
        def check(policy, trace):
            beta, b_hat = trace.betas[-1], beta_hat()
            kl = float(sequence_kl(policy, ref).detach().mean())  # the final policy's exact KL[π‖π_ref]
            near = abs(kl - kl_target) < 2e-3 if kind == "adaptive" else kl <= kl_target + 2e-3
            ok = abs(beta - b_hat) / b_hat < 0.01 and near
            return ok, f"final β = {beta:.4f} (β̂ = {b_hat:.4f}), final KL[π‖π_ref] = {kl:.4f} (target {kl_target})", b_hat
        return check

    def adaptive():
        return online_row(suite, name="adaptive_kl", method="adaptive_kl", label=f"Ziegler controller, KL target {kl_target}",
                          setup=setup, expected="converges", target=f"reverse_kl_optimum(β̂={beta_hat():.3f})",
                          target_policy=lambda: suite.optimum(beta_hat()), steps=steps, lr=0.1, lr_end=2e-3,
                          controller=AdaptiveKLController(1.0, target=kl_target, horizon=10000), n_episodes=300,
                          check=settles("adaptive"),
                          extra_config={"init_beta": 1.0, "kl_target": kl_target, "horizon": 10000, "n_episodes": 300,
                                        "tolerance_why": "also: |β - β̂|/β̂ < 1% and |KL - target| < 2e-3 at the end"})

    def constraint():
        return online_row(suite, name="constraint_kl", method="constraint_kl", label=f"dual ascent, KL budget {kl_target}",
                          setup=setup, expected="converges", target=f"reverse_kl_optimum(β̂={beta_hat():.3f})",
                          target_policy=lambda: suite.optimum(beta_hat()), steps=steps, lr=0.1, lr_end=2e-3,
                          controller=ConstraintBeta(0.2, budget=kl_target, lr=0.05), check=settles("constraint"),
                          extra_config={"init_beta": 0.2, "kl_budget": kl_target, "dual_lr": 0.05,
                                        "tolerance_why": "also: |β - β̂|/β̂ < 1% and KL <= budget + 2e-3 at the end (dual "
                                        "ascent approaches the budget from both sides)"})

    def scheduled():
        return online_row(suite, name="scheduled_beta", method="scheduled_beta", label="cosine β 2.0 -> 0.5 over 100 steps",
                          setup=setup, expected="converges", target="reverse_kl_optimum", target_policy=lambda: suite.optimum(BETA),
                          steps=steps, lr=0.1, lr_end=2e-3, controller=ScheduledBeta("cosine", start=2.0, end=BETA, total_steps=100),
                          extra_config={"schedule": "cosine", "beta_start": 2.0, "beta_end": BETA, "total_steps": 100})

    return [("adaptive_kl", "adaptive_kl", adaptive), ("constraint_kl", "constraint_kl", constraint),
            ("scheduled_beta", "scheduled_beta", scheduled)]


# ---- preference losses (tether.ops.preference), exact population loss ---------------------------------------


def preference_rows(suite: Suite) -> list:
    ref, r, beta = suite.ref, suite.rewards, BETA_PREF
    rows = []

    def add(name, method, label, setup, expected, target, target_seq, optimizer="lbfgs", steps=100, lr=1.0, note=""):
        """``target_seq``: a function giving the target's (P, K) sequence probabilities (None: π*)."""
        def run():
            t0 = time.perf_counter()
            pistar = suite.optimum(beta)
            target_policy = pistar if target_seq is None else as_policy(ref, target_seq())
            note_ = note() if callable(note) else note
            policy, curve, taken = train_preference(
                suite.problem, setup, beta, steps=steps, optimizer=optimizer, lr=lr,
                distance=lambda p: suite.kl(p, target_policy))
            kl_opt = suite.kl(policy, pistar)
            kl_target = None if target == "none" else suite.kl(policy, target_policy)
            config = {"beta": beta, **setup.describe(), "optimizer": f"{optimizer} ({steps} {'iterations' if optimizer == 'lbfgs' else 'steps'} max)"}
            return Certificate(
                method=method, config=config, target=target, expected=expected, kl_to_target=kl_target,
                kl_to_optimum=kl_opt, objective_gap=suite.gap(policy, beta), tolerance=TOLERANCE, steps=taken,
                ok=verdict(expected, kl_target, kl_opt, TOLERANCE), note=note_, seconds=time.perf_counter() - t0,
                name=name, label=label, curve=curve)
        rows.append((name, method, run))

    add("dpo", "dpo", "sigmoid (DPO)", PreferenceSetup("sigmoid"), "converges", "reverse_kl_optimum", None)
    add("fdpo_reverse_kl", "fdpo_reverse_kl", "f-DPO, reverse KL", PreferenceSetup("fdpo_reverse_kl"), "converges",
        "reverse_kl_optimum", None)
    def fwd_note():
        gap = (f_optimum_sequence(ref, r, beta, divergence="forward_kl") - forward_kl_optimum_sequence(ref, r, beta)).abs().max()
        return f"f-divergence target = exact.forward_kl_optimum_sequence (max |Δπ| = {float(gap):.1e})"

    add("fdpo_forward_kl", "fdpo_forward_kl", "f-DPO, forward KL", PreferenceSetup("fdpo_forward_kl"), "converges",
        "forward_kl_optimum_sequence", lambda: forward_kl_optimum_sequence(ref, r, beta), steps=250, note=fwd_note)
    add("fdpo_js", "fdpo_js", "f-DPO, Jensen-Shannon", PreferenceSetup("fdpo_js"), "converges", "js_optimum",
        lambda: f_optimum_sequence(ref, r, beta, divergence="js"), steps=200)
    add("fdpo_alpha", "fdpo_alpha", "f-DPO, α-divergence α=0.5", PreferenceSetup("fdpo_alpha", alpha=0.5), "converges",
        "alpha_optimum(α=0.5)", lambda: f_optimum_sequence(ref, r, beta, divergence="alpha", alpha=0.5))
    eps = 0.1
    add("cdpo", "cdpo", f"cDPO ε={eps}, clean labels", PreferenceSetup("cdpo", label_smoothing=eps), "converges",
        f"cdpo_optimum(ε={eps})", lambda: cdpo_optimum_sequence(ref, r, beta, label_smoothing=eps))
    add("robust_dpo", "robust_dpo", f"robust DPO ε={eps}, labels flipped at {eps}",
        PreferenceSetup("robust", label_smoothing=eps, flip=eps), "converges", "reverse_kl_optimum", None)
    add("robust_dpo_clean", "robust_dpo", f"robust DPO ε={eps}, clean labels", PreferenceSetup("robust", label_smoothing=eps),
        "biased: not π* (assumed noise absent: σ(h) = (p-ε)/(1-2ε) overshoots, no minimiser for p > 1-ε)", "none", None,
        optimizer="adam", steps=200, lr=0.1)
    add("ipo", "ipo", "IPO, sequence sums", PreferenceSetup("ipo"), "converges", "ipo_optimum",
        lambda: ipo_optimum_sequence(ref, r, beta))
    add("ipo_length_normalized", "ipo", "IPO, per-token log-ratios", PreferenceSetup("ipo", ipo_length_normalize=True),
        "converges", "ipo_optimum(length-normalised)", lambda: ipo_optimum_sequence(ref, r, beta, length_normalize=True))
    add("hinge", "hinge", "SLiC hinge", PreferenceSetup("hinge"), "biased: not π* (ordering only; minimiser not unique)",
        "none", None, optimizer="adam", steps=200, lr=0.1)
    add("simpo", "simpo", "SimPO (reference-free)", PreferenceSetup("simpo"),
        "no KL anchor: not π* (π_ref plays no role in the loss)", "none", None)
    return rows


# ---- best-of-n (MATH.md §7) ----------------------------------------------------------------------------------


def best_of_n_rows(suite: Suite) -> list:
    """Exact KL[π_bon‖π_ref] from ``tether.ops.best_of_n.best_of_n_kl_exact`` (what ``tether bon`` uses),
    equal to the oracle's ``exact.best_of_n_kl``, below the bound log n - (n-1)/n, and approaching it
    as the largest atom of the reward distribution shrinks (a finer problem: V = 4, T = 4, a flatter
    π_ref, 121 sequences, largest mass 0.14 instead of 0.38)."""
    rows = []
    fine = make_problem(4, 4, n_prompts=1, seed=0, ref_scale=0.3)

    def exact_kl(problem, n):
        probs = problem.ref.sequence_probs().detach()  # (P, K)
        shipped = torch.stack([best_of_n_kl_exact(problem.rewards[x], probs[x], n=n) for x in range(probs.shape[0])])
        return shipped, float((shipped - best_of_n_kl(problem.rewards, probs, n=n)).abs().max())

    for n in (2, 4, 16):
        def run(n=n):
            t0 = time.perf_counter()
            bound = best_of_n_kl_bound(n)
            base, agree = exact_kl(suite.problem, n)
            fine_kl, agree_fine = exact_kl(fine, n)
            gap, gap_fine = bound - float(base.mean()), bound - float(fine_kl.mean())
            ok = max(agree, agree_fine) < 1e-10 and bool((base <= bound + 1e-12).all()) and 0 <= gap_fine < gap
            return Certificate(
                method="best_of_n", config={"n": n, "bound": bound, "kl_exact_per_prompt": base.tolist(),
                                            "kl_exact_fine_problem": float(fine_kl.mean())},
                target="log n - (n-1)/n", expected="exact KL <= log n - (n-1)/n", kl_to_target=gap,
                kl_to_optimum=None, objective_gap=None, tolerance=bound, steps=0, ok=ok,
                note=f"KL[π_bon‖π_ref] = {float(base.mean()):.4f} <= bound {bound:.4f} (gap {gap:.4f}; finer problem: "
                     f"{gap_fine:.4f}); tether.ops.best_of_n vs oracle: {max(agree, agree_fine):.0e}",
                seconds=time.perf_counter() - t0, name=f"best_of_n_{n}", label=f"n={n}: bound - exact KL")
        rows.append((f"best_of_n_{n}", "best_of_n", run))
    return rows


# ---- the suite -----------------------------------------------------------------------------------------------


def all_rows(suite: Suite) -> list:
    return online_rows(suite) + controller_rows(suite) + preference_rows(suite) + best_of_n_rows(suite)


def names(suite: Optional[Suite] = None) -> list[tuple[str, str]]:
    """(name, method) of every configuration, in suite order."""
    return [(n, m) for n, m, _ in all_rows(suite or Suite())]


def select(rows: list, only: Optional[Sequence[str]]) -> list:
    """Rows whose method or name is in ``only`` (all when None); unknown names raise, listing the choices."""
    if not only:
        return rows
    wanted = set(only)
    known = {n for n, _, _ in rows} | {m for _, m, _ in rows}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from: {', '.join(sorted({m for _, m, _ in rows}))} "
                         f"(or a configuration: {', '.join(n for n, _, _ in rows)})")
    return [row for row in rows if row[0] in wanted or row[1] in wanted]


def run_certification(only: Optional[Sequence[str]] = None, *, progress: Optional[Callable[[Certificate], None]] = None,
                      jobs: int = 1) -> list[Certificate]:
    """Run every selected configuration (``only``: method or configuration names), in suite order.

    ``jobs`` > 1 spreads the configurations over that many forked processes (each is independent and
    seeded, so the results are identical to ``jobs=1``)."""
    rows = select(all_rows(Suite()), only)
    if jobs <= 1 or len(rows) <= 1:
        out = []
        for _, _, run in rows:
            out.append(run())
            if progress is not None:
                progress(out[-1])
        return out
    import importlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    wanted = [name for name, _, _ in rows]
    results: dict[str, Certificate] = {}
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use (~2 s): once here, inherited by the forks
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
    head = ("method", "configuration", "expected target", "KL[π‖target]", "KL[π‖π*]", "objective gap", "steps", "verdict")
    rows = [head]
    for c in certs:
        expect = c.target if c.expected == "converges" else c.expected
        rows.append((c.method, c.label, expect, _fmt(c.kl_to_target), _fmt(c.kl_to_optimum), _fmt(c.objective_gap),
                     str(c.steps), "ok" if c.ok else "FAIL"))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)
