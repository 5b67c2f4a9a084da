"""``tether reference-check`` (docs/diagnostics.md): per-candidate NLL of the chosen and rejected responses,
how often the reference prefers the chosen one, and how often it finds the chosen one likely. Exact
checks on the tabular LM (every sequence's log-probability is enumerable), a smoke run on stories260K
with hh-rlhf pairs, and the one-line errors."""

import json
import math

import pytest
import torch

from tether.cli import main as cli_main
from tether.oracle.certify import PROBLEM
from tether.oracle.lm import preference_rows, save_tabular_lm
from tether.oracle.tabular import TabularPolicy, make_problem

from conftest import f32_tol

torch.set_num_threads(1)

PAIRS = [(0, 1, 2), (0, 3, 4), (1, 5, 6), (1, 7, 0), (0, 9, 10), (1, 12, 11)]  # (prompt, chosen seq, rejected seq)


def _expected(policy: TabularPolicy, space, threshold: float) -> dict:
    """The numbers by enumeration: sequence log-probs from the table, lengths from the sequences."""
    slp = policy.sequence_log_probs().double()  # (P, K)
    lw = torch.tensor([float(slp[p, c]) for p, c, _ in PAIRS], dtype=torch.float64)
    ll = torch.tensor([float(slp[p, j]) for p, _, j in PAIRS], dtype=torch.float64)
    nw = torch.tensor([len(space.sequences[c]) for _, c, _ in PAIRS], dtype=torch.float64)
    nl = torch.tensor([len(space.sequences[j]) for _, _, j in PAIRS], dtype=torch.float64)
    return {
        "nll_chosen": float(-lw.sum() / nw.sum()),
        "nll_rejected": float(-ll.sum() / nl.sum()),
        "prefers_chosen": float((lw > ll).double().mean()),
        "prefers_chosen_per_token": float((lw / nw > ll / nl).double().mean()),
        "chosen_likely": float((-lw / nw <= threshold).double().mean()),
        "rejected_likely": float((-ll / nl <= threshold).double().mean()),
    }


def test_tabular_numbers_equal_the_enumeration_and_a_tuned_reference_scores_higher(tmp_path):
    problem = make_problem(**PROBLEM)
    sp = problem.space
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(problem, PAIRS)))
    base = save_tabular_lm(problem, tmp_path / "base")
    # "trained on the chosen responses": half the mass of each prompt spread over its chosen sequences
    probs = problem.ref.sequence_probs().detach().clone().double()
    for p in range(sp.n_prompts):
        chosen = [c for q, c, _ in PAIRS if q == p]
        probs[p] *= 0.5
        probs[p, chosen] += 0.5 / len(chosen)
    tuned_policy = TabularPolicy.from_sequence_probs(sp, probs, trainable=False)
    tuned = save_tabular_lm(problem, tmp_path / "tuned", table=tuned_policy)
    threshold = 1.0
    out = tmp_path / "rc.json"
    assert (
        cli_main(
            [
                "reference-check",
                "--references",
                f"{base},{tuned}",
                "--dataset",
                str(data),
                "--no_add_eos",
                "--likely_threshold",
                str(threshold),
                "--json",
                str(out),
                "--no_progress",
                "--batch_size",
                "4",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["references"]
    for r, pol in zip(res, (problem.ref, tuned_policy)):
        want = _expected(pol, sp, threshold)
        assert r["pairs"] == len(PAIRS) and r["threshold_source"] == "given"
        for k in ("nll_chosen", "nll_rejected"):
            assert r[k] == pytest.approx(want[k], abs=f32_tol(want[k], 1.0)), k
        for k in ("prefers_chosen", "prefers_chosen_per_token", "chosen_likely", "rejected_likely"):
            assert r[k] == want[k], k
    assert res[1]["chosen_likely"] > res[0]["chosen_likely"]
    assert res[1]["nll_chosen"] < res[0]["nll_chosen"]


def test_stories260k_on_hh_rlhf_gives_finite_numbers(assets_dir, tmp_path):
    out = tmp_path / "rc.json"
    assert (
        cli_main(
            [
                "reference-check",
                "--references",
                "stories260K",
                "--dataset",
                "hh-rlhf",
                "--assets",
                str(assets_dir),
                "--limit",
                "6",
                "--max_length",
                "48",
                "--max_new_tokens",
                "8",
                "--samples",
                "2",
                "--json",
                str(out),
                "--no_progress",
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())["references"][0]
    assert r["pairs"] == 6 and r["own_samples"] == 12 and r["threshold_source"] == "median of own samples"
    for k in ("nll_chosen", "nll_rejected", "likely_threshold"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    for k in ("prefers_chosen", "prefers_chosen_per_token", "chosen_likely", "rejected_likely"):
        assert 0.0 <= r[k] <= 1.0, k
    # hh-rlhf dialogues are far from TinyStories: a reference far from the data (the weak reference)
    assert r["nll_chosen"] > r["own_sample_nll_mean"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--references", ",", "--dataset", "x.jsonl"], "--references is empty"),
        (["--references", "stories260K", "--dataset", "x.jsonl", "--likely_threshold", "-1"], "--likely_threshold"),
        (["--references", "stories260K", "--dataset", "x.jsonl", "--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_bad_input_is_one_line(capsys, args, needle):
    assert cli_main(["reference-check", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["reference-check", "--help"])
    assert e.value.code == 0 and "tether reference-check --references" in capsys.readouterr().out
