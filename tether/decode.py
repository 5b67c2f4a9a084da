"""A lean KV-cached forward pass for Llama-architecture models, used by the built-in sampler.

Why: on a small model the Hugging Face forward is mostly per-call Python and dispatch work, not
arithmetic. A profile of one ``tether grpo`` step on stories260K (docs/speed.md) put 50% of the
step's CPU time in the sampler's 32 decode forwards of 16 rows, about 4 ms each, while the
matrix products in them take well under 1 ms. Per layer, ``LlamaDecoder`` runs the same
mathematics with fewer calls:

- a preallocated (static) KV cache per layer, written in place: no concatenation per step;
- q/k/v in one matrix product and gate/up in one (the weights concatenated once per ``sample`` call,
  so they follow the live policy after every optimiser step; models above ``FUSE_MAX_BYTES`` keep
  separate products);
- rotary cos/sin gathered from one table computed once by the model's own ``rotary_emb`` (the same
  values it computes per step: each entry is one product and one cos/sin, no reduction);
- one additive key mask for the whole call, sliced per step;
- finished rows leave the cache by one ``index_select`` (``select``).

Same mathematics, different rounding: the fused products may sum in another order, so logits differ
from the Hugging Face forward by float32 rounding (checked against ``forward_completion`` to f32
tolerance in tests/test_decode.py); the sampled tokens are the same except where two tokens' p/q
ratios tie to within that rounding. What the scoring pass then computes is unchanged: it recomputes the
log-probs with the model's own forward and restricts to the token sets F_t the sampler stored
(docs/theory.md §3), so the set at scoring is still the set at sampling; the distribution the tokens
were drawn from differs from the scored one by float32 rounding of the logits (about 2e-5 nats on
stories260K), far below any estimator's noise.

Only plain ``LlamaForCausalLM`` modules qualify (``supports``): default RoPE, no biases, SiLU MLP,
no peft wrapper, no sharded (DTensor) parameters. Anything else keeps the Hugging Face forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

FUSE_MAX_BYTES = 256 * 2**20
"""Fuse q/k/v and gate/up weights (a copy of about 2/3 of the parameters, made per ``sample`` call) only for
models up to this size: a small model's step is per-call overhead, which fusing saves; a large model's is
arithmetic, and the copy would cost memory (16 GB for an 8B model in bf16) for nothing."""


def supports(model) -> bool:
    """True when ``LlamaDecoder`` computes exactly what ``model``'s own forward computes (up to rounding)."""
    if type(model).__name__ != "LlamaForCausalLM":
        return False  # peft wrappers, other architectures (biases, sliding windows, other norms)
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return False
    if (
        getattr(cfg, "attention_bias", False)
        or getattr(cfg, "mlp_bias", False)
        or getattr(cfg, "hidden_act", "silu") != "silu"
    ):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    return not any(isinstance(p, DTensor) for p in model.parameters())


class LlamaDecoder:
    """KV-cached forward of a ``LlamaForCausalLM`` for ``batch_size`` rows and at most ``max_len`` cache
    slots (prompt + completion columns). Used under ``torch.no_grad`` in eval mode (no dropout).

    Slots are columns of the sampler's (B, P + N) attention mask: the left-padded prompt fills slots
    0..P-1 in ``forward`` at ``start=0``, and step t's token goes to slot P + t - 1."""

    def __init__(self, model, batch_size: int, max_len: int):
        cfg = model.config
        inner = model.model
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.embed = inner.embed_tokens.weight
        fuse = sum(p.numel() * p.element_size() for p in model.parameters()) <= FUSE_MAX_BYTES
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    layer.input_layernorm.variance_epsilon,
                    _fused([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], fuse),  # (Hq·d + 2·Hkv·d, D)
                    a.o_proj.weight,
                    a.scaling,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                    _fused([m.gate_proj.weight, m.up_proj.weight], fuse),
                    m.down_proj.weight,  # (2·I, D), (D, I)
                )
            )
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.lm_head.weight
        positions = torch.arange(max_len, device=self.device)[None]  # (1, L)
        cos, sin = inner.rotary_emb(self.embed[:1][None], positions)  # (1, L, d) each
        self.cos, self.sin = cos[0], sin[0]  # (L, d)
        shape = (batch_size, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.key_bias: Optional[torch.Tensor] = None  # (b, 1, 1, L) additive: 0 = real key, min = padding

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """(B, L) 1 = real token, 0 = padding: the key mask of every later call (sliced to the slots used)."""
        neg = torch.finfo(self.dtype).min  # finite: a padded query row (never read) gets no NaN
        self.key_bias = torch.zeros(attention_mask.shape, dtype=self.dtype, device=self.device)
        self.key_bias.masked_fill_(attention_mask == 0, neg)
        self.key_bias = self.key_bias[:, None, None, :]  # (B, 1, 1, L)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the current rows) in the cache and the mask."""
        self.k = [k.index_select(0, keep) for k in self.k]
        self.v = [v.index_select(0, keep) for v in self.v]
        self.key_bias = self.key_bias.index_select(0, keep)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of the last input position, (b, V) in the model's dtype, for ``input_ids`` (b, s) at
        rotary ``positions`` (b, s), written to cache slots start .. start + s - 1."""
        return self.logits(self.last_hidden(input_ids, positions, start))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, V) logits of ``last_hidden``'s (b, D) final-normed states: the LM head's product."""
        return F.linear(hidden, self.head)

    def last_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """``forward`` without the LM head: the final-normed hidden state of the last input position, (b, D).
        The sampler's shared prefill copies it to the rows of each prompt and applies the head to all B
        rows, so that product has the same shape (and so the same CPU kernel and rounding) as without it."""
        b, s = input_ids.shape
        end = start + s
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        bias = self.key_bias[:, :, :, :end]  # (b, 1, 1, end)
        if s > 1:  # prompt pass: also causal within the new slots
            causal = torch.ones((s, end), dtype=torch.bool, device=self.device).tril(start)  # (s, end)
            bias = bias.masked_fill(~causal, torch.finfo(self.dtype).min)  # (b, 1, s, end)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (b, 1, s, d)
        h = F.embedding(input_ids, self.embed)  # (b, s, D)
        for i, (w_in, eps_in, w_qkv, w_o, scale, w_post, eps_post, w_gu, w_down) in enumerate(self.layers):
            x = _rms(h, w_in, eps_in)
            qkv = _linear(x, w_qkv).view(b, s, H + 2 * Hkv, d).transpose(1, 2)  # (b, H + 2·Hkv, s, d)
            qk = qkv[:, : H + Hkv]  # rotated together: one set of calls for q and k
            qk = qk * cos + _rotate_half(qk) * sin
            q = qk[:, :H]  # (b, H, s, d)
            self.k[i][:, :, start:end] = qk[:, H:]  # (b, Hkv, s, d)
            self.v[i][:, :, start:end] = qkv[:, H + Hkv :]
            att = F.scaled_dot_product_attention(
                q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=bias, scale=scale, enable_gqa=H != Hkv
            )  # (b, H, s, d)
            h = h + F.linear(att.transpose(1, 2).reshape(b, s, H * d), w_o)
            gate, up = _linear(_rms(h, w_post, eps_post), w_gu).chunk(2, dim=-1)  # (b, s, I) each
            h = h + F.linear(F.silu(gate) * up, w_down)
        return _rms(h[:, -1], self.norm_w, self.norm_eps)  # (b, D)


def _fused(weights: list, fuse: bool):
    """One (sum of rows, D) matrix for one product, or the list kept as is (``_linear`` concatenates outputs)."""
    return torch.cat(weights) if fuse else list(weights)


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else torch.cat([F.linear(x, wi) for wi in w], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: w · (x / sqrt(mean(x²) + eps)), the normalisation in float32 and the product with w in
    x's dtype, as Hugging Face rounds it; one fused ``F.rms_norm`` call instead of six (equal to the bit on
    float32 and bfloat16 inputs, tests/test_decode.py)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
