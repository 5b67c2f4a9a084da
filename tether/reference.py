"""The reference model π_ref: the one place that owns it, whatever form it takes.

Every form answers the same two questions for a ``CompletionBatch``: ``logps(batch)`` — the
per-token log-probs of the completion tokens, (B, T) fp32 — and ``logits(batch)`` — the full
next-token distributions, (B, T, V), needed by the exact KL estimator. Both are computed with no
gradient and in eval mode (no dropout: TRL #506 shows dropout making the step-0 KL negative).
Both take the sampling ``filters`` of a sampled batch: the reference is then the fixed process π^τ_ref,
its logits divided by the sampling temperature τ over the whole vocabulary; top-k/top-p restrict only
the sampled policy, never the reference (docs/theory.md §3: the KL to a reference restricted to the
policy's own sets moves with the policy; ``engine.score_rows`` builds that form on request).
``on_step(policy, step)`` is called by trainers after every optimiser step; only synced forms act.

Forms (``build_reference`` picks one from a name; ``reference_from_config`` is the one place that
turns a trainer config's reference fields into one, loading the reference model):

- ``copy``        a separate frozen copy (eval mode, ``requires_grad=False``).
- ``lora``        the policy's own weights with its LoRA adapters disabled (peft): no second copy.
- ``precomputed`` reference log-probs computed once for a fixed dataset and cached on disk, keyed by
                  a hash of the reference weights and the tokenized data (a stale cache is never
                  read); the reference model is freed afterwards.
- ``offload``     a frozen copy that lives in CPU memory and visits the compute device per call.
- ``sync``        a copy re-synchronised from the policy: hard θ_ref ← θ every τ steps, or soft
                  θ_ref ← αθ + (1-α)θ_ref (TR-DPO, Gorbatovski et al. 2024). With a LoRA policy the
                  reference is a second adapter on the same base (``LoraSyncedReference``).
- ``lag``         (online trainers, ``ref_lag: N``) a rolling reference: the policy N steps ago, from
                  the last N snapshots of its trainable tensors (``LaggedReference``). The ProRL hard
                  reset (``ref_reset_every: N``) is ``sync`` in hard mode every N steps.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .errors import UserError
from .groups import SamplingSettings, sampling_settings
from .modeling import (
    CompletionBatch,
    check_compatible,
    completion_hidden,
    completion_logps,
    forward_completion,
    lm_head,
    model_fingerprint,
)

log = logging.getLogger(__name__)

REFERENCE_FORMS = ("copy", "lora", "precomputed", "offload", "sync")


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) and no grad for the duration; restores the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Reference:
    """Interface of every reference form."""

    kind = "base"
    has_distributions = True
    static_copy = (
        False  # its own weights, loaded once and never written (copy): may be sharded or moved off the accelerator
    )

    def logits(self, batch: CompletionBatch, *, filters: Optional[SamplingSettings] = None) -> torch.Tensor:
        """(B, T, V) reference logits at the completion positions, scored like the policy.

        ``filters``: the ``SamplingSettings`` ``batch`` was drawn with. The logits are
        divided by the temperature; top_k/top_p are not applied (the fixed reference π^τ_ref,
        docs/theory.md §3). None = the reference itself (τ = 1)."""
        raise NotImplementedError

    def head_model(self):
        """The module whose decoder and LM head ``hidden`` runs (``modeling.head_unsupported_reason`` decides
        whether its head can be applied apart), or None: this form gives logits only."""
        return None

    def hidden(self, batch: CompletionBatch) -> tuple:
        """(hidden (B, T, D), head weight (V, D), head bias (V,) or None): the reference's final hidden states at
        the completion positions and its LM head, for ``ops.head.head_scores`` (the update's ``chunked_head``),
        no gradient, eval mode; ``logits`` is the head applied to them (before the temperature)."""
        raise NotImplementedError(f"reference form {self.kind!r} gives logits only")

    def logps(
        self, batch: CompletionBatch, *, ids: Optional[Sequence] = None, filters: Optional[SamplingSettings] = None
    ) -> torch.Tensor:
        """(B, T) fp32 reference log-probs of ``batch``'s completion tokens (0 off-mask), under
        ``filters`` as in ``logits``.

        ``ids`` identifies the rows for the precomputed form; the others ignore it."""
        return completion_logps(None, batch, logits=self.logits(batch, filters=filters))

    def on_step(self, policy, step: int) -> bool:
        """Called after optimiser step ``step`` (1-based). Returns True if the reference changed."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FrozenReference(Reference):
    """(a) A separate frozen copy of a model."""

    kind = "copy"
    static_copy = True

    def __init__(self, model):
        self.model = freeze(model)

    def logits(self, batch, *, filters=None):
        with eval_mode(self.model):
            device = next(self.model.parameters()).device
            return _scored(self.model, batch.to(device), filters)

    def head_model(self):
        return self.model

    def hidden(self, batch):
        with eval_mode(self.model):
            device = next(self.model.parameters()).device
            return (completion_hidden(self.model, batch.to(device)), *lm_head(self.model))


class OffloadedReference(FrozenReference):
    """(d) A frozen copy kept in ``offload_device`` memory (CPU) and moved to ``compute_device``
    only for the duration of a call, so it holds no accelerator memory while the policy trains."""

    kind = "offload"
    static_copy = False  # already managed: moved to the compute device per call

    def __init__(self, model, *, compute_device: str | torch.device = "cpu", offload_device: str = "cpu"):
        super().__init__(model.to(offload_device))
        self.compute_device, self.offload_device = torch.device(compute_device), torch.device(offload_device)

    def head_model(self):  # the head must stay where the hidden states are: only when nothing moves
        return self.model if self.compute_device == self.offload_device else None

    def logits(self, batch, *, filters=None):
        moved = self.compute_device != self.offload_device
        if moved:
            self.model.to(self.compute_device)
        try:
            with eval_mode(self.model):
                return _scored(self.model, batch.to(self.compute_device), filters)
        finally:
            if moved:
                self.model.to(self.offload_device)


class LoraDisabledReference(Reference):
    """(b) The policy itself with its LoRA adapters switched off (peft ``disable_adapter``):
    the frozen base weights *are* the reference, at no memory cost."""

    kind = "lora"

    def __init__(self, peft_model):
        if not hasattr(peft_model, "disable_adapter"):
            raise UserError("reference 'lora' needs a peft (LoRA) policy; enable LoRA or choose reference 'copy'")
        self.model = peft_model

    def logits(self, batch, *, filters=None):
        with eval_mode(self.model), self.model.disable_adapter():
            device = next(self.model.parameters()).device
            return _scored(self.model, batch.to(device), filters)

    def head_model(self):
        return self.model

    def hidden(self, batch):
        with eval_mode(self.model), self.model.disable_adapter():
            device = next(self.model.parameters()).device
            return (completion_hidden(self.model, batch.to(device)), *lm_head(self.model))


class SyncedReference(FrozenReference):
    """(e) A frozen copy re-synchronised from the policy (TR-DPO, Gorbatovski et al. 2024, Eq. 6–7).

    mode ``hard``: θ_ref ← θ every ``every`` steps (paper default τ = 512). mode ``soft``:
    θ_ref ← αθ + (1-α)θ_ref every ``every`` steps (paper: every step, α = 0.6). docs/theory.md §6.
    """

    kind = "sync"
    static_copy = False  # written from the policy's tensors

    def __init__(self, model, *, mode: str = "hard", every: int = 512, alpha: float = 0.6):
        super().__init__(model)
        if mode not in ("hard", "soft"):
            raise UserError(f"ref_sync mode must be 'hard' or 'soft', got {mode!r}")
        if every < 1 or not 0.0 < alpha <= 1.0:
            raise UserError("ref_sync_every must be >= 1 and ref_sync_alpha in (0, 1]")
        self.mode, self.every, self.alpha = mode, int(every), float(alpha)
        self.syncs = 0

    @torch.no_grad()
    def on_step(self, policy, step):
        if step % self.every:
            return False
        ref_params = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():
            if name not in ref_params:
                raise ValueError(f"cannot sync reference: parameter {name!r} missing from the reference")
            target = ref_params[name]
            src = p.detach().to(target.device, target.dtype)
            if self.mode == "hard":
                target.copy_(src)
            else:
                target.mul_(1 - self.alpha).add_(src, alpha=self.alpha)
        self.syncs += 1
        return True

    @torch.no_grad()
    def load_policy_tensors(self, tensors: dict) -> None:
        """Overwrite the reference's parameters named in ``tensors`` (policy parameter names; the
        rolling reference ``LaggedReference`` writes its snapshots through this)."""
        ref_params = dict(self.model.named_parameters())
        for name, v in tensors.items():
            ref_params[name].copy_(v.to(ref_params[name].device, ref_params[name].dtype))

    def state_dict(self):
        # The reference weights themselves diverge from any file on disk once synced: checkpoint them.
        return {"syncs": self.syncs, "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state):
        self.syncs = int(state.get("syncs", 0))
        if "weights" in state:
            self.model.load_state_dict(state["weights"])


REF_ADAPTER = "tether_ref"


class LoraSyncedReference(Reference):
    """(e) with LoRA: the reference is the base plus a second adapter ``tether_ref`` that starts
    equal to the policy's adapter (zero delta at init) and is re-synced from it.

    Hard sync copies the adapter exactly. Soft sync mixes the LoRA factors A and B separately;
    since (αB₁+(1-α)B₀)(αA₁+(1-α)A₀) ≠ αB₁A₁+(1-α)B₀A₀, this is an approximation of TR-DPO's
    weight-space mixture (exact when either side is the zero delta or α = 1).
    """

    kind = "sync"

    def __init__(
        self, peft_model, *, mode: str = "hard", every: int = 512, alpha: float = 0.6, adapter: str = "default"
    ):
        if not hasattr(peft_model, "peft_config"):
            raise UserError("LoraSyncedReference needs a peft model")
        if mode not in ("hard", "soft"):
            raise UserError(f"ref_sync mode must be 'hard' or 'soft', got {mode!r}")
        self.model, self.mode, self.every, self.alpha, self.adapter = (
            peft_model,
            mode,
            int(every),
            float(alpha),
            adapter,
        )
        self.syncs = 0
        cfg = copy.deepcopy(peft_model.peft_config[adapter])
        cfg.inference_mode = True
        peft_model.add_adapter(REF_ADAPTER, cfg)
        self._copy(alpha=1.0)
        peft_model.set_adapter(adapter)  # keep the policy adapter active and trainable
        self.model.base_model.train(peft_model.training)

    def _pairs(self):
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            if f".{self.adapter}." in name:
                yield p, params[name.replace(f".{self.adapter}.", f".{REF_ADAPTER}.")]

    @torch.no_grad()
    def _copy(self, *, alpha: float):
        for src, dst in self._pairs():
            dst.requires_grad_(False)
            dst.mul_(1 - alpha).add_(src.detach(), alpha=alpha)

    def logits(self, batch, *, filters=None):
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.set_adapter(REF_ADAPTER)
        try:
            with eval_mode(self.model):
                device = next(self.model.parameters()).device
                return _scored(self.model, batch.to(device), filters)
        finally:
            self.model.set_adapter(self.adapter)
            for n, p in self.model.named_parameters():  # set_adapter flips requires_grad: restore exactly
                p.requires_grad_(n in trainable)

    def on_step(self, policy, step):
        if step % self.every:
            return False
        self._copy(alpha=1.0 if self.mode == "hard" else self.alpha)
        self.syncs += 1
        return True

    @torch.no_grad()
    def load_policy_tensors(self, tensors: dict) -> None:
        """Write policy-adapter tensors (policy parameter names) into the reference adapter."""
        params = dict(self.model.named_parameters())
        for name, v in tensors.items():
            if f".{self.adapter}." in name:
                dst = params[name.replace(f".{self.adapter}.", f".{REF_ADAPTER}.")]
                dst.copy_(v.to(dst.device, dst.dtype))

    def state_dict(self):
        return {
            "syncs": self.syncs,
            "adapter": {id_: dst.detach().clone() for id_, (_, dst) in enumerate(self._pairs())},
        }

    def load_state_dict(self, state):
        self.syncs = int(state.get("syncs", 0))
        with torch.no_grad():
            for i, (_, dst) in enumerate(self._pairs()):
                dst.copy_(state["adapter"][i])


class LaggedReference(Reference):
    """(f) A rolling reference that lags ``lag`` optimiser steps behind the policy: the rollout of step
    t (policy θ_t) is scored against θ_{max(t-N, 0)} (docs/theory.md §14). The last N snapshots of the
    policy's *trainable* tensors (the LoRA factors with a LoRA policy) are kept in CPU memory; frozen
    tensors never change, so the reference (``inner``: a ``SyncedReference`` copy or a
    ``LoraSyncedReference`` adapter, whose own periodic sync is off) already holds them. Snapshots and
    reference weights are checkpointed (``state_dict``), so a resumed run continues bit for bit."""

    kind = "lag"

    def __init__(self, inner: Reference, *, lag: int):
        if lag < 1:
            raise UserError(f"ref_lag must be >= 1 (0 = off), got {lag}")
        self.inner, self.lag = inner, int(lag)
        self.snapshots: list[dict] = []  # oldest first: the policy after steps t-N+1 .. t
        self.syncs = 0

    @property
    def model(self):
        """The module that scores (the inner reference's), for code that reaches for ``reference.model``."""
        return self.inner.model

    def logits(self, batch, *, filters=None):
        return self.inner.logits(batch, filters=filters)

    def head_model(self):
        return self.inner.head_model()

    def hidden(self, batch):
        return self.inner.hidden(batch)

    def logps(self, batch, *, ids=None, filters=None):
        return self.inner.logps(batch, ids=ids, filters=filters)

    @torch.no_grad()
    def on_step(self, policy, step):
        self.snapshots.append(
            {n: p.detach().to("cpu", copy=True) for n, p in policy.named_parameters() if p.requires_grad}
        )
        if len(self.snapshots) <= self.lag:
            return False  # steps 1..N: the reference is still θ_0
        self.inner.load_policy_tensors(self.snapshots.pop(0))  # θ_{step-N}
        self.syncs += 1
        return True

    def state_dict(self):
        return {
            "lag": self.lag,
            "syncs": self.syncs,
            "inner": self.inner.state_dict(),
            "snapshots": [dict(s) for s in self.snapshots],
        }

    def load_state_dict(self, state):
        if int(state.get("lag", self.lag)) != self.lag:
            raise UserError(
                f"the checkpoint's ref_lag is {state['lag']} but this run's is {self.lag}; resume with the same ref_lag"
            )
        self.syncs = int(state.get("syncs", 0))
        self.inner.load_state_dict(state["inner"])
        self.snapshots = [{k: v.clone() for k, v in s.items()} for s in state.get("snapshots", [])]


def _scored(model, batch: CompletionBatch, filters: Optional[SamplingSettings]) -> torch.Tensor:
    """The reference's completion logits under the sampling ``filters`` (``Reference.logits``): tempered,
    over the whole vocabulary (π^τ_ref)."""
    return forward_completion(model, batch, filters=sampling_settings(filters).for_reference())[0]


def _data_fingerprint(rows: Iterable[tuple], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for key, prompt, completion in rows:
        h.update(repr((key, list(prompt), list(completion))).encode())
    return h.hexdigest()[:16]


class PrecomputedReference(Reference):
    """(c) Reference log-probs computed once over a fixed set of (id, prompt, completion) rows and
    cached on disk (safetensors), after which the reference model is released.

    The cache file name is a hash of the reference weights and of the exact token ids, so a changed
    model or dataset can never read a stale cache. No full distributions are kept (they would be
    (N, T, V)), so the exact KL estimator needs a live reference form.
    """

    kind = "precomputed"
    has_distributions = False

    def __init__(self, table: dict, path: Optional[Path] = None):
        self.table, self.path = table, path

    @classmethod
    def build(
        cls,
        reference: Reference,
        model_for_key,
        rows: Sequence[tuple],
        *,
        pad_id: int,
        cache_dir: str | os.PathLike,
        batch_size: int = 32,
        progress: bool = False,
        packed: bool = False,
        share_prompts: str = "off",
    ) -> "PrecomputedReference":
        """rows: (id, prompt_ids, completion_ids). ``model_for_key``: the model whose weights key the cache.

        ``packed``: score ``batch_size`` rows at a time padding-free, as DPO trains
        (``data.preference.pack_sequences`` + ``modeling.packed_token_logps``: no padding, the LM head
        only on completion positions) instead of one left-padded batch; needs a ``FrozenReference``
        (a module to call) and a model that packing works for (``trainers.dpo.packing_works``). The
        log-probs differ from the padded pass by float rounding only (tests/test_reference.py).
        ``share_prompts`` (with ``packed``): "on" lays the rows of a pass that share a prompt out as one
        [prompt, completion, completion, ...] segment (``modeling.shared_prompt_token_logps``), "auto"
        where that saves enough token slots (``data.preference.share_prompts_pays``), "off" never; put
        rows with the same prompt next to each other so they meet in one pass."""
        from safetensors.torch import load_file, save_file

        from .data.preference import pack_sequences, share_prompts_pays
        from .modeling import make_batch, packed_token_logps, shared_prompt_token_logps

        key = f"{model_fingerprint(model_for_key)}-{_data_fingerprint(rows)}"
        path = Path(cache_dir) / f"ref_logps-{key}.safetensors"
        if path.exists():
            flat = load_file(str(path))
            log.info("reference log-probs read from cache %s", path)
            return cls(_unflatten(flat), path)
        table: dict = {}
        it = range(0, len(rows), batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="reference log-probs", unit="batch")
        for start in it:
            chunk = rows[start : start + batch_size]
            if packed:
                model = reference.model
                with eval_mode(model):
                    seqs = [(r[1], r[2]) for r in chunk]
                    share = share_prompts_pays(seqs, share_prompts)
                    pb = pack_sequences(seqs, pad_id=pad_id, share_prompts=share).to(next(model.parameters()).device)
                    score = shared_prompt_token_logps if share else packed_token_logps
                    lp = score(model, pb).cpu().split(pb.lengths.tolist())  # per row, in order
                for (rid, _, _), row in zip(chunk, lp):
                    table[rid] = row.clone()
                continue
            batch = make_batch([r[1] for r in chunk], [r[2] for r in chunk], pad_id=pad_id)
            lp = reference.logps(batch)
            for (rid, _, comp), row in zip(chunk, lp):
                table[rid] = row[: len(comp)].clone()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per-process name: concurrent builders never share a file
        save_file(_flatten(table), str(tmp))
        os.replace(tmp, path)  # atomic: a half-written cache is never visible under the final name
        return cls(table, path)

    def logits(self, batch, *, filters=None):
        raise ValueError(
            "the precomputed reference stores log-probs only; the exact KL estimator needs full reference "
            "distributions: use reference 'copy', 'offload' or 'lora' for it"
        )

    def logps(self, batch, *, ids=None, filters=None):
        if sampling_settings(filters).temperature != 1.0:  # top-k/top-p never filter the reference
            raise ValueError(
                "the precomputed reference stores log-probs at temperature 1; scoring completions sampled "
                "at another temperature needs a live reference form ('copy', 'offload' or 'lora')"
            )
        if ids is None:
            raise ValueError("the precomputed reference needs the row ids of the batch (ids=...)")
        out = torch.zeros(batch.mask.shape, dtype=torch.float32)
        for i, rid in enumerate(ids):
            row = self.table.get(rid)
            if row is None:
                raise KeyError(f"row {rid!r} is not in the precomputed reference cache (was the data changed?)")
            n = int(batch.mask[i].sum())
            if n != row.numel():
                raise ValueError(f"row {rid!r}: cached {row.numel()} tokens but the batch has {n}")
            out[i, :n] = row
        return out.to(batch.mask.device)


def _flatten(table: dict) -> dict:
    keys = list(table)
    values = [table[k] for k in keys]
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.long)
    flat = torch.cat(values) if values else torch.zeros(0)
    key_bytes = torch.tensor(list("\n".join(map(str, keys)).encode()), dtype=torch.uint8)
    return {"values": flat.contiguous(), "lengths": lengths, "keys": key_bytes}


def _unflatten(flat: dict) -> dict:
    keys = bytes(flat["keys"].tolist()).decode().split("\n") if flat["keys"].numel() else []
    out, start = {}, 0
    for k, n in zip(keys, flat["lengths"].tolist()):
        out[_parse_key(k)] = flat["values"][start : start + n]
        start += n
    return out


def _parse_key(k: str):
    return int(k) if k.lstrip("-").isdigit() else k


def check_reference_form(form: str, forms: Sequence[str] = REFERENCE_FORMS, *, why: str = "") -> None:
    """``form`` is one of the reference forms a trainer supports (``forms``; ``why``: the reason the
    others are out). The one check of the rule: ``build_reference``, ``reference_from_config`` and every
    trainer's config check call it (``UserError``)."""
    if form not in forms:
        raise UserError(f"reference must be one of {tuple(forms)}, got {form!r}{why}; set --reference")


def check_lora_reference(cfg) -> None:
    """reference 'lora' (the policy with its adapters off) needs a LoRA policy: ``lora_r`` >= 1, or a peft
    ``peft_config`` or peft model handed to the train call (``tether.inputs``)."""
    from .inputs import given

    g = given()
    lora_given = g.peft_config is not None or hasattr(g.model, "peft_config")
    if getattr(cfg, "reference", None) == "lora" and getattr(cfg, "lora_r", 1) < 1 and not lora_given:
        raise UserError(
            "reference='lora' reads the policy with its LoRA adapters off, so it needs --lora_r >= 1; "
            "set --lora_r or choose --reference copy"
        )


def build_reference(
    form: str,
    *,
    policy,
    reference_model=None,
    policy_tokenizer=None,
    reference_tokenizer=None,
    compute_device: str | torch.device = "cpu",
    sync_mode: str = "hard",
    sync_every: int = 512,
    sync_alpha: float = 0.6,
) -> Reference:
    """The one factory trainers call. ``reference_model`` defaults to a deep copy of ``policy``
    (the reference defaults to the starting model); for 'lora' it is ignored."""
    check_reference_form(form)
    is_peft = hasattr(policy, "peft_config")
    if form == "lora":
        return LoraDisabledReference(policy)
    if form == "sync" and is_peft:
        return LoraSyncedReference(policy, mode=sync_mode, every=sync_every, alpha=sync_alpha)
    if reference_model is None:
        if is_peft:
            raise UserError(
                f"reference {form!r} with a LoRA policy: load the reference model separately "
                "(reference_model=...), or use reference 'lora' (adapters disabled)"
            )
        reference_model = copy.deepcopy(policy)
    check_compatible(policy, reference_model, policy_tokenizer, reference_tokenizer)
    if form == "copy" or form == "precomputed":  # precomputed starts live; the trainer converts it
        return FrozenReference(reference_model)
    if form == "offload":
        return OffloadedReference(reference_model, compute_device=compute_device)
    return SyncedReference(reference_model, mode=sync_mode, every=sync_every, alpha=sync_alpha)


SYNC_DEFAULTS = {"ref_sync_mode": "hard", "ref_sync_every": 512, "ref_sync_alpha": 0.6}


def reference_from_config(
    cfg,
    *,
    policy,
    tokenizer,
    policy_path,
    device: str | torch.device,
    forms: Sequence[str] = REFERENCE_FORMS,
) -> Reference:
    """The live reference a trainer's config asks for: the one place that reads the reference fields
    of a config (DPO's and the online methods'), loads the reference model and calls ``build_reference``.

    Reads ``cfg.reference`` (the form; must be in ``forms``, the ones the caller supports),
    ``cfg.reference_model`` (a model path or asset name; default: the policy's own starting
    weights), ``cfg.dtype``, ``cfg.assets`` and, when the config has them (DPO), the TR-DPO fields
    ``ref_sync_mode``, ``ref_sync_every``, ``ref_sync_alpha`` (else ``SYNC_DEFAULTS``).

    - ``lora``, and ``precomputed`` / ``sync`` with a LoRA policy and no reference_model: the policy's
      base with its adapters off (or, for ``sync``, a second adapter): no second model is loaded.
    - otherwise the reference model is loaded from disk (``reference_model``, else ``policy_path``),
      directly into CPU memory for ``offload``. From disk rather than deep-copied: a LoRA policy
      cannot be copied into a reference, the offloaded copy never visits the accelerator, and the
      weights equal the starting policy's exactly. Its tokenizer is checked against ``tokenizer``.
      ``policy_path=None`` deep-copies the (non-LoRA) policy instead; ``policy_path`` may also be a
      ``training.Start`` (a path, or a model object handed to the train call: copied, adapters merged).
    - ``precomputed`` returns its live partner, a frozen copy: the caller builds the cache from it
      (``PrecomputedReference.build``) and keeps it for the exact KL, which needs distributions.

    ``device``: where the reference computes (and, except for ``offload``, lives)."""
    form = cfg.reference
    check_reference_form(form, forms)
    sync = {k[4:]: getattr(cfg, k, v) for k, v in SYNC_DEFAULTS.items()}  # ref_sync_mode -> sync_mode, ...
    is_peft = hasattr(policy, "peft_config")
    if cfg.reference_model and (form == "lora" or (is_peft and form == "sync")):
        # Refused rather than ignored: both forms are built from the policy's own weights.
        raise UserError(
            f"reference_model cannot be used with reference={form!r}"
            f"{' and a LoRA policy' if form == 'sync' else ''}: the reference is the policy's own base "
            "(adapters off, or a second adapter for sync); drop reference_model or use reference "
            "'copy' or 'offload'"
        )
    reset, lag = int(getattr(cfg, "ref_reset_every", 0) or 0), int(getattr(cfg, "ref_lag", 0) or 0)
    if reset or lag:  # a moving reference (ProRL reset / rolling lag): TR-DPO's hard sync machinery
        if reset and lag:
            raise UserError("ref_reset_every and ref_lag are two different references; set one of them (the other 0)")
        if reset < 0 or lag < 0:
            raise UserError(f"ref_reset_every and ref_lag must be >= 0 (0 = off), got {reset} and {lag}")
        if form not in ("copy", "lora"):
            raise UserError(
                f"ref_reset_every / ref_lag need reference 'copy' (or 'lora' with a LoRA policy), got {form!r}"
            )
        if form == "lora" and not is_peft:
            raise UserError("reference 'lora' needs a peft (LoRA) policy; enable LoRA or choose reference 'copy'")
        if lag and cfg.reference_model:
            raise UserError(
                "ref_lag with reference_model: the lagged reference is the policy N steps ago, so it starts "
                "from the policy's own weights; drop reference_model (or use ref_reset_every)"
            )
        if is_peft and cfg.reference_model:
            raise UserError(
                "ref_reset_every with a LoRA policy resets a second adapter on the policy's base; drop reference_model"
            )
        sync = {"sync_mode": "hard", "sync_every": reset or 2**62, "sync_alpha": 1.0}
        form = "sync"
    if form == "lora" or (is_peft and form in ("precomputed", "sync") and not cfg.reference_model):
        ref = build_reference("sync" if form == "sync" else "lora", policy=policy, **sync)
        return LaggedReference(ref, lag=lag) if lag else ref
    ref_model = ref_tok = None
    if cfg.reference_model or policy_path is not None:
        from .assets import resolve_model
        from .modeling import load_causal_lm, load_tokenizer

        path = resolve_model(cfg.reference_model, cfg.assets) if cfg.reference_model else policy_path
        load = dict(
            dtype=cfg.dtype, device="cpu" if form == "offload" else device, autocast=getattr(cfg, "autocast", False)
        )
        # computed as the policy is
        ref_model = load_causal_lm(path, **load) if isinstance(path, str) else path.load(**load)
        ref_tok = load_tokenizer(path) if cfg.reference_model else tokenizer
    ref = build_reference(
        "copy" if form == "precomputed" else form,
        policy=policy,
        reference_model=ref_model,
        policy_tokenizer=tokenizer,
        reference_tokenizer=ref_tok,
        compute_device=device,
        **sync,
    )
    return LaggedReference(ref, lag=lag) if lag else ref
