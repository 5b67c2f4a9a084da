"""Callbacks: code of the caller's that a run calls on its main process, as TRL's ``callbacks=[...]``.

Three forms are accepted, in a list (``train_grpo(cfg, callbacks=[...])``, ``GRPOTrainer(...,
callbacks=[...])``):

- a ``tether.TrainerCallback`` subclass: ``on_train_begin(cfg)``, ``on_log(step, metrics)``,
  ``on_evaluate(step, metrics)``, ``on_save(step, path)``, ``on_train_end(result)``;
- a ``transformers.TrainerCallback`` (what TRL users have): its ``on_train_begin``, ``on_log``,
  ``on_evaluate``, ``on_save`` and ``on_train_end`` are called with ``args`` = the tether config (it
  has ``output_dir``, ``max_steps``, ``learning_rate``...), a ``TrainerState`` (``global_step``,
  ``max_steps``, ``log_history``) and a ``TrainerControl``;
- a plain function ``f(step, metrics)``, called as ``on_log``.

When ``on_log`` rows are written (every ``log_every`` steps, the last step, and every evaluation), the
metrics are the row as logged (``metrics.jsonl``); ``on_evaluate`` gets its ``eval/*`` part. A callback
stops the run early by returning True from ``on_log`` / ``on_evaluate`` (tether's and plain
functions) or by setting ``control.should_training_stop`` (transformers'): the run ends after that
step as if it were the last one asked for (checkpoint and ``final/`` written; no extra evaluation).
With several processes every process stops at the same step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence


class TrainerCallback:
    """Base class of tether's callbacks: override what you need. Return True from ``on_log`` or
    ``on_evaluate`` to stop the run after this step."""

    def on_train_begin(self, cfg) -> None:
        pass

    def on_log(self, step: int, metrics: dict) -> Optional[bool]:
        return None

    def on_evaluate(self, step: int, metrics: dict) -> Optional[bool]:
        return None

    def on_save(self, step: int, path: str) -> None:
        pass

    def on_train_end(self, result) -> None:
        pass


class _FunctionCallback(TrainerCallback):
    def __init__(self, fn: Callable[[int, dict], Any]):
        self.fn = fn

    def on_log(self, step, metrics):
        return self.fn(step, metrics)


class _TransformersCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` behind tether's hooks (see the module docstring)."""

    def __init__(self, cb, cfg):
        from transformers import TrainerControl, TrainerState

        self.cb, self.args = cb, cfg
        self.state = TrainerState(max_steps=int(getattr(cfg, "max_steps", 0)), is_world_process_zero=True)
        self.control = TrainerControl()

    def _call(self, name: str, step: Optional[int] = None, **kw) -> bool:
        if step is not None:
            self.state.global_step = int(step)
        hook = getattr(self.cb, name, None)
        if hook is not None:
            out = hook(self.args, self.state, self.control, **kw)
            if out is not None and hasattr(out, "should_training_stop"):  # a hook may return a new control
                self.control = out
        return bool(self.control.should_training_stop)

    def on_train_begin(self, cfg):
        self._call("on_train_begin")

    def on_log(self, step, metrics):
        self.state.log_history.append({**metrics, "step": step})
        return self._call("on_log", step, logs=dict(metrics))

    def on_evaluate(self, step, metrics):
        return self._call("on_evaluate", step, metrics=dict(metrics))

    def on_save(self, step, path):
        self._call("on_save", step)

    def on_train_end(self, result):
        self._call("on_train_end")


def _wrap(cb, cfg) -> TrainerCallback:
    if isinstance(cb, TrainerCallback):
        return cb
    try:
        from transformers import TrainerCallback as HFCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        HFCallback = ()
    if isinstance(cb, type):
        raise TypeError(f"callbacks: pass an instance, {cb.__name__}(), not the class")
    if HFCallback and isinstance(cb, HFCallback):
        return _TransformersCallback(cb, cfg)
    if callable(cb):
        return _FunctionCallback(cb)
    raise TypeError(
        f"callbacks: {type(cb).__name__} is neither a tether.TrainerCallback, a transformers.TrainerCallback nor a "
        "function of (step, metrics)"
    )


class Callbacks:
    """The callbacks of one run (``RunDir.callbacks``); only the main process calls them."""

    def __init__(self, callbacks: Optional[Sequence] = None, cfg=None, *, is_main: bool = True):
        self.items = [_wrap(cb, cfg) for cb in (callbacks or [])]
        self.is_main = is_main
        self.stop = False

    def __bool__(self) -> bool:
        return bool(self.items)

    def begin(self, cfg) -> None:
        for cb in self.items if self.is_main else []:
            cb.on_train_begin(cfg)

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        for cb in self.items:
            self.stop |= bool(cb.on_log(step, dict(metrics)))
            if evals:
                self.stop |= bool(cb.on_evaluate(step, dict(evals)))

    def save(self, step: int, path) -> None:
        for cb in self.items if self.is_main else []:
            cb.on_save(step, str(path))

    def end(self, result) -> None:
        for cb in self.items if self.is_main else []:
            cb.on_train_end(result)

    def should_stop(self, dist) -> bool:
        """Whether a callback asked to stop (every process gets the main process's answer)."""
        if not self.items:
            return False
        flag = float(self.stop)
        if dist.enabled:
            flag = dist.sum_float(flag)
        return flag > 0
