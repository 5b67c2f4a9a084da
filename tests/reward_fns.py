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


CALLS: list = []
"""Every call of ``ground_truth_match``: its keyword arguments (tests/test_chat_data.py reads them)."""


def ground_truth_match(prompts, completions, ground_truth, **kwargs):
    """TRL's verifiable-reward signature: 1.0 where the completion's text contains the row's
    ``ground_truth``. Asserts each ``ground_truth`` arrived next to its own prompt (the test data
    pairs the prompt "Say W." with ground_truth "W") and records the call in ``CALLS``."""
    CALLS.append({"prompts": prompts, "completions": completions, "ground_truth": ground_truth, **kwargs})
    assert len(prompts) == len(completions) == len(ground_truth)
    for p, g in zip(prompts, ground_truth):
        text = p[-1]["content"] if isinstance(p, list) else p
        assert text == f"Say {g}.", (p, g)
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(g in t) for g, t in zip(ground_truth, texts)]
