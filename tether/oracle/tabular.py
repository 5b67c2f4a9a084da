"""A tabular autoregressive "language" whose every sequence can be enumerated (pure torch, float64).

The space: a vocabulary of ``V`` tokens, one of which is the end token ``eos``; completions of at
most ``T`` tokens; ``P`` prompts, each just the index of a root of its own tree. A completion is
complete when it emits ``eos`` or reaches length ``T`` (then it is truncated, as generation with
``max_new_tokens = T`` is). The internal states s = (x, y_<t) are the *prefixes*: sequences of
non-eos tokens of length 0..T-1; there are S = Σ_{k<T} (V-1)^k of them per prompt, and K = S +
(V-1)^T complete sequences (each prefix followed by eos, plus the full-length ones).

``TabularPolicy`` holds one logit vector per (prompt, prefix) -- an (P, S, V) ``nn.Parameter`` -- and
answers what the language-model math needs: next-token logits per position shaped (B, T, V), per-token
``logps`` of given completions (through ``tether.ops.logprobs.selective_logps``, the same function the
trainers use), full next-token distributions, exact sequence and state probabilities, and sampling.

Batches of completions use the project's conventions: tokens padded after the end
(here with ``eos``), ``mask`` True on the real completion tokens (up to and including the first eos).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from tether import rng
from tether.ops.logprobs import selective_logps

DTYPE = torch.float64
MAX_SEQUENCES = 20_000  # enumeration is exponential in T: keep the oracle a test-sized object


class Completions(NamedTuple):
    """A batch of completions: which root, which tokens, which tokens count."""

    prompt_ids: torch.Tensor  # (B,) int64
    tokens: torch.Tensor  # (B, T) int64, padded with eos after the end
    mask: torch.Tensor  # (B, T) bool, True on real completion tokens


class TabularSpace:
    """All prefixes and complete sequences of a tabular language, with index tables.

    Attributes (S prefixes, K complete sequences, T horizon, V vocabulary):
        prefixes: the S internal states as token tuples; index 0 is the root ``()``; ordered by length.
        sequences: the K complete sequences as token tuples, in the canonical order every (P, K)
            table of this package (rewards, sequence probabilities) uses.
        seq_tokens, seq_mask, seq_prefix_ids: (K, T) padded tokens, mask, and the prefix index of the
            state each token is emitted from (0 on padding).
        child_prefix: (S, V) index of the prefix s·a, or -1 when s·a is complete.
        child_seq: (S, V) index of the complete sequence s·a, or -1 when s·a is a prefix.
        prefix_parent, prefix_last: (S,) the parent prefix and last token of each prefix (root: -1).
        prefixes_by_length: T index tensors, the prefixes of length k at position k.
    """

    def __init__(self, vocab_size: int, horizon: int, *, eos: int = 0, n_prompts: int = 1) -> None:
        if vocab_size < 2:
            raise ValueError(f"a tabular space needs at least 2 tokens (one is eos), got vocab_size={vocab_size}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not 0 <= eos < vocab_size:
            raise ValueError(f"eos={eos} is not a token of a {vocab_size}-token vocabulary")
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        n_seq = sum((vocab_size - 1) ** k for k in range(horizon)) + (vocab_size - 1) ** horizon
        if n_seq > MAX_SEQUENCES:
            raise ValueError(
                f"V={vocab_size}, T={horizon} has {n_seq} sequences; the oracle enumerates at most {MAX_SEQUENCES}"
            )
        self.vocab_size, self.horizon, self.eos, self.n_prompts = vocab_size, horizon, eos, n_prompts
        self.words = tuple(a for a in range(vocab_size) if a != eos)  # the non-eos tokens

        self.prefixes: list[tuple[int, ...]] = [
            p for k in range(horizon) for p in itertools.product(self.words, repeat=k)
        ]
        self.prefix_index = {p: i for i, p in enumerate(self.prefixes)}
        self.sequences: list[tuple[int, ...]] = []
        child_prefix = torch.full((len(self.prefixes), vocab_size), -1, dtype=torch.long)
        child_seq = torch.full((len(self.prefixes), vocab_size), -1, dtype=torch.long)
        for i, p in enumerate(self.prefixes):
            for a in range(vocab_size):
                nxt = p + (a,)
                if a == eos or len(nxt) == horizon:
                    child_seq[i, a] = len(self.sequences)
                    self.sequences.append(nxt)
                else:
                    child_prefix[i, a] = self.prefix_index[nxt]
        self.seq_index = {y: k for k, y in enumerate(self.sequences)}
        self.child_prefix, self.child_seq = child_prefix, child_seq
        # parent prefix and last token of each prefix (root: -1, -1)
        self.prefix_parent = torch.tensor([self.prefix_index[p[:-1]] if p else -1 for p in self.prefixes])
        self.prefix_last = torch.tensor([p[-1] if p else -1 for p in self.prefixes])
        lengths = torch.tensor([len(p) for p in self.prefixes])
        self.prefixes_by_length = [torch.nonzero(lengths == k).flatten() for k in range(horizon)]

        K = len(self.sequences)
        self.seq_tokens = torch.full((K, horizon), eos, dtype=torch.long)
        self.seq_mask = torch.zeros((K, horizon), dtype=torch.bool)
        for k, y in enumerate(self.sequences):
            self.seq_tokens[k, : len(y)] = torch.tensor(y)
            self.seq_mask[k, : len(y)] = True
        self.seq_prefix_ids = self.prefix_ids(self.seq_tokens)

    @property
    def n_prefixes(self) -> int:
        return len(self.prefixes)

    @property
    def n_sequences(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return (
            f"TabularSpace(V={self.vocab_size}, T={self.horizon}, eos={self.eos}, P={self.n_prompts}: "
            f"S={self.n_prefixes} prefixes, K={self.n_sequences} sequences)"
        )

    def completion_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, T) bool: True up to and including the first eos."""
        is_eos = (tokens == self.eos).long()
        eos_before = torch.cumsum(is_eos, dim=-1) - is_eos  # eos strictly before position t
        return eos_before == 0

    def prefix_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, T) index of the prefix y_<t each token is emitted from (0 after the end)."""
        B, T = tokens.shape
        if T > self.horizon:
            raise ValueError(f"completions of length {T} exceed the horizon {self.horizon}")
        ids = torch.zeros((B, T), dtype=torch.long)
        state = torch.zeros(B, dtype=torch.long)
        for t in range(1, T):
            state = self.child_prefix[state, tokens[:, t - 1]].clamp(min=0)  # -1 (ended) -> root: masked anyway
            ids[:, t] = state
        return ids

    def sequence_ids(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) complete completions -> (B,) index into ``sequences``."""
        mask = self.completion_mask(tokens) if mask is None else mask.bool()
        last = mask.sum(-1) - 1  # (B,)
        rows = torch.arange(tokens.shape[0])
        ids = self.child_seq[self.prefix_ids(tokens)[rows, last], tokens[rows, last]]
        if (ids < 0).any():
            raise ValueError("some completions are not complete (no eos before the horizon)")
        return ids

    def all_completions(self) -> Completions:
        """Every (prompt, complete sequence): B = P·K rows, prompt-major, canonical sequence order."""
        P, K = self.n_prompts, self.n_sequences
        return Completions(
            torch.arange(P).repeat_interleave(K),
            self.seq_tokens.repeat(P, 1),
            self.seq_mask.repeat(P, 1),
        )


class TabularPolicy(nn.Module):
    """π(a | x, s) = softmax(table[x, s])_a: one logit vector per (prompt, prefix), float64.

    ``table`` is an (P, S, V) ``nn.Parameter`` (``requires_grad`` = ``trainable``); -inf entries are
    tokens the policy never emits. Every probability is exact: no sampling unless ``sample`` is called.
    """

    def __init__(self, space: TabularSpace, table: Optional[torch.Tensor] = None, *, trainable: bool = True) -> None:
        super().__init__()
        shape = (space.n_prompts, space.n_prefixes, space.vocab_size)
        if table is None:
            table = torch.zeros(shape, dtype=DTYPE)
        if tuple(table.shape) != shape:
            raise ValueError(f"logit table of shape {tuple(table.shape)}; this space needs (P, S, V) = {shape}")
        self.space = space
        self.table = nn.Parameter(table.detach().to(DTYPE).clone(), requires_grad=trainable)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, space: TabularSpace, *, seed: int, scale: float = 1.0, trainable: bool = True) -> "TabularPolicy":
        """Logits i.i.d. N(0, scale²) from a seeded generator (scale sets how peaked π is)."""
        g = rng.generator(seed)
        shape = (space.n_prompts, space.n_prefixes, space.vocab_size)
        return cls(space, scale * torch.randn(shape, generator=g, dtype=DTYPE), trainable=trainable)

    @classmethod
    def dirichlet(
        cls, space: TabularSpace, *, seed: int, concentration: float = 1.0, trainable: bool = True
    ) -> "TabularPolicy":
        """Each next-token distribution ~ Dirichlet(concentration·1), seeded (small α: peaked)."""
        shape = (space.n_prompts, space.n_prefixes, space.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probs = torch.distributions.Dirichlet(torch.full(shape, float(concentration), dtype=DTYPE)).sample()
        return cls.from_probs(space, probs, trainable=trainable)

    @classmethod
    def from_probs(cls, space: TabularSpace, probs: torch.Tensor, *, trainable: bool = True) -> "TabularPolicy":
        """From an (P, S, V) table of next-token distributions (zeros become -inf logits)."""
        probs = probs.to(DTYPE)
        if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones((), dtype=DTYPE), atol=1e-12):
            raise ValueError("from_probs needs non-negative next-token distributions summing to 1")
        return cls(space, probs.log(), trainable=trainable)

    @classmethod
    def from_sequence_probs(
        cls, space: TabularSpace, seq_probs: torch.Tensor, *, trainable: bool = True
    ) -> "TabularPolicy":
        """The autoregressive factorisation of any (P, K) sequence distribution:
        π(a|s) = M(s·a)/M(s), M(s) the mass of the sequences through s (uniform where M(s) = 0)."""
        seq_probs = seq_probs.to(DTYPE)
        P, S, V = space.n_prompts, space.n_prefixes, space.vocab_size
        mass = torch.zeros(P, S, dtype=DTYPE)
        child_mass = torch.zeros(P, S, V, dtype=DTYPE)
        terminal = space.child_seq >= 0
        for k in reversed(range(space.horizon)):
            ids = space.prefixes_by_length[k]
            cm = torch.where(
                terminal[ids],
                seq_probs[:, space.child_seq[ids].clamp(min=0)],
                mass[:, space.child_prefix[ids].clamp(min=0)],
            )  # (P, n_k, V)
            child_mass[:, ids] = cm
            mass[:, ids] = cm.sum(-1)
        probs = torch.where(mass[..., None] > 0, child_mass / mass[..., None].clamp(min=1e-300), 1.0 / V)
        return cls(space, probs.log(), trainable=trainable)

    def frozen_copy(self) -> "TabularPolicy":
        """A detached, non-trainable copy (a reference, or π_old)."""
        return TabularPolicy(self.space, self.table.detach(), trainable=False)

    # ---- next-token distributions ---------------------------------------------------------------
    def log_probs(self) -> torch.Tensor:
        """(P, S, V) log π(a | x, s)."""
        return torch.log_softmax(self.table, dim=-1)

    def probs(self) -> torch.Tensor:
        """(P, S, V) π(a | x, s)."""
        return torch.softmax(self.table, dim=-1)

    # ---- the language-model interface -----------------------------------------------------------
    def logits(self, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of the completions: (B,), (B, T) -> (B, T, V).

        Position t holds the logits of the state (x, y_<t), i.e. the distribution ``tokens[:, t]`` was
        drawn from, as a causal LM's logits shifted by one. Positions after the end (``mask`` False,
        see ``TabularSpace.completion_mask``) hold the root's logits: finite, and to be masked.
        """
        return self.table[prompt_ids[:, None], self.space.prefix_ids(tokens)]  # (B, T, V)

    def logps(
        self, prompt_ids: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """log π(y_t | x, y_<t) of given completions, (B, T), zero where ``mask`` is False."""
        mask = self.space.completion_mask(tokens) if mask is None else mask.bool()
        return selective_logps(self.logits(prompt_ids, tokens), tokens).masked_fill(~mask, 0.0)

    def seq_logprobs(
        self, prompt_ids: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """log π(y | x) = Σ_t logps_t of complete completions: (B,)."""
        return self.logps(prompt_ids, tokens, mask).sum(-1)

    # ---- exact distributions over the whole tree ------------------------------------------------
    def sequence_log_probs(self) -> torch.Tensor:
        """(P, K) log π(y | x) of every complete sequence, canonical order (differentiable)."""
        sp = self.space
        logp = self.log_probs()[:, sp.seq_prefix_ids, sp.seq_tokens]  # (P, K, T)
        return logp.masked_fill(~sp.seq_mask, 0.0).sum(-1)

    def sequence_probs(self) -> torch.Tensor:
        """(P, K) π(y | x); each row sums to 1."""
        return self.sequence_log_probs().exp()

    def state_probs(self) -> torch.Tensor:
        """(P, S) probability that a completion of π passes through each prefix (root: 1). Differentiable."""
        sp = self.space
        probs = self.probs()
        reach = torch.ones(sp.n_prompts, sp.n_prefixes, dtype=DTYPE)
        for k in range(1, sp.horizon):  # parents (length k-1) are final before their children
            ids = sp.prefixes_by_length[k]
            parent, token = sp.prefix_parent[ids], sp.prefix_last[ids]
            reach = reach.index_copy(1, ids, reach[:, parent] * probs[:, parent, token])
        return reach

    def sample(self, n: int, *, generator: torch.Generator, prompt_ids: Optional[torch.Tensor] = None) -> Completions:
        """Draw completions: ``n`` per prompt (prompt-major) unless ``prompt_ids`` (B,) is given."""
        sp = self.space
        if prompt_ids is None:
            prompt_ids = torch.arange(sp.n_prompts).repeat_interleave(n)
        B = prompt_ids.shape[0]
        probs = self.probs().detach()
        tokens = torch.full((B, sp.horizon), sp.eos, dtype=torch.long)
        mask = torch.zeros((B, sp.horizon), dtype=torch.bool)
        state = torch.zeros(B, dtype=torch.long)
        alive = torch.ones(B, dtype=torch.bool)
        for t in range(sp.horizon):
            a = torch.multinomial(probs[prompt_ids, state], 1, generator=generator).squeeze(-1)  # (B,)
            tokens[:, t] = torch.where(alive, a, sp.eos)
            mask[:, t] = alive
            nxt = sp.child_prefix[state, a]
            alive = alive & (nxt >= 0)
            state = torch.where(alive, nxt, 0)
        return Completions(prompt_ids, tokens, mask)


# ---- rewards on complete sequences: (P, K) float64 tables -------------------------------------------


def random_rewards(space: TabularSpace, *, seed: int, scale: float = 1.0) -> torch.Tensor:
    """r(x, y) i.i.d. N(0, scale²) per (prompt, sequence): ties have probability 0."""
    g = rng.generator(seed)
    return scale * torch.randn((space.n_prompts, space.n_sequences), generator=g, dtype=DTYPE)


def count_rewards(space: TabularSpace, token: int, *, weight: float = 1.0) -> torch.Tensor:
    """r(x, y) = weight · (number of times ``token`` occurs in y): structured, with many ties."""
    counts = ((space.seq_tokens == token) & space.seq_mask).sum(-1).to(DTYPE)  # (K,)
    return weight * counts.expand(space.n_prompts, -1).clone()


def length_rewards(space: TabularSpace, *, per_token: float = 1.0, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r(x, y) = per_token · (number of non-eos tokens in y) [+ base]: rewards length, inviting a
    policy to postpone eos (length hacking). ``base``: an optional (P, K) table added on top."""
    length = ((space.seq_tokens != space.eos) & space.seq_mask).sum(-1).to(DTYPE)  # (K,)
    out = per_token * length.expand(space.n_prompts, -1).clone()
    return out if base is None else out + base.to(DTYPE)


def reward_of(rewards: torch.Tensor, space: TabularSpace, completions: Completions) -> torch.Tensor:
    """Look up the (P, K) reward table for a batch of complete completions: (B,) float64."""
    return rewards[completions.prompt_ids, space.sequence_ids(completions.tokens, completions.mask)]


@dataclass
class TabularProblem:
    """A space, a frozen reference policy and a reward table: one KL-regularised problem."""

    space: TabularSpace
    ref: TabularPolicy
    rewards: torch.Tensor  # (P, K) float64


def make_problem(
    vocab_size: int = 3,
    horizon: int = 3,
    *,
    n_prompts: int = 2,
    seed: int = 0,
    reward: str = "random",
    ref_scale: float = 1.0,
    eos: int = 0,
) -> TabularProblem:
    """A seeded random problem: π_ref with N(0, ref_scale²) logits; reward ``random`` (N(0, 1)),
    ``count`` (occurrences of token ``eos + 1 mod V``) or ``length`` (number of non-eos tokens)."""
    space = TabularSpace(vocab_size, horizon, eos=eos, n_prompts=n_prompts)
    ref = TabularPolicy.random(space, seed=seed, scale=ref_scale, trainable=False)
    if reward == "random":
        r = random_rewards(space, seed=seed + 1)
    elif reward == "count":
        r = count_rewards(space, (eos + 1) % vocab_size)
    elif reward == "length":
        r = length_rewards(space)
    else:
        raise ValueError(f"unknown reward {reward!r}: random | count | length")
    return TabularProblem(space, ref, r)
