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
import math
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


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
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # e.g. int | str: the first member that reads it
        for member in typing.get_args(base):
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
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [
                    yaml.safe_load(v) for v in value.split(",") if v.strip()
                ]
                return list(parsed)
            return list(value)
    except (TypeError, ValueError):
        tname = getattr(base, '__name__', base)
        raise UserError(f"config field {name!r}: cannot read {value!r} as {tname}; give a value of type {tname}") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown}; {cls.__name__} has: {', '.join(sorted(names))}")
    hints = _hints(cls)
    return cls(**{k: coerce(k, hints[k], v) for k, v in data.items()})  # type: ignore[call-arg]


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml_config(path: str | Path) -> dict:
    """The mapping in a ``--config`` YAML file; a missing, unreadable or malformed file is a UserError
    naming the file (and the line of a YAML syntax error)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: {'is a folder' if p.is_dir() else 'no such file'}; pass a YAML file of field: value")
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
        raise UserError(f"--config {path}: a config file must be a YAML mapping of field: value, got a {type(data).__name__}")
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
                raise UserError(f"config field {f.name!r} is {v!r}; it must be {kind} "
                                f"(set --{f.name} to a real value{', or null for off' if _optional(hints[f.name]) else ''})")


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def build_parser(cls: type, *, prog: str, description: str = "", extra: Sequence[tuple] = ()) -> argparse.ArgumentParser:
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)  # --lr must not silently mean --lr_schedule
    # A value that looks like a negative number (-1, -1e-3, -.5, -inf, -nan) is a value, not a flag;
    # argparse's own matcher knows only -1 and -1.5, so ``--learning_rate -1e-3`` failed.
    parser._negative_number_matcher = NEGATIVE_NUMBER
    parser.add_argument("--config", help="YAML file of field: value; command-line flags override it")
    for args, kwargs in extra:
        parser.add_argument(*args, **kwargs)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = docs.get(f.name, "")
        parser.add_argument(f"--{f.name}", dest=f.name, metavar="V", help=f"{help_text} (default: {default!r})")
    return parser


def parse_config(
    cls: type[T], argv: Optional[Sequence[str]] = None, *, prog: str = "tether", description: str = "",
    extra: Sequence[tuple] = (),
) -> tuple[T, argparse.Namespace]:
    """YAML (``--config``) then command-line overrides -> a ``cls`` instance, plus the parsed namespace
    (for ``extra`` arguments that are not config fields, such as ``--resume``)."""
    parser = build_parser(cls, prog=prog, description=description, extra=extra)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    data: dict = {}
    if getattr(ns, "config", None):
        try:
            data.update(read_yaml_config(ns.config))
        except UserError as e:
            parser.error(str(e))
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k, v in vars(ns).items():
        if k in names:
            data[k] = v
    try:
        cfg = from_dict(cls, data, source=getattr(ns, "config", None) or "command line")
        check_finite(cfg)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return cfg, ns
