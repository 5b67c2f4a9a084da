"""Per-token scores straight from hidden states, the LM head applied chunk by chunk: peak memory that
does not grow with length × vocabulary.

``ops.logprobs`` takes (B, T, V) logits that already exist. At a real vocabulary they are the largest
tensors of an update: a micro-batch of 8 rows × 256 completion tokens at V = 151,936 (Qwen2) holds
311M logits, 1.24 GB in float32, once for the policy (kept for the backward, plus its gradient) and once
for the reference. Here the logits of ``chunk_size`` positions at a time are made from the final hidden
states h (N, D) and the head W (V, D) (logits = h Wᵀ + b), scored, and dropped; the backward recomputes
each chunk's logits instead of keeping them and accumulates the head's gradients in place (one (V, D)
weight gradient, as the model's own backward makes). What stays alive is (N,) per score and one chunk's
(chunk_size, V) intermediates: the fused linear + log-softmax of Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024, arXiv 2410.10989) and TRL's chunked LM head, extended to the exact KL,
entropy and filter cost of docs/theory.md §2–§3.

The distributions are those ``modeling.forward_completion`` and ``reference.Reference.logits`` give:
the policy's π^{τ,F}_θ = softmax(z/τ) restricted to the stored set F_t (``allowed``, packed or not), the
reference's π^τ_ref = softmax(z_ref/τ) over the whole vocabulary. Each chunk computes exactly the
operations of ``ops.logprobs`` on its rows, so values equal the (B, T, V) path up to float32 rounding of
the head's product (a product with fewer rows may take another BLAS kernel); tests/test_head.py checks
values and gradients against it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .logprobs import unpack_allowed, upcast

HEAD_CHUNK = 128
"""Positions per chunk: 128 × 151,936 × 4 B = 78 MB per (chunk, V) float32 intermediate (a chunk holds about
ten of them at once). Smaller chunks were tried and measured worse on the CPU: a GRPO step at V = 151,936
(benchmarks/bench_vocab_memory.py, 512 tokens) peaked at 3,436 MiB with 27-position chunks (16 MiB tensors)
against 2,741 MiB with 128, most likely because glibc serves allocations under its 32 MiB mmap threshold
from the heap, which keeps and fragments them, while larger ones are mapped and returned on free. (Time:
the scores and backward of 512 positions took no longer in chunks of 32 than of 128.)"""

SCORES = ("logps", "ref_logps", "kl_exact", "entropy", "filter_cost")


def _chunk_scores(z, ref_h, tokens, allowed, ref_weight, ref_bias, temperature, vocab):
    """(n, 5) float32: log π(y), log π_ref(y), KL[π‖π_ref], H[π], -log π_ref(F) for n positions, from the
    policy's head output ``z`` (n, V) (before the temperature); (n, 2) log π(y), H[π] without a reference."""
    z = z / temperature if temperature != 1.0 else z
    keep = None
    if allowed is not None:
        keep = unpack_allowed(allowed, vocab) if allowed.dtype == torch.uint8 else allowed  # (n, V) bool
        z = z.masked_fill(~keep, float("-inf"))
    logp = F.log_softmax(upcast(z), dim=-1)  # (n, V)
    p = logp.exp()
    outside = p == 0  # tokens π never samples: 0 in the KL and the entropy (inputs zeroed: no 0·inf in backward)
    cols = [logp.gather(-1, tokens[:, None]).squeeze(-1)]
    if ref_h is not None:
        with torch.no_grad():  # the reference is fixed
            zq = upcast(F.linear(ref_h, ref_weight, ref_bias))  # (n, V)
            zq = zq / temperature if temperature != 1.0 else zq
            logq = F.log_softmax(zq, dim=-1)
            inside = zq.masked_fill(~keep, float("-inf")) if keep is not None else zq  # π_ref's logits on F_t
            filter_cost = torch.logsumexp(zq, -1) - torch.logsumexp(inside, -1)
        cols.append(logq.gather(-1, tokens[:, None]).squeeze(-1))
        cols.append((p * (logp - logq).masked_fill(outside, 0.0)).sum(-1))
    cols.append(-(p * logp.masked_fill(outside, 0.0)).sum(-1))
    if ref_h is not None:
        cols.append(filter_cost)
    return torch.stack(cols, dim=-1)


class _HeadScores(torch.autograd.Function):
    """The chunked scores with a hand-written backward over the head: per chunk, the logits are
    recomputed, autograd differentiates the scores with respect to them (G_z, (n, V)), and the head's
    gradients are accumulated in place, dL/dh = G_z W, dL/dW += G_zᵀ h, dL/db += Σ G_z, so the backward
    holds one (V, D) weight gradient (not one per chunk plus their sum) and one chunk's (n, V) tensors."""

    @staticmethod
    def forward(ctx, h, weight, bias, ref_h, tokens, allowed, ref_weight, ref_bias, temperature, chunk):
        V = weight.shape[0]
        outs = []
        for s in range(0, tokens.shape[0], chunk):
            part = slice(s, s + chunk)
            z = F.linear(h[part], weight, bias)  # (n, V) in the model's dtype, as the model's head computes it
            rh, a = ref_h[part] if ref_h is not None else None, allowed[part] if allowed is not None else None
            outs.append(_chunk_scores(z, rh, tokens[part], a, ref_weight, ref_bias, temperature, V))
        ctx.save_for_backward(h, weight, bias, ref_h, tokens, allowed, ref_weight, ref_bias)
        ctx.temperature, ctx.chunk = temperature, chunk
        return torch.cat(outs)  # (N, k)

    @staticmethod
    def backward(ctx, grad):  # grad: (N, k)
        h, weight, bias, ref_h, tokens, allowed, ref_weight, ref_bias = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(h) if want_h else None
        gw = torch.zeros_like(weight) if want_w else None
        gb = torch.zeros_like(bias) if want_b else None
        V = weight.shape[0]
        for s in range(0, tokens.shape[0], ctx.chunk):
            part = slice(s, s + ctx.chunk)
            with torch.no_grad():
                z = F.linear(h[part], weight, bias)  # (n, V) recomputed
            z.requires_grad_()
            with torch.enable_grad():
                rh, a = ref_h[part] if ref_h is not None else None, allowed[part] if allowed is not None else None
                out = _chunk_scores(z, rh, tokens[part], a, ref_weight, ref_bias, ctx.temperature, V)
                (gz,) = torch.autograd.grad(out, z, grad[part])  # (n, V) dL/dz
            if gh is not None:
                gh[part] = gz @ weight  # (n, D)
            if gw is not None:
                gw.addmm_(gz.t(), h[part])  # (V, D)
            if gb is not None:
                gb += gz.sum(0)
        return gh, gw, gb, None, None, None, None, None, None, None


def head_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    allowed: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Per-position scores of the policy (and the reference) from hidden states, never holding more than
    ``chunk_size`` positions' logits.

    Args:
        hidden: (..., D) the policy's final (normed) hidden states at the positions that predict ``tokens``.
        weight, bias: the policy's LM head, (V, D) and (V,) or None.
        tokens: (...) int64 the tokens scored (the completion ids).
        ref_hidden, ref_weight, ref_bias: the reference's (..., D'), (V, D'), (V,) or None; without
            ``ref_hidden`` only ``logps`` and ``entropy`` are computed.
        temperature: τ, dividing both models' logits.
        allowed: the sampled sets F_t, bool (..., V) or packed uint8 (..., ceil(V/8)) (``pack_allowed``);
            None = the whole vocabulary.
        chunk_size: positions whose logits exist at once; None = ``HEAD_CHUNK``.
    Returns:
        {"logps", "entropy"} and, with a reference, {"ref_logps", "kl_exact", "filter_cost"}: (...)
        float32 each (float64 for float64 inputs). ``logps``, ``entropy`` and ``kl_exact`` carry
        gradients to ``hidden``, ``weight`` and ``bias``; the reference's scores are constants.
        kl_exact = Σ_v π(v)(log π(v) - log π_ref(v)) (docs/theory.md §2), filter_cost = -log π_ref(F_t)
        (§3), as ``ops.logprobs`` computes them from logits.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree on the positions")
    if ref_hidden is not None and (ref_weight is None or ref_hidden.shape[:-1] != tokens.shape):
        raise ValueError("ref_hidden needs ref_weight and the same positions as tokens")
    lead = tokens.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)  # (N, D), (N,)
    rh = ref_hidden.reshape(-1, ref_hidden.shape[-1]) if ref_hidden is not None else None
    a = allowed.reshape(-1, allowed.shape[-1]) if allowed is not None else None
    names = SCORES if rh is not None else ("logps", "entropy")
    if t.shape[0] == 0:
        return {k: torch.zeros(lead, dtype=torch.float32, device=hidden.device) for k in names}
    if rh is not None:
        rh = rh.detach()
    chunk = chunk_size or HEAD_CHUNK
    out = _HeadScores.apply(h, weight, bias, rh, t, a, ref_weight, ref_bias, temperature, chunk)  # (N, k)
    return {k: c.reshape(lead) for k, c in zip(names, out.unbind(-1))}
