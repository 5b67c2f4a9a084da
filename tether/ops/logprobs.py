"""Per-token log-probabilities, entropies and exact KLs from logits, in fp32, chunked.

Pure torch. Every function here takes logits of shape (B, T, V) (any float dtype) and never
materialises a second (B, T, V) float32 tensor: rows are processed in chunks of ``chunk_size``
positions, and when gradients are needed each chunk is wrapped in activation checkpointing, so what
autograd keeps between forward and backward is the (already existing) logits, not one fp32 copy
per chunk. The backward pass necessarily produces one (B, T, V) gradient for the logits.

Conventions: ``mask`` is True where a token counts; results are float32 (float64 when
the logits are float64: nothing is ever computed below fp32, and fp64 inputs are not rounded down).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024  # positions per chunk: 1024 x 150k vocab x 4 B = 600 MB transient at most


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the input already is fp64 (the exact oracles in ``tether.oracle``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16/fp32 -> fp32; fp64 stays fp64 (``.float()`` would silently round it to fp32)."""
    return x.to(_compute_dtype(x.dtype))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (B*T, V)


def _chunked(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Apply ``fn`` row-chunk by row-chunk to flattened (N, ...) tensors and concatenate.

    With autograd on, each chunk runs under non-reentrant checkpointing: the chunk's fp32
    intermediates are recomputed in backward instead of stored.
    """
    # torch.split, not slicing: one SplitBackward node concatenates the chunks' gradients once. A
    # slice per chunk makes autograd allocate, zero and accumulate a full (N, V) gradient per chunk
    # (num_chunks x the work and a second full-size buffer during backward).
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for parts in zip(*(t.split(chunk_size) for t in tensors)):
        if needs_grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    if not outs:
        return tensors[0].new_zeros((0,), dtype=_compute_dtype(tensors[0].dtype))
    return torch.cat(outs, dim=0)


def _gather_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = upcast(logits)  # (n, V)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (n,)
    return picked - torch.logsumexp(logits, dim=-1)


def selective_logps(logits: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits)[..., tokens] in fp32 (fp64 for fp64 logits).

    Args:
        logits: (B, T, V) next-token logits, position t scoring ``tokens[:, t]``.
        tokens: (B, T) int64 token ids.
    Returns:
        (B, T) float32 (float64 for float64 logits) log-probabilities. Equal in value and gradient
        to ``upcast(logits).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]``.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on (B, T)")
    out = _chunked(_gather_logp, [_rows(logits), tokens.reshape(-1)], chunk_size)
    return out.reshape(tokens.shape)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(upcast(logits), dim=-1)  # (n, V)
    p = logp.exp()
    # Filtered-out tokens have logp = -inf and p = 0: 0·log 0 = 0, and zeroing the input (not the
    # output) keeps the backward free of 0·inf = nan.
    logp = logp.masked_fill(p == 0, 0.0)
    return -(p * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-position entropy H[softmax(logits)] in nats. (B, T, V) -> (B, T) float32 (fp64 for fp64)."""
    out = _chunked(_entropy, [_rows(logits)], chunk_size)
    return out.reshape(logits.shape[:-1])


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(upcast(p_logits), dim=-1)  # (n, V)
    logq = F.log_softmax(upcast(q_logits), dim=-1)  # (n, V)
    p = logp.exp()
    outside = p == 0  # tokens p never samples (e.g. removed by top-k) contribute 0, whatever q says
    diff = (logp - logq).masked_fill(outside, 0.0)
    return (p * diff).sum(-1)


def exact_kl_from_logits(
    p_logits: torch.Tensor, q_logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Exact per-position KL[p‖q] = Σ_v p(v) (log p(v) - log q(v)) over the full vocabulary.

    This is the Rao-Blackwellised per-token KL (docs/theory.md §2, Amini et al. 2025): for states s_t
    sampled from π_θ, its sequence sum is an unbiased estimate of the sequence KL. Per token it has
    the lowest variance (Var ≤ Var(k1) at each state); a sequence sum need not (docs/theory.md §2).
    Where ``p_logits`` is -inf (a token outside the sampled set F_t) the term is 0 whatever ``q_logits``
    says, so filtered policy logits against unfiltered reference logits give KL[π^{τ,F}_θ‖π^τ_ref].

    Args:
        p_logits, q_logits: (B, T, V) logits of the two next-token distributions at each position.
    Returns:
        (B, T) float32 (float64 for float64 logits), ≥ 0 up to rounding.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"cannot compare distributions of shape {tuple(p_logits.shape)} and {tuple(q_logits.shape)}: "
            "policy and reference must share the vocabulary"
        )
    out = _chunked(_kl_rows, [_rows(p_logits), _rows(q_logits)], chunk_size)
    return out.reshape(p_logits.shape[:-1])


def _filter_cost_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    q = upcast(q_logits)  # (n, V)
    inside = q.masked_fill(p_logits == float("-inf"), float("-inf"))  # q's logits on F = {v: p_logits(v) > -inf}
    return torch.logsumexp(q, dim=-1) - torch.logsumexp(inside, dim=-1)  # -log q(F) ≥ 0


def filter_cost_from_logits(
    p_logits: torch.Tensor, q_logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """The filter's cost at each position: -log m_t, m_t = q(F_t) = Σ_{v∈F_t} softmax(q_logits)(v).

    F_t is the support of the sampled distribution, read from ``p_logits`` (the policy's logits after
    ``apply_sampling_filters``: -inf outside F_t); ``q_logits`` are the reference's tempered,
    *unfiltered* logits. One logsumexp over F_t minus one over the vocabulary. With
    p = π^{τ,F}_θ and q = π^τ_ref (docs/theory.md §3):

        KL[p‖q] = KL[p‖q|_F] - log m_t,        q|_F = q restricted to F_t and renormalised,

    so the KL to the fixed reference is the KL to the restricted reference plus this cost, which is
    what the filter alone moves the sampled distribution away from the reference (the whole KL for a
    model against itself). 0 where F_t is the vocabulary.

    Args:
        p_logits: (B, T, V) filtered policy logits (only their -inf pattern is read).
        q_logits: (B, T, V) tempered reference logits over the whole vocabulary.
    Returns:
        (B, T) float32 (float64 for float64 ``q_logits``), ≥ 0.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"cannot compare logits of shape {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    out = _chunked(_filter_cost_rows, [_rows(p_logits), _rows(q_logits)], chunk_size)
    return out.reshape(p_logits.shape[:-1])


def restrict_like(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """``q_logits`` set to -inf wherever ``p_logits`` is -inf: the reference restricted to the sampled
    distribution's support F_t (softmax renormalises it on F_t). The ``restricted`` reference of
    docs/theory.md §3, not tether's default. (..., V), (..., V) -> (..., V)."""
    return q_logits.masked_fill(p_logits == float("-inf"), float("-inf"))


def uses_token_filter(filters: Optional[dict]) -> bool:
    """True when ``filters`` (a dict with optional keys temperature, top_k, top_p) asks for top-k or
    top-p, i.e. when the sampled distribution has a support F_t smaller than the vocabulary."""
    f = filters or {}
    return (f.get("top_k") or 0) > 0 or f.get("top_p", 1.0) < 1.0


def pack_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """Bit-pack a token-set mask: bool (..., V) -> uint8 (..., ceil(V/8)).

    Bit j (least significant first) of byte i is token 8i + j; the padding bits of the last byte are 0.
    torch has no ``packbits``, so this is shift arithmetic. Inverse: ``unpack_allowed(packed, V)``.
    """
    if allowed.dtype != torch.bool:
        raise TypeError(f"pack_allowed takes a bool mask, got {allowed.dtype}")
    V = allowed.shape[-1]
    n = (V + 7) // 8
    bits = F.pad(allowed.to(torch.uint8), (0, 8 * n - V)).reshape(*allowed.shape[:-1], n, 8)  # (..., n, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=allowed.device)
    weights = torch.ones_like(shifts) << shifts  # (8,) 1, 2, ..., 128: made on the device (no host copy per call)
    return (bits * weights).sum(-1).to(torch.uint8)  # (..., n); at most 255, exact


def unpack_allowed(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """uint8 (..., ceil(V/8)) from ``pack_allowed`` -> bool (..., V)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_allowed takes a uint8 tensor from pack_allowed, got {packed.dtype}")
    if packed.shape[-1] != (vocab + 7) // 8:
        raise ValueError(f"a packed set of {packed.shape[-1]} bytes cannot hold a vocabulary of {vocab} tokens")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (..., n, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :vocab].bool()  # (..., V)


def apply_sampling_filters(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits of the distribution actually sampled from: divide by temperature, then drop tokens
    outside the allowed set F_t (set to -inf, as transformers' warpers do).

    F_t is ``allowed`` when given — a bool (..., V) mask, or its ``pack_allowed`` form uint8
    (..., ceil(V/8)) — and top_k/top_p are then ignored: scoring must use the set the sampler
    recorded, because re-running top-k/top-p on logits from a different forward pass (a full pass
    instead of the KV cache, bf16 instead of fp32) can pick a different set and drop the sampled
    token (log-prob -inf). Without ``allowed``, F_t is recomputed here from top-k / the top-p
    nucleus of ``logits / temperature`` (ties at the k-th value are all kept).

    The result is softmax(logits/τ) restricted to F_t and renormalised, π^{τ,F} of docs/theory.md
    §3: the policy as sampled. The reference is scored at the same τ over the whole vocabulary (the
    fixed reference π^τ_ref; ``restrict_like`` gives the restricted form). Every row needs at least one
    allowed token (the sampler's always have one).
    (..., V) -> (..., V), same dtype.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use a small value for near-greedy sampling)")
    out = logits / temperature if temperature != 1.0 else logits
    if allowed is not None:
        if allowed.dtype == torch.uint8:
            allowed = unpack_allowed(allowed, out.shape[-1])
        if allowed.shape != out.shape:
            raise ValueError(f"allowed token set {tuple(allowed.shape)} does not match logits {tuple(out.shape)}")
        return out.masked_fill(~allowed.to(out.device), float("-inf"))
    if top_k and top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(out, dim=-1, descending=False)
        cum = upcast(sorted_logits).softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def allowed_set(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The token set F_t that top-k / top-p keep, computed in fp32: (..., V) -> bool (..., V).

    What the sampler records (``tether.sampling.sample``) and, for a batch not produced by it, the
    fallback a scorer recomputes (``tether.modeling.forward_completion``). The fallback upcasts, so it
    does materialise one fp32 copy of ``logits`` (acceptable for a path sampler batches never take)."""
    kept = apply_sampling_filters(upcast(logits), temperature=temperature, top_k=top_k, top_p=top_p)
    return kept > float("-inf")
