"""Pieces every trainer shares: the common config fields, model/LoRA setup, optimiser and schedule,
gradient clipping, checkpoint + resume. Trainers are short top-to-bottom loops that call these and
the math in ``tether.ops``; nothing here knows about a particular loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .assets import resolve_model
from .config import config_group
from .control import BetaController
from .distributed import Dist
from .errors import UserError
from .fsdp import (
    full_optimizer_state,
    full_state_dict,
    is_dtensor,
    is_sharded,
    load_weights_file,
    shard_model,
    shard_optimizer_state,
)
from .fsdp import grad_norm as fsdp_grad_norm
from .modeling import load_causal_lm, load_tokenizer
from .runs import RunDir, load_model_weights, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


@config_group("training")
@config_group(
    "lora", prefixes=("lora",), fields=("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora")
)
@dataclass
class TrainConfig:
    """Fields common to every trainer (each trainer's config subclasses this)."""

    model: str = "stories260K"
    """Policy to start from: a Hugging Face folder, a hub name, or an asset short name (stories260K)."""
    output_dir: str = "runs/tether"
    """Run directory (config, metrics.jsonl, tb/, checkpoints/, final/)."""
    assets: Optional[str] = None
    """Assets folder laid out like shared/assets (default: $TETHER_ASSETS, else download)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation; a run is deterministic given it."""
    max_steps: int = 100
    """Optimiser steps (replaced by the number derived from ``epochs`` when that is set)."""
    epochs: Optional[float] = None
    """Passes over the training data, as an alternative to max_steps (TRL's num_train_epochs). When set it
    wins: max_steps = ceil(epochs x N / per_step), N being the training examples (sft: examples or packed
    blocks; dpo, rm: pairs; ppo, grpo, rloo: prompts) and per_step what one step reads (batch_size; online:
    batch_size / samples_per_prompt prompts). Fractions are fine (0.5 = half a pass). None = use max_steps."""
    batch_size: int = 8
    """Global batch size per optimiser step (examples, or prompts x samples for online methods)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step on each process; batch_size must divide by grad_accum x processes."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps, then constant (lr_schedule=constant) or cosine decay."""
    lr_schedule: str = "constant"
    """constant | cosine | linear (after warm-up)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (0 = off). opt/grad_norm logs the norm before clipping."""
    dtype: str = "float32"
    """Model weights dtype: float32 | bfloat16."""
    autocast: bool = False
    """Mixed precision: float32 weights, every forward pass of the policy, reference and value model (and the
    sampler's) under torch.autocast(bfloat16): matrix products in bf16, softmax, log-probs and losses in
    float32 (accelerate's mixed_precision=bf16). Needs dtype float32; dtype bfloat16 is pure bf16 instead."""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (applied only with keep_dropout: otherwise all dropout is off)."""
    lora_target_modules: list = field(default_factory=lambda: ["all-linear"])
    """Module names LoRA adapts; all-linear (default) = every Linear/Conv1D layer except the output head
    (peft's rule), so it works for any architecture (GPT-2's c_attn/c_fc, Llama's q_proj...)."""
    merge_lora: bool = True
    """final/: merge LoRA into the weights (loadable with AutoModelForCausalLM) or save the adapter."""
    log_every: int = 1
    """Log metrics every N steps."""
    eval_every: int = 0
    """Evaluate (kl/ref, held-out metrics, eval/*) every N steps; 0 = no periodic evaluation."""
    eval_final: bool = True
    """Evaluate once more at the last step. With eval_every 0 and eval_final false the run evaluates never
    (as TRL with eval_strategy "no"): no eval/* metrics, no evaluation time."""
    forgetting_text: Optional[str] = None
    """Off-distribution text for the forgetting probe, logged at every evaluation as eval/forgetting/nll_delta,
    eval/forgetting/kl_ref_policy, eval/forgetting/kl_policy_ref (teacher-forced, per token; docs/theory.md
    §10): a text file, .jsonl, datasets folder, rt-polarity, hh-rlhf, or auto (a shared asset this run does
    not train on). None = off. dpo, ppo, grpo, rloo against their reference; sft against its starting model;
    rm refuses it (no policy)."""
    forgetting_max_texts: int = 64
    """Texts the forgetting probe scores (a seeded selection, 128 tokens each at most)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end). A run stopped by SIGTERM, SIGINT or SIGUSR1
    also writes one, after the step in flight, and exits 75 (docs/reliability.md)."""
    save_checkpoints: bool = True
    """Write checkpoints (every save_every steps, at the end, and on a stop signal). false (TRL's
    save_strategy: "no"): none, so the run cannot be resumed; output_dir/final is still written."""
    save_total_limit: Optional[int] = 2
    """Checkpoints kept in output_dir/checkpoints (TRL's name); an older one is deleted only once its
    successor is complete. 2 lets --resume fall back on the previous one if the latest is unreadable.
    0 or None = keep all."""
    progress: bool = True
    """Show a progress bar."""
    keep_dropout: bool = False
    """Train the policy with the model's own dropout (and lora_dropout). Off by default: dropout makes
    π_θ a random sub-network, so at step 1 (π_θ = π_ref) DPO's margins are not 0 and its loss is not
    ln 2, and the KL to the reference is noisy, even negative (TRL #506). The reference is always in
    eval mode. Online methods (ppo, grpo, rloo) run the policy in eval mode whatever this says. (With
    gradient_checkpointing the policy is in train mode instead, every dropout probability set to 0.)"""
    max_nonfinite_steps: int = 3
    """Stop the run after this many optimiser updates in a row with a non-finite loss or gradient
    (each one is skipped: opt/skipped_steps counts them). The last good checkpoint is kept."""
    overwrite: bool = False
    """Delete the run already in output_dir (config, metrics, checkpoints, final/) and start afresh.
    Without it, a folder holding another run is refused (use --resume to continue that run)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of storing them (less
    memory, ~1 more forward pass of compute); gradients are unchanged. Applies to the policy (and a reward
    model being trained), not to a separate value model. Dropout stays off unless keep_dropout."""
    report_to: str = "tensorboard"
    """Metric trackers besides metrics.jsonl: tensorboard | wandb | trackio | none, or a comma list
    (tensorboard,wandb). wandb and trackio are optional: pip install 'tether[wandb]' / 'tether[trackio]'."""
    fsdp: bool = False
    """Shard the policy (and a reference that is a separate copy) over the processes with FSDP2: each holds
    1/processes of the weights, gradients and AdamW state while training; sampling and evaluation gather the
    full weights (tether/fsdp.py). Same trajectory as without it. Needs torchrun/accelerate with 2+ processes
    (ignored with 1); not with LoRA or a reference that shares or syncs weights with the policy (lora, sync).
    Example: torchrun --nproc_per_node 2 -m tether grpo --config examples/grpo_stories_vader.yaml --fsdp true
    (or accelerate launch --config_file examples/accelerate_fsdp.yaml -m tether grpo ..., which sets it)."""


def derive_micro_batch(cfg: TrainConfig, dist: Dist) -> int:
    """Examples per micro-batch on one process; checks exact divisibility once."""
    per = cfg.grad_accum * dist.world_size
    if cfg.batch_size % per:
        raise UserError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) x processes "
            f"({dist.world_size})"
        )
    return cfg.batch_size // per


def with_epochs(cfg: TrainConfig, n_examples: int, *, per_step: int, unit: str = "examples") -> TrainConfig:
    """``cfg`` with max_steps = ceil(epochs x n_examples / per_step) when ``cfg.epochs`` is set (else
    ``cfg`` itself). Called once, as soon as the training data is known."""
    if cfg.epochs is None:
        return cfg
    if not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        raise UserError(
            f"epochs={cfg.epochs}: give a positive number of passes over the data (or leave it unset and use max_steps)"
        )
    steps = max(1, math.ceil(cfg.epochs * n_examples / per_step - 1e-9))  # 1e-9: 0.1 x 30 / 3 is not exactly 1
    log.info("epochs=%g over %d %s at %d per step: max_steps=%d", cfg.epochs, n_examples, unit, per_step, steps)
    return dataclasses.replace(cfg, max_steps=steps)


def lora_targets(value) -> str | list:
    """``lora_target_modules`` as peft takes it: the string "all-linear" (also given as a one-item list
    or any case) or a list of module names."""
    names = [value] if isinstance(value, str) else list(value)
    if len(names) == 1 and str(names[0]).lower() == "all-linear":
        return "all-linear"
    return [str(n) for n in names]


def adapt_model(model, cfg: TrainConfig, *, task_type: str = "CAUSAL_LM", peft_config=None):
    """Gradient checkpointing (if ``cfg.gradient_checkpointing``) and LoRA adapters (if lora_r > 0, or
    a peft ``peft_config`` handed to the train call) on a freshly loaded model; returns the model to
    train (a peft model with LoRA)."""
    if cfg.lora_r > 0 and hasattr(model, "peft_config"):
        raise UserError(
            "lora_r > 0 with a model that is a peft model already: its adapters are trained as they are; set lora_r=0"
        )
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(
                f"gradient_checkpointing: {type(model).__name__} does not support it; set gradient_checkpointing=false"
            )
        # Non-reentrant: recomputes with the same RNG state and needs no input that requires grad.
        # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0 or peft_config is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            peft_config
            or LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=lora_targets(cfg.lora_target_modules),
                task_type=task_type,
            ),
        )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # peft's requirement for checkpointed layers with frozen embeddings
    return model


@dataclass
class Start:
    """A policy's starting weights, for what is built from them (the reference, the critic's backbone):
    the folder they load from (``path``), or, for a model object handed to the train call
    (``tether.inputs``), the policy itself before its first step (``model``: copied when needed)."""

    path: Optional[str] = None
    model: Optional[torch.nn.Module] = None

    def load(self, *, dtype: str = "float32", device="cpu", autocast: bool = False) -> torch.nn.Module:
        """A fresh causal LM with these weights, in eval mode on ``device`` (a model object's copy keeps its dtype)."""
        if self.path is not None:
            return load_causal_lm(self.path, dtype=dtype, device=device, autocast=autocast)
        from .inputs import starting_copy
        from .modeling import autocast_forward

        model = starting_copy(self.model).to(device)
        return autocast_forward(model) if autocast else model


def load_policy(cfg: TrainConfig, dist: Dist):
    """(tokenizer, policy, start): the policy (with LoRA adapters if lora_r > 0 or a peft_config was
    given, checkpointed layers if gradient_checkpointing), seeded and in training mode
    (``set_train_mode``: dropout off unless keep_dropout), and its starting weights (``Start``). The
    model is ``cfg.model``, or the model object handed to the train call (``tether.inputs.given``)."""
    from .inputs import given, given_tokenizer

    seed_everything(cfg.seed)
    g = given()
    if g.model is not None:
        tok = given_tokenizer()
        model = g.model.to(dist.device)
        if cfg.autocast:
            from .modeling import autocast_forward

            autocast_forward(model)
        model = adapt_model(model, cfg, peft_config=g.peft_config)
        start = Start(model=model)
    else:
        path = resolve_model(cfg.model, cfg.assets)
        tok = load_tokenizer(path)
        model = adapt_model(
            load_causal_lm(path, dtype=cfg.dtype, device=dist.device, autocast=cfg.autocast),
            cfg,
            peft_config=g.peft_config,
        )
        start = Start(path=path)
    dist.broadcast_params(model)
    if fsdp_requested(cfg) and dist.enabled:
        check_fsdp(cfg)
        shard_model(model)
    set_train_mode(model, keep_dropout=cfg.keep_dropout)
    return tok, model, start


def fsdp_requested(cfg) -> bool:
    """``cfg.fsdp``, or ``accelerate launch`` with an FSDP config (it sets ACCELERATE_USE_FSDP=true;
    examples/accelerate_fsdp.yaml): tether shards the model itself, by decoder layer (tether/fsdp.py)."""
    return bool(getattr(cfg, "fsdp", False)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1")


def check_fsdp(cfg) -> None:
    """What ``fsdp`` cannot be combined with (a UserError naming the field and the fix)."""
    if cfg.lora_r > 0:
        raise UserError(
            "fsdp=true (or an accelerate FSDP config) with lora_r > 0: LoRA is not sharded; set fsdp=false "
            "and launch without the FSDP config (or lora_r=0)"
        )
    ref = getattr(cfg, "reference", None)
    if ref in ("lora", "sync"):
        raise UserError(
            f"fsdp=true with reference={ref}: that reference shares or copies the policy's weights; "
            "use reference=copy (or precomputed for dpo), or fsdp=false"
        )


def set_train_mode(model: torch.nn.Module, *, keep_dropout: bool) -> torch.nn.Module:
    """The mode a trained model is in between optimiser steps: ``train()`` if ``keep_dropout``, else
    ``eval()``. The one place trainers set it (TrainConfig.keep_dropout says why dropout is off).

    Why the whole model in eval mode rather than train mode with the Dropout modules switched off:
    not all dropout is a module. GPT-2's attention passes ``dropout_p = p if self.training else 0``
    to SDPA (Llama's ``attention_dropout`` likewise), so switching off ``nn.Dropout`` modules leaves
    it on; tests/test_dropout.py checks this. Eval mode changes no gradient (autograd ignores it) and
    also covers peft's LoRA dropout. What else reads ``self.training`` in a causal LM is off too:
    HF gradient checkpointing and MoE router jitter noise (Mixtral).

    Gradient checkpointing is the exception: Hugging Face layers recompute only when
    ``self.training``, so a checkpointed model (``adapt_model``) is put in train mode with every
    dropout probability set to 0 instead (``zero_dropout``: the modules, the functional attention
    dropout rates, router jitter). tests/test_architectures.py checks that this forward equals the
    eval-mode one and that its gradients equal those without checkpointing."""
    if not keep_dropout and is_checkpointed(model):
        zero_dropout(model)
        model.train(True)
        return model
    model.train(keep_dropout)
    if not keep_dropout:
        n = sum(1 for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
        if n:
            log.info(
                "dropout off in %d modules (p > 0) and in functional attention dropout; keep_dropout=true keeps it", n
            )
    return model


def is_checkpointed(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is enabled on any layer of ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def zero_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, so train mode behaves as eval mode: ``nn.Dropout``
    modules' p and float attributes named *dropout* (Llama's and Qwen2's ``attention_dropout``, OPT's
    ``dropout``, read as ``p if self.training else 0``) and *jitter_noise* (MoE routers). Returns how
    many were changed. The saved config is untouched: this lives only in the modules."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            m.p, n = 0.0, n + 1
        for name, v in list(vars(m).items()):
            if ("dropout" in name or "jitter_noise" in name) and isinstance(v, float) and v > 0:
                setattr(m, name, 0.0)
                n += 1
    if n:
        log.info(
            "gradient checkpointing: train mode with %d dropout probabilities set to 0 (keep_dropout=true keeps them)",
            n,
        )
    return n


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.lr_schedule not in ("constant", "cosine", "linear"):
        raise UserError(f"lr_schedule must be constant, cosine or linear, got {cfg.lr_schedule!r}")
    warm, total = cfg.warmup_steps, max(cfg.max_steps, 1)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        s = min((step - warm) / max(total - warm, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * s)) if cfg.lr_schedule == "cosine" else 1.0 - s

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_and_norm(params, max_norm: float) -> float:
    """Clip gradients (if max_norm > 0) and return the total norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if any(is_dtensor(p.grad) for p in params):  # fsdp: shards of the gradients, a global norm
        return fsdp_grad_norm(params, max_norm)
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in params])))


class StepGuard:
    """Keeps non-finite updates out of the weights.

    ``check(dist, *values)`` is called after the gradients are all-reduced and before the optimiser
    steps, with the gradient norm (NaN/inf if any gradient is) and the loss. If any value is not
    finite on *any* process (one all-reduce of the flag: every process takes the same decision) the
    update is skipped: gradients are zeroed and the optimiser does not step, so its moments and the
    weights stay as they were. Skipped updates are counted (``opt/skipped_steps`` over the run,
    ``opt/nonfinite`` this step); ``limit`` of them in a row stop the run with a ``UserError``. The
    step counter and the lr schedule still advance (the step's data is consumed), so a skipped step
    is a step with no update, and resume/data order stay aligned with ``max_steps``.
    """

    def __init__(self, limit: int = 3):
        self.limit = max(int(limit), 1)
        self.skipped = 0  # over the run (checkpointed)
        self.in_a_row = 0
        self.this_step = 0

    def check(self, dist: Dist, *values: float) -> bool:
        """True if the update may go ahead; False (after zeroing nothing: the caller does) to skip."""
        bad = not all(math.isfinite(float(v)) for v in values)
        if dist.enabled:
            bad = dist.sum_float(float(bad)) > 0
        if not bad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        self.this_step += 1
        log.warning(
            "non-finite loss or gradient (%s): update skipped (%d in a row, %d in the run)",
            ", ".join(f"{float(v):.3g}" for v in values),
            self.in_a_row,
            self.skipped,
        )
        if self.in_a_row >= self.limit:
            raise UserError(
                f"{self.in_a_row} optimiser updates in a row had a non-finite loss or gradient, so the run stopped "
                f"(max_nonfinite_steps={self.limit}); no NaN weights were saved and the last checkpoint is kept. Usual "
                "causes: beta too large (or inf/nan), learning_rate too high, or rewards of an extreme scale (try "
                "--reward_normalize true or --reward_clip); fix the config and rerun"
            )
        return False

    def stats(self) -> dict:
        """Metrics of the step just taken (resets the per-step count)."""
        out = {"opt/skipped_steps": self.skipped, "opt/nonfinite": self.this_step}
        self.this_step = 0
        return out

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def optimizer_step(
    opt: torch.optim.Optimizer,
    sched,
    params,
    *,
    dist: Dist,
    max_grad_norm: float,
    guard: Optional[StepGuard] = None,
    loss: float = 0.0,
) -> tuple[float, float]:
    """All-reduce gradients, clip, step optimiser and schedule, zero gradients. With a ``guard``, a
    non-finite ``loss`` (this process's) or gradient norm skips the optimiser step (StepGuard).
    Returns (grad norm before clipping, the learning rate this step used)."""
    dist.sync_gradients(params)
    grad_norm = clip_and_norm(params, max_grad_norm)
    lr = sched.get_last_lr()[0]
    if guard is None or guard.check(dist, grad_norm, loss):
        opt.step()
    step_schedule(sched)
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


def step_schedule(sched) -> None:
    """``sched.step()``; after a skipped first update torch would warn that the schedule stepped
    before the optimiser, which is intended here (StepGuard: the schedule follows the step counter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
        sched.step()


@dataclass
class Checkpointer:
    """Saves and restores everything a run needs to continue the same trajectory."""

    run: RunDir
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    controller: Optional[BetaController] = None
    reference: Optional[object] = None
    extra: dict = field(default_factory=dict)
    guard: Optional[StepGuard] = None
    saved_step: Optional[int] = None  # the step of the last checkpoint written (tether.preempt skips a second one)
    enabled: bool = True  # False: save writes nothing (save_checkpoints: false)
    tokenizer: Optional[object] = None  # saved beside the weights: a checkpoint's model/ loads on its own

    def save(self, step: int, *, data_state: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        weights = full_state_dict(self.model)  # fsdp: every process gathers; rank 0 writes full tensors
        state = {
            "step": step,
            "optimizer": full_optimizer_state(self.optimizer)
            if is_sharded(self.model)
            else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "reference": None if self.reference is None else self.reference.state_dict(),
            "rng": rng_state(),
            "data": data_state or {},
            "guard": None if self.guard is None else self.guard.state_dict(),
            **self.extra,
        }
        self.run.save_checkpoint(step, model=self.model, state=state, weights=weights, tokenizer=self.tokenizer)
        self.saved_step = step

    def resume(self) -> tuple[int, dict]:
        """Load the latest readable checkpoint if any; returns (step, data_state). Logs after it are
        dropped. An unreadable checkpoint (truncated, corrupt) is skipped with a warning for the one
        before it; a checkpoint of an older format (pickle) stops the run with a UserError."""
        ckpts = self.run.checkpoints_newest_first()
        if not ckpts:
            log.info("no checkpoint in %s: starting from step 0", self.run.path)
            self.run.truncate_logs(0)
            return 0, {}
        for ckpt in ckpts:
            try:
                state = RunDir.load_checkpoint_state(ckpt)
                if is_sharded(self.model):
                    load_weights_file(self.model, ckpt / "model")
                else:
                    load_model_weights(self.model, ckpt / "model")  # reads every file before changing the model
                break
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous checkpoint
                log.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                    ckpt,
                    type(e).__name__,
                    str(e)[:200],
                )
        else:
            raise UserError(
                f"no readable checkpoint in {self.run.checkpoints} ({', '.join(p.name for p in ckpts)} "
                "all failed to load, see the warnings above); pass --overwrite to start the run again"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        shard_optimizer_state(self.optimizer)  # fsdp: the saved moments are full tensors
        self.scheduler.load_state_dict(state["scheduler"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        if self.reference is not None and state.get("reference"):
            self.reference.load_state_dict(state["reference"])
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        self.run.truncate_logs(state["step"])
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return int(state["step"]), state.get("data", {})


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def postfix(**values: tuple) -> dict[str, str]:
    """The progress bar's postfix from ``name=(value, format)`` pairs, leaving out a value that does not
    exist yet (None or NaN: the KL before the first evaluation shows nothing, not ``kl=nan``)."""
    return {k: format(v, fmt) for k, (v, fmt) in values.items() if v is not None and v == v}


def final_dir(output_dir: str) -> Path:
    return Path(output_dir) / "final"
