"""Sharded training (``TrainConfig.fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) over the
processes torchrun / accelerate start, for the policy and for a reference that is a separate copy.

What sharding changes, and what it must not (the 2 processes == 1 rule):

- Each decoder layer (the model's ``_no_split_modules``) and then the whole model become FSDP units:
  every process keeps 1/world_size of each parameter (dim-0 chunks), of its gradient and of the
  AdamW moments. A forward all-gathers one unit at a time and frees it after; the backward
  reduce-scatters gradients.
- Gradients are **summed**, not averaged (``set_gradient_divide_factor(1.0)``, with
  ``set_force_sum_reduction_for_comms``: otherwise FSDP asks for PREMUL_SUM, which gloo lacks):
  tether's losses are
  already divided by the global normaliser (tether/distributed.py), exactly as with the data-parallel
  all-reduce, so a sharded run follows the 1-process trajectory up to float summation order.
- Generation, evaluation and anything run on one rank only (kl/ref sampling, eval hooks, saving) run
  inside ``unsharded(...)``: the full parameters are gathered once and the FSDP hooks issue no
  collectives, so processes may take different numbers of forward passes (samples that stop at
  different lengths). This is FSDP's "summon full params": during a rollout a process holds the
  full weights, as with plain data parallelism; the saving is during the optimiser phase.
- Checkpoints (``full_state_dict``) stay full Hugging Face folders and full (unsharded) optimiser tensors, so a sharded
  run's checkpoints load in an unsharded run and the other way round.

A single process (world_size 1) ignores ``fsdp``: there is nothing to shard over.
Only torch is imported here; the launch recipe for GPUs is examples/accelerate_fsdp.yaml.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(x) -> bool:
    return isinstance(x, _dtensor_type())


def is_sharded(model: Optional[torch.nn.Module]) -> bool:
    """Whether ``model`` (or any submodule) was sharded by ``shard_model``."""
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group: one FSDP unit per decoder layer
    (the classes in ``model._no_split_modules``, as Hugging Face marks them), then the root (the
    embeddings, final norm and a tied head stay together there). Every process must hold the same
    weights first (``Dist.broadcast_params``). Returns the model (its parameters are now DTensors)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", lambda: model)()
    layer_names |= set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names and m is not model]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # SUM: losses carry the global normaliser already
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (factor 1: no division); gloo has no PREMUL_SUM
    log.info("fsdp: %s sharded in %d units (%d layers + root)", type(model).__name__, len(layers) + 1, len(layers))
    return model


@contextlib.contextmanager
def unsharded(*models: Optional[torch.nn.Module]) -> Iterator[None]:
    """Full parameters on every process for the duration (one all-gather per FSDP unit on entry;
    every process must enter). Inside, forwards issue no collectives, so ranks may run different
    numbers of them. Models that are not sharded (or None) are passed over; nesting is harmless."""
    from torch.distributed.fsdp import FSDPModule

    units = list(
        {
            id(m): m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)
        }.values()
    )
    if not units or any(getattr(u, "_tether_unsharded", False) for u in units):
        yield
        return
    for model in models:  # before the first forward, the roots have not set up their state yet
        if isinstance(model, FSDPModule):
            model._get_fsdp_state()._lazy_init()  # private: FSDP2 has no public "init now"; idempotent
    # Restored afterwards as it was (private field): FSDP keeps the root unsharded after forward.
    saved = [(g, g.post_forward_mesh_info) for u in units for g in u._get_fsdp_state()._fsdp_param_groups]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)  # the pre-forward unshard is then a no-op: no collective
        u.unshard()
        u._tether_unsharded = True
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u._tether_unsharded = False
        for g, info in saved:
            g.post_forward_mesh_info = info


def shard_reference(reference, policy: torch.nn.Module) -> None:
    """Shard a reference that is its own frozen copy of the weights (``reference: copy``); the other
    forms share the policy's modules (lora), move between devices (offload) or are a cache."""
    if getattr(reference, "static_copy", False) and is_sharded(policy) and reference.model is not policy:
        shard_model(reference.model)


def models_of(*objs) -> list:
    """The modules to gather for a forward outside training: policies, and references' ``.model``."""
    mods = [getattr(o, "model", o) for o in objs if o is not None]
    return [m for m in mods if isinstance(m, torch.nn.Module)]  # a precomputed reference has no model


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this process holds (its shards under FSDP; outside ``unsharded``)."""
    seen, total = set(), 0
    for p in model.parameters():
        t = p.to_local() if is_dtensor(p) else p
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += t.numel() * t.element_size()
    return total


def grad_norm(params, max_norm: float) -> float:
    """Clip sharded gradients (if max_norm > 0) and return the global norm before clipping; the
    per-shard squares are summed across processes by DTensor (collective)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if is_dtensor(norm) else norm)


def full_state_dict(model: torch.nn.Module) -> Optional[dict]:
    """The model's state dict with every sharded tensor gathered in full (collective: every process
    calls it, outside ``unsharded``: FSDP's state-dict hook re-shards first), or None if not sharded.
    Saving passes it to ``save_pretrained``, whose own DTensor gathering would run on rank 0 alone."""
    if not is_sharded(model):
        return None
    out, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:  # a tied head: saved once, under the embeddings' name (as save_pretrained does)
            continue
        seen.add(id(v))
        out[k] = (v.full_tensor() if is_dtensor(v) else v).detach()
    return out


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with every sharded tensor gathered in full (collective: every process
    calls it), so the checkpoint has the format of an unsharded run."""
    state = opt.state_dict()
    state["state"] = {
        k: {n: (v.full_tensor() if is_dtensor(v) else v) for n, v in s.items()} for k, s in state["state"].items()
    }
    return state


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``opt.load_state_dict(full)``: re-shard each state tensor shaped like its sharded
    parameter (AdamW's moments) with the parameter's placements (collective, same order everywhere)."""
    from torch.distributed.tensor import distribute_tensor

    for group in opt.param_groups:
        for p in group["params"]:
            if not is_dtensor(p) or p not in opt.state:
                continue
            st = opt.state[p]
            for name, v in list(st.items()):
                if torch.is_tensor(v) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[name] = distribute_tensor(
                        v.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None
                    )


def load_full_weights(model: torch.nn.Module, state: dict) -> None:
    """Copy full tensors ``state`` (name -> tensor, as saved by an unsharded model) into a sharded
    model: each process keeps its own chunk. A tied head saved once (lm_head.weight absent) is fine."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    missing = [n for n in params if n not in state and not n.endswith("lm_head.weight")]
    unexpected = [n for n in state if n not in params and n not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if name not in state:
                continue
            full = state[name].to(dtype=p.dtype)
            if is_dtensor(p):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(full)
        for name, b in buffers.items():
            if name in state:
                b.copy_(state[name])


def load_weights_file(model: torch.nn.Module, folder: Path) -> None:
    """``load_full_weights`` from a checkpoint's model folder (safetensors files)."""
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    load_full_weights(model, state)
