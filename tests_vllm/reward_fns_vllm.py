"""Reward for the vLLM trajectory test (imported as ``reward_fns_vllm:NAME``, like a user's --reward)."""


def chars(completions):
    """Characters in each completion, in units of 16 (a random-init model's text varies in length by token)."""
    return [len(c) / 16.0 for c in completions]
