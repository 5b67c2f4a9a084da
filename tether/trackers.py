"""Metric trackers named by ``report_to``: TensorBoard (the default, written by ``RunDir`` into
``tb/``), Weights & Biases and Trackio (optional dependencies, imported only when named).

``metrics.jsonl`` is always written whatever ``report_to`` says: it is what resume, the demo and the
tests read. Trackers only mirror it. Only the main process creates or writes trackers (``RunDir``),
but every process checks that the named packages import, so a missing package stops all ranks with
the same message instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "trackio")
"""Accepted names in ``report_to`` (plus ``none``)."""

OPTIONAL = {"wandb": "wandb", "trackio": "trackio"}  # tracker -> the extra (and package) that provides it


def parse_report_to(value) -> list[str]:
    """``report_to`` (``"tensorboard"``, ``"tensorboard,wandb"``, ``"none"``, or a list) -> tracker
    names in order, without duplicates; ``none`` (alone) -> []. Raises ``UserError`` naming the field."""
    if isinstance(value, str) and value.strip().startswith("["):  # a YAML list read into the str field
        import yaml

        value = yaml.safe_load(value)
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name and name not in names:
            names.append(name)
    if names == ["none"] or not names:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        hint = " ('none' cannot be combined with a tracker)" if "none" in bad else ""
        raise UserError(
            f"report_to: unknown tracker(s) {bad}{hint}; choose from {', '.join(TRACKERS)} or none, "
            "comma-separated (e.g. report_to=tensorboard,wandb)"
        )
    return names


def require(names: list[str]) -> None:
    """Import each optional tracker's package now, so a missing one is a one-line error at start-up."""
    for name in names:
        if name in OPTIONAL:
            try:
                importlib.import_module(OPTIONAL[name])
            except ImportError:
                raise UserError(
                    f"report_to={name} needs the {OPTIONAL[name]} package, which is not installed: "
                    f"pip install 'tether[{name}]' (or {OPTIONAL[name]}), or set report_to=tensorboard "
                    "or none"
                ) from None


class ExternalTracker:
    """One wandb or trackio run mirroring ``metrics.jsonl``; opened at the first logged row."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, Path(path)
        self._run = None

    def _open(self):
        import yaml

        cfg_file = self.path / "config.yaml"
        config = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else None
        # Project from the tracker's usual variable, else "tether"; the run is named after output_dir.
        module = importlib.import_module(OPTIONAL[self.name])
        if self.name == "wandb":
            return module.init(
                project=os.environ.get("WANDB_PROJECT", "tether"),
                name=self.path.name,
                dir=str(self.path),
                config=config,
            )
        return module.init(project=os.environ.get("TRACKIO_PROJECT", "tether"), name=self.path.name, config=config)

    def log(self, step: int, row: dict) -> None:
        if self._run is None:
            self._run = self._open()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self._run.log(scalars, step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_trackers(report_to, path: Path, *, is_main: bool) -> tuple[bool, list[ExternalTracker]]:
    """(whether TensorBoard is on, the external trackers to mirror to) for ``report_to``; checks the
    optional packages on every process, creates trackers on the main one only."""
    names = parse_report_to(report_to)
    require(names)
    external = [ExternalTracker(n, path) for n in names if n in OPTIONAL] if is_main else []
    return "tensorboard" in names, external
