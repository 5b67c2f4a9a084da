"""Preemption: stop a run cleanly on SIGTERM, SIGINT or SIGUSR1 (docs/reliability.md).

Clusters stop jobs with a signal and a grace period: SLURM and Kubernetes send SIGTERM, then SIGKILL;
SLURM can send SIGUSR1 ahead of time (``--signal=USR1@120``); a person presses Ctrl-C (SIGINT). While
a trainer runs (``preemptible`` wraps it), these signals only set a flag: the optimiser step in
flight finishes (its evaluation, log and periodic checkpoint too), then ``stop_if_signalled`` writes
a checkpoint of that step atomically and raises ``Preempted``. The ``tether`` command turns it into
one line on stderr and exit code ``EXIT_PREEMPTED`` (75, sysexits' EX_TEMPFAIL: "try again"); the
run continues with ``--resume`` bit-identically to one never stopped.

With several processes (torchrun, accelerate) the flag is all-reduced after every step, so every
process stops after the same step, whichever of them was signalled. A signal in the last step lets
the run finish (final/ and exit 0). A Ctrl-C after a stop request stops at once (Python's KeyboardInterrupt);
repeated SIGTERM / SIGUSR1 are the same request (a scheduler may signal every process of a job, and
a sweep forwards the signal to its workers). A signal during setup (loading, precomputing the
reference) is acted on after the first step.

Outside the main thread (signal handlers can only be installed there) ``preemptible`` is a no-op.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by a signal after writing its checkpoint (continue it with --resume)."""

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class Preempted(BaseException):
    """A run stopped by a signal after checkpointing ``step`` in ``checkpoint``. A BaseException (like
    KeyboardInterrupt), so ``except Exception`` in user code does not swallow the stop request."""

    def __init__(
        self,
        signame: str,
        step: Optional[int] = None,
        checkpoint: Optional[str] = None,
        *,
        detail: Optional[str] = None,
    ):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signame} " + (detail or f"after step {step}{where}; continue with --resume"))


_state = {"signum": None, "depth": 0, "previous": {}}


def signal_name(signum: Optional[int] = None) -> str:
    """The name of ``signum`` (default: the signal received), e.g. SIGTERM."""
    signum = _state["signum"] if signum is None else signum
    return signal.Signals(signum).name if signum is not None else "a signal"


def run_main(main: Callable[..., int], *args) -> int:
    """``main(*args)`` in a worker process (``python -m tether.sweep.worker``, ``tether.demo.worker``):
    a run stopped by a signal prints its one line and returns ``EXIT_PREEMPTED``. The handlers are
    installed from the start, so a signal while the worker loads its models is acted on after the
    trainer's first step instead of killing it."""
    import sys

    try:
        return int(preemptible(main)(*args) or 0)
    except Preempted as e:
        print(f"tether worker: {e}", file=sys.stderr)
        return EXIT_PREEMPTED


def requested() -> Optional[int]:
    """The signal received while a ``preemptible`` call runs (None if none)."""
    return _state["signum"]


def request(signum: int = signal.SIGTERM) -> None:
    """Ask the running trainer to stop after its current step, as a signal would (tests, callbacks)."""
    _state["signum"] = signum


def _handler(signum, frame) -> None:
    if _state["signum"] is not None and signum == signal.SIGINT:  # Ctrl-C after a stop request: stop now
        restore()
        raise KeyboardInterrupt
    if _state["signum"] is None:
        log.warning(
            "%s received: finishing this step, then writing a checkpoint and stopping (exit %d; continue with "
            "--resume)%s",
            signal.Signals(signum).name,
            EXIT_PREEMPTED,
            "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else "",
        )
    _state["signum"] = signum


def install() -> bool:
    """Install the handlers (nested calls share them); False where it cannot (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if _state["depth"] == 0:
        _state["signum"] = None
        _state["previous"] = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state["depth"] += 1
    return True


def restore() -> None:
    """Put back the handlers ``install`` replaced."""
    for s, h in _state["previous"].items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)
    _state["previous"], _state["depth"] = {}, 0


def preemptible(train: Callable) -> Callable:
    """Decorator of a trainer's entry point: signals set a flag while it runs (its loop calls
    ``stop_if_signalled`` after each step); the previous handlers and the run directory's lock
    (``runs.release_locks``) are restored / released however it ends. A run that fails before it
    logged a step or wrote a checkpoint removes what it wrote (``runs.abandon_runs``), so that the
    corrected command can run in the same ``output_dir``."""

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        from .runs import abandon_runs, forget_runs, held_locks, release_locks, started_runs

        installed = install()
        before, started = held_locks(), started_runs()
        try:
            return train(*args, **kwargs)
        except Exception:  # (not Preempted, a BaseException: that run has its checkpoint)
            abandon_runs(keep=started)  # failed before its first step: nothing left to block the retry
            raise
        finally:
            forget_runs(keep=started)
            release_locks(keep=before)
            if installed and _state["depth"] > 0:  # (a second Ctrl-C restored the handlers already)
                _state["depth"] -= 1
                if _state["depth"] == 0:
                    restore()

    return wrapper


def stop_if_signalled(step: int, max_steps: int, dist, ckpt, save: Optional[Callable[[], None]] = None) -> None:
    """Called by every trainer after each optimiser step (after its log and periodic checkpoint). If
    a stop was requested on any process (one all-reduce: every process decides the same), write the
    checkpoint of ``step`` (``save()``, default ``ckpt.save(step)``; skipped when this step's is
    already written), close the run directory, wait for the other processes and raise ``Preempted``.
    No-op at the last step (the run finishes instead)."""
    flag = float(_state["signum"] is not None)
    if dist.enabled:
        flag = dist.sum_float(flag)
    if not flag or step >= max_steps:
        return
    if getattr(ckpt, "saved_step", None) != step:
        (save or (lambda: ckpt.save(step)))()
    signum = _state["signum"]
    name = signal.Signals(signum).name if signum is not None else "a signal on another process"
    path = ckpt.run.checkpoints / f"step-{step}"
    if getattr(ckpt, "enabled", True):
        log.warning("stopped by %s after step %d; checkpoint %s; continue with --resume", name, step, path)
    else:
        log.warning(
            "stopped by %s after step %d; no checkpoint (save_checkpoints: false): it cannot resume", name, step
        )
    ckpt.run.close()
    dist.finish()
    raise Preempted(name, step, str(path))
