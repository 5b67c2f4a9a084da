"""Reward functions for tests/test_rewards.py (imported as ``reward_fns:NAME``, the way a user
passes ``--reward my_module:my_function``)."""


def length_reward(completions):
    """Characters in each completion."""
    return [float(len(c)) for c in completions]


def prompt_echo(completions, prompts):
    """How many words of the prompt the completion repeats (uses the prompts keyword)."""
    return [float(sum(w in c.split() for w in p.split())) for p, c in zip(prompts, completions)]


def wrong_count(completions):
    return [0.0]


def not_finite(completions):
    return [float("nan")] * len(completions)
