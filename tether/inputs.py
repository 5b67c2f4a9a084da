"""What a Python caller may hand a trainer instead of paths, as in TRL: a loaded model (a
``PreTrainedModel``, or a peft model wrapping one), its tokenizer, a peft ``LoraConfig``, and datasets
(``datasets.Dataset``, ``DatasetDict``, or lists of dicts / strings).

A train function given objects (``train_grpo(cfg, model=model, tokenizer=tok)``) holds them in
``Given`` for the length of the call; the pieces that would otherwise read ``cfg.model`` (the preflight's
model check, ``training.load_policy``, the reference, the critic, the forgetting probe) ask ``given()``
first. The config records the model's ``name_or_path`` (``config.yaml`` stays readable). A run started
from an object resumes in Python with the same object passed again (``resume=True``); from the command
line it resumes when ``name_or_path`` is the model's folder or hub id.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import UserError


@dataclass(frozen=True)
class Given:
    """The objects of one train call (None: read the config's path)."""

    model: Optional[torch.nn.Module] = None
    tokenizer: Any = None
    peft_config: Any = None


_GIVEN: ContextVar[Given] = ContextVar("tether_given", default=Given())


def given() -> Given:
    """The objects the running train call was handed (all None outside one, or for a CLI run)."""
    return _GIVEN.get()


def model_name(model: torch.nn.Module) -> str:
    """What the config records for a model object: its ``name_or_path`` (the folder or hub id it was
    loaded from; a peft model's base), else its class name."""
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        name = getattr(m, "name_or_path", None) or getattr(getattr(m, "config", None), "_name_or_path", None)
        if name:
            return str(name)
    return f"<{type(model).__name__} object>"


@contextmanager
def giving(*, model=None, tokenizer=None, peft_config=None):
    """Hold ``model`` (an ``nn.Module``), ``tokenizer`` and ``peft_config`` for the train call inside."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise UserError(
            f"model: pass a model folder, hub id or asset name (str), or a loaded model (torch.nn.Module), not "
            f"{type(model).__name__}"
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise UserError(
            f"tokenizer (processing_class): pass a transformers tokenizer, not {type(tokenizer).__name__}; a "
            "multimodal processor is not supported"
        )
    if peft_config is not None and model is not None and hasattr(model, "peft_config"):
        raise UserError("peft_config: the model is a peft model already; pass the base model, or no peft_config")
    token = _GIVEN.set(Given(model=model, tokenizer=tokenizer, peft_config=peft_config))
    try:
        yield
    finally:
        _GIVEN.reset(token)


def accepts_objects(train: Callable) -> Callable:
    """Decorator of a train function: the keyword arguments ``model`` (a path str, or a loaded model),
    ``tokenizer`` and ``peft_config`` (a peft ``LoraConfig``, replacing the config's lora_* fields) are
    taken here. A str model replaces ``cfg.model``; an object is recorded by ``model_name`` and held
    in ``given()`` while ``train`` runs."""

    @functools.wraps(train)
    def wrapper(cfg, *args, model=None, tokenizer=None, peft_config=None, **kwargs):
        if isinstance(model, (str, Path)):
            cfg, model = dataclasses.replace(cfg, model=str(model)), None
        if model is not None:
            cfg = dataclasses.replace(cfg, model=model_name(model))
        if peft_config is not None:
            if getattr(cfg, "lora_r", 0):
                raise UserError(
                    "peft_config and lora_r > 0 both ask for LoRA adapters; pass one of them (lora_r=0 with "
                    "peft_config)"
                )
            if not hasattr(peft_config, "r"):
                raise UserError(f"peft_config: pass a peft LoraConfig, not {type(peft_config).__name__}")
        if model is None and tokenizer is None and peft_config is None:
            return train(cfg, *args, **kwargs)
        with giving(model=model, tokenizer=tokenizer, peft_config=peft_config):
            return train(cfg, *args, **kwargs)

    return wrapper


def given_tokenizer(*, padding_side: str = "left"):
    """The tokenizer for a given model: the one passed, else the one saved at its ``name_or_path``."""
    from .modeling import load_tokenizer, prepare_tokenizer

    g = given()
    if g.tokenizer is not None:
        return prepare_tokenizer(g.tokenizer, padding_side=padding_side)

    name = model_name(g.model)
    try:
        return load_tokenizer(name, padding_side=padding_side)
    except (OSError, ValueError) as e:
        raise UserError(
            f"no tokenizer for the model object (none found at its name_or_path {name!r}); pass tokenizer= "
            "(TRL: processing_class=)"
        ) from e


def starting_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen plain copy of a model object's starting weights (a peft model's adapters merged in):
    the reference, the critic's backbone or the forgetting probe's baseline of a run given an object."""
    frozen = copy.deepcopy(model)
    if hasattr(frozen, "merge_and_unload"):
        frozen = frozen.merge_and_unload()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.eval()


# --------------------------------------------------------------------------------------------------
# Datasets


def is_dataset_dict(data) -> bool:
    return type(data).__name__ in ("DatasetDict", "IterableDatasetDict")


def split_of(data, *, names=("train",), where: str = "train_dataset"):
    """The split ``names`` (first present) of a ``DatasetDict``, else ``data`` itself."""
    if not is_dataset_dict(data):
        return data
    for n in names:
        if n in data:
            return data[n]
    raise UserError(f"{where}: the DatasetDict has splits {sorted(data)}; it needs a {names[0]!r} split")


def eval_split(data) -> Optional[Any]:
    """A ``DatasetDict``'s held-out split (``test``, else ``validation``), or None."""
    if is_dataset_dict(data):
        for n in ("test", "validation"):
            if n in data:
                return data[n]
    return None


def as_rows(data, *, where: str) -> Optional[list]:
    """Rows of ``data`` as Python values: a ``datasets.Dataset`` (or a ``DatasetDict``'s train split),
    a list of dicts, or a list of strings (prompts). None stays None."""
    if data is None:
        return None
    data = split_of(data, where=where)
    if isinstance(data, (str, Path)):
        raise UserError(f"{where}: a file or dataset name goes in the config (dataset / prompts), not here")
    try:
        rows = list(data)
    except TypeError as e:
        raise UserError(
            f"{where}: pass a datasets.Dataset, a DatasetDict or a list of rows, not {type(data).__name__}"
        ) from e
    return rows


def datasets_as_rows(train_dataset, eval_dataset, rows, eval_rows, *, names: str) -> tuple[Any, Any]:
    """(rows, eval_rows) of a train function that takes both forms: ``train_dataset`` / ``eval_dataset``
    read by ``as_rows`` (no eval_dataset: a ``DatasetDict``'s test/validation split, if any), or, when
    neither is given, the ``rows`` / ``eval_rows`` it was passed under its own ``names``."""
    if train_dataset is None and eval_dataset is None:
        return rows, eval_rows
    if rows is not None or eval_rows is not None:
        raise UserError(f"pass train_dataset / eval_dataset or {names}, not both")
    held = eval_dataset if eval_dataset is not None else eval_split(train_dataset)
    return as_rows(train_dataset, where="train_dataset"), as_rows(held, where="eval_dataset")


def write_rows(path: Path, rows: Sequence[dict], *, where: str) -> str:
    """``rows`` (dicts) as JSONL at ``path`` (the run's copy of in-memory data: the saved config points at
    it, so the run resumes from the command line). Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise UserError(f"{where}: row {i} is a {type(r).__name__}; every row must be a dict of columns")
            f.write(json.dumps(r, default=_jsonable) + "\n")
    return str(path)


def _jsonable(v):
    if hasattr(v, "tolist"):  # numpy / torch values from a dataset
        return v.tolist()
    raise TypeError(f"a {type(v).__name__} cell cannot be written as JSON")


def in_memory_data(cfg, train_dataset, eval_dataset) -> tuple[Any, Optional[list], Optional[list]]:
    """(cfg, rows, eval_rows) for a trainer that reads its data from ``cfg.dataset`` files (sft, rm):
    rows given in memory go to OUTPUT_DIR/dataset.jsonl and eval_dataset.jsonl, which the returned
    config names (the files are written by ``write_in_memory_data`` once the run's checks pass)."""
    rows, eval_rows = datasets_as_rows(train_dataset, eval_dataset, None, None, names="rows")
    out = Path(cfg.output_dir)
    if rows is not None:
        cfg = dataclasses.replace(cfg, dataset=str(out / "dataset.jsonl"))
    if eval_rows is not None:
        cfg = dataclasses.replace(cfg, eval_dataset=str(out / "eval_dataset.jsonl"))
    return cfg, rows, eval_rows


def write_in_memory_data(cfg, rows: Optional[list], eval_rows: Optional[list], dist) -> None:
    """Write what ``in_memory_data`` named (the main process; the others wait for the files), so the
    run reads them as any dataset file and resumes from the command line."""
    if rows is None and eval_rows is None:
        return
    if dist.is_main:
        if rows is not None:
            write_rows(Path(cfg.dataset), rows, where="train_dataset")
        if eval_rows is not None:
            write_rows(Path(cfg.eval_dataset), eval_rows, where="eval_dataset")
    dist.barrier()
