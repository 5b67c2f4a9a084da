"""Offline preference losses on the tabular oracle, in the infinite-data limit (``tether certify``).

The data: ordered pairs (y_a, y_b) of one prompt drawn from μ⊗μ with μ = π_ref, labelled by a
Bradley–Terry model of the reward, p(y_a ≻ y_b) = σ(r(y_a) - r(y_b)), optionally with each label
flipped independently with probability ``flip`` (the noise model robust DPO assumes). The
probability that a pair comes out as (chosen = y_i, rejected = y_j) is

    w(i, j) = μ(y_i)μ(y_j)·p_obs(y_i ≻ y_j) + μ(y_j)μ(y_i)·p_obs(y_i ≻ y_j) = 2 μ(y_i)μ(y_j) p_obs(y_i ≻ y_j),

(the draw (y_i, y_j) with y_i winning, or (y_j, y_i) with y_i winning); pairs with i = j carry no
information (every loss here is constant in θ on them) and are left out. The population loss
Σ_{i≠j} w(i, j)·ℓ(y_i, y_j), averaged over prompts, is computed exactly with
``tether.ops.preference.preference_loss`` on the tabular policy's sequence log-probs
(``tether.ops.kl.seq_sum`` of its per-token ``logps``, as ``tether.trainers.dpo.pair_logps`` does):
the limit of a dataset of N labelled pairs as N → ∞, whose minimiser is the loss's target on supp(μ)
(here every sequence: π_ref has full support).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tether.ops.kl import seq_sum
from tether.ops.preference import preference_loss

from .certify_online import scores_of
from .certify_targets import bt_preferences
from .tabular import DTYPE, TabularPolicy, TabularProblem


@dataclass(frozen=True)
class PreferenceSetup:
    loss_type: str
    label_smoothing: float = 0.0  # cDPO ε / robust DPO's assumed flip rate
    flip: float = 0.0  # the true label-flip rate of the data
    ipo_length_normalize: bool = False
    alpha: float = 0.5  # f-DPO α (paper's convention)
    simpo_gamma: float = 0.5

    def describe(self) -> dict:
        d: dict = {"loss_type": self.loss_type}
        if self.loss_type in ("cdpo", "robust"):
            d["label_smoothing"] = self.label_smoothing
        if self.flip:
            d["label_flip_rate"] = self.flip
        if self.loss_type == "ipo":
            d["ipo_length_normalize"] = self.ipo_length_normalize
        if self.loss_type == "fdpo_alpha":
            d["alpha"] = self.alpha
        if self.loss_type == "simpo":
            d["simpo_gamma"] = self.simpo_gamma
        d["data"] = "pairs ~ π_ref⊗π_ref, BT labels, exact expectation (infinite data)"
        return d


@dataclass
class Pairs:
    chosen: torch.Tensor  # (N,) index into all_completions()
    rejected: torch.Tensor  # (N,)
    weights: torch.Tensor  # (N,) probability of (chosen, rejected); Σ = 1 - Σ_y μ(y)² per prompt


def population_pairs(problem: TabularProblem, *, flip: float = 0.0) -> Pairs:
    """Every ordered pair of distinct sequences of each prompt with its probability w(i, j) (module doc)."""
    P, K = problem.space.n_prompts, problem.space.n_sequences
    mu = problem.ref.sequence_probs().detach()  # (P, K)
    p = bt_preferences(problem.rewards)  # (P, K, K) p(y_i ≻ y_j)
    p_obs = (1 - flip) * p + flip * (1 - p)
    w = 2 * mu[:, :, None] * mu[:, None, :] * p_obs  # (P, K, K)
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    off = (i != j).reshape(-1)
    base = (torch.arange(P) * K)[:, None]  # (P, 1)
    return Pairs(
        (base + i.reshape(1, -1))[:, off].reshape(-1),
        (base + j.reshape(1, -1))[:, off].reshape(-1),
        w.reshape(P, -1)[:, off].reshape(-1).to(DTYPE),
    )


def population_loss(
    policy: TabularPolicy,
    problem: TabularProblem,
    pairs: Pairs,
    setup: PreferenceSetup,
    beta: float,
    ref_seq_logps: torch.Tensor,
) -> torch.Tensor:
    """E_{pairs, labels}[preference_loss] averaged over prompts: a () tensor with gradients."""
    full = problem.space.all_completions()
    _, logps = scores_of(policy, full)  # (P·K, T)
    seq_logps = seq_sum(logps, full.mask)  # (P·K,) log π_θ(y|x), as trainers.dpo.pair_logps
    lengths = full.mask.sum(-1)  # (P·K,)
    c, r = pairs.chosen, pairs.rejected
    losses, _ = preference_loss(
        seq_logps[c],
        seq_logps[r],
        ref_seq_logps[c],
        ref_seq_logps[r],
        lengths[c],
        lengths[r],
        beta=beta,
        loss_type=setup.loss_type,
        label_smoothing=setup.label_smoothing,
        ipo_length_normalize=setup.ipo_length_normalize,
        alpha=setup.alpha,
        simpo_gamma=setup.simpo_gamma,
    )  # (N,)
    return (pairs.weights * losses).sum() / problem.space.n_prompts


def train_preference(
    problem: TabularProblem,
    setup: PreferenceSetup,
    beta: float,
    *,
    steps: int,
    distance: Callable[[TabularPolicy], float],
    optimizer: str = "lbfgs",
    lr: float = 1.0,
    lr_end: float = 1e-3,
    pairs: "Pairs | None" = None,
) -> tuple[TabularPolicy, list, int]:
    """Minimise the population loss from π_ref. ``lbfgs``: full-batch L-BFGS with a strong-Wolfe line
    search (the loss is deterministic and smooth); ``adam``: Adam with a geometric learning-rate decay
    (for the non-smooth hinge). ``steps``: L-BFGS iterations (each may evaluate the gradient more than
    once) or Adam steps. ``pairs``: weighted pairs to use instead of the population (a finite dataset's
    empirical weights). Returns (policy, curve [(gradient evaluations, distance)], gradient evaluations)."""
    policy = TabularPolicy(problem.space, problem.ref.table.detach())
    pairs = population_pairs(problem, flip=setup.flip) if pairs is None else pairs
    full = problem.space.all_completions()
    with torch.no_grad():
        ref_seq_logps = seq_sum(scores_of(problem.ref, full)[1], full.mask)  # (P·K,)

    def loss_fn() -> torch.Tensor:
        return population_loss(policy, problem, pairs, setup, beta, ref_seq_logps)

    curve = [(0, distance(policy))]
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            policy.parameters(),
            lr=lr,
            max_iter=steps,
            tolerance_grad=1e-9,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        evals = [0]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            evals[0] += 1
            if evals[0] in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                curve.append((evals[0], distance(policy)))
            return loss

        opt.step(closure)
        taken = opt.state[policy.table]["func_evals"]  # gradient evaluations, comparable to Adam steps
    else:
        opt = torch.optim.Adam(policy.parameters(), lr=lr)
        marks = {int(round(steps ** (i / 40))) for i in range(41)}
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * (lr_end / lr) ** (step / max(steps - 1, 1))
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step + 1 in marks:
                curve.append((step + 1, distance(policy)))
        taken = steps
    curve.append((taken, distance(policy)))
    return policy, curve, int(taken)
