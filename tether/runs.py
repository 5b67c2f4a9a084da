"""Run directories: resolved config, run identity, metrics (JSONL + TensorBoard), atomic checkpoints, resume.

Layout of ``output_dir``::

    config.yaml          the resolved config in effect (rewritten on resume)
    run.json             the run's identity: the config class, the fields that define its trajectory
                         and their fingerprint (sha256); see ``RunDir.start``
    metrics.jsonl        one JSON object per logged step, with "step"; NaN and ±inf are written as
                         the JSON extensions NaN / Infinity / -Infinity (Python's json reads them)
    tb/                  TensorBoard events
    samples.jsonl        sample completions logged every N steps (trainers that generate)
    checkpoints/step-N/  model/ (safetensors), trainer_state.safetensors (every tensor of the trainer
                         state: optimizer moments, RNG states...) and trainer_state.json (the rest)
    final/               the trained model in Hugging Face format
    run.lock             locked by the live run (host and PID inside); see ``lock_run_dir``

No pickle: a checkpoint is read with ``safetensors`` and ``json`` only, so a crafted file in a run
directory cannot run code (unpickling could). Checkpoints of older tether
versions (``trainer_state.pt``) are refused with a message.

Crash safety: checkpoints, ``final/``, ``config.yaml``, ``run.json`` and truncated logs are written
to a temporary name, fsynced (files, then their folder) and renamed into place (``os.replace`` is
atomic), so an interruption never leaves a half-written file that ``--resume`` would pick up. If the
latest checkpoint is unreadable anyway (a disk error, a truncated copy), resume falls back to the
previous one (``save_total_limit`` are kept, 2 by default) with a warning; a torn last line in
``metrics.jsonl`` and stray files in ``checkpoints/`` are skipped.

One writer: ``run.lock`` is locked (``fcntl.flock``) by the main process from ``RunDir.start`` until
``close`` (or its exit: the OS releases the lock of a dead process, kill -9 included), and holds the
holder's host and PID; a second run on the same folder is refused, ``--overwrite`` included.

Failing writes (a full disk, EIO, a quota): a checkpoint or ``final/`` that cannot be written leaves
the previous ones as they were (the partial ``.tmp`` folder is removed; an old checkpoint is deleted
only after its successor is complete) and ends the run with a ``UserError`` naming the path and the
cause. At most ``save_total_limit`` checkpoints are kept (TrainConfig; default 2).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import save_config, to_dict
from .errors import UserError
from .paths import with_absolute_paths

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states (tuples, a numpy array and a uint8 tensor: the checkpoint
    encoder ``encode_state`` stores them exactly, without pickle)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# Checkpoint state without pickle: tensors go to a safetensors file, everything else to JSON. The
# markers below keep types that JSON lacks (tuples: random.setstate needs them; dicts with non-string
# keys: optimizer state is keyed by parameter index; numpy arrays: np.random.set_state). Python floats
# round-trip exactly through json (repr is the shortest string that reads back as the same double),
# NaN/inf included, so a resumed run is bit-identical.
_MARK = re.compile(r"^__\w+__$")


def encode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, its tensors moved into ``tensors`` (name -> tensor)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not _MARK.match(k) for k in obj):
            return {k: encode_state(v, tensors) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, lists, "
        "tuples, dicts and numpy arrays only)"
    )


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable. Not every platform can open a folder."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every folder (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(Path(root))
        for name in files:
            _fsync_file(Path(root) / name)
    for d in reversed(dirs):
        _fsync_dir(d)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via ``path.tmp`` + fsync + ``os.replace`` + fsync of the folder:
    a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp=tmp, intact=f"{path.name} is left as it was"):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def write_failure(e: BaseException) -> Optional[str]:
    """The cause, in words, of an exception raised by a failing write (a full disk, an I/O error, a
    quota, a read-only or vanished folder; safetensors reports these as a SafetensorError naming the
    OS error), or None for any other exception (a bug, which keeps its traceback)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    if type(e).__name__ == "SafetensorError":  # "Error while serializing: I/O error: ... (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m:
            code = int(m.group(1))
            return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        if "i/o error" in str(e).lower():
            return " ".join(str(e).split())
    return None


@contextlib.contextmanager
def writing(path: Path, *, tmp: Optional[Path] = None, intact: str = ""):
    """Turn a failing write inside the block into a ``UserError`` naming ``path`` and the cause (the
    partial ``tmp`` file or folder is removed first). ``intact``: what the failure left as it was."""
    try:
        yield
    except Exception as e:
        cause = write_failure(e)
        if cause is None:
            raise
        if tmp is not None:
            _remove(Path(tmp))
        raise UserError(
            f"could not write {path}: {cause}; {intact + '; ' if intact else ''}free space on that disk "
            "(or fix it) and run again (--resume continues from the last checkpoint)"
        ) from e


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``. An existing ``final`` is moved aside first and
    deleted only once the new one is in place (put back if the rename fails)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    had = final.exists()
    if had:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if had:
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    if had:
        shutil.rmtree(old, ignore_errors=True)


# One writer per run directory (fcntl.flock on output_dir/run.lock, held by the main process).
LOCK_FILE = "run.lock"
_LOCKS: dict[str, int] = {}  # realpath of output_dir -> descriptor of its locked run.lock (this process)


def lock_run_dir(path: Path) -> None:
    """Lock ``path/run.lock`` for this process, or raise ``UserError`` naming the process that holds it
    (host and PID, which the holder writes into the file). The OS releases the lock when the holder
    exits, however it dies. A lock this process holds already is kept (a new run here after a
    previous one in the same Python process). Where flock is missing (Windows) or the file system
    refuses it, the run goes on unlocked with a warning."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(path)
    if key in _LOCKS:
        return
    lock = Path(path) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            try:
                holder = " ".join(lock.read_text().split()) or "its host and PID not written yet"
            except OSError:
                holder = "unknown holder"
            raise UserError(
                f"output_dir {path} is in use by another run ({holder}); wait for it to end or stop it "
                "(its lock goes with the process), or choose another --output_dir"
            ) from None
        log.warning("%s: the file system refuses locks (%s); two runs on this folder would not be stopped", lock, e)
        return
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"pid {os.getpid()} on host {socket.gethostname()}, "
        f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(),
    )
    _LOCKS[key] = fd


def unlock_run_dir(path: Path) -> None:
    fd = _LOCKS.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


_STARTED: dict[str, bool] = {}  # realpath of each output_dir a run started in -> whether it made the folder
TRAINED_FILES = (
    "metrics.jsonl",
    "samples.jsonl",
    "history.jsonl",
    "checkpoints",
    "final",
    "final.tmp",
)  # a run that has begun


def started_runs() -> set[str]:
    """The run directories this process started runs in (``RunDir.start``)."""
    return set(_STARTED)


def abandon_runs(keep: frozenset | set = frozenset()) -> None:
    """A run that failed before its first logged step (a check after the weights loaded, a bad row in
    the data) leaves no trace that would block the retry: ``config.yaml``, ``run.json`` and the lock file
    go, and the folder too if the run made it. A run that logged a step or wrote a checkpoint is kept
    (it resumes). Runs in ``keep`` (started before the failing call) are left alone."""
    for key in list(_STARTED):
        if key not in keep:
            created = _STARTED.pop(key)
            unlock_run_dir(Path(key))
            _remove_if_unused(Path(key), created=created)


def forget_runs(keep: frozenset | set = frozenset()) -> None:
    """Stop tracking the runs started since ``keep`` (their trainer returned or raised)."""
    for key in list(_STARTED):
        if key not in keep:
            del _STARTED[key]


def _remove_if_unused(path: Path, *, created: bool) -> None:
    if any((path / n).exists() for n in TRAINED_FILES):
        return
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for n in ("config.yaml", "run.json", LOCK_FILE):
        with contextlib.suppress(FileNotFoundError):
            (path / n).unlink()


def held_locks() -> set[str]:
    """The run directories this process holds locked."""
    return set(_LOCKS)


def release_locks(keep: frozenset | set = frozenset()) -> None:
    """Release every lock this process holds but those in ``keep`` (a trainer that ended, however)."""
    for key in list(_LOCKS):
        if key not in keep:
            unlock_run_dir(Path(key))


def check_finite_weights(model, where: str, weights: Optional[dict] = None) -> None:
    """Refuse to save non-finite weights (the step guard should have kept them out: this is the
    backstop that keeps a NaN model off the disk). ``weights``: the gathered tensors of a sharded model."""
    named = weights.items() if weights is not None else model.named_parameters()
    bad = [n for n, p in named if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise RuntimeError(
            f"refusing to save {where}: {len(bad)} parameter tensors hold NaN or inf "
            f"(first: {bad[0]}); the previous checkpoint is left as it was"
        )


# Run identity. Fields a resumed run may change: they decide how long the run goes on and what it
# writes, not the trajectory of the steps already taken. max_steps may also reshape what is left of a
# decaying lr schedule (cosine/linear) or a β schedule, which are defined over max_steps: extending a
# run is what it is for.
SAFE_TO_CHANGE = frozenset(
    {
        "max_steps",
        "save_every",
        "save_checkpoints",
        "log_every",
        "eval_every",
        "progress",
        "output_dir",
        "overwrite",
        "assets",
        "sample_every",
        "num_logged_samples",
        "max_nonfinite_steps",
        "save_total_limit",
    }
)
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "samples.jsonl", "history.jsonl", "tb", "checkpoints", "final")


def identity(cfg) -> dict:
    """The fields that define a run's trajectory (every config field but ``SAFE_TO_CHANGE``), as
    JSON-able data, and their sha256 fingerprint."""
    fields = {k: v for k, v in json.loads(json.dumps(to_dict(cfg), default=str)).items() if k not in SAFE_TO_CHANGE}
    blob = json.dumps({"config": type(cfg).__name__, "fields": fields}, sort_keys=True)
    return {"config": type(cfg).__name__, "fingerprint": hashlib.sha256(blob.encode()).hexdigest(), "fields": fields}


def _jsonable(v: Any) -> Any:
    """A metric value as JSON data. NaN and ±inf stay what they are (json writes NaN / Infinity):
    a diverged run must look diverged in its logs."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().tolist()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log; a torn last line (a crash mid-write) is skipped with a warning."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise UserError(f"{path}, line {i + 1}: not a JSON object; fix or delete that line") from None
            log.warning("%s: skipping a torn last line (an interrupted write)", path)
    return rows


def _checkpoint_step(p: Path) -> Optional[int]:
    m = re.fullmatch(r"step-(\d+)", p.name)
    return int(m.group(1)) if m and p.is_dir() else None


def latest_checkpoint_step(output_dir: str | os.PathLike) -> Optional[int]:
    """The step of the newest checkpoint in ``output_dir`` (None if none): whether a rerun can resume
    (the sweep's and the demo's workers ask)."""
    folder = Path(output_dir) / "checkpoints"
    steps = [n for p in folder.iterdir() if (n := _checkpoint_step(p)) is not None] if folder.is_dir() else []
    return max(steps) if steps else None


class History:
    """Every step's metrics, ``{"step": s, **metrics}``, as a run goes: appended to
    ``OUTPUT_DIR/history.jsonl`` (the main process writes; resume truncates it with the other logs) with
    only the last row held in memory, so a long run's memory and checkpoints do not grow with its
    steps (a 2,000-step run held 2.8 MB of rows in every checkpoint before). ``rows()`` reads them all
    back (``TrainResult.history``). A checkpoint of an older tether that carries the rows (``legacy``)
    writes them to the file on resume."""

    FILE = "history.jsonl"

    def __init__(self, run: "RunDir", *, legacy: Optional[list] = None):
        self.path, self.is_main = run.path / self.FILE, run.is_main
        rows = list(legacy) if legacy else (read_jsonl(self.path) if self.path.exists() else [])
        if legacy and self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.last: Optional[dict] = dict(rows[-1]) if rows else None
        self.count = len(rows)

    def append(self, row: dict) -> None:
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"
            with writing(self.path, intact="the rows before it are kept"), open(self.path, "a") as f:
                f.write(line)
        self.last, self.count = dict(row), self.count + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if i != -1:
            raise IndexError("History holds only its last row in memory (history[-1]); rows() reads them all")
        if self.last is None:
            raise IndexError("no step has run yet")
        return self.last

    def rows(self) -> list[dict]:
        """Every row, read from the file (every process: the run folder is shared, as for checkpoints)."""
        return read_jsonl(self.path) if self.path.exists() else []


class RunDir:
    """Owns a run's output folder. Only the main process (``is_main``) writes."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        is_main: bool = True,
        tensorboard: bool = True,
        report_to: Optional[str] = None,
    ):
        """``report_to`` (TrainConfig.report_to; tether.trackers) replaces ``tensorboard`` when given."""
        self.path = Path(output_dir)
        self.is_main = is_main
        self._tb = None
        self._tensorboard, self._external = tensorboard, []
        if report_to is not None:
            from .trackers import open_trackers

            self._tensorboard, self._external = open_trackers(report_to, self.path, is_main=is_main)
        self._purge_step: Optional[int] = None  # after a resume: TensorBoard drops events from this step on
        self.keep = 2  # checkpoints kept (TrainConfig.save_total_limit, set by start)
        from .callbacks import Callbacks

        self.callbacks = Callbacks(is_main=is_main)  # the caller's (tether.callbacks), set by the trainer
        # The folder is made by ``start``, after the run's checks: a run that fails them leaves nothing behind.

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg, *, resume: bool = False) -> None:
        """Check the run's identity (``start``), then write ``config.yaml`` and ``run.json``."""
        self.start(cfg, resume=resume)

    def start(self, cfg, *, resume: bool = False) -> None:
        """Claim ``output_dir`` for the run ``cfg`` and record it (``config.yaml``: the config in
        effect; ``run.json``: its identity). A folder holding another run is refused unless
        ``cfg.overwrite`` (the old run's files are then deleted) or ``resume`` with the same
        trajectory fields (only ``SAFE_TO_CHANGE`` fields may differ). Raises ``UserError``."""
        if not self.is_main:
            return
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock_run_dir(self.path)  # before anything is read or deleted: a live run's folder is never touched
        try:
            self._start(cfg, resume=resume)
        except BaseException:
            unlock_run_dir(self.path)
            if created:
                _remove_if_unused(self.path, created=True)
            raise
        _STARTED[os.path.realpath(self.path)] = created

    def _start(self, cfg, *, resume: bool) -> None:
        limit = getattr(cfg, "save_total_limit", 2)
        if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 0):
            raise UserError(
                f"save_total_limit={limit!r}: give the number of checkpoints to keep (2 by default; 0 or "
                "null keeps all)"
            )
        self.keep = 0 if limit is None else int(limit)
        cfg = with_absolute_paths(cfg)  # recorded and compared as absolute paths: resume from any directory
        overwrite = bool(getattr(cfg, "overwrite", False))
        present = [n for n in RUN_FILES if (self.path / n).exists()]
        new = identity(cfg)
        if present and overwrite:
            log.warning("overwrite: deleting the run in %s (%s)", self.path, ", ".join(present))
            for n in RUN_FILES + ("final.tmp", "final.old"):
                q = self.path / n
                if q.is_dir():
                    shutil.rmtree(q)
                elif q.exists():
                    q.unlink()
        elif present and not resume:
            raise UserError(
                f"output_dir {self.path} already holds a run ({', '.join(present)}); pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --output_dir"
            )
        elif present:
            old = self._recorded_identity()
            if old is None:
                raise UserError(
                    f"output_dir {self.path} holds files of a run ({', '.join(present)}) but no config.yaml or "
                    "run.json "
                    "to check --resume against; pass --overwrite to replace it, or choose another --output_dir"
                )
            if (old.get("config") and old["config"] != new["config"]) or old["fields"] != new["fields"]:
                raise UserError(
                    f"--resume: output_dir {self.path} holds a different run: {_describe_change(old, new)}; "
                    f"resume with the run's own config ({self.path / 'config.yaml'}), change only "
                    f"{', '.join(sorted(SAFE_TO_CHANGE))}, or pass --overwrite / another --output_dir"
                )
        tmp = self.path / "config.yaml.tmp"
        with writing(self.path / "config.yaml", tmp=tmp):
            save_config(cfg, tmp)
            _fsync_file(tmp)
            os.replace(tmp, self.path / "config.yaml")
        write_atomic(self.path / "run.json", json.dumps(new, indent=1, sort_keys=True) + "\n")

    def _recorded_identity(self) -> Optional[dict]:
        """run.json, or for a run written before run.json existed, the identity of its config.yaml."""
        rj = self.path / "run.json"
        if rj.exists():
            try:
                return json.loads(rj.read_text())
            except json.JSONDecodeError:
                pass
        cy = self.path / "config.yaml"
        if cy.exists():
            import yaml

            data = yaml.safe_load(cy.read_text()) or {}
            if isinstance(data, dict):
                fields = {k: v for k, v in json.loads(json.dumps(data, default=str)).items() if k not in SAFE_TO_CHANGE}
                return {"config": None, "fields": fields}
        return None

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)  # (made by start in a trainer; a bare RunDir logs too)
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with (
            writing(self.path / "metrics.jsonl", intact="the rows before it are kept"),
            open(self.path / "metrics.jsonl", "a") as f,
        ):
            f.write(json.dumps(row) + "\n")  # allow_nan: NaN / Infinity as they are
        if self._tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: the events a resumed run re-logs replace the old ones (no duplicate points)
                self._tb = SummaryWriter(str(self.path / "tb"), purge_step=self._purge_step)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        for tracker in self._external:  # wandb / trackio (report_to)
            tracker.log(step, row)
        self.callbacks.log(int(step), {k: v for k, v in row.items() if k != "step"})

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with writing(self.path / "samples.jsonl"), open(self.path / "samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": int(step), **s}) + "\n")

    def truncate_logs(self, step: int) -> None:
        """On resume from ``step``: drop logged rows after it (and a torn last line) so the files
        continue cleanly; rewritten atomically. TensorBoard drops its events after it too."""
        if not self.is_main:
            return
        self._purge_step = step + 1
        for name in ("metrics.jsonl", "samples.jsonl", "history.jsonl"):
            p = self.path / name
            if p.exists():
                rows = [r for r in read_jsonl(p) if isinstance(r, dict) and r.get("step", 0) <= step]
                write_atomic(p, "".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        """Flush the trackers and release the run directory's lock."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._external:
            tracker.close()
        self._external = []
        if self.is_main:
            unlock_run_dir(self.path)

    def checkpoints_newest_first(self) -> list[Path]:
        """``checkpoints/step-N`` folders, newest first; anything else there (``.tmp`` folders of an
        interrupted save, stray files) is ignored."""
        if not self.checkpoints.is_dir():
            return []
        found = [(n, p) for p in self.checkpoints.iterdir() if (n := _checkpoint_step(p)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def latest_checkpoint(self) -> Optional[Path]:
        ckpts = self.checkpoints_newest_first()
        return ckpts[0] if ckpts else None

    def save_checkpoint(
        self,
        step: int,
        *,
        model,
        state: dict,
        keep: Optional[int] = None,
        weights: Optional[dict] = None,
        tokenizer=None,
    ) -> Optional[Path]:
        """Atomically write ``checkpoints/step-N``: the model in HF format (safetensors; with ``tokenizer``'s
        files, so ``model/`` loads on its own with ``from_pretrained``) and the
        trainer ``state`` (optimizer, scheduler, controller, RNG, data position...) as
        ``trainer_state.safetensors`` + ``trainer_state.json`` (``encode_state``). Non-finite weights
        are refused. Then only the newest ``keep`` checkpoints are kept (default ``self.keep``, from
        save_total_limit; 0 = all): older ones are deleted only now, after the new one is complete. A
        failing write (full disk, I/O error) removes the partial folder, leaves every other checkpoint
        as it was and raises ``UserError``."""
        if not self.is_main:
            return None
        keep = self.keep if keep is None else keep
        check_finite_weights(model, f"checkpoint step-{step}", weights)  # weights: fsdp's gathered tensors
        final = self.checkpoints / f"step-{step}"
        tmp = self.checkpoints / f"step-{step}.tmp"
        previous = self.latest_checkpoint()
        kept = [str(q) for q in (previous, self.path / "final") if q is not None and q.exists()]
        intact = f"left as they were: {', '.join(kept)}" if kept else "no earlier checkpoint to fall back on"
        with writing(final, tmp=tmp, intact=intact):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_model(model, tmp / "model", state_dict=weights, tokenizer=tokenizer)
            write_state(tmp, state)
            _fsync_tree(tmp)
            _replace_dir(tmp, final)
        for p in self.checkpoints_newest_first()[keep:] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        self.callbacks.save(step, final)
        return final

    @staticmethod
    def load_checkpoint_state(ckpt: Path) -> dict:
        return read_state(ckpt)


def write_state(folder: Path, state: dict) -> None:
    """``state`` as ``folder/trainer_state.safetensors`` (its tensors) + ``trainer_state.json``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    data = encode_state(state, tensors)
    save_file(tensors, str(Path(folder) / "trainer_state.safetensors"))
    (Path(folder) / "trainer_state.json").write_text(json.dumps(data))


def read_state(folder: Path) -> dict:
    """Inverse of ``write_state``; no pickle is ever read."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "trainer_state.pt").exists() and not (folder / "trainer_state.json").exists():
        raise UserError(
            f"checkpoint {folder} was written by an older tether (trainer_state.pt, a pickle, which tether no longer "
            "loads because unpickling can run code); start the run again with --overwrite, or finish it with the "
            "tether version that wrote it"
        )
    data = json.loads((folder / "trainer_state.json").read_text())
    return decode_state(data, load_file(str(folder / "trainer_state.safetensors")))


def save_model(
    model, path: Path, *, tokenizer=None, merge_lora: bool = False, state_dict: Optional[dict] = None
) -> None:
    """Save in Hugging Face format (safetensors). A peft model is saved as an adapter, or merged into
    the base weights (loadable with ``AutoModelForCausalLM``) with ``merge_lora``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    # state_dict: full tensors of a sharded (fsdp) model, gathered by every process beforehand
    to_save.save_pretrained(
        str(path), safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict})
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def save_final(model, output_dir: Path, *, tokenizer=None, merge_lora: bool = True, is_main: bool = True) -> Path:
    """Write ``final/`` atomically (tmp folder + fsync + rename); non-finite weights are refused.
    A sharded (fsdp) model is gathered on every process (call it on all) and rank 0 writes it in full."""
    from .fsdp import full_state_dict

    weights = full_state_dict(model)
    final = Path(output_dir) / "final"
    if not is_main:
        return final
    check_finite_weights(model, "final/", weights)
    tmp = Path(output_dir) / "final.tmp"
    intact = ("the previous final/ and " if final.exists() else "") + "the checkpoints are left as they were"
    with writing(final, tmp=tmp, intact=intact):
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(model, tmp, tokenizer=tokenizer, merge_lora=merge_lora, state_dict=weights)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    return final


def _describe_change(old: dict, new: dict) -> str:
    if old.get("config") and old["config"] != new["config"]:
        return f"it is a {old['config']} run, this is {new['config']}"
    a, b = old["fields"], new["fields"]
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = ", ".join(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in changed[:6])
    return f"changed field(s) {shown}" + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")


def load_model_weights(model, ckpt_model_dir: Path) -> None:
    """Load weights saved by ``save_model`` (full model or peft adapter) into ``model`` in place."""
    from safetensors.torch import load_file

    ckpt_model_dir = Path(ckpt_model_dir)
    adapter = ckpt_model_dir / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(ckpt_model_dir.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once: lm_head.weight may legitimately be "missing".
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_model_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
