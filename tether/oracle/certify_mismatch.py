"""Certificate rows for a sampler that is not the trainer (docs/theory.md §3, ``ops.behaviour``).

The shipped trainers sample through a generation backend (``tether.generation``) that draws from a
deliberately perturbed distribution μ: the policy's logits plus a fixed per-token offset δ
(``PerturbedBackend``), as a fast engine whose kernels or precision shift the logits would. The
backend reports log μ of each token, as every backend does; the trainer scores π_old itself. With
δ = ``DELTA`` the per-token ratio π_old/μ = e^{-δ_a}·Σ_b π_old(b)e^{δ_b} lies in [e^{-0.6}, e^{0.6}]
whatever the policy, so a sequence of at most 3 tokens has W = Π_t π_old/μ ≤ e^{1.8} = 6.05 < ``CAP``:
sequence-level truncated IS never truncates and is exact importance sampling.

- ``*_mismatch_seq_tis`` (PPO and RLOO with k1 and with exact in the reward, GRPO with k3 in the loss and
  centred advantages): the certificate's problem (T = 3), ``behaviour_correction: seq_tis``; each must
  reach the target its on-policy row reaches (π*; ``forward_kl_optimum`` for GRPO, as ``grpo_k3``),
  within ``SAMPLED_TOL``.
- ``ppo_exact_mismatch_token_tis_t1``: a single-token problem (T = 1, V = 5), ``token_tis``: for one token
  the token ratio is the sequence ratio, so it must reach π* too.
- ``*_uncorrected``: the same runs with ``behaviour_correction: none``. Where the limit depends on the
  sampling distribution (GRPO's KL in the loss, the exact estimator's direct term) each must end more
  than ``SEPARATION`` from the target. With k1 in the reward it must *reach* π*: every penalised return
  is β·log Z at π*, so π* is a fixed point under any μ of full support (``K1_WHY``); the correction there
  changes the path and the variance, not the limit. ``tests/test_certify_mutations.py`` also switches the
  correction off inside the corrected rows whose limit moves and checks they turn red.
"""

from __future__ import annotations

import time

import torch

from tether.generation import BuiltinBackend, register_backend

from . import shipped
from .tabular import TabularProblem, make_problem

DELTA = (0.3, 0.0, -0.3)
"""The engine's offset δ on the logits of tokens 0 (eos), 1, 2 (0 on every other token)."""
DELTA_T1 = (0.6, 0.0, -0.6, 0.3, -0.3)
"""The offset on the single-token problem's 5 tokens (per-token ratio in [e^{-0.6}, e^{0.6}])."""
CAP = 10.0
"""behaviour_cap C of the corrected rows: above every ratio these offsets can produce (no truncation)."""
BACKEND = "oracle_perturbed"


class PerturbedLM(torch.nn.Module):
    """``model`` with ``delta`` (V,) added to its next-token logits: what the perturbed engine samples from."""

    def __init__(self, model, delta: torch.Tensor):
        super().__init__()
        self.inner = model
        self.register_buffer("delta", delta, persistent=False)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits = out.logits + self.delta.to(out.logits)
        return out


class PerturbedBackend(BuiltinBackend):
    """The built-in sampler on ``model``'s logits + δ (the first len(δ) tokens; 0 elsewhere). Its
    ``behaviour_logps`` are log μ, the perturbed distribution's, as the sampler records them."""

    name = BACKEND

    def __init__(self, model, *, delta=DELTA):
        super().__init__(model, decoder="hf")
        self.delta = tuple(float(d) for d in delta)

    def generate(self, prompt_ids, settings, generator, *, pad_id, eos_id):
        from tether.sampling import sample

        vocab = int(self.model.config.vocab_size)
        delta = torch.zeros(vocab, dtype=torch.float32)
        delta[: len(self.delta)] = torch.tensor(self.delta)
        return sample(
            PerturbedLM(self.model, delta),
            prompt_ids,
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=settings.max_new_tokens,
            generator=generator,
            decoder="hf",
            **settings.filters(),
        )


def use_delta(delta) -> str:
    """Register the perturbed backend with offset ``delta`` under ``BACKEND`` (the rows run one at a time)."""
    register_backend(BACKEND, lambda model, **options: PerturbedBackend(model, delta=delta))
    return BACKEND


def mismatch_row(
    suite,
    *,
    name: str,
    method: str,
    label: str,
    problem: TabularProblem,
    config,
    delta,
    target: str,
    target_policy,
    corrected: bool,
    opt_beta: float,
    uncorrected_misses: bool = True,
):
    """Train ``config()`` with the perturbed backend and judge the saved policy against ``target_policy``.
    Corrected rows must reach it (< SAMPLED_TOL). Uncorrected rows must miss it (> SEPARATION), except
    where theory says μ cannot move the fixed point (``uncorrected_misses=False``: k1 in the reward,
    see ``K1_WHY``), where they must reach it too."""
    from .certificate import _SHOWN, SAMPLED_TOL, SAMPLED_WHY, SEPARATION, Certificate
    from .exact import log_partition, objective, optimal_policy, sequence_kl

    t0 = time.perf_counter()
    use_delta(delta)
    cfg = config()
    run = shipped.run_online(problem, cfg)
    policy = run.policy
    target_policy = target_policy() if callable(target_policy) else target_policy
    kl_target = float(sequence_kl(policy, target_policy).detach().mean())
    pistar = optimal_policy(problem.ref, problem.rewards, opt_beta)
    kl_opt = float(sequence_kl(policy, pistar).detach().mean())
    gap = float(
        (
            opt_beta * log_partition(problem.ref, problem.rewards, opt_beta)
            - objective(policy, problem.ref, problem.rewards, opt_beta)
        )
        .detach()
        .mean()
    )
    first, last = run.history[0], run.history[-1]
    nan = float("nan")
    note = (
        f"μ = softmax(logits + δ), δ = {tuple(delta)}; step 1: mismatch/kl_k3 = {first.get('mismatch/kl_k3', nan):.4f} "
        f"(k1 {first.get('mismatch/kl_k1', nan):.4f}), ratio π_old/μ in [{first.get('mismatch/ratio_min', nan):.3f}, "
        f"{first.get('mismatch/ratio_max', nan):.3f}]; last step: mismatch/kl_k3 = "
        f"{last.get('mismatch/kl_k3', nan):.4f}, "
        f"cut_token_frac = {last.get('mismatch/cut_token_frac', nan):.3f}, weight_mean = "
        f"{last.get('mismatch/weight_mean', nan):.3f}"
    )
    if corrected or not uncorrected_misses:  # reach the on-policy row's target
        expected, ok = "converges", kl_target < SAMPLED_TOL
        tol, why = SAMPLED_TOL, SAMPLED_WHY
        if not corrected:
            note += f"; uncorrected and still converging: {K1_WHY}"
    else:
        expected = f"biased: misses {target} by more than SEPARATION = {SEPARATION} (no correction for μ ≠ π_old)"
        ok, tol, why = kl_target > SEPARATION, SEPARATION, "an uncorrected run must be measurably off its target"
    config_d = {k: getattr(cfg, k) for k in _SHOWN if hasattr(cfg, k)}
    config_d.update(
        {
            "trainer_config": type(cfg).__name__,
            "optimum_beta": opt_beta,
            "backend": BACKEND,
            "behaviour_correction": cfg.behaviour_correction,
            "behaviour_cap": cfg.behaviour_cap,
            "delta": list(delta),
            "tolerance_why": why,
            "problem": f"V={problem.space.vocab_size}, T={problem.space.horizon}, {problem.space.n_prompts} prompt(s)",
        }
    )
    return Certificate(
        method=method,
        config=config_d,
        target=target,
        expected=expected,
        kl_to_target=kl_target,
        kl_to_optimum=kl_opt,
        objective_gap=gap,
        tolerance=tol,
        steps=cfg.max_steps,
        ok=bool(ok),
        note=note,
        seconds=time.perf_counter() - t0,
        name=name,
        label=label,
        trainer=run.trainer,
        curve=[],
    )


K1_WHY = (
    "with k1 in the reward every penalised return r(y) - β·log(π*(y)/π_ref(y)) equals β·log Z at π*, so every "
    "advantage is 0 there whichever μ drew y: π* is a fixed point under any μ of full support (the correction "
    "changes the path and the variance, not the limit)"
)

CORRECTED_ROWS = (
    "ppo_mismatch_seq_tis",
    "grpo_mismatch_seq_tis",
    "rloo_mismatch_seq_tis",
    "ppo_exact_mismatch_seq_tis",
    "rloo_exact_mismatch_seq_tis",
    "ppo_exact_mismatch_token_tis_t1",
)
"""The rows with the correction on (each has an ``*_uncorrected`` twin)."""


def mismatch_rows(suite) -> list:
    """(name, method, run) of every mismatch row: each corrected row, then its uncorrected twin."""
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.rloo import RLOOConfig

    from .certificate import BETA
    from .exact import forward_kl_optimum, optimal_policy

    P = suite.problem
    single = make_problem(5, 1, n_prompts=2, seed=0)
    G = 2
    beta_g = BETA * (G - 1) / G  # GRPO's centred advantages: effective β = beta_g·G/(G-1) = BETA (certify.trainer_rows)

    def on(correction):
        return dict(backend=BACKEND, behaviour_correction=correction, behaviour_cap=CAP)

    def ppo(problem, **kw):
        base = {**dict(beta=BETA, kl_estimator="k1", num_epochs=4, lam=1.0, gamma=1.0), **kw}
        return lambda c: lambda: shipped.online_config(PPOConfig, problem, **base, **on(c))

    def grpo(**kw):
        base = {
            **dict(
                beta=beta_g,
                samples_per_prompt=G,
                num_epochs=2,
                scale_rewards=False,
                loss_aggregation="token_mean",
                max_steps=150,
                kl_estimator="k3",
            ),
            **kw,
        }
        return lambda c: lambda: shipped.online_config(GRPOConfig, P, **base, **on(c))

    def rloo(**kw):
        base = {**dict(beta=BETA, samples_per_prompt=4, max_steps=150, learning_rate=0.1), **kw}
        return lambda c: lambda: shipped.online_config(RLOOConfig, P, **base, **on(c))

    pistar = lambda: suite.optimum(BETA)  # noqa: E731
    fwd = lambda: suite.memo("forward", lambda: forward_kl_optimum(suite.ref, suite.rewards, BETA))  # noqa: E731
    pistar_t1 = lambda: optimal_policy(single.ref, single.rewards, BETA)  # noqa: E731
    rev = "reverse_kl_optimum"
    # (name prefix, method, label, config(correction), problem, δ, target, its policy, correction, uncorrected misses)
    specs = [
        ("ppo", "ppo", "k1 in reward, GAE λ=1", ppo(P), P, DELTA, rev, pistar, "seq_tis", False),
        ("grpo", "grpo", "k3 in loss, centred adv.", grpo(), P, DELTA, "forward_kl_optimum", fwd, "seq_tis", True),
        ("rloo", "rloo", "k1 in reward, k=4", rloo(), P, DELTA, rev, pistar, "seq_tis", False),
        (
            "ppo_exact",
            "ppo",
            "exact in reward (+ direct term)",
            ppo(P, kl_estimator="exact"),
            P,
            DELTA,
            rev,
            pistar,
            "seq_tis",
            True,
        ),
        (
            "rloo_exact",
            "rloo",
            "exact in reward (+ direct term), k=4",
            rloo(kl_estimator="exact"),
            P,
            DELTA,
            rev,
            pistar,
            "seq_tis",
            True,
        ),
        (
            "ppo_exact",
            "ppo",
            "exact in reward (+ direct term), T = 1",
            ppo(single, kl_estimator="exact"),
            single,
            DELTA_T1,
            rev,
            pistar_t1,
            "token_tis",
            True,
        ),
    ]
    rows = []
    for prefix, method, what, config, problem, delta, target, target_policy, correction, misses in specs:
        suffix = "_t1" if problem is single else ""
        for corrected in (True, False):
            name = f"{prefix}_mismatch_{correction if corrected else 'uncorrected'}{suffix}"
            label = f"{what}, sampler logits + δ, " + (
                f"behaviour_correction: {correction}" if corrected else "no correction"
            )

            def run(
                name=name,
                method=method,
                label=label,
                config=config,
                problem=problem,
                delta=delta,
                target=target,
                target_policy=target_policy,
                corrected=corrected,
                correction=correction,
                misses=misses,
            ):
                return mismatch_row(
                    suite,
                    name=name,
                    method=method,
                    label=label,
                    problem=problem,
                    config=config(correction if corrected else "none"),
                    delta=delta,
                    target=target,
                    target_policy=target_policy,
                    corrected=corrected,
                    opt_beta=BETA,
                    uncorrected_misses=misses,
                )

            rows.append((name, method, run))
    return rows
