"""TRL's config field names read as tether's (docs/from-trl.md has the same table for people).

``translate(name, value, fields)`` says what one TRL key means for a config class whose field names
are ``fields``: tether field(s) to set, a key to ignore (bookkeeping that changes nothing tether
does), or a ``UserError`` naming the key and what to use instead. Names tether already shares with
TRL (``learning_rate``, ``beta``, ``max_steps``, ``seed``, ``output_dir``, ``lora_r`` ...) never reach
this module: they are fields. Two keys depend on others and are finished by ``config`` after all
keys are read: ``per_device_train_batch_size`` (tether's ``batch_size`` is global), ``use_peft`` and
``warmup_ratio`` (warmup_steps = ceil(ratio x max_steps), as transformers' ``get_warmup_steps``).

Sources for the names: TRL's ``TrainingArguments``-based ``SFTConfig``, ``DPOConfig``,
``GRPOConfig``, ``RLOOConfig``, ``PPOConfig``, ``RewardConfig``, and ``ModelConfig`` /
``ScriptArguments`` (the ``trl sft|dpo|grpo --config`` scripts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

RENAMED: dict[str, str] = {
    # TRL name -> tether field: same meaning and units.
    "model_name_or_path": "model",
    "sft_model_path": "model",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "num_generations": "samples_per_prompt",
    "rloo_k": "samples_per_prompt",
    "num_iterations": "num_epochs",
    "num_ppo_epochs": "num_epochs",
    "num_mini_batches": "num_minibatches",
    "epsilon": "clip_eps",
    "cliprange": "clip_eps",
    "cliprange_value": "clip_value",
    "kl_coef": "beta",
    "missing_eos_penalty": "no_eos_penalty",
    "response_length": "max_new_tokens",
    "max_seq_length": "max_length",
    "dataset_text_field": "text_field",
    "dataset_train_split": "dataset_split",
    "per_device_eval_batch_size": "eval_batch_size",
    "ref_model_sync_steps": "ref_sync_every",
    "ref_model_mixup_alpha": "ref_sync_alpha",
    "reward_model_path": "reward",
    "torch_dtype": "dtype",
}

DEFERRED = ("per_device_train_batch_size", "use_peft", "warmup_ratio", "eval_strategy", "evaluation_strategy")
"""Keys finished by ``config.finish_trl`` once every key is read (they depend on other fields)."""

IGNORED = frozenset(
    {
        # Bookkeeping: accepted whatever the value, changes nothing tether does (one INFO line lists them).
        "run_name",
        "logging_first_step",
        "overwrite_output_dir",
        "do_train",
        "do_eval",
        "do_predict",
        "remove_unused_columns",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "hub_model_id",
        "hub_strategy",
        "hub_private_repo",
        "hub_token",
        "logging_strategy",
        "save_only_model",
        "save_safetensors",
        "logging_dir",
        "logging_nan_inf_filter",
        "attn_implementation",
        "dataset_config",
        "dataset_test_split",
        "dataset_streaming",
        "tf32",
        "ddp_find_unused_parameters",
        "ddp_timeout",
        "ddp_backend",
        "include_tokens_per_second",
        "include_num_input_tokens_seen",
        "gradient_checkpointing_kwargs",
        "lora_task_type",
        "log_completions",
        "num_completions_to_print",
        "wandb_log_unique_prompts",
        "ds3_gather_for_generation",
        "model_init_kwargs",
        "ref_model_init_kwargs",
        "dataset_num_proc",
        "use_logits_to_keep",
        "eval_on_start",
        "label_names",
        "disable_dropout_in_model",
        "precompute_ref_log_probs",
        "precompute_ref_batch_size",
        "seed_data",
        "data_seed",
        "log_level",
        "log_level_replica",
        "local_rank",
        "use_cpu",
        "bf16_full_eval",
        "fp16_full_eval",
        "prediction_loss_only",
        "eval_accumulation_steps",
        "torch_empty_cache_steps",
        "ignore_data_skip",
        "resume_from_checkpoint",
        "vllm_gpu_memory_utilization",
        "vllm_server_host",
        "vllm_server_port",
        "vllm_tensor_parallel_size",
        "shuffle_dataset",
    }
)

SAME_AS_TETHER: dict[str, tuple[set, str]] = {
    # Accepted (and ignored) only at the value that matches what tether does; any other value is
    # refused with the advice given.
    "push_to_hub": ({False}, "tether saves to output_dir/final; push it with `huggingface-cli upload`"),
    "fp16": ({False}, "use bf16: true (dtype: bfloat16) or dtype: float32"),
    "load_in_4bit": ({False}, "quantised training is not supported; use lora_r with a bf16 model"),
    "load_in_8bit": ({False}, "quantised training is not supported; use lora_r with a bf16 model"),
    "use_bnb_nested_quant": ({False}, "quantised training is not supported"),
    "trust_remote_code": ({False}, "tether loads transformers' built-in architectures only"),
    "torch_compile": ({False}, "remove torch_compile"),
    "use_liger_kernel": ({False}, "remove use_liger_kernel (tether computes log-probs chunked itself)"),
    "optim": (
        {"adamw_torch", "adamw_torch_fused", "adamw_hf"},
        "tether uses torch AdamW; set weight_decay and learning_rate",
    ),
    "adam_beta1": ({0.9}, "tether's AdamW uses betas (0.9, 0.999)"),
    "adam_beta2": ({0.999}, "tether's AdamW uses betas (0.9, 0.999)"),
    "adam_epsilon": ({1e-8}, "tether's AdamW uses eps 1e-8"),
    "repetition_penalty": ({1, 1.0}, "tether scores the distribution it samples; a penalty would change it: remove it"),
    "min_p": ({None, 0, 0.0}, "use top_k or top_p"),
    "mask_truncated_completions": ({False}, "use no_eos_penalty to penalise completions without EOS"),
    "rpo_alpha": ({None}, "remove rpo_alpha (no NLL term in tether dpo; train tether sft first)"),
    "lora_modules_to_save": ({None}, "LoRA adapts lora_target_modules only; remove lora_modules_to_save"),
    "model_revision": ({None, "main"}, "download that revision and pass its folder as model"),
    "truncation_mode": ({"keep_end"}, "tether cuts prompts from the left and completions from the right (keep_end)"),
    "epsilon_high": ({None}, "tether clips symmetrically: use epsilon (clip_eps)"),
    "delta": ({None}, "tether clips symmetrically: use epsilon (clip_eps)"),
    "importance_sampling_level": ({"token"}, "tether's ratios are per token; remove importance_sampling_level"),
    "generate_during_eval": ({False}, "tether dpo writes kl/ref from samples at every eval; remove it"),
    "whiten_rewards": ({False}, "use reward_normalize"),
    "sync_ref_model": ({False}, "use reference: sync (TR-DPO), with ref_sync_every and ref_sync_alpha"),
}

LR_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}
GRPO_LOSS_TYPES = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "bnpo": "token_mean"}
BOOLEAN = frozenset(
    {
        "use_peft",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "push_to_hub",
        "disable_dropout",
        "disable_tqdm",
        "use_vllm",
        "load_in_4bit",
        "load_in_8bit",
        "trust_remote_code",
        "logging_first_step",
        "overwrite_output_dir",
        "do_train",
        "do_eval",
        "remove_unused_columns",
        "sync_ref_model",
        "torch_compile",
        "use_liger_kernel",
        "mask_truncated_completions",
        "tf32",
        "precompute_ref_log_probs",
        "padding_free",
        "generate_during_eval",
        "whiten_rewards",
    }
)
"""TRL keys that are booleans (a bare ``--bf16`` on the command line means true)."""

KNOWN = (
    frozenset(RENAMED)
    | frozenset(DEFERRED)
    | IGNORED
    | frozenset(SAME_AS_TETHER)
    | frozenset(
        {
            "dataset_name",
            "save_strategy",
            "use_vllm",
            "vllm_mode",
            "max_completion_length",
            "reward_funcs",
            "reward_model_name_or_path",
            "bf16",
            "lr_scheduler_type",
            "disable_dropout",
            "disable_tqdm",
            "report_to",
            "gradient_checkpointing",
            "loss_type",
            "scale_rewards",
        }
    )
)
"""Every TRL key this module reads (the command line accepts each as a hidden flag)."""


def _truth(value: Any) -> Optional[bool]:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    return True if s in ("1", "true", "yes", "on") else False if s in ("0", "false", "no", "off") else None


def _same(value: Any, allowed: set) -> bool:
    for a in allowed:
        if a is None:
            if value is None or str(value).lower() in ("none", "null"):
                return True
        elif isinstance(a, bool):
            if _truth(value) is a:
                return True
        elif isinstance(a, (int, float)):
            try:
                if float(value) == a:
                    return True
            except (TypeError, ValueError):
                pass
        elif str(value) == a:
            return True
    return False


def is_trl_value(name: str, value: Any) -> bool:
    """A tether field given a value only TRL's version of it takes (GRPO's scale_rewards: group | batch |
    none; report_to as a list)."""
    if name == "report_to":
        return isinstance(value, (list, tuple)) or str(value).strip().lower() == "all"
    return name == "scale_rewards" and isinstance(value, str) and value.strip().lower() in ("group", "batch", "none")


def refuse(name: str, value: Any, advice: str) -> UserError:
    return UserError(f"TRL field {name}: {value!r} is not supported by tether; {advice}")


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def is_dotted_name(spec: str) -> bool:
    """TRL's way to name a reward function, ``package.module.function`` (not a ``.py`` file name)."""
    return bool(_DOTTED.match(spec)) and not spec.endswith(".py")


def _dotted_to_colon(spec: str) -> str:
    """TRL's dotted ``my_lib.rewards.fn`` as tether's ``my_lib.rewards:fn`` (unless it names an existing path:
    a reward-model folder wins, as in ``tether.rewards.build_reward``)."""
    if is_dotted_name(spec) and not Path(spec).exists():
        return ":".join(spec.rsplit(".", 1))
    return spec


def translate(name: str, value: Any, fields: set[str]) -> Optional[list[tuple[str, Any]]]:
    """What TRL key ``name`` (not a tether field) means for a config with ``fields``: a list of
    (tether field, value) pairs to set ([] = ignore it), or None if ``name`` is not a TRL key.
    Raises ``UserError`` for a TRL setting tether cannot honour."""
    if name in RENAMED:
        target = RENAMED[name]
        if target not in fields:
            if name in ("num_train_epochs",):
                raise refuse(name, value, "use max_steps (optimiser steps)")
            raise refuse(name, value, f"this command has no {target} (its fields are listed by --help)")
        if name == "torch_dtype" and str(value) == "auto":
            return []
        return [(target, value)]
    if name in IGNORED:
        return []
    if name in SAME_AS_TETHER:
        allowed, advice = SAME_AS_TETHER[name]
        if _same(value, allowed):
            return []
        raise refuse(name, value, advice)
    if name == "use_vllm":  # TRL's switch for sampling with vLLM: tether's backend: vllm
        truth = _truth(value)
        if truth is None:
            raise UserError(f"TRL field use_vllm: cannot read {value!r} as a boolean; use true or false")
        if "backend" in fields:
            return [("backend", "vllm")] if truth else []
        if truth:
            raise refuse(name, value, "this command does not sample completions; remove use_vllm")
        return []
    if name == "vllm_mode":
        if str(value).strip().lower() == "colocate":
            return []
        raise refuse(
            name, value, "tether runs vLLM inside the training process only (vllm_mode: colocate, backend: vllm)"
        )
    if name == "save_strategy":  # "no": no checkpoints (final/ is still written, as TRL's save_model does)
        strategy = str(value).strip().lower()
        if strategy == "no":
            return [("save_checkpoints", False)] if "save_checkpoints" in fields else []
        if strategy == "steps":
            return []
        raise refuse(name, value, 'tether saves every save_steps steps ("steps") or not at all ("no")')
    if name == "dataset_name":
        for target in ("dataset", "prompts"):
            if target in fields:
                return [(target, value)]
        raise refuse(name, value, "this command reads no dataset")
    if name in ("reward_funcs", "reward_model_name_or_path"):  # TRL's GRPO script arguments
        if "reward" not in fields:
            raise refuse(name, value, "this command takes no reward")
        specs = list(value) if isinstance(value, (list, tuple)) else [value]
        if not specs:
            raise refuse(name, value, "give at least one reward function or reward model")
        specs = [_dotted_to_colon(str(spec)) for spec in specs]  # reward_weights is the same name in tether
        return [("reward", specs[0] if len(specs) == 1 else specs)]
    if name == "max_completion_length":  # a field of dpo/rm; the sampling length of online trainers
        if "max_new_tokens" in fields:
            return [("max_new_tokens", value)]
        raise refuse(name, value, "use max_length")
    if name == "bf16":
        truth = _truth(value)
        if truth is None:
            raise UserError(f"TRL field bf16: cannot read {value!r} as a boolean; use true or false")
        return [("dtype", "bfloat16")] if truth else []
    if name == "lr_scheduler_type":
        if str(value) not in LR_SCHEDULES:
            raise refuse(name, value, f"use lr_schedule: one of {sorted(set(LR_SCHEDULES.values()))}")
        return [("lr_schedule", LR_SCHEDULES[str(value)])]
    if name in ("disable_dropout", "disable_tqdm"):
        truth = _truth(value)
        if truth is None:
            raise UserError(f"TRL field {name}: cannot read {value!r} as a boolean; use true or false")
        target = "keep_dropout" if name == "disable_dropout" else "progress"
        return [(target, not truth)] if target in fields else []
    if name == "report_to":  # TRL takes a list; tether's field is one comma-separated string
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value) or "none"
        if str(value).strip().lower() == "all":  # TRL: every installed integration; tether's default one
            value = "tensorboard"
        if "report_to" in fields:
            return [("report_to", value)]
        if str(value).lower() in ("none", "tensorboard"):
            return []
        raise refuse(name, value, "this tether logs metrics.jsonl and TensorBoard only (report_to: tensorboard)")
    if name == "gradient_checkpointing":
        if "gradient_checkpointing" in fields:
            return [("gradient_checkpointing", value)]
        if _truth(value) is False:
            return []
        raise refuse(name, value, "remove it (this command has no gradient checkpointing)")
    if name == "loss_type":  # a field of dpo; GRPO's loss_type is tether's loss_aggregation
        if "loss_aggregation" in fields and str(value) in GRPO_LOSS_TYPES:
            return [("loss_aggregation", GRPO_LOSS_TYPES[str(value)])]
        raise refuse(
            name, value, "use loss_aggregation: token_mean (dapo, bnpo), seq_mean_token_mean (grpo) or seq_sum"
        )
    if name == "scale_rewards":  # a field of grpo; newer TRL writes it as group | batch | none
        if str(value).lower() == "group":
            return [("scale_rewards", True)] if "scale_rewards" in fields else []
        if str(value).lower() == "none":
            return [("scale_rewards", False)]
        raise refuse(name, value, "use scale_rewards: true (per group, DeepSeekMath) or false (Dr. GRPO)")
    return None
