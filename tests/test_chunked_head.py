"""The online update scored through the chunked LM head (``chunked_head``, ``ops.head.head_scores``): the
per-token scores it fills a rollout with equal ``engine.score_rows``'s, the switch decides as documented,
and GRPO, RLOO and PPO follow the same trajectory with it on as with it off, on stories260K, on a seeded
Qwen2-shaped model with a 32K vocabulary and on a GPT-2 with a tied head, with the exact estimator in the
loss and in the reward, k3, top-k sets and the shared-prompt layout on and off."""

import shutil

import pytest
import torch

from tether.engine import score_rows, score_rows_from_head
from tether.errors import UserError
from tether.modeling import make_batch
from tether.ops.head import head_scores
from tether.ops.logprobs import pack_allowed
from tether.trainers.online import chunked_head_mode

from conftest import assert_close, f32_tol, measured_tol


@pytest.mark.parametrize("reference_filter", ["none", "restricted"])
def test_scores_from_the_head_equal_score_rows(reference_filter):
    """score_rows_from_head on head_scores' outputs against score_rows on the (B, T, V) logits of the same hidden
    states and heads: τ = 0.7, top-5 sets F_t, k1/k3/exact with an output clamp that bites, the fixed and the
    restricted reference. Tolerance: each score is a log-softmax or a sum over V of p·log-ratio of logits of
    magnitude ≤ Σ|h||W|/τ, computed by two kernels (a chunk's product against the whole batch's)."""
    g = torch.Generator().manual_seed(0)
    B, T, D, V, tau = 3, 5, 8, 40, 0.7
    h, rh = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    W, rW = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    z, rz = h @ W.t() / tau, rh @ rW.t() / tau  # (B, T, V)
    keep = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, z.topk(5, -1).indices, True)
    tokens = z.masked_fill(~keep, float("-inf")).argmax(-1)  # sampled tokens lie in F_t
    batch = make_batch([[1, 2]] * B, tokens.tolist(), pad_id=0)
    batch.mask[0, -2:] = False  # a finished row: positions off the mask
    batch.allowed = pack_allowed(keep)
    kw = dict(estimators=("k1", "k3", "exact"), clamp_output=0.5, reference_filter=reference_filter)
    want = score_rows(z.masked_fill(~keep, float("-inf")), rz, batch, **kw)
    sc = head_scores(h, W, tokens, ref_hidden=rh, ref_weight=rW, temperature=tau, allowed=batch.allowed, chunk_size=4)
    got = score_rows_from_head(sc, batch, **kw)
    assert got.keys() == want.keys()
    mag = float((h.abs() @ W.abs().t()).max() + (rh.abs() @ rW.abs().t()).max()) / tau
    for k in want:
        if want[k].dtype == torch.bool:
            assert torch.equal(got[k], want[k]), k
        else:
            assert_close(got[k], want[k], abs=f32_tol(4 * mag), what=k)
    assert bool(want["clamped/k3"].any()) and float(want["filter_cost"].abs().max()) > 0.1  # both effects present


def test_mode_values():
    assert [chunked_head_mode(v) for v in ("auto", True, "true", "on", False, "false", "off")] == [
        "auto",
        "on",
        "on",
        "on",
        "off",
        "off",
        "off",
    ]
    with pytest.raises(UserError, match="chunked_head"):
        chunked_head_mode("sometimes")


def _seeded(stories_path, where, arch: str = "qwen2") -> str:
    """A seeded 2-layer model saved with the stories260K tokenizer (ids past its 512 decode to short strings:
    rewards still read text): Qwen2-shaped (D = 32, GQA, untied head) with a 32,768-token vocabulary, or GPT-2
    (D = 32, its head tied to the token embedding) with 4,096 tokens."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=4096, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    else:
        cfg = Qwen2Config(
            vocab_size=32768,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a sharper head than the default init: the runs' KL and entropy move visibly
        model.get_output_embeddings().weight.mul_(8.0)
    path = where / arch
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        try:
            shutil.copy(f"{stories_path}/{f}", path / f)
        except FileNotFoundError:
            pass
    return str(path)


def test_auto_takes_large_vocabularies_and_falls_back(stories, stories_path, tmp_path):
    """auto: off at stories260K's 512 tokens, on at 32K; a LoRA-adapted LM head and a reference form without
    a decoder to call fall back to the logits path."""
    from types import SimpleNamespace

    from tether.modeling import load_causal_lm
    from tether.reference import FrozenReference, Reference
    from tether.trainers.online import use_chunked_head

    small, big = stories[1], load_causal_lm(_seeded(stories_path, tmp_path))
    cfg = SimpleNamespace(chunked_head="auto")
    ref = FrozenReference(load_causal_lm(stories_path))
    assert not use_chunked_head(cfg, small, ref, needs_reference=True)
    assert use_chunked_head(SimpleNamespace(chunked_head="on"), small, ref, needs_reference=True)
    assert use_chunked_head(cfg, big, FrozenReference(load_causal_lm(tmp_path / "qwen2")), needs_reference=True)
    assert not use_chunked_head(cfg, big, Reference(), needs_reference=True)  # logits only
    assert use_chunked_head(cfg, big, Reference(), needs_reference=False)  # (not read: the policy side alone)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(big, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not use_chunked_head(cfg, lora, ref, needs_reference=False)


# metrics that read every score the update fills (kl/ref: kl_exact; kl/penalty: the estimator; entropy), the
# rewards of the samples and the gradient
SAME = ["kl/ref", "kl/penalty", "kl/ref_token_mean", "policy/entropy", "reward/score", "opt/grad_norm"]
PROMPTS = ["Once upon a time", "The little dog", "One day, a cat", "Tom had a ball"]
LONG = "Once upon a time, in a small town by the sea, there lived a little girl named Lily who loved the beach"

CASES = [
    ("grpo", "stories", dict(kl_estimator="k3", grad_accum=2)),
    ("grpo", "stories", dict(kl_estimator="exact", top_k=20, shared_prompt=True)),
    ("grpo", "stories", dict(kl_estimator="exact", score_from_update=False)),  # the rollout's reference hidden
    ("rloo", "stories", dict(kl_estimator="exact", temperature=0.8)),
    ("rloo", "stories", dict(kl_estimator="k3", shared_prompt=True)),
    ("ppo", "stories", dict(kl_estimator="exact", value_model="head", num_epochs=2, num_minibatches=2)),
    ("grpo", "qwen2", dict(kl_estimator="exact", shared_prompt=False)),
    ("grpo", "qwen2", dict(kl_estimator="k3", top_k=50, shared_prompt=True)),
    ("rloo", "qwen2", dict(kl_estimator="exact", shared_prompt=True)),
    # a head tied to the embedding
    ("grpo", "gpt2", dict(kl_estimator="exact", shared_prompt=True, learning_rate=3e-3)),
]


@pytest.mark.parametrize("method,model,kw", CASES, ids=[f"{m}-{n}-{i}" for i, (m, n, _) in enumerate(CASES)])
def test_trajectory_with_and_without_the_chunked_head(method, model, kw, stories_path, tmp_path, monkeypatch):
    """3 steps, G = 4, 16 completions a step, chunked_head true against false: with it on every update forward
    goes through head_scores (counted), off never; the same samples, and every step's KL (exact, and the
    estimator as applied), entropy, score and gradient norm agree. The two paths compute the same mathematics
    (the head's product per chunk of positions instead of the whole micro-batch's, the scores from it in
    float32): step 1 agrees to float32 rounding, and Adam carries a rounding-sized gradient difference into
    later steps as a ±lr-sized weight difference, so the tolerance is measured (tests/tolerance_report.py's
    practice): the worst relative deviation over these cases was 2.9e-6 (0 to 2.9e-6 by case); a wrong
    position, mask, temperature or set moves these metrics by whole percents (kl/ref moves from 0 to ~1e-1)."""
    import tether.trainers.online as online
    from tether.trainers.grpo import GRPOConfig, train_grpo
    from tether.trainers.ppo import PPOConfig, train_ppo
    from tether.trainers.rloo import RLOOConfig, train_rloo

    cls, train = {"grpo": (GRPOConfig, train_grpo), "rloo": (RLOOConfig, train_rloo), "ppo": (PPOConfig, train_ppo)}[
        method
    ]
    path = stories_path if model == "stories" else _seeded(stories_path, tmp_path, model)
    calls = []
    inner = online.head_scores

    def counted(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    monkeypatch.setattr(online, "head_scores", counted)
    runs = {}
    for on in (False, True):
        calls.clear()
        cfg = cls(
            model=path,
            output_dir=str(tmp_path / f"run{on}"),
            batch_size=16,
            samples_per_prompt=4,
            max_steps=3,
            max_new_tokens=12,
            progress=False,
            sample_every=0,
            eval_every=0,
            eval_final=False,
            seed=0,
            chunked_head=on,
            **{"learning_rate": 5e-4, **kw},
        )
        runs[on] = (train(cfg, prompts=[LONG, *PROMPTS[1:]]), len(calls))
    (off, n_off), (on, n_on) = runs[False], runs[True]
    assert n_off == 0 and n_on >= 3  # off: never; on: every update forward of 3 steps
    tol = measured_tol(2.9e-6)
    for a, b in zip(off["history"], on["history"], strict=True):
        for k in SAME:
            assert_close(b[k], a[k], rel=tol, abs=tol * 1e-3, what=f"step {a['step']} {k}")
    assert off["history"][-1]["kl/ref"] > 1e-3  # the run moved
