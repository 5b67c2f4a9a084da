"""The one engine for sampling: sample -> decode -> score -> KL, called by every loop.

Every loop that draws completions and measures them goes through these functions (one
engine for sampling, as nanochat's ``Engine`` serves both evaluation and RL), so seeds, filters,
temperature, decoding and the definition of the KL cannot drift apart between them:

- the online rollout (``trainers.rollout.collect_rollout``): ``generate`` + ``score``;
- ``tether kl`` (``measure``) and every trainer's evaluation (``evaluate``: ``online.evaluate``,
  ``dpo.measure_ref_kl``, the demo's ``task.evaluate_policy``);
- best-of-n (``trainers.best_of_n.sample_and_score``) and the demo's preference pairs
  (``task.preference_pairs``): ``generate_batches``.

The API::

    generate(policy, prompt_ids, tokenizer=, sampling=, generator= | seed=) -> Samples
    generate_batches(..., batch_size=)                   -> Iterator[Samples]  (one generator, prompt order)
    score(policy, reference, samples, estimators=, chunk=, value_model=, clamp_*=) -> Scores
    measure(policy, reference, prompt_ids, ...)          -> dict (per-sequence KLs, means, standard errors)
    evaluate(policy, reference, prompt_ids, seed=, ...)  -> measure at eval_seed(seed), EVAL_BATCH_SIZE rows

Sampling settings and the KL (docs/theory.md §3): ``sampling`` is one ``groups.SamplingSettings``
(temperature τ, top_k, top_p, max_new_tokens), derived once from a config by ``groups.sampling_settings``
(a mapping of some of its fields, or None for the defaults, is accepted and converted by the same
function; ``max_new_tokens=`` overrides the length limit). The
sampler stores the token set F_t its filter allowed at each position (``batch.allowed``); ``score``
scores the policy as it was sampled, softmax(logits/τ) restricted to the *stored* F_t, and the
reference as the fixed process π^τ_ref (its logits divided by the same τ, over the whole vocabulary),
so every estimator measures KL[π^{τ,F}_θ‖π^τ_ref], finite on every sampled token; k1 and exact are
unbiased for it (``ops.kl.ESTIMATORS`` gives each one's bias). ``filter_cost`` = E Σ_t -log π^τ_ref(F_t)
is the filter's own share: the whole KL of a model against itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from . import rng
from .generation import BuiltinBackend, GenerationBackend
from .groups import SamplingSettings, sampling_settings
from .modeling import CompletionBatch, forward_completion
from .ops.kl import ESTIMATOR_NAMES, ESTIMATORS, check_estimator, check_reference_filter, kl_per_token, seq_sum
from .ops.logprobs import entropy_from_logits, filter_cost_from_logits, restrict_like, selective_logps
from .ops.positions import POSITION_BUCKETS, bucket_label, bucket_of, position_means
from .reference import eval_mode

EVAL_SEED_OFFSET = 7_777_777
"""Every evaluation samples with ``seed + EVAL_SEED_OFFSET`` (``eval_seed``): the online trainers, DPO's
kl/ref and the demo. Fixed across steps, so evaluation noise is common to every point of a curve; apart
from the training seeds (a rollout's generator is seeded from (seed, step, rank)), so evaluation samples
are not the ones trained on."""

EVAL_BATCH_SIZE = 64
"""Rows per sampling batch in ``evaluate``. Part of the protocol: the sampler's random draws depend on
the batch shape, so two evaluations see the same samples only with the same batch size."""


def eval_seed(seed: int) -> int:
    """The sampling seed of every evaluation of a run seeded ``seed``."""
    return int(seed) + EVAL_SEED_OFFSET


# --------------------------------------------------------------------------------------------------
# decode


def decode_completion(tok, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """The completion's text as it continues the prompt: decode(prompt + completion) minus decode(prompt).

    Decoding the completion tokens alone loses the leading space of SentencePiece/Llama tokenizers
    ("The old man" + "had" instead of " had"), and reward models score ``prompt + completion``
    (``rewards.join_text``). Special tokens (EOS) are skipped. Falls back to the plain decode if the
    prompt's text is not a prefix."""
    prompt_ids, completion_ids = list(prompt_ids), list(completion_ids)
    full = tok.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tok.decode(completion_ids, skip_special_tokens=True)


def decode_completions(tok, batch: CompletionBatch) -> list[str]:
    """Counted completion tokens only (nothing after EOS), special tokens dropped, as they continue
    each row's prompt (``decode_completion``)."""
    ids, attn, mask = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.mask.cpu()
    P = batch.prompt_len
    return [
        decode_completion(tok, ids[i, :P][attn[i, :P].bool()].tolist(), ids[i, P:][mask[i]].tolist())
        for i in range(ids.shape[0])
    ]


# --------------------------------------------------------------------------------------------------
# generate


@dataclass
class Samples:
    """Completions of one sampling batch, rows in prompt order."""

    batch: (
        CompletionBatch  # (B, P + T) on the policy's device; batch.allowed = the stored F_t (None without top-k/top-p)
    )
    no_eos: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    prompt_ids: list  # (B,) token-id lists
    completion_ids: list  # (B,) counted completion tokens (through the first EOS)
    completions: list  # (B,) decoded texts, each continuing its prompt (``decode_completion``)
    sampling: SamplingSettings  # the settings they were drawn with

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask  # (B, T) True = counted completion token


def _generator(generator: Optional[torch.Generator], seed: Optional[int], policy) -> torch.Generator:
    """The caller's generator, or one seeded ``seed`` on the policy's device (``tether.rng``)."""
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of generator= or seed=")
    return generator if generator is not None else rng.generator(seed, rng.device_of(policy))


@torch.no_grad()
def generate(
    policy,
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer,
    sampling=None,
    max_new_tokens: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    samples_per_prompt: int = 1,
    device=None,
    backend: Optional[GenerationBackend] = None,
) -> Samples:
    """One completion per row of ``prompt_ids`` (each prompt ``samples_per_prompt`` times, contiguous),
    all in one batch, drawn by ``backend`` (``tether.generation``; default: the built-in KV-cache
    sampler ``sampling.sample`` on ``policy``), stopping at the tokenizer's EOS (tokens after it are
    masked out), decoded with ``decode_completion``. ``device``: where the batch goes (default: the
    policy's). ``sampling``: a ``SamplingSettings`` (or what ``groups.sampling_settings`` converts)."""
    settings = sampling_settings(sampling, max_new_tokens=max_new_tokens)
    rows = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
    backend = BuiltinBackend(policy) if backend is None else backend
    batch, no_eos = backend.generate(
        rows,
        settings,
        _generator(generator, seed, policy),
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    comps = [batch.completion_ids[i][batch.mask[i]].tolist() for i in range(len(rows))]
    texts = [decode_completion(tokenizer, p, c) for p, c in zip(rows, comps)]
    device = rng.device_of(policy) if device is None else device
    return Samples(
        batch=batch.to(device),
        no_eos=no_eos.to(device),
        prompt_ids=rows,
        completion_ids=comps,
        completions=texts,
        sampling=settings,
    )


def generate_batches(
    policy,
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer,
    sampling=None,
    max_new_tokens: Optional[int] = None,
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    samples_per_prompt: int = 1,
    progress: bool = False,
    desc: str = "sampling",
    backend: Optional[GenerationBackend] = None,
) -> Iterator[Samples]:
    """``generate`` over the rows (each prompt ``samples_per_prompt`` times, prompt-major) in batches
    of ``batch_size``, one generator throughout: the batches, concatenated, are in prompt order."""
    gen = _generator(generator, seed, policy)
    settings = sampling_settings(sampling, max_new_tokens=max_new_tokens)
    flat = [p for p in prompt_ids for _ in range(samples_per_prompt)]
    starts = range(0, len(flat), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield generate(
            policy, flat[s : s + batch_size], tokenizer=tokenizer, sampling=settings, generator=gen, backend=backend
        )


# --------------------------------------------------------------------------------------------------
# score


@dataclass
class Scores:
    """Per-token scores of a sampled batch, (B, T) aligned with ``batch.completion_ids``, 0 off-mask."""

    mask: torch.Tensor  # (B, T) bool
    logps: torch.Tensor  # (B, T) log π^{τ,F}_θ(y_t): tempered, restricted to the stored F_t (the rollout's old_logps)
    ref_logps: (
        torch.Tensor
    )  # (B, T) log π^τ_ref(y_t): tempered, unfiltered (restricted to F_t with reference_filter="restricted")
    kl: dict  # estimator name -> (B, T) per-token KL (clamped when a clamp is given)
    kl_exact: torch.Tensor  # (B, T) exact per-token KL[π^{τ,F}_θ‖π^τ_ref], never clamped (what kl/ref reports)
    entropy: torch.Tensor  # (B, T) entropy of π^{τ,F}_θ(·|s_t)
    values: Optional[torch.Tensor] = None  # (B, T) V(s_t) (with a value model)
    kl_clamped: Optional[dict] = None  # estimator name -> (B, T) bool: clamped tokens (only when a clamp is given)
    filter_cost: Optional[torch.Tensor] = None  # (B, T) -log π^τ_ref(F_t): the filter's own share of kl_exact

    def seq(self, name: str) -> torch.Tensor:
        """(B,) sequence-sum KL with estimator ``name`` ("exact": the unclamped exact KL)."""
        full = ESTIMATORS[name].needs_logits and name not in self.kl  # the full-vocabulary one: kl_exact itself
        return seq_sum(self.kl_exact if full else self.kl[name], self.mask)


def score_rows(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    b: CompletionBatch,
    *,
    estimators: Sequence[str],
    clamp_input: Optional[float] = None,
    clamp_output: Optional[float] = None,
    reference_filter: str = "none",
) -> dict:
    """The per-token scores of rows ``b`` from the policy's logits of the sampled distribution π^{τ,F}_θ
    (tempered, -inf off the stored F_t) and the reference's tempered, unfiltered logits π^τ_ref, both
    (b, T, V) as ``score`` computes them: ``logps``, ``ref_logps``, ``kl_exact``, ``filter_cost``,
    ``entropy`` and ``kl/<name>`` (plus ``clamped/<name>`` when a clamp is set), each (b, T) and 0
    off-mask. ``score`` runs it on a no-grad pass; the online update runs it on the detached logits of
    its own forward when that forward is the behaviour policy's (one update per rollout:
    ``online.scores_from_update``), so both compute the same numbers the same way.

    ``kl_exact`` (what kl/ref and ``tether kl`` report) is always KL[π^{τ,F}_θ‖π^τ_ref] per token, to the
    fixed reference; ``filter_cost`` is -log π^τ_ref(F_t) (``ops.logprobs.filter_cost_from_logits``).
    ``reference_filter`` (docs/theory.md §3, ``ops.kl.REFERENCE_FILTERS``) picks the reference of the
    penalty, ``ref_logps`` and ``kl/<name>``: "none" (default) the same fixed π^τ_ref; "restricted"
    π^τ_ref restricted to F_t and renormalised, whose KL is kl_exact - filter_cost per token."""
    check_reference_filter(reference_filter)
    clamps = {"clamp_input": clamp_input, "clamp_output": clamp_output}
    clamping = clamp_input is not None or clamp_output is not None
    ids, mask = b.completion_ids, b.mask
    logps = selective_logps(logits, ids).masked_fill(~mask, 0.0)  # (b, T)
    fixed_logps = selective_logps(ref_logits, ids).masked_fill(~mask, 0.0)  # (b, T) log π^τ_ref(y_t)
    exact = kl_per_token(logps, fixed_logps, mask, estimator="exact", logits=logits, ref_logits=ref_logits).per_token
    pen_logits, ref_logps = ref_logits, fixed_logps  # the penalty's reference
    if reference_filter == "restricted":
        pen_logits = restrict_like(ref_logits, logits)  # (b, T, V) π^τ_ref restricted to F_t
        ref_logps = selective_logps(pen_logits, ids).masked_fill(~mask, 0.0)
    row = {
        "logps": logps,
        "ref_logps": ref_logps,
        "kl_exact": exact,
        "filter_cost": filter_cost_from_logits(logits, ref_logits).masked_fill(~mask, 0.0),
        "entropy": entropy_from_logits(logits).masked_fill(~mask, 0.0),
    }
    for name in estimators:
        if ESTIMATORS[name].needs_logits and clamp_output is None and reference_filter == "none":  # = kl_exact
            est, clamped = exact, torch.zeros_like(mask)  # (clamp_input does not apply to exact)
        else:
            kt = kl_per_token(logps, ref_logps, mask, estimator=name, logits=logits, ref_logits=pen_logits, **clamps)
            est, clamped = kt.per_token, kt.clamped
        row[f"kl/{name}"] = est
        if clamping:
            row[f"clamped/{name}"] = clamped
    return row


def score_rows_from_head(
    scores: dict,
    b: CompletionBatch,
    *,
    estimators: Sequence[str],
    clamp_input: Optional[float] = None,
    clamp_output: Optional[float] = None,
    reference_filter: str = "none",
) -> dict:
    """``score_rows`` from the per-token scores ``ops.head.head_scores`` computed with a reference
    (``logps``, ``ref_logps``, ``kl_exact``, ``entropy``, ``filter_cost``, each (b, T)) instead of (b, T, V)
    logits: the same keys, the same numbers to float32 rounding, detached. The restricted reference
    (``reference_filter: restricted``) needs no logits either: log π^τ_ref(y | F_t) = log π^τ_ref(y) +
    filter_cost and its KL is kl_exact - filter_cost (docs/theory.md §3)."""
    check_reference_filter(reference_filter)
    clamps = {"clamp_input": clamp_input, "clamp_output": clamp_output}
    clamping = clamp_input is not None or clamp_output is not None
    mask = b.mask
    off = ~mask
    logps = scores["logps"].detach().masked_fill(off, 0.0)
    fixed_logps = scores["ref_logps"].detach().masked_fill(off, 0.0)
    exact = scores["kl_exact"].detach().masked_fill(off, 0.0)
    cost = scores["filter_cost"].detach().masked_fill(off, 0.0)
    ref_logps, pen_exact = fixed_logps, exact
    if reference_filter == "restricted":
        ref_logps, pen_exact = (fixed_logps + cost).masked_fill(off, 0.0), exact - cost
    row = {
        "logps": logps,
        "ref_logps": ref_logps,
        "kl_exact": exact,
        "filter_cost": cost,
        "entropy": scores["entropy"].detach().masked_fill(off, 0.0),
    }
    for name in estimators:
        kt = kl_per_token(logps, ref_logps, mask, estimator=name, exact=pen_exact, **clamps)
        row[f"kl/{name}"] = kt.per_token
        if clamping:
            row[f"clamped/{name}"] = kt.clamped
    return row


@torch.no_grad()
def score(
    policy,
    reference,
    samples: Union[Samples, CompletionBatch],
    *,
    sampling=None,
    estimators: Sequence[str] = ("exact",),
    chunk: Optional[int] = None,
    value_model=None,
    clamp_input: Optional[float] = None,
    clamp_output: Optional[float] = None,
    reference_filter: str = "none",
) -> Scores:
    """Policy, reference (and value-model) scores of a sampled batch, ``chunk`` rows per forward pass
    (None: all rows at once); the policy in eval mode (no dropout, TRL #506), the reference too.

    The policy is scored as it was sampled (docs/theory.md §3): π^{τ,F}_θ at the sampling temperature,
    restricted to the sets F_t stored in ``batch.allowed`` (for a batch not from the sampler: the
    policy's fp32 re-filter). The reference is the fixed process π^τ_ref: the same temperature, the
    whole vocabulary. So ``logps`` (the ratio's denominator, the same distribution as the loss's π_θ),
    ``ref_logps`` and every KL are finite on every sampled token; every KL is KL[π^{τ,F}_θ‖π^τ_ref], and
    ``filter_cost`` = -log π^τ_ref(F_t) is the part of it the filter alone causes: a policy against its
    own copy gives exactly 0 without top-k/top-p and exactly its filter cost with them (exact estimator).
    ``reference_filter``: the penalty's reference (``score_rows``).

    ``sampling``: the settings ``samples`` were drawn with (default: ``samples.sampling``; a different
    one is refused: the KL is defined under the sampled distribution). ``estimators``: the per-token
    KLs wanted in ``kl`` (``ops.kl.kl_per_token``), each with ``clamp_input``/``clamp_output`` applied
    (OnlineConfig.kl_clamp_input/kl_clamp_output); ``kl_exact`` is always computed and never clamped.
    With a clamp, ``kl_clamped[name]`` is True on counted tokens whose input or output was clamped
    (their gradient through a loss-side KL is 0): kl/clamped_frac = kl_clamped.sum() / mask.sum()."""
    if isinstance(samples, Samples):
        if sampling is not None and not sampling_settings(sampling).same_distribution(samples.sampling):
            raise ValueError(
                f"samples were drawn with {samples.sampling.filters()}, not "
                f"{sampling_settings(sampling).filters()}: the KL is defined under the sampled distribution "
                "(docs/theory.md §3)"
            )
        f, batch = samples.sampling, samples.batch
    else:
        f, batch = sampling_settings(sampling), samples
    for name in estimators:
        check_estimator(name, field="estimators")
    want_hidden = value_model is not None and value_model.needs_policy_hidden
    clamping = clamp_input is not None or clamp_output is not None
    B = batch.mask.shape[0]
    parts: dict[str, list] = {}
    with eval_mode(policy):
        for s in range(0, B, chunk or max(B, 1)):
            b = batch.select(slice(s, s + (chunk or B)))
            logits, hidden = forward_completion(policy, b, filters=f, hidden=want_hidden)  # (b, T, V) π^{τ,F}_θ
            ref_logits = reference.logits(b, filters=f).to(logits.device)  # (b, T, V) π^τ_ref, eval mode
            row = score_rows(
                logits,
                ref_logits,
                b,
                estimators=estimators,
                clamp_input=clamp_input,
                clamp_output=clamp_output,
                reference_filter=reference_filter,
            )
            if value_model is not None:
                row["values"] = value_model.values(b, policy_hidden=hidden)
            for k, v in row.items():
                parts.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in parts.items()}
    return Scores(
        mask=batch.mask,
        logps=out["logps"],
        ref_logps=out["ref_logps"],
        kl={n: out[f"kl/{n}"] for n in estimators},
        kl_exact=out["kl_exact"],
        entropy=out["entropy"],
        values=out.get("values"),
        kl_clamped={n: out[f"clamped/{n}"] for n in estimators} if clamping else None,
        filter_cost=out["filter_cost"],
    )


# --------------------------------------------------------------------------------------------------
# measure, evaluate


def mean_stderr(x: torch.Tensor, *, per_prompt: int = 1) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n), n - 1 in the variance).

    ``per_prompt`` = k > 1: ``x`` holds k samples of each prompt, prompt-major (the engine's order,
    ``generate_batches``), and the standard error is that of the mean of the per-prompt means: the
    prompts are the independent units, the k samples of one prompt are correlated (they share it), so
    treating all n·k values as independent would understate the error whenever prompts differ. The
    mean is the same either way (every prompt has k samples)."""
    if per_prompt > 1:
        if x.numel() % per_prompt:
            raise ValueError(f"{x.numel()} values are not a whole number of prompts x {per_prompt} samples")
        x = x.double().view(-1, per_prompt).mean(dim=1)  # (P,) per-prompt means
    x = x.double()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


@torch.no_grad()
def measure(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer,
    samples_per_prompt: int = 1,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 32,
    seed: int = 0,
    estimators: Sequence[str] = ESTIMATOR_NAMES,
    sampling=None,
    chunk: Optional[int] = None,
    progress: bool = False,
    return_samples: bool = False,
    by_position: bool = False,
    backend: Optional[GenerationBackend] = None,
) -> dict:
    """Sample ``samples_per_prompt`` completions per prompt from ``policy`` (``generate_batches``, drawn by
    ``backend``, default the built-in sampler,
    seeded ``seed``) and estimate the sequence KL[π^{τ,F}_θ‖π^τ_ref] of each with every estimator
    (``score``) on the same samples.

    Returns ``{"estimators": {name: {"mean", "stderr"}}, "filter_cost": {"mean", "stderr"}, "token_mean",
    "response_len", "samples", "per_sequence": {name: list}}``, rows in prompt order (+ ``"completions"``:
    token lists and ``"texts"``: decoded completions, if ``return_samples``). ``token_mean`` is the exact
    per-token KL averaged over all completion tokens (not the sequence KL). ``filter_cost`` is the
    sequence sum Σ_t -log π^τ_ref(F_t) (0 without top-k/top-p): the exact KL minus it is the KL to the
    reference restricted to the sampled sets (docs/theory.md §3).

    ``by_position`` adds ``"by_position"``: the exact per-token KL at completion position t (0 = first)
    averaged over the samples that reach t (a list, one per position), ``"by_position_n"``: how many
    samples reach each position, and ``"by_length"``: per completion-length bucket
    (``ops.positions.POSITION_BUCKETS``), ``{"lengths", "n", "estimators": {name: {"mean", "stderr"}}}``
    of the sequence KL (``length_buckets``): how the noise of each estimator grows with length; and
    ``"by_prefix"``: ``{"tokens": L, "estimators": {name: {"mean", "stderr"}}}`` of the KL of the first L
    tokens of every sample, L in ``PREFIX_LENGTHS`` below max_new_tokens (the same growth, on models that
    rarely stop early, where every sample falls in one length bucket)."""
    per_seq: dict[str, list] = {name: [] for name in estimators}
    cost: list[float] = []  # per sequence: Σ_t -log π^τ_ref(F_t)
    pos_sum = torch.zeros(0, dtype=torch.float64)
    pos_n = torch.zeros(0, dtype=torch.float64)
    prefix: dict = {}  # L -> estimator -> per-sample KL of the first L tokens
    lengths: list[int] = []
    tok_sum, tok_n = 0.0, 0
    completions: list[list[int]] = []
    texts: list[str] = []
    settings = sampling_settings(sampling, max_new_tokens=max_new_tokens)
    max_new_tokens = settings.max_new_tokens
    for smp in generate_batches(
        policy,
        prompt_ids,
        tokenizer=tokenizer,
        sampling=settings,
        batch_size=batch_size,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
        progress=progress,
        desc="sampling + scoring",
        backend=backend,
    ):
        sc = score(policy, reference, smp, estimators=estimators, chunk=chunk)
        for name in estimators:
            per_seq[name].extend(sc.seq(name).tolist())
        cost.extend(seq_sum(sc.filter_cost, smp.mask).tolist())
        lengths.extend(smp.mask.sum(-1).tolist())
        tok_sum += float(sc.kl_exact.sum())
        tok_n += int(smp.mask.sum())
        if by_position:
            for name in estimators:  # KL of the first L tokens of each sample (all of it when shorter)
                full = ESTIMATORS[name].needs_logits and name not in sc.kl  # the full-vocabulary one: kl_exact
                per_tok = (sc.kl_exact if full else sc.kl[name]).masked_fill(~smp.mask, 0.0)
                for L in PREFIX_LENGTHS:
                    prefix.setdefault(L, {}).setdefault(name, []).extend(per_tok[:, :L].sum(-1).tolist())
            ps, pn = position_means(sc.kl_exact.cpu(), smp.mask.cpu())  # (T,), (T,)
            T = max(pos_sum.numel(), ps.numel())
            pos_sum = torch.nn.functional.pad(pos_sum, (0, T - pos_sum.numel())) + torch.nn.functional.pad(
                ps, (0, T - ps.numel())
            )
            pos_n = torch.nn.functional.pad(pos_n, (0, T - pos_n.numel())) + torch.nn.functional.pad(
                pn, (0, T - pn.numel())
            )
        if return_samples:
            completions.extend(smp.completion_ids)
            texts.extend(smp.completions)
    result = {
        "estimators": {},
        "token_mean": tok_sum / max(tok_n, 1) if tok_n else None,
        "response_len": sum(lengths) / max(len(lengths), 1),
        "samples": len(lengths),
        "per_sequence": per_seq,
        "filter_cost": dict(zip(("mean", "stderr"), mean_stderr(torch.tensor(cost, dtype=torch.float64)))),
    }
    for name in estimators:
        m, se = mean_stderr(torch.tensor(per_seq[name]))
        result["estimators"][name] = {"mean": m, "stderr": se}
    if by_position:
        keep = pos_n > 0
        result["by_position"] = (pos_sum[keep] / pos_n[keep]).tolist()
        result["by_position_n"] = [int(n) for n in pos_n[keep].tolist()]
        result["by_length"] = length_buckets(per_seq, lengths)
        result["by_prefix"] = [
            {
                "tokens": L,
                "estimators": {
                    n: dict(zip(("mean", "stderr"), mean_stderr(torch.tensor(v)))) for n, v in prefix[L].items()
                },
            }
            for L in PREFIX_LENGTHS
            if L in prefix and (L < max_new_tokens or L == PREFIX_LENGTHS[0])
        ]
    if return_samples:
        result["completions"], result["texts"] = completions, texts
    return result


PREFIX_LENGTHS = (4, 16, 64, 256, 1024)
"""Prefix lengths of ``measure(by_position=True)``'s ``by_prefix``."""


def length_buckets(per_seq: dict, lengths: Sequence[int], buckets=POSITION_BUCKETS) -> list[dict]:
    """Sequence KL per completion-length bucket: for each non-empty bucket, ``{"lengths": label, "n": count,
    "estimators": {name: {"mean", "stderr"}}}`` from ``per_seq[name]`` (one value per sample, aligned with
    ``lengths``). The standard error is the sample std / sqrt(n) within the bucket (``mean_stderr``)."""
    idx = [bucket_of(int(n), buckets) for n in lengths]
    out = []
    for b, bucket in enumerate(buckets):
        rows = [i for i, j in enumerate(idx) if j == b]
        if not rows:
            continue
        est = {}
        for name, vals in per_seq.items():
            m, se = mean_stderr(torch.tensor([vals[i] for i in rows], dtype=torch.float64))
            est[name] = {"mean": m, "stderr": se}
        out.append({"lengths": bucket_label(bucket), "n": len(rows), "estimators": est})
    return out


def evaluate(
    policy,
    reference,
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer,
    seed: int,
    samples_per_prompt: int = 1,
    max_new_tokens: Optional[int] = None,
    sampling=None,
) -> dict:
    """``measure`` as every evaluation runs it (online ``evaluate``, DPO's kl/ref, the demo): the exact
    estimator, at ``eval_seed(seed)`` with ``EVAL_BATCH_SIZE`` rows per batch, samples returned. So two
    trainers evaluating one policy on the same prompts and settings see the same samples and KL."""
    return measure(
        policy,
        reference,
        prompt_ids,
        tokenizer=tokenizer,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        batch_size=EVAL_BATCH_SIZE,
        seed=eval_seed(seed),
        estimators=("exact",),
        sampling=sampling,
        return_samples=True,
    )
