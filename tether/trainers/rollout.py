"""Rollouts for the online methods: sample, decode, score with the reward and with every model.

``collect_rollout`` is step 2 of ``online.train_online``, run by the one sampling engine
(``tether.engine``, which ``tether kl``, every evaluation, best-of-n and the demo also run): one
completion per (repeated) prompt from the policy with a KV cache (``engine.generate``: stops at EOS,
tokens after it are masked out; the text each completion adds to its prompt), the optimised score
(optional no-EOS penalty) and the logged rewards, then one no-grad pass per micro-batch through
policy, reference and value model (``engine.score``) for ``old_logps``, ``ref_logps``, the per-token
KL (the method's estimator and the exact one), entropy and values — or, with one update per rollout
(``online.scores_from_update``), no scoring pass: the update's own forward fills those fields
(``fill_scores``). ``rollout_stats`` turns a rollout
into the fixed ``kl/*``, ``reward/*`` and ``gen/*`` metrics as (sum, count) pairs for one global
reduction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..diagnostics.hacking import spearman
from ..engine import decode_completion, decode_completions, generate, score  # noqa: F401 (decode_*: re-exported)
from ..groups import sampling_settings
from ..modeling import CompletionBatch
from ..ops.kl import seq_sum, token_mean
from ..ops.positions import BUCKET_LABELS, position_bucket_sums, weight_by_position
from ..ops.reward_model import nan_mean_std
from ..rewards import RewardSet, reward_columns
from ..shared_prompt import shared_prompt_mode
from .method import beta_weights


@dataclass
class Rollout:
    """One process's rollout. Per-token tensors are (B, T) aligned with ``batch.completion_ids``;
    zero where ``batch.mask`` is False (after EOS, padding)."""

    batch: CompletionBatch
    prompts: list  # (B,) prompt strings, each repeated samples_per_prompt times, contiguous
    completions: list  # (B,) decoded completion strings
    no_eos: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    scores: torch.Tensor  # (B,) optimised score (normalised/clipped, no-EOS penalty applied)
    reward_metrics: dict  # "reward/<name>" -> (B,) raw scores of every source
    old_logps: (
        torch.Tensor
    )  # (B, T) log π_old, tempered and restricted to the stored filter sets (the ratio's denominator)
    ref_logps: (
        torch.Tensor
    )  # (B, T) log π^τ_ref, tempered, unfiltered (restricted with kl_reference_filter; docs/theory.md §3)
    kl_tokens: (
        torch.Tensor
    )  # (B, T) KL per token with cfg.kl_estimator, times w_t with a position-dependent β (what the method applies)
    kl_exact: torch.Tensor  # (B, T) exact per-token KL[π^{τ,F}_θ‖π^τ_ref] (what kl/ref reports)
    entropy: torch.Tensor  # (B, T) entropy of the sampled distribution
    values: Optional[torch.Tensor] = None  # (B, T) V(s_t) at rollout (PPO)
    kl_clamped: Optional[torch.Tensor] = None  # (B, T) bool: kl_tokens clamped (kl_clamp_input/output set)
    filter_cost: Optional[torch.Tensor] = (
        None  # (B, T) -log π^τ_ref(F_t), the filter's share of kl_exact (kl/filter_cost)
    )
    pending: bool = (
        False  # True: old_logps .. kl_clamped are None until the update's own forward fills them (fill_scores)
    )
    reward_components: dict = dataclasses.field(
        default_factory=dict
    )  # several rewards (rewards.WeightedRewards): name -> (B,) raw scores, NaN where a function returned None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask

    @property
    def behaviour_logps(self) -> Optional[torch.Tensor]:
        """(B, T) log μ: the behaviour policy's log-probs of the sampled tokens, as the generation backend
        drew them (``batch.behaviour_logps``; None if the backend gives none). π_old/μ is the mismatch
        that ``mismatch/*`` measures and ``behaviour_correction`` weights (``ops.behaviour``)."""
        return self.batch.behaviour_logps

    def select(self, idx) -> "Rollout":
        """The rows ``idx`` (a LongTensor or slice) of every per-sample field."""
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(range(len(self.prompts)))[idx]
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "batch":
                v = v.select(idx)
            elif isinstance(v, torch.Tensor):
                v = v[idx]
            elif isinstance(v, dict):
                v = {k: t[idx] for k, t in v.items()}
            elif isinstance(v, list):
                v = [v[i] for i in rows]
            out[f.name] = v  # (anything else, e.g. pending, is shared as is)
        return Rollout(**out)


def apply_no_eos_penalty(scores: torch.Tensor, no_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """scores - penalty on completions that never emitted EOS (truncated); (B,), (B,) -> (B,).

    A truncated completion is often scored as if it were finished; the penalty makes "stop in time"
    part of the objective (TRL ``missing_eos_penalty``)."""
    if penalty is None:
        return scores
    return scores - float(penalty) * no_eos.to(scores.dtype)


def collect_rollout(
    policy,
    reference,
    value_model,
    rewards: RewardSet,
    tok,
    prompt_texts: Sequence[str],
    prompt_ids: Sequence[list],
    *,
    cfg,
    generator: torch.Generator,
    chunk: int,
    device,
    prompt_rows: Optional[Sequence] = None,
    backend=None,
    score_models: bool = True,
    shared_prompt: str = "off",
) -> Rollout:
    """Sample one completion per (repeated) prompt, score it, and score it under every model
    (``engine.generate`` + ``engine.score``, ``chunk`` rows per scoring pass). ``prompt_rows``: each
    sample's ``Prompt`` (its dataset row), whose columns, with the completion ids, reach the reward
    functions (``rewards.reward_columns``). ``backend``: the ``tether.generation`` backend that samples
    (default: the built-in sampler on ``policy``).

    ``score_models=False`` skips the scoring pass: the rollout comes back ``pending``, its model fields
    None, and the update fills them from its own forward (``fill_scores``; ``online.scores_from_update``
    says when that is exact).

    ``shared_prompt`` (auto | on | off, ``tether.shared_prompt``) is carried by the rollout's batch: every
    forward over it (the scoring pass, the reference, the update) lays each group out with its prompt once."""
    smp = generate(
        policy,
        prompt_ids,
        tokenizer=tok,
        sampling=sampling_settings(cfg),
        generator=generator,
        device=device,
        backend=backend,
    )
    smp = dataclasses.replace(
        smp, batch=dataclasses.replace(smp.batch, shared_prompt=shared_prompt_mode(shared_prompt))
    )
    ids = smp.batch.completion_ids.cpu()  # (B, T)
    columns = reward_columns(prompt_rows, [ids[i][m].tolist() for i, m in enumerate(smp.batch.mask.cpu())])
    # (B,), {"reward/<name>": (B,)}, {name: (B,)} of each of several optimised rewards
    scores, reward_metrics, components = rewards.score(list(prompt_texts), smp.completions, **columns)
    scores = apply_no_eos_penalty(scores.to(device), smp.no_eos, cfg.no_eos_penalty)
    common = dict(
        batch=smp.batch,
        prompts=list(prompt_texts),
        completions=smp.completions,
        no_eos=smp.no_eos,
        scores=scores,
        reward_metrics={k: v.to(device) for k, v in reward_metrics.items()},
        reward_components=components,
    )
    if not score_models:
        return Rollout(
            **common, old_logps=None, ref_logps=None, kl_tokens=None, kl_exact=None, entropy=None, pending=True
        )
    sc = score(
        policy,
        reference,
        smp,
        estimators=(cfg.kl_estimator,),
        chunk=chunk,
        value_model=value_model,
        clamp_input=cfg.kl_clamp_input,
        clamp_output=cfg.kl_clamp_output,
        reference_filter=cfg.kl_reference_filter,
    )

    kl_tokens = weight_by_position(sc.kl[cfg.kl_estimator], beta_weights(cfg, smp.batch.mask))  # (B, T) w_t·kl_t
    return Rollout(
        **common,
        old_logps=sc.logps,
        ref_logps=sc.ref_logps,
        kl_tokens=kl_tokens,
        kl_exact=sc.kl_exact,
        entropy=sc.entropy,
        values=sc.values,
        filter_cost=sc.filter_cost,
        kl_clamped=sc.kl_clamped[cfg.kl_estimator] if sc.kl_clamped is not None else None,
    )


def fill_scores(ro: Rollout, rows: torch.Tensor, scored: dict, *, cfg) -> None:
    """Write ``engine.score_rows``'s output for the rollout rows ``rows`` (b,) into a pending rollout ``ro``,
    in place: the same fields ``collect_rollout`` would have computed in its scoring pass."""

    mask = ro.mask[rows]
    est = cfg.kl_estimator
    values = {
        "old_logps": scored["logps"],
        "ref_logps": scored["ref_logps"],
        "kl_exact": scored["kl_exact"],
        "entropy": scored["entropy"],
        "filter_cost": scored["filter_cost"],
        "kl_tokens": weight_by_position(scored[f"kl/{est}"], beta_weights(cfg, mask)),
    }
    if f"clamped/{est}" in scored:
        values["kl_clamped"] = scored[f"clamped/{est}"]
    for name, v in values.items():
        if getattr(ro, name) is None:  # first rows: the dtype of the scores (fp64 stays fp64)
            setattr(ro, name, torch.zeros(ro.mask.shape, dtype=v.dtype, device=v.device))
        getattr(ro, name)[rows] = v.detach()


def rollout_stats(ro: Rollout, *, beta: float) -> tuple[dict, dict]:
    """(sums, counts) of the rollout metrics, for a global reduction (Dist.reduce_metrics)."""
    mask = ro.mask
    B, n_tok = float(mask.shape[0]), float(mask.sum())
    kl_seq = seq_sum(ro.kl_exact, mask)  # (B,) exact sequence KL
    penalty = beta * seq_sum(ro.kl_tokens, mask)  # (B,) β·Σ_t kl_t with the applied estimator
    seq = {
        "kl/ref": kl_seq.sum(),
        "kl/penalty": penalty.sum(),
        "reward/score": ro.scores.sum(),
        "reward/total": (ro.scores - penalty).sum(),
        "gen/response_len": mask.sum(-1).float().sum(),
        "gen/no_eos_frac": ro.no_eos.float().sum(),
        **{k: v.sum() for k, v in ro.reward_metrics.items()},
    }
    if ro.filter_cost is not None:  # the filter's own share of kl/ref: E Σ_t -log π^τ_ref(F_t) (0 without top-k/top-p)
        seq["kl/filter_cost"] = seq_sum(ro.filter_cost, mask).sum()
    tok = {
        "kl/ref_token_mean": token_mean(ro.kl_exact, mask) * n_tok,
        "policy/entropy": token_mean(ro.entropy, mask) * n_tok,
    }
    if ro.kl_clamped is not None:  # fraction of counted tokens whose KL value was clamped (its gradient is 0)
        tok["kl/clamped_frac"] = (ro.kl_clamped & mask).sum().float()
    sums = {k: float(v) for k, v in {**seq, **tok}.items()}
    counts = {**{k: B for k in seq}, **{k: n_tok for k in tok}}
    # kl/by_position/<bucket>: the part of the exact sequence KL from completion positions in the bucket,
    # per sequence (Qi et al. 2024): the buckets add up to kl/ref, and an empty bucket is a true 0
    b_sums, _ = position_bucket_sums(ro.kl_exact, mask)
    for label, sm in zip(BUCKET_LABELS, b_sums):
        sums[f"kl/by_position/{label}"], counts[f"kl/by_position/{label}"] = sm, B
    # reward/rank_corr/<name>: Spearman ρ between the optimised reward (the first source) and each logged
    # one over this process's batch (averaged over processes; diagnostics/hacking.py)
    names = list(ro.reward_metrics)
    for key in names[1:]:
        rho = spearman(ro.reward_metrics[names[0]].cpu(), ro.reward_metrics[key].cpu())
        k = "reward/rank_corr/" + key[len("reward/") :]
        sums[k], counts[k] = (rho, 1.0) if rho == rho else (0.0, 0.0)  # nan (a constant reward): no value
    return sums, counts


def reward_component_stats(ro: Rollout, dist) -> dict[str, float]:
    """``reward/<name>/mean`` and ``reward/<name>/std`` of each of several optimised rewards over the global
    batch (every process's values gathered; ``ops.reward_model.nan_mean_std``: the completions a function
    returned None for are left out, the std has n - 1, as TRL's ``rewards/<name>/mean|std``). A reward with
    no value in the step (None everywhere) logs nothing, one with a single value no std."""
    out: dict[str, float] = {}
    for name, values in ro.reward_components.items():
        mean, std = nan_mean_std(torch.tensor(dist.all_gather_float(values.double().tolist()), dtype=torch.float64))
        if mean == mean:
            out[f"reward/{name}/mean"] = mean
        if std == std:
            out[f"reward/{name}/std"] = std
    return out
