"""The KL by completion position: bucketed per-token means, and position weights w_t on β (docs/theory.md §12).

Completion tensors are (B, T) right-padded: column t is completion token t (0 = the first) of every
row, ``mask`` True where the token counts.

Why positions: Qi et al. 2024 ("Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
arXiv:2406.05946, §2 and Fig. 1) find the per-token KL between an aligned model and its base
concentrated in the first few completion tokens. ``kl/by_position/<bucket>`` shows where a run's KL
sits; ``position_weights`` lets β depend on the position (docs/theory.md §12).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

POSITION_BUCKETS = ((0, 3), (4, 15), (16, 63), (64, None))
"""Inclusive [first, last] completion positions (None = no end) of the ``kl/by_position/<label>`` metrics."""


def bucket_label(bucket: tuple) -> str:
    lo, hi = bucket
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


BUCKET_LABELS = tuple(bucket_label(b) for b in POSITION_BUCKETS)


def bucket_of(n: int, buckets: Sequence[tuple] = POSITION_BUCKETS) -> int:
    """Index of the bucket holding the integer ``n`` (a position, or a completion length)."""
    for i, (lo, hi) in enumerate(buckets):
        if n >= lo and (hi is None or n <= hi):
            return i
    raise ValueError(f"{n} is in no bucket of {buckets}")


def position_bucket_sums(
    kl: torch.Tensor, mask: torch.Tensor, buckets: Sequence[tuple] = POSITION_BUCKETS
) -> tuple[list[float], list[float]]:
    """(sums, counts) per bucket of the per-token ``kl`` (B, T) over counted tokens (``mask`` (B, T)) at
    positions in the bucket: the bucket's mean KL per token is sums[i] / counts[i] (decomposable, so a
    global mean is Σ sums / Σ counts over processes)."""
    m = mask.bool()
    T = kl.shape[-1]
    sums, counts = [], []
    for lo, hi in buckets:
        end = T if hi is None else min(hi + 1, T)
        if lo >= end:
            sums.append(0.0)
            counts.append(0.0)
            continue
        mk = m[:, lo:end]  # (B, t)
        sums.append(float(kl[:, lo:end].double().masked_fill(~mk, 0.0).sum()))
        counts.append(float(mk.sum()))
    return sums, counts


def position_means(kl: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (T,), counts (T,)) of the per-token ``kl`` (B, T) at each completion position over counted tokens."""
    m = mask.bool()
    return kl.double().masked_fill(~m, 0.0).sum(0), m.sum(0).double()


def position_weights(
    T: int, *, decay: float = 0.0, weights: Optional[Sequence[float]] = None, device=None, dtype=torch.float32
) -> Optional[torch.Tensor]:
    """The weights w_t (T,) that multiply β at completion position t, or None for w ≡ 1 (the default: the
    caller then takes the unweighted path, bit for bit).

    ``weights`` [w_0, ..., w_{K-1}]: w_t = weights[t] for t < K and weights[K-1] after;
    else w_t = exp(-decay·t) (decay ≥ 0; 0 = off). The per-sequence penalty becomes Σ_t β·w_t·KL_t."""
    if weights:
        w = [float(x) for x in weights]
        w = w[:T] + [w[-1]] * max(T - len(w), 0)
        return torch.tensor(w, dtype=dtype, device=device)
    if decay:
        return torch.exp(-float(decay) * torch.arange(T, dtype=torch.float64)).to(dtype=dtype, device=device)
    return None


def check_position_weights(*, decay: float, weights: Optional[Sequence[float]]) -> Optional[str]:
    """A one-line reason the settings are invalid, or None."""
    if weights and decay:
        return "set beta_position_weights or beta_position_decay, not both"
    if not (math.isfinite(decay) and decay >= 0):
        return f"beta_position_decay must be a finite number >= 0, got {decay}"
    if weights and not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in weights):
        return f"beta_position_weights must be finite numbers >= 0, got {list(weights)}"
    return None


def weight_by_position(per_token: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """per_token (B, T) · w (T,) broadcast over rows; ``per_token`` itself (the same object) when w is None."""
    if w is None:
        return per_token
    return per_token * w[: per_token.shape[-1]].to(per_token.dtype)
