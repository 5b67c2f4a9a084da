"""The loops share one sampling engine (tether/engine.py).

Each test runs two loops on the real stories260K with the same prompts, seed and sampling settings and
asserts *exact* equality of what they sample and measure: the online rollout against ``measure``
(``tether kl``), the online trainer's evaluation against DPO's kl/ref and the demo's evaluation point,
best-of-n and the demo's preference pairs against ``generate_batches``. A loop that sampled, decoded or
scored its own way (another seed, filter, temperature or decode) would break one of these."""

from __future__ import annotations

import pytest
import torch

from tether.engine import (
    EVAL_BATCH_SIZE,
    EVAL_SEED_OFFSET,
    eval_seed,
    generate,
    generate_batches,
    measure,
    score,
)
from tether.groups import SamplingSettings
from tether.modeling import load_causal_lm
from tether.ops.kl import seq_sum
from tether.reference import FrozenReference
from tether.rewards import CallableSource, RewardSet, VaderSource

PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy", "The sun was"]


@pytest.fixture(scope="module")
def models(stories_path):
    """(tokenizer, perturbed policy, reference = stories260K): a KL well away from 0."""
    from tether.modeling import load_tokenizer

    tok, policy = load_tokenizer(stories_path), load_causal_lm(stories_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return tok, policy, FrozenReference(load_causal_lm(stories_path))


def _ids(tok, prompts=PROMPTS):
    return [tok(p)["input_ids"] for p in prompts]


def test_rollout_kl_equals_measure_per_sequence(models):
    """collect_rollout (the online rollout) and measure (tether kl) on the same prompts, seed and
    sampling settings (τ = 0.8, top_k = 30, top_p = 0.95): the same completions, texts and per-sequence
    exact KL, bit for bit; and the rollout's kl_tokens (k3) are measure's k3."""
    from tether.trainers.online import seeded
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.rollout import collect_rollout

    tok, policy, reference = models
    prompts = [p for p in PROMPTS for _ in range(2)]  # G = 2 contiguous copies, as train_online repeats them
    ids = _ids(tok, prompts)
    cfg = PPOConfig(max_new_tokens=12, temperature=0.8, top_k=30, top_p=0.95, kl_estimator="k3")
    gen = seeded(3, 1)
    seed = int(gen.initial_seed())
    ro = collect_rollout(
        policy,
        reference,
        None,
        RewardSet(VaderSource()),
        tok,
        prompts,
        ids,
        cfg=cfg,
        generator=gen,
        chunk=3,
        device="cpu",
    )
    res = measure(
        policy,
        reference,
        ids,
        tokenizer=tok,
        max_new_tokens=12,
        batch_size=len(ids),
        seed=seed,
        estimators=("exact", "k3"),
        sampling={"temperature": 0.8, "top_k": 30, "top_p": 0.95},
        chunk=3,
        return_samples=True,
    )
    assert float(ro.kl_exact.abs().max()) > 0  # a real KL, not the trivial 0 of a model against itself
    assert res["completions"] == [ro.batch.completion_ids[i][ro.mask[i]].tolist() for i in range(len(ids))]
    assert res["texts"] == ro.completions
    assert res["per_sequence"]["exact"] == seq_sum(ro.kl_exact, ro.mask).tolist()
    assert res["per_sequence"]["k3"] == seq_sum(ro.kl_tokens, ro.mask).tolist()


def test_online_dpo_and_demo_evaluations_use_one_seed_and_protocol(models):
    """online.evaluate, dpo.measure_ref_kl and the demo's evaluate_policy, one sample per prompt at
    τ = 1 from the same seed: the same KL and standard error exactly (engine.evaluate at
    eval_seed(seed), EVAL_BATCH_SIZE rows per batch), and the samples are measure's at that seed."""
    from tether.demo.task import Prompt, evaluate_policy
    from tether.trainers.dpo import DPOConfig, measure_ref_kl
    from tether.trainers.online import evaluate as online_evaluate
    from tether.trainers.ppo import PPOConfig

    tok, policy, reference = models
    ids = _ids(tok)
    length = CallableSource(lambda completions: [float(len(c)) for c in completions], name="len")
    on = online_evaluate(
        policy,
        reference,
        RewardSet(length),
        tok,
        PROMPTS,
        ids,
        cfg=PPOConfig(seed=5, eval_samples=1, max_new_tokens=10),
    )
    dpo = measure_ref_kl(DPOConfig(seed=5, kl_samples=1, kl_max_new_tokens=10), policy, reference, ids, tok)
    demo = evaluate_policy(
        policy, reference, tok, [Prompt(i, t) for i, t in zip(ids, PROMPTS)], gold=length, max_new_tokens=10, seed=5
    )
    assert on["eval/kl"] > 0
    assert on["eval/kl"] == dpo["kl/ref"] == demo["kl"]
    assert on["eval/kl_stderr"] == dpo["kl/ref_stderr"] == demo["kl_stderr"]
    assert on["eval/reward/len"] == demo["gold_reward"]  # the same texts
    want = measure(
        policy,
        reference,
        ids,
        tokenizer=tok,
        max_new_tokens=10,
        batch_size=EVAL_BATCH_SIZE,
        seed=5 + EVAL_SEED_OFFSET,
        estimators=("exact",),
    )
    assert want["estimators"]["exact"]["mean"] == on["eval/kl"]
    assert eval_seed(5) == 5 + EVAL_SEED_OFFSET


def test_best_of_n_and_preference_pairs_sample_with_the_engine(models):
    """best-of-n's M samples per prompt and the demo's preference samples are generate_batches' texts
    for the same seed, batch size and settings, in prompt-major order."""
    from tether.demo.task import Prompt, preference_pairs
    from tether.trainers.best_of_n import sample_and_score

    tok, _, reference = models
    model = reference.model
    ids = _ids(tok)
    length = CallableSource(lambda completions: [float(len(c)) for c in completions], name="len")
    scored = sample_and_score(
        model,
        tok,
        PROMPTS,
        samples=3,
        reward=length,
        seed=2,
        batch_size=4,
        sampling=SamplingSettings(max_new_tokens=8, temperature=0.9, top_k=10),
    )
    texts = [
        t
        for s in generate_batches(
            model,
            ids,
            tokenizer=tok,
            sampling={"temperature": 0.9, "top_k": 10},
            max_new_tokens=8,
            batch_size=4,
            seed=2,
            samples_per_prompt=3,
        )
        for t in s.completions
    ]
    assert [t for row in scored["texts"] for t in row] == texts

    def gold(prompts, completions):  # distinct scores: every pair of distinct texts is a preference
        return torch.tensor([float(len(c)) + 1e-3 * i for i, c in enumerate(completions)])

    rows = preference_pairs(
        model,
        tok,
        [Prompt(i, t) for i, t in zip(ids, PROMPTS)],
        gold,
        samples_per_prompt=3,
        max_new_tokens=8,
        seed=2,
        batch_size=4,
        progress=False,
    )
    plain = [
        t
        for s in generate_batches(
            model, ids, tokenizer=tok, max_new_tokens=8, batch_size=4, seed=2, samples_per_prompt=3
        )
        for t in s.completions
    ]
    per_prompt = {p: set(plain[3 * k : 3 * k + 3]) for k, p in enumerate(PROMPTS)}
    assert rows and all({r["chosen"], r["rejected"]} <= per_prompt[r["prompt"]] for r in rows)


def test_score_refuses_other_settings_than_sampled(models):
    """The KL is defined under the distribution sampled (docs/theory.md §3): scoring Samples under other
    settings is an error, not a silently different quantity."""
    tok, policy, reference = models
    smp = generate(policy, _ids(tok)[:2], tokenizer=tok, sampling={"temperature": 0.7}, max_new_tokens=4, seed=0)
    assert smp.sampling.filters() == {"temperature": 0.7, "top_k": 0, "top_p": 1.0}
    score(policy, reference, smp, sampling={"temperature": 0.7})
    with pytest.raises(ValueError, match="drawn with"):
        score(policy, reference, smp, sampling={"temperature": 1.0})
    with pytest.raises(ValueError, match="exactly one of"):
        generate(policy, _ids(tok)[:1], tokenizer=tok, max_new_tokens=2)


def test_online_and_dpo_trainers_call_one_eval_hook_signature(stories_path, tmp_path, assets_dir):
    """train_online and train_dpo both call eval_hook(step, policy, *, beta): one keyword-only hook
    serves both (the demo passes the same one to every trainer), from step 0."""
    from tether.data.preference import sentiment_pairs
    from tether.trainers.dpo import DPOConfig, train_dpo
    from tether.trainers.grpo import GRPOConfig, train_grpo

    calls = []

    def hook(step, policy, *, beta):
        calls.append((step, beta))
        return {"eval/hooked": 1.0}

    train_grpo(
        GRPOConfig(
            model=stories_path,
            output_dir=str(tmp_path / "grpo"),
            batch_size=4,
            samples_per_prompt=2,
            max_new_tokens=4,
            max_steps=1,
            eval_every=1,
            progress=False,
            sample_every=0,
            beta=0.3,
        ),
        prompts=PROMPTS,
        eval_hook=hook,
    )
    assert calls == [(0, 0.3), (1, 0.3)]
    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    calls.clear()
    train_dpo(
        DPOConfig(
            model=stories_path,
            output_dir=str(tmp_path / "dpo"),
            max_steps=1,
            batch_size=4,
            max_length=48,
            eval_pairs=2,
            kl_prompts=0,
            eval_every=1,
            progress=False,
            seed=0,
            beta=0.2,
        ),
        rows=sentiment_pairs(pos, neg, n=8, seed=0),
        eval_hook=hook,
    )
    assert calls == [(0, 0.2), (1, 0.2)]
