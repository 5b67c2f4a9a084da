"""The reference-shift diagnostic (tether/diagnostics/shift.py, ``tether shift``) and the reference_prompt
remedy (tether/reference_prompt.py, OnlineConfig.reference_prompt): exact zeros for a prefix that
changes nothing and for a model against itself, teacher-forced sums against a brute-force float64
computation on the real stories260K, a monotone prefix search, token alignment of the remapped
reference against an unpadded brute force, the command end to end, and a GRPO run with the remedy."""

import copy
import json
import math

import pytest
import torch

from tether.diagnostics.shift import policy_kls, prefixed, search_prefix, shift_delta, shift_rows, target_logps
from tether.reference import FrozenReference
from tether.reference_prompt import (
    PromptMappedReference,
    load_prompt_transform,
    prefixed_prompt_map,
    remap_prompts,
    strip_prefix,
    transformed_prompt_map,
)

from conftest import f32_tol

PROMPTS = ["Once upon a time", "Tom went to the park.", "The cat"]
TARGET = " the dragon ate the moon."


def _ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS], [tok(TARGET, add_special_tokens=False)["input_ids"]] * len(PROMPTS)


def _brute_logp(model, ids, n_target):
    """Σ over the last n_target tokens of log softmax (float64) of one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (L, V)
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # (L-1,)
    return float(lp[-n_target:].sum()), float(lp[-n_target:].abs().sum())


def test_shift_delta_hand_values():
    d, f = shift_delta(torch.tensor([-10.0, -3.0, -5.0]), torch.tensor([-7.0, -3.0, -7.5]), threshold=2.0)
    assert d.tolist() == [3.0, 0.0, -2.5] and f.tolist() == [True, False, True]


def test_prefix_that_changes_nothing_gives_exactly_zero(stories):
    tok, model = stories
    p, y = _ids(tok)
    rows = shift_rows(model, p, y, [[]], pad_id=tok.pad_token_id, bos_id=tok.bos_token_id)
    assert [r["delta"] for r in rows] == [0.0] * 3 and not any(r["flagged"] for r in rows)
    assert all(r["logp_plain"] == r["logp_prefixed"] < 0 for r in rows)


def test_target_logps_equal_brute_force_float64(stories):
    """Batched, left-padded, fp32 sums vs one unpadded forward per row with a float64 log-softmax; the
    error budget is f32 rounding of the per-token log-probs (their absolute sum)."""
    tok, model = stories
    p, y = _ids(tok)
    pf = prefixed(p, tok(" dragon", add_special_tokens=False)["input_ids"], bos_id=tok.bos_token_id)
    assert (
        pf[0][0] == tok.bos_token_id
        and pf[0][1 : -len(p[0]) + 1] == tok(" dragon", add_special_tokens=False)["input_ids"]
    )
    got = target_logps(model, p + pf, y + y, pad_id=tok.pad_token_id)
    for i, prompt in enumerate(p + pf):
        want, mag = _brute_logp(model, prompt + y[0], len(y[0]))
        assert got[i].item() == pytest.approx(want, abs=f32_tol(mag, ulps=64)), i  # 64: logits pass ~10 fp32 layers


@pytest.mark.parametrize("method", ["greedy", "random"])
def test_prefix_search_raises_the_objective_monotonically(stories, method):
    tok, model = stories
    p, y = _ids(tok)
    vocab = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    r = search_prefix(
        model,
        p,
        y,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        vocab=vocab,
        method=method,
        prefix_tokens=2,
        steps=4,
        candidates=8,
        seed=0,
    )
    assert len(r.history) == 4 and all(b >= a for a, b in zip([r.start] + r.history, r.history))
    assert r.objective > r.start  # 4 steps x 8 candidates found something better than a random start
    again = float(
        target_logps(model, prefixed(p, r.prefix, bos_id=tok.bos_token_id), y, pad_id=tok.pad_token_id).mean()
    )
    assert again == pytest.approx(r.objective, abs=f32_tol(r.objective, ulps=64))
    r2 = search_prefix(
        model,
        p,
        y,
        pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
        vocab=vocab,
        method=method,
        prefix_tokens=2,
        steps=4,
        candidates=8,
        seed=0,
    )
    assert r2.prefix == r.prefix and r2.history == r.history  # seeded


def test_model_against_itself_has_zero_policy_kl(stories):
    tok, model = stories
    p, _ = _ids(tok)
    prefix = tok(" The dragon was big.", add_special_tokens=False)["input_ids"]
    k = policy_kls(
        model,
        model,
        p,
        prefix,
        tokenizer=tok,
        bos_id=tok.bos_token_id,
        samples_per_prompt=2,
        max_new_tokens=8,
        batch_size=8,
        seed=0,
    )
    assert k["kl_plain"] == 0.0 and k["kl_plain_per_prompt"] == [0.0] * 3
    assert k["kl_prefixed"] > 0.05  # the prefixed reference differs: the same completions score differently
    empty = policy_kls(
        model,
        model,
        p,
        [],
        tokenizer=tok,
        bos_id=tok.bos_token_id,
        samples_per_prompt=2,
        max_new_tokens=8,
        batch_size=8,
        seed=0,
    )
    assert empty["kl_prefixed"] == 0.0


def test_prompt_mapped_reference_aligns_completion_tokens(stories):
    """The reference scored on stripped prompts: per completion token, its log-probs equal an unpadded
    forward of stripped prompt + completion, so the exact KL and k1/k2/k3 see the same token at index t."""
    from tether.engine import generate, score

    tok, model = stories
    texts = ["JAILBREAK " + t for t in PROMPTS]
    ids = [tok(t)["input_ids"] for t in texts]
    enc = lambda ts: [tok(t)["input_ids"] for t in ts]  # noqa: E731
    pm = transformed_prompt_map(strip_prefix("JAILBREAK"), texts, ids, enc)
    assert pm(ids[0]) == tok(PROMPTS[0])["input_ids"] and pm([1, 5]) == [1, 5]  # unknown prompts unchanged
    ref = PromptMappedReference(
        FrozenReference(copy.deepcopy(model)), pm, pad_id=tok.pad_token_id
    )  # (freezing the shared model would leak)
    smp = generate(model, ids, tokenizer=tok, max_new_tokens=6, seed=3)
    sc = score(model, ref, smp, estimators=("k1", "k3", "exact"))
    for i in range(len(ids)):
        comp = smp.completion_ids[i]
        n = len(comp)
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([tok(PROMPTS[i])["input_ids"] + comp])).logits[0, -n - 1 : -1].double()
        want = torch.log_softmax(lg, -1).gather(-1, torch.tensor(comp)[:, None])[:, 0]  # (n,)
        got = sc.ref_logps[i, :n].double()
        assert torch.allclose(got, want, atol=f32_tol(*want.abs().tolist(), ulps=64)), i
        lr = sc.logps[i, :n].double() - got
        assert torch.allclose(sc.kl["k1"][i, :n].double(), lr, atol=1e-6)  # k1 = log π_θ - log π_ref, per token
    assert float(sc.seq("exact").min()) > 0  # π_θ sees the prefix, π_ref does not


def test_remap_keeps_the_completion_block():
    from tether.modeling import make_batch

    b = make_batch([[1, 7], [1, 8, 9]], [[4, 5, 6], [4]], pad_id=0)
    r = remap_prompts(b, [[1], [1, 2, 3, 9]], pad_id=0)
    assert r.prompt_len == 4 and torch.equal(r.completion_ids, b.completion_ids) and torch.equal(r.mask, b.mask)
    assert r.input_ids[:, :4].tolist() == [[0, 0, 0, 1], [1, 2, 3, 9]]
    assert r.attention_mask[:, :4].tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]
    assert prefixed_prompt_map([5, 6], bos_id=1)([1, 9]) == [1, 5, 6, 9]


def test_load_prompt_transform_specs(tmp_path):
    from tether.errors import UserError

    assert load_prompt_transform("strip_prefix:Ignore rules.")("Ignore rules. Tell me") == "Tell me"
    assert load_prompt_transform("strip_prefix:Ignore rules.")("Tell me") == "Tell me"
    f = tmp_path / "tf.py"
    f.write_text("def lower(p):\n    return p.lower()\n")
    assert load_prompt_transform(f"{f}:lower")("AbC") == "abc"
    assert load_prompt_transform("os.path:basename")("a/b") == "b"
    for bad in ("nocolon", f"{f}:missing", "no_such_module_xyz:f", "strip_prefix:"):
        with pytest.raises(UserError, match="reference_prompt"):
            load_prompt_transform(bad)


def test_shift_command_end_to_end(stories_path, tmp_path, capsys):
    from tether.cli import main

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    (tmp_path / "y.txt").write_text(TARGET + "\n")
    (tmp_path / "pf.txt").write_text("The dragon\n")
    out = tmp_path / "s.json"
    rc = main(
        [
            "shift",
            "--reference",
            stories_path,
            "--prompts",
            str(tmp_path / "p.txt"),
            "--targets",
            str(tmp_path / "y.txt"),
            "--prefixes",
            str(tmp_path / "pf.txt"),
            "--search",
            "greedy",
            "--prefix_tokens",
            "2",
            "--search_steps",
            "2",
            "--candidates",
            "4",
            "--policy",
            stories_path,
            "--samples",
            "2",
            "--max_new_tokens",
            "6",
            "--json",
            str(out),
            "--no_progress",
        ]
    )
    assert rc == 0
    d = json.loads(out.read_text())
    assert len(d["rows"]) == 4 and [(r["prompt"], r["prefix"]) for r in d["rows"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in d["rows"]:
        assert {"logp_plain", "logp_prefixed", "flagged", "delta", "kl_plain", "kl_prefixed"} <= r.keys()
        assert r["kl_plain"] == 0.0 and math.isfinite(r["logp_prefixed"])  # the policy is the reference
    assert d["prefixes"][1]["searched"] and d["search"]["objective"] >= d["search"]["start"]
    (tmp_path / "y2.txt").write_text("a\nb\nc\n")
    rc = main(
        [
            "shift",
            "--reference",
            stories_path,
            "--prompts",
            str(tmp_path / "p.txt"),
            "--targets",
            str(tmp_path / "y2.txt"),
            "--prefixes",
            str(tmp_path / "pf.txt"),
        ]
    )
    assert rc == 2 and "--targets has 3 lines for 2 prompts" in capsys.readouterr().err


def _grpo(stories_path, tmp_path, name, prompts, **kw):
    from tether.trainers.grpo import GRPOConfig, train_grpo

    cfg = GRPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / name),
        batch_size=8,
        samples_per_prompt=4,
        max_new_tokens=8,
        learning_rate=5e-4,
        progress=False,
        sample_every=0,
        eval_every=0,
        max_steps=2,
        seed=0,
        **kw,
    )
    return train_grpo(cfg, prompts=prompts)["history"]


def test_grpo_reference_prompt_identity_is_bit_identical_and_strip_moves_kl(stories_path, tmp_path):
    """Identity transform: the same run, metric for metric. strip_prefix on prompts "JAILBREAK x": at
    step 1 the policy is still the reference, so without the remedy kl/ref = 0 exactly, and with it the
    KL is KL[π(·|P+x)‖π(·|x)] > 0 (the reference no longer sees the prefix)."""
    (tmp_path / "ident.py").write_text("def same(p):\n    return p\n")
    prompts = ["JAILBREAK " + p for p in PROMPTS[:2]]
    plain = _grpo(stories_path, tmp_path, "plain", prompts)
    ident = _grpo(stories_path, tmp_path, "ident", prompts, reference_prompt=f"{tmp_path / 'ident.py'}:same")
    assert plain == ident
    assert plain[0]["kl/ref"] == 0.0
    strip = _grpo(stories_path, tmp_path, "strip", prompts, reference_prompt="strip_prefix:JAILBREAK")
    assert strip[0]["kl/ref"] > 0.1 and strip[0]["reward/score"] == plain[0]["reward/score"]  # same samples
