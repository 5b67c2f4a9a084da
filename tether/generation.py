"""Generation backends: what draws the completions that ``tether.engine`` decodes and scores.

The engine (``engine.generate``) is the one sampling pipeline; a backend is only the part that turns
prompt token ids into completion token ids. Every backend returns the same thing, a
``CompletionBatch`` (left-padded prompts, completions padded after the first EOS, ``allowed`` = the
packed token sets F_t it sampled from when top-k/top-p is on; ``behaviour_logps`` = log μ(y_t|s_t) of
every sampled token under the exact distribution the backend drew it from, the behaviour policy μ) and
a ``no_eos`` (B,) bool, so scoring, the KL and the losses never know which backend ran (docs/theory.md
§3: the set at scoring is the set at sampling; μ ≠ π_old is measured and corrected, ``ops.behaviour``).

The interface::

    class GenerationBackend(Protocol):
        name: str
        def generate(self, prompt_ids, settings: SamplingSettings, generator, *, pad_id, eos_id)
            -> (CompletionBatch, no_eos)
        def update_weights(self, model) -> None   # after each optimiser step; no-op for "builtin"

Backends, chosen by the sampling group's ``backend`` field (``make_backend``):

- ``builtin``: ``tether.sampling.sample`` on the policy itself (KV cache, finished rows compacted; for
  plain Llama models the lean decode step of ``tether.decode``: option ``decoder`` = auto | hf | lean,
  ``make_backend("builtin", model, decoder="hf")``). ``update_weights`` does nothing: it samples from the
  live module.
- ``vllm``: optional, colocated ``vllm.LLM`` engine (``tether.backends.vllm.VLLMBackend``, imported
  only when asked for), which copies the policy's weights in ``update_weights``.

``register_backend(name, factory)`` adds one; ``factory(model, **options)`` returns the backend.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from .errors import UserError
from .groups import SamplingSettings
from .modeling import CompletionBatch


@runtime_checkable
class GenerationBackend(Protocol):
    """Turns prompt ids into a sampled ``CompletionBatch`` (see the module docstring)."""

    name: str

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings: SamplingSettings,
        generator: torch.Generator,
        *,
        pad_id: int,
        eos_id: Optional[int],
    ) -> tuple[CompletionBatch, torch.Tensor]:
        """One completion per row of ``prompt_ids`` under ``settings`` (``groups.SamplingSettings``: τ,
        top-k, top-p, max_new_tokens); prompts left-padded and completions right-padded with ``pad_id``,
        the first ``eos_id`` ends a completion (None: never early). Returns (batch on any device,
        no_eos (B,) bool)."""
        ...

    def update_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...


class BuiltinBackend:
    """``tether.sampling.sample`` on ``model`` itself; its random draws come from ``generator`` only."""

    name = "builtin"

    def __init__(self, model, *, decoder: str = "auto"):
        if decoder not in ("auto", "hf", "lean"):
            raise UserError(f"decoder: unknown decoder {decoder!r}; choose auto, hf or lean")
        self.model, self.decoder = model, decoder

    def generate(
        self, prompt_ids, settings: SamplingSettings, generator: torch.Generator, *, pad_id: int, eos_id: Optional[int]
    ):
        from .sampling import sample

        return sample(
            self.model,
            prompt_ids,
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=settings.max_new_tokens,
            generator=generator,
            decoder=self.decoder,
            **settings.filters(),
        )

    def update_weights(self, model) -> None:
        self.model = model  # the live module: nothing to copy


_FACTORIES: dict[str, Union[Callable, str]] = {
    "builtin": BuiltinBackend,
    "vllm": "tether.backends.vllm:VLLMBackend",  # optional dependency: imported when asked for
}
BACKEND_NAMES = tuple(_FACTORIES)


def register_backend(name: str, factory: Union[Callable, str]) -> None:
    """Add a backend: ``factory(model, **options)`` -> GenerationBackend, or "module:attribute" naming one."""
    global BACKEND_NAMES
    _FACTORIES[name] = factory
    BACKEND_NAMES = tuple(_FACTORIES)


def check_backend(name: str, decoder: str = "auto") -> None:
    """The sampling group's ``backend`` names a generation backend (``BACKEND_NAMES``), and its
    ``decoder`` is one the builtin backend has (only the builtin backend takes one). The CLI's preflight
    (``tether.checks``) and ``backend_for`` both run it."""
    if name not in BACKEND_NAMES:
        raise UserError(
            f"backend={name!r} is not a generation backend; set --backend to one of {', '.join(BACKEND_NAMES)}"
        )
    if decoder not in ("auto", "hf", "lean"):
        raise UserError(f"decoder={decoder!r} is not a decoder; set --decoder to auto, hf or lean")
    if decoder != "auto" and name != "builtin":
        raise UserError(f"decoder={decoder!r} applies to backend builtin only; drop --decoder or set --backend builtin")


def backend_for(cfg, model) -> GenerationBackend:
    """The backend a config's sampling group names (``backend``, and ``decoder`` for the builtin one)."""
    decoder = getattr(cfg, "decoder", "auto")
    check_backend(cfg.backend, decoder)
    options = {"decoder": decoder} if cfg.backend == "builtin" else {}
    if cfg.backend == "vllm":  # the GPU settings users set (sampling group)
        options = {
            "gpu_memory_utilization": getattr(cfg, "vllm_gpu_memory_utilization", 0.3),
            "enable_sleep_mode": getattr(cfg, "vllm_enable_sleep_mode", False),
        }
    return make_backend(cfg.backend, model, **options)


def make_backend(name: str, model, **options) -> GenerationBackend:
    """The backend called ``name`` (the sampling group's ``backend`` field) sampling from ``model``."""
    if name not in _FACTORIES:
        raise UserError(f"backend: unknown generation backend {name!r}; choose one of {', '.join(_FACTORIES)}")
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise UserError(
                f"backend: {name!r} needs an optional dependency that is not importable ({e}); "
                f"install it (see README) or use backend: builtin"
            ) from e
    return factory(model, **options)
