"""DPO's shared prompt (the online trainers': test_shared_prompt.py): a pair laid out as [prompt, chosen,
rejected] with the prefix-tree attention mask
(Wang et al. 2024, arXiv:2410.20305) gives the two-sequence layout's log-probs and gradients, on the real
stories260K (Llama) and tiny seeded GPT-2 / Qwen2 models, for the policy, the precomputed reference
cache and a whole training run; an attention implementation that cannot take the mask falls back."""

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from test_architectures import _config
from test_dpo_trainer import assert_same_trajectory

from tether.data.preference import collate_pairs, load_preference_rows, pack_pairs, tokenize_pairs
from tether.errors import UserError
from tether.trainers.dpo import DPOConfig, pair_logps, shared_prompt_mode, shared_prompt_works, train_dpo

from conftest import assert_close, dpo_log2_tol, f32_tol, logit_magnitude, seq_logps_tol


@pytest.fixture(scope="module")
def hh_pairs(stories):
    """Five tokenised HH-RLHF pairs (dialogue prompts cut to fit 96 tokens) plus one more pair with pair 0's
    prompt, so one segment holds four completions."""
    tok, _ = stories
    rows = load_preference_rows("hh-rlhf", limit=5)
    rows.append({"prompt": rows[0]["prompt"], "chosen": " I can help with that.", "rejected": " No."})
    pairs = tokenize_pairs(rows, tok, max_length=96, max_prompt_length=64)[0]
    assert pairs[0]["prompt_ids"] == pairs[-1]["prompt_ids"]
    return pairs


def _models(stories) -> dict:
    """name -> model (eval mode: dropout off, gradients still flow)."""
    tok, llama = stories
    out = {"llama-stories260K": copy.deepcopy(llama).eval()}
    from transformers import AutoModelForCausalLM

    for arch in ("gpt2", "qwen2"):
        torch.manual_seed(0)
        out[f"{arch}-tiny"] = AutoModelForCausalLM.from_config(_config(arch, tok)).eval()
    return out


@pytest.fixture(scope="module")
def models(stories):
    return _models(stories)


def _logps_and_grads(model, batch):
    model.zero_grad()
    logps, lengths = pair_logps(model, batch)
    (logps * torch.linspace(-1, 1, logps.numel(), dtype=logps.dtype)).sum().backward()
    return logps.detach(), lengths, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama-stories260K", "gpt2-tiny", "qwen2-tiny"])
def test_shared_prompt_logps_equal_the_two_sequence_layout(models, stories, hh_pairs, name, impl):
    """float32 sequence log-probs: shared layout vs the padded one, within ``seq_logps_tol`` of the
    largest logit magnitude (two layouts round the same dot products differently). The mask matters:
    letting the rejected tokens see the chosen ones (one branch for all) moves them by far more."""
    tok, _ = stories
    model = copy.deepcopy(models[name])
    model.config._attn_implementation = impl
    padded = collate_pairs(hh_pairs, pad_id=tok.pad_token_id)
    shared = pack_pairs(hh_pairs, pad_id=tok.pad_token_id, share_prompts=True)
    assert shared.shared_prompts and int((shared.segment >= 0).sum()) < int(padded.attention_mask.sum())
    with torch.no_grad():
        want, want_len = pair_logps(model, padded)
        got, got_len = pair_logps(model, shared)
        leaky = copy.copy(shared)
        leaky.branch = shared.branch.clamp(max=1)  # every completion token sees the earlier completions
        wrong = pair_logps(model, leaky)[0]
    assert got_len.tolist() == want_len.tolist()
    tol = seq_logps_tol(
        logit_magnitude(model, padded.input_ids, attention_mask=padded.attention_mask), padded.input_ids.shape[1]
    )
    assert_close(got, want, abs=tol, what=f"{name} {impl} shared-prompt logps")
    assert float((wrong - want).abs().max()) > 100 * tol


@pytest.mark.parametrize("name", ["llama-stories260K", "gpt2-tiny", "qwen2-tiny"])
def test_shared_prompt_gradients_equal_the_two_sequence_layout(models, stories, hh_pairs, name):
    """float32 parameter gradients of Σ w_i·logps_i, shared layout vs padded, per tensor as the relative
    norm of the difference. Each gradient element is a sum over the batch's token slots N of per-token
    contributions; the shared layout adds a prompt token's contributions from its completions before
    the backward pass through it, the padded one after, so the two round differently: ~√N float32
    spacings of the gradient's size (conftest.f32_tol: a sum of N terms drifts by about √N spacings).
    (A float64 model is no exact reference: Hugging Face's RMSNorm and rotary embeddings compute in
    float32 whatever the weights' dtype.) A wrong mask changes the log-probs themselves (above)."""
    tok, _ = stories
    model = copy.deepcopy(models[name])
    padded = collate_pairs(hh_pairs, pad_id=tok.pad_token_id)
    shared = pack_pairs(hh_pairs, pad_id=tok.pad_token_id, share_prompts=True)
    want = _logps_and_grads(model, padded)
    got = _logps_and_grads(model, shared)
    budget = f32_tol(math.sqrt(padded.input_ids.numel()))
    for (n, _), gs, gp in zip(model.named_parameters(), got[2], want[2]):
        if float(gp.norm()) > 0:
            assert_close(float((gs - gp).norm() / gp.norm()), 0.0, abs=budget, what=f"{name} grad {n}")


def test_precomputed_reference_built_with_shared_prompts_equals_the_padded_cache(stories, hh_pairs, tmp_path):
    """The reference cache built packed with shared prompts (a pair's two rows side by side, as
    ``setup_reference`` orders them) holds the padded pass's per-token log-probs: 4 ulps of the
    largest logit magnitude per token (a token's log-prob rounds like one term of ``seq_logps_tol``)."""
    from tether.reference import FrozenReference, PrecomputedReference

    tok, model = stories
    rows = []
    for i, p in enumerate(hh_pairs):
        rows += [(2 * i, p["prompt_ids"], p["chosen_ids"]), (2 * i + 1, p["prompt_ids"], p["rejected_ids"])]
    ref = FrozenReference(copy.deepcopy(model).eval())
    kw = dict(pad_id=tok.pad_token_id, batch_size=5)
    padded = PrecomputedReference.build(ref, model, rows, cache_dir=tmp_path / "a", **kw)
    shared = PrecomputedReference.build(
        ref, model, rows, cache_dir=tmp_path / "b", packed=True, share_prompts="on", **kw
    )
    batch = collate_pairs(hh_pairs, pad_id=tok.pad_token_id)
    tol = seq_logps_tol(logit_magnitude(model, batch.input_ids, attention_mask=batch.attention_mask), 1)
    for rid, _, comp in rows:
        assert shared.table[rid].shape == (len(comp),)
        assert_close(shared.table[rid], padded.table[rid], abs=tol, what=f"ref row {rid}")


def test_flash_attention_falls_back_with_a_log_line(stories, hh_pairs, caplog):
    tok, model = stories
    model = copy.deepcopy(model)
    model.config._attn_implementation = "flash_attention_2"  # takes padding masks only
    with caplog.at_level(logging.INFO, logger="tether.trainers.dpo"):
        assert not shared_prompt_works(model, hh_pairs[:2], pad_id=tok.pad_token_id, device="cpu")
    assert "shared prompt off" in caplog.text and "flash_attention_2" in caplog.text
    model.config._attn_implementation = "sdpa"
    assert shared_prompt_works(model, hh_pairs[:2], pad_id=tok.pad_token_id, device="cpu")


def test_shared_prompt_values():
    assert [shared_prompt_mode(v) for v in ("auto", True, "false", "ON", 0)] == ["auto", "on", "off", "on", "off"]
    with pytest.raises(UserError, match="shared_prompt='sometimes': use auto, true or false"):
        shared_prompt_mode("sometimes")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_with_shared_prompts_follows_the_two_sequence_trajectory(stories_path, tmp_path):
    """Three DPO steps on HH-RLHF pairs with the shared prompt on and off (precomputed reference built the
    same way): the same trajectory (``assert_same_trajectory``: packing-rounding tolerances), the loss
    at step 1 is ln 2, and the shared run computes fewer token positions for the same real tokens."""
    rows = load_preference_rows("hh-rlhf", limit=40)
    runs = {}
    for mode in ("true", "false"):
        cfg = DPOConfig(
            model=stories_path,
            output_dir=str(tmp_path / mode),
            max_steps=3,
            batch_size=4,
            learning_rate=1e-3,
            max_length=128,
            eval_pairs=4,
            kl_prompts=0,
            progress=False,
            seed=0,
            shared_prompt=mode,
        )
        train_dpo(cfg, rows=rows)
        runs[mode] = _metrics(tmp_path / mode)
    on, off = runs["true"], runs["false"]
    assert_same_trajectory(on, off)
    assert_close(on[0]["loss"], math.log(2), abs=dpo_log2_tol(on[0], on[0]["beta"]), what="loss at step 1")
    for a, b in zip(on, off):
        assert a["data/tokens"] == b["data/tokens"] and b["data/tokens_computed"] == b["data/tokens"]
        assert a["data/tokens_computed"] < 0.8 * a["data/tokens"]  # HH prompts are most of each pair


def test_shared_prompt_true_needs_padding_free(stories_path, tmp_path):
    cfg = DPOConfig(
        model=stories_path, dataset="hh-rlhf", output_dir=str(tmp_path), shared_prompt="true", padding_free=False
    )
    with pytest.raises(UserError, match="shared_prompt=true lays pairs out padding-free"):
        train_dpo(cfg)
