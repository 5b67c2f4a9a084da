"""The demo's task: controlled sentiment generation on movie-review snippets (DPO paper §6.1,
Figure 2; docs/theory.md §9), at laptop scale.

- data: rt-polarity snippets (Pang & Lee 2005), split into SFT text, preference prompts and
  held-out evaluation prompts (disjoint, seeded);
- prompts: 2–8-token prefixes of snippets (the paper: 2–8-token IMDb prefixes);
- gold reward: VADER compound sentiment of the completion (the paper: a sentiment classifier);
- preference pairs: ``samples_per_prompt`` reference samples per prompt ranked by the gold reward,
  every ordered pair with distinct scores (4 samples -> up to 6 pairs, as in the paper);
- evaluation: sample from a policy on held-out prompts, exact sequence KL to the reference with its
  standard error, mean gold and proxy reward of the same samples.

Sampling, decoding and the KL are the engine's (``tether.engine``) that the trainers' own rollouts
and evaluations use: the preference pairs are ``engine.generate_batches``, an evaluation point is
``engine.evaluate`` (the one evaluation seed, ``engine.eval_seed``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..assets import resolve
from ..engine import evaluate, generate_batches, mean_stderr
from ..reference import Reference


@dataclass
class Prompt:
    ids: list[int]
    text: str


def read_snippets(assets: Optional[str]) -> tuple[list[str], list[str]]:
    """(positive, negative) snippets from the rt-polarity asset (latin-1 text, one per line)."""
    root = resolve("rt-polarity", assets)
    pos = [ln.strip() for ln in (root / "rt-polarity.pos").read_text(encoding="latin-1").splitlines() if ln.strip()]
    neg = [ln.strip() for ln in (root / "rt-polarity.neg").read_text(encoding="latin-1").splitlines() if ln.strip()]
    return pos, neg


def split_snippets(
    pos: list[str], neg: list[str], *, n_sft: int, n_pref: int, n_eval: int, seed: int
) -> dict[str, list[str]]:
    """Disjoint, seeded, label-balanced splits: SFT text, preference-prompt snippets, eval snippets."""
    rng = random.Random(seed)
    both = [(s, 1) for s in pos] + [(s, 0) for s in neg]
    rng.shuffle(both)
    need = n_sft + n_pref + n_eval
    if need > len(both):
        raise ValueError(f"the demo asks for {need} snippets but rt-polarity has {len(both)}")
    texts = [s for s, _ in both]
    return {
        "sft": texts[:n_sft],
        "pref": texts[n_sft : n_sft + n_pref],
        "eval": texts[n_sft + n_pref : need],
    }


def make_prompts(
    tokenizer, snippets: Sequence[str], *, seed: int, min_tokens: int = 2, max_tokens: int = 8
) -> list[Prompt]:
    """A 2–8-token prefix of each snippet (BOS + k tokens, k uniform in [min, max]), cut back to
    the last whole word so no prompt ends mid-word (with a 512-token vocabulary a word is often
    several tokens); the first word is kept whole even if it alone exceeds k."""
    rng = random.Random(seed)
    out = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for s in snippets:
        words = s.split()
        if len(words) < 2:
            continue
        k = rng.randint(min_tokens, max_tokens)
        n_words = 1
        while n_words < len(words) - 1:
            longer = tokenizer(" ".join(words[: n_words + 1]), add_special_tokens=False)["input_ids"]
            if len(longer) > k:
                break
            n_words += 1
        text = " ".join(words[:n_words])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Prompt(bos + ids, text))
    return out


@torch.no_grad()
def preference_pairs(
    reference_model,
    tokenizer,
    prompts: Sequence[Prompt],
    gold,
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Rows {prompt, chosen, rejected} ranked by the gold reward (DPO paper §6.1: 4 samples per
    prefix -> 6 pairs). Pairs with equal gold scores carry no preference and are skipped."""
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    texts = [
        t
        for smp in generate_batches(
            reference_model,
            [p.ids for p in prompts],
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            samples_per_prompt=samples_per_prompt,
            progress=progress,
            desc="preference samples",
        )
        for t in smp.completions
    ]
    scores = gold([p.text for p in flat], texts).tolist()
    rows = []
    for i, p in enumerate(prompts):
        group = [
            (texts[i * samples_per_prompt + j], scores[i * samples_per_prompt + j]) for j in range(samples_per_prompt)
        ]
        for (ta, sa), (tb, sb) in itertools.combinations(group, 2):
            if sa == sb or ta.strip() == "" or tb.strip() == "" or ta == tb:
                continue
            chosen, rejected = (ta, tb) if sa > sb else (tb, ta)
            rows.append({"prompt": p.text, "chosen": chosen, "rejected": rejected})
    return rows


@torch.no_grad()
def evaluate_policy(
    policy,
    reference: Reference,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    gold,
    proxy=None,
    max_new_tokens: int = 24,
    seed: int = 0,
    n_keep: int = 6,
    samples_per_prompt: int = 1,
    return_scores: bool = False,
) -> dict:
    """One evaluation point: ``engine.evaluate`` of ``policy`` on held-out prompts
    (``samples_per_prompt`` samples each, at ``engine.eval_seed(seed)`` for every run and step, so
    differences are the policy's): exact sequence KL[π‖π_ref] with its standard error, and the mean
    gold / proxy reward of the same samples with theirs (``gold_stderr``, ``proxy_stderr``). The
    standard errors are over prompts (``engine.mean_stderr(per_prompt=)``: the standard error of the
    per-prompt means), since a prompt's samples are correlated; with one sample each, over samples.
    ``return_scores`` adds ``"scores"``: {"gold", "proxy"}: every sample's reward, prompt-major."""
    k = samples_per_prompt
    res = evaluate(
        policy,
        reference,
        [p.ids for p in prompts],
        tokenizer=tokenizer,
        seed=seed,
        max_new_tokens=max_new_tokens,
        samples_per_prompt=k,
    )
    texts, ptexts = res["texts"], [p.text for p in prompts for _ in range(k)]  # prompt-major, the engine's order
    g = gold(ptexts, texts)
    out = {}
    out["kl"], out["kl_stderr"] = mean_stderr(torch.tensor(res["per_sequence"]["exact"]), per_prompt=k)
    out["gold_reward"], out["gold_stderr"] = mean_stderr(g, per_prompt=k)
    pr = proxy(ptexts, texts) if proxy is not None else None
    out["proxy_reward"], out["proxy_stderr"] = mean_stderr(pr, per_prompt=k) if pr is not None else (None, None)
    if return_scores:
        out["scores"] = {"gold": g.tolist(), **({"proxy": pr.tolist()} if pr is not None else {})}
    first = range(0, min(len(texts), k * n_keep), k)  # the first sample of each of the first n_keep prompts
    out["samples"] = [{"prompt": ptexts[i], "completion": texts[i], "gold": float(g[i])} for i in first]
    return out


@torch.no_grad()
def best_of_n_points(
    reference_model,
    tokenizer,
    prompts: Sequence[Prompt],
    ns: Sequence[int],
    *,
    gold,
    proxy,
    max_new_tokens: int = 24,
    seed: int = 0,
    samples_per_prompt: int = 1,
    n_keep: int = 6,
) -> dict[int, dict]:
    """Best-of-n by the proxy for every n in ``ns`` from ONE draw (``trainers.best_of_n``'s
    ``sample_and_score`` + ``summarize``, as ``best_of_n_curve``): each of the ``samples_per_prompt``
    rows of every held-out prompt gets max(ns) reference samples at ``engine.eval_seed(seed)``, and the
    point for n keeps the proxy's best of the first n. The points share their samples (common random
    numbers), so the differences between them are the selection's, not the draw's. Returns
    {n: the keys of ``evaluate_policy`` + kl_bound}; KL is ``best_of_n_kl_estimate`` (all max(ns)
    samples), the reward standard errors are over prompts. ``gold`` and ``proxy`` need distinct names."""
    from ..engine import eval_seed
    from ..groups import SamplingSettings
    from ..trainers.best_of_n import sample_and_score, summarize

    k = samples_per_prompt
    texts = [p.text for p in prompts for _ in range(k)]  # prompt-major, as evaluate_policy
    scored = sample_and_score(
        reference_model,
        tokenizer,
        texts,
        prompt_ids=[p.ids for p in prompts for _ in range(k)],
        samples=max(ns),
        reward=proxy,
        gold=gold,
        sampling=SamplingSettings(max_new_tokens=max_new_tokens),
        seed=eval_seed(seed),
    )
    out = {}
    for n in ns:
        res = summarize(scored, n)
        g = gold(texts, res["completions"])
        pt = {"kl": res["kl"], "kl_stderr": res["kl_stderr"], "kl_bound": res["kl_bound"]}
        pt["gold_reward"], pt["gold_stderr"] = mean_stderr(g, per_prompt=k)
        pt["proxy_reward"], pt["proxy_stderr"] = mean_stderr(proxy(texts, res["completions"]), per_prompt=k)
        pt["samples"] = [
            {"prompt": texts[i], "completion": res["completions"][i], "gold": float(g[i])}
            for i in range(0, min(len(texts), k * n_keep), k)
        ]  # the first selection of each prompt
        out[int(n)] = pt
    return out


def within_prompt_variance(scores: Sequence[float], samples_per_prompt: int) -> float:
    """E_x Var(r | x): the mean over prompts of the unbiased variance of one prompt's k samples
    (prompt-major rows). With k = 1 there is no within-prompt spread to see: the variance over all
    rows, which adds the spread between prompts and so can only overstate it."""
    x = torch.tensor(scores, dtype=torch.float64)
    if samples_per_prompt < 2:
        return float(x.var(unbiased=True))
    return float(x.view(-1, samples_per_prompt).var(dim=1, unbiased=True).mean())  # (P, k) -> (P,) -> mean


def write_prompts(path: Path, prompts: Sequence[Prompt]) -> None:
    """Whole or absent (``runs.write_atomic``): the demo takes an existing prompt file as done."""
    import json

    from ..runs import write_atomic

    write_atomic(path, "".join(json.dumps({"prompt": p.text, "ids": p.ids}) + "\n" for p in prompts))


def read_prompt_file(path: Path) -> list[Prompt]:
    import json

    return [Prompt(r["ids"], r["prompt"]) for r in map(json.loads, Path(path).read_text().splitlines()) if r]
