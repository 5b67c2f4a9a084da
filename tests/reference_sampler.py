"""The built-in sampler without compaction or the lean decode step (one forward per step over every row, growing
attention mask, F_t packed every step): the slow reference that tether.sampling.sample must match
token for token under the same generator (tests/test_sampler_fast.py), and the "before" of
benchmarks/bench_sampler.py."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tether.modeling import CACHE_KW, CompletionBatch, make_batch, position_ids
from tether.ops.logprobs import apply_sampling_filters, pack_allowed, uses_token_filter


@torch.no_grad()
def reference_sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: Optional[int],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[CompletionBatch, torch.Tensor]:
    """Sample one completion per prompt (token-id lists). Returns (batch, no_eos (B,) bool).

    Runs the model in eval mode with a KV cache: one forward over the left-padded prompts, then one
    token per step. Stops early once every row has produced EOS. With top_k or top_p on,
    ``batch.allowed`` holds the allowed set F_t of every position, packed: (B, T, ceil(V/8)) uint8,
    B·T·V/8 bytes on the CPU (positions after a row's EOS allow every token); None otherwise.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    base = make_batch(prompts, [[]] * len(prompts), pad_id=pad_id)
    P = base.prompt_len
    ids = base.input_ids[:, :P].to(device)
    attn = base.attention_mask[:, :P].to(device)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    record = uses_token_filter({"top_k": top_k, "top_p": top_p})
    allowed_steps: list[torch.Tensor] = []  # per step (B, ceil(V/8)) uint8, when record
    past = None
    step_ids, step_attn = ids, attn
    pos = position_ids(attn)
    try:
        for t in range(max_new_tokens):
            out = model(
                input_ids=step_ids, attention_mask=step_attn, position_ids=pos, use_cache=True, **{CACHE_KW: past}
            )
            past = getattr(out, CACHE_KW)
            logits = apply_sampling_filters(
                out.logits[:, -1, :].float(), temperature=temperature, top_k=top_k, top_p=top_p
            )
            probs = torch.softmax(logits, dim=-1)  # (B, V)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            live = ~done
            if record:  # F_t exactly as sampled from; finished rows allow everything (keeps padding finite)
                allowed_steps.append(pack_allowed((logits > float("-inf")) | ~live[:, None]))  # (B, ceil(V/8))
            out_tokens[:, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
            out_mask[:, t] = live
            if eos_id is not None:
                done = done | (live & (tok == eos_id))
            if bool(done.all()):
                break
            step_attn = torch.cat([step_attn, torch.ones((B, 1), dtype=step_attn.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            step_ids = out_tokens[:, t : t + 1]
    finally:
        model.train(was_training)
    T = int(out_mask.sum(-1).max().item()) if out_mask.any() else 1
    completions = [out_tokens[i, : int(out_mask[i].sum())].tolist() for i in range(B)]
    batch = make_batch(prompts, completions, pad_id=pad_id)
    if batch.mask.shape[1] != max(T, 1):  # make_batch pads to the longest completion
        raise AssertionError("internal: completion width mismatch")
    if record:
        batch.allowed = torch.stack(allowed_steps, dim=1).cpu()  # (B, T, ceil(V/8)): one entry per step run
    no_eos = ~done.cpu()
    return batch, no_eos
