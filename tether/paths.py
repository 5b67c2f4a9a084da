"""The file and folder paths in a config, read relative to a folder: one resolver for the two places
that need it.

- A run's recorded config (``config.yaml``, ``run.json``: ``runs.RunDir``) holds absolute paths, so
  ``--resume`` from another working directory finds the files, and the same file given by a relative or
  an absolute path is the same run (``with_absolute_paths``, against the working directory).
- A sweep file's paths are read relative to the file that states them (``tether.sweep.spec``).

A value is a path when it (or, for ``file.py:function``, the part before the last colon; for a named
reward ``NAME=spec``, the spec) names a file or folder that exists relative to the folder; comma-separated
lists and YAML lists are read item by item. Hub ids, asset names (``stories260K``), ``vader``, inline
Jinja templates and dotted ``module.function`` names do not exist as files and stay as written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

PATH_FIELDS = frozenset(
    {
        "model",
        "reference_model",
        "assets",
        "dataset",
        "eval_dataset",
        "prompts",
        "eval_prompts",
        "chat_template",
        "reward",
        "log_rewards",
        "reference_prompt",
        "forgetting_text",
        "ptx_dataset",
        "ref_cache_dir",
        "gold",
    }
)
"""Config fields whose values may name files or folders (alone, as ``file.py:function``, as
``NAME=spec``, or in a comma-separated or YAML list)."""
ALWAYS_PATHS = ("ref_cache_dir",)
"""Config fields that are always folders (made by the run if missing): made absolute whether they exist or not."""


def _existing(path: str, folder: Path) -> Optional[str]:
    """``folder/path`` as an absolute path if it exists and ``path`` is relative, else None."""
    if not path or os.path.isabs(path) or path.startswith("~"):
        return None
    try:
        cand = folder / path
        return os.path.abspath(cand) if cand.exists() else None
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a path
        return None


def absolute_path(spec: str, folder: Path) -> str:
    """One path-like value read relative to ``folder``: the whole value if it names an existing file or
    folder there; else ``NAME=spec`` (a named reward) or ``file.py:function`` with the part before the last
    ':' resolved; else a comma-separated list with each item resolved. Anything else is returned as written."""
    folder = Path(folder)
    whole = _existing(spec, folder)
    if whole is not None:
        return whole
    name, eq, rest = spec.partition("=")
    if eq and name.strip().isidentifier() and rest:
        return name + eq + absolute_path(rest, folder)
    target, colon, attr = spec.rpartition(":")
    if colon and target and "," not in spec:
        found = _existing(target, folder)
        return f"{found}:{attr}" if found is not None else spec
    if "," in spec:
        items = spec.split(",")
        done = [absolute_path(x, folder) for x in items]
        return ",".join(done) if done != items else spec
    return spec


def resolve_value(value, folder: str | Path):
    """A config value with every relative path in it read from ``folder`` (strings, lists and mappings of
    them; see ``absolute_path``). Other values are returned unchanged."""
    folder = Path(folder)
    if isinstance(value, str):
        return absolute_path(value, folder)
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_value(v, folder) for v in value)
    if isinstance(value, dict):
        return {k: resolve_value(v, folder) for k, v in value.items()}
    return value


def with_absolute_paths(cfg, base: Optional[Path] = None):
    """A copy of the config dataclass ``cfg`` with ``PATH_FIELDS`` resolved against ``base`` (default:
    the working directory) and ``ALWAYS_PATHS`` made absolute."""
    base = Path.cwd() if base is None else Path(base)
    changes = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ALWAYS_PATHS and isinstance(v, str) and v:
            new = os.path.abspath(base / v)
        elif f.name in PATH_FIELDS:
            new = resolve_value(v, base)
        else:
            continue
        if new != v:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg
