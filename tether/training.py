"""Pieces every trainer shares: the common config fields, model/LoRA setup, optimiser and schedule,
gradient clipping, checkpoint + resume. Trainers are short top-to-bottom loops that call these and
the math in ``tether.ops`` (STYLE.md §2); nothing here knows about a particular loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .assets import resolve_model
from .control import BetaController
from .distributed import Dist
from .modeling import load_causal_lm, load_tokenizer
from .runs import RunDir, load_model_weights, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


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
    """Optimiser steps."""
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
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (applied only with keep_dropout: otherwise all dropout is off)."""
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA adapts."""
    merge_lora: bool = True
    """final/: merge LoRA into the weights (loadable with AutoModelForCausalLM) or save the adapter."""
    log_every: int = 1
    """Log metrics every N steps."""
    eval_every: int = 0
    """Measure kl/ref (and held-out metrics) every N steps (0 = only at the end)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end)."""
    progress: bool = True
    """Show a progress bar."""
    keep_dropout: bool = False
    """Train the policy with the model's own dropout (and lora_dropout). Off by default: dropout makes
    π_θ a random sub-network, so at step 1 (π_θ = π_ref) DPO's margins are not 0 and its loss is not
    ln 2, and the KL to the reference is noisy, even negative (TRL #506). The reference is always in
    eval mode. Online methods (ppo, grpo, rloo) run the policy in eval mode whatever this says."""


def derive_micro_batch(cfg: TrainConfig, dist: Dist) -> int:
    """Examples per micro-batch on one process; checks exact divisibility once (STYLE.md §5)."""
    per = cfg.grad_accum * dist.world_size
    if cfg.batch_size % per:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) x processes ({dist.world_size})"
        )
    return cfg.batch_size // per


def load_policy(cfg: TrainConfig, dist: Dist):
    """Tokenizer and policy (with LoRA adapters if lora_r > 0), seeded and in training mode
    (``set_train_mode``: dropout off unless keep_dropout)."""
    seed_everything(cfg.seed)
    path = resolve_model(cfg.model, cfg.assets)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype=cfg.dtype, device=dist.device)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                       target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"),
        )
    dist.broadcast_params(model)
    set_train_mode(model, keep_dropout=cfg.keep_dropout)
    return tok, model, path


def set_train_mode(model: torch.nn.Module, *, keep_dropout: bool) -> torch.nn.Module:
    """The mode a trained model is in between optimiser steps: ``train()`` if ``keep_dropout``, else
    ``eval()``. The one place trainers set it (TrainConfig.keep_dropout says why dropout is off).

    Why the whole model in eval mode rather than train mode with the Dropout modules switched off:
    not all dropout is a module. GPT-2's attention passes ``dropout_p = p if self.training else 0``
    to SDPA (Llama's ``attention_dropout`` likewise), so switching off ``nn.Dropout`` modules leaves
    it on; tests/test_dropout.py checks this. Eval mode changes no gradient (autograd ignores it) and
    also covers peft's LoRA dropout. What else reads ``self.training`` in a causal LM is off too:
    HF gradient checkpointing (not used by tether) and MoE router jitter noise (Mixtral)."""
    model.train(keep_dropout)
    if not keep_dropout:
        n = sum(1 for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
        if n:
            log.info("dropout off in %d modules (p > 0) and in functional attention dropout; keep_dropout=true keeps it", n)
    return model


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.lr_schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule must be constant, cosine or linear, got {cfg.lr_schedule!r}")
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
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in params])))


def optimizer_step(opt: torch.optim.Optimizer, sched, params, *, dist: Dist, max_grad_norm: float) -> tuple[float, float]:
    """All-reduce gradients, clip, step optimiser and schedule, zero gradients.
    Returns (grad norm before clipping, the learning rate this step used)."""
    dist.sync_gradients(params)
    grad_norm = clip_and_norm(params, max_grad_norm)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


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

    def save(self, step: int, *, data_state: Optional[dict] = None) -> None:
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "reference": None if self.reference is None else self.reference.state_dict(),
            "rng": rng_state(),
            "data": data_state or {},
            **self.extra,
        }
        self.run.save_checkpoint(step, model=self.model, state=state)

    def resume(self) -> tuple[int, dict]:
        """Load the latest checkpoint if any; returns (step, data_state). Logs after it are dropped."""
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            log.info("no checkpoint in %s: starting from step 0", self.run.path)
            return 0, {}
        state = RunDir.load_checkpoint_state(ckpt)
        load_model_weights(self.model, ckpt / "model")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        if self.reference is not None and state.get("reference"):
            self.reference.load_state_dict(state["reference"])
        set_rng_state(state["rng"])
        self.run.truncate_logs(state["step"])
        log.info("resumed from %s (step %d)", ckpt, state["step"])
        return int(state["step"]), state.get("data", {})


def progress_bar(total: int, initial: int, *, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def final_dir(output_dir: str) -> Path:
    return Path(output_dir) / "final"
