"""The forgetting probe (tether/diagnostics/forgetting.py, ``tether forgetting``, eval/forgetting/*):
hand-derived values on a 2-token vocabulary, exact zeros for a model against itself, the exact KLs
against a brute-force float64 computation on the real stories260K, the default text choice, the
command end to end and the trainers' metric."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tether.diagnostics.forgetting import (
    ForgettingProbe,
    default_texts,
    forgetting_on_texts,
    forward_kl_on_prompts,
    read_texts,
    teacher_forced_sums,
    text_batches,
    trained_on,
)

RT_PROMPTS = ["the film is", "a movie that", "it's a", "this is one of"]


def test_two_token_vocabulary_hand_values():
    """V = 2. Policy p = softmax(0, 0) = (1/2, 1/2); reference q = softmax(ln 3, 0) = (3/4, 1/4).
    Observed token 0 at both positions of row 0; the second position of row 1 is masked (its garbage
    logits must not count), its first observes token 1.
      -log p(0) = ln 2, -log q(0) = ln(4/3), -log p(1) = ln 2, -log q(1) = ln 4;
      KL[q‖p] = 3/4 ln(3/2) + 1/4 ln(1/2);   KL[p‖q] = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)."""
    logits = torch.zeros(2, 2, 2, dtype=torch.float64)
    ref_logits = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(2, 2, 2).clone()
    logits[1, 1] = torch.tensor([50.0, -50.0])  # masked position: would add a huge KL if it counted
    targets = torch.tensor([[0, 0], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    s = teacher_forced_sums(logits, ref_logits, targets, mask)
    kl_qp = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_pq = 0.5 * math.log(4 / 3)
    assert s["tokens"].tolist() == [2.0, 1.0]
    assert s["nll_policy"].tolist() == pytest.approx([2 * math.log(2), math.log(2)], abs=1e-12)
    assert s["nll_reference"].tolist() == pytest.approx([2 * math.log(4 / 3), math.log(4)], abs=1e-12)
    assert s["kl_ref_to_policy"].tolist() == pytest.approx([2 * kl_qp, kl_qp], abs=1e-12)
    assert s["kl_policy_to_ref"].tolist() == pytest.approx([2 * kl_pq, kl_pq], abs=1e-12)


def perturbed(model, scale=0.02, seed=1):
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def texts(assets_dir):
    return read_texts("rt-polarity", assets=str(assets_dir), max_texts=12, seed=0)


def test_model_against_itself_is_exactly_zero(stories, stories_path, texts):
    from tether.modeling import load_causal_lm

    tok, model = stories
    other = load_causal_lm(stories_path)  # a second copy: same weights, separate object
    res = forgetting_on_texts(model, other, text_batches(tok, texts, batch_size=5))
    assert res["tokens"] > 100
    for k in ("kl_ref_to_policy", "kl_policy_to_ref", "nll_delta", "ppl_delta"):
        assert res[k] == 0.0, k
    fwd = forward_kl_on_prompts(
        model, other, [tok(p)["input_ids"] for p in RT_PROMPTS], tokenizer=tok, samples_per_prompt=2, max_new_tokens=8
    )
    assert fwd["forward_kl_on_prompts"] == 0.0 and fwd["forward_kl_next_token"] == 0.0


def test_exact_kls_and_nll_match_brute_force_float64(stories, texts):
    """Every text scored alone, unpadded, by float64 copies of both models, with the KL written out as
    Σ_v p_v (log p_v - log q_v) in float64; the probe (fp32, batched, padded) must agree. Tolerance:
    fp32 logits of this 5-layer, width-64 model differ from fp64 by ~1e-6 relative, so per-token means of
    O(1..10) quantities agree to ~1e-5; 1e-4 leaves room and still catches any wrong position or mask."""
    tok, model = stories
    policy = perturbed(model)
    res = forgetting_on_texts(policy, model, text_batches(tok, texts, max_length=40, batch_size=4))
    p64, q64 = policy.double().eval(), perturbed(model, scale=0.0).double().eval()
    policy.float()
    tot = dict(nll_p=0.0, nll_q=0.0, fwd=0.0, rev=0.0, n=0)
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"][:40]])
            lp = F.log_softmax(p64(ids).logits[0, :-1], -1)  # (n-1, V) predicting ids[1:]
            lq = F.log_softmax(q64(ids).logits[0, :-1], -1)
            y = ids[0, 1:]
            tot["nll_p"] -= float(lp[torch.arange(len(y)), y].sum())
            tot["nll_q"] -= float(lq[torch.arange(len(y)), y].sum())
            tot["fwd"] += float((lq.exp() * (lq - lp)).sum())
            tot["rev"] += float((lp.exp() * (lp - lq)).sum())
            tot["n"] += len(y)
    n = tot["n"]
    assert res["tokens"] == n
    assert res["nll_policy"] == pytest.approx(tot["nll_p"] / n, abs=1e-4)
    assert res["nll_reference"] == pytest.approx(tot["nll_q"] / n, abs=1e-4)
    assert res["nll_delta"] == pytest.approx((tot["nll_p"] - tot["nll_q"]) / n, abs=1e-4)
    assert res["kl_ref_to_policy"] == pytest.approx(tot["fwd"] / n, abs=1e-4)
    assert res["kl_policy_to_ref"] == pytest.approx(tot["rev"] / n, abs=1e-4)
    assert res["kl_ref_to_policy"] > 0.01 and res["kl_policy_to_ref"] > 0.01  # clearly non-zero for a drifted model
    assert res["ppl_policy"] == pytest.approx(math.exp(res["nll_policy"]))


def test_next_token_forward_kl_is_exact(stories):
    """forward_kl_next_token = mean over prompts of KL[π_ref(·|x)‖π_θ(·|x)] at the prompt's last position
    (no sampling): brute force in float64 per prompt (tolerance as above)."""
    tok, model = stories
    policy = perturbed(model, scale=0.03)
    ids = [tok(p)["input_ids"] for p in RT_PROMPTS]
    fwd = forward_kl_on_prompts(policy, model, ids, tokenizer=tok, samples_per_prompt=3, max_new_tokens=6)
    want = []
    with torch.no_grad():
        for x in ids:
            lp = F.log_softmax(policy(torch.tensor([x])).logits[0, -1].double(), -1)
            lq = F.log_softmax(model(torch.tensor([x])).logits[0, -1].double(), -1)
            want.append(float((lq.exp() * (lq - lp)).sum()))
    assert fwd["forward_kl_next_token"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert fwd["samples"] == 12 and fwd["forward_kl_on_prompts"] > fwd["forward_kl_next_token"] > 0


def test_default_text_is_an_asset_the_run_did_not_train_on(assets_dir, tmp_path):
    a = str(assets_dir)
    assert default_texts({}, assets=a, max_texts=3)[0] == "rt-polarity"
    assert default_texts({"dataset": "hh-rlhf"}, assets=a, max_texts=3)[0] == "rt-polarity"
    prompts = tmp_path / "prompts.txt"  # the demo's kind of prompts: short prefixes of rt-polarity snippets
    prompts.write_text("\n".join(RT_PROMPTS[:1] + ["the rock is destined"]) + "\n")
    assert trained_on("rt-polarity", {"prompts": str(prompts)}, assets=a)
    name, got = default_texts({"prompts": str(prompts)}, assets=a, max_texts=3)
    assert name == "hh-rlhf" and len(got) == 3 and all("Human:" in t for t in got)
    unrelated = tmp_path / "stories.txt"
    unrelated.write_text("Once upon a time there was a zebra named Qwxyz.\n")
    assert not trained_on("rt-polarity", {"prompts": str(unrelated)}, assets=a)
    with pytest.raises(ValueError, match="--texts"):
        default_texts({"dataset": "hh-rlhf", "prompts": str(prompts)}, assets=a)
    # a DPO run started from an SFT run on rt-polarity lines: the SFT data counts too (run_config_of + lineage)
    import yaml

    from tether.diagnostics.forgetting import run_config_of

    for run, cfg in (
        ("sft", {"model": "stories260K", "dataset": str(prompts)}),
        ("dpo", {"model": str(tmp_path / "sft" / "final"), "dataset": "pairs.jsonl"}),
    ):
        (tmp_path / run / "final").mkdir(parents=True)
        (tmp_path / run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_config_of(str(tmp_path / "dpo" / "final"))["dataset"] == "pairs.jsonl"
    assert run_config_of("stories260K") == {}
    assert default_texts(run_config_of(str(tmp_path / "dpo" / "final")), assets=a, max_texts=2)[0] == "hh-rlhf"


def test_command_end_to_end(stories, stories_path, tmp_path):
    from tether.commands.forgetting import main

    tok, model = stories
    drifted = tmp_path / "drifted"
    perturbed(model).save_pretrained(drifted)
    tok.save_pretrained(drifted)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The film is a mess.", "A quiet, lovely movie."]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(RT_PROMPTS) + "\n")
    out = tmp_path / "f.json"
    assert (
        main(
            [
                "--policy",
                str(drifted),
                "--reference",
                stories_path,
                "--texts",
                str(texts),
                "--prompts",
                str(prompts),
                "--samples",
                "2",
                "--max_new_tokens",
                "8",
                "--json",
                str(out),
                "--no_progress",
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())
    direct = forgetting_on_texts(
        perturbed(model), model, text_batches(tok, ["The film is a mess.", "A quiet, lovely movie."])
    )
    for k in ("nll_policy", "nll_reference", "kl_ref_to_policy", "kl_policy_to_ref"):  # the interface
        assert got[k] == pytest.approx(direct[k], rel=1e-6), k
    assert got["kl_ref_to_policy"] > 0.01 and got["forward_kl_on_prompts"] > 0 and got["on_texts"]["texts"] == 2
    same = tmp_path / "same.json"
    main(
        [
            "--policy",
            stories_path,
            "--reference",
            stories_path,
            "--max_texts",
            "8",
            "--output",
            str(same),
            "--no_progress",
        ]
    )
    zero = json.loads(same.read_text())
    assert zero["texts_source"] == "rt-polarity" and zero["kl_ref_to_policy"] == 0.0 and zero["nll_delta"] == 0.0


def test_dpo_logs_the_probe_and_it_equals_the_command_on_final(stories, stories_path, assets_dir, tmp_path):
    """A 2-step DPO run at a high learning rate with forgetting_text: the final evaluation's
    eval/forgetting/* are the probe's numbers for final/ against stories260K (same texts, same code)."""
    from tether.data.preference import sentiment_pairs
    from tether.modeling import load_causal_lm
    from tether.trainers.dpo import DPOConfig, train_dpo

    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    out = tmp_path / "dpo"
    cfg = DPOConfig(
        model=stories_path,
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        learning_rate=3e-3,
        max_length=32,
        eval_pairs=4,
        kl_prompts=0,
        progress=False,
        seed=0,
        forgetting_text="auto",
        forgetting_max_texts=6,
    )
    res = train_dpo(cfg, rows=sentiment_pairs(pos, neg, n=16, seed=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2 and "eval/forgetting/nll_delta" in last
    tok = stories[0]
    probe = ForgettingProbe("auto", tok, config={"dataset": "rt-polarity"}, assets=str(assets_dir), max_texts=6)
    assert probe.source == "hh-rlhf"  # the run trained on rt-polarity pairs, so the default text is HH
    want = probe(load_causal_lm(res["final"]), stories[1])
    for k, v in want.items():
        assert last[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert last["eval/forgetting/kl_ref_policy"] > 1e-3


def test_online_trainer_logs_the_probe_from_step_0(stories_path, tmp_path):
    """grpo with forgetting_text=auto on story prompts: the default text is rt-polarity; step 0 (the
    reference itself) logs exactly 0 and the logged step-1 numbers are the probe's for final/."""
    from tether.modeling import load_causal_lm, load_tokenizer
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.online import train_online

    prompts = ["Once upon a time", "The little dog", "One day, a girl", "Tom was"]
    cfg = GRPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / "grpo"),
        batch_size=8,
        samples_per_prompt=4,
        max_new_tokens=8,
        learning_rate=3e-3,
        progress=False,
        sample_every=0,
        eval_max_prompts=2,
        eval_samples=1,
        max_steps=1,
        eval_every=1,
        forgetting_text="auto",
        forgetting_max_texts=6,
        seed=0,
    )
    res = train_online(cfg, prompts=prompts, reward=lambda texts: torch.tensor([float(len(t)) for t in texts]))
    ev = res["eval_history"]
    assert [e["step"] for e in ev] == [0, 1]
    for k in ("eval/forgetting/nll_delta", "eval/forgetting/kl_ref_policy", "eval/forgetting/kl_policy_ref"):
        assert ev[0][k] == 0.0, k
    tok = load_tokenizer(stories_path)
    probe = ForgettingProbe("auto", tok, config={"prompts": prompts}, max_texts=6)
    assert probe.source == "rt-polarity"
    want = probe(load_causal_lm(res["final"]), load_causal_lm(stories_path))
    for k, v in want.items():
        assert ev[1][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert ev[1]["eval/forgetting/kl_ref_policy"] > 1e-4


def test_sft_logs_the_probe_against_its_starting_model(stories_path, assets_dir, tmp_path):
    """sft on rt-polarity lines with forgetting_text=auto: the probe compares with the starting model
    on HH dialogues (the run trained on rt-polarity), and rm refuses the field."""
    from tether.errors import UserError
    from tether.modeling import load_causal_lm, load_tokenizer
    from tether.trainers.reward_model import RMConfig, train_reward_model
    from tether.trainers.sft import SFTConfig, train_sft

    data = tmp_path / "reviews.txt"
    data.write_text("\n".join(read_texts("rt-polarity", assets=str(assets_dir), max_texts=16, seed=3)) + "\n")
    out = tmp_path / "sft"
    cfg = SFTConfig(
        model=stories_path,
        dataset=str(data),
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        learning_rate=3e-3,
        max_length=32,
        eval_examples=0,
        progress=False,
        seed=0,
        forgetting_text="auto",
        forgetting_max_texts=4,
    )
    res = train_sft(cfg)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    tok = load_tokenizer(stories_path)
    probe = ForgettingProbe("auto", tok, config={"dataset": str(data)}, assets=str(assets_dir), max_texts=4)
    assert probe.source == "hh-rlhf"
    want = probe(load_causal_lm(res["final"]), load_causal_lm(stories_path))
    for k, v in want.items():
        assert last[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert last["eval/forgetting/kl_ref_policy"] > 1e-3
    with pytest.raises(UserError, match="forgetting_text"):
        train_reward_model(
            RMConfig(model=stories_path, dataset="hh-rlhf", output_dir=str(tmp_path / "rm"), forgetting_text="auto")
        )


def test_bad_texts_are_one_line_user_errors(tmp_path):
    from tether.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"foo": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl row 1: row has fields \['foo'\]"):
        read_texts(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        read_texts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no non-empty text"):
        read_texts(str(empty))
