"""The exact tier of ``tether certify``: REINFORCE with each KL estimator in each placement, on the
tabular oracle, with exact expectations (the estimator × placement theory of docs/theory.md §3).

The trainers themselves (PPO, GRPO, RLOO) are certified by running them (``oracle.shipped``); this
module certifies the *math* they are built from, composed from the same functions —
``tether.ops.kl.kl_per_token`` / ``kl_loss_term`` / ``kl_reward_penalty`` (through ``token_rewards``),
``tether.ops.policy.gae`` / ``reinforce_loss`` / ``ppo_policy_loss`` / ``aggregate_loss`` — with the
tabular policy's per-token ``logps`` and ``logits`` standing in for the language model's. The batch:

- **exact** ("infinite batch"): the rollout is every complete sequence of every prompt, each row
  weighted by its probability under the behaviour policy π_old. The per-token losses are multiplied
  by the weights and ``aggregate_loss`` is given the matching global counts (Σ w for sequences,
  Σ w·|y| for tokens), which is exactly the limit of a batch of N samples as N → ∞. Gradients are
  then exact expectations.
- **sampled**: a finite batch drawn with ``TabularPolicy.sample``, unweighted.

``expected_update_norm`` measures ‖E∇‖ at a policy: zero exactly at a fixed point of a method's
expected dynamics (used where no closed-form fixed point exists).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tether import rng
from tether.control import BetaController, FixedBeta
from tether.ops.kl import ESTIMATOR_NAMES, kl_loss_term, kl_per_token, seq_sum
from tether.ops.logprobs import selective_logps
from tether.ops.policy import (
    aggregate_loss, gae, group_advantages, masked_whiten, ppo_policy_loss, reinforce_loss, rloo_advantages, token_rewards,
)

from .tabular import DTYPE, Completions, TabularPolicy, TabularProblem, reward_of

ALGOS = ("pg", "ppo", "grpo", "rloo")


@dataclass(frozen=True)
class OnlineSetup:
    """One online configuration (the knobs the trainers expose, plus the certification's own)."""

    algo: str  # pg (REINFORCE) | ppo | grpo | rloo
    kl_estimator: str = "k1"  # k1 | k2 | k3 | exact
    kl_placement: str = "reward"  # reward | loss | loss_is
    epochs: int = 1  # updates per rollout (PPO epochs, GRPO's μ); > 1 makes later epochs off-policy
    group_size: int = 1  # G (GRPO) / k (RLOO)
    clip: float = 0.2  # PPO Eq. 7 ε
    scale_rewards: bool = True  # GRPO: divide by the group std (False: Dr. GRPO)
    aggregation: str = "seq_sum"  # aggregate_loss mode
    gae_lambda: float = 1.0  # PPO: GAE λ (with λ < 1 the exact critic V^{π_old} is used)
    sampled: int = 0  # 0: exact expectations; n > 0: n sampled completions per prompt per step
    whiten: bool = False  # PPO, sampled runs only: masked_whiten the advantages as the trainer does

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.kl_estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"kl_estimator must be one of {ESTIMATOR_NAMES}, got {self.kl_estimator!r}")
        if self.kl_placement not in ("reward", "loss", "loss_is"):
            raise ValueError(f"kl_placement must be reward | loss | loss_is, got {self.kl_placement!r}")
        if (self.algo in ("grpo", "rloo")) != (self.group_size >= 2):
            raise ValueError(f"group_size >= 2 is for grpo/rloo only (got algo={self.algo!r}, group_size={self.group_size})")
        if self.algo in ("ppo", "rloo") and self.kl_placement != "reward" or self.algo == "grpo" and self.kl_placement == "reward":
            raise ValueError(f"{self.algo} puts the KL in the {'loss' if self.algo == 'grpo' else 'reward'} (as its trainer does)")
        if self.whiten and not self.sampled:
            raise ValueError("whiten needs a sampled batch: masked_whiten has no row weights for the exact one")
        if self.sampled and self.group_size > 1 and self.sampled % self.group_size:
            raise ValueError(f"sampled={self.sampled} per prompt must divide into groups of {self.group_size}")

    def describe(self) -> dict:
        d = {"kl_estimator": self.kl_estimator, "kl_placement": self.kl_placement, "epochs": self.epochs}
        if self.algo in ("grpo", "rloo"):
            d["group_size"] = self.group_size
        if self.algo == "grpo":
            d["scale_rewards"] = self.scale_rewards
        if self.algo in ("ppo", "grpo", "rloo"):
            d["clip"] = self.clip
        if self.algo == "ppo":
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
    advantages: Optional[torch.Tensor] = None  # (B, T) or (B,)

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
    num = torch.zeros(shape, dtype=DTYPE).index_put_((pid[mask], prefix_ids[mask]), (w * returns)[mask], accumulate=True)
    den = torch.zeros(shape, dtype=DTYPE).index_put_((pid[mask], prefix_ids[mask]), w[mask], accumulate=True)
    values = num / den.clamp(min=1e-300)
    return torch.where(mask, values[pid, prefix_ids], 0.0)


def collect(ctx: Context, policy: TabularPolicy, beta: float, *, logits_full: torch.Tensor, logps_full: torch.Tensor,
            generator: torch.Generator) -> Rollout:
    """Score a rollout of π_old = the current policy and compute its advantages (the trainers' ``prepare``)."""
    setup, sp = ctx.setup, ctx.problem.space
    old = policy.frozen_copy() if ctx.seq is None else None  # sampled runs draw from (and score) a frozen π_old
    batch = ctx.batch(logps_full.detach(), generator, old)
    mask = batch.comp.mask
    with torch.no_grad():
        logits, old_logps = ctx.rows(batch, logits_full.detach(), logps_full.detach(), old)
        ref_logits, ref_logps = ctx.rows(batch, ctx.ref_logits, ctx.ref_logps, ctx.problem.ref)
        kl_exact = kl_per_token(old_logps, ref_logps, mask, estimator="exact", logits=logits, ref_logits=ref_logits).per_token
        if setup.kl_estimator == "exact":
            kl_tokens = kl_exact
        else:
            kl_tokens = kl_per_token(old_logps, ref_logps, mask, estimator=setup.kl_estimator).per_token
    w = batch.weights
    kl_ref = float((w * seq_sum(kl_exact, mask)).sum() / w.sum())  # mean sequence KL (exact estimator)
    scores = ctx.scores(batch)  # (B,)
    ro = Rollout(batch, old_logps, ref_logps, ref_logits, scores, kl_tokens, kl_ref)

    if setup.algo in ("pg", "ppo"):
        in_reward = setup.kl_placement == "reward"
        rewards = token_rewards(scores, kl_tokens, mask, beta=beta if in_reward else 0.0)  # (B, T) docs/theory.md §1
        values = torch.zeros_like(rewards)
        if setup.algo == "ppo" and setup.gae_lambda < 1.0:
            _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # reward-to-go
            values = exact_critic(batch, returns, sp)
        adv, _ = gae(rewards, values, mask, gamma=1.0, lam=setup.gae_lambda)  # (B, T) PPO Eq. 11-12
        if setup.whiten:
            adv = masked_whiten(adv, mask)
        ro.advantages = adv
    elif setup.algo == "grpo":
        ro.advantages = group_advantages(scores, group_size=setup.group_size, scale=setup.scale_rewards)  # (B,)
    elif setup.algo == "rloo":
        rewards = token_rewards(scores, kl_tokens, mask, beta=beta)  # score - β·Σ_t kl_t, as a sequence
        ro.advantages = rloo_advantages(seq_sum(rewards, mask), group_size=setup.group_size)  # (B,)
    else:
        raise ValueError(f"unknown algo {setup.algo!r}; choose from {ALGOS}")
    return ro


# ---- one update: what the trainers' ``loss`` computes -----------------------------------------------------


def update_loss(ctx: Context, policy: TabularPolicy, ro: Rollout, beta: float, *, logits_full: torch.Tensor,
                logps_full: torch.Tensor) -> torch.Tensor:
    """The scalar loss of one update on the rollout, composed as the trainer composes it."""
    setup = ctx.setup
    logits, logps = ctx.rows(ro.batch, logits_full, logps_full, policy)  # with gradients
    mask = ro.mask
    if setup.algo == "pg":
        per_token, _ = reinforce_loss(logps, ro.advantages, mask)  # -A_t·log π_θ(y_t|s_t)
    else:
        per_token, _ = ppo_policy_loss(logps, ro.old_logps, ro.advantages, mask, clip=setup.clip)  # PPO Eq. 7
    if setup.kl_placement == "reward":
        if setup.kl_estimator == "exact":  # the direct part of ∇KL a detached exact KL misses (online.exact_kl_local)
            per_token = per_token + beta * kl_loss_term(
                logps, ro.ref_logps, mask, estimator="exact", logits=logits, ref_logits=ro.ref_logits).per_token
    else:
        exact = setup.kl_estimator == "exact"
        kl = kl_loss_term(
            logps, ro.ref_logps, mask, estimator=setup.kl_estimator,
            old_logps=ro.old_logps if setup.kl_placement == "loss_is" else None,
            logits=logits if exact else None, ref_logits=ro.ref_logits if exact else None,
        ).per_token
        per_token = per_token + beta * kl
    w = ro.batch.weights
    return aggregate_loss(per_token * w[:, None], mask, mode=setup.aggregation,
                          num_tokens=(w * mask.sum(-1)).sum(), num_seqs=w.sum())


# ---- the loop ---------------------------------------------------------------------------------------------


@dataclass
class Trace:
    steps: int
    curve: list  # [(step, distance to the target)]
    betas: list  # β after each step
    kls: list  # kl/ref of each rollout


def train_online(problem: TabularProblem, setup: OnlineSetup, controller: BetaController, *, steps: int,
                 lr: float, lr_end: float, distance: Callable[[TabularPolicy], float], seed: int = 0,
                 n_episodes: int = 1, record: int = 60, init: Optional[TabularPolicy] = None) -> tuple[TabularPolicy, Trace]:
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
    ro = collect(ctx, pol, beta, logits_full=logits_full, logps_full=logps_full, generator=rng.generator(0))  # unused: the batch is enumerated
    loss = update_loss(ctx, pol, ro, beta, logits_full=logits_full, logps_full=logps_full)
    (grad,) = torch.autograd.grad(loss, [pol.table])
    return float(grad.norm())


def fixed(beta: float) -> FixedBeta:
    return FixedBeta(beta)
