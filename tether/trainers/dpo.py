"""Offline preference optimisation: DPO (Rafailov et al. 2023) and its variants, with the KL to the
reference measured, not assumed.

Each optimiser step, top to bottom:

1. the step's global batch of pairs is a pure function of (seed, step) (``StepBatches``), sharded
   over processes and cut into ``grad_accum`` micro-batches;
2. one forward pass scores chosen and rejected together, giving sequence log-probs
   ``logps`` = Σ_t log π_θ(y_t|s_t): the 2B sequences are packed padding-free into rows (positions
   restart per sequence, so attention stays within a sequence) and the LM head runs only on the
   positions that predict completion tokens (``padding_free``; else a padded 2B-row batch with
   ``logits_to_keep``); with ``shared_prompt`` a pair is one segment [prompt, chosen, rejected]
   under a prefix-tree attention mask, its prompt computed once (Wang et al. 2024, arXiv:2410.20305);
3. ``ref_logps`` come from the one reference object (precomputed cache by default, or a live copy,
   the LoRA-disabled policy, an offloaded copy, or a TR-DPO synced copy);
4. ``ops.preference.preference_loss`` gives per-pair losses; each micro-batch backpropagates its
   loss *sum* divided by the global number of pairs, so accumulation and data parallelism equal
   one full batch (gradients all-reduced with SUM);
5. clip, step, schedule, β update, reference sync; log the fixed metrics.

Every ``eval_every`` steps (and at the last step unless ``eval_final`` is false): held-out pair
accuracy, and ``kl/ref`` — completions sampled from π_θ for held-out prompts, scored with the exact
(Rao-Blackwellised) sequence KL against a live reference (with the precomputed form, the frozen copy
that built the cache, or the LoRA-disabled policy; with TR-DPO ``sync``, the moving reference). The
sampling seed is the same at every evaluation (common random numbers, ``engine.eval_seed``: the one the
online trainers and the demo evaluate with), so changes in ``kl/ref`` reflect the policy, not the draw.

Metrics (metrics.jsonl, TensorBoard): ``loss``, ``rewards/{chosen,rejected,margins,accuracy}``
(implicit rewards β·(logπ_θ - logπ_ref), means over the global batch), ``logps/{chosen,rejected}``
(mean sequence log-probs), ``beta``, ``opt/lr``, ``opt/grad_norm`` (before clipping),
``data/tokens``, ``data/tokens_computed``, ``data/padding_frac``, ``perf/tokens_per_s``; at evaluations ``kl/ref``,
``kl/ref_stderr``, ``eval/loss``, ``eval/rewards/accuracy``, ``eval/rewards/margins``.

Deviations from the DPO reference code, and why:
- The reference log-probs are cached once for the pairs the run visits (and reused by any run with
  the same reference weights and data), instead of a reference forward pass per step.
- Batches are grouped by length (``group_by_length``) and packed (``padding_free``) so padding does
  not dominate compute; grouping changes which pairs share a step (as HF's ``group_by_length``), not
  what each pair contributes; packing and sharing the prompt change only float rounding (~1e-6
  relative).
- β may follow a schedule (``BetaScheduleConfig``); adaptive/constraint controllers need on-policy KL
  every step, which offline DPO does not measure, so DPOConfig has no such fields (``refused_fields``
  says why when one is given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import torch

from ..assets import resolve_model
from ..callbacks import Callbacks
from ..config import config_group
from ..control import BetaScheduleConfig, build_controller
from ..data.preference import (
    PackedPairs,
    StepBatches,
    check_rows,
    collate_pairs,
    large_pair_rows,
    load_large_pairs,
    pack_pairs,
    pack_sequences,
    pair_tokens,
    pair_width,
    read_raw_rows,
    share_prompts_pays,
    split_holdout,
    tokenize_pairs,
)
from ..data.text import column_map, eval_split_of, rename_columns
from ..diagnostics.forgetting import ForgettingProbe
from ..diagnostics.overfit import OverfitMonitor
from ..distributed import Dist
from ..engine import evaluate as evaluate_kl
from ..errors import UserError
from ..fsdp import is_sharded, models_of, shard_reference, unsharded
from ..groups import DATA_FIELDS, ReferenceConfig, SamplingSettings
from ..inputs import accepts_objects, datasets_as_rows
from ..modeling import completion_logps, packed_token_logps, shared_prompt_token_logps
from ..ops.kl import seq_sum
from ..ops.preference import check_loss_options, check_loss_type, preference_loss
from ..preempt import preemptible, stop_if_signalled
from ..reference import (
    OffloadedReference,
    PrecomputedReference,
    Reference,
    check_lora_reference,
    check_reference_form,
    eval_mode,
    reference_from_config,
)
from ..registry import run_preflight
from ..runs import History, RunDir, save_final
from ..training import (
    Checkpointer,
    StepGuard,
    TrainConfig,
    derive_micro_batch,
    load_policy,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    postfix,
    progress_bar,
    set_train_mode,
    trainable_params,
    with_epochs,
)
from .result import TrainResult

log = logging.getLogger(__name__)


@config_group("reference", prefixes=("reference", "ref"))
@dataclass
class DPOReferenceConfig(ReferenceConfig):
    """dpo's reference group: the shared one plus the precomputed cache and TR-DPO's sync."""

    reference: str = "precomputed"
    """precomputed (cache ref log-probs once; default) | copy | lora (adapters disabled) | offload | sync (TR-DPO)."""
    reference_model: Optional[str] = None
    """Reference model path (default: the starting --model)."""
    ref_sync_mode: str = "hard"
    """TR-DPO sync: hard (θ_ref ← θ) or soft (θ_ref ← αθ + (1-α)θ_ref)."""
    ref_sync_every: int = 512
    """TR-DPO τ: sync the reference every N optimiser steps."""
    ref_sync_alpha: float = 0.6
    """TR-DPO α for soft sync."""
    ref_cache_dir: Optional[str] = None
    """Where precomputed reference log-probs are cached (default: OUTPUT_DIR/ref_cache); share it across runs."""
    ref_batch_size: int = 64
    """Sequences per forward pass when precomputing reference log-probs."""


BETA_CONTROLLERS_REFUSED = (
    "dpo supports a fixed or scheduled beta (beta, beta_schedule); kl_target/kl_budget need "
    "an on-policy KL every step, which offline DPO does not measure: use tether ppo, grpo or rloo"
)


@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)
@dataclass
class DPOConfig(TrainConfig, BetaScheduleConfig, DPOReferenceConfig):
    """Config of ``tether dpo`` (the groups of TrainConfig, BetaScheduleConfig and DPOReferenceConfig plus these)."""

    refused_fields: ClassVar[dict] = {
        k: BETA_CONTROLLERS_REFUSED for k in ("kl_target", "kl_budget", "kl_horizon", "kl_budget_lr")
    }

    dataset: str = ""
    """Preference pairs: .json/.jsonl/.parquet (optionally .gz), a datasets folder, a hub name, or hh-rlhf (asset)."""
    dataset_split: str = "train"
    """Split to read from a datasets folder or hub dataset."""
    eval_dataset: Optional[str] = None
    """Held-out pairs (same formats); default: the test/validation split of a saved DatasetDict, else eval_fraction
    of dataset held out (seeded)."""
    eval_fraction: float = 0.1
    """Fraction of dataset held out for eval/* and kl/ref prompts when eval_dataset is not given."""
    eval_pairs: int = 256
    """At most this many held-out pairs are scored for eval/rewards/accuracy (0 = all)."""
    skip_bad_rows: bool = False
    """Skip (and count) rows with missing, non-string, empty or identical chosen/rejected instead of failing."""
    chat_template: Optional[str] = None
    """Jinja chat template (string or file) for conversational rows when the tokenizer has none."""
    prompt_field: str = "prompt"
    """Column holding the prompt (e.g. question for Stack Exchange paired data)."""
    chosen_field: str = "chosen"
    """Column holding the preferred completion (e.g. response_j)."""
    rejected_field: str = "rejected"
    """Column holding the other completion (e.g. response_k)."""
    columns: Optional[dict] = None
    """Rename source columns first: a YAML map {question: prompt, response_j: chosen} or
    'question=prompt,response_j=chosen'."""
    max_length: int = 256
    """Tokens per sequence (prompt + completion); prompts are cut from the left, completions from the right."""
    max_prompt_length: Optional[int] = None
    """Prompt tokens kept at most (default: max_length // 2 when a pair is too long)."""
    max_completion_length: Optional[int] = None
    """Completion tokens kept at most (default: whatever max_length leaves)."""
    add_eos: bool = True
    """End each plain-text completion with EOS (as TRL)."""
    loss_type: str = "sigmoid"
    """One of tether.ops.preference.LOSS_TYPES: sigmoid, cdpo, robust, ipo, hinge, fdpo_*, simpo."""
    label_smoothing: float = 0.0
    """ε: cdpo's soft-label weight or robust's assumed flip rate (0 for the other losses)."""
    ipo_length_normalize: bool = False
    """IPO on per-token log-ratios (TRL's convention) instead of sequence sums (the DPO reference code)."""
    f_alpha: float = 0.5
    """α of fdpo_alpha (paper convention; TRL's f_alpha_divergence_coef is 1 - α)."""
    simpo_gamma: float = 0.5
    """SimPO target margin γ."""
    shuffle: bool = True
    """Shuffle pairs every epoch (seeded by seed + epoch); off = data order."""
    padding_free: bool = True
    """Pack the policy's 2B sequences into rows with restarting positions (no padding inside a row);
    checked once against the padded layout, which is used instead if the model does not support it."""
    shared_prompt: str = "auto"
    """Lay a pair out as [prompt, chosen, rejected] (the prompt computed once, the rejected tokens attending
    to the prompt and causally to themselves; Wang et al. 2024) instead of two sequences: auto (where the
    model's attention takes the mask, it gives the two-sequence log-probs, and a batch computes >= 15% fewer
    token slots) | true | false. Needs padding_free."""
    group_by_length: bool = True
    """Group pairs of similar length into the same step (windows of bucket_window batches) to cut padding."""
    bucket_window: int = 32
    """Batches per length-sorting window when group_by_length is on."""
    eval_batch_size: int = 32
    """Pairs per forward pass when scoring held-out pairs."""
    kl_prompts: int = 32
    """Held-out prompts sampled for kl/ref (0 = no KL measurement)."""
    kl_samples: int = 2
    """Completions sampled per prompt for kl/ref."""
    kl_max_new_tokens: int = 32
    """Length limit of the completions sampled for kl/ref."""
    kl_temperature: float = 1.0
    """Sampling temperature for kl/ref (1.0 = the policy itself)."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def load_pairs(
    cfg: DPOConfig,
    tok,
    *,
    rows: Optional[Sequence[dict]] = None,
    eval_rows: Optional[Sequence[dict]] = None,
    is_main: bool = True,
) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, held-out pairs, data report). Each pair: prompt_ids, chosen_ids, rejected_ids.
    Held out: eval_dataset (or eval_rows), else the test/validation split of a saved DatasetDict
    given as dataset, else eval_fraction of dataset. Columns are renamed first (columns, *_field)."""
    check = dict(skip_bad_rows=cfg.skip_bad_rows, tokenizer=tok, chat_template=cfg.chat_template)
    mapping = column_map(cfg.columns, prompt=cfg.prompt_field, chosen=cfg.chosen_field, rejected=cfg.rejected_field)
    if rows is None and eval_rows is None and not cfg.eval_dataset and (large := large_pair_rows(cfg.dataset)):
        return _load_large_pairs(cfg, tok, large, mapping, check, is_main)
    raw = list(rows) if rows is not None else read_raw_rows(cfg.dataset, split=cfg.dataset_split, assets=cfg.assets)
    train_rows, skipped = check_rows(
        rename_columns(raw, mapping, where=cfg.dataset or "rows"), source=cfg.dataset or "rows", **check
    )
    held_split = (
        None
        if rows is not None or eval_rows is not None or cfg.eval_dataset
        else eval_split_of(cfg.dataset, split=cfg.dataset_split)
    )
    if eval_rows is not None or cfg.eval_dataset or held_split:
        raw_eval = (
            list(eval_rows)
            if eval_rows is not None
            else read_raw_rows(
                cfg.eval_dataset or cfg.dataset, split=held_split or cfg.dataset_split, assets=cfg.assets
            )
        )
        held_rows, _ = check_rows(
            rename_columns(raw_eval, mapping, where=cfg.eval_dataset or cfg.dataset or "eval rows"),
            source=cfg.eval_dataset or cfg.dataset or "eval rows",
            **check,
        )
        if held_split and is_main:
            log.info("dpo data: evaluating on the %r split of %s", held_split, cfg.dataset)
    else:
        tr, ho = split_holdout(len(train_rows), cfg.eval_fraction, seed=cfg.seed)
        train_rows, held_rows = [train_rows[i] for i in tr], [train_rows[i] for i in ho]
    trunc = dict(
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length,
        add_eos=cfg.add_eos,
    )
    train, report = tokenize_pairs(train_rows, tok, source="train pairs", **trunc)
    held = tokenize_pairs(held_rows, tok, source="held-out pairs", **trunc)[0] if held_rows else []
    if cfg.eval_pairs and len(held) > cfg.eval_pairs:
        held = held[: cfg.eval_pairs]
    info = {
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "skipped_rows": sum(skipped.values()),
        **{f"truncation/{k}": v for k, v in report.as_dict().items()},
    }
    if is_main:
        log.info("dpo data: %s", info)
    return train, held, info


def _load_large_pairs(cfg: DPOConfig, tok, lines, mapping: dict, check: dict, is_main: bool):
    """``load_pairs`` for a .jsonl file of more than ``preference.EAGER_PAIRS`` rows: the same pairs,
    read on demand, checked and tokenised in chunks, kept in flat arrays (``preference.PairStore``)."""
    trunc = dict(
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length,
        add_eos=cfg.add_eos,
    )
    train, held, skipped, report = load_large_pairs(
        lines, mapping=mapping, eval_fraction=cfg.eval_fraction, eval_pairs=cfg.eval_pairs, seed=cfg.seed,
        source=cfg.dataset, **check, **trunc,
    )  # fmt: skip
    info = {
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "skipped_rows": sum(skipped.values()),
        **{f"truncation/{k}": v for k, v in report.as_dict().items()},
    }
    if is_main:
        log.info("dpo data: %s (read in chunks)", info)
    return train, held, info


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def setup_reference(
    cfg: DPOConfig, policy, tok, pairs: list[dict], visited: list[int], dist: Dist, start=None, shared: str = "off"
) -> tuple[Reference, Reference]:
    """(training reference, live reference for kl/ref). They are the same object except for
    'precomputed', whose live partner is the model that built the cache (kept for kl/ref).

    ``pairs``: every pair the run may score (training pairs, then held-out ones); pair i's chosen
    and rejected rows have reference ids 2i and 2i + 1. ``visited``: the pair indices to cache.
    ``start``: the policy's starting weights (``training.Start``; default: ``cfg.model``). ``shared``: the
    policy's shared-prompt mode (``shared_prompt_mode``); the packed cache build shares prompts the same
    way where this model takes the mask."""
    start = resolve_model(cfg.model, cfg.assets) if start is None else start
    live = reference_from_config(cfg, policy=policy, tokenizer=tok, policy_path=start, device=dist.device)
    if cfg.reference != "precomputed":
        return live, live
    rows = [(2 * i, pairs[i]["prompt_ids"], pairs[i]["chosen_ids"]) for i in visited]
    rows += [(2 * i + 1, pairs[i]["prompt_ids"], pairs[i]["rejected_ids"]) for i in visited]
    cache = Path(cfg.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")
    # padding-free like training where it gives this model's padded log-probs (a LoRA policy's base is
    # scored through its adapters-off context: padded)
    packed = (
        cfg.padding_free
        and live.kind == "copy"
        and bool(visited)
        and packing_works(live.model, [pairs[i] for i in visited[:4]], pad_id=tok.pad_token_id, device=dist.device)
    )
    share = (
        shared
        if packed
        and shared != "off"
        and shared_prompt_works(
            live.model, [pairs[i] for i in visited[:4]], pad_id=tok.pad_token_id, device=dist.device
        )
        else "off"
    )
    if share == "off":
        rows.sort(key=lambda r: (len(r[1]) + len(r[2]), r[0]))  # similar lengths share a batch: little padding
    else:  # a pair's two rows side by side (one shared prompt), pairs of similar width together
        rows.sort(key=lambda r: (pair_width(pairs[r[0] // 2]), r[0]))
    build = lambda: PrecomputedReference.build(  # noqa: E731
        live,
        live.model,
        rows,
        pad_id=tok.pad_token_id,
        cache_dir=cache,
        batch_size=cfg.ref_batch_size,
        progress=cfg.progress and dist.is_main,
        packed=packed,
        share_prompts=share,
    )
    ref = build() if dist.is_main else None
    dist.barrier()  # rank 0 writes the cache; the others then read it (no two writers)
    if ref is None:
        ref = build()
    if dist.device.type != "cpu" and live.static_copy:
        live = OffloadedReference(live.model, compute_device=dist.device)  # eval-only: keep it off the accelerator
    return ref, live


# ----------------------------------------------------------------------------------------------------
# Scoring pairs
# ----------------------------------------------------------------------------------------------------


def pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs and completion lengths of a 2B-row batch of pairs: ((2B,), (2B,)).

    ``batch``: a ``CompletionBatch`` (padded; logits only at completion positions via
    ``logits_to_keep``) or ``PackedPairs`` (padding-free; the LM head runs only on the hidden states
    that predict completion tokens)."""
    if isinstance(batch, PackedPairs):
        return packed_logps(model, batch), batch.lengths
    logps = completion_logps(model, batch)  # (2B, T) fp32, 0 off-mask
    return seq_sum(logps, batch.mask), batch.mask.sum(-1)


def packed_logps(model, batch: PackedPairs) -> torch.Tensor:
    """(2B,) sequence log-probs from the packed layout: decoder over (R, W) rows with restarting
    positions and no attention mask (block-diagonal causal attention), or, with shared prompts, the
    prefix-tree mask (``modeling.shared_prompt_token_logps``); then the LM head on the N predicting
    positions only."""
    lp = (shared_prompt_token_logps if batch.shared_prompts else packed_token_logps)(model, batch)  # (N,) fp32
    return torch.zeros(batch.n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, batch.seq, lp)


@torch.no_grad()
def packing_works(model, pairs: list[dict], *, pad_id: int, device) -> bool:
    """True if the packed layout gives this model's padded-layout log-probs (to float rounding).
    Models whose output is not decoder → LM head (logit soft-capping, scaling) or whose attention
    ignores packed position ids fail here and train padded."""
    try:
        with eval_mode(model):
            packed = packed_logps(model, pack_pairs(pairs, pad_id=pad_id).to(device))
            padded = pair_logps(model, collate_pairs(pairs, pad_id=pad_id).to(device))[0]
    except Exception as e:  # noqa: BLE001 - any failure means: use the padded layout
        log.warning(
            "padding-free batches unavailable for this model (%s: %s); using padded batches", type(e).__name__, e
        )
        return False
    err = float(((packed - padded).abs() / (1 + padded.abs())).max())
    if err > 1e-4:
        log.warning(
            "padding-free log-probs differ from padded ones by %.2g (relative) for this model; using padded batches",
            err,
        )
        return False
    return True


@torch.no_grad()
def shared_prompt_works(model, pairs: list[dict], *, pad_id: int, device) -> bool:
    """True if the shared-prompt layout ([prompt, chosen, rejected] with the prefix-tree mask) gives this
    model's padded-layout log-probs (to float rounding). Attention implementations that take no custom
    mask (flash_attention_2/3, FlexAttention on CPU: no backward there) and models whose output is not
    decoder → LM head fail here, with a log line, and keep one sequence per completion."""
    if next(model.parameters()).device.type == "cpu" and model.config._attn_implementation == "flex_attention":
        log.info("shared prompt off: FlexAttention has no backward pass on CPU; each completion gets its own prompt")
        return False
    try:
        with eval_mode(model):
            shared = packed_logps(model, pack_pairs(pairs, pad_id=pad_id, share_prompts=True).to(device))
            padded = pair_logps(model, collate_pairs(pairs, pad_id=pad_id).to(device))[0]
    except Exception as e:  # noqa: BLE001 - any failure means: one sequence per completion
        log.info("shared prompt off for this model (%s: %s); each completion gets its own prompt", type(e).__name__, e)
        return False
    err = float(((shared - padded).abs() / (1 + padded.abs())).max())
    if err > 1e-4:
        log.info("shared prompt off: its log-probs differ from padded ones by %.2g (relative) for this model", err)
        return False
    return True


def shared_prompt_mode(value) -> str:
    """``shared_prompt`` as "auto" | "on" | "off" (YAML/CLI booleans accepted); UserError otherwise."""
    text = str(value).strip().lower()
    modes = {"auto": "auto", "true": "on", "on": "on", "yes": "on", "1": "on"}
    modes.update({"false": "off", "off": "off", "no": "off", "0": "off"})
    if text not in modes:
        raise UserError(f"shared_prompt={value!r}: use auto, true or false")
    return modes[text]


def policy_batch(pairs: list[dict], *, packed: bool, shared: str, pad_id: int):
    """The policy's layout of a micro-batch of pairs: padded (``collate_pairs``), packed one sequence per
    completion (``pack_pairs``), or packed with shared prompts where ``shared`` ("on", or "auto" and
    ``share_prompts_pays``) says so."""
    if not packed:
        return collate_pairs(pairs, pad_id=pad_id)
    seqs = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    return pack_sequences(seqs, pad_id=pad_id, share_prompts=share_prompts_pays(seqs, shared))


def computed_tokens(batch, pairs: list[dict]) -> int:
    """Token positions the trunk computes for ``pairs`` laid out as ``batch``, padding excluded:
    2P + R_c + R_r per pair as two sequences, P + R_c + R_r with shared prompts."""
    if isinstance(batch, PackedPairs) and batch.shared_prompts:
        return int((batch.segment >= 0).sum())
    return sum(pair_tokens(p) for p in pairs)


def pair_loss(cfg: DPOConfig, logps, ref_logps, lengths, *, beta: float):
    """preference_loss on a 2B-row batch (first half chosen): (losses (B,), stats)."""
    c, r = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    lc, lr = lengths.chunk(2)
    return preference_loss(
        c,
        r,
        rc,
        rr,
        lc,
        lr,
        beta=beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        ipo_length_normalize=cfg.ipo_length_normalize,
        alpha=cfg.f_alpha,
        simpo_gamma=cfg.simpo_gamma,
    )


def ref_ids(indices: Sequence[int]) -> list[int]:
    """Reference-row ids of a collated batch of pairs (chosen rows first): 2i, then 2i + 1."""
    return [2 * i for i in indices] + [2 * i + 1 for i in indices]


@torch.no_grad()
def eval_pairs(
    cfg: DPOConfig,
    policy,
    reference: Reference,
    pairs: list[dict],
    ids: list[int],
    *,
    beta: float,
    pad_id: int,
    dist: Dist,
    packed: bool = False,
    shared: str = "off",
) -> dict:
    """eval/loss, eval/rewards/accuracy, eval/rewards/margins over held-out pairs (strided over
    processes, reduced globally). ``ids``: each pair's index for the reference (see ``setup_reference``)."""
    mine = list(range(dist.rank, len(pairs), dist.world_size))
    keys = ("eval/loss", "eval/rewards/accuracy", "eval/rewards/margins")
    sums = {k: 0.0 for k in keys}
    with eval_mode(policy):
        for s in range(0, len(mine), cfg.eval_batch_size):
            chunk = [pairs[j] for j in mine[s : s + cfg.eval_batch_size]]
            padded = collate_pairs(chunk, pad_id=pad_id).to(dist.device)
            batch = (
                policy_batch(chunk, packed=packed, shared=shared, pad_id=pad_id).to(dist.device) if packed else padded
            )
            logps, lengths = pair_logps(policy, batch)
            ref = reference.logps(padded, ids=ref_ids([ids[j] for j in mine[s : s + cfg.eval_batch_size]]))
            losses, st = pair_loss(cfg, logps, seq_sum(ref.to(logps.device), padded.mask), lengths, beta=beta)
            for k, v in zip(keys, (losses, st["accuracy"], st["margins"])):
                sums[k] += float(v.sum())
    return dist.reduce_metrics(sums, {k: float(len(mine)) for k in keys})


def kl_sampling(cfg: DPOConfig) -> SamplingSettings:
    """The settings kl/ref samples with: τ = kl_temperature, unfiltered, kl_max_new_tokens."""
    return SamplingSettings(max_new_tokens=cfg.kl_max_new_tokens, temperature=cfg.kl_temperature)


def measure_ref_kl(cfg: DPOConfig, policy, reference: Reference, prompts: list[list[int]], tok) -> dict:
    """kl/ref and kl/ref_stderr: mean exact sequence KL[π_θ‖π_ref] of sampled completions
    (``engine.evaluate``: the evaluation seed and batch size the online trainers and the demo use)."""
    res = evaluate_kl(
        policy,
        reference,
        prompts,
        tokenizer=tok,
        seed=cfg.seed,
        samples_per_prompt=cfg.kl_samples,
        sampling=kl_sampling(cfg),
    )
    ex = res["estimators"]["exact"]
    return {"kl/ref": ex["mean"], "kl/ref_stderr": ex["stderr"]}


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------


STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def accumulate_gradients(
    cfg: DPOConfig,
    policy,
    reference: Reference,
    train: list[dict],
    idx: list[int],
    *,
    micro: int,
    beta: float,
    packed: bool,
    pad_id: int,
    device,
    shared: str = "off",
) -> tuple[dict, int, int, int]:
    """Forward + backward over this process's pairs ``idx`` in micro-batches of ``micro``; gradients
    accumulate in ``.grad``. Each micro-batch backpropagates Σ losses / batch_size (the *global*
    pair count), so N processes x accumulation steps give the full-batch gradient.
    ``shared``: the shared-prompt mode (``shared_prompt_mode``) of the packed layout.
    Returns (metric sums over the pairs, real tokens of the pairs' 2B sequences, token positions
    computed (fewer with shared prompts), token slots computed (with padding))."""
    sums = dict.fromkeys(STEP_METRICS, 0.0)
    tokens = computed = slots = 0
    for j in range(0, len(idx), micro):
        mb = idx[j : j + micro]
        pairs = [train[i] for i in mb]
        padded = collate_pairs(pairs, pad_id=pad_id).to(device)  # the reference's layout (and ids)
        batch = policy_batch(pairs, packed=packed, shared=shared, pad_id=pad_id).to(device) if packed else padded
        logps, lengths = pair_logps(policy, batch)  # (2B,), (2B,)
        with torch.no_grad():
            ref_logps = seq_sum(reference.logps(padded, ids=ref_ids(mb)).to(logps.device), padded.mask)  # (2B,)
        losses, st = pair_loss(cfg, logps, ref_logps, lengths, beta=beta)  # (B,)
        (losses.sum() / cfg.batch_size).backward()
        c, r = logps.detach().chunk(2)
        for k, v in zip(
            STEP_METRICS,
            (losses.detach(), st["chosen_rewards"], st["rejected_rewards"], st["margins"], st["accuracy"], c, r),
        ):
            sums[k] += float(v.sum())
        tokens += sum(pair_tokens(p) for p in pairs)
        computed += computed_tokens(batch, pairs)
        slots += int(batch.input_ids.numel())
    return sums, tokens, computed, slots


def check_config(cfg: DPOConfig) -> None:
    check_reference_form(cfg.reference)
    check_lora_reference(cfg)
    check_loss_type(cfg.loss_type)
    if shared_prompt_mode(cfg.shared_prompt) == "on" and not cfg.padding_free:
        raise UserError(
            "shared_prompt=true lays pairs out padding-free: set --padding_free true (or shared_prompt auto)"
        )
    if cfg.reference == "precomputed" and cfg.loss_type == "simpo":
        log.info("simpo ignores the reference; ref log-probs are still computed for logging")
    if not cfg.dataset:
        raise UserError("dpo needs preference data: pass --dataset PATH_OR_NAME (or rows=... from Python)")
    if (
        cfg.beta_schedule in ("none", None, "") and not cfg.beta > 0
    ):  # the preference losses scale (or divide by) β: 0 means no signal
        raise UserError(
            f"beta={cfg.beta}: DPO's loss is -log σ(β·margin), constant at β = 0 (nothing to learn); set --beta > 0. "
            "To train without a KL penalty and still monitor kl/ref, use ppo, grpo or rloo with --beta 0"
        )
    check_loss_options(cfg.loss_type, cfg.beta, cfg.label_smoothing)


@accepts_objects
@preemptible
def train_dpo(
    cfg: DPOConfig,
    *,
    rows: Optional[Sequence[dict]] = None,
    eval_rows: Optional[Sequence[dict]] = None,
    train_dataset=None,
    eval_dataset=None,
    resume: bool = False,
    callback: Optional[Callable[[int, dict], None]] = None,
    callbacks: Optional[Sequence] = None,
    eval_hook: Optional[Callable] = None,
    preflight: bool = True,
) -> TrainResult:
    """Train with DPO (or a variant); returns a ``TrainResult`` (``result["loss"]`` etc.: the last step's
    metrics; ``result["train_pairs"]`` etc.: the data counts in ``info``).

    ``rows`` / ``eval_rows``: preference rows already in memory (dicts with prompt/chosen/rejected);
    they are written to OUTPUT_DIR/dataset.jsonl and the saved config points at it, so the run can be
    resumed from the command line. ``eval_hook(step, policy, *, beta) -> metrics``: the sampled
    evaluation, instead of kl/ref (its one meaning in every loop: ``trainers.result``). ``callback(step,
    metrics)`` is called after each step's log and checkpoint (raising from it interrupts the run, as
    a kill would). ``preflight``: first run ``tether dpo``'s checks of the whole input
    (``checks.preflight_dpo``; in-memory rows replace the dataset checks).

    ``model`` (a path, or a loaded model, peft or not), ``tokenizer``, ``peft_config``: ``tether.inputs``.
    ``train_dataset`` / ``eval_dataset``: ``rows`` / ``eval_rows`` as a ``datasets.Dataset``, a
    ``DatasetDict`` (its train split, and its test/validation split when no eval_dataset is given) or a
    list of dicts. ``callbacks``: ``tether.callbacks`` (TRL's form; ``callback`` is the older hook)."""
    rows, eval_rows = datasets_as_rows(train_dataset, eval_dataset, rows, eval_rows, names="rows / eval_rows")
    dist = Dist()
    run = RunDir(cfg.output_dir, is_main=dist.is_main, report_to=cfg.report_to)
    run.callbacks = Callbacks(callbacks, cfg, is_main=dist.is_main)
    if rows is not None:
        cfg = dataclasses.replace(cfg, dataset=str(Path(cfg.output_dir) / "dataset.jsonl"))
    if preflight:
        run_preflight("dpo", cfg, rows=rows, eval_rows=eval_rows)  # includes check_config
    else:
        check_config(cfg)
    run.save_config(cfg, resume=resume)  # refuses a folder holding another run before anything is written
    if rows is not None and dist.is_main:
        Path(cfg.dataset).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, policy, start = load_policy(cfg, dist)
    train, held, data_info = load_pairs(cfg, tok, rows=rows, eval_rows=eval_rows, is_main=dist.is_main)
    cfg = with_epochs(cfg, len(train), per_step=cfg.batch_size, unit="pairs")
    micro = derive_micro_batch(cfg, dist)
    order = StepBatches(
        [pair_width(p) for p in train],
        cfg.batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        group_by_length=cfg.group_by_length,
        window=cfg.bucket_window,
    )
    n = len(train)
    held_ids = list(range(n, n + len(held)))  # held-out pairs follow the training pairs in the reference's ids
    visited = order.visited(range(cfg.max_steps)) + held_ids
    pad_id = tok.pad_token_id
    # fsdp: the packed layout calls the decoder and the head directly, past the root unit's all-gather
    packed = (
        cfg.padding_free
        and not is_sharded(policy)
        and packing_works(policy, train[:4], pad_id=pad_id, device=dist.device)
    )
    shared = shared_prompt_mode(cfg.shared_prompt) if packed else "off"
    if shared != "off" and not shared_prompt_works(policy, train[:4], pad_id=pad_id, device=dist.device):
        if shared == "on" and dist.is_main:
            log.warning("shared_prompt=true but this model cannot take the prefix-tree mask: two sequences per pair")
        shared = "off"
    reference, live_ref = setup_reference(cfg, policy, tok, train + held, visited, dist, start=start, shared=shared)
    shard_reference(reference, policy)  # fsdp with reference=copy (the precomputed cache is built unsharded)
    controller = build_controller(cfg, total_steps=cfg.max_steps, episodes_per_step=cfg.batch_size)
    params = trainable_params(policy)
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    guard = StepGuard(cfg.max_nonfinite_steps)
    ckpt = Checkpointer(
        run,
        policy,
        opt,
        sched,
        controller=controller,
        reference=reference,
        guard=guard,
        enabled=cfg.save_checkpoints,
        tokenizer=tok,
    )
    step, state = ckpt.resume() if resume else (0, {})
    history, eval_history = History(run, legacy=state.get("history")), list(state.get("eval_history", []))
    kl_prompts = [p["prompt_ids"] for p in held[: cfg.kl_prompts]]
    if (not kl_prompts or eval_hook is not None) and not cfg.forgetting_text:  # nothing samples through it
        live_ref = None  # nothing samples: with the precomputed form, the reference model is freed here
    forgetting = (
        ForgettingProbe(
            cfg.forgetting_text,
            tok,
            config=dataclasses.asdict(cfg),
            assets=cfg.assets,
            max_texts=cfg.forgetting_max_texts,
            seed=cfg.seed,
        )
        if cfg.forgetting_text and dist.is_main
        else None
    )
    overfit = OverfitMonitor(cfg.loss_type)  # dpo/overfit: loss saturated while kl/ref grows (diagnostics/overfit.py)

    def evaluate(beta: float) -> dict:
        with unsharded(*models_of(policy, reference, live_ref)):  # fsdp: main-only sampling, uneven shards
            return _evaluate(beta)

    def _evaluate(beta: float) -> dict:
        out = (
            eval_pairs(
                cfg,
                policy,
                reference,
                held,
                held_ids,
                beta=beta,
                pad_id=pad_id,
                dist=dist,
                packed=packed,
                shared=shared,
            )
            if held
            else {}
        )
        if eval_hook is not None:  # the sampled evaluation: the hook's protocol instead of kl/ref (trainers.result)
            out.update((eval_hook(step, policy, beta=beta) or {}) if dist.is_main else {})
        elif kl_prompts and dist.is_main:  # sampling is replicated work: only the logging process measures
            out.update(measure_ref_kl(cfg, policy, live_ref, kl_prompts, tok))
        if forgetting is not None:  # eval/forgetting/*: teacher-forced on off-distribution text
            out.update(forgetting(policy, live_ref))
        eval_history.append({"step": step, **out})
        return out

    if step == 0 and eval_hook is not None and cfg.eval_every:  # the start of the reward-KL curve (KL 0)
        run.log(0, evaluate(controller.value))

    run.callbacks.begin(cfg)
    bar = progress_bar(cfg.max_steps, step, enabled=cfg.progress and dist.is_main, desc=f"dpo[{cfg.loss_type}]")
    metrics: dict = {}
    last_eval: dict = {}
    set_train_mode(policy, keep_dropout=cfg.keep_dropout)  # again: an eval_hook may have changed the mode
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        beta = controller.value
        idx = dist.shard(order(step))
        sums, tokens, computed, slots = accumulate_gradients(
            cfg,
            policy,
            reference,
            train,
            idx,
            micro=micro,
            beta=beta,
            packed=packed,
            pad_id=pad_id,
            device=dist.device,
            shared=shared,
        )
        grad_norm, lr = optimizer_step(
            opt, sched, params, dist=dist, max_grad_norm=cfg.max_grad_norm, guard=guard, loss=sums["loss"]
        )
        step += 1
        reference.on_step(policy, step)
        controller.update()
        metrics = dist.reduce_metrics(sums, dict.fromkeys(sums, float(len(idx))))
        tokens, computed, slots = dist.sum_float(tokens), dist.sum_float(computed), dist.sum_float(slots)
        metrics.update(
            {
                "beta": beta,
                "opt/lr": lr,
                "opt/grad_norm": grad_norm,
                "data/tokens": tokens,
                "data/tokens_computed": computed,
                "data/padding_frac": 1.0 - computed / max(slots, 1.0),
                "perf/tokens_per_s": tokens / (time.perf_counter() - t0),
                **guard.stats(),
            }
        )
        evaluated = bool(cfg.eval_every and step % cfg.eval_every == 0) or (step == cfg.max_steps and cfg.eval_final)
        if evaluated:
            last_eval = evaluate(beta)
            metrics.update(last_eval)
        overfit.record(metrics)
        if evaluated:
            metrics.update(overfit.check(step))
        if step % cfg.log_every == 0 or evaluated:
            run.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            ckpt.save(step, data_state={"eval_history": eval_history})
        stop_if_signalled(
            step,
            cfg.max_steps,
            dist,
            ckpt,  # SIGTERM/SIGINT/SIGUSR1: checkpoint, exit 75
            save=lambda: ckpt.save(step, data_state={"eval_history": eval_history}),
        )
        bar.update(1)
        bar.set_postfix(
            postfix(
                loss=(metrics["loss"], ".3f"),
                acc=(metrics["rewards/accuracy"], ".2f"),
                kl=(last_eval.get("kl/ref"), ".2f"),  # none until the first evaluation
            )
        )
        if callback is not None:
            callback(step, metrics)
        if run.callbacks.should_stop(dist):  # a callback asked to stop: this step is the last
            break
    bar.close()
    if not last_eval and cfg.eval_final:  # resumed at max_steps: still report the held-out metrics
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
        last_eval = evaluate(controller.value)
        metrics.update(last_eval)
    ckpt.save(step, data_state={"eval_history": eval_history})
    final = save_final(policy, cfg.output_dir, tokenizer=tok, merge_lora=cfg.merge_lora, is_main=dist.is_main)
    run.close()
    dist.finish()
    result = TrainResult(
        final=str(final), metrics=metrics, history=history.rows(), eval_history=eval_history, info=data_info
    )
    run.callbacks.end(result)
    return result
