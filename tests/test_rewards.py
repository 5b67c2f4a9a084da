"""Reward sources (tether/rewards.py): VADER, Python callables, building from specs, and the
gold-versus-proxy RewardSet with clipping and running normalisation."""

import math
from pathlib import Path

import pytest
import torch

from tether.engine import decode_completion
from tether.errors import UserError
from tether.ops.reward_model import update_moments
from tether.rewards import CallableSource, RewardSet, VaderSource, build_reward, join_text, last_token_index

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ VADER


def test_vader_hand_values():
    """VADER's compound score of a single lexicon word w with valence v is v / sqrt(v² + 15)
    (Hutto & Gilbert 2014, normalisation with alpha = 15): "good" has v = 1.9 and "bad" v = -2.5."""
    v = VaderSource()
    got = v(["", ""], ["good", "bad"])
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert got[0].item() == pytest.approx(1.9 / math.sqrt(1.9**2 + 15), abs=1e-4)  # VADER rounds to 4 decimals
    assert got[1].item() == pytest.approx(-2.5 / math.sqrt(2.5**2 + 15), abs=1e-4)


def test_vader_orders_sentences_and_ignores_prompt():
    v = VaderSource()
    pos, neu, neg = v(
        ["I hated it."] * 3,
        [
            "this movie is wonderful , i loved every minute of it !",
            "the film is ninety minutes long .",
            "a dull , boring and painful mess .",
        ],
    ).tolist()
    assert pos > 0.5 and neu == 0.0 and neg < -0.5  # the negative prompt does not count
    with_prompt = VaderSource(include_prompt=True)(["I hated it."], ["the film is ninety minutes long ."])
    assert with_prompt.item() < 0
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        v(["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------ callables


def test_callable_from_module_and_file():
    src = build_reward("reward_fns:length_reward")
    assert isinstance(src, CallableSource) and src.name == "length_reward"
    assert src(["p", "q"], ["abc", ""]).tolist() == [3.0, 0.0]
    by_file = build_reward(f"{HERE / 'reward_fns.py'}:length_reward")
    assert by_file(["p"], ["abcd"]).tolist() == [4.0]


def test_callable_gets_prompts_only_if_it_asks():
    echo = CallableSource("reward_fns:prompt_echo")
    assert echo(["the movie was", "a b"], ["the movie was great", "c"]).tolist() == [3.0, 0.0]
    seen = {}

    def f(completions, **kw):
        seen.update(kw)
        return [1.0] * len(completions)

    CallableSource(f)(["p"], ["c"])
    assert seen == {"prompts": ["p"]}


def test_callable_errors_are_clear():
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        CallableSource("reward_fns:wrong_count")(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite"):
        CallableSource("reward_fns:not_finite")(["a"], ["c"])
    with pytest.raises(AttributeError, match="no function 'missing'"):
        CallableSource("reward_fns:missing")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_x'"):
        CallableSource("no_such_module_x:f")
    with pytest.raises(UserError, match="list of floats"):  # a UserError: one line and exit 2 through the CLI
        CallableSource(lambda cs: ["high"] * len(cs))(["a"], ["b"])


# ------------------------------------------------------------------------------------------ specs


def test_build_reward_specs(stories_path, tmp_path):
    assert isinstance(build_reward("vader"), VaderSource)
    gold = build_reward("gold=vader")
    assert isinstance(gold, VaderSource) and gold.name == "gold"
    assert build_reward("len=reward_fns:length_reward").name == "len"
    with pytest.raises(ValueError, match="not a reward model"):
        build_reward(stories_path)  # a causal LM must not silently get a random score head
    with pytest.raises(ValueError, match="not 'vader', an existing reward-model folder"):
        build_reward(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="empty"):
        build_reward(" ")


# ------------------------------------------------------------------------------------------ RewardSet


def _const(values, name):
    return CallableSource(lambda completions: list(values)[: len(completions)], name=name)


def test_reward_set_clip_and_gold_metrics():
    proxy, gold = _const([-3.0, 0.5, 2.0], "proxy"), _const([1.0, 2.0, 3.0], "gold")
    rs = RewardSet(proxy, [gold], clip=1.0)
    scores, metrics = rs(["p"] * 3, ["a", "b", "c"])
    assert scores.tolist() == [-1.0, 0.5, 1.0]
    assert metrics["reward/proxy"].tolist() == [-3.0, 0.5, 2.0]  # logged raw, before clipping
    assert metrics["reward/gold"].tolist() == [1.0, 2.0, 3.0]
    assert set(metrics) == {"reward/proxy", "reward/gold"}
    with pytest.raises(ValueError, match="duplicated: \\['proxy'\\]"):
        RewardSet(proxy, [_const([0.0], "proxy")])
    with pytest.raises(ValueError, match="positive number"):
        RewardSet(proxy, clip=0.0)


def test_reward_set_normalisation_hand_values_and_resume():
    """Batch 1 = [1, 2, 3]: running mean 2, population var 2/3 -> (x - 2)/sqrt(2/3).
    Batch 2 = [4, 5]: all five values seen, mean 3, var 2 -> (4 - 3)/sqrt(2), (5 - 3)/sqrt(2)."""
    batches = [[1.0, 2.0, 3.0], [4.0, 5.0]]
    it = iter(batches)
    src = CallableSource(lambda completions: next(it), name="r")
    rs = RewardSet(src, normalize=True, eps=0.0)
    s1, _ = rs(["p"] * 3, ["a", "b", "c"])
    assert s1.tolist() == pytest.approx([-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3)], abs=1e-6)
    state = rs.state_dict()
    s2, m2 = rs(["p"] * 2, ["a", "b"])
    assert s2.tolist() == pytest.approx([1 / math.sqrt(2), 2 / math.sqrt(2)], abs=1e-6)
    assert m2["reward/r"].tolist() == [4.0, 5.0]
    # A resumed run continues with the same statistics.
    it2 = iter([batches[1]])
    rs2 = RewardSet(CallableSource(lambda completions: next(it2), name="r"), normalize=True, eps=0.0)
    rs2.load_state_dict(state)
    assert rs2(["p"] * 2, ["a", "b"])[0].tolist() == s2.tolist()


def test_normalise_then_clip():
    it = iter([[0.0, 10.0]])
    rs = RewardSet(CallableSource(lambda completions: next(it), name="r"), normalize=True, clip=0.5, eps=0.0)
    assert rs(["p", "p"], ["a", "b"])[0].tolist() == [-0.5, 0.5]  # ±1 standard deviation, clipped to ±0.5


def test_update_moments_matches_full_batch_in_any_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64) * 3 + 1
    mean = var = count = torch.zeros((), dtype=torch.float64)
    for chunk in torch.split(x, [1, 7, 0, 20, 22]):
        mean, var, count = update_moments(mean, var, count, chunk)
    assert count.item() == 50
    assert mean.item() == pytest.approx(x.mean().item(), abs=1e-12)
    assert var.item() == pytest.approx(x.var(unbiased=False).item(), abs=1e-12)


# ------------------------------------------------------------------------------------------ text


def test_decode_completions_keeps_the_leading_space(stories):
    """SentencePiece drops the leading space of a completion decoded alone (``▁was`` -> "was");
    decode_completion must give " was great ." so that prompt + completion is the sampled text."""
    tok, _ = stories
    p = tok("the movie")["input_ids"]
    c = tok(" was great .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(c, skip_special_tokens=True) == "was great ."  # the hazard
    comp = decode_completion(tok, p, c)
    assert comp == " was great ."
    assert join_text("the movie", comp) == "the movie was great ."


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 2]
