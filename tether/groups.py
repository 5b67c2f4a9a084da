"""Config groups that several commands share (each group means one thing everywhere).

Each is a dataclass mixin: a command's config inherits the groups it supports and nothing else, so a
flag it would always refuse is not in its ``--help``. YAML may give a group as one nested mapping
(``sampling: {temperature: 0.7}``) or its fields flat; the command line takes them flat. The β group
is ``tether.control.BetaConfig`` (controllers) / ``BetaScheduleConfig`` (fixed or scheduled β); the
LoRA and training groups are declared on ``tether.training.TrainConfig``; the data group on each
command's config, from ``DATA_FIELDS`` (the fields it has of them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .config import config_group
from .errors import UserError


@config_group("sampling")
@dataclass
class SamplingConfig:
    """How completions are sampled: by the online trainers (ppo, grpo, rloo), ``tether kl`` and
    ``tether bon``, through the one engine (tether.engine)."""

    max_new_tokens: int = 32
    """Completion length limit (tokens)."""
    temperature: float = 1.0
    """Sampling temperature τ; the KL and the losses score the filtered distribution actually sampled (docs/theory.md
    §3)."""
    top_k: int = 0
    """Top-k sampling filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    backend: str = "builtin"
    """Generation backend (tether.generation): builtin (tether's KV-cache sampler) | vllm (optional colocated vLLM
    engine)."""
    decoder: str = "auto"
    """Decode step of the builtin backend: auto (tether's lean step for a plain Llama, else the model's own forward)
    | hf (the model's own forward) | lean (plain Llama only)."""
    vllm_gpu_memory_utilization: float = 0.3
    """backend vllm on a GPU: the fraction of the GPU's memory the colocated engine may take for its weights and KV
    cache, in (0, 1] (TRL's name and colocate default; the rest is the trainer's)."""
    vllm_enable_sleep_mode: bool = False
    """backend vllm on a GPU: put the engine to sleep after each rollout (its weights to CPU memory, its KV cache
    freed) so the update has the memory, and wake it before the next weight push (TRL's colocate sleep mode)."""


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p")


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn, derived once from a config's sampling group (``sampling_settings``) and
    passed as one object to the engine, the generation backends, the rollout, the scorer and the loss.

    The filters (temperature τ, top_k, top_p) define the sampled policy π^{τ,F}_θ that every KL and loss
    is computed under (docs/theory.md §3); ``max_new_tokens`` bounds the completion. The backend choice
    (``backend``, ``decoder``, the vLLM GPU options) stays on the config: it picks the machine that
    samples, not the distribution (``generation.backend_for``). Values are checked on construction
    (``UserError`` naming the field)."""

    max_new_tokens: int = 32
    """Completion length limit (tokens), >= 1."""
    temperature: float = 1.0
    """Softmax temperature τ > 0; policy and reference are both scored at it."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1] (1.0 = off)."""

    def __post_init__(self):
        for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        check_sampling(self)

    def filters(self) -> dict:
        """{temperature, top_k, top_p}: the keyword arguments of the sampler's filter
        (``ops.logprobs.apply_sampling_filters``, ``sampling.sample``)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    @property
    def uses_token_filter(self) -> bool:
        """top-k or top-p is on: the sampler stores the allowed sets F_t and scoring restricts to them."""
        return self.top_k > 0 or self.top_p < 1.0

    def for_reference(self) -> "SamplingSettings":
        """The settings the reference is scored under: the same τ, never filtered (π^τ_ref)."""
        return dataclasses.replace(self, top_k=0, top_p=1.0)

    def same_distribution(self, other: "SamplingSettings") -> bool:
        """Both sample the same π^{τ,F}_θ (the filters agree; the length limit may differ)."""
        return self.filters() == other.filters()


def check_sampling(s: Any) -> None:
    """The sampling group's ranges (one place: ``SamplingSettings`` runs it on construction, so every
    command's preflight and every Python caller gets the same ``UserError``)."""
    if s.max_new_tokens < 1:
        raise UserError(f"max_new_tokens={s.max_new_tokens} must be >= 1; set --max_new_tokens")
    if not s.temperature > 0:
        raise UserError(
            f"temperature={s.temperature} must be > 0 (a small value samples near-greedily); set --temperature"
        )
    if s.top_k < 0:
        raise UserError(f"top_k={s.top_k} must be >= 0 (0 = off); set --top_k")
    if not 0.0 < s.top_p <= 1.0:
        raise UserError(f"top_p={s.top_p} must lie in (0, 1] (1 = off); set --top_p")


def sampling_settings(source: Any = None, **overrides) -> SamplingSettings:
    """The one ``SamplingSettings`` of ``source``: a ``SamplingSettings`` (itself), any config with the
    sampling group (``SamplingConfig``: its max_new_tokens, temperature, top_k, top_p), a mapping with
    some of those keys (the rest default), or None (all defaults). ``overrides`` that are not None
    replace fields (``max_new_tokens=`` of the engine's functions)."""
    if isinstance(source, SamplingSettings):
        values = dataclasses.asdict(source)
    elif source is None:
        values = {}
    elif isinstance(source, Mapping):
        unknown = set(source) - set(SAMPLING_FIELDS)
        if unknown:
            raise UserError(f"unknown sampling settings {sorted(unknown)}; use {', '.join(SAMPLING_FIELDS)}")
        values = dict(source)
    else:
        values = {k: getattr(source, k) for k in SAMPLING_FIELDS if hasattr(source, k)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingSettings(**values)


@config_group("reference", prefixes=("reference", "ref"))
@dataclass
class ReferenceConfig:
    """The reference model π_ref the KL is measured against (tether.reference is the one place it is
    handled)."""

    reference: str = "copy"
    """Reference form: copy (frozen copy) | lora (the LoRA policy with adapters off) | offload (copy kept in CPU
    memory)."""
    reference_model: Optional[str] = None
    """Reference model path (default: the starting policy `model`)."""


DATA_FIELDS = (
    "dataset",
    "dataset_split",
    "prompts",
    "eval_dataset",
    "eval_prompts",
    "eval_fraction",
    "eval_examples",
    "eval_pairs",
    "eval_max_prompts",
    "limit",
    "skip_bad_rows",
    "chat_template",
    "text_field",
    "prompt_field",
    "completion_field",
    "messages_field",
    "chosen_field",
    "rejected_field",
    "columns",
    "max_length",
    "max_prompt_length",
    "max_completion_length",
    "packing",
    "completion_only_loss",
    "append_eos",
    "add_eos",
    "shuffle",
)
"""The data group (what is read and how it is cut into tokens): a config declares it with
``@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)`` and gets those it has."""
