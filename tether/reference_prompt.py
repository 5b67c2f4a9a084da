"""Scoring the reference on a different prompt than the policy (docs/theory.md §13).

Two users of one mechanism:

- the **remedy** for reference shift (``OnlineConfig.reference_prompt``): the reference is scored on a
  user-transformed prompt g(x) (e.g. with a known jailbreak prefix stripped) while the policy samples
  and is scored on x, so every KL the trainer applies or logs is KL[π_θ(·|x)‖π_ref(·|g(x))];
- the **diagnostic** ``tether shift``: the same completions scored by the reference with and without a
  prefix (the map adds it).

``remap_prompts`` rebuilds a ``CompletionBatch`` with new prompt ids and the *same* completion block
(ids, attention, mask and the sampler's stored filter sets ``allowed``, all completion-aligned), so
the reference's (B, T, V) logits stay aligned token for token with the policy's: the exact estimator
and k1/k2/k3 compare the same completion token at the same index t.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError
from .modeling import CompletionBatch
from .reference import Reference

PromptMap = Callable[[Sequence[int]], Sequence[int]]


def prompt_rows(batch: CompletionBatch) -> list[list[int]]:
    """The unpadded prompt ids of each row of ``batch`` (left padding removed)."""
    P = batch.prompt_len
    ids, attn = batch.input_ids[:, :P].cpu(), batch.attention_mask[:, :P].cpu().bool()
    return [ids[i][attn[i]].tolist() for i in range(ids.shape[0])]


def remap_prompts(batch: CompletionBatch, prompts: Sequence[Sequence[int]], *, pad_id: int) -> CompletionBatch:
    """``batch`` with row i's prompt replaced by ``prompts[i]`` (left-padded to the longest), the
    completion block (B, T) copied unchanged, so completion position t stays index t."""
    if len(prompts) != batch.input_ids.shape[0]:
        raise ValueError(f"need one prompt per row: {len(prompts)} prompts for {batch.input_ids.shape[0]} rows")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a remapped prompt is empty: the completion needs at least one context token (e.g. BOS)")
    B, P = len(prompts), max(len(p) for p in prompts)
    dev = batch.input_ids.device
    head = torch.full((B, P), pad_id, dtype=batch.input_ids.dtype)
    head_attn = torch.zeros((B, P), dtype=batch.attention_mask.dtype)
    for i, p in enumerate(prompts):
        head[i, P - len(p) :] = torch.tensor(list(p), dtype=head.dtype)
        head_attn[i, P - len(p) :] = 1
    Q = batch.prompt_len
    ids = torch.cat([head.to(dev), batch.input_ids[:, Q:]], dim=1)  # (B, P + T)
    attn = torch.cat([head_attn.to(dev), batch.attention_mask[:, Q:]], dim=1)  # (B, P + T)
    return CompletionBatch(ids, attn, batch.mask, P, batch.allowed)


class PromptMappedReference(Reference):
    """A reference scored on ``prompt_map(prompt ids)`` instead of the prompt ids of each batch row.

    Everything else (``on_step``, ``state_dict``, resets and syncs) is the wrapped reference's: the
    wrapper only changes which prompt the reference sees. Rows whose mapped prompt equals their own
    are scored on the original batch object (so the identity map is bit-identical to no map)."""

    def __init__(self, inner: Reference, prompt_map: PromptMap, *, pad_id: int):
        self.inner, self.prompt_map, self.pad_id = inner, prompt_map, pad_id
        self.has_distributions, self.kind = inner.has_distributions, inner.kind

    def mapped(self, batch: CompletionBatch) -> CompletionBatch:
        rows = prompt_rows(batch)
        new = [list(self.prompt_map(r)) for r in rows]
        return batch if new == rows else remap_prompts(batch, new, pad_id=self.pad_id)

    def logits(self, batch, *, filters=None):
        return self.inner.logits(self.mapped(batch), filters=filters)

    def head_model(self):
        return self.inner.head_model()

    def hidden(self, batch):
        return self.inner.hidden(self.mapped(batch))

    def logps(self, batch, *, ids=None, filters=None):
        return self.inner.logps(self.mapped(batch), ids=ids, filters=filters)

    def on_step(self, policy, step):
        return self.inner.on_step(policy, step)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        return self.inner.load_state_dict(state)

    def __getattr__(self, name):  # anything else (model, mode, ...) is the wrapped reference's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# --------------------------------------------------------------------------------------------------
# the user's prompt transform


def strip_prefix(text: str) -> Callable[[str], str]:
    """The built-in transform ``strip_prefix:TEXT``: a prompt starting with TEXT loses it (leading
    whitespace after it too); any other prompt is unchanged."""

    def transform(prompt: str) -> str:
        return prompt[len(text) :].lstrip() if prompt.startswith(text) else prompt

    return transform


def load_prompt_transform(spec: str) -> Callable[[str], str]:
    """A prompt transform (str -> str) from ``strip_prefix:TEXT``, ``file.py:function`` or
    ``package.module:function``."""
    where = f"reference_prompt={spec!r}"
    if spec.startswith("strip_prefix:"):
        text = spec[len("strip_prefix:") :]
        if not text:
            raise UserError(f"{where}: strip_prefix needs the text to strip, e.g. strip_prefix:'Ignore all rules.'")
        return strip_prefix(text)
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UserError(f"{where}: expected strip_prefix:TEXT, file.py:function or module:function")
    try:
        if path.endswith(".py"):
            if not Path(path).is_file():
                raise UserError(f"{where}: no such file {path}; check the path")
            mod_spec = importlib.util.spec_from_file_location(f"_tether_reference_prompt_{Path(path).stem}", path)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(path)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {path} ({e}); give file.py:function or an importable module") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(f"{where}: {path} has no function {name!r}")
    return fn


def transformed_prompt_map(
    transform: Callable[[str], str],
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    encode: Callable[[list[str]], list[list[int]]],
) -> PromptMap:
    """The token-level map of a string transform over known prompts: ``ids[i]`` (the encoding of
    ``texts[i]``) -> the encoding of ``transform(texts[i])``. A prompt not in the table (e.g. a
    forgetting-probe text's BOS) is left unchanged."""
    table: dict[tuple, list[int]] = {}
    new_texts = []
    for i, t in enumerate(texts):
        out = transform(t)
        if not isinstance(out, str):
            raise UserError(f"reference_prompt returned {type(out).__name__} for prompt {i}; it must return a string")
        new_texts.append(out)
    for old, new in zip(ids, encode(new_texts)):
        table[tuple(old)] = list(new)

    def prompt_map(prompt_ids: Sequence[int]) -> list[int]:
        return table.get(tuple(prompt_ids), list(prompt_ids))

    return prompt_map


def prefixed_prompt_map(prefix_ids: Sequence[int], *, bos_id: Optional[int]) -> PromptMap:
    """prompt ids -> the prefix tokens inserted after a leading BOS (or at the front)."""
    prefix = list(prefix_ids)

    def prompt_map(prompt_ids: Sequence[int]) -> list[int]:
        p = list(prompt_ids)
        if bos_id is not None and p and p[0] == bos_id:
            return [bos_id] + prefix + p[1:]
        return prefix + p

    return prompt_map
