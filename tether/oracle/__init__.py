"""Exact oracles for tests: a tabular autoregressive "language" small enough to enumerate.

Every quantity a KL-regularised method estimates from samples (sequence KLs in both directions,
expected gradients of each KL estimator in each placement, the optimal policy, best-of-n) is
computed here exactly, in float64, by summing over every complete sequence (docs/theory.md §2, §3, §5, §7).

- ``tabular``: the space of sequences, ``TabularPolicy`` (one logit vector per (prompt, prefix)),
  reward tables.
- ``exact``: the optimum (sequence-level tilt and token-level soft Bellman backup), exact KLs and
  objectives, the forward-KL-regularised optimum, best-of-n.
- ``gradients``: exact expected gradients of the KL terms of ``tether.ops.kl`` per placement.
- ``lm``: a tabular problem as a Hugging Face causal LM + tokenizer + text reward, so the shipped
  trainers run on it unchanged. Imported lazily (it needs transformers, ~5 s): the first access to
  one of its names here, or ``import tether.oracle.lm``, registers ``tether_tabular`` with
  ``AutoModelForCausalLM``; ``import tether.oracle`` alone stays torch-only.
"""

from .exact import (
    best_of_n_kl,
    best_of_n_kl_bound,
    best_of_n_probs,
    expected_reward,
    forward_kl_optimum,
    forward_kl_optimum_sequence,
    forward_objective,
    log_partition,
    objective,
    optimal_policy,
    sequence_kl,
    soft_values,
    statewise_kl,
    tilted_sequence_probs,
)
from .gradients import expected_kl_gradient, kl_surrogate
from .tabular import (
    Completions,
    TabularPolicy,
    TabularProblem,
    TabularSpace,
    count_rewards,
    length_rewards,
    make_problem,
    random_rewards,
    reward_of,
)

_LM_NAMES = (  # from tether.oracle.lm, imported on first use (__getattr__ below)
    "TabularLM",
    "TabularLMConfig",
    "TabularReward",
    "completion_text",
    "parse_completion",
    "parse_prompt",
    "preference_rows",
    "prompt_texts",
    "reward_function",
    "save_tabular_lm",
    "tabular_lm",
    "tabular_policy",
    "tabular_tokenizer",
    "token_names",
)

__all__ = [
    "Completions",
    "TabularPolicy",
    "TabularProblem",
    "TabularSpace",
    "best_of_n_kl",
    "best_of_n_kl_bound",
    "best_of_n_probs",
    "count_rewards",
    "expected_kl_gradient",
    "expected_reward",
    "forward_kl_optimum",
    "forward_kl_optimum_sequence",
    "forward_objective",
    "kl_surrogate",
    "length_rewards",
    "log_partition",
    "make_problem",
    "objective",
    "optimal_policy",
    "random_rewards",
    "reward_of",
    "sequence_kl",
    "soft_values",
    "statewise_kl",
    "tilted_sequence_probs",
    *_LM_NAMES,
]


def __getattr__(name: str):
    """PEP 562: the ``lm`` names import transformers only when first used."""
    if name in _LM_NAMES:
        from . import lm

        return getattr(lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
