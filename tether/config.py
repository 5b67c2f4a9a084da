"""Typed configs: dataclasses loadable from YAML and overridable from the command line.

``parse_config(Cls, argv)`` reads ``--config FILE.yaml`` (optional), then applies ``--field value``
overrides for any field of ``Cls``. The docstring written under each field is its ``--help`` text.
Unknown keys (in YAML or on the command line) are errors that name the key and list the fields.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import math
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml

from . import trl_names
from .errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the string literal written under it in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    if isinstance(nxt.value.value, str):
                        docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the field."""
    if value is None:
        return None
    base = _base_type(tp)
    if isinstance(value, str) and value.lower() in ("none", "null") and base is not str:
        return None
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # e.g. int | str: the first member that reads it,
        # str last: typing caches unions as sets, so Union[int, str] may come back as (str, int) when another
        # module spelled it Union[str, int] first, and str reads anything ("500" would stay a string)
        for member in sorted(typing.get_args(base), key=lambda m: m is str):
            if member is type(None):
                continue
            try:
                return coerce(name, member, value)
            except ValueError:
                pass
        names = " | ".join(getattr(m, "__name__", str(m)) for m in typing.get_args(base))
        raise UserError(f"config field {name!r}: cannot read {value!r} as {names}; give a value of that type")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if base is list or typing.get_origin(base) is list:
            if isinstance(value, str):
                parsed = (
                    yaml.safe_load(value)
                    if value.strip().startswith("[")
                    else [yaml.safe_load(v) for v in value.split(",") if v.strip()]
                )
                return list(parsed)
            return list(value)
    except (TypeError, ValueError):
        tname = getattr(base, "__name__", base)
        raise UserError(
            f"config field {name!r}: cannot read {value!r} as {tname}; give a value of type {tname}"
        ) from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    fields, pending = resolve_names(cls, data, source=source)
    data = finish_names(cls, fields, pending, source=source)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown}; {cls.__name__} has: {', '.join(sorted(names))}")
    hints = _hints(cls)
    return cls(**{k: coerce(k, hints[k], v) for k, v in data.items()})  # type: ignore[call-arg]


# --------------------------------------------------------------------------------------------------
# Config groups and the names a key may be written with (kebab-case, nested groups, TRL's names)


def config_group(name: str, *, prefixes: Sequence[str] = (), fields: Optional[Sequence[str]] = None):
    """Class decorator (above ``@dataclass``): the fields declared in this class body (or the listed
    ``fields``) form the config group ``name``. A YAML file may then give them as one nested mapping,
    ``name: {key: value}``, where ``key`` is the field's name or the name without one of ``prefixes``
    (``lora: {r: 8}`` for ``lora_r``); ``--help`` lists them under the group's heading."""

    def decorate(cls):
        own = dict(cls.__dict__.get("__tether_groups__", {}))
        own[name] = (tuple(prefixes), None if fields is None else tuple(fields))
        cls.__tether_groups__ = own
        return cls

    return decorate


def config_groups(cls: type) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """Group name -> (prefixes, its fields in ``cls``), bases' groups first. A field belongs to the
    group of the class that first declares it (a subclass changing its default keeps its group)."""
    owner: dict[str, str] = {}
    prefixes: dict[str, tuple[str, ...]] = {}
    for klass in reversed(cls.__mro__):
        declared = klass.__dict__.get("__tether_groups__", {})
        own_fields = list(klass.__dict__.get("__annotations__", {}))
        # groups that list their fields claim them before a group of "the rest of this class body"
        for gname, (pre, listed) in sorted(declared.items(), key=lambda item: item[1][1] is None):
            prefixes.setdefault(gname, pre)
            for f in listed if listed is not None else own_fields:
                owner.setdefault(f, gname)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return {g: (pre, [f for f in names if owner.get(f) == g]) for g, pre in prefixes.items()}


def _group_key(cls: type, group: str, key: str, *, source: str) -> str:
    """The field a key inside the nested mapping ``group: {key: ...}`` stands for."""
    pre, members = config_groups(cls)[group]
    refused = getattr(cls, "refused_fields", {})
    candidates = [key] + [f"{p}_{key}" for p in pre] + [f"{key}_{p}" for p in pre]
    for c in candidates:
        if c in members or c in refused:
            return c
    if key in trl_names.KNOWN:
        return key
    raise UserError(f"{source}: {group}.{key} is not in the {group} group; it has: {', '.join(members)}")


def _value_equal(tp: Any, name: str, a: Any, b: Any) -> bool:
    try:
        return coerce(name, tp, a) == coerce(name, tp, b)
    except ValueError:
        return a == b


def resolve_names(cls: type, data: dict, *, source: str = "config") -> tuple[dict, dict]:
    """One source's keys (a YAML mapping or the command line) -> (tether field -> value, pending TRL
    keys that depend on other fields). A key may be a field, a field in kebab-case, a nested group
    mapping, or a TRL name (``tether.trl_names``); TRL bookkeeping keys are ignored with one INFO
    line. Two keys that set the same field to different values are an error naming both."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    groups = config_groups(cls)
    refused = getattr(cls, "refused_fields", {})
    out: dict = {}
    said: dict[str, str] = {}
    pending: dict = {}
    ignored: list[str] = []
    unknown: list[str] = []

    def put(target: str, value: Any, written: str) -> None:
        if target in out and said[target] != written and not _value_equal(hints[target], target, out[target], value):
            raise UserError(
                f"{source}: {said[target]} ({out[target]!r}) and {written} ({value!r}) both set "
                f"{target}; keep one of them"
            )
        out[target] = value
        said.setdefault(target, written)

    def take(key: str, value: Any, written: str) -> None:
        if key in names and not trl_names.is_trl_value(key, value):
            put(key, value, written)
        elif key in refused:
            raise UserError(f"{source}: {written}: {refused[key]}")
        elif key in trl_names.DEFERRED:
            pending[key] = (value, written)
        else:
            pairs = trl_names.translate(key, value, names)
            if pairs is None:
                unknown.append(written)
            elif not pairs:
                ignored.append(written)
            for target, v in pairs or ():
                if target not in names:  # e.g. bf16 (-> dtype) given to tether kl, which loads in float32
                    raise UserError(
                        f"{source}: TRL field {written} sets {target}, which this command does not have; remove it"
                    )
                put(target, v, written)

    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in groups and isinstance(value, dict):
            for sub, v in value.items():
                take(_group_key(cls, k, str(sub).replace("-", "_"), source=source), v, f"{k}.{sub}")
        else:
            take(k, value, str(key))
    if unknown:
        raise UserError(
            f"{source}: unknown field(s) {unknown}; {cls.__name__} has: {', '.join(sorted(names))} "
            "(TRL's names are read too: docs/from-trl.md)"
        )
    if ignored:
        log.info("%s: TRL field(s) with no effect in tether, ignored: %s", source, ", ".join(ignored))
    if "per_device_train_batch_size" in pending and "batch_size" in out:
        global_batch = finish_names(cls, {k: v for k, v in out.items() if k != "batch_size"}, pending, source=source)[
            "batch_size"
        ]
        if not _value_equal(int, "batch_size", out["batch_size"], global_batch):
            raise UserError(
                f"{source}: {said['batch_size']} ({out['batch_size']!r}) and "
                f"per_device_train_batch_size x grad_accum x processes ({global_batch}) disagree; "
                "keep one of them (tether's batch_size is the global batch per optimiser step)"
            )
    return out, pending


def finish_names(cls: type, fields: dict, pending: dict, *, source: str = "config") -> dict:
    """Fields with the pending TRL keys applied: per_device_train_batch_size -> batch_size (tether's is
    global: per-device x grad_accum x WORLD_SIZE processes), use_peft -> lora_r (16 unless given),
    warmup_ratio -> warmup_steps = ceil(ratio x max_steps), eval_strategy "no" -> eval_every 0 and
    eval_final false (no evaluation; TRL then ignores eval_steps too)."""
    fields = dict(fields)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in ("eval_strategy", "evaluation_strategy"):
        if key in pending:
            value, written = pending[key]
            strategy = str(value).strip().lower()
            if strategy == "no":
                for field, v in (("eval_every", 0), ("eval_final", False)):
                    if field in defaults:
                        fields[field] = v
                log.info("%s: %s: no -> no evaluation (eval_every 0, eval_final false)", source, written)
            elif strategy != "steps":
                raise UserError(
                    f"{source}: {written}: {value!r} is not supported; tether evaluates every eval_steps steps "
                    '("steps") or not at all ("no")'
                )
    if "per_device_train_batch_size" in pending:
        value, written = pending["per_device_train_batch_size"]
        per = coerce(written, int, value)
        accum = coerce("grad_accum", int, fields.get("grad_accum", defaults.get("grad_accum", 1)))
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        fields["batch_size"] = per * accum * world
        log.info(
            "%s: batch_size = per_device_train_batch_size %d x grad_accum %d x %d process(es) = %d",
            source,
            per,
            accum,
            world,
            fields["batch_size"],
        )
    if "use_peft" in pending:
        value, written = pending["use_peft"]
        if coerce(written, bool, value):
            r = coerce("lora_r", int, fields.get("lora_r", 16))
            if r <= 0:
                raise UserError(
                    f"{source}: use_peft: true and lora_r: {r} disagree; give lora_r > 0 (or drop use_peft)"
                )
            fields["lora_r"] = r
        else:
            if coerce("lora_r", int, fields.get("lora_r", 0)):
                log.info("%s: use_peft: false, so lora_r is ignored (full fine-tuning)", source)
            fields["lora_r"] = 0
    if "warmup_ratio" in pending:
        value, written = pending["warmup_ratio"]
        ratio = coerce(written, float, value)
        if ratio:
            if fields.get("epochs") is not None:
                raise UserError(
                    f"{source}: warmup_ratio with num_train_epochs: the number of steps is known only once "
                    "the data is read; give warmup_steps instead"
                )
            steps = coerce("max_steps", int, fields.get("max_steps", defaults.get("max_steps", 0)))
            warm = math.ceil(ratio * steps)  # transformers' TrainingArguments.get_warmup_steps
            if "warmup_steps" in fields and coerce("warmup_steps", int, fields["warmup_steps"]) not in (0, warm):
                raise UserError(
                    f"{source}: warmup_steps ({fields['warmup_steps']}) and warmup_ratio ({value}) x "
                    f"max_steps ({steps}) = {warm} disagree; keep one of them"
                )
            fields["warmup_steps"] = warm
    return fields


def _kebab_to_snake(argv: Sequence[str], known: set[str]) -> list[str]:
    """``--output-dir X`` / ``--output-dir=X`` -> ``--output_dir ...`` for every option the parser has."""
    out = []
    for token in argv:
        if token.startswith("--") and "-" in token[2:].split("=", 1)[0]:
            name, eq, rest = token[2:].partition("=")
            snake = "--" + name.replace("-", "_")
            if snake in known:
                token = snake + eq + rest
        out.append(token)
    return out


HELP_ORDER = ("training", "data", "lora", "beta", "sampling", "reference")
"""The order of the group headings in ``--help`` (then any other group, then the command's own fields)."""

ALIAS_DEST = "alias:"
"""argparse dest prefix of the hidden flags that carry TRL names and refused fields."""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml_config(path: str | Path) -> dict:
    """The mapping in a ``--config`` YAML file; a missing, unreadable or malformed file is a UserError
    naming the file (and the line of a YAML syntax error)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"--config {path}: {'is a folder' if p.is_dir() else 'no such file'}; pass a YAML file of field: value"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"--config {path}: line {line} is not UTF-8 text; save the file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"--config {path}:{where}: not valid YAML ({problem}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"--config {path}: a config file must be a YAML mapping of field: value, got a {type(data).__name__}"
        )
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a YAML mapping of field: value")
    return from_dict(cls, data, source=str(path))


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def check_finite(cfg: Any) -> None:
    """Refuse NaN and ±inf in every float field of a config (and in lists of numbers): a non-finite β
    or learning rate trains NaN weights that look like a finished run. None stays the way to say
    "off" for the optional fields."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                kind = "a list of finite numbers" if isinstance(value, (list, tuple)) else "a finite number"
                raise UserError(
                    f"config field {f.name!r} is {v!r}; it must be {kind} "
                    f"(set --{f.name} to a real value{', or null for off' if _optional(hints[f.name]) else ''})"
                )


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors in tether's one-line form: ``PROG: error: MESSAGE (PROG --help lists the
    flags)``, exit 2, without the usage block that buries the line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


def build_parser(
    cls: type, *, prog: str, description: str = "", extra: Sequence[tuple] = (), raw_description: bool = False
) -> argparse.ArgumentParser:
    """The command line of config ``cls``: one flag per field under its group's heading, bare booleans,
    hidden flags for TRL's names and refused fields; ``raw_description`` keeps the description's
    paragraphs as written."""
    docs = field_docs(cls)
    parser = ArgumentParser(
        prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )  # --lr must not silently mean --lr_schedule
    # A value that looks like a negative number (-1, -1e-3, -.5, -inf, -nan) is a value, not a flag;
    # argparse's own matcher knows only -1 and -1.5, so ``--learning_rate -1e-3`` failed.
    parser._negative_number_matcher = NEGATIVE_NUMBER
    if raw_description:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", help="YAML file of field: value; command-line flags override it")
    for args, kwargs in extra:
        parser.add_argument(*args, **kwargs)
    hints = _hints(cls)
    groups = config_groups(cls)
    owner = {f: g for g, (_, members) in groups.items() for f in members}
    sections: dict[str, Any] = {}
    for g in sorted(groups, key=lambda g: HELP_ORDER.index(g) if g in HELP_ORDER else len(HELP_ORDER)):
        if groups[g][1]:
            sections[f"{g} group"] = parser.add_argument_group(f"{g} group")
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help: "10% per step" broke --help
        title = f"{owner[f.name]} group" if f.name in owner else f"{prog} options"
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        kind = (
            {"nargs": "?", "const": "true", "metavar": "BOOL"}
            if _base_type(hints[f.name]) is bool
            else {"metavar": "V"}
        )
        sections[title].add_argument(f"--{f.name}", dest=f.name, help=f"{help_text} (default: {default!r})", **kind)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in sorted((trl_names.KNOWN | set(getattr(cls, "refused_fields", {}))) - names):
        kind = {"nargs": "?", "const": "true"} if name in trl_names.BOOLEAN else {}
        parser.add_argument(f"--{name}", dest=ALIAS_DEST + name, help=argparse.SUPPRESS, **kind)
    parser.epilog = (
        "Flags may be written --snake_case or --kebab-case; a bare boolean flag means true. "
        "TRL's field names (model_name_or_path, per_device_train_batch_size, ...) are read as "
        "aliases, in YAML and here: docs/from-trl.md. YAML may nest a group: lora: {r: 8}. "
        "Exit codes: 0 done; 2 bad input, output_dir in use by another run, or a failing write (full "
        "disk); 75 stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (continue with "
        "--resume); 1 a bug (docs/reliability.md)."
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` with ``--kebab-case`` flags read as their ``--snake_case`` names."""
    return parser.parse_args(_kebab_to_snake(list(argv), set(parser._option_string_actions)))


def flag_values(cls: type, ns: argparse.Namespace) -> dict:
    """The config keys given on the command line (fields, TRL names, refused fields), for ``resolve_names``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {
        (k[len(ALIAS_DEST) :] if k.startswith(ALIAS_DEST) else k): v
        for k, v in vars(ns).items()
        if k in names or k.startswith(ALIAS_DEST)
    }


def parse_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    *,
    prog: str = "tether",
    description: str = "",
    extra: Sequence[tuple] = (),
    raw_description: bool = False,
) -> tuple[T, argparse.Namespace]:
    """YAML (``--config``) then command-line overrides -> a ``cls`` instance, plus the parsed namespace
    (for ``extra`` arguments that are not config fields, such as ``--resume``)."""
    parser = build_parser(cls, prog=prog, description=description, extra=extra, raw_description=raw_description)
    ns = parse_args(parser, list(sys.argv[1:] if argv is None else argv))
    flags = flag_values(cls, ns)
    try:
        data, pending = {}, {}
        if getattr(ns, "config", None):
            data, pending = resolve_names(cls, read_yaml_config(ns.config), source=ns.config)
        cli, cli_pending = resolve_names(cls, flags, source="command line")
        if "batch_size" in cli:  # the command line overrides the file, TRL's names included
            pending.pop("per_device_train_batch_size", None)
        if "per_device_train_batch_size" in cli_pending:
            data.pop("batch_size", None)
        if "warmup_steps" in cli:
            pending.pop("warmup_ratio", None)
        data, pending = {**data, **cli}, {**pending, **cli_pending}
        data = finish_names(cls, data, pending, source=getattr(ns, "config", None) or "command line")
        cfg = from_dict(cls, data, source=getattr(ns, "config", None) or "command line")
        check_finite(cfg)
    except (ValueError, TypeError) as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")  # one line, without the usage block
    return cfg, ns
