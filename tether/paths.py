"""The file and folder paths a config names, made absolute where they exist, so a run's recorded
config (``config.yaml``, ``run.json``) means the same files from any working directory: ``--resume``
from elsewhere finds them, and the same file given by its absolute path is the same run.

A value is a path when it (or, for a ``file.py:function`` spec, the part before the colon) names a
file or folder that exists relative to ``base``; hub ids, asset names (``stories260K``), ``vader``,
inline Jinja templates and dotted ``module.function`` names are left as they are. Comma-separated
lists (``dataset: a.jsonl,b.jsonl``) and YAML lists are resolved element by element.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

PATH_FIELDS = (
    "model",
    "reference_model",
    "reward_model",
    "dataset",
    "eval_dataset",
    "prompts",
    "eval_prompts",
    "ptx_dataset",
    "forgetting_text",
    "chat_template",
    "reference_prompt",
    "reward",
    "log_rewards",
)
"""Config fields whose values may name files or folders."""
ALWAYS_PATHS = ("ref_cache_dir",)
"""Config fields that are always folders (made by the run if missing)."""


def absolute_path(value: str, base: Path) -> str:
    """``value`` with its path part absolute if that part exists relative to ``base`` (see the module)."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or "\n" in value or "{" in value:
        return value
    if "," in value:
        return ",".join(absolute_path(part, base) for part in value.split(","))
    head, sep, tail = value.rpartition(":")
    if sep and head.endswith(".py") and (base / head).is_file():  # file.py:function
        return f"{(base / head).resolve()}:{tail}"
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def with_absolute_paths(cfg, base: Optional[Path] = None):
    """A copy of the config dataclass ``cfg`` with ``PATH_FIELDS`` resolved against ``base`` (default:
    the working directory) and ``ALWAYS_PATHS`` made absolute."""
    base = Path.cwd() if base is None else Path(base)
    changes = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in PATH_FIELDS:
            new = [absolute_path(x, base) for x in v] if isinstance(v, (list, tuple)) else absolute_path(v, base)
        elif f.name in ALWAYS_PATHS and isinstance(v, str) and v:
            new = str((base / v).resolve())
        else:
            continue
        if new != v:
            changes[f.name] = type(v)(new) if isinstance(v, tuple) else new
    return dataclasses.replace(cfg, **changes) if changes else cfg
