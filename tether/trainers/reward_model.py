"""Reward model: a scalar head on a causal-LM backbone, trained with the Bradley–Terry loss.

    loss = mean_pairs -log σ(r(x, y_w) - r(x, y_l))        (Stiennon et al. 2020 Eq. 1; ops.reward_model)

The model is ``AutoModelForSequenceClassification(num_labels=1)`` initialised from the causal LM (for
Llama: ``LlamaForSequenceClassification``; the backbone weights are copied, the ``score`` head is
new). ``r(x, y)`` is the head at the last token of ``join_text(x, y)`` = prompt + completion
(``rewards.sequence_scores``), with no EOS appended, so that ``rewards.RewardModelSource`` scores
sampled text exactly as it was trained, and so that the saved ``final/`` gives the same number with
plain ``transformers`` (``config.pad_token_id`` is set so batches work there too).

Each micro-batch runs the chosen and rejected sequences of its pairs in one forward pass (2m rows);
its mean loss is weighted by m / batch_size so accumulation and processes give the full-batch
gradient. Metrics: ``loss``, ``rm/accuracy``, ``rm/margin`` (mean r_w - r_l), ``opt/lr``,
``opt/grad_norm``; held out: ``eval/loss``, ``eval/rm/accuracy``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..assets import resolve_model
from ..callbacks import Callbacks
from ..config import config_group
from ..data.preference import (
    StepBatches,
    collate_pairs,
    load_preference_rows,
    pair_width,
    split_holdout,
    tokenize_pairs,
)
from ..distributed import Dist
from ..errors import UserError
from ..groups import DATA_FIELDS
from ..inputs import accepts_objects, in_memory_data, write_in_memory_data
from ..modeling import DTYPES, load_tokenizer
from ..ops.reward_model import bradley_terry_loss
from ..preempt import preemptible, stop_if_signalled
from ..registry import run_preflight
from ..rewards import sequence_scores
from ..runs import History, RunDir, save_final, seed_everything
from ..training import (
    Checkpointer,
    StepGuard,
    TrainConfig,
    adapt_model,
    derive_micro_batch,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    progress_bar,
    set_train_mode,
    trainable_params,
    with_epochs,
)
from .result import TrainResult

log = logging.getLogger(__name__)


@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)
@dataclass
class RMConfig(TrainConfig):
    """Config of ``tether rm`` (fields of TrainConfig plus these)."""

    dataset: str = ""
    """Preference pairs, as for tether dpo: .jsonl/.json/.parquet with prompt/chosen/rejected (or chosen/rejected
    sharing a prefix), a datasets folder, a hub name, hh-rlhf; or rt-polarity: a positive movie-review snippet chosen
    over a negative one."""
    dataset_split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict."""
    eval_dataset: Optional[str] = None
    """Held-out pairs (same formats); default: the test/validation split of a saved DatasetDict, else eval_fraction
    of dataset held out."""
    eval_fraction: float = 0.05
    """Fraction of dataset held out for eval/rm/accuracy when eval_dataset is not given (0 = none)."""
    limit: Optional[int] = None
    """Use only the first N rows of dataset (None = all)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping."""
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
    """Tokens per sequence (prompt + completion); prompts lose tokens from the left, completions from the right."""
    max_prompt_length: Optional[int] = None
    """Prompt token limit (default: what max_length leaves, at least max_length // 2)."""
    eval_batch_size: int = 32
    """Pairs per forward pass when evaluating."""


def load_reward_backbone(cfg: RMConfig, dist: Dist):
    """(tokenizer, model): the causal LM at cfg.model with a fresh scalar head (LoRA if lora_r > 0)."""
    from transformers import AutoModelForSequenceClassification

    from ..inputs import given, given_tokenizer

    seed_everything(cfg.seed)
    g = given()
    if g.model is not None:  # handed to the train call: a sequence-classification model with one label
        if getattr(g.model.config, "num_labels", None) != 1 or not hasattr(g.model, "score"):
            raise UserError(
                f"model: a reward model is a sequence classifier with one output; pass "
                "AutoModelForSequenceClassification.from_pretrained(..., num_labels=1) "
                f"(got {type(g.model).__name__}), or the causal LM's path"
            )
        tok = given_tokenizer(padding_side="right")
        model = g.model
    else:
        path = resolve_model(cfg.model, cfg.assets)
        tok = load_tokenizer(path, padding_side="right")
        if cfg.dtype not in DTYPES:
            raise UserError(f"dtype {cfg.dtype!r} not supported; choose from {sorted(DTYPES)}")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[cfg.dtype])
    # Saved with final/: plain transformers then right-pads too, which its pooling (rightmost
    # non-pad token) and its position ids (counted from 0, not from the mask) both need.
    tok.init_kwargs["padding_side"] = "right"
    model.config.pad_token_id = tok.pad_token_id  # HF's class needs it to find the last token of a batch row
    model = adapt_model(model, cfg, task_type="SEQ_CLS", peft_config=g.peft_config)  # SEQ_CLS: LoRA trains the head
    model.to(dist.device)
    dist.broadcast_params(model)
    set_train_mode(model, keep_dropout=cfg.keep_dropout)
    return tok, model


def load_pairs(source: str, cfg: RMConfig, tok, *, split: Optional[str] = None) -> list[dict]:
    """Rows of {prompt, chosen, rejected} strings; ``rt-polarity`` builds sentiment pairs."""
    if source == "rt-polarity" and not Path(source).exists():
        from ..data.text import polarity_pairs

        rows = polarity_pairs(cfg.assets, seed=cfg.seed)
        return rows[: cfg.limit] if cfg.limit else rows
    from ..data.text import column_map

    mapping = column_map(cfg.columns, prompt=cfg.prompt_field, chosen=cfg.chosen_field, rejected=cfg.rejected_field)
    return load_preference_rows(
        source,
        split=split or cfg.dataset_split,
        tokenizer=tok,
        skip_bad_rows=cfg.skip_bad_rows,
        assets=cfg.assets,
        limit=cfg.limit,
        chat_template=cfg.chat_template,
        columns=mapping,
    )


def load_rm_data(cfg: RMConfig, tok) -> tuple[list[dict], list[dict]]:
    from ..data.text import eval_split_of

    rows = load_pairs(cfg.dataset, cfg, tok)
    held_split = None if cfg.eval_dataset else eval_split_of(cfg.dataset, split=cfg.dataset_split)
    if cfg.eval_dataset:
        train_rows, eval_rows = rows, load_pairs(cfg.eval_dataset, cfg, tok)
    elif held_split:  # a saved DatasetDict's test/validation split
        train_rows, eval_rows = rows, load_pairs(cfg.dataset, cfg, tok, split=held_split)
    else:
        tr, ev = split_holdout(len(rows), cfg.eval_fraction, seed=cfg.seed)
        train_rows, eval_rows = [rows[i] for i in tr], [rows[i] for i in ev]
    # No EOS: the score is read at the last text token, as RewardModelSource reads sampled text.
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, add_eos=False)
    train, _ = tokenize_pairs(train_rows, tok, source=cfg.dataset, **kw)
    evals = tokenize_pairs(eval_rows, tok, source=cfg.eval_dataset or "held-out", **kw)[0] if eval_rows else []
    log.info("reward-model data: %d training pairs, %d held-out", len(train), len(evals))
    return train, evals


def pair_scores(model, pairs: Sequence[dict], *, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_scores (m,), rejected_scores (m,)) of m tokenised pairs, in one forward pass."""
    batch = collate_pairs(pairs, pad_id=pad_id).to(device)
    scores = sequence_scores(model, batch.input_ids, batch.attention_mask).float()  # (2m,)
    m = len(pairs)
    return scores[:m], scores[m:]


@torch.no_grad()
def evaluate_rm(model, pairs: Sequence[dict], *, pad_id: int, batch_size: int, dist: Optional[Dist] = None) -> dict:
    """Held-out ``eval/loss`` and ``eval/rm/accuracy`` (pairs strided over processes)."""
    dist = dist or Dist()
    mine = list(pairs)[dist.rank :: dist.world_size]
    was = model.training
    model.eval()
    sums = {"eval/loss": 0.0, "eval/rm/accuracy": 0.0}
    try:
        for s in range(0, len(mine), batch_size):
            chunk = mine[s : s + batch_size]
            loss, stats = bradley_terry_loss(*pair_scores(model, chunk, pad_id=pad_id, device=dist.device))
            sums["eval/loss"] += float(loss) * len(chunk)
            sums["eval/rm/accuracy"] += float(stats["accuracy"]) * len(chunk)
    finally:
        model.train(was)
    return dist.reduce_metrics(sums, {k: float(len(mine)) for k in sums})


@accepts_objects
@preemptible
def train_reward_model(
    cfg: RMConfig,
    *,
    train_dataset=None,
    eval_dataset=None,
    resume: bool = False,
    callbacks: Optional[Sequence] = None,
    preflight: bool = True,
) -> TrainResult:
    """Run reward-model training; returns a ``TrainResult`` (``result["loss"]``, ``["rm/accuracy"]``,
    ``["eval/rm/accuracy"]``, ``["eval/loss"]``: the last step's).

    ``model`` (a path, or an ``AutoModelForSequenceClassification`` with ``num_labels=1``), ``tokenizer``,
    ``peft_config``: ``tether.inputs``. ``train_dataset`` / ``eval_dataset``: preference rows (prompt /
    chosen / rejected) as a ``datasets.Dataset``, ``DatasetDict`` or list of dicts, written to the run's
    folder as ``train_sft`` does. ``callbacks``: ``tether.callbacks``. ``preflight``: first run ``tether
    rm``'s checks of the whole input (``checks.preflight_rm``)."""
    cfg, rows, eval_rows = in_memory_data(cfg, train_dataset, eval_dataset)
    if preflight:
        run_preflight("rm", cfg, rows=rows, eval_rows=eval_rows)
    if not cfg.dataset:
        raise UserError("rm needs preference pairs: pass --dataset FILE (or hh-rlhf, or rt-polarity)")
    if cfg.forgetting_text:
        raise UserError(
            "forgetting_text: rm trains a reward model, not a policy; drop the flag (it applies to sft, dpo, "
            "ppo, grpo, rloo)"
        )
    dist = Dist()
    run = RunDir(cfg.output_dir, is_main=dist.is_main, report_to=cfg.report_to)
    run.callbacks = Callbacks(callbacks, cfg, is_main=dist.is_main)
    run.save_config(cfg, resume=resume)
    write_in_memory_data(cfg, rows, eval_rows, dist)
    tok, model = load_reward_backbone(cfg, dist)
    train, evals = load_rm_data(cfg, tok)
    cfg = with_epochs(cfg, len(train), per_step=cfg.batch_size, unit="pairs")
    micro = derive_micro_batch(cfg, dist)
    batches = StepBatches([pair_width(p) for p in train], cfg.batch_size, seed=cfg.seed)
    params = trainable_params(model)
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    guard = StepGuard(cfg.max_nonfinite_steps)
    ckpt = Checkpointer(run, model, opt, sched, guard=guard, enabled=cfg.save_checkpoints, tokenizer=tok)
    step, state = ckpt.resume() if resume else (0, {})
    history, eval_history = History(run, legacy=state.get("history")), list(state.get("eval_history", []))
    evaluate = lambda: evaluate_rm(model, evals, pad_id=tok.pad_token_id, batch_size=cfg.eval_batch_size, dist=dist)  # noqa: E731
    run.callbacks.begin(cfg)
    bar = progress_bar(cfg.max_steps, step, enabled=cfg.progress and dist.is_main, desc="rm")
    metrics: dict = {}
    while step < cfg.max_steps:
        idx = dist.shard(batches(step))
        sums = {"loss": 0.0, "rm/accuracy": 0.0, "rm/margin": 0.0}
        for j in range(0, len(idx), micro):
            chunk = [train[i] for i in idx[j : j + micro]]
            loss, stats = bradley_terry_loss(*pair_scores(model, chunk, pad_id=tok.pad_token_id, device=dist.device))
            (loss * len(chunk) / cfg.batch_size).backward()  # mean over the global batch
            sums["loss"] += float(loss.detach()) * len(chunk)
            sums["rm/accuracy"] += float(stats["accuracy"]) * len(chunk)
            sums["rm/margin"] += float(stats["margin"]) * len(chunk)
        grad_norm, lr = optimizer_step(
            opt, sched, params, dist=dist, max_grad_norm=cfg.max_grad_norm, guard=guard, loss=sums["loss"]
        )
        step += 1
        metrics = {
            **dist.reduce_metrics(sums, {k: float(len(idx)) for k in sums}),
            "opt/lr": lr,
            "opt/grad_norm": grad_norm,
            **guard.stats(),
        }
        if evals and ((cfg.eval_every and step % cfg.eval_every == 0) or (step == cfg.max_steps and cfg.eval_final)):
            ev = evaluate()
            metrics.update(ev)
            eval_history.append({"step": step, **ev})
        history.append({"step": step, **metrics})
        if step % cfg.log_every == 0 or "eval/loss" in metrics or step == cfg.max_steps:
            run.log(step, metrics)
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
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rm/accuracy']:.2f}")
        if run.callbacks.should_stop(dist):  # a callback asked to stop: this step is the last
            break
    bar.close()
    if evals and cfg.eval_final and "eval/loss" not in metrics:  # resumed at max_steps
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
        metrics.update(evaluate())
    ckpt.save(step, data_state={"eval_history": eval_history})
    final = save_final(model, cfg.output_dir, tokenizer=tok, merge_lora=cfg.merge_lora, is_main=dist.is_main)
    run.close()
    dist.finish()
    result = TrainResult(final=str(final), metrics=metrics, history=history.rows(), eval_history=eval_history)
    run.callbacks.end(result)
    return result
