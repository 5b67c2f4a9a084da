"""Measuring how far a policy has drifted from its reference: sample, score, estimate.

``measure_kl`` is what ``tether kl`` runs and what trainers call every ``eval_every`` steps to log
``kl/ref`` (exact estimator) and ``kl/ref_stderr``. For each sampled completion it computes the
sequence-sum KL[π‖π_ref] with every estimator (k1, k2, k3, exact), so their means and standard
errors can be compared side by side on the same samples.

Under sampling settings (temperature τ, top-k, top-p) the KL is KL[π^{τ,F}_θ‖π^{τ,F}_ref]
(docs/theory.md §3): both models' logits divided by τ and restricted to the token set F_t the
sampler allowed at each position. A model against itself gives exactly 0 with every estimator;
k1, k3 and exact are unbiased for it, k2 is biased (``tether.ops.kl.ESTIMATORS``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .modeling import completion_logits, with_allowed
from .ops.kl import ESTIMATOR_NAMES, kl_per_token, seq_sum
from .ops.logprobs import selective_logps, uses_token_filter
from .reference import Reference
from .sampling import sample


def mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n), n - 1 in the variance)."""
    x = x.double()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


@torch.no_grad()
def score_kl(policy, reference: Reference, batch, *, estimators: Sequence[str] = ESTIMATOR_NAMES, filters: Optional[dict] = None) -> dict:
    """Per-sequence KL of a sampled batch under each estimator: {name: (B,) fp32}, plus
    ``token_exact`` ((B, T) per-token exact KL) and ``lengths`` ((B,)).

    ``filters``: the settings ``batch`` was sampled with. Policy and reference are both scored at
    that temperature and restricted to the sets in ``batch.allowed`` (for a batch not from the
    sampler: the policy's fp32 re-filter, attached with ``with_allowed``)."""
    filters = filters or {}
    was = policy.training
    policy.eval()
    try:
        logits = completion_logits(policy, batch, **filters)  # (B, T, V) of π^{τ,F}_θ
    finally:
        policy.train(was)
    if uses_token_filter(filters) and batch.allowed is None:
        batch = with_allowed(batch, logits)  # the reference is restricted to the policy's sets
    ref_logits = reference.logits(batch, filters=filters).to(logits.device)  # (B, T, V) of π^{τ,F}_ref
    tokens = batch.completion_ids
    logps = selective_logps(logits, tokens)
    ref_logps = selective_logps(ref_logits, tokens)
    out: dict = {}
    for name in estimators:
        kt = kl_per_token(logps, ref_logps, batch.mask, estimator=name, logits=logits, ref_logits=ref_logits)
        out[name] = seq_sum(kt.per_token, batch.mask)
        if name == "exact":
            out["token_exact"] = kt.per_token
    out["lengths"] = batch.mask.sum(-1)
    return out


@torch.no_grad()
def measure_kl(
    policy,
    reference: Reference,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: Optional[int],
    samples_per_prompt: int = 1,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    estimators: Sequence[str] = ESTIMATOR_NAMES,
    filters: Optional[dict] = None,
    progress: bool = False,
    return_samples: bool = False,
) -> dict:
    """Sample ``samples_per_prompt`` completions per prompt from ``policy`` and estimate
    KL[π‖π_ref] per sequence with every estimator.

    Returns ``{"estimators": {name: {"mean", "stderr"}}, "token_mean", "response_len", "samples",
    "per_sequence": {name: list}}`` (+ ``"completions"``: token lists, if ``return_samples``).
    ``token_mean`` is the exact per-token KL averaged over all completion tokens (not the sequence KL).
    """
    filters = filters or {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    per_seq: dict[str, list] = {name: [] for name in estimators}
    lengths: list[int] = []
    tok_sum, tok_n = 0.0, 0
    completions: list[list[int]] = []
    it = range(0, len(flat), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling + scoring", unit="batch")
    for start in it:
        chunk = flat[start : start + batch_size]
        batch, _ = sample(policy, chunk, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens, generator=gen, **filters)
        res = score_kl(policy, reference, batch, estimators=estimators, filters=filters)
        for name in estimators:
            per_seq[name].extend(res[name].tolist())
        lengths.extend(res["lengths"].tolist())
        if "token_exact" in res:
            tok_sum += float(res["token_exact"].sum())
            tok_n += int(batch.mask.sum())
        if return_samples:
            completions.extend(batch.completion_ids[i][batch.mask[i]].tolist() for i in range(len(chunk)))
    result = {
        "estimators": {},
        "token_mean": tok_sum / max(tok_n, 1) if tok_n else None,
        "response_len": sum(lengths) / max(len(lengths), 1),
        "samples": len(flat),
        "per_sequence": per_seq,
    }
    for name in estimators:
        m, se = mean_stderr(torch.tensor(per_seq[name]))
        result["estimators"][name] = {"mean": m, "stderr": se}
    if return_samples:
        result["completions"] = completions
    return result


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a ``prompt`` field."""
    import json
    from pathlib import Path

    text = Path(path).read_text()
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{i}: JSONL prompts need a 'prompt' field (found {sorted(row)})")
            if not isinstance(row["prompt"], str):
                raise ValueError(f"{path}:{i}: 'prompt' must be a string")
            out.append(row["prompt"])
    else:
        out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_length: Optional[int] = None) -> list[list[int]]:
    """Tokenize prompts with the tokenizer's BOS handling; error if one exceeds ``max_prompt_length``."""
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing; give it some text (or a tokenizer that adds BOS)")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; "
                "shorten it or raise the limit"
            )
        out.append(ids)
    return out
