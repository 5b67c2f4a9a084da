"""Attention masks of a prefix-tree layout: one prompt followed by several completions in the same row.

Prefix sharing (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
arXiv:2410.20305, §3 and Fig. 1): a preference pair laid out as [prompt, chosen, rejected] in one
sequence computes P + R_c + R_r tokens instead of 2P + R_c + R_r. Each completion attends to the whole
prompt and causally to itself, never to the other completion, and its positions continue from P, so
every completion token sees exactly the context it sees in its own sequence [prompt, completion].

A row of width W holds segments (a prompt and its completions), each labelled by ``segment`` (R, W):
tokens of one segment share a value, distinct segments (and a padding tail) have distinct values; and
``branch`` (R, W): 0 for prompt tokens, k ≥ 1 for tokens of the segment's k-th completion. Within a
segment the prompt comes first, then the completions one after another.
"""

from __future__ import annotations

import torch


def prefix_tree_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(R, W, W) bool, True where query q may attend to key k:

        same segment  ∧  k ≤ q  ∧  (branch_k = 0  ∨  branch_k = branch_q)

    i.e. causal within the segment, and a completion token sees the prompt and the earlier tokens of
    its own completion only. Every query sees at least itself (no empty row, so no NaN in softmax).
    ``segment``, ``branch``: (R, W) integer tensors as described in the module docstring."""
    W = segment.shape[-1]
    idx = torch.arange(W, device=segment.device)
    causal = idx[None, :] <= idx[:, None]  # (W, W): [q, k] = k <= q
    same = segment[:, :, None] == segment[:, None, :]  # (R, W, W)
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return same & visible & causal[None]
