"""Trainer classes with TRL's shape: ``GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
train_dataset=...).train()``. Each is a thin front for its train function (``train_grpo`` ...), which
does the work and which a script may call directly; docs/python-api.md sets the two side by side with
TRL's.

What each takes, in TRL's names:

- ``model``: a model folder, hub id or asset name (str), or a loaded model (a ``PreTrainedModel``; a peft
  model; for ``RewardTrainer`` an ``AutoModelForSequenceClassification`` with ``num_labels=1``). A model
  object is trained in place, as in TRL.
- ``args``: the method's tether config (``GRPOConfig``...; default: its defaults).
- ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset``, a ``DatasetDict`` (train split; its
  test/validation split evaluates when no eval_dataset is given) or a list of dicts (prompts: strings too).
- ``processing_class`` (or ``tokenizer``): the tokenizer; default: the one saved with the model.
- ``reward_funcs`` (GRPO, RLOO, PPO): a function of completions (TRL's signature:
  ``f(completions, prompts=..., **columns) -> list[float]``), a reward-model folder, a spec string
  (``file.py:function``, ``vader``), or a list of these.
- ``callbacks``: ``tether.TrainerCallback``, ``transformers.TrainerCallback`` or functions (``tether.callbacks``).
- ``peft_config``: a peft ``LoraConfig`` (or the config's lora_* fields).

``train()`` returns the ``TrainResult`` (also ``trainer.result``); ``save_model(output_dir)`` copies the
saved model (``OUTPUT_DIR/final``) to another folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ..errors import UserError
from .result import TrainResult


class _Trainer:
    config_module: ClassVar[str]
    config_name: ClassVar[str]
    train_name: ClassVar[str]
    takes_rewards: ClassVar[bool] = False

    def __init__(
        self,
        model=None,
        args=None,
        *,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        tokenizer=None,
        callbacks: Optional[list] = None,
        peft_config=None,
        reward_funcs=None,
        ref_model=None,
    ):
        import importlib

        module = importlib.import_module(self.config_module)
        config_class = getattr(module, self.config_name)
        self.args = config_class() if args is None else args
        if not isinstance(self.args, config_class):
            raise UserError(
                f"args: pass tether.{self.config_name}(...), not "
                f"{type(self.args).__module__}.{type(self.args).__name__} (TRL's field names work in YAML and "
                "on the command line: docs/from-trl.md)"
            )
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise UserError("pass the tokenizer once: processing_class or tokenizer")
        if reward_funcs is not None and not self.takes_rewards:
            raise UserError(f"reward_funcs: {type(self).__name__} trains without a reward function")
        if ref_model is not None:
            if not isinstance(ref_model, (str, Path)):
                raise UserError(
                    "ref_model: pass the reference model's folder or hub id (a loaded reference model is not taken; "
                    "by default the reference is the starting model)"
                )
            if not hasattr(self.args, "reference_model"):
                raise UserError(f"ref_model: {type(self).__name__} has no reference model")
            import dataclasses

            self.args = dataclasses.replace(self.args, reference_model=str(ref_model))
        self.model = model
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.callbacks = list(callbacks or [])
        self.peft_config = peft_config
        self.reward_funcs = reward_funcs
        self._train: Callable = getattr(module, self.train_name)
        self.result: Optional[TrainResult] = None

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            model=self.model,
            tokenizer=self.processing_class,
            peft_config=self.peft_config,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            callbacks=self.callbacks,
        )
        if self.reward_funcs is not None:
            kw["reward"] = self.reward_funcs
        return kw

    def train(self, resume_from_checkpoint: bool = False) -> TrainResult:
        """Run the training; ``resume_from_checkpoint=True`` continues the run in ``args.output_dir`` from its
        latest checkpoint (a checkpoint path is not taken: a run resumes from its own folder)."""
        if not isinstance(resume_from_checkpoint, bool):
            raise UserError(
                "resume_from_checkpoint: pass True (the run in args.output_dir continues from its latest checkpoint)"
            )
        self.result = self._train(self.args, resume=resume_from_checkpoint, **self._kwargs())
        return self.result

    def save_model(self, output_dir: Optional[str] = None) -> str:
        """The trained model's folder: ``OUTPUT_DIR/final`` (written by ``train``), copied to ``output_dir``
        if given."""
        if self.result is None:
            raise UserError("save_model: call train() first (tether saves the model as training ends)")
        if output_dir is None or Path(output_dir).resolve() == Path(self.result.final).resolve():
            return self.result.final
        shutil.copytree(self.result.final, output_dir, dirs_exist_ok=True)
        return str(output_dir)


class SFTTrainer(_Trainer):
    """Supervised fine-tuning (``train_sft``): makes the reference model."""

    config_module, config_name, train_name = "tether.trainers.sft", "SFTConfig", "train_sft"


class RewardTrainer(_Trainer):
    """A Bradley-Terry reward model (``train_reward_model``)."""

    config_module, config_name, train_name = "tether.trainers.reward_model", "RMConfig", "train_reward_model"


class DPOTrainer(_Trainer):
    """DPO and its variants (``train_dpo``)."""

    config_module, config_name, train_name = "tether.trainers.dpo", "DPOConfig", "train_dpo"


class GRPOTrainer(_Trainer):
    """GRPO (``train_grpo``)."""

    config_module, config_name, train_name = "tether.trainers.grpo", "GRPOConfig", "train_grpo"
    takes_rewards = True


class RLOOTrainer(_Trainer):
    """RLOO (``train_rloo``)."""

    config_module, config_name, train_name = "tether.trainers.rloo", "RLOOConfig", "train_rloo"
    takes_rewards = True


class PPOTrainer(_Trainer):
    """PPO with the KL-penalised reward (``train_ppo``)."""

    config_module, config_name, train_name = "tether.trainers.ppo", "PPOConfig", "train_ppo"
    takes_rewards = True
