"""Best-of-n: the induced distribution and its KL (exact, against brute-force enumeration), the
sample estimate (hand cases: no ties = the bound, one value = 0, Beirami et al.'s top-atom formula),
selection on synthetic scores, and real sampling from stories260K."""

import itertools
import json
import math

import pytest
import torch

from tether.groups import SamplingSettings
from tether.ops.best_of_n import best_of_n_kl_estimate, best_of_n_kl_exact, best_of_n_probs
from tether.ops.policy import best_of_n_kl_bound
from tether.rewards import CallableSource, RewardSet, VaderSource
from tether.trainers.best_of_n import best_of_n, best_of_n_curve, sample_and_score, summarize

REWARDS = torch.tensor([0.0, 1.0, 1.0, 2.0, -1.0])  # a tie at 1.0
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.15], dtype=torch.float64)


def brute_force_bon(rewards, probs, n):
    """Enumerate all n-tuples of outcomes; keep the first of the highest-reward draws."""
    out = torch.zeros(len(rewards), dtype=torch.float64)
    for tup in itertools.product(range(len(rewards)), repeat=n):
        p = math.prod(float(probs[i]) for i in tup)
        best = max(rewards[i].item() for i in tup)
        out[next(i for i in tup if rewards[i].item() == best)] += p
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bon_distribution_and_kl_match_enumeration(n):
    want = brute_force_bon(REWARDS, PROBS, n)
    got = best_of_n_probs(REWARDS, PROBS, n=n)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    kl = (want * (want / PROBS).log()).sum()
    assert best_of_n_kl_exact(REWARDS, PROBS, n=n).item() == pytest.approx(kl.item(), abs=1e-12)
    assert kl.item() < best_of_n_kl_bound(n) + 1e-12  # ties and atoms: strictly below the bound for n > 1


def test_exact_kl_approaches_the_bound_without_atoms():
    """K equally likely outcomes with distinct rewards: KL -> log n - (n-1)/n as K grows."""
    K, n = 4000, 8
    kl = best_of_n_kl_exact(torch.arange(K, dtype=torch.float64), torch.full((K,), 1.0 / K, dtype=torch.float64), n=n)
    assert kl.item() == pytest.approx(best_of_n_kl_bound(n), abs=2e-3)  # O(log K / K) discretisation gap
    assert kl.item() < best_of_n_kl_bound(n)


def test_estimate_hand_cases():
    for n in (1, 2, 5, 16):
        assert best_of_n_kl_estimate(torch.randn(40), n=n).item() == pytest.approx(best_of_n_kl_bound(n), abs=1e-12)
        assert best_of_n_kl_estimate(torch.zeros(40), n=n).item() == 0.0


def test_estimate_is_beirami_formula_for_a_top_atom():
    """Beirami et al. 2024 §4: mass ε on the best outcome, the rest continuous:
    KL = (1-ε)^n (log n + (n-1) log(1-ε) - (n-1)/n) + (1 - (1-ε)^n) log((1 - (1-ε)^n) / ε)."""
    m, c, n = 20, 5, 4  # 15 distinct values below an atom of 5 copies: ε = 0.25
    scores = torch.cat([torch.arange(m - c, dtype=torch.float32), torch.full((c,), 100.0)])
    e = c / m
    want = (1 - e) ** n * (math.log(n) + (n - 1) * math.log(1 - e) - (n - 1) / n) + (1 - (1 - e) ** n) * math.log(
        (1 - (1 - e) ** n) / e
    )
    assert best_of_n_kl_estimate(scores, n=n).item() == pytest.approx(want, abs=1e-12)


def test_estimate_never_exceeds_bound_and_converges():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 4, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).float()
        assert best_of_n_kl_estimate(s, n=4).item() <= best_of_n_kl_bound(4) + 1e-12
    # Many samples of a discrete reward: the estimate approaches the exact KL.
    idx = torch.multinomial(PROBS, 20000, replacement=True, generator=g)
    est = best_of_n_kl_estimate(REWARDS[idx], n=4).item()
    assert est == pytest.approx(
        best_of_n_kl_exact(REWARDS, PROBS, n=4).item(), abs=0.02
    )  # sampling error ~ 1/sqrt(20000)


def test_summarize_selects_first_maximum():
    scored = {
        "prompts": ["a", "b"],
        "texts": [["x0", "x1", "x2"], ["y0", "y1", "y2"]],
        "name": "proxy",
        "scores": torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]),
        "gold": {"gold": torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])},
    }
    r = summarize(scored, 2)
    assert r["completions"] == ["x1", "y0"]  # row 2 ties at 0: the first draw is kept
    assert r["score"] == pytest.approx(1.5) and r["reward/proxy"] == r["score"]
    assert r["gold"] == pytest.approx(30.0) and r["reward/gold"] == r["gold"]
    assert r["gold_ref"] == pytest.approx(35.0) and r["score_ref"] == pytest.approx(11 / 6)
    assert r["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    r3 = summarize(scored, 3)
    assert r3["completions"] == ["x1", "y2"]
    with pytest.raises(ValueError, match="n=4 needs"):
        summarize(scored, 4)


def test_best_of_n_on_stories(stories):
    """Selecting by completion length keeps the longest of the n samples; gold is logged on it."""
    tok, model = stories
    length = CallableSource(lambda completions: [float(len(c)) for c in completions], name="length")
    prompts = ["once upon a time", "the movie was", "lily saw a"]
    kw = dict(sampling=SamplingSettings(max_new_tokens=8), seed=1, batch_size=16)
    scored = sample_and_score(model, tok, prompts, samples=4, reward=length, **kw)
    r = best_of_n(model, tok, prompts, n=4, reward=RewardSet(length, [VaderSource()]), **kw)
    assert r["completions"] == [max(texts, key=len) for texts in scored["texts"]]
    assert r["score"] >= r["score_ref"]
    assert r["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    assert 0.0 <= r["kl_estimate"] <= r["kl_bound"] + 1e-12
    assert r["gold"] is not None and -1.0 <= r["gold"] <= 1.0 and "reward/vader_ref" in r
    curve = best_of_n_curve(model, tok, prompts, ns=[1, 4], reward=length, **kw)
    assert curve[1]["completions"] == r["completions"]  # same samples (same seed) serve every n
    assert curve[0]["kl_bound"] == 0.0


def test_bon_command(tmp_path, stories_path, assets_dir):
    from tether.cli import main

    (tmp_path / "prompts.txt").write_text("the movie was\nonce upon a time\n")
    rc = main(
        [
            "bon",
            "--model",
            stories_path,
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--n",
            "1,2",
            "--reward",
            "vader",
            "--gold",
            "len=reward_fns:length_reward",
            "--max_new_tokens",
            "6",
            "--output_dir",
            str(tmp_path / "bon"),
            "--progress",
            "false",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "bon" / "results.json").read_text())
    assert [r["n"] for r in res] == [1, 2] and "reward/len" in res[1]
    assert len((tmp_path / "bon" / "samples.jsonl").read_text().splitlines()) == 4


def test_prompt_ids_and_frontier_keys(stories):
    """Prompts given as token ids (cut from a snippet mid-word) sample after exactly those ids; the
    result carries the demo frontier's keys, with kl = the estimate (not the bound)."""
    tok, model = stories
    ids = tok("the movie was great")["input_ids"][:3]
    text = tok.decode(ids, skip_special_tokens=True)
    gold = VaderSource(name="gold")
    r = best_of_n(
        model,
        tok,
        [text],
        prompt_ids=[ids],
        n=3,
        reward="vader",
        gold=gold,
        sampling=SamplingSettings(max_new_tokens=6),
        seed=0,
    )
    assert r["kl"] == r["kl_estimate"] and r["kl_stderr"] == r["kl_estimate_stderr"]
    assert r["gold_reward"] == r["gold"] == r["reward/gold"] and r["proxy_reward"] == r["score"]
    assert r["samples"][0]["prompt"] == text and set(r["samples"][0]) == {"prompt", "completion", "score", "gold"}
    json.dumps({k: v for k, v in r.items()})  # a demo row: JSON-serialisable
    with pytest.raises(ValueError, match="2 prompt_ids for 1 prompts"):
        best_of_n(model, tok, [text], prompt_ids=[ids, ids], n=2, reward="vader")
