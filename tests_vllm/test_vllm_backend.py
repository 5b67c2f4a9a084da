"""The colocated vLLM backend against tether's own scoring (docs/sampling.md), on CPU.

One engine per module (building it takes ~20 s on two cores, its first generation ~10 s more)."""

import copy

import pytest
import torch

from tether.engine import generate, score
from tether.errors import UserError
from tether.generation import make_backend
from tether.groups import SamplingSettings
from tether.modeling import forward_completion, load_causal_lm, load_tokenizer
from tether.reference import FrozenReference

from conftest import f32_tol  # tests_vllm/conftest.py re-exports tests/conftest.py's

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl",
    "Tom was",
    "The sun was",
    "Lily saw a",
    "The cat",
    "In the park,",
]
TAU = 0.8  # a temperature != 1: the engine's processed log-probs are of softmax(z/τ), tether scores the same


@pytest.fixture(scope="module")
def setup(small_model_dir):
    tok = load_tokenizer(small_model_dir)
    policy = load_causal_lm(small_model_dir)
    backend = make_backend("vllm", policy, max_model_len=128, kv_cache_bytes=32 << 20)
    return tok, policy, backend, [tok.encode(p) for p in PROMPTS]


def _agreement(policy, backend, smp):
    """(max |engine - tether| log-prob, tolerance). tether's log-probs are ``engine.score``'s (what the
    trainers use); log π^τ(y) = z_y/τ - logsumexp(z/τ) is a difference of two terms, each carrying
    float32 rounding of its magnitude from a different kernel (oneDNN in vLLM, torch here), so the
    tolerance is f32_tol of the largest |z_y/τ| and |logsumexp| (8 spacings each)."""
    sc = score(policy, FrozenReference(copy.deepcopy(policy)), smp, sampling=smp.sampling)
    mask = smp.mask.cpu()
    with torch.no_grad():
        logits, _ = forward_completion(policy, smp.batch, filters=smp.sampling)  # (B, T, V), divided by τ
    lse = torch.logsumexp(logits.float(), -1)[mask]
    z_y = logits.float().gather(-1, smp.batch.completion_ids[..., None]).squeeze(-1)[mask]
    diff = (sc.logps.cpu()[mask] - backend.last_logps[mask]).abs().max().item()
    return diff, f32_tol(z_y.abs().max(), lse.abs().max())


def test_logps_agree_before_and_after_a_weight_push(setup):
    tok, policy, backend, prompts = setup
    gen = torch.Generator().manual_seed(0)
    smp = generate(
        policy, prompts, tokenizer=tok, sampling={"temperature": TAU}, max_new_tokens=16, generator=gen, backend=backend
    )
    assert smp.batch.allowed is None  # no filter: F_t is the whole vocabulary at sampling and at scoring
    diff, tol = _agreement(policy, backend, smp)
    assert diff <= tol, (diff, tol)

    moved = copy.deepcopy(policy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    stale = generate(
        moved, prompts, tokenizer=tok, sampling={"temperature": TAU}, max_new_tokens=16, generator=gen, backend=backend
    )  # engine still holds the old weights: its log-probs must not match `moved`
    assert _agreement(moved, backend, stale)[0] > 1e-2
    backend.update_weights(moved)
    fresh = generate(
        moved, prompts, tokenizer=tok, sampling={"temperature": TAU}, max_new_tokens=16, generator=gen, backend=backend
    )
    diff, tol = _agreement(moved, backend, fresh)
    assert diff <= tol, (diff, tol)
    backend.update_weights(policy)  # back, for the other tests


def test_seeded_by_tethers_generator_and_global_rng_untouched(setup):
    tok, policy, backend, prompts = setup
    s = SamplingSettings(max_new_tokens=8, temperature=1.0)
    ids = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    state = torch.random.get_rng_state()
    a, _ = backend.generate(prompts, s, torch.Generator().manual_seed(5), **ids)
    b, _ = backend.generate(prompts, s, torch.Generator().manual_seed(5), **ids)
    c, _ = backend.generate(prompts, s, torch.Generator().manual_seed(6), **ids)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_eos_ends_a_completion_and_counts(setup):
    """Weights that emit EOS first with probability ~1: every layer's output projections zeroed, so the
    last hidden state is the input embedding; embedding dimension 0 set to 10 (others ~N(0, 0.02²)),
    so after the final RMSNorm h_0 ≈ √128 ≈ 11.3 > 0; lm_head zero except W[eos, 0] = 50, so
    z_eos ≈ 566 and every other logit is 0. Every completion is then exactly [eos], counted, not truncated."""
    tok, policy, backend, prompts = setup
    forced = copy.deepcopy(policy)
    with torch.no_grad():
        for layer in forced.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        forced.model.embed_tokens.weight[:, 0] = 10.0
        forced.model.norm.weight.fill_(1.0)
        forced.lm_head.weight.zero_()
        forced.lm_head.weight[tok.eos_token_id, 0] = 50.0
    backend.update_weights(forced)
    try:
        s = SamplingSettings(max_new_tokens=8)
        batch, no_eos = backend.generate(
            prompts, s, torch.Generator().manual_seed(0), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id
        )
        full, full_no_eos = backend.generate(
            prompts, s, torch.Generator().manual_seed(0), pad_id=tok.pad_token_id, eos_id=None
        )  # no stop: vLLM's EOS rule is off
    finally:
        backend.update_weights(policy)
    assert batch.mask.shape == (len(prompts), 1) and bool(batch.mask.all())
    assert batch.completion_ids[:, 0].tolist() == [tok.eos_token_id] * len(prompts)
    assert not bool(no_eos.any())
    assert full.mask.shape == (len(prompts), 8) and bool(full.mask.all()) and bool(full_no_eos.all())
    assert bool((full.completion_ids == tok.eos_token_id).all())


def test_filters_and_unsupported_model_refused(setup, stories_path):
    tok, policy, backend, prompts = setup
    with pytest.raises(UserError, match="top_k"):
        generate(policy, prompts, tokenizer=tok, sampling={"top_k": 5}, max_new_tokens=4, seed=0, backend=backend)
    with pytest.raises(UserError, match=r"head size 8,.*use backend=builtin"):
        make_backend("vllm", load_causal_lm(stories_path))


def test_behaviour_logps_are_the_engines_and_the_mismatch_is_float_rounding(setup):
    """The batch carries the engine's own log-probs as log μ (``batch.behaviour_logps``: what the trainers'
    ``mismatch/*`` and ``behaviour_correction`` read), and in float32 the mismatch against tether's scoring
    is rounding only: each token within ``_agreement``'s tolerance, so each sequence's k1 sum within T
    times it, k3 (≈ lr²/2) below that, every ratio π_old/μ within 2·tol of 1 (e^tol - 1 < 2·tol), and no
    correction cuts anything at C = 2."""
    from tether.ops.behaviour import CORRECTION_NAMES, correction_weights, mismatch_stats

    tok, policy, backend, prompts = setup
    smp = generate(
        policy,
        prompts,
        tokenizer=tok,
        sampling={"temperature": TAU},
        max_new_tokens=16,
        generator=torch.Generator().manual_seed(2),
        backend=backend,
    )
    mu = smp.batch.behaviour_logps
    assert mu is not None and torch.equal(mu.cpu(), backend.last_logps)
    _, tol = _agreement(policy, backend, smp)
    old = score(policy, FrozenReference(copy.deepcopy(policy)), smp, sampling=smp.sampling).logps
    mask = smp.mask.to(old.device)
    mu = mu.to(old.device)
    for name in CORRECTION_NAMES:
        assert not correction_weights(old, mu, mask, correction=name, cap=2.0).cut.any(), name
    s, c = mismatch_stats(old, mu, mask, correction_weights(old, mu, mask, correction="token_tis", cap=2.0))
    m = {k: s[k] / c[k] for k in s}
    T = mask.shape[1]
    assert abs(m["mismatch/kl_k1"]) <= T * tol and abs(m["mismatch/kl_k3"]) <= T * tol, (m, tol)
    for k in ("mismatch/ratio_min", "mismatch/ratio_max", "mismatch/weight_mean"):
        assert abs(m[k] - 1.0) <= 2 * tol, (k, m[k], tol)
    assert m["mismatch/cut_token_frac"] == 0.0
