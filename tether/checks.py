"""Checks of a command's whole input before any weights load: config ranges and choices, the files the
user named, the model path, and the context length.

Each training function runs its method's ``preflight_<command>(cfg)`` first (``tether.registry``'s
``preflight``; ``train_dpo(cfg)`` from a notebook runs the same checks as ``tether dpo``; pass
``preflight=False`` to skip them), so a typo in ``--loss_type`` or a missing prompts file costs a
second, not a model load. Data given in memory (``prompts=``, ``rows=``, ``reward=``) replaces the
check of the file or spec it stands for. The rules that belong to one trainer stay in
that trainer's ``check_config`` / ``validate`` (called from here, so there is one place per rule);
this module holds the rules every trainer shares (``check_train_config``) and the checks of paths.
Every failure is a ``UserError`` whose message names the field or file and the fix.

Context length: the positions a model has are read from its config.json (``max_position_embeddings``,
or ``n_positions`` / ``max_seq_len`` / ``n_ctx`` for other architectures). Sampling commands need
``prompt + max_new_tokens`` positions; trainers on fixed data need ``max_length``. A model run past
its positions does not fail: with rotary embeddings it silently computes with positions it never
trained on (1,150-token sequences on a 512-position model were seen to exit 0).
"""

from __future__ import annotations

import gzip
import heapq
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from .errors import UserError
from .groups import sampling_settings

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine", "linear")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".gz", ".csv", ".tsv", ".yaml", ".yml", ".py")
DATA_ASSET_NAMES = ("hh-rlhf", "rt-polarity")


# --------------------------------------------------------------------------------------------------
# Numbers and choices


def _at_least(cfg: Any, name: str, low: float, why: str = "") -> None:
    value = getattr(cfg, name)
    if value is not None and value < low:
        raise UserError(f"{name}={value} must be >= {low:g}{why}; set --{name}")


def _choice(cfg: Any, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise UserError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}; set --{name} to one of them")


def check_train_config(cfg: Any) -> None:
    """The rules every trainer's config (``tether.training.TrainConfig``) shares."""
    from .modeling import DTYPES

    _at_least(cfg, "max_steps", 1, " (optimiser steps to run)")
    _at_least(cfg, "batch_size", 1)
    _at_least(cfg, "grad_accum", 1)
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum={cfg.grad_accum}; change one of them"
        )
    _at_least(cfg, "learning_rate", 0.0)
    _at_least(cfg, "weight_decay", 0.0)
    _at_least(cfg, "warmup_steps", 0)
    _at_least(cfg, "save_total_limit", 0, " (checkpoints kept; 0 keeps all)")
    _at_least(cfg, "max_grad_norm", 0.0, " (0 = no clipping)")
    _choice(cfg, "lr_schedule", LR_SCHEDULES)
    _choice(cfg, "dtype", sorted(DTYPES))
    if getattr(cfg, "autocast", False) and DTYPES[cfg.dtype] != DTYPES["float32"]:
        raise UserError(
            f"autocast keeps float32 weights and computes in bf16; dtype={cfg.dtype} already computes in "
            "its own precision: set --dtype float32 or --autocast false"
        )
    _at_least(cfg, "lora_r", 0, " (0 = full fine-tuning)")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UserError(f"lora_dropout={cfg.lora_dropout} must lie in [0, 1); set --lora_dropout")
    _at_least(cfg, "log_every", 1)
    _at_least(cfg, "eval_every", 0, " (0 = no periodic evaluation; eval_final sets the last one)")
    _at_least(cfg, "save_every", 0, " (0 = only at the end)")
    for name in ("eval_batch_size", "ref_batch_size"):
        if hasattr(cfg, name):
            _at_least(cfg, name, 1)
    from .training import check_fsdp, fsdp_requested

    if fsdp_requested(cfg):
        check_fsdp(cfg)  # sharding's exclusions (LoRA, a reference sharing the policy's weights)
    check_chat_template(cfg)


def check_chat_template(cfg: Any) -> None:
    """``chat_template``, when set, is a file or Jinja text that renders a user/assistant conversation
    (``tether.data.chat.check_template``): a mistyped path fails here, not as a template that prints it."""
    if getattr(cfg, "chat_template", None):
        from .data.chat import check_template

        check_template(cfg.chat_template)


def check_beta(cfg: Any) -> None:
    """β and its controller or schedule (``tether.control.build_controller``, which holds the rules), built
    once without a model: a negative β or a bad schedule is found before any weights load."""
    from .control import build_controller

    build_controller(cfg, total_steps=cfg.max_steps, episodes_per_step=cfg.batch_size)


def _world_size() -> SimpleNamespace:
    """The process count a launcher (torchrun / accelerate) announces, without starting a process group."""
    return SimpleNamespace(world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))


# --------------------------------------------------------------------------------------------------
# Files


def _looks_like_path(spec: str) -> bool:
    """A spec the user meant as a local path (rather than a hub name such as 'org/name')."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
        or spec.lower().endswith(DATA_SUFFIXES)
    )


def check_text_file(path: str | os.PathLike, *, field: str) -> Path:
    """``path`` is an existing, readable file of UTF-8 text (gzip-compressed if it ends in .gz)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--{field} {path}: is a folder; pass a file")
    if not p.exists():
        raise UserError(f"--{field} {path}: no such file; check the path")
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    except PermissionError:
        raise UserError(f"--{field} {path}: permission denied; make the file readable") from None
    except (OSError, EOFError) as e:  # a corrupt .gz
        raise UserError(f"--{field} {path}: cannot read it ({e}); check the file") from None
    if p.suffix == ".parquet" or p.name.endswith(".parquet.gz"):
        return p
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"--{field} {path}: line {line} is not UTF-8 text ({e.reason}); save the file as UTF-8"
        ) from None
    return p


def check_dataset(spec: Optional[str], *, field: str, assets: Optional[str] = None, required: bool = True) -> None:
    """A dataset argument (comma-separated for sft): each part is a readable file, a folder, an asset
    name (hh-rlhf, rt-polarity) or a hub name (checked by the loader, which says when it is offline)."""
    if not spec or not str(spec).strip():
        if required:
            raise UserError(
                f"--{field} is empty; pass a data file (.jsonl, .json, .parquet, text), a folder, or a hub name"
            )
        return
    for part in [s.strip() for s in str(spec).split(",") if s.strip()]:
        p = Path(part).expanduser()
        if part in DATA_ASSET_NAMES and not p.exists():
            continue
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise UserError(f"--{field} {part}: permission denied; make the folder readable")
            continue
        if p.exists() or _looks_like_path(part):
            check_text_file(part, field=field)


def check_prompts_file(
    path: Optional[str], *, field: str = "prompts", tokenizer=None, cfg=None, lazy: bool = False
) -> Sequence[str]:
    """Read prompts as the command will (``tether.data.prompts.load_prompts`` with the config's
    prompt_field / columns / chat_template; ``tokenizer`` renders conversational prompts), after the
    file checks. Returns the prompt texts (``lazy``: of a large file, built on demand)."""
    from .data.prompts import load_prompts, prompt_options, prompt_texts

    if not path:
        raise UserError(
            f"--{field} is required: a text file (one prompt per line), JSONL with a 'prompt' field, "
            "or a datasets folder"
        )
    p = Path(path).expanduser()
    if p.is_file() or (not p.is_dir() and _looks_like_path(path)):
        check_text_file(path, field=field)
    return prompt_texts(load_prompts(path, tokenizer=tokenizer, lazy=lazy, **prompt_options(cfg)))


# --------------------------------------------------------------------------------------------------
# Models


def check_model(spec: Optional[str], *, field: str = "model", assets: Optional[str] = None):
    """(path, config) of a model argument without loading weights: a folder with config.json, an
    asset short name (stories260K), or a hub id (which needs the network, or the hub cache). A model
    object handed to the train call (``tether.inputs``) is the ``model``: its own config, path ``GIVEN``."""
    from .assets import resolve_model
    from .inputs import given

    if field == "model" and given().model is not None:
        return GIVEN, given().model.config
    if not spec:
        raise UserError(
            f"--{field} is empty; pass a model folder (with config.json), an asset name such as stories260K, or a hub "
            "id"
        )
    path = resolve_model(spec, assets)
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            if (p / "final" / "config.json").exists():
                hint = f"; did you mean {p / 'final'}?"
            elif (p / "adapter_config.json").exists():
                hint = "; it is a LoRA adapter: pass a run saved with merge_lora=true, or its base model"
            else:
                hint = "; pass the final/ folder of a tether run, or a Hugging Face model folder"
            raise UserError(f"--{field} {spec}: folder has no config.json, so it is not a model{hint}")
        path = str(p)
    elif p.exists():
        raise UserError(f"--{field} {spec}: is a file, not a model folder; pass the folder that holds config.json")
    elif _looks_like_path(spec):
        raise UserError(
            f"--{field} {spec}: no such model folder; check the path (or use an asset name such as stories260K)"
        )
    return path, _model_config(path, spec, field)


def _model_config(path: str, spec: str, field: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - offline hub, bad repo id, malformed config.json: all the user's to fix
        if Path(path).is_dir():
            raise UserError(
                f"--{field} {spec}: config.json cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); "
                "fix or replace the model folder"
            ) from None
        raise UserError(
            f"--{field} {spec}: neither a local model folder nor reachable on the Hugging Face hub "
            f"({type(e).__name__}); pass a folder with config.json, an asset name such as stories260K, "
            "or a hub id while online"
        ) from None


def model_positions(config) -> Optional[int]:
    """The number of positions a model has, from its config (None if the architecture does not say)."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(config, *, need: int, fields: str, model_field: str = "model", spec: str = "") -> None:
    """``need`` tokens fit in the model's positions, or a UserError naming ``fields`` and the limit."""
    limit = model_positions(config)
    if limit is not None and need > limit:
        raise UserError(
            f"{fields} = {need} tokens, more than the {limit} positions of --{model_field} {spec}; "
            f"lower them so the total is at most {limit}"
        )


GIVEN = "<the model object given>"  # check_model's path for a model handed to the train call


def _tokenizer(path: str):
    from .modeling import load_tokenizer

    if path == GIVEN:
        from .inputs import given_tokenizer

        return given_tokenizer()
    return load_tokenizer(path)


LONGEST_BY_CHARACTERS = 1000
"""Beyond ``measure.EAGER_ENCODE_PROMPTS`` prompts (a file too large to tokenise at start-up), the
context check tokenises only this many, the longest in characters."""


def _longest_prompt(path: str, prompts: Sequence[str]) -> int:
    from .measure import EAGER_ENCODE_PROMPTS, encode_prompts

    if not isinstance(prompts, list) and len(prompts) > EAGER_ENCODE_PROMPTS:
        longest = heapq.nlargest(LONGEST_BY_CHARACTERS, range(len(prompts)), key=lambda i: len(prompts[i]))
        prompts = [prompts[i] for i in longest]
    return max(len(ids) for ids in encode_prompts(_tokenizer(path), prompts))


# --------------------------------------------------------------------------------------------------
# Rewards


def check_reward_spec(spec: Any, *, field: str = "reward", assets: Optional[str] = None) -> None:
    """A reward spec as ``tether.rewards.build_reward`` reads it, checked without loading a model or
    running user code (a ``module:function`` module is located, not imported)."""
    from .rewards import _NAMED, _check_is_reward_model, find_module
    from .trl_names import is_dotted_name

    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"--{field} is empty; pass 'vader', a reward-model folder (tether rm's final/), or 'module:function'"
        )
    spec = spec.strip()
    m = _NAMED.match(spec)
    if m and not Path(spec).exists():
        spec = m.group(2)
    if spec.lower() == "vader":
        return
    from .assets import resolve_model

    p = Path(resolve_model(spec, assets)).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists() and (p / "final" / "config.json").exists():
            p = p / "final"
        if not (p / "config.json").exists():
            raise UserError(
                f"--{field} {spec}: folder has no config.json; pass the final/ folder written by `tether rm`"
            )
        try:
            _check_is_reward_model(str(p))
        except ValueError as e:
            raise UserError(f"--{field} {spec}: {e}") from None
        return
    target, sep, attr = spec.rpartition(":")
    if not sep and is_dotted_name(spec):  # TRL's module.function (an existing folder of that name was taken above)
        target, sep, attr = spec.rpartition(".")
    if not sep:
        raise UserError(
            f"--{field} {spec!r} is not 'vader', an existing reward-model folder, 'module:function' or "
            "'module.function'; check the path (reward models are the final/ folder of `tether rm`)"
        )
    if not target or not attr:
        raise UserError(f"--{field} {spec!r} must look like 'module.path:function' or 'file.py:function'")
    if target.endswith(".py"):
        check_text_file(target, field=field)
        return
    if find_module(target) is None:
        raise UserError(
            f"--{field} {spec}: cannot find module {target!r} (in the working directory or on PYTHONPATH); put it "
            "there or use 'file.py:function'"
        )


def check_reward_list(value: Any, weights: Any, *, assets: Optional[str] = None) -> None:
    """The config's ``reward`` (one spec, a YAML list or a comma-separated list: ``rewards.reward_specs``; Python
    objects given to ``train_online`` pass) and ``reward_weights`` (one weight per reward)."""
    from .rewards import reward_specs, reward_weights_for

    specs = reward_specs(value)
    reward_weights_for(weights, len(specs))
    for spec in specs:
        if isinstance(spec, str):
            check_reward_spec(spec, assets=assets)


# --------------------------------------------------------------------------------------------------
# One preflight per command


def preflight_bon_reward(cfg) -> None:
    """A best-of-n run in a sweep: its reward spec (the sampling is checked by ``tether bon``'s own preflight)."""
    check_reward_spec(cfg.reward, field="reward", assets=cfg.assets)


def preflight_online(cfg, *, prompts=None, eval_prompts=None, reward=None, log_rewards=None) -> None:
    """ppo / grpo / rloo: config, prompts, rewards, models, context. ``prompts`` ... ``log_rewards``: what
    ``train_online`` was given in memory instead of the config's files and specs (read as it reads them)."""
    from .rewards import RewardSet
    from .trainers.online import _validate, derive_sizes, method_for

    check_train_config(cfg)
    _validate(cfg, method_for(cfg))
    derive_sizes(cfg, _world_size())
    check_beta(cfg)
    if cfg.eval_max_prompts is not None and cfg.eval_max_prompts < 1:
        raise UserError(
            f"eval_max_prompts={cfg.eval_max_prompts} must be >= 1; for no evaluation at all set "
            "--eval_every 0 --eval_final false"
        )
    _at_least(cfg, "eval_samples", 1)
    _at_least(cfg, "max_prompt_length", 1)
    from .generation import check_backend

    check_backend(cfg.backend, cfg.decoder)
    check_vllm_options(cfg)
    path, config = check_model(cfg.model, assets=cfg.assets)
    check_backend_model(getattr(cfg, "backend", "builtin"), config, sampling_settings(cfg), decoder=cfg.decoder)
    tok = _tokenizer(path)
    prompts = (
        _prompt_texts(prompts, tok, cfg)
        if prompts is not None
        else check_prompts_file(cfg.prompts, tokenizer=tok, cfg=cfg, lazy=True)
    )
    if not prompts:
        raise UserError("the prompt list is empty; pass at least one prompt")
    if eval_prompts is not None:
        eval_prompts = _prompt_texts(eval_prompts, tok, cfg, where="eval_prompts")
    else:
        eval_prompts = (
            check_prompts_file(cfg.eval_prompts, field="eval_prompts", tokenizer=tok, cfg=cfg)
            if cfg.eval_prompts
            else []
        )
    if not isinstance(reward, RewardSet):  # Python objects in place of specs: their number against the weights
        check_reward_list(cfg.reward if reward is None else reward, cfg.reward_weights, assets=cfg.assets)
    for spec in cfg.log_rewards if log_rewards is None else []:
        check_reward_spec(spec, field="log_rewards", assets=cfg.assets)
    if getattr(cfg, "ptx_dataset", None):
        check_dataset(cfg.ptx_dataset, field="ptx_dataset", assets=cfg.assets)
    if cfg.reference_model:
        check_model(cfg.reference_model, field="reference_model", assets=cfg.assets)
    if cfg.max_prompt_length is not None:
        check_context(
            config,
            need=cfg.max_prompt_length + cfg.max_new_tokens,
            fields=f"max_prompt_length ({cfg.max_prompt_length}) + max_new_tokens ({cfg.max_new_tokens})",
            spec=cfg.model,
        )
    else:
        longest = max(_longest_prompt(path, prompts), _longest_prompt(path, eval_prompts) if eval_prompts else 0)
        check_context(
            config,
            need=longest + cfg.max_new_tokens,
            fields=f"the longest prompt in --prompts ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens})",
            spec=cfg.model,
        )


def _prompt_texts(items, tok, cfg, where: str = "prompts") -> list[str]:
    """The texts of prompts given in memory, read as ``train_online`` reads them (``data.prompts.as_prompts``)."""
    from .data.prompts import as_prompts

    return [
        p.text
        for p in as_prompts(
            items, tokenizer=tok, chat_template=cfg.chat_template, prompt_field=cfg.prompt_field, where=where
        )
    ]


def preflight_dpo(cfg, *, rows=None, eval_rows=None) -> None:
    """dpo: config, loss options, β, data, models, context. ``rows`` / ``eval_rows``: preference rows
    ``train_dpo`` was given in memory (they replace the checks of ``dataset`` / ``eval_dataset``)."""
    from .trainers.dpo import check_config

    check_train_config(cfg)
    check_config(cfg)
    check_beta(cfg)
    _at_least(cfg, "max_length", 2)
    _at_least(cfg, "kl_prompts", 0)
    _at_least(cfg, "kl_samples", 1)
    _at_least(cfg, "kl_max_new_tokens", 1)
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise UserError(f"eval_fraction={cfg.eval_fraction} must lie in [0, 1); set --eval_fraction")
    if rows is None:
        check_dataset(cfg.dataset, field="dataset", assets=cfg.assets)
    if eval_rows is None:
        check_dataset(cfg.eval_dataset, field="eval_dataset", assets=cfg.assets, required=False)
    _, config = check_model(cfg.model, assets=cfg.assets)
    if cfg.reference_model:
        check_model(cfg.reference_model, field="reference_model", assets=cfg.assets)
    check_context(config, need=cfg.max_length, fields=f"max_length ({cfg.max_length})", spec=cfg.model)


def _check_data(cfg, rows, eval_rows) -> None:
    """The dataset files, or the in-memory rows that stand for them (a non-empty list of dicts)."""
    for field, given_rows in (("dataset", rows), ("eval_dataset", eval_rows)):
        if given_rows is None:
            check_dataset(getattr(cfg, field), field=field, assets=cfg.assets, required=field == "dataset")
        elif not given_rows and field == "dataset":
            raise UserError("train_dataset is empty; pass at least one row")
        elif any(not isinstance(r, dict) for r in given_rows):
            bad = next(i for i, r in enumerate(given_rows) if not isinstance(r, dict))
            raise UserError(f"{'train' if field == 'dataset' else 'eval'}_dataset: row {bad} is not a dict of columns")


def preflight_rm(cfg, *, rows=None, eval_rows=None) -> None:
    """``rows`` / ``eval_rows``: data the train function was given in memory (they replace the dataset checks)."""
    check_train_config(cfg)
    _at_least(cfg, "max_length", 2)
    _at_least(cfg, "limit", 1)
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise UserError(f"eval_fraction={cfg.eval_fraction} must lie in [0, 1); set --eval_fraction")
    _check_data(cfg, rows, eval_rows)
    _, config = check_model(cfg.model, assets=cfg.assets)
    check_context(config, need=cfg.max_length, fields=f"max_length ({cfg.max_length})", spec=cfg.model)


def preflight_sft(cfg, *, rows=None, eval_rows=None) -> None:
    """``rows`` / ``eval_rows``: data the train function was given in memory (they replace the dataset checks)."""
    check_train_config(cfg)
    _at_least(cfg, "max_length", 2)
    _at_least(cfg, "eval_examples", 0)
    _check_data(cfg, rows, eval_rows)
    _, config = check_model(cfg.model, assets=cfg.assets)
    check_context(config, need=cfg.max_length, fields=f"max_length ({cfg.max_length})", spec=cfg.model)


def check_backend_model(backend: str, config, sampling, *, decoder: str = "auto") -> None:
    """backend=vllm: the model's head size and the sampling filters (``tether.backends.vllm``), before
    any weights load; the built-in sampler: decoder=lean only on a Llama (``decode.supports`` then
    checks the loaded model itself)."""
    if decoder == "lean" and getattr(config, "model_type", None) != "llama":
        raise UserError(
            f"decoder=lean runs a plain Llama's decode step; this model is {getattr(config, 'model_type', '?')!r}: "
            "set --decoder auto or hf"
        )
    if backend != "vllm":
        return
    import torch

    from .backends.vllm import check_model as check_vllm_model
    from .backends.vllm import check_settings

    check_vllm_model(config, device="cuda" if torch.cuda.is_available() else "cpu")
    check_settings(sampling)


def check_vllm_options(cfg) -> None:
    """The sampling group's vLLM GPU settings: a memory fraction in (0, 1]; sleep mode with backend vllm on
    a CUDA GPU only."""
    import torch

    from .backends.vllm import check_gpu_options

    sleep = bool(getattr(cfg, "vllm_enable_sleep_mode", False))
    if sleep and getattr(cfg, "backend", "builtin") != "vllm":
        raise UserError("vllm_enable_sleep_mode applies to backend vllm only; drop it or set --backend vllm")
    check_gpu_options(
        getattr(cfg, "vllm_gpu_memory_utilization", 0.3),
        sleep and getattr(cfg, "backend", "") == "vllm",
        cuda=torch.cuda.is_available(),
    )


def preflight_sampling(
    cfg, *, model: str, model_field: str, prompts_path: Optional[str], batch_size: int, assets: Optional[str] = None
) -> tuple[str, list[str]]:
    """Shared by ``tether kl`` and ``tether bon``: the sampling group of ``cfg`` (``groups.sampling_settings``
    checks its ranges), prompts, model, context."""
    settings = sampling_settings(cfg)
    max_new_tokens = settings.max_new_tokens
    _at_least(SimpleNamespace(batch_size=batch_size), "batch_size", 1)
    from .generation import check_backend

    check_backend(getattr(cfg, "backend", "builtin"), getattr(cfg, "decoder", "auto"))
    check_vllm_options(cfg)
    check_chat_template(cfg)
    path, config = check_model(model, field=model_field, assets=assets)
    check_backend_model(getattr(cfg, "backend", "builtin"), config, settings, decoder=getattr(cfg, "decoder", "auto"))
    prompts = check_prompts_file(prompts_path, tokenizer=_tokenizer(path), cfg=cfg)
    longest = _longest_prompt(path, prompts)
    check_context(
        config,
        need=longest + max_new_tokens,
        model_field=model_field,
        spec=model,
        fields=f"the longest prompt in --prompts ({longest} tokens) + max_new_tokens ({max_new_tokens})",
    )
    return path, prompts
