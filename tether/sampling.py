"""Batched sampling with a KV cache, returning a ``CompletionBatch`` ready to be scored.

The sampler applies ``ops.logprobs.apply_sampling_filters`` (temperature, top-k, top-p) to fp32
logits and, when top-k or top-p is on, records the token set F_t it allowed at every position in
``batch.allowed`` (bit-packed). Scoring (``modeling.forward_completion``) divides by the same
temperature and restricts to the *stored* F_t instead of re-filtering its own logits, so the log-probs
and KL of a sample are computed under the distribution it was drawn from and every sampled token has
a finite log-prob (a bf16 full-pass re-filter dropped about 2 in 1000 sampled tokens on stories260K).

How sampling settings define the KL (docs/theory.md §3, docs/sampling.md): the
sampled policy is π^{τ,F}(v|s_t) = softmax(logits/τ) restricted to F_t and renormalised; the reference
is the fixed process π^τ_ref, its logits divided by the same τ (as TRL does) and never filtered.
``kl/ref`` is KL[π^{τ,F}_θ‖π^τ_ref], which includes the filter cost E Σ_t -log π^τ_ref(F_t) (``kl/filter_cost``).

Completion tokens after the first EOS are padding (mask False); the EOS itself counts.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import decode, rng
from .errors import UserError
from .modeling import CACHE_KW, CompletionBatch, autocast_dtype, make_batch, position_ids
from .ops.logprobs import apply_sampling_filters, pack_allowed, uses_token_filter

COMPACT_FRACTION = 0.25
"""Drop finished rows from the forward pass (and their KV cache) once at least this fraction of the rows
still computed has finished: one cache gather buys every later step a smaller batch."""

SYNC_EVERY = 8
"""On an accelerator the decode loop reads the device (how many rows have finished: stop? compact?) only
every this many steps; every other step queues its work without waiting for the GPU. On the CPU there is
no device to wait for and it reads every step (``sync_interval``). Either way the samples are the same:
the steps run past the last EOS draw for nothing and the generator is set back to its state after the
last needed step (tests/test_device.py checks this token for token on the CPU with a forced interval)."""


def sync_interval(device: torch.device) -> int:
    """Steps between the decode loop's reads of the device (``SYNC_EVERY``; 1 on the CPU)."""
    return 1 if torch.device(device).type == "cpu" else SYNC_EVERY


def draw_tokens(
    probs: torch.Tensor, rows: torch.Tensor, batch_size: int, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """``torch.multinomial(full_probs, 1)`` for the rows ``rows`` of a (batch_size, V) batch, given only
    their probabilities ``probs`` (len(rows), V): the same tokens and the same generator state.

    torch samples one token per row as argmax(p / q) with q ~ Exp(1) drawn for the whole (B, V) tensor
    (the Gumbel-max trick in exponential form; ATen ``multinomial``'s fast path for one sample). Drawing
    q for all ``batch_size`` rows, as today, keeps the random stream (and so every later sample) the same
    whether or not finished rows were dropped from the forward pass."""
    rng.check(generator, probs, what="the sampling generator")
    q = torch.empty((batch_size, probs.shape[-1]), dtype=probs.dtype, device=probs.device)
    q.exponential_(1, generator=generator)  # (B, V)
    return (probs / q[rows]).argmax(-1)  # (b,)


def _can_compact(past) -> bool:
    return hasattr(past, "batch_select_indices")


def distinct_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Rows with the same token ids, found once: (first, inverse), where ``first`` (U,) lists the first
    row of each distinct prompt in order of appearance and ``inverse`` (B,) gives each row's position in
    ``first``, so ``prompts[first[inverse[i]]] == prompts[i]``. Exact token-id equality; the rows of a
    prompt need not be contiguous. The online trainers lay a group out as G contiguous copies of one
    prompt, so U = B / G there."""
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    for i, p in enumerate(prompts):
        key = tuple(int(x) for x in p)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    return first, inverse


def _prefill_distinct(model, dec, input_ids, attention_mask, pos, first, inverse):
    """The prompt pass over the distinct rows ``first`` (U,) only, its KV cache and last-position logits
    then copied to every row by ``inverse`` (B,). ``input_ids``, ``attention_mask``, ``pos``: (B, P) for
    every row. Returns (logits (B, V), the Hugging Face cache or None with ``dec``, the lean decoder,
    whose static cache ``select`` expands in place)."""
    if dec is not None:
        hidden = dec.last_hidden(input_ids[first], pos[first], 0)  # (U, D)
        dec.select(inverse)  # (U, ...) -> (B, ...): row i's cache is the copy of its prompt's
        # the head over all B rows, as without sharing: a (U, D) product may take another kernel (MKL picks
        # by shape) and round differently; the last position's head product is a small part of the prefill
        return dec.logits(hidden.index_select(0, inverse)), None
    out = model(
        input_ids=input_ids[first],
        attention_mask=attention_mask[first],
        position_ids=pos[first],
        use_cache=True,
    )
    past, last = getattr(out, CACHE_KW), out.logits[:, -1, :]  # (U, V)
    if not _can_compact(past):  # a cache that cannot be indexed by row: prefill every row instead
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True)
        return out.logits[:, -1, :], getattr(out, CACHE_KW)
    past.batch_select_indices(inverse)  # every layer's keys and values: (U, ...) -> (B, ...)
    return last.index_select(0, inverse), past


@torch.no_grad()
def sample(
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
    decoder: str = "auto",
    sync_every: Optional[int] = None,
    prefill_once: bool = True,
) -> tuple[CompletionBatch, torch.Tensor]:
    """Sample one completion per prompt (token-id lists). Returns (batch, no_eos (B,) bool).

    Runs the model in eval mode with a KV cache: one forward over the left-padded prompts, then one
    token per step, stopping once every row has produced EOS. Rows that have finished are dropped from
    the forward pass and the cache (``COMPACT_FRACTION``); the random draws still cover every row
    (``draw_tokens``), so the tokens are those of the plain loop (``tests/reference_sampler.py``) for
    the same generator. With top_k or top_p on, ``batch.allowed`` holds the allowed set F_t of every
    position, packed: (B, T, ceil(V/8)) uint8, B·T·V/8 bytes on the CPU (positions after a row's EOS
    allow every token); None otherwise. ``batch.behaviour_logps`` (B, T) holds log μ(y_t) of each drawn
    token under the distribution it was drawn from (log-softmax of the filtered, tempered fp32 logits).

    ``decoder``: "hf" runs the model's own forward with its DynamicCache; "lean" runs
    ``decode.LlamaDecoder`` (static cache, fused products: the same mathematics with fewer calls, float32
    rounding apart); "auto" picks "lean" where ``decode.supports(model)`` (plain Llama), else "hf".

    Every tensor of the loop (masks, indices, the draws) lives on the model's device, and ``generator``
    must too (``tether.rng.generator(seed, device)``; a generator on another device is refused). The loop
    reads the device only every ``sync_every`` steps (default ``sync_interval(device)``: 1 on the CPU,
    ``SYNC_EVERY`` on an accelerator), to stop once every row has finished and to compact; the tokens,
    sets and generator state afterwards do not depend on it.

    ``prefill_once`` (default True): rows with the same prompt (``distinct_prompts``: a GRPO/RLOO group
    is G copies of one prompt) are prefilled once, and the prompt's KV cache and last-position logits
    are copied to each of its rows before the first draw (``index_select`` along the batch dimension):
    the prompt's arithmetic is done U times instead of B. Each row's cache and logits are computed by
    the same operations on the same numbers as in a prefill of every row, only in products with fewer
    rows; a BLAS picks its kernel (summation order) by shape, so the logits may differ by float32
    rounding (on the CPU: equal to the bit on 128-256-token HH-RLHF prompts, up to 1e-5 in a log-prob
    on 1-7-token ones), as they do when compaction shrinks the batch. The tokens, sets F_t and generator
    state are then the same unless two tokens' p/q ratios tie to within that rounding
    (tests/test_sampler_fast.py). False prefills every row (more arithmetic).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if decoder not in ("auto", "hf", "lean"):
        raise ValueError(f"decoder must be 'auto', 'hf' or 'lean', got {decoder!r}")
    if decoder == "lean" and not decode.supports(model):
        raise UserError(
            f"decoder='lean' needs a plain LlamaForCausalLM (decode.supports), got {type(model).__name__}; "
            "set --decoder auto or hf"
        )
    lean = decoder == "lean" or (decoder == "auto" and decode.supports(model))
    was_training = model.training
    model.eval()
    device = rng.device_of(model)
    if generator is not None and generator.device.type != device.type:
        rng.check(generator, torch.empty(0, device=device), what="the sampling generator")
    k = sync_interval(device) if sync_every is None else int(sync_every)
    if k < 1:
        raise ValueError(f"sync_every must be >= 1, got {k}")
    base = make_batch(prompts, [[]] * len(prompts), pad_id=pad_id)
    P = base.prompt_len
    B = base.input_ids.shape[0]
    first, inverse = distinct_prompts(prompts) if prefill_once else (list(range(B)), list(range(B)))
    shared = len(first) < B  # some prompt repeats: prefill the U distinct rows, then copy to their rows
    first_t = torch.tensor(first, dtype=torch.long, device=device)  # (U,)
    inverse_t = torch.tensor(inverse, dtype=torch.long, device=device)  # (B,)
    attn = torch.ones(
        (B, P + max_new_tokens), dtype=base.attention_mask.dtype, device=device
    )  # (B, P + N), preallocated
    attn[:, :P] = base.attention_mask[:, :P].to(device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    out_logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)  # log μ of each drawn token
    record = uses_token_filter({"top_k": top_k, "top_p": top_p})
    allowed_steps: list[torch.Tensor] = []  # per step (B, ceil(V/8)) uint8, when record
    rows = torch.arange(B, device=device)  # (b,) the rows still in the forward pass
    states: list = []  # generator state after each step since the last read (k > 1: to undo draws past the end)
    past = None
    step_ids = base.input_ids[:, :P].to(device)
    pos = position_ids(attn[:, :P])
    dec = None
    if lean:  # with a shared prefill the cache holds the U distinct rows until the copy (select) after it
        dec = decode.LlamaDecoder(model, len(first) if shared else B, P + max_new_tokens)
        dec.set_mask(attn[first_t] if shared else attn)
    amp = autocast_dtype(model)  # mixed precision asked for (TrainConfig.autocast): the lean step computes under it too
    try:
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            for t in range(max_new_tokens):
                if t == 0 and shared:  # (B, V) logits, the cache of every row: the U distinct prompts once
                    last, past = _prefill_distinct(model, dec, step_ids, attn[:, :P], pos, first_t, inverse_t)
                elif dec is not None:  # slots: the prompt at 0..P-1, step t's input token at P + t - 1
                    last = dec.forward(step_ids, pos, 0 if t == 0 else P + t - 1)  # (b, V)
                else:
                    out = model(
                        input_ids=step_ids,
                        attention_mask=attn[rows, : P + t],
                        position_ids=pos,
                        use_cache=True,
                        **{CACHE_KW: past},
                    )
                    past, last = getattr(out, CACHE_KW), out.logits[:, -1, :]
                logits = apply_sampling_filters(last.float(), temperature=temperature, top_k=top_k, top_p=top_p)
                tok = draw_tokens(torch.softmax(logits, dim=-1), rows, B, generator)  # (b,)
                if k > 1 and generator is not None:
                    states.append(generator.get_state())  # host-side (CUDA: Philox seed + offset): no device read
                live = ~done[rows]  # (b,)
                # the behaviour policy μ: log-softmax of exactly the logits the token was drawn from (τ, F_t)
                mu = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)  # (b,)
                out_logps[rows, t] = torch.where(live, mu, torch.zeros_like(mu))
                if record:  # F_t exactly as sampled from; finished rows allow everything (keeps padding finite)
                    allowed = torch.ones((B, logits.shape[-1]), dtype=torch.bool, device=device)  # (B, V)
                    allowed[rows] = (logits > float("-inf")) | ~live[:, None]
                    allowed_steps.append(pack_allowed(allowed))  # (B, ceil(V/8))
                out_tokens[rows, t] = torch.where(live, tok, torch.full_like(tok, pad_id))
                out_mask[rows, t] = live
                if eos_id is not None:
                    done[rows] = ~live | (tok == eos_id)
                if (t + 1) % k and t + 1 < max_new_tokens:
                    step_ids, pos = out_tokens[rows, t : t + 1], pos[:, -1:] + 1  # (b, 1) each
                    continue  # no read of the device this step
                n_done = int(done[rows].sum())  # the loop's one read of the device (every k steps)
                if n_done == rows.numel():
                    break
                states.clear()
                step_ids = out_tokens[rows, t : t + 1]  # (b, 1)
                pos = pos[:, -1:] + 1  # (b, 1)
                if n_done and n_done >= COMPACT_FRACTION * rows.numel() and (dec is not None or _can_compact(past)):
                    keep = (~done[rows]).nonzero().squeeze(-1)  # (b',) positions in the current batch
                    if dec is not None:
                        dec.select(keep)
                    else:
                        past.batch_select_indices(keep)
                    rows, step_ids, pos = rows[keep], step_ids[keep], pos[keep]
    finally:
        model.train(was_training)
    lengths = out_mask.sum(-1).tolist()  # (B,) counted tokens per row: one read for the whole batch
    T = max(max(lengths), 1)  # steps up to the last row's EOS (the one that ended the loop: rows finished in it)
    if states:  # steps after T only drew for rows already finished: the stream continues as if they never ran
        steps_run = t + 1
        generator.set_state(states[len(states) - 1 - (steps_run - T)])
    toks = out_tokens.cpu()
    completions = [toks[i, : lengths[i]].tolist() for i in range(B)]
    batch = make_batch(prompts, completions, pad_id=pad_id)
    if batch.mask.shape[1] != T:  # make_batch pads to the longest completion
        raise AssertionError("internal: completion width mismatch")
    if record:
        batch.allowed = torch.stack(allowed_steps[:T], dim=1).cpu()  # (B, T, ceil(V/8)): one entry per needed step
    batch.behaviour_logps = out_logps[:, : batch.mask.shape[1]].cpu()  # (B, T), 0 off-mask
    no_eos = ~done.cpu()
    return batch, no_eos
