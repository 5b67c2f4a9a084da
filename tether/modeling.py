"""Hugging Face causal LMs as tether sees them: loading, tokenizers, batches, completion scoring.

Layout of every scored batch (``CompletionBatch``): prompts left-padded to width P, completions
right-padded to width T, concatenated to (B, P + T). Per-token tensors (``logps``, ``ref_logps``,
``mask``...) are (B, T) and aligned with the completion tokens. Position ids are computed from the
attention mask, so left padding does not shift positions (a model called without them numbers
padded positions too, which changes its outputs).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import UserError
from .groups import sampling_settings
from .ops.logprobs import allowed_set, apply_sampling_filters, pack_allowed, selective_logps


def _cache_name() -> str:
    """The keyword (and output field) of the decoding cache: ``cache`` in transformers >= 5.2x, where
    ``past_key_values`` is a deprecated alias that warns on every forward; ``past_key_values`` before."""
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "past_key_values"
    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


CACHE_KW = _cache_name()

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def load_tokenizer(path: str, *, padding_side: str = "left"):
    """AutoTokenizer with a pad token guaranteed.

    A tokenizer with no pad token (stories260K's, Llama's) gets ``pad_token = eos_token``. This is
    safe in tether because padding is always tracked by masks, never by comparing ids to pad_id.
    """
    from transformers import AutoTokenizer

    return prepare_tokenizer(
        AutoTokenizer.from_pretrained(path), padding_side=padding_side, where=f"tokenizer at {path}"
    )


def prepare_tokenizer(tok, *, padding_side: str = "left", where: str = "the tokenizer"):
    """The tokenizer as tether uses it: a pad token (eos when it has none: masks decide what counts,
    never pad ids) and ``padding_side``. Changes ``tok`` in place and returns it."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(
                f"{where} has neither a pad token nor an eos token; add one "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and resize the model's embeddings"
            )
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using eos %r for padding (masks decide what counts)", tok.eos_token)
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    path: str, *, dtype: str = "float32", device: str | torch.device = "cpu", autocast: bool = False, **kwargs
):
    """AutoModelForCausalLM in eval mode on ``device``; ``dtype`` is a name from ``DTYPES``; ``autocast``:
    every forward under bf16 autocast (``autocast_forward``)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} not supported; choose from {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    model = model.to(device).eval()
    return autocast_forward(model) if autocast else model


AUTOCAST_ATTR = "_tether_autocast"


def autocast_forward(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Run every call of ``module`` under ``torch.autocast(<its device type>, dtype)``: mixed precision with
    the weights kept as they are (float32), as accelerate's ``mixed_precision="bf16"`` does: matrix products
    in ``dtype``, softmax, log-softmax and reductions in float32 (torch's autocast op lists). Hooks, not a
    wrapped ``forward``, so copies (``copy.deepcopy``: a frozen reference) run the same way, and the
    sampler, which calls the weights directly in its lean step, reads ``autocast_dtype(module)``.
    Returns ``module``."""
    if getattr(module, AUTOCAST_ATTR, None) is not None:
        return module
    contexts: list = []  # LIFO: nested calls (the model calling its decoder) each enter and leave their own

    def enter(mod, args):
        ctx = torch.autocast(next(mod.parameters()).device.type, dtype=dtype)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(mod, args, output):
        contexts.pop().__exit__(None, None, None)

    # the model, and the parts some paths call directly (DPO's packed layout: the decoder, then the head)
    parts = [module]
    for getter in ("get_decoder", "get_output_embeddings"):
        part = getattr(module, getter, lambda: None)()
        if isinstance(part, torch.nn.Module) and all(part is not p for p in parts):
            parts.append(part)
    for part in parts:
        part.register_forward_pre_hook(enter)
        part.register_forward_hook(leave, always_call=True)  # also when the forward raises
    setattr(module, AUTOCAST_ATTR, dtype)
    return module


def autocast_dtype(module) -> Optional[torch.dtype]:
    """The autocast dtype ``autocast_forward`` gave ``module`` (None: plain forward)."""
    return getattr(module, AUTOCAST_ATTR, None)


def vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_compatible(policy, reference, policy_tokenizer=None, reference_tokenizer=None) -> None:
    """Raise a clear error when policy and reference cannot be compared token by token."""
    vp, vr = vocab_size(policy), vocab_size(reference)
    if vp != vr:
        raise UserError(
            f"policy and reference have different vocabularies (output sizes {vp} vs {vr}): the KL and "
            "log-ratios are only defined over a shared vocabulary; use a reference from the same model family "
            "and tokenizer as the policy"
        )
    if policy_tokenizer is not None and reference_tokenizer is not None:
        if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
            raise UserError(
                "policy and reference tokenizers differ (same size, different token ids): token-level KL would "
                "compare unrelated tokens; use the policy's tokenizer for both models"
            )


@dataclass
class CompletionBatch:
    """Left-padded prompts + right-padded completions.

    input_ids: (B, P + T) long; attention_mask: (B, P + T) long; mask: (B, T) bool, True on counted
    completion tokens; prompt_len: P.

    allowed: the token set F_t the sampler's top-k/top-p filter allowed at each completion position,
    bit-packed (``ops.logprobs.pack_allowed``): (B, T, ceil(V/8)) uint8, B·T·V/8 bytes (64 x 512
    tokens with a 150k vocabulary: 0.6 GB). Set by ``sampling.sample`` only when top-k or top-p was
    active; None otherwise (``make_batch``, preference data). Scoring restricts the policy to it
    (``forward_completion``; docs/theory.md §3), never the reference. Positions that were not sampled
    (after EOS) allow every token.

    behaviour_logps: (B, T) float32, log μ(y_t|s_t) of each sampled token under the exact distribution
    the generation backend drew it from (the behaviour policy μ: softmax of the sampler's own logits/τ,
    restricted to F_t), 0 off-mask. Set by every generation backend (``tether.generation``); None for
    batches nobody sampled (``make_batch``, preference data). The trainers compare it with their own
    log π_old (``ops.behaviour``; docs/theory.md §3).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    allowed: Optional[torch.Tensor] = None
    behaviour_logps: Optional[torch.Tensor] = None
    shared_prompt: str = "off"
    """How ``forward_completion`` lays the batch out: off (the padded layout above), on (rows with the same
    prompt scored as one row, the prompt computed once: ``tether.shared_prompt``), auto (on where the model
    supports it and it saves arithmetic). The numbers are the same either way, to float32 rounding."""

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]  # (B, T)

    def to(self, device) -> "CompletionBatch":
        allowed = None if self.allowed is None else self.allowed.to(device)
        mu = None if self.behaviour_logps is None else self.behaviour_logps.to(device)
        return CompletionBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.mask.to(device),
            self.prompt_len,
            allowed,
            mu,
            self.shared_prompt,
        )

    def select(self, idx) -> "CompletionBatch":
        allowed = None if self.allowed is None else self.allowed[idx]
        mu = None if self.behaviour_logps is None else self.behaviour_logps[idx]
        return CompletionBatch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.mask[idx],
            self.prompt_len,
            allowed,
            mu,
            self.shared_prompt,
        )


def make_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int
) -> CompletionBatch:
    """Build a ``CompletionBatch`` from token-id lists (prompts must be non-empty)."""
    if len(prompts) != len(completions):
        raise ValueError("need as many completions as prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every completion needs at least one context token (e.g. BOS)")
    P = max(len(p) for p in prompts)
    T = max(1, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if len(c):
            ids[i, P : P + len(c)] = torch.tensor(list(c), dtype=torch.long)
            attn[i, P : P + len(c)] = 1
            mask[i, : len(c)] = True
    return CompletionBatch(ids, attn, mask, P)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, L) -> (B, L), 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def packed_token_logps(model, batch) -> torch.Tensor:
    """(N,) fp32 log-probs of the N completion tokens of a padding-free batch (``data.preference.PackedPairs``):
    the decoder over its (R, W) rows with restarting positions and no attention mask (Hugging Face models
    then attend block-diagonally: ``find_packed_sequence_indices``), and the LM head on the N predicting
    positions only. Token n belongs to sequence ``batch.seq[n]``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers stay active
    hidden = base.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state  # (R, W, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch.src]  # (N, H)
    logits = base.get_output_embeddings()(h)  # (N, V)
    return selective_logps(logits[None], batch.targets[None])[0]  # (N,)


def forward_completion(model, batch: CompletionBatch, *, filters=None, hidden: bool = False):
    """The one forward pass over a ``CompletionBatch``: next-token logits at the positions that
    predict the completion tokens, (B, T, V), and, if ``hidden``, the last hidden states at the same
    positions, (B, T, H) (for a value head); otherwise None.

    Only the last T + 1 positions are projected to the vocabulary (``logits_to_keep``), so prompt
    positions cost no (B, P, V) logits.

    ``filters``: the ``groups.SamplingSettings`` (or what ``groups.sampling_settings`` converts; None =
    τ 1, unfiltered). Its temperature, top_k, top_p make the logits those of π^{τ,F}, the distribution the
    completions were sampled from (docs/theory.md §3): divided by the temperature, and — when top_k
    or top_p is on — restricted (-inf outside) to the set F_t the sampler stored in
    ``batch.allowed``. The set is never recomputed from these logits when it is stored: a full
    forward pass (bf16, no KV cache) can rank tokens differently and drop the sampled one. Fallback,
    for a batch not produced by the sampler (``batch.allowed`` None): F_t is recomputed from this
    model's logits in fp32 (``ops.logprobs.allowed_set``). Call it with the *policy*: the reference is
    scored at the temperature only (``reference.Reference.logits``), never with its own top-k.

    ``batch.shared_prompt`` on or auto: the same numbers from the shared-prompt layout where the model
    supports it (``forward_completion_shared``).
    """
    if batch.shared_prompt != "off":
        shared = forward_completion_shared(model, batch, filters=filters, hidden=hidden)
        if shared is not None:
            return shared
    T = batch.mask.shape[1]
    L = batch.input_ids.shape[1]
    # The kept positions as an index tensor, not the int T + 1: an int makes Hugging Face slice the hidden
    # states (a non-contiguous view), and torch's matmul then folds the LM head's product into one matrix
    # product or not depending on whether the head's weight requires grad. A trained policy and its frozen
    # copy would then take different kernels and round differently (seen with MKL's AVX2 kernels: a model
    # against its copy gave KL -2.4e-7, not 0). Indexing copies the rows, and both take the same path.
    keep = torch.arange(L - (T + 1), L, device=batch.input_ids.device)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=hidden,
    )
    logits = out.logits[:, :-1, :]  # (B, T, V): position P-1+t predicts completion token t
    h = out.hidden_states[-1][:, -(T + 1) : -1, :] if hidden else None  # (B, T, H), after the final norm
    return sampled_logits(logits, batch, filters), h


def sampled_logits(logits: torch.Tensor, batch: CompletionBatch, filters) -> torch.Tensor:
    """(B, T, V) model logits -> those of π^{τ,F}: divided by the temperature and, with top_k/top_p,
    restricted to ``batch.allowed`` (recomputed from ``logits`` when the batch has none); ``forward_completion``."""
    f = sampling_settings(filters)
    temperature = f.temperature
    if f.uses_token_filter:
        allowed = batch.allowed
        if allowed is None:  # fallback: not a sampler batch
            allowed = allowed_set(logits, temperature=temperature, top_k=f.top_k, top_p=f.top_p)
        return apply_sampling_filters(logits, temperature=temperature, allowed=allowed)
    if temperature != 1.0:
        return apply_sampling_filters(logits, temperature=temperature)
    return logits


def forward_completion_shared(model, batch: CompletionBatch, *, filters=None, hidden: bool = False):
    """``forward_completion`` over the shared-prompt layout (``tether.shared_prompt``): rows with the same
    prompt become one row [prompt, completion_1, ..., completion_k] under a prefix-tree mask, the decoder
    runs once over it, and the LM head only on the positions that predict counted tokens. Returns the same
    (B, T, V) logits and (B, T, H) hidden states (zeros off the mask), or None when this batch or model
    takes the padded layout: the model is not supported (logged once), the batch cannot be laid out
    exactly, or ``batch.shared_prompt`` is auto and the layout would not save arithmetic."""
    from . import shared_prompt as sp

    if not sp.supports_shared_prompt(model):
        return None
    lay = sp.shared_layout(batch)
    if lay is None or (batch.shared_prompt == "auto" and not sp.prefer_shared(model, batch, lay)):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers stay active
    head = base.get_output_embeddings()
    out = base.get_decoder()(
        input_ids=lay.input_ids,
        attention_mask=sp.attention_mask_4d(lay.allowed, base, head.weight.dtype),
        position_ids=lay.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, W, H), after the final norm
    h = out.reshape(-1, out.shape[-1])[lay.keep]  # (U, H): indexed, so a copy (the head's kernel: see above)
    logits = head(h)  # (U, V)
    B, T = batch.mask.shape
    table = torch.cat([logits, logits.new_zeros(1, logits.shape[-1])])  # row U: off the mask
    full = table[lay.src.reshape(-1)].reshape(B, T, -1)  # (B, T, V)
    hs = None
    if hidden:
        hs = torch.cat([h, h.new_zeros(1, h.shape[-1])])[lay.src.reshape(-1)].reshape(B, T, -1)  # (B, T, H)
    return sampled_logits(full, batch, filters), hs


def completion_logits(
    model, batch: CompletionBatch, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Completion logits (B, T, V) of ``forward_completion``, without hidden states."""
    return forward_completion(model, batch, filters={"temperature": temperature, "top_k": top_k, "top_p": top_p})[0]


def with_allowed(batch: CompletionBatch, logits: torch.Tensor) -> CompletionBatch:
    """``batch`` carrying the token sets of already filtered ``logits`` (B, T, V): F_t = the tokens
    whose logit is not -inf. For batches not produced by the sampler: score the policy first
    (``forward_completion``'s fallback recomputes F_t), then attach its sets here, so later passes
    over the batch (the loss's) use the same sets."""
    return dataclasses.replace(batch, allowed=pack_allowed(logits > float("-inf")))


def completion_logps(
    model, batch: CompletionBatch, *, logits: Optional[torch.Tensor] = None, **filters
) -> torch.Tensor:
    """Per-token log-probs of the completion tokens: (B, T) fp32, 0 where ``batch.mask`` is False."""
    if logits is None:
        logits = completion_logits(model, batch, **filters)
    return selective_logps(logits, batch.completion_ids).masked_fill(~batch.mask, 0.0)


def model_fingerprint(model) -> str:
    """A content hash of a model's parameters (for cache keys): sha256 over names, shapes, bytes."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu").contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take the prefix-tree mask of a shared-prompt layout (a 4D tensor, or a
FlexAttention BlockMask); others (flash_attention_2/3, paged kernels) take padding masks only."""


def prefix_tree_attention_mask(model, segment: torch.Tensor, branch: torch.Tensor):
    """The prefix-tree mask (``ops.attention.prefix_tree_mask``) in the form ``model``'s attention
    implementation reads when given a prepared mask (transformers' ``masking_utils`` returns a 4D mask
    as is): sdpa, a boolean (R, 1, W, W), True = attend; eager, an additive float (R, 1, W, W), 0 or
    the dtype's minimum; flex_attention, a ``BlockMask`` over (R, 1, W, W). Raises ``ValueError``
    naming the implementation for any other (the caller falls back to one sequence per completion)."""
    from .ops.attention import prefix_tree_mask

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in SHARED_PROMPT_ATTENTION:
        raise ValueError(f"attention implementation {impl!r} takes no custom mask")
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (segment[b, q] == segment[b, k]) & (k <= q) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))

        R, W = segment.shape
        return create_block_mask(mask_mod, R, None, W, W, device=str(segment.device))
    allowed = prefix_tree_mask(segment, branch)[:, None]  # (R, 1, W, W)
    if impl == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def shared_prompt_token_logps(model, batch) -> torch.Tensor:
    """``packed_token_logps`` for a shared-prompt layout (``data.preference.PackedPairs`` with
    ``segment``/``branch``): the decoder over the (R, W) rows with the prefix-tree attention mask
    (``prefix_tree_attention_mask``) and positions that continue from each prompt, then the LM head on
    the N predicting positions only. (N,) fp32; token n belongs to sequence ``batch.seq[n]``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers stay active
    mask = prefix_tree_attention_mask(base, batch.segment, batch.branch)
    hidden = base.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
    ).last_hidden_state  # (R, W, H)
    h = hidden.reshape(-1, hidden.shape[-1])[batch.src]  # (N, H)
    logits = base.get_output_embeddings()(h)  # (N, V)
    return selective_logps(logits[None], batch.targets[None])[0]  # (N,)


HEAD_MODEL_TYPES = ("llama", "gpt2", "qwen2")
"""Architectures whose logits are exactly the LM head of the decoder's final hidden state (no logit soft-capping
or scale), so ``ops.head.head_scores`` can take (hidden, head) in their place (``chunked_head``)."""


def head_unsupported_reason(model) -> Optional[str]:
    """Why the update cannot score ``model`` from its hidden states and LM head (None: it can): another
    architecture, autocast (its head runs in bf16 inside the forward), or a head that is not a plain
    ``torch.nn.Linear`` (a LoRA-adapted head: peft wraps it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    if kind not in HEAD_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(HEAD_MODEL_TYPES)}"
    if autocast_dtype(model) is not None or autocast_dtype(base) is not None:
        return "autocast: the head's product would run in another precision than the forward's"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(base, "get_decoder"):
        return "the LM head is not a plain Linear layer (adapted by LoRA, or none)"
    return None


def lm_head(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LM head's (V, D) weight and (V,) bias or None (``head_unsupported_reason`` None first)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return head.weight, head.bias


def completion_hidden(model, batch: CompletionBatch) -> torch.Tensor:
    """(B, T, D) the decoder's final (normed) hidden states at the positions that predict the completion
    tokens: ``forward_completion`` without the LM head (the head is applied by ``ops.head.head_scores``,
    chunk by chunk). The shared-prompt layout where ``forward_completion`` takes it (zeros off the mask
    there), else the padded one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers stay active
    B, T = batch.mask.shape
    if batch.shared_prompt != "off":
        from . import shared_prompt as sp

        if sp.supports_shared_prompt(model):
            lay = sp.shared_layout(batch)
            if lay is not None and (batch.shared_prompt != "auto" or sp.prefer_shared(model, batch, lay)):
                dtype = base.get_output_embeddings().weight.dtype
                out = base.get_decoder()(
                    input_ids=lay.input_ids,
                    attention_mask=sp.attention_mask_4d(lay.allowed, base, dtype),
                    position_ids=lay.position_ids,
                    use_cache=False,
                ).last_hidden_state  # (R, W, D)
                h = out.reshape(-1, out.shape[-1])[lay.keep]  # (U, D)
                return torch.cat([h, h.new_zeros(1, h.shape[-1])])[lay.src.reshape(-1)].reshape(B, T, -1)
    out = base.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, L, D)
    return out[:, -(T + 1) : -1, :]  # position P-1+t predicts completion token t
