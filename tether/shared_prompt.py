"""The shared-prompt layout: a group of completions of one prompt scored as one row.

An online group is G completions of the same prompt. The padded layout (``modeling.CompletionBatch``)
scores it as G rows of (left-padded prompt, right-padded completion), so the trunk computes the prompt
G times: G·(P + T) token positions. The shared layout lays the group out as one row

    [prompt, completion_1, ..., completion_G]

with a prefix-tree attention mask: every prompt token attends causally to the prompt, every token of
completion i attends to the whole prompt and causally to completion i, never to another completion.
Position ids of every completion continue from the prompt length. Each completion token therefore sees
exactly the keys, values and positions it sees in the padded layout, and the trunk computes P + G·T
positions (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
arXiv:2410.20305; PrefixGrouper, 2025, for GRPO). Completions are cut after their last counted token
(tokens after EOS are never computed), and the prompt's last position, which predicts the first token
of every completion, is computed once.

Rows are grouped by identical prompt tokens, so any batch works: a micro-batch holding a whole group
saves the most, rows whose prompt appears once cost what they cost before. Log-probs come back in the
usual (B, T) layout (``modeling.forward_completion_shared``), so nothing downstream changes; positions
off the mask (after EOS, padding) get zero logits, which every consumer masks.

The mask reaches Hugging Face's attention as a ready 4D mask (B', 1, W, W): ``masking_utils`` returns a
4D mask as it is, sdpa takes it boolean (True = attend), eager adds it, so it is given as 0 / -inf-like
floats there. Supported: Llama, GPT-2 (absolute position embeddings, which read the same position ids)
and Qwen2 without sliding-window layers, with sdpa or eager attention; any other model falls back to
the padded layout (logged once). docs/speed.md has the measurements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UserError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
_ON, _OFF = ("true", "on", "yes", "1"), ("false", "off", "no", "0")

SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "qwen2")
"""Architectures whose decoder takes the 4D mask and position ids as the layout needs, and whose logits are
the LM head of the last hidden state (no final soft-capping or logit scale); equality is tested for each
(tests/test_shared_prompt.py)."""
SUPPORTED_ATTENTION = ("sdpa", "eager")

AUTO_MARGIN = 0.8
"""auto uses the shared layout when its estimated arithmetic is below this fraction of the padded layout's
(``estimated_flops``). Measured on stories260K (reference forward + policy forward/backward of a
micro-batch, ``benchmarks/bench_shared_prompt.py``): at an estimate of 0.86 the shared layout ran 0.84x the
padded one's speed, at 0.90 1.0x, at 0.74 1.15x, at 0.33 2.2x (building the layout and the dense mask cost
a little, which matters at tiny sizes; at 20M parameters 0.33 gave 3.5x)"""


def shared_prompt_mode(value) -> str:
    """The config's ``shared_prompt`` (auto | true | false, or on | off) as one of ``MODES``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    s = str(value).strip().lower()
    if s == "auto":
        return "auto"
    if s in _ON:
        return "on"
    if s in _OFF:
        return "off"
    raise UserError(f"shared_prompt must be auto, true or false, got {value!r}; set --shared_prompt")


def unsupported_reason(model) -> Optional[str]:
    """Why ``model`` cannot take the shared layout (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} takes no 4D mask here (sdpa or eager do)"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return "sliding-window layers (the 4D mask would replace their window)"
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return "no decoder / LM head to call separately"
    return None


_warned: set = set()


def supports_shared_prompt(model) -> bool:
    """True when ``model`` can take the shared layout; otherwise logs why, once per reason."""
    why = unsupported_reason(model)
    if why is not None and why not in _warned:
        _warned.add(why)
        log.info("shared_prompt: using the padded layout: %s", why)
    return why is None


@dataclass
class SharedLayout:
    """A ``CompletionBatch`` laid out with each prompt once.

    input_ids, position_ids: (R, W) long, one row per distinct prompt; allowed: (R, W, W) bool, True where
    query q may attend to key k (the prefix-tree mask; padding at the end of a row attends to itself and
    to the prompt, and nothing attends to it). keep: (U,) long, flat indices into (R·W) of the positions
    whose next-token logits are needed; src: (B, T) long, the index into ``keep`` of the position that
    predicts completion token t of batch row b, U where no position was computed (off the mask).
    tokens: R·W, the positions the trunk computes (padding included); padded_tokens: B·(P + T)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    keep: torch.Tensor
    src: torch.Tensor
    tokens: int
    padded_tokens: int


def shared_layout(batch) -> Optional[SharedLayout]:
    """The shared layout of ``batch`` (a ``modeling.CompletionBatch``), or None when it cannot be built
    exactly: a prompt whose real tokens are not one contiguous run, or a completion with an attention hole
    before its last counted token (the padded layout would skip that key; the prefix-tree mask would not)."""
    ids, attn, mask, P = batch.input_ids, batch.attention_mask.bool(), batch.mask, batch.prompt_len
    B, T = mask.shape
    device = ids.device
    steps = torch.arange(1, T + 1, device=device)
    need = (mask.long() * steps).amax(-1) if T else torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    p_len = attn[:, :P].sum(-1)  # (B,)
    if B == 0 or int(p_len.min()) < 1:  # an empty prompt has no position to predict the first token from
        return None
    # exactness checks: the prompt a contiguous suffix of its P columns, the completion attended up to `need`
    suffix = torch.arange(P, device=device)[None, :] >= (P - p_len)[:, None]  # (B, P)
    if not bool((attn[:, :P] == suffix).all()):
        return None
    upto = torch.arange(T, device=device)[None, :] < need[:, None]  # (B, T)
    if not bool((attn[:, P:] | ~upto).all()):
        return None
    ids_c, need_c, p_c = ids.cpu(), need.tolist(), p_len.tolist()
    groups: dict[tuple, list[int]] = {}
    for b in range(B):
        groups.setdefault(tuple(ids_c[b, P - p_c[b] : P].tolist()), []).append(b)
    R = len(groups)
    widths = [len(p) + sum(max(need_c[b] - 1, 0) for b in rows) for p, rows in groups.items()]
    W = max(max(widths), 1)
    out_ids = torch.zeros(R, W, dtype=torch.long)
    pos = torch.zeros(R, W, dtype=torch.long)
    seg = torch.full((R, W), -1, dtype=torch.long)  # 0 prompt, j + 1 completion j, -1 padding
    keep: list[int] = []
    src = torch.full((B, T), -1, dtype=torch.long)
    for r, (prompt, rows) in enumerate(groups.items()):
        p = len(prompt)
        if p:
            out_ids[r, :p] = torch.tensor(prompt, dtype=torch.long)
            pos[r, :p] = torch.arange(p)
            seg[r, :p] = 0
        last = len(keep)  # the prompt's last position predicts every completion's first token
        keep.append(r * W + p - 1)
        at = p
        for j, b in enumerate(rows):
            n = max(need_c[b] - 1, 0)  # inputs needed: tokens 0 .. need-2 (token need-1 predicts nothing counted)
            if need_c[b] >= 1:
                src[b, 0] = last
            if n:
                out_ids[r, at : at + n] = ids_c[b, P : P + n]
                pos[r, at : at + n] = torch.arange(p, p + n)
                seg[r, at : at + n] = j + 1
                src[b, 1 : n + 1] = torch.arange(len(keep), len(keep) + n)
                keep.extend(range(r * W + at, r * W + at + n))
            at += n
    U = len(keep)
    src = torch.where(src < 0, torch.full_like(src, U), src)
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]  # (R, W, W)
    allowed = causal & (same | (seg == 0)[:, None, :])
    return SharedLayout(
        input_ids=out_ids.to(device),
        position_ids=pos.to(device),
        allowed=allowed.to(device),
        keep=torch.tensor(keep, dtype=torch.long, device=device),
        src=src.to(device),
        tokens=R * W,
        padded_tokens=B * (P + T),
    )


def estimated_flops(model, rows: int, width: int) -> float:
    """Forward arithmetic of the trunk over ``rows`` x ``width`` positions with a dense (masked) attention:
    per position and layer 2·(4H² + k·H·I) for the projections and MLP (k = 3 gated, 2 plain), per row and
    layer 4·H·width² for QKᵀ and AV. Only ratios are used (``prefer_shared``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    H = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    gated = getattr(cfg, "model_type", "") != "gpt2"
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * H
    per_token = 2 * (4 * H * H + (3 if gated else 2) * H * int(inner))
    return rows * width * per_token + rows * 4 * H * width * width


def prefer_shared(model, batch, layout: SharedLayout) -> bool:
    """auto's choice for one batch: the shared layout when its estimated arithmetic is below ``AUTO_MARGIN``
    of the padded layout's."""
    R, W = layout.input_ids.shape
    B, L = batch.input_ids.shape
    return estimated_flops(model, R, W) < AUTO_MARGIN * estimated_flops(model, B, L)


def attention_mask_4d(allowed: torch.Tensor, model, dtype: torch.dtype) -> torch.Tensor:
    """(R, W, W) bool -> the (R, 1, W, W) mask the model's attention takes: bool for sdpa (True = attend),
    additive for eager (0 where allowed, the dtype's lowest value elsewhere)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    m = allowed[:, None, :, :]
    if getattr(base.config, "_attn_implementation", None) == "sdpa":
        return m
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
