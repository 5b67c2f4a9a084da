"""Config groups that several commands share (each group means one thing everywhere).

Each is a dataclass mixin: a command's config inherits the groups it supports and nothing else, so a
flag it would always refuse is not in its ``--help``. YAML may give a group as one nested mapping
(``sampling: {temperature: 0.7}``) or its fields flat; the command line takes them flat. The β group
is ``tether.control.BetaConfig`` (controllers) / ``BetaScheduleConfig`` (fixed or scheduled β); the
LoRA and training groups are declared on ``tether.training.TrainConfig``; the data group on each
command's config, from ``DATA_FIELDS`` (the fields it has of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import config_group


@config_group("sampling")
@dataclass
class SamplingConfig:
    """How completions are sampled: by the online trainers (ppo, grpo, rloo), ``tether kl`` and
    ``tether bon``, through the one engine (tether.engine)."""

    max_new_tokens: int = 32
    """Completion length limit (tokens)."""
    temperature: float = 1.0
    """Sampling temperature τ; the KL and the losses score the filtered distribution actually sampled (docs/theory.md §3)."""
    top_k: int = 0
    """Top-k sampling filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    backend: str = "builtin"
    """Generation backend (tether.generation): builtin (tether's KV-cache sampler) | vllm (optional colocated vLLM engine)."""
    decoder: str = "auto"
    """Decode step of the builtin backend: auto (tether's lean step for a plain Llama, else the model's own forward) | hf (the model's own forward) | lean (plain Llama only)."""
    vllm_gpu_memory_utilization: float = 0.3
    """backend vllm on a GPU: the fraction of the GPU's memory the colocated engine may take for its weights and KV cache, in (0, 1] (TRL's name and colocate default; the rest is the trainer's)."""
    vllm_enable_sleep_mode: bool = False
    """backend vllm on a GPU: put the engine to sleep after each rollout (its weights to CPU memory, its KV cache freed) so the update has the memory, and wake it before the next weight push (TRL's colocate sleep mode)."""


@config_group("reference", prefixes=("reference", "ref"))
@dataclass
class ReferenceConfig:
    """The reference model π_ref the KL is measured against (tether.reference is the one place it is
    handled)."""

    reference: str = "copy"
    """Reference form: copy (frozen copy) | lora (the LoRA policy with adapters off) | offload (copy kept in CPU memory)."""
    reference_model: Optional[str] = None
    """Reference model path (default: the starting policy `model`)."""


DATA_FIELDS = (
    "dataset", "dataset_split", "prompts", "eval_dataset", "eval_prompts", "eval_fraction", "eval_examples",
    "eval_pairs", "eval_max_prompts", "limit", "skip_bad_rows", "chat_template", "text_field", "prompt_field",
    "completion_field", "messages_field", "chosen_field", "rejected_field", "columns", "max_length",
    "max_prompt_length", "max_completion_length", "packing", "completion_only_loss", "append_eos", "add_eos", "shuffle",
)
"""The data group (what is read and how it is cut into tokens): a config declares it with
``@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)`` and gets those it has."""
