"""`tether kl` on the real stories260K (issue 2, definition of done)."""

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
