"""Supervised fine-tuning of a causal LM: the usual way to make the reference model π_ref.

Loss: mean negative log-likelihood per target token over the whole global batch,

    loss = -Σ_{b,t} targets[b,t] · log π_θ(x_{b,t} | x_{b,<t}) / Σ_{b,t} targets[b,t]

(targets = completion tokens only with ``completion_only_loss``, else every token after the first;
for a ``messages`` conversation, the assistant turns with ``assistant_only_loss``: see
``tether.data.chat.assistant_spans``).
Each micro-batch contributes its NLL *sum* divided by the global target count, so gradient
accumulation and data parallelism give the same gradient as one full batch (distributed.py).

Metrics: ``loss``, ``opt/lr``, ``opt/grad_norm``, ``eval/loss`` (held-out token-mean NLL).
Output: ``final/`` in Hugging Face format (AutoModelForCausalLM), with the tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..callbacks import Callbacks
from ..config import config_group
from ..data.text import (
    HELDOUT_CAP,
    batch_indices,
    collate,
    eval_split_of,
    load_text_examples,
    prepare_sft,
    split_heldout,
)
from ..diagnostics.forgetting import starting_model_probe
from ..distributed import Dist
from ..errors import UserError
from ..fsdp import unsharded
from ..groups import DATA_FIELDS
from ..inputs import accepts_objects, in_memory_data, write_in_memory_data
from ..modeling import position_ids
from ..ops.logprobs import selective_logps
from ..preempt import preemptible, stop_if_signalled
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
    progress_bar,
    trainable_params,
    with_epochs,
)
from .result import TrainResult

log = logging.getLogger(__name__)


@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)
@dataclass
class SFTConfig(TrainConfig):
    """Config of ``tether sft`` (fields of TrainConfig plus these)."""

    dataset: str = ""
    """Training data: text file (one example per line), .jsonl/.json/.parquet (text, messages, or prompt +
    completion; strings or messages), a saved datasets folder, a hub name, or a comma-separated list (e.g. both
    rt-polarity files)."""
    eval_dataset: Optional[str] = None
    """Held-out data (same formats); default: the test/validation split of a saved DatasetDict, else eval_examples
    examples held out from dataset."""
    eval_examples: Optional[int] = None
    """Examples held out from dataset (or read from its test split) for eval/loss when eval_dataset is not given.
    None (default): 10% of dataset, at most 200, none under 10 examples; 0 = no eval. A hold-out that would
    leave nothing to train on is dropped with a warning (the run trains on everything)."""
    max_length: int = 128
    """Tokens per example (truncated) or per packed block."""
    packing: bool = False
    """Concatenate examples (EOS-separated) into full blocks of max_length tokens."""
    completion_only_loss: bool = True
    """For prompt/completion rows: train on completion tokens only (plain text trains on every token)."""
    append_eos: bool = True
    """End every example with the EOS token (so the model learns to stop)."""
    text_field: str = "text"
    """Field holding plain text in table rows."""
    prompt_field: str = "prompt"
    """Field holding the prompt in table rows."""
    completion_field: str = "completion"
    """Field holding the completion in table rows."""
    messages_field: str = "messages"
    """Field holding a conversation (a list of {role, content} messages) in table rows."""
    columns: Optional[dict] = None
    """Rename source columns first: a YAML map {question: prompt, answer: completion} or
    'question=prompt,answer=completion'."""
    chat_template: Optional[str] = None
    """Jinja chat template (string or file) for conversational rows when the tokenizer has none."""
    assistant_only_loss: bool = True
    """For messages rows: train on the assistant turns only (each with the template's end-of-turn text); off = every
    token."""
    eval_batch_size: int = 32
    """Examples per forward pass when evaluating."""


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL over target tokens (), number of target tokens ()) of a collated batch."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    logps = selective_logps(logits[:, :-1], ids[:, 1:])  # (B, L-1): position t predicts token t+1
    mask = batch["targets"][:, 1:]  # (B, L-1)
    return -(logps * mask).sum(), mask.sum()


@torch.no_grad()
def eval_loss(model, items: Sequence, *, pad_id: int, batch_size: int, dist: Optional[Dist] = None) -> float:
    """Token-mean NLL over ``items`` (strided over processes, summed globally)."""
    dist = dist or Dist()
    mine = list(items)[dist.rank :: dist.world_size]
    was = model.training
    model.eval()
    nll, n = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device
    try:
        for s in range(0, len(mine), batch_size):
            b = {k: v.to(device) for k, v in collate(mine[s : s + batch_size], pad_id=pad_id).items()}
            a, c = token_nll(model, b)
            nll += float(a)
            n += float(c)
    finally:
        model.train(was)
    nll, n = dist.sum(nll), dist.sum(n)
    return float(nll / n) if n > 0 else float("nan")


def load_sft_data(cfg: SFTConfig, tok) -> tuple[list, list]:
    """(train items, held-out items). Held out: eval_dataset, else the test/validation split of a saved
    DatasetDict given as dataset, else eval_examples examples drawn from dataset."""
    kw = dict(
        assets=cfg.assets,
        text_field=cfg.text_field,
        prompt_field=cfg.prompt_field,
        completion_field=cfg.completion_field,
        messages_field=cfg.messages_field,
        columns=cfg.columns,
        tokenizer=tok,
        chat_template=cfg.chat_template,
        completion_only_loss=cfg.completion_only_loss,
        assistant_only_loss=cfg.assistant_only_loss,
    )
    examples = load_text_examples(cfg.dataset, **kw)
    held_split = None if cfg.eval_dataset else eval_split_of(cfg.dataset)
    if cfg.eval_dataset:
        train_ex, eval_ex = examples, load_text_examples(cfg.eval_dataset, **kw)
    elif held_split and cfg.eval_examples != 0:
        cap = HELDOUT_CAP if cfg.eval_examples is None else cfg.eval_examples
        train_ex, eval_ex = examples, load_text_examples(cfg.dataset, split=held_split, **kw)[:cap]
        log.info("sft data: evaluating on the %r split of %s", held_split, cfg.dataset)
    else:
        train_ex, eval_ex = split_heldout(examples, cfg.eval_examples, seed=cfg.seed)
    prep = dict(
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss,
        append_eos=cfg.append_eos,
        seed=cfg.seed,
    )
    train = prepare_sft(tok, train_ex, **prep)
    evals = prepare_sft(tok, eval_ex, **prep) if eval_ex else []
    if not train:
        raise UserError(f"dataset {cfg.dataset!r} gives no training examples with a target token; raise max_length")
    log.info("sft data: %d training %s, %d held-out", len(train), "blocks" if cfg.packing else "examples", len(evals))
    return train, evals


@accepts_objects
@preemptible
def train_sft(
    cfg: SFTConfig,
    *,
    train_dataset=None,
    eval_dataset=None,
    resume: bool = False,
    callbacks: Optional[Sequence] = None,
    preflight: bool = True,
) -> TrainResult:
    """Run SFT; returns a ``TrainResult`` (``result["loss"]``: the last loss, ``result["eval/loss"]``: the
    final held-out loss).

    ``model`` (a path, or a loaded model), ``tokenizer``, ``peft_config``: ``tether.inputs``.
    ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` (a ``DatasetDict``: its train split, and
    its test/validation split when no eval_dataset is given) or a list of row dicts, in the columns
    ``--dataset`` files have; they are written to OUTPUT_DIR/dataset.jsonl (eval_dataset.jsonl) and the
    saved config points at them, so the run resumes from the command line too. ``callbacks``:
    ``tether.callbacks``. ``preflight``: first run ``tether sft``'s checks of the whole input
    (``checks.preflight_sft``)."""
    cfg, rows, eval_rows = in_memory_data(cfg, train_dataset, eval_dataset)
    if preflight:
        run_preflight("sft", cfg, rows=rows, eval_rows=eval_rows)
    if not cfg.dataset:
        raise UserError("sft needs a dataset: pass --dataset FILE (or a comma-separated list)")
    dist = Dist()
    run = RunDir(cfg.output_dir, is_main=dist.is_main, report_to=cfg.report_to)
    run.callbacks = Callbacks(callbacks, cfg, is_main=dist.is_main)
    run.save_config(cfg, resume=resume)
    write_in_memory_data(cfg, rows, eval_rows, dist)
    tok, model, start = load_policy(cfg, dist)
    train, evals = load_sft_data(cfg, tok)
    cfg = with_epochs(cfg, len(train), per_step=cfg.batch_size, unit="blocks" if cfg.packing else "examples")
    micro = derive_micro_batch(cfg, dist)
    params = trainable_params(model)
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    guard = StepGuard(cfg.max_nonfinite_steps)
    ckpt = Checkpointer(run, model, opt, sched, guard=guard, enabled=cfg.save_checkpoints, tokenizer=tok)
    step, state = ckpt.resume() if resume else (0, {})
    history, eval_history = History(run, legacy=state.get("history")), list(state.get("eval_history", []))

    def evaluate() -> float:
        with unsharded(model):  # fsdp: the strided held-out shards may differ in batch count
            return eval_loss(model, evals, pad_id=tok.pad_token_id, batch_size=cfg.eval_batch_size, dist=dist)

    forgetting = starting_model_probe(
        cfg, tok, device=dist.device, is_main=dist.is_main, start=start
    )  # eval/forgetting/* (optional)
    run.callbacks.begin(cfg)
    bar = progress_bar(cfg.max_steps, step, enabled=cfg.progress and dist.is_main, desc="sft")
    metrics: dict = {}
    while step < cfg.max_steps:
        idx = dist.shard(batch_indices(step, cfg.batch_size, len(train), seed=cfg.seed))
        mbs = [
            collate([train[i] for i in idx[j : j + micro]], pad_id=tok.pad_token_id) for j in range(0, len(idx), micro)
        ]
        n_global = dist.sum_float(sum(float(mb["targets"][:, 1:].sum()) for mb in mbs))  # global normaliser
        nll_sum = 0.0
        for mb in mbs:
            nll, _ = token_nll(model, {k: v.to(dist.device) for k, v in mb.items()})
            (nll / n_global).backward()
            nll_sum += float(nll.detach())
        grad_norm, lr = optimizer_step(
            opt, sched, params, dist=dist, max_grad_norm=cfg.max_grad_norm, guard=guard, loss=nll_sum
        )
        step += 1
        metrics = {
            "loss": dist.sum_float(nll_sum) / n_global,
            "opt/lr": lr,
            "opt/grad_norm": grad_norm,
            **guard.stats(),
        }
        evaluated = bool(cfg.eval_every and step % cfg.eval_every == 0) or (step == cfg.max_steps and cfg.eval_final)
        if evals and evaluated:
            metrics["eval/loss"] = evaluate()
        if cfg.forgetting_text and evaluated:
            with unsharded(model):  # every process enters (collective); the probe runs on the main one
                metrics.update(
                    forgetting(model) if forgetting is not None else {}
                )  # against the starting model, teacher-forced on off-distribution text
        history.append({"step": step, **metrics})
        if any(k.startswith("eval/") for k in metrics):
            eval_history.append({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval/")}})
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
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if run.callbacks.should_stop(dist):  # a callback asked to stop: this step is the last
            break
    bar.close()
    if "eval/loss" not in metrics and evals and cfg.eval_final:  # resumed at max_steps: still report the held-out loss
        metrics = {**(history[-1] if history else {}), **metrics, "eval/loss": evaluate()}
        metrics.pop("step", None)
    ckpt.save(step, data_state={"eval_history": eval_history})
    final = save_final(model, cfg.output_dir, tokenizer=tok, merge_lora=cfg.merge_lora, is_main=dist.is_main)
    run.close()
    dist.finish()
    result = TrainResult(final=str(final), metrics=metrics, history=history.rows(), eval_history=eval_history)
    run.callbacks.end(result)
    return result
