"""The tabular oracle problem as a Hugging Face causal LM, so that the trainers users run are certified.

Why: ``tether certify`` should train with the *shipped* code paths (``train_online`` for PPO/GRPO/RLOO,
``train_dpo``, best-of-n, ``tether kl``: loading, sampling, packing, LoRA, bf16) and then measure
KL[π_learned‖target] exactly by enumeration. A copy of the trainers "composed the same way" over a
``TabularPolicy`` would prove nothing about the original (one implementation, or no proof). So the
tabular policy is dressed as an ordinary ``AutoModelForCausalLM``; every number stays exact.

The mapping (P prompts, S prefixes per prompt, V tabular tokens, H = P·S + 1):

- tokens: ids 0..V-1 are the tabular tokens (same ids, ``eos`` = ``space.eos``), then one token per
  prompt, ``<p0>`` .. ``<p{P-1}>`` (ids V..V+P-1). The output vocabulary is V + P wide; prompt tokens
  get a constant logit ``PROMPT_LOGIT`` (large, finite: top-p sorting, bf16 and the KL code stay
  finite) from a buffer inside ``lm_head``, so they are never sampled.
- states ↔ hidden: the backbone walks the tree (``space.child_prefix``) and returns the state of
  each position as a one-hot vector, ``last_hidden_state`` (B, L, H). State h = p·S + s is the prefix
  s of prompt p; h = H - 1 is "off-tree" (after eos, at depth T, on padding, before any prompt token).
  A prompt token, or ``position_ids`` 0 (packed rows), restarts the walk; attention-masked tokens are
  skipped. The decoding cache (``past_key_values``; ``cache`` in transformers >= 5.2x) is the (B,)
  state after the last token: all incremental decoding needs (``tether.sampling.sample``).
- hidden ↔ lm_head: ``lm_head.weight`` (V + P, H) holds the logit table column by column:
  ``weight[:V, p·S + s] = table[p, s]``. A value head on the one-hot hidden is a tabular value
  function, and LoRA on ``lm_head`` is a low-rank update of the table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from tether.modeling import CACHE_KW
from tether.rewards import RewardSource

from .tabular import DTYPE, TabularPolicy, TabularProblem, TabularSpace

PROMPT_LOGIT = -1e4  # exp(-1e4) = 0 in every float format, and -1e4 is finite in bf16/fp16
EOS_TEXT = "</s>"
_PROMPT_RE = re.compile(r"<p(\d+)>")
_CACHE = CACHE_KW  # the decoding state's name in this transformers (tether.modeling)


# ---- the model -------------------------------------------------------------------------------------


class TabularLMConfig(PretrainedConfig):
    """``tabular_vocab_size`` V, ``horizon`` T, ``eos_token_id``, ``n_prompts`` P of a ``TabularSpace``.
    Derived (Hugging Face meaning): ``vocab_size`` = V + P tokens, ``hidden_size`` = P·S + 1 states."""

    model_type = "tether_tabular"

    def __init__(
        self, tabular_vocab_size: int = 3, horizon: int = 3, eos_token_id: int = 0, n_prompts: int = 1, **kwargs
    ):
        for derived in ("vocab_size", "hidden_size"):
            kwargs.pop(derived, None)
        kwargs.setdefault("tie_word_embeddings", False)
        self.tabular_vocab_size, self.horizon, self.n_prompts = tabular_vocab_size, horizon, n_prompts
        self.n_prefixes = sum((tabular_vocab_size - 1) ** k for k in range(horizon))  # S
        self.vocab_size = tabular_vocab_size + n_prompts
        self.hidden_size = n_prompts * self.n_prefixes + 1
        super().__init__(eos_token_id=eos_token_id, **kwargs)

    def space(self) -> TabularSpace:
        return TabularSpace(self.tabular_vocab_size, self.horizon, eos=self.eos_token_id, n_prompts=self.n_prompts)


def transition_table(space: TabularSpace) -> torch.Tensor:
    """(H, V + P) long: the state after reading token v in state h (off-tree = H - 1 = P·S)."""
    P, S, V = space.n_prompts, space.n_prefixes, space.vocab_size
    off = P * S
    child = space.child_prefix  # (S, V), -1 where s·a is complete
    on = torch.where(child >= 0, torch.arange(P)[:, None, None] * S + child, off)  # (P, S, V)
    table = torch.full((off + 1, V + P), off, dtype=torch.long)
    table[:off, :V] = on.reshape(off, V)
    table[:, V:] = torch.arange(P) * S  # a prompt token starts its prompt's root from any state
    return table


class TabularBackbone(nn.Module):
    """Token ids -> one-hot tree states (B, L, H). No parameters: the table lives in ``lm_head``."""

    def __init__(self, config: TabularLMConfig):
        super().__init__()
        self.config = config
        self.register_buffer("dtype_anchor", torch.zeros(0), persistent=False)  # follows .to(dtype); 0 elements
        self._table: Optional[torch.Tensor] = None  # built lazily: __init__ may run on the meta device

    def transitions(self, device) -> torch.Tensor:
        if self._table is None or self._table.device != torch.device(device):
            self._table = transition_table(self.config.space()).to(device)
        return self._table

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=True,
        inputs_embeds=None,
        cache=None,
        **kwargs,
    ):
        """(B, L) ids -> ``last_hidden_state`` (B, L, H) one-hot states; the cache is the (B,) last state."""
        past = cache if cache is not None else past_key_values
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a tabular LM reads token ids only (no inputs_embeds)")
        B, L = input_ids.shape
        table = self.transitions(input_ids.device)
        off = self.config.hidden_size - 1
        state = torch.full((B,), off, dtype=torch.long, device=input_ids.device) if past is None else past
        keep = None if attention_mask is None else attention_mask[:, -L:].bool()  # (B, L): the new tokens' mask
        states = []
        for i in range(L):  # L is a handful of tokens
            prev = state if position_ids is None else torch.where(position_ids[:, i] == 0, off, state)
            nxt = table[prev, input_ids[:, i]]
            state = nxt if keep is None else torch.where(keep[:, i], nxt, state)  # masked: skipped
            states.append(state)
        hidden = F.one_hot(torch.stack(states, 1), off + 1).to(self.dtype_anchor.dtype)  # (B, L, H)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=(hidden,) if output_hidden_states else None,
            **{_CACHE: state if use_cache else None},
        )


class TabularHead(nn.Linear):
    """``nn.Linear`` (so LoRA targets it) plus the prompt-token logits: a constant buffer, inside the
    module, because DPO's packed path calls ``get_output_embeddings()`` on hidden states directly."""

    def __init__(self, config: TabularLMConfig):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        offset = torch.zeros(config.vocab_size)
        offset[config.tabular_vocab_size :] = PROMPT_LOGIT
        self.register_buffer("prompt_offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.prompt_offset.to(x.dtype)  # (..., V + P)


class TabularLM(PreTrainedModel, GenerationMixin):
    """π(a | x, s) = softmax(lm_head.weight[:, state])_a as a causal LM (module docstring)."""

    config_class = TabularLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: list = []

    def __init__(self, config: TabularLMConfig):
        super().__init__(config)
        self.model = TabularBackbone(config)
        self.lm_head = TabularHead(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, TabularHead):  # uniform policy; prompt tokens masked
            module.weight.data.zero_()
            module.prompt_offset.data.zero_()
            module.prompt_offset.data[self.config.tabular_vocab_size :] = PROMPT_LOGIT

    def get_input_embeddings(self):
        return None  # no token embeddings: tokens move a discrete state (TabularBackbone)

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=True,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        labels=None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits (B, L', V + P) in the model's dtype; L' = ``logits_to_keep`` last positions (0: all)."""
        if labels is not None:
            raise ValueError("TabularLM computes no loss: score log-probs with tether.modeling")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: all
        logits = self.lm_head(out.last_hidden_state[:, keep, :])  # (B, L', V + P)
        return CausalLMOutputWithPast(logits=logits, hidden_states=out.hidden_states, **{_CACHE: getattr(out, _CACHE)})


AutoConfig.register(TabularLMConfig.model_type, TabularLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TabularLMConfig, TabularLM, exist_ok=True)


# ---- conversions between the oracle and the model ------------------------------------------------


def tabular_lm(space: TabularSpace, table: Union[TabularPolicy, torch.Tensor, None] = None) -> TabularLM:
    """A fp32 ``TabularLM`` whose logits are ``table`` (P, S, V) (a policy's; default uniform).
    -inf logits become ``PROMPT_LOGIT`` (same probabilities, finite arithmetic)."""
    config = TabularLMConfig(
        tabular_vocab_size=space.vocab_size, horizon=space.horizon, eos_token_id=space.eos, n_prompts=space.n_prompts
    )
    model = TabularLM(config).eval()
    if table is not None:
        t = (table.table if isinstance(table, TabularPolicy) else table).detach().to(DTYPE)
        P, S, V = space.n_prompts, space.n_prefixes, space.vocab_size
        if tuple(t.shape) != (P, S, V):
            raise ValueError(f"logit table of shape {tuple(t.shape)}; this space needs (P, S, V) = {(P, S, V)}")
        if torch.isnan(t).any() or (t == torch.inf).any():
            raise ValueError("logit table has NaN or +inf entries")
        t = t.clamp(min=PROMPT_LOGIT)
        with torch.no_grad():
            model.lm_head.weight[:V, : P * S] = t.reshape(P * S, V).T.float()  # column p·S + s = table[p, s]
    return model


def tabular_policy(model, space: TabularSpace) -> TabularPolicy:
    """The (frozen, float64) ``TabularPolicy`` a ``TabularLM`` implements: the LM head evaluated on every
    state's one-hot vector, so LoRA deltas (peft-wrapped models) and the model's dtype are included."""
    config = model.config
    if (config.tabular_vocab_size, config.horizon, config.eos_token_id, config.n_prompts) != (
        space.vocab_size,
        space.horizon,
        space.eos,
        space.n_prompts,
    ):
        raise ValueError(
            f"model config (V={config.tabular_vocab_size}, T={config.horizon}, eos={config.eos_token_id}, "
            f"P={config.n_prompts}) does not match {space}"
        )
    head = model.get_output_embeddings()
    P, S, V = space.n_prompts, space.n_prefixes, space.vocab_size
    was_training = head.training
    head.eval()  # no LoRA dropout
    try:
        with torch.no_grad():
            basis = torch.eye(P * S, config.hidden_size, dtype=head.weight.dtype, device=head.weight.device)  # (P·S, H)
            logits = head(basis)[:, :V]  # (P·S, V)
    finally:
        head.train(was_training)
    return TabularPolicy(space, logits.to(DTYPE).reshape(P, S, V).cpu(), trainable=False)


# ---- tokenizer and text ----------------------------------------------------------------------------


def token_names(space: TabularSpace) -> list[str]:
    """The V + P token strings, indexed by id: eos is ``</s>``, the other tabular tokens ``a``, ``b``, ...
    (``w26``, ... past 26), then ``<p0>`` ... ``<p{P-1}>``."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = [EOS_TEXT] * space.vocab_size
    for j, a in enumerate(space.words):
        names[a] = letters[j] if j < len(letters) else f"w{j}"
    return names + prompt_texts(space)


def tabular_tokenizer(space: TabularSpace) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``token_names``: whitespace-separated words, no BOS, no pad (tether
    pads with eos), eos and prompt tokens special (``skip_special_tokens`` drops them)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    names = token_names(space)
    tk = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [EOS_TEXT] + prompt_texts(space)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=EOS_TEXT,
        additional_special_tokens=specials[1:],
        clean_up_tokenization_spaces=False,
    )


def save_tabular_lm(problem: TabularProblem, path, *, table: Union[TabularPolicy, torch.Tensor, None] = None) -> Path:
    """Write model (safetensors) and tokenizer to ``path``, loadable with ``tether.modeling.load_causal_lm``
    and ``load_tokenizer``. Logits: ``table`` if given, else the reference policy's."""
    path = Path(path)
    tabular_lm(problem.space, problem.ref if table is None else table).save_pretrained(
        str(path), safe_serialization=True
    )
    tabular_tokenizer(problem.space).save_pretrained(str(path))
    return path


def prompt_texts(space: TabularSpace) -> list[str]:
    """``["<p0>", ..., "<p{P-1}>"]``: prompt p's text (one token)."""
    return [f"<p{p}>" for p in range(space.n_prompts)]


def completion_text(space: TabularSpace, tokens: Iterable[int], *, eos: bool = True) -> str:
    """Space-separated token names; the eos token spelled ``</s>`` if ``eos``, else dropped (what
    ``tether.trainers.rollout.decode_completion`` returns: special tokens skipped)."""
    names = token_names(space)
    out = []
    for t in tokens:
        if not 0 <= int(t) < space.vocab_size:
            raise ValueError(f"token {int(t)} is not a tabular token of {space}")
        if eos or int(t) != space.eos:
            out.append(names[int(t)])
    return " ".join(out)


def parse_prompt(space: TabularSpace, text: str) -> int:
    """``"<p3>"`` -> 3; ValueError on anything else."""
    m = _PROMPT_RE.fullmatch(text.strip())
    if m is None or int(m.group(1)) >= space.n_prompts:
        raise ValueError(f"prompt {text!r} is not one of {space}'s prompts <p0>..<p{space.n_prompts - 1}>")
    return int(m.group(1))


def parse_completion(space: TabularSpace, text: str) -> int:
    """A completion's text -> its index in ``space.sequences``. Either form: eos spelled at the end, or
    dropped (decoded text): fewer than T words then means the sequence ended with eos, exactly T words
    that it was truncated at ``max_new_tokens = T``. ValueError on text that is no sequence of the space."""
    index = {n: i for i, n in enumerate(token_names(space)[: space.vocab_size])}
    words = text.split()
    ended = bool(words) and words[-1] == EOS_TEXT
    words = words[:-1] if ended else words
    bad = [w for w in words if w not in index or w == EOS_TEXT]
    if bad:
        raise ValueError(f"completion {text!r}: {bad} are not non-eos tokens of {space} ({token_names(space)})")
    seq = tuple(index[w] for w in words) + ((space.eos,) if ended or len(words) < space.horizon else ())
    if seq not in space.seq_index:
        raise ValueError(
            f"completion {text!r} is not a sequence of {space}: at most T={space.horizon} tokens "
            "(sample with max_new_tokens = T)"
        )
    return space.seq_index[seq]


class TabularReward(RewardSource):
    """``problem.rewards[p, k]`` of (prompt text, completion text) pairs: (B,) float32, as every
    ``RewardSource`` (so ``train_online``, best-of-n and ``tether kl`` take it unchanged)."""

    def __init__(self, problem: TabularProblem, *, name: str = "tabular"):
        self.problem, self.name = problem, name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        sp = self.problem.space
        p = torch.tensor([parse_prompt(sp, x) for x in prompts], dtype=torch.long)
        k = torch.tensor([parse_completion(sp, y) for y in completions], dtype=torch.long)
        return self.problem.rewards[p, k].float()  # (B,)


def reward_function(problem: TabularProblem, *, name: str = "tabular") -> TabularReward:
    """The reward of ``problem`` on texts: ``fn(prompts, completions) -> (B,) float32`` (``TabularReward``)."""
    return TabularReward(problem, name=name)


def preference_rows(problem: TabularProblem, pairs) -> list[dict]:
    """TRL-style explicit preference rows ``{"prompt": "<p0>", "chosen": " a b </s>", "rejected": " c a d"}``.

    ``pairs``: rows ``(prompt, chosen, rejected)`` or ``(prompt, chosen, rejected, count)`` — a prompt
    index, two sequence indices into ``space.sequences``, and how many times to repeat the row
    (default 1) — as a list of tuples or an (N, 3) / (N, 4) integer tensor; rows keep their order.
    Completions spell eos where the sequence has it and not otherwise, so ``tokenize_pairs(...,
    add_eos=False)`` yields exactly the tabular sequences (a full-length one stays truncated)."""
    sp = problem.space
    rows = pairs.tolist() if isinstance(pairs, torch.Tensor) else [list(r) for r in pairs]
    out = []
    for r in rows:
        if len(r) not in (3, 4):
            raise ValueError(f"a pair is (prompt, chosen, rejected[, count]), got {r}")
        p, c, j = (int(x) for x in r[:3])
        if not (0 <= p < sp.n_prompts and 0 <= c < sp.n_sequences and 0 <= j < sp.n_sequences):
            raise ValueError(f"pair {r} is out of range for {sp}")
        row = {
            "prompt": prompt_texts(sp)[p],
            "chosen": " " + completion_text(sp, sp.sequences[c]),
            "rejected": " " + completion_text(sp, sp.sequences[j]),
        }
        out.extend(dict(row) for _ in range(int(r[3]) if len(r) == 4 else 1))
    return out
