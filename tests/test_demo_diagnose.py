"""The demo's β-ladder diagnostics (tether.demo.diagnose) on the real stories260K: forgetting points
equal `tether forgetting`'s numbers, a model against itself is exactly 0, the KL-noise result is
self-consistent, the plots are written."""

import copy
import json

import pytest
import torch

from tether.demo.diagnose import (
    FORGETTING_KEYS,
    forgetting_points,
    forgetting_spearman,
    kl_noise,
    off_distribution_texts,
    plot_forgetting,
    plot_kl_noise,
    prefix_stderr,
)
from tether.errors import UserError

from conftest import f32_tol

PROMPTS = ["the film is", "a quiet , lovely", "it's a mess", "this movie", "an ambitious but", "the acting"]
SETTINGS = dict(max_length=48, batch_size=4, max_prompts=5, samples=2, max_new_tokens=8, seed=0)
N_TEXTS = 12
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def drifted(stories, tmp_path_factory):
    """stories260K with seeded N(0, 0.01²) noise on every weight, saved with its tokenizer (a "run")."""
    tok, model = stories
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("drifted") / "final"
    out.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hh_texts(assets_dir):
    source, texts = off_distribution_texts(assets_dir, max_texts=N_TEXTS, seed=0)
    assert source == "hh-rlhf" and len(texts) == N_TEXTS and all("Human:" in t for t in texts)
    return texts


@pytest.fixture(scope="module")
def noise(drifted, stories_path):
    return kl_noise(drifted, stories_path, PROMPTS, samples=4, max_new_tokens=20, seed=0)


def test_forgetting_points_zero_for_the_reference_and_equal_to_the_command(
    stories_path, assets_dir, drifted, hh_texts, tmp_path
):
    from tether.commands.forgetting import main

    runs = [{"run": "itself", "beta": 2, "policy": stories_path}, {"run": "drifted", "beta": 0.0, "policy": drifted}]
    rows = forgetting_points(runs, stories_path, texts=hh_texts, prompts=PROMPTS, **SETTINGS)
    assert [(r["run"], r["beta"]) for r in rows] == [("itself", 2.0), ("drifted", 0.0)]
    same, moved = rows
    # the reference scored as its own policy: the same weights through the same kernels on the same
    # batches give bit-identical logits, so every difference and KL is exactly 0 (not "small")
    for k in ("nll_delta", "kl_ref_to_policy", "kl_policy_to_ref", "forward_kl_on_prompts", "forward_kl_next_token"):
        assert same[k] == 0.0, k
    assert same["nll_policy"] == same["nll_reference"] == moved["nll_reference"] > 0
    assert moved["kl_ref_to_policy"] > 0.01 and moved["kl_policy_to_ref"] > 0.01
    assert moved["forward_kl_on_prompts"] > 0 and moved["nll_delta_stderr"] > 0
    assert same["texts"] == moved["texts"] == N_TEXTS

    # `tether forgetting` on the drifted policy with the same texts (hh-rlhf, same max_texts and seed),
    # prompts, lengths, batch size and sampling seed: it makes the same calls (text_batches,
    # forgetting_on_texts, forward_kl_on_prompts) on identical inputs in this process, so the numbers
    # are bit-identical; a tolerance would only hide a divergence of the two paths.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "forgetting.json"
    s = SETTINGS
    argv = ["--policy", drifted, "--reference", stories_path, "--texts", "hh-rlhf", "--assets", str(assets_dir)]
    argv += ["--max_texts", str(N_TEXTS), "--prompts", str(prompts), "--json", str(out), "--no_progress"]
    for k in ("max_length", "batch_size", "max_prompts", "samples", "max_new_tokens", "seed"):
        argv += [f"--{k}", str(s[k])]
    assert main(argv) == 0
    cli = json.loads(out.read_text())
    for k in FORGETTING_KEYS:  # every number the demo takes from the texts, as the CLI writes it
        assert moved[k] == cli["on_texts"][k], k
    for k in ("forward_kl_on_prompts", "forward_kl_on_prompts_stderr", "forward_kl_next_token"):
        assert moved[k] == cli[k], k
    assert cli["prompts"] == s["max_prompts"] and cli["texts_source"] == "hh-rlhf"


def test_forgetting_points_user_errors(stories_path, hh_texts):
    with pytest.raises(UserError, match="lacks"):
        forgetting_points([{"run": "a", "policy": stories_path}], stories_path, texts=hh_texts, prompts=PROMPTS)
    with pytest.raises(UserError, match="samples"):
        forgetting_points([], stories_path, texts=hh_texts, prompts=PROMPTS, samples=0)
    with pytest.raises(UserError, match="prompts"):
        forgetting_points([], stories_path, texts=hh_texts, prompts=[])


def test_kl_noise_is_self_consistent(noise):
    samples, T = 4 * len(PROMPTS), 20
    assert set(noise) >= {"estimators", "by_position", "by_position_n", "by_prefix", "by_length", "token_mean"}
    assert noise["samples"] == samples and noise["max_new_tokens"] == T
    assert set(noise["estimators"]) == {"k1", "k2", "k3", "exact"}
    json.dumps(noise)  # JSON-able as it stands
    pos, n = noise["by_position"], noise["by_position_n"]
    assert 1 <= len(pos) == len(n) <= T
    assert n[0] <= samples and all(a >= b for a, b in zip(n, n[1:]))  # a sample reaching t reached t - 1
    assert [r["tokens"] for r in noise["by_prefix"]] == [4, 16]  # engine.PREFIX_LENGTHS below T = 20
    # by_position holds the float64 sums of the same float32 per-token exact KLs that measure sums in
    # float32 per sequence (≤ T terms of one sign: relative rounding ≤ (T - 1)·ε/2), so the mean over
    # samples of Σ_t by_position[t]·n[t] is the exact estimator's mean within T float32 spacings of it;
    # likewise the first L positions against by_prefix's exact mean at L.
    full = sum(p * k for p, k in zip(pos, n)) / samples
    ex = noise["estimators"]["exact"]["mean"]
    assert ex > 0.01
    assert abs(full - ex) <= f32_tol(ex, ulps=T)
    for row in noise["by_prefix"]:
        L = row["tokens"]
        head = sum(p * k for p, k in zip(pos[:L], n[:L])) / samples
        want = row["estimators"]["exact"]["mean"]
        assert abs(head - want) <= f32_tol(want, ulps=L), L
    # the plot's points: by_prefix below T, then the whole sequence at L = T
    L, se = prefix_stderr(noise, "k1")
    assert L == [4, 16, 20] and se[-1] == noise["estimators"]["k1"]["stderr"]
    # Not asserted: exact stderr <= k1 stderr. The exact estimator conditions each token's k1 on its
    # state, but later states depend on earlier tokens, so the sequence sums' covariance can make the
    # exact sum's variance exceed k1's in principle, and both stderrs are themselves sample estimates.
    # (It holds on these data: at L = 20, seeds 0-4, exact 0.28-0.45 nats against k1's 0.63-0.93.)


def test_kl_noise_of_a_model_against_itself_is_zero(stories_path):
    """Policy and reference the same weights: every estimator's per-token value is computed from
    bit-identical log-probs and logits, so every mean, stderr and position value is exactly 0."""
    res = kl_noise(stories_path, stories_path, PROMPTS[:2], samples=2, max_new_tokens=6, seed=0)
    for name, v in res["estimators"].items():
        assert v == {"mean": 0.0, "stderr": 0.0}, name
    assert all(p == 0.0 for p in res["by_position"])


def test_plots_write_pngs(noise, tmp_path):
    rows = [
        {
            "run": f"b{b}",
            "beta": b,
            "nll_delta": d,
            "nll_delta_stderr": 0.01,
            "kl_ref_to_policy": 2 * d,
            "kl_ref_to_policy_stderr": 0.02,
            "forward_kl_on_prompts": 20 * d,
            "forward_kl_on_prompts_stderr": 0.3,
        }
        for b, d in ((0.0, 0.9), (0.01, 0.5), (0.05, 0.3), (0.3, 0.1), (2.0, 0.0))
    ]
    f, k = tmp_path / "forgetting.png", tmp_path / "kl_noise.png"
    plot_forgetting(rows, f)
    plot_kl_noise({"β = 0.05": noise, "β = 0 (copy)": noise}, k)
    for p in (f, k):
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, p


def test_forgetting_spearman_hand_values():
    rows = lambda pairs: [{"beta": b, "nll_delta": d} for b, d in pairs]  # noqa: E731
    assert forgetting_spearman(rows([(0, 0.9), (0.01, 0.5), (0.3, 0.2), (2, 0.0)])) == pytest.approx(-1.0, abs=1e-15)
    # ranks β (1, 2, 3), nll (1, 3, 2): ρ = 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/24 = 0.5
    assert forgetting_spearman(rows([(0, 0.1), (1, 0.3), (2, 0.2)])) == pytest.approx(0.5, abs=1e-15)
    assert forgetting_spearman(rows([(0, 0.1)])) != forgetting_spearman(rows([(0, 0.1)]))  # nan: one point
