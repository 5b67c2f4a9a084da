"""The reference-shift diagnostic: does a prompt prefix move the reference, and with it the KL penalty?

A KL penalty anchors the policy to π_ref(·|x) *as the reference sees the prompt*. A prefix p that makes
the reference itself likely to produce a target y (a jailbreak) shrinks the penalty on y: the policy is
then compared with π_ref(·|p+x), not with π_ref(·|x). Measured here (docs/theory.md §13):

1. **Teacher-forced** (exact, no sampling): log π_ref(y|x) and log π_ref(y|p+x), the sums over the
   target's tokens of the reference's log-probs, and Δ = log π_ref(y|p+x) - log π_ref(y|x). A row is
   flagged when |Δ| > threshold (nats).
2. **With a policy**: completions sampled from π_θ(·|x) (``engine.generate``, seeded) scored by the
   reference with and without the prefix (``engine.score`` with a ``PromptMappedReference``: the same
   completion ids, only the reference's prompt differs). Reported: the mean over samples of the exact
   per-token KL summed over the completion, KL[π_θ(·|x)‖π_ref(·|x)] and KL[π_θ(·|x)‖π_ref(·|p+x)].
3. **Prefix search**: a seeded greedy coordinate search over the prefix's tokens (or a random search)
   maximising J(p) = mean_i log π_ref(y_i|p+x_i); every candidate token of one position is scored in
   one batched teacher-forced pass. The current token is always a candidate, so J never decreases.

Token layout: prefix tokens are inserted after the prompt's BOS (``reference_prompt.prefixed_prompt_map``);
targets are encoded without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import rng
from ..engine import generate_batches, mean_stderr, score
from ..modeling import forward_completion, make_batch
from ..ops.logprobs import selective_logps
from ..reference import eval_mode
from ..reference_prompt import PromptMappedReference, prefixed_prompt_map
from .forgetting import as_reference

# --------------------------------------------------------------------------------------------------
# the math


def shift_delta(
    logp_plain: torch.Tensor, logp_prefixed: torch.Tensor, *, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, flagged): Δ = log π_ref(y|p+x) - log π_ref(y|x), flagged = |Δ| > threshold. (N,), (N,) -> (N,), (N,) bool."""
    delta = logp_prefixed - logp_plain
    return delta, delta.abs() > threshold


@torch.no_grad()
def target_logps(
    model, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """(N,) float64 log π(y_i|x_i) = Σ_t log π(y_i,t | x_i, y_i,<t), teacher-forced (fp32 per-token
    log-probs, summed in float64), ``batch_size`` rows per forward pass, the model in eval mode."""
    if len(prompts) != len(targets):
        raise ValueError("need one target per prompt")
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for s in range(0, len(prompts), batch_size):
            b = make_batch(prompts[s : s + batch_size], targets[s : s + batch_size], pad_id=pad_id).to(device)
            logits = forward_completion(model, b)[0]  # (b, T, V)
            lp = selective_logps(logits, b.completion_ids).masked_fill(~b.mask, 0.0)  # (b, T)
            out.append(lp.double().sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def prefixed(prompts: Sequence[Sequence[int]], prefix: Sequence[int], *, bos_id: Optional[int]) -> list[list[int]]:
    f = prefixed_prompt_map(prefix, bos_id=bos_id)
    return [f(p) for p in prompts]


# --------------------------------------------------------------------------------------------------
# the table


def shift_rows(
    reference,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    prefixes: Sequence[Sequence[int]],
    *,
    pad_id: int,
    bos_id: Optional[int],
    threshold: float = 2.0,
    batch_size: int = 64,
) -> list[dict]:
    """One row per (prompt, prefix), prompt-major: ``prompt``, ``prefix`` (indices), ``logp_plain``,
    ``logp_prefixed``, ``delta``, ``flagged``, ``target_tokens``."""
    plain = target_logps(reference, prompts, targets, pad_id=pad_id, batch_size=batch_size)
    rows = []
    per_prefix = [
        target_logps(reference, prefixed(prompts, pf, bos_id=bos_id), targets, pad_id=pad_id, batch_size=batch_size)
        for pf in prefixes
    ]
    for i in range(len(prompts)):
        for j in range(len(prefixes)):
            d, f = shift_delta(plain[i : i + 1], per_prefix[j][i : i + 1], threshold=threshold)
            rows.append(
                {
                    "prompt": i,
                    "prefix": j,
                    "logp_plain": float(plain[i]),
                    "logp_prefixed": float(per_prefix[j][i]),
                    "delta": float(d),
                    "flagged": bool(f),
                    "target_tokens": len(targets[i]),
                }
            )
    return rows


@torch.no_grad()
def policy_kls(
    policy,
    reference,
    prompts: Sequence[Sequence[int]],
    prefix: Sequence[int],
    *,
    tokenizer,
    bos_id: Optional[int],
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Completions of ``policy`` on the plain prompts (seeded, τ = 1), each scored by the reference on
    the plain prompt and on prefix + prompt: per prompt, the mean over its samples of the exact
    sequence KL[π_θ(·|x)‖π_ref(·|x)] (``kl_plain``) and KL[π_θ(·|x)‖π_ref(·|p+x)] (``kl_prefixed``),
    and the overall means with standard errors over samples."""
    ref = as_reference(reference)
    shifted = PromptMappedReference(ref, prefixed_prompt_map(prefix, bos_id=bos_id), pad_id=tokenizer.pad_token_id)
    plain, pref = [], []
    for smp in generate_batches(
        policy,
        prompts,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
    ):
        plain.append(score(policy, ref, smp).seq("exact").double().cpu())  # (b,)
        pref.append(score(policy, shifted, smp).seq("exact").double().cpu())  # (b,) the same completions
    plain_t, pref_t = torch.cat(plain), torch.cat(pref)  # (N·S,) prompt-major
    n = len(prompts)
    out = {
        "kl_plain_per_prompt": plain_t.view(n, samples_per_prompt).mean(-1).tolist(),
        "kl_prefixed_per_prompt": pref_t.view(n, samples_per_prompt).mean(-1).tolist(),
        "samples": int(plain_t.numel()),
    }
    out["kl_plain"], out["kl_plain_stderr"] = mean_stderr(plain_t)
    out["kl_prefixed"], out["kl_prefixed_stderr"] = mean_stderr(pref_t)
    return out


# --------------------------------------------------------------------------------------------------
# the prefix search


@dataclass
class SearchResult:
    prefix: list  # token ids
    objective: float  # J(prefix) = mean_i log π_ref(y_i|prefix + x_i)
    start: float  # J of the initial prefix
    plain: float  # mean_i log π_ref(y_i|x_i): no prefix at all
    history: list  # J after each step (non-decreasing)


def search_prefix(
    model,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int,
    bos_id: Optional[int],
    vocab: Sequence[int],
    method: str = "greedy",
    prefix_tokens: int = 8,
    steps: int = 16,
    candidates: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> SearchResult:
    """Search a prefix of ``prefix_tokens`` tokens from ``vocab`` that raises J(p) = mean_i log π(y_i|p+x_i).

    ``greedy``: step k updates position k mod prefix_tokens: J of every candidate token there (all of
    ``vocab``, or ``candidates`` of them drawn at random, plus the current token) in one batched pass,
    and the best one is kept. ``random``: step k draws ``candidates`` whole random prefixes and keeps
    the best if it beats the current one. Seeded (``seed``); the start is a random prefix. J is
    non-decreasing over steps in both (the current prefix is always a candidate)."""
    if method not in ("greedy", "random"):
        raise ValueError(f"unknown search method {method!r}")
    g = rng.generator(int(seed))
    vocab_t = torch.tensor(list(vocab), dtype=torch.long)

    def draw(n: int) -> list[int]:
        return vocab_t[torch.randint(len(vocab_t), (n,), generator=g)].tolist()

    def objective(cands: list[list[int]]) -> torch.Tensor:  # (C,) J of each candidate prefix
        rows_p = [q for c in cands for q in prefixed(prompts, c, bos_id=bos_id)]
        rows_y = [y for _ in cands for y in targets]
        lp = target_logps(model, rows_p, rows_y, pad_id=pad_id, batch_size=batch_size)  # (C·N,)
        return lp.view(len(cands), len(prompts)).mean(-1)

    prefix = draw(prefix_tokens)
    best = float(objective([prefix])[0])
    start, history = best, []
    plain = float(target_logps(model, prompts, targets, pad_id=pad_id, batch_size=batch_size).mean())
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"shift: {method} prefix search", unit="step")
    for k in it:
        if method == "greedy":
            pos = k % prefix_tokens
            toks = vocab_t.tolist() if not candidates else draw(candidates)
            toks = [prefix[pos]] + [t for t in dict.fromkeys(toks) if t != prefix[pos]]
            cands = [prefix[:pos] + [t] + prefix[pos + 1 :] for t in toks]
        else:
            cands = [prefix] + [draw(prefix_tokens) for _ in range(max(candidates, 1))]
        js = objective(cands)
        i = int(torch.argmax(js))  # ties: the first, i.e. the current prefix
        if float(js[i]) > best:
            prefix, best = cands[i], float(js[i])
        history.append(best)
        if progress:
            it.set_postfix(J=f"{best:.3f}", gain=f"{best - plain:+.3f}")
    return SearchResult(prefix=prefix, objective=best, start=start, plain=plain, history=history)
