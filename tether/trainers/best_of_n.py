"""Best-of-n sampling: the training-free baseline of the reward-KL frontier.

For each prompt, draw n completions from the reference π_ref and keep the one the (proxy) reward
ranks highest (ties: the first drawn). Reported per n, averaged over prompts:

- ``score`` / ``reward/<name>``: mean reward of the kept completion, for the selecting reward and for
  every gold reward evaluated on the same completion; ``*_ref``: the mean over all samples (what
  π_ref itself scores, best-of-1 in expectation).
- ``kl_bound`` = log n - (n-1)/n (``ops.best_of_n.best_of_n_kl_bound``; Stiennon et al. 2020 fn. 15).
  It is an UPPER bound on KL[π_bon‖π_ref] (Beirami et al. 2024), reached only when the selecting
  reward has no ties.
- ``kl_estimate`` (± ``kl_estimate_stderr`` over prompts): per prompt, the exact KL of best-of-n
  under the reward distribution estimated from the M = max(n, kl_samples) reference samples drawn
  for that prompt (repeated values = atoms, single values = continuous;
  ``ops.best_of_n.best_of_n_kl_estimate``, which generalises Beirami et al.'s estimator). Rewards
  with many ties (VADER gives exactly 0 to most neutral text) make it much smaller than the bound.

Both KLs are sequence KLs in nats per prompt, the unit ``kl/ref`` uses for trained policies, so
best-of-n points sit on the same frontier plot. With a temperature or top-k/top-p, π_ref is the
distribution best-of-n draws from, π^{τ,F}_ref (the reference tempered and filtered by its own sets).
With a temperature alone that is the reference ``tether kl`` and the trainers score against; with
top-k/top-p they score against the unfiltered π^τ_ref, and the KL of these points leaves out the
filter cost of the reference's own sampling (docs/theory.md §3, the table at its end). ``best_of_n_curve`` reuses one
set of M samples per prompt for several n (the first n samples for selection), so the points of a curve are coupled.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..data.prompts import Prompt
from ..engine import generate_batches, mean_stderr
from ..errors import UserError
from ..generation import BuiltinBackend
from ..groups import SamplingSettings, sampling_settings
from ..measure import encode_prompts
from ..ops.best_of_n import best_of_n_kl_bound, best_of_n_kl_estimate
from ..rewards import RewardSet, RewardSource, build_reward, call_source, reward_columns

RewardLike = Union[RewardSource, RewardSet, str]
GoldLike = Union[RewardSource, str, Sequence[Union[RewardSource, str]]]


def _sources(reward: RewardLike, gold: GoldLike, device) -> tuple[RewardSource, list[RewardSource]]:
    """(selecting source, gold sources); a RewardSet contributes its optimised and logged sources
    (raw: normalisation is monotone and would only pollute its running statistics)."""
    logged: list[RewardSource] = []
    if isinstance(gold, (RewardSource, str)):
        gold = [gold]
    if isinstance(reward, RewardSet):
        reward, logged = reward.optimised, list(reward.logged)
    elif isinstance(reward, str):
        reward = build_reward(reward, device=device)
    logged += [build_reward(g, device=device) if isinstance(g, str) else g for g in gold]
    names = [reward.name] + [s.name for s in logged]
    if len(set(names)) != len(names):
        raise ValueError(f"reward sources need distinct names, got {names}; use NAME=spec to rename")
    return reward, logged


def _sampler(model):
    """The causal LM to sample from: ``model`` itself, or the frozen model of a tether Reference."""
    from ..reference import Reference

    if isinstance(model, Reference):
        if not hasattr(model, "model"):
            raise ValueError(
                f"best-of-n samples from the reference; a {type(model).__name__} has no model to sample from "
                "(pass the reference causal LM itself)"
            )
        return model.model
    return model


@torch.no_grad()
def sample_and_score(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    samples: int,
    reward: RewardLike,
    gold: GoldLike = (),
    sampling: Optional[SamplingSettings] = None,
    batch_size: int = 64,
    seed: int = 0,
    max_prompt_length: Optional[int] = None,
    progress: bool = False,
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
    decoder: str = "auto",
) -> dict:
    """Draw ``samples`` completions per prompt from ``model`` (``engine.generate_batches``: the
    sampler and decoding every loop uses) and score every one.

    ``prompt_ids`` (optional) are the token ids to sample after, one list per prompt, when the
    prompts were cut from token sequences (their text need not re-tokenise to the same ids);
    default: ``prompts`` tokenised. ``decoder``: the built-in sampler's decode step (auto | hf | lean).
    ``sampling``: the ``SamplingSettings`` (τ, top-k, top-p, max_new_tokens; None: the defaults).

    ``prompts`` may be ``tether.data.prompts.Prompt`` rows (conversational prompts, extra columns):
    each is sampled after its ``text`` and its columns reach the reward functions
    (``rewards.reward_columns``).

    Returns {"prompts": P strings, "texts": P lists of M completion strings, "name": selecting
    source's name, "scores": (P, M) float32, "gold": {name: (P, M)}}. Identical completions of a
    prompt are scored once, so ties are exact (and scoring is cheaper)."""
    model = _sampler(model)
    device = next(model.parameters()).device
    rows = list(prompts) if prompts and all(isinstance(p, Prompt) for p in prompts) else None
    prompts = [p.text for p in rows] if rows is not None else list(prompts)
    selector, golds = _sources(reward, gold, device)
    if prompt_ids is not None:
        if len(prompt_ids) != len(prompts):
            raise ValueError(
                f"got {len(prompt_ids)} prompt_ids for {len(prompts)} prompts; pass one token list per prompt"
            )
        ids = [list(p) for p in prompt_ids]
    else:
        ids = encode_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length)
    flat = [i for i in range(len(ids)) for _ in range(samples)]  # prompt-major: row p * M + j
    texts = [
        t
        for smp in generate_batches(
            model,
            ids,
            tokenizer=tokenizer,
            sampling=sampling_settings(sampling),
            batch_size=batch_size,
            seed=seed,
            samples_per_prompt=samples,
            progress=progress,
            desc="best-of-n sampling",
            backend=BuiltinBackend(model, decoder=decoder),
        )
        for t in smp.completions
    ]
    keys = sorted({(flat[r], texts[r]) for r in range(len(flat))})  # unique (prompt, completion)
    where = {k: j for j, k in enumerate(keys)}
    u_prompts, u_texts = [prompts[p] for p, _ in keys], [t for _, t in keys]
    rows_of = torch.tensor([where[(flat[r], texts[r])] for r in range(len(flat))])

    columns = reward_columns([rows[p] for p, _ in keys]) if rows is not None else {}

    def score(src: RewardSource) -> torch.Tensor:
        return call_source(src, u_prompts, u_texts, columns).float()[rows_of].view(len(prompts), samples)  # (P, M)

    P = len(prompts)
    return {
        "prompts": list(prompts),
        "texts": [texts[p * samples : (p + 1) * samples] for p in range(P)],
        "name": selector.name,
        "scores": score(selector),
        "gold": {g.name: score(g) for g in golds},
    }


def summarize(scored: dict, n: int, *, n_keep: int = 6) -> dict:
    """Best-of-n statistics from ``sample_and_score`` output, selecting among the first n samples
    (``n_keep``: how many kept completions to list under "samples")."""
    scores = scored["scores"]  # (P, M)
    P, M = scores.shape
    if not 1 <= n <= M:
        raise ValueError(f"n={n} needs 1 <= n <= samples per prompt ({M})")
    best = scores[:, :n].argmax(dim=1)  # (P,) first maximum = uniform tie-breaking for i.i.d. draws
    pick = lambda x: x[:, :n].gather(1, best[:, None]).squeeze(1)  # noqa: E731  (P, M) -> (P,)
    kl = torch.stack([best_of_n_kl_estimate(scores[p], n=n) for p in range(P)])  # (P,) uses all M samples
    kl_mean, kl_se = mean_stderr(kl)
    name = scored["name"]
    kept = pick(scores)  # (P,) the selecting reward of each kept completion
    kept_gold = {g: pick(vals) for g, vals in scored["gold"].items()}  # {name: (P,)}
    out = {
        "n": n,
        "kl_bound": best_of_n_kl_bound(n),
        "kl_estimate": kl_mean,
        "kl_estimate_stderr": kl_se if math.isfinite(kl_se) else 0.0,
        "score": float(kept.mean()),
        "score_ref": float(scores.mean()),
        f"reward/{name}": float(kept.mean()),
        f"reward/{name}_ref": float(scores.mean()),
        "samples_per_prompt": M,
    }
    for g, vals in scored["gold"].items():
        out[f"reward/{g}"] = float(kept_gold[g].mean())
        out[f"reward/{g}_ref"] = float(vals.mean())
    first_gold = next(iter(scored["gold"]), None)
    out["gold"] = out[f"reward/{first_gold}"] if first_gold else None
    out["gold_ref"] = out[f"reward/{first_gold}_ref"] if first_gold else None
    # The keys every point of the demo's reward-KL frontier has (tether.demo.task.evaluate_policy):
    # "kl" is the KL *estimate* (the bound over-states best-of-n's KL whenever rewards tie).
    out.update(kl=kl_mean, kl_stderr=out["kl_estimate_stderr"], gold_reward=out["gold"], proxy_reward=out["score"])
    out["prompts"] = scored["prompts"]
    out["completions"] = [scored["texts"][p][int(best[p])] for p in range(P)]
    out["samples"] = [
        {
            "prompt": scored["prompts"][p],
            "completion": out["completions"][p],
            "score": float(kept[p]),
            **{g: float(v[p]) for g, v in kept_gold.items()},
        }
        for p in range(min(P, n_keep))
    ]
    return out


def check_bon_sizes(ns, kl_samples: int = 0) -> list[int]:
    """The values of n (positive integers) and ``kl_samples`` (>= 0): the one check ``tether bon``'s
    preflight and ``best_of_n`` / ``best_of_n_curve`` from Python share. Returns ns as ints."""
    try:
        values = [int(n) for n in ns]
    except (TypeError, ValueError):
        raise UserError(f"n={ns!r} must be positive integers, comma-separated (e.g. 1,2,4,8); set --n") from None
    if not values or min(values) < 1:
        raise UserError(f"n={values} must be positive integers, comma-separated (e.g. 1,2,4,8); set --n")
    if kl_samples < 0:
        raise UserError(f"kl_samples={kl_samples} must be >= 0 (0 = max(n)); set --kl_samples")
    return values


def best_of_n_curve(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    ns: Sequence[int],
    reward: RewardLike,
    gold: GoldLike = (),
    kl_samples: int = 0,
    **options,
) -> list[dict]:
    """``best_of_n`` for several n from one set of max(max(ns), kl_samples) samples per prompt (``options``:
    those of ``sample_and_score``)."""
    check_bon_sizes(ns, kl_samples)
    scored = sample_and_score(
        model, tokenizer, prompts, samples=max(max(ns), kl_samples), reward=reward, gold=gold, **options
    )
    return [summarize(scored, n) for n in ns]


def best_of_n(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n: int,
    reward: RewardLike,
    gold: GoldLike = (),
    kl_samples: int = 0,
    sampling: Optional[SamplingSettings] = None,
    batch_size: int = 64,
    seed: int = 0,
    max_prompt_length: Optional[int] = None,
    progress: bool = False,
    prompt_ids: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """Best-of-n from the reference ``model`` (an HF causal LM, or a tether Reference with ``.model``).

    reward: the selecting reward (a RewardSource, a RewardSet — its optimised source selects and its
    logged sources are gold — or a ``build_reward`` spec); gold: more rewards evaluated on the kept
    completions (one source or several). kl_samples: reference samples per prompt used for
    ``kl_estimate`` (default n). prompt_ids: token ids to sample after (default: ``prompts`` tokenised).
    sampling: the ``SamplingSettings`` (None: τ 1, unfiltered, 32 new tokens).

    Returns {"n", "kl_bound", "kl_estimate", "kl_estimate_stderr", "score", "score_ref",
    "reward/<name>", "reward/<name>_ref" (each source), "gold", "gold_ref" (first gold source or
    None), "prompts", "completions" (the kept completion per prompt), "samples_per_prompt"}, plus
    the frontier keys of the demo: "kl" (= kl_estimate), "kl_stderr", "gold_reward" (= gold),
    "proxy_reward" (= score), "samples" (a few {prompt, completion, score, <gold name>: value}).
    """
    return best_of_n_curve(
        model,
        tokenizer,
        prompts,
        ns=[n],
        reward=reward,
        gold=gold,
        kl_samples=kl_samples,
        sampling=sampling,
        batch_size=batch_size,
        seed=seed,
        max_prompt_length=max_prompt_length,
        progress=progress,
        prompt_ids=prompt_ids,
    )[0]
