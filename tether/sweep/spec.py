"""The SWEEP.yaml of ``tether sweep`` and its expansion into runs.

A sweep is one trainer config (``base``) and the settings to vary: ``grid`` (field: [values], their
product) or ``runs`` (a list of overrides), each run evaluated with ``eval`` (one protocol for all:
same held-out prompts, same sampling seed, same rewards). Field names go through ``tether.config``
so TRL's names and nested groups work in ``base``, ``grid`` and ``runs`` alike.

Paths are read relative to the file that states them: the sweep file's folder for ``base``, ``grid``,
``runs`` and ``eval``, the trainer YAML's folder for the fields of ``base: {from: FILE}`` (``resolve_paths``).
A value that is no existing path there (a hub id, ``vader``, an asset name such as ``stories260K``, an
absolute path, a path that exists only from the working folder) is left as written.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import trl_names
from ..config import _group_key, check_finite, config_groups, finish_names, from_dict, read_yaml_config, resolve_names
from ..errors import UserError
from ..paths import PATH_FIELDS, resolve_value
from ..registry import method_spec, sweep_names


def trainer_class(method: str) -> type:
    """The config dataclass of a sweep method (``tether.registry``: every method with ``sweep=True``)."""
    return method_spec(method, field="sweep field 'method'", sweep=True).load("config")


@dataclass
class EvalSpec:
    """How every run of the sweep is evaluated (the same for all of them)."""

    prompts: str = ""
    """Held-out prompts (same formats as the trainers' prompts: text, .jsonl, .json, .parquet, a datasets folder)."""
    prompt_field: str = "prompt"
    """Column holding the prompt in table rows."""
    gold: Optional[str] = None
    """Gold reward spec (vader, a reward-model folder, module:function). None: the proxy stands in, and the report
    says so."""
    proxy: Optional[str] = None
    """Proxy reward spec; default: the reward the run optimises (online methods, best-of-n). DPO has none unless
    given."""
    rewards: dict = field(default_factory=dict)
    """Other rewards to log, name: spec (columns reward_<name> in frontier.csv)."""
    samples_per_prompt: int = 1
    """Completions per prompt per evaluation point."""
    max_prompts: int = 64
    """At most this many held-out prompts."""
    max_new_tokens: int = 32
    """Completion length of evaluation samples."""
    eval_every: int = 10
    """Evaluate every N optimiser steps (and at step 0 and the end)."""
    seed: int = 0
    """The evaluation sampling seed, shared by every run (engine.eval_seed(seed))."""
    kl_budgets: list = field(default_factory=list)
    """KL budgets (nats) for the report's 'best setting within a budget' table; default: from the final KLs."""


@dataclass
class SweepConfig:
    """A parsed SWEEP.yaml."""

    method: str = ""
    """A method of tether.registry that sweeps: dpo, ppo, grpo, rloo, bon (or a registered one)."""
    base: dict = field(default_factory=dict)
    """The trainer config shared by every run: a mapping, a path to a trainer YAML, or {from: PATH, field: value...}."""
    grid: dict = field(default_factory=dict)
    """field: [values]; the runs are their product."""
    runs: list = field(default_factory=list)
    """A list of overrides, one run each (instead of, or on top of, grid)."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """The evaluation protocol."""
    output_dir: str = "runs/sweep"
    """Where every run and the report go."""
    workers: int = 0
    """Parallel run processes (0: one per core, at most the number of runs)."""
    folder: str = ""
    """The sweep file's folder (set by ``load_sweep``, not written in the file): relative paths in ``grid`` and
    ``runs`` are read from it."""


FILE_ONLY = {"folder"}
"""SweepConfig fields that are not sweep-file keys."""

EVAL_PATH_FIELDS = ("prompts", "gold", "proxy", "rewards")
"""The same for the sweep's ``eval`` mapping."""


@dataclass
class RunSpec:
    name: str
    method: str
    overrides: dict
    config: dict  # the resolved trainer config fields (base + overrides)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_name(method: str, overrides: dict) -> str:
    parts = [f"{k}{_num(v)}" for k, v in overrides.items()]
    name = "-".join([method] + parts)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)[:120]


def resolve_paths(cls: type, data: dict, folder: str | Path) -> dict:
    """One source's trainer-config mapping with its path fields (``PATH_FIELDS``) read relative to
    ``folder``: the folder of the file the mapping was written in. Keys may be tether names (kebab-case
    too), TRL names (``model_name_or_path``, ``reward_funcs``, ...) or nested groups; a key that is none of
    these is passed through (the config check names it afterwards)."""
    names = {f.name for f in dataclasses.fields(cls)}
    groups = config_groups(cls)

    def targets(key: str, value) -> set:
        if key in names:
            return {key}
        try:
            return {t for t, _ in trl_names.translate(key, value, names) or ()}
        except UserError:
            return set()

    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in groups and isinstance(value, dict):
            sub_out = {}
            for sub, v in value.items():
                try:
                    field = _group_key(cls, k, str(sub).replace("-", "_"), source="sweep")
                except UserError:
                    field = ""
                sub_out[sub] = resolve_value(v, folder) if field in PATH_FIELDS else v
            out[key] = sub_out
        else:
            out[key] = resolve_value(value, folder) if targets(k, value) & PATH_FIELDS else value
    return out


def _base_file(base: str, sweep_path: str | Path, cls: type) -> dict:
    """A trainer YAML named by the sweep: relative to the sweep file's folder, else to the working folder;
    its relative paths are read from its own folder."""
    bpath = Path(base) if Path(base).is_absolute() else Path(sweep_path).parent / base
    bpath = bpath if bpath.exists() else Path(base)
    return resolve_paths(cls, read_yaml_config(bpath), bpath.parent)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check SWEEP.yaml; every run's trainer config is built here, so a bad field ends as a
    one-line UserError before any process starts."""
    data = read_yaml_config(path)
    src = f"--config {path}"
    known = {f.name for f in dataclasses.fields(SweepConfig)} - FILE_ONLY
    extra = sorted(set(data) - known)
    if extra:
        raise UserError(f"{src}: unknown sweep field(s) {extra}; a sweep has {sorted(known)}")
    method = str(data.get("method", "")).strip()
    if not method:
        raise UserError(f"{src}: field 'method' is missing; set it to one of {', '.join(sweep_names())}")
    cls = trainer_class(method)  # refuses an unknown method
    folder = Path(path).parent
    base = data.get("base") or {}
    if (
        isinstance(base, dict) and "from" in base
    ):  # base: {from: trainer.yaml, max_steps: 20}: the file, then these fields
        rest = resolve_paths(cls, {k: v for k, v in base.items() if k != "from"}, folder)
        base = {**_base_file(str(base["from"]), path, cls), **rest}
    elif isinstance(base, str):
        base = _base_file(base, path, cls)
    elif isinstance(base, dict):
        base = resolve_paths(cls, base, folder)
    if not isinstance(base, dict):
        raise UserError(f"{src}: field 'base' must be a trainer config mapping or a path to a trainer YAML")
    grid, runs = data.get("grid") or {}, data.get("runs") or []
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(
            f"{src}: field 'grid' must map each field to a non-empty list of values, e.g. grid: {{beta: [0.1, 1.0]}}"
        )
    if not isinstance(runs, list) or any(not isinstance(r, dict) for r in runs):
        raise UserError(f"{src}: field 'runs' must be a list of mappings (the overrides of each run)")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict):
        raise UserError(f"{src}: field 'eval' must be a mapping (prompts, gold, samples_per_prompt, ...)")
    ev = {k: resolve_value(v, folder) if k in EVAL_PATH_FIELDS else v for k, v in ev.items()}
    try:
        espec = from_dict(EvalSpec, ev, source=f"{src} eval")
    except (TypeError, ValueError) as e:
        raise UserError(f"{src}: eval: {e}") from None
    if not espec.prompts:
        raise UserError(f"{src}: eval.prompts is missing; give a file of held-out prompts (one per line or JSONL)")
    for name in ("samples_per_prompt", "max_prompts", "max_new_tokens", "eval_every"):
        if getattr(espec, name) < 1:
            raise UserError(f"{src}: eval.{name} is {getattr(espec, name)}; it must be at least 1")
    cfg = SweepConfig(
        method=method,
        base=base,
        grid=grid,
        runs=runs,
        eval=espec,
        output_dir=str(data.get("output_dir", SweepConfig.output_dir)),
        workers=int(data.get("workers", 0)),
        folder=str(folder),
    )
    expand(cfg, source=src)  # checks every run's config
    return cfg


def expand(cfg: SweepConfig, *, source: str = "sweep") -> list[RunSpec]:
    """The runs: the grid's product (in the order written), then the listed runs."""
    keys = list(cfg.grid)
    overrides = [dict(zip(keys, vals)) for vals in itertools.product(*(cfg.grid[k] for k in keys))] if keys else []
    overrides += [dict(r) for r in cfg.runs]
    if not overrides:
        overrides = [{}]
    cls = trainer_class(cfg.method)
    folder = Path(cfg.folder or ".")
    out, seen = [], set()
    for ov in overrides:
        name = str(ov.pop("name", "")) or run_name(cfg.method, ov)
        if name in seen:
            raise UserError(f"{source}: two runs are both named {name!r}; give the runs distinct settings or a 'name'")
        seen.add(name)
        try:
            data = {**cfg.base, **resolve_paths(cls, ov, folder)}  # the run's name keeps the paths as written
            if cfg.method == "bon" and not isinstance(data.get("n", []), list):
                data["n"] = [data["n"]]  # a best-of-n run has one n
            fields, pending = resolve_names(cls, data, source=f"{source} run {name}")
            fields = finish_names(cls, fields, pending, source=f"{source} run {name}")
            tcfg = from_dict(cls, fields, source=f"{source} run {name}")
            check_finite(tcfg)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: run {name}: {e}") from None
        if cfg.method == "bon" and len(tcfg.n) != 1:
            raise UserError(
                f"{source}: run {name}: a best-of-n run takes one n; sweep n in the grid (grid: {{n: [2, 4, 8]}})"
            )
        out.append(RunSpec(name, cfg.method, ov, dataclasses.asdict(tcfg)))
    return out
