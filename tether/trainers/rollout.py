"""Rollouts for the online methods: sample, decode, score with the reward and with every model.

``collect_rollout`` is step 2 of ``online.train_online``: one completion per (repeated) prompt from
the policy with a KV cache (``sampling.sample``: stops at EOS, tokens after it are masked out), the
text each completion adds to its prompt, the optimised score (optional no-EOS penalty) and the
logged rewards, then one no-grad pass per micro-batch through policy, reference and value model for
``old_logps``, ``ref_logps``, the per-token KL (the method's estimator and the exact one), entropy
and values. ``rollout_stats`` turns a rollout into the fixed ``kl/*``, ``reward/*`` and ``gen/*``
metrics as (sum, count) pairs for one global reduction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..modeling import CompletionBatch
from ..ops.kl import kl_per_token, seq_sum, token_mean
from ..ops.logprobs import entropy_from_logits, selective_logps, uses_token_filter
from ..rewards import RewardSet
from ..sampling import sample
from ..modeling import forward_completion, with_allowed

if TYPE_CHECKING:
    from .online import OnlineConfig


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
    old_logps: torch.Tensor  # (B, T) log π_old, tempered and restricted to the stored filter sets (the ratio's denominator)
    ref_logps: torch.Tensor  # (B, T) log π_ref, tempered and restricted the same way (docs/theory.md §3)
    kl_tokens: torch.Tensor  # (B, T) KL per token with cfg.kl_estimator (what the method applies)
    kl_exact: torch.Tensor  # (B, T) exact per-token KL (what kl/ref reports)
    entropy: torch.Tensor  # (B, T) entropy of the sampled distribution
    values: Optional[torch.Tensor] = None  # (B, T) V(s_t) at rollout (PPO)
    kl_clamped: Optional[torch.Tensor] = None  # (B, T) bool: kl_tokens clamped (kl_clamp_input/output set)

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask

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
            out[f.name] = v
        return Rollout(**out)


def apply_no_eos_penalty(scores: torch.Tensor, no_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """scores - penalty on completions that never emitted EOS (truncated); (B,), (B,) -> (B,).

    A truncated completion is often scored as if it were finished; the penalty makes "stop in time"
    part of the objective (TRL ``missing_eos_penalty``)."""
    if penalty is None:
        return scores
    return scores - float(penalty) * no_eos.to(scores.dtype)


def decode_completion(tok, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """The completion's text as it continues the prompt: decode(prompt + completion) minus decode(prompt).

    Decoding the completion tokens alone loses the leading space of SentencePiece/Llama tokenizers
    ("The old man" + "had" instead of " had"), and reward models score ``prompt + completion``
    (``rewards.join_text``). Falls back to the plain decode if the prompt's text is not a prefix."""
    prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
    full = tok.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tok.decode(completion_ids, skip_special_tokens=True)


def decode_completions(tok, batch: CompletionBatch) -> list[str]:
    """Counted completion tokens only (nothing after EOS), special tokens dropped, as they continue
    each row's prompt (``decode_completion``)."""
    ids, attn, mask = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.mask.cpu()
    P = batch.prompt_len
    return [decode_completion(tok, ids[i, :P][attn[i, :P].bool()].tolist(), ids[i, P:][mask[i]].tolist())
            for i in range(ids.shape[0])]


def loss_filters(filters: dict) -> dict:
    """The policy the loss differentiates: π^{τ,F}_θ, the sampling distribution itself — logits divided
    by the temperature and restricted to the token sets F_t the sampler stored in ``batch.allowed``
    (docs/theory.md §3). Returns the full sampling filters (temperature, top_k, top_p).

    Always finite: the sampled token is in F_t by construction, and F_t is rollout data (never
    recomputed from the updated π_θ, never differentiated), so log π_θ(y_t), the ratio π_θ/π_old and
    any loss-side KL stay finite after any number of updates. (This used to drop top-k/top-p from the
    loss for lack of a stored set, which made the loss's π_θ differ from the sampled one.)"""
    return {"temperature": filters.get("temperature", 1.0), "top_k": filters.get("top_k", 0),
            "top_p": filters.get("top_p", 1.0)}


@torch.no_grad()
def score_rollout(policy, reference, value_model, batch: CompletionBatch, *, estimator: str, filters: dict, chunk: int,
                  clamp_input: Optional[float] = None, clamp_output: Optional[float] = None) -> dict:
    """Policy, reference and value scores of a sampled batch, ``chunk`` rows per forward pass.
    Returns (B, T) tensors: old_logps, ref_logps, kl_tokens, kl_exact, entropy (+ values; + kl_clamped
    when a clamp is given).

    Every score is of the sampling distribution (docs/theory.md §3): the policy π^{τ,F}_θ and the
    reference π^{τ,F}_ref both at the sampling temperature and restricted to the sets F_t stored in
    ``batch.allowed`` (for a batch not from the sampler: the policy's fp32 re-filter,
    ``modeling.with_allowed``). So ``old_logps`` (the ratio's denominator, the same distribution as
    the loss's π_θ, ``loss_filters``), ``ref_logps`` and the KL are finite on every sampled token,
    and the step-0 KL of a policy against its own copy is exactly 0.

    ``kl_tokens`` is the configured ``estimator`` with ``clamp_input``/``clamp_output`` applied
    (``ops.kl.kl_per_token``; OnlineConfig.kl_clamp_input/kl_clamp_output); ``kl_exact`` (what kl/ref
    reports) is never clamped. With a clamp, ``kl_clamped`` is (B, T) bool: True on counted tokens
    whose ``kl_tokens`` input or output was clamped (their gradient through a loss-side KL is 0), so
    kl/clamped_frac = kl_clamped.sum() / mask.sum(). Without a clamp the key is absent."""
    want_hidden = value_model is not None and value_model.needs_policy_hidden
    clamps = {"clamp_input": clamp_input, "clamp_output": clamp_output}
    parts: dict[str, list] = {}
    for s in range(0, batch.mask.shape[0], chunk):
        b = batch.select(slice(s, s + chunk))
        logits, hidden = forward_completion(policy, b, filters=loss_filters(filters), hidden=want_hidden)  # (b, T, V) π^{τ,F}_θ
        if uses_token_filter(filters) and b.allowed is None:
            b = with_allowed(b, logits)  # not a sampler batch: restrict the reference to the policy's sets
        ref_logits = reference.logits(b, filters=filters).to(logits.device)  # (b, T, V) π^{τ,F}_ref, eval mode
        ids, mask = b.completion_ids, b.mask
        old_logps = selective_logps(logits, ids).masked_fill(~mask, 0.0)
        ref_logps = selective_logps(ref_logits, ids).masked_fill(~mask, 0.0)
        exact = kl_per_token(old_logps, ref_logps, mask, estimator="exact", logits=logits, ref_logits=ref_logits).per_token
        if estimator == "exact" and clamp_output is None:  # the same values (clamp_input does not apply to exact)
            est, clamped = exact, torch.zeros_like(mask)
        else:
            kt = kl_per_token(old_logps, ref_logps, mask, estimator=estimator, logits=logits, ref_logits=ref_logits, **clamps)
            est, clamped = kt.per_token, kt.clamped
        row = {"old_logps": old_logps, "ref_logps": ref_logps, "kl_tokens": est, "kl_exact": exact,
               "entropy": entropy_from_logits(logits).masked_fill(~mask, 0.0)}
        if clamp_input is not None or clamp_output is not None:
            row["kl_clamped"] = clamped
        if value_model is not None:
            row["values"] = value_model.values(b, policy_hidden=hidden)
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def collect_rollout(
    policy, reference, value_model, rewards: RewardSet, tok, prompt_texts: Sequence[str], prompt_ids: Sequence[list],
    *, cfg: "OnlineConfig", generator: torch.Generator, chunk: int, device,
) -> Rollout:
    """Sample one completion per (repeated) prompt, score it, and score it under every model."""
    filters = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    batch, no_eos = sample(policy, prompt_ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                           max_new_tokens=cfg.max_new_tokens, generator=generator, **filters)
    batch = batch.to(device)
    completions = decode_completions(tok, batch)
    scores, reward_metrics = rewards(list(prompt_texts), completions)  # (B,), {"reward/<name>": (B,)}
    scores = apply_no_eos_penalty(scores, no_eos, cfg.no_eos_penalty).to(device)
    scored = score_rollout(policy, reference, value_model, batch, estimator=cfg.kl_estimator, filters=filters, chunk=chunk,
                           clamp_input=cfg.kl_clamp_input, clamp_output=cfg.kl_clamp_output)
    return Rollout(batch=batch, prompts=list(prompt_texts), completions=completions, no_eos=no_eos.to(device),
                   scores=scores, reward_metrics={k: v.to(device) for k, v in reward_metrics.items()}, **scored)


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
    tok = {"kl/ref_token_mean": token_mean(ro.kl_exact, mask) * n_tok, "policy/entropy": token_mean(ro.entropy, mask) * n_tok}
    if ro.kl_clamped is not None:  # fraction of counted tokens whose KL value was clamped (its gradient is 0)
        tok["kl/clamped_frac"] = (ro.kl_clamped & mask).sum().float()
    sums = {k: float(v) for k, v in {**seq, **tok}.items()}
    counts = {**{k: B for k in seq}, **{k: n_tok for k in tok}}
    return sums, counts
