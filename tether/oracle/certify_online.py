"""The exact tier of ``tether certify``: REINFORCE with each KL estimator in each placement, on the
tabular oracle, with exact expectations (the estimator × placement theory of docs/theory.md §3).

A configuration names an online method: ``pg`` (REINFORCE, ``REINFORCE`` below: the certifier's own
method, the theory's reference point) or any online method of ``tether.registry`` (``ppo``, ``grpo``,
``rloo``, a registered one). Each update calls the method's own ``prepare`` and ``loss`` — the
functions the trainers run — on the tabular policy's per-token ``logps`` and ``logits`` standing in
for the language model's, so what is certified here is what users run. The shipped trainers are also
certified end to end by running ``train_online`` itself (``oracle.shipped``). The batch:

- **exact** ("infinite batch"): the rollout is every complete sequence of every prompt, each row
  weighted by its probability under the behaviour policy π_old. The rows' weights reach
  ``aggregate_loss`` through ``LossInputs.weights`` with the matching global counts (Σ w for
  sequences, Σ w·|y| for tokens), which is exactly the limit of a batch of N samples as N → ∞.
  Gradients are then exact expectations.
- **sampled**: a finite batch drawn with ``TabularPolicy.sample``, unweighted.

``expected_update_norm`` measures ‖E∇‖ at a policy: zero exactly at a fixed point of a method's
expected dynamics (used where no closed-form fixed point exists).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tether import rng
from tether.control import BetaController, FixedBeta
from tether.ops.kl import ESTIMATORS, check_estimator, kl_loss_term, kl_per_token, seq_sum
from tether.ops.logprobs import selective_logps
from tether.ops.policy import aggregate_loss, gae, reinforce_loss, token_rewards
from tether.registry import METHODS, online_names
from tether.trainers.method import Counts, LossInputs, OnlineMethod, Prepared, reward_kl_direct_term

from .tabular import DTYPE, Completions, TabularPolicy, TabularProblem, reward_of

# ---- REINFORCE: the certifier's own method (the theory's reference point; not a trainer) ------------------


@dataclass(frozen=True)
class ReinforceConfig:
    """The fields ``REINFORCE`` reads (the knobs of ``OnlineSetup`` it uses)."""

    kl_estimator: str = "k1"
    kl_placement: str = "reward"  # reward | loss | loss_is
    loss_aggregation: str = "seq_sum"
    samples_per_prompt: int = 1


def _reinforce_prepare(*, scores, kl_tokens, mask, values=None, cfg: ReinforceConfig, beta: float) -> Prepared:
    """Reward-to-go of the per-token rewards (docs/theory.md §1), with -β·kl_t in them for placement
    ``reward``: GAE with V = 0 and γ = λ = 1. scores (B,), kl_tokens / mask (B, T) -> advantages (B, T)."""
    rewards = token_rewards(scores, kl_tokens, mask, beta=beta if cfg.kl_placement == "reward" else 0.0)  # (B, T)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    return Prepared(adv, rewards=rewards)


def _reinforce_loss(x: LossInputs, *, cfg: ReinforceConfig, beta: float, counts: Counts) -> tuple[torch.Tensor, dict]:
    """-A_t·log π_θ(y_t|s_t), plus β x the KL term for placements ``loss``/``loss_is``, or, in the
    reward, β x the direct term its estimator needs (exact: ``method.reward_kl_direct_term``)."""
    per_token, _ = reinforce_loss(x.logps, x.advantages, x.mask)  # (B, T)
    if cfg.kl_placement == "reward":
        direct = reward_kl_direct_term(cfg, x)
        if direct is not None:
            per_token = per_token + beta * direct
    else:
        full = ESTIMATORS[cfg.kl_estimator].needs_logits
        per_token = (
            per_token
            + beta
            * kl_loss_term(
                x.logps,
                x.ref_logps,
                x.mask,
                estimator=cfg.kl_estimator,
                old_logps=x.old_logps if cfg.kl_placement == "loss_is" else None,
                logits=x.logits if full else None,
                ref_logits=x.ref_logits if full else None,
            ).per_token
        )
    return aggregate_loss(
        per_token, x.mask, mode=cfg.loss_aggregation, num_tokens=counts.tokens, num_seqs=counts.seqs, weights=x.weights
    ), {}


REINFORCE = OnlineMethod(name="pg", prepare=_reinforce_prepare, loss=_reinforce_loss)


def algos() -> tuple[str, ...]:
    """``pg`` and every online method of ``tether.registry``."""
    return ("pg",) + online_names()


def method_and_config(setup: "OnlineSetup") -> tuple[OnlineMethod, object]:
    """The method a setup names and its config, built from the setup's knobs (each method's config takes
    those it has fields for: ``clip_eps``, ``lam``, ``scale_rewards``, ...; γ = 1)."""
    if setup.algo == "pg":
        return REINFORCE, ReinforceConfig(setup.kl_estimator, setup.kl_placement, setup.aggregation, setup.group_size)
    spec = METHODS[setup.algo]
    cls = spec.load("config")
    knobs = dict(
        kl_estimator=setup.kl_estimator,
        kl_placement=setup.kl_placement,
        samples_per_prompt=setup.group_size,
        clip_eps=setup.clip,
        loss_aggregation=setup.aggregation,
        num_epochs=setup.epochs,
        scale_rewards=setup.scale_rewards,
        gamma=1.0,
        lam=setup.gae_lambda,
        whiten_advantages=setup.whiten,
        normalize_advantages=False,
    )
    names = {f.name for f in dataclasses.fields(cls)}
    return spec.load("online"), cls(**{k: v for k, v in knobs.items() if k in names})


@dataclass(frozen=True)
class OnlineSetup:
    """One online configuration (the knobs the trainers expose, plus the certification's own)."""

    algo: str  # pg (REINFORCE) | an online method of tether.registry: ppo | grpo | rloo | ...
    kl_estimator: str = "k1"  # k1 | k2 | k3 | exact
    kl_placement: str = "reward"  # reward | loss | loss_is (a method without a kl_placement field: reward)
    epochs: int = 1  # updates per rollout (PPO epochs, GRPO's μ); > 1 makes later epochs off-policy
    group_size: int = 1  # G (GRPO) / k (RLOO)
    clip: float = 0.2  # PPO Eq. 7 ε
    scale_rewards: bool = True  # GRPO: divide by the group std (False: Dr. GRPO)
    aggregation: str = "seq_sum"  # aggregate_loss mode
    gae_lambda: float = 1.0  # PPO: GAE λ (with λ < 1 the exact critic V^{π_old} is used)
    sampled: int = 0  # 0: exact expectations; n > 0: n sampled completions per prompt per step
    whiten: bool = False  # PPO, sampled runs only: masked_whiten the advantages as the trainer does

    def __post_init__(self):
        if self.algo not in algos():
            raise ValueError(f"algo must be one of {algos()}, got {self.algo!r}")
        check_estimator(self.kl_estimator)
        if self.kl_placement not in ("reward", "loss", "loss_is"):
            raise ValueError(f"kl_placement must be reward | loss | loss_is, got {self.kl_placement!r}")
        if self.whiten and not self.sampled:
            raise ValueError("whiten needs a sampled batch: masked_whiten has no row weights for the exact one")
        if self.sampled and self.group_size > 1 and self.sampled % self.group_size:
            raise ValueError(f"sampled={self.sampled} per prompt must divide into groups of {self.group_size}")
        method, cfg = method_and_config(self)
        if not hasattr(cfg, "kl_placement") and self.kl_placement != "reward":
            raise ValueError(f"{self.algo} puts the KL in the reward (as its trainer does)")
        method.validate(cfg)  # the trainer's own checks (GRPO: a group, a placement with a KL gradient, ...)

    def describe(self) -> dict:
        _, cfg = method_and_config(self)
        d = {"kl_estimator": self.kl_estimator, "kl_placement": self.kl_placement, "epochs": self.epochs}
        if self.group_size > 1:
            d["group_size"] = self.group_size
        if hasattr(cfg, "scale_rewards"):
            d["scale_rewards"] = self.scale_rewards
        if hasattr(cfg, "clip_eps"):
            d["clip"] = self.clip
        if hasattr(cfg, "lam"):
            d["gae_lambda"] = self.gae_lambda
            d["critic"] = "exact V^π_old" if self.gae_lambda < 1 else "none (reward-to-go)"
        d["aggregation"] = self.aggregation
        d["batch"] = f"sampled {self.sampled}/prompt" if self.sampled else "exact (all sequences)"
        return d


# ---- the batch: every sequence (or group) weighted by its probability, or samples ------------------------


@dataclass
class Batch:
    """Rows of completions and their weights; ``seq`` indexes the P·K enumerated rows (None: sampled)."""

    comp: Completions  # (B,) prompt ids, (B, T) tokens and mask
    weights: torch.Tensor  # (B,) π_old(group) per row (exact), or 1 (sampled)
    seq: Optional[torch.Tensor]  # (B,) index into space.all_completions(), exact runs only


def exact_groups(problem: TabularProblem, group_size: int) -> torch.Tensor:
    """(P·K^G·G,) indices into ``all_completions()``: every ordered G-tuple of sequences of each
    prompt, prompt-major, the G members of a group contiguous (as ``group_advantages`` expects)."""
    P, K = problem.space.n_prompts, problem.space.n_sequences
    tuples = torch.tensor(list(itertools.product(range(K), repeat=group_size)), dtype=torch.long)  # (K^G, G)
    return torch.cat([p * K + tuples.reshape(-1) for p in range(P)])


class Context:
    """What one run computes once: the enumerated rows, the reference's scores of them, the groups."""

    def __init__(self, problem: TabularProblem, setup: OnlineSetup):
        self.problem, self.setup = problem, setup
        self.full = problem.space.all_completions()  # P·K rows, canonical order
        self.seq = exact_groups(problem, setup.group_size) if setup.sampled == 0 else None
        self.ref_logits, self.ref_logps = scores_of(problem.ref, self.full)  # (P·K, T, V), (P·K, T)
        self.flat_rewards = problem.rewards.reshape(-1)  # (P·K,) same order as ``full``
        self.method, self.cfg = method_and_config(setup)

    def batch(self, old_logps_full: torch.Tensor, generator: torch.Generator, old: Optional[TabularPolicy]) -> Batch:
        """The rollout's rows: every group weighted by π_old (exact), or fresh samples of π_old."""
        if self.seq is None:
            comp = old.sample(self.setup.sampled, generator=generator)  # prompt-major: groups contiguous
            return Batch(comp, torch.ones(comp.tokens.shape[0], dtype=DTYPE), None)
        G = self.setup.group_size
        probs = old_logps_full.sum(-1).exp()  # (P·K,) π_old(y|x): Σ_t logps of each full row
        w = probs[self.seq].view(-1, G).prod(-1).repeat_interleave(G)  # (B,) probability of the row's group
        f = self.full
        return Batch(Completions(f.prompt_ids[self.seq], f.tokens[self.seq], f.mask[self.seq]), w, self.seq)

    def rows(self, batch: Batch, logits_full: torch.Tensor, logps_full: torch.Tensor, policy: Optional[TabularPolicy]):
        """(B, T, V) logits and (B, T) logps of the batch's rows: indexed from the full rows (exact), or
        scored afresh (sampled)."""
        if batch.seq is None:
            return scores_of(policy, batch.comp)
        return logits_full[batch.seq], logps_full[batch.seq]

    def scores(self, batch: Batch) -> torch.Tensor:
        if batch.seq is None:
            return reward_of(self.problem.rewards, self.problem.space, batch.comp)  # (B,)
        return self.flat_rewards[batch.seq]


def scores_of(policy: TabularPolicy, comp: Completions) -> tuple[torch.Tensor, torch.Tensor]:
    """The language-model interface: next-token logits (B, T, V) and per-token logps (B, T), 0 off-mask
    (what ``TabularPolicy.logps`` computes, keeping the logits for the exact estimator)."""
    logits = policy.logits(comp.prompt_ids, comp.tokens)  # (B, T, V)
    return logits, selective_logps(logits, comp.tokens).masked_fill(~comp.mask, 0.0)


# ---- one rollout: what the trainers' ``prepare`` computes ----------------------------------------------------


@dataclass
class Rollout:
    batch: Batch
    old_logps: torch.Tensor  # (B, T)
    ref_logps: torch.Tensor  # (B, T)
    ref_logits: torch.Tensor  # (B, T, V)
    scores: torch.Tensor  # (B,)
    kl_tokens: torch.Tensor  # (B, T) the configured estimator, on π_old's tokens
    kl_ref: float  # mean exact sequence KL[π_old‖π_ref] (``kl/ref``, what the controllers are fed)
    prep: Optional[Prepared] = None  # the method's ``prepare`` of this rollout
    values: Optional[torch.Tensor] = None  # (B, T) the exact critic's V^{π_old}(s_t) (a method with a value model)

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.comp.mask


def exact_critic(batch: Batch, returns: torch.Tensor, space) -> torch.Tensor:
    """V^{π_old}(s_t) = E[returns_t | s_t] over the weighted rows: the population minimiser of the value
    loss, i.e. a perfect critic. (B, T) -> (B, T), 0 off-mask."""
    mask = batch.comp.mask
    prefix_ids = space.prefix_ids(batch.comp.tokens)  # (B, T) the state each token is emitted from
    pid = batch.comp.prompt_ids[:, None].expand_as(prefix_ids)
    w = batch.weights[:, None].expand_as(returns)
    shape = (space.n_prompts, space.n_prefixes)
    num = torch.zeros(shape, dtype=DTYPE).index_put_(
        (pid[mask], prefix_ids[mask]), (w * returns)[mask], accumulate=True
    )
    den = torch.zeros(shape, dtype=DTYPE).index_put_((pid[mask], prefix_ids[mask]), w[mask], accumulate=True)
    values = num / den.clamp(min=1e-300)
    return torch.where(mask, values[pid, prefix_ids], 0.0)


def collect(
    ctx: Context,
    policy: TabularPolicy,
    beta: float,
    *,
    logits_full: torch.Tensor,
    logps_full: torch.Tensor,
    generator: torch.Generator,
) -> Rollout:
    """Score a rollout of π_old = the current policy and compute its advantages (the method's ``prepare``)."""
    setup, sp = ctx.setup, ctx.problem.space
    old = policy.frozen_copy() if ctx.seq is None else None  # sampled runs draw from (and score) a frozen π_old
    batch = ctx.batch(logps_full.detach(), generator, old)
    mask = batch.comp.mask
    with torch.no_grad():
        logits, old_logps = ctx.rows(batch, logits_full.detach(), logps_full.detach(), old)
        ref_logits, ref_logps = ctx.rows(batch, ctx.ref_logits, ctx.ref_logps, ctx.problem.ref)
        kl_exact = kl_per_token(
            old_logps, ref_logps, mask, estimator="exact", logits=logits, ref_logits=ref_logits
        ).per_token
        kl_tokens = kl_per_token(
            old_logps, ref_logps, mask, estimator=setup.kl_estimator, logits=logits, ref_logits=ref_logits
        ).per_token  # (the logits are read by an estimator that needs them)
    w = batch.weights
    kl_ref = float((w * seq_sum(kl_exact, mask)).sum() / w.sum())  # mean sequence KL (exact estimator)
    scores = ctx.scores(batch)  # (B,)
    ro = Rollout(batch, old_logps, ref_logps, ref_logits, scores, kl_tokens, kl_ref)
    method, cfg = ctx.method, ctx.cfg
    if method.uses_value_model(cfg):  # a perfect value model: V^{π_old} (λ < 1), or none (λ = 1: reward-to-go)
        ro.values = torch.zeros_like(kl_tokens)
        if setup.gae_lambda < 1.0:
            rewards = method.prepare(
                scores=scores, kl_tokens=kl_tokens, mask=mask, values=ro.values, cfg=cfg, beta=beta
            ).rewards
            _, returns = gae(rewards, ro.values, mask, gamma=1.0, lam=1.0)  # reward-to-go of the method's own rewards
            ro.values = exact_critic(batch, returns, sp)
    ro.prep = method.prepare(scores=scores, kl_tokens=kl_tokens, mask=mask, values=ro.values, cfg=cfg, beta=beta)
    return ro


# ---- one update: the method's own ``loss`` ---------------------------------------------------------------


def update_loss(
    ctx: Context,
    policy: TabularPolicy,
    ro: Rollout,
    beta: float,
    *,
    logits_full: torch.Tensor,
    logps_full: torch.Tensor,
) -> torch.Tensor:
    """The scalar loss of one update on the rollout: the method's ``loss`` on the whole (weighted) batch."""
    logits, logps = ctx.rows(ro.batch, logits_full, logps_full, policy)  # with gradients
    w = ro.batch.weights
    mask = ro.mask
    x = LossInputs(
        logps=logps,
        old_logps=ro.old_logps,
        ref_logps=ro.ref_logps,
        mask=mask,
        advantages=ro.prep.advantages,
        adv_scale=ro.prep.adv_scale,
        logits=logits,
        ref_logits=ro.ref_logits,
        values=ro.values,
        old_values=ro.values,
        returns=ro.prep.returns,
        weights=None if ro.batch.seq is None else w,
    )
    loss, _ = ctx.method.loss(x, cfg=ctx.cfg, beta=beta, counts=Counts(tokens=(w * mask.sum(-1)).sum(), seqs=w.sum()))
    return loss


# ---- the loop ---------------------------------------------------------------------------------------------


@dataclass
class Trace:
    steps: int
    curve: list  # [(step, distance to the target)]
    betas: list  # β after each step
    kls: list  # kl/ref of each rollout


def train_online(
    problem: TabularProblem,
    setup: OnlineSetup,
    controller: BetaController,
    *,
    steps: int,
    lr: float,
    lr_end: float,
    distance: Callable[[TabularPolicy], float],
    seed: int = 0,
    n_episodes: int = 1,
    record: int = 60,
    init: Optional[TabularPolicy] = None,
) -> tuple[TabularPolicy, Trace]:
    """Train from π_ref (or ``init``): each step one rollout of the current policy, ``epochs`` Adam
    updates on it, then ``controller.update(kl=kl/ref)``. The learning rate decays geometrically from
    ``lr`` to ``lr_end`` (exact gradients: Adam's normalised steps would otherwise hover at a
    distance ~lr from the fixed point)."""
    policy = TabularPolicy(problem.space, (init or problem.ref).table.detach())
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    ctx = Context(problem, setup)
    gen = rng.generator(seed)
    marks = {0} | {int(round(steps ** (i / record))) for i in range(record + 1)}
    curve, betas, kls = [], [], []
    for step in range(steps):
        if step in marks:
            curve.append((step, distance(policy)))
        beta = controller.value
        for g in opt.param_groups:
            g["lr"] = lr * (lr_end / lr) ** (step / max(steps - 1, 1))
        logits_full, logps_full = scores_of(policy, ctx.full)  # the first epoch's forward is π_old's too
        ro = collect(ctx, policy, beta, logits_full=logits_full, logps_full=logps_full, generator=gen)
        for epoch in range(setup.epochs):
            if epoch > 0:
                logits_full, logps_full = scores_of(policy, ctx.full)
            loss = update_loss(ctx, policy, ro, beta, logits_full=logits_full, logps_full=logps_full)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        controller.update(kl=ro.kl_ref, n_episodes=n_episodes)
        betas.append(controller.value)
        kls.append(ro.kl_ref)
        if not math.isfinite(float(policy.table.detach().abs().max())):
            break
    curve.append((steps, distance(policy)))
    return policy, Trace(steps, curve, betas, kls)


def expected_update_norm(problem: TabularProblem, setup: OnlineSetup, policy: TabularPolicy, beta: float) -> float:
    """‖E[∇ loss]‖ of one on-policy update at ``policy`` (exact expectation): 0 exactly at a fixed point of
    the method's expected dynamics. Used to certify rows whose fixed point has no closed form."""
    if setup.sampled:
        raise ValueError("expected_update_norm needs the exact (enumerated) batch")
    pol = TabularPolicy(problem.space, policy.table.detach().clone())
    ctx = Context(problem, setup)
    logits_full, logps_full = scores_of(pol, ctx.full)
    ro = collect(
        ctx, pol, beta, logits_full=logits_full, logps_full=logps_full, generator=rng.generator(0)
    )  # unused: the batch is enumerated
    loss = update_loss(ctx, pol, ro, beta, logits_full=logits_full, logps_full=logps_full)
    (grad,) = torch.autograd.grad(loss, [pol.table])
    return float(grad.norm())


def fixed(beta: float) -> FixedBeta:
    return FixedBeta(beta)
