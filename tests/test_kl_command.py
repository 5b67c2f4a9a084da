"""`tether kl` on the real stories260K (docs/estimators.md)."""

import json

import pytest
import torch

from tether.commands.kl import main as kl_main

PROMPTS = "Once upon a time\nThe little dog\nLily wanted to\nOne day, a boy\n"


def _run(tmp_path, policy, reference, samples=32, extra=()):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "kl.json"
    rc = kl_main(["--policy", policy, "--reference", reference, "--prompts", str(prompts), "--samples", str(samples),
                  "--max_new_tokens", "32", "--seed", "0", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_model_against_itself_is_exactly_zero(tmp_path, stories_path):
    res = _run(tmp_path, stories_path, stories_path, samples=4)
    assert set(res["estimators"]) == {"k1", "k2", "k3", "exact"}
    for name, v in res["estimators"].items():
        assert v["mean"] == 0.0 and v["stderr"] == 0.0, name
    assert res["token_mean"] == 0.0 and res["samples"] == 16 and res["response_len"] > 0


@pytest.mark.slow
def test_perturbed_copy_estimators_agree_and_exact_is_least_noisy(tmp_path, stories_path):
    from tether.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm(stories_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)  # KL ≈ 6 nats over 32 tokens
    model.save_pretrained(tmp_path / "perturbed")
    load_tokenizer(stories_path).save_pretrained(tmp_path / "perturbed")
    res = _run(tmp_path, str(tmp_path / "perturbed"), stories_path, samples=48)
    est = res["estimators"]
    ex = est["exact"]
    assert 1.0 < ex["mean"] < 30.0
    for name in ("k1", "k3"):  # unbiased estimators of the same quantity on the same samples
        diff = abs(est[name]["mean"] - ex["mean"])
        assert diff < 3 * (est[name]["stderr"] ** 2 + ex["stderr"] ** 2) ** 0.5, (name, est[name], ex)
    # Rao-Blackwellisation: the exact estimator's standard error is the smallest (measured ratio k1/exact
    # ≈ 1.6 at this KL); k2 is biased upward (E[lr²/2] > KL here) and noisier.
    assert ex["stderr"] < 0.8 * est["k1"]["stderr"]
    assert ex["stderr"] < est["k3"]["stderr"]
    assert est["k2"]["mean"] > ex["mean"]


def test_bad_prompt_file_errors(tmp_path, stories_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="'prompt' field"):
        kl_main(["--policy", stories_path, "--reference", stories_path, "--prompts", str(bad)])


def _perturbed(tmp_path, stories_path, scale=0.01):
    from tether.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm(stories_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(tmp_path / "perturbed")
    load_tokenizer(stories_path).save_pretrained(tmp_path / "perturbed")
    return str(tmp_path / "perturbed")


def test_by_position_adds_up_to_the_sequence_kl(tmp_path, stories_path, capsys):
    """--by_position: Σ_t mean_t·n_t is the sum of every sample's exact per-token KL,
    so divided by the sample count it is the exact mean sequence KL (float64 sums of float32 values);
    every sample reaches position 0; the length buckets partition the samples, and their count-weighted
    means give back each estimator's overall mean. Against itself: all zeros."""
    res = _run(tmp_path, _perturbed(tmp_path, stories_path), stories_path, samples=8, extra=["--by_position"])
    pos, n = res["by_position"], res["by_position_n"]
    assert n[0] == res["samples"] == 32 and all(a >= b for a, b in zip(n, n[1:])) and len(pos) <= 32
    total = sum(p * k for p, k in zip(pos, n)) / res["samples"]
    assert total == pytest.approx(res["estimators"]["exact"]["mean"], rel=1e-6)
    assert sum(r["n"] for r in res["by_length"]) == 32
    for name, v in res["estimators"].items():
        weighted = sum(r["n"] * r["estimators"][name]["mean"] for r in res["by_length"]) / 32
        assert weighted == pytest.approx(v["mean"], rel=1e-6, abs=1e-9), name
    # the exact KL of the first L tokens is the position means summed over t < L; L = 4, 16 (< 32 tokens)
    assert [r["tokens"] for r in res["by_prefix"]] == [4, 16]
    for r in res["by_prefix"]:
        head = sum(p * k for p, k in zip(pos[: r["tokens"]], n[: r["tokens"]])) / res["samples"]
        assert r["estimators"]["exact"]["mean"] == pytest.approx(head, rel=1e-6)
    assert "sequence KL standard error by completion length" in capsys.readouterr().out
    same = _run(tmp_path, stories_path, stories_path, samples=2, extra=["--by_position"])
    assert set(same["by_position"]) == {0.0}
    assert all(e["mean"] == 0.0 for r in same["by_length"] for e in r["estimators"].values())
