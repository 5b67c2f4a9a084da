"""The KL under temperature, top-k and top-p (docs/theory.md §3): the sampler stores the token set F_t
it allowed; the policy is scored as π^{τ,F} = softmax(logits/τ) restricted to the stored F_t, the
reference as the fixed process π^τ_ref (same τ, whole vocabulary). Every scored token is finite (a
re-filter at scoring time can drop a sampled token and score it -inf). A model against itself gives
exactly 0 at any temperature without top-k/top-p, and exactly the filter cost E Σ_t -log π^τ_ref(F_t)
with them; its KL to the restricted reference is exactly 0."""

import math

import pytest
import torch

from tether.engine import generate_batches, measure, score
from tether.modeling import completion_logits, completion_logps, load_causal_lm, make_batch, with_allowed
from tether.ops.kl import ESTIMATOR_NAMES, seq_sum
from tether.ops.logprobs import (
    allowed_set,
    apply_sampling_filters,
    entropy_from_logits,
    exact_kl_from_logits,
    pack_allowed,
    selective_logps,
    unpack_allowed,
)
from tether.reference import FrozenReference
from tether.sampling import sample

from conftest import f32_tol

SETTINGS = {
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 20},
    "top_p": {"top_p": 0.9},
    "combined": {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
}
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy"]


def _prompt_ids(tok, prompts=PROMPTS):
    return [tok(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def perturbed(stories_path):
    """stories260K + N(0, 0.01²) on every weight (seeded): KL to the original ≈ 6 nats over 32 tokens."""
    model = load_causal_lm(stories_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model


# ---- packing ----------------------------------------------------------------------------------------


def test_pack_bit_order_by_hand():
    """Token 8i + j is bit j (least significant first) of byte i: tokens {0, 2, 8} of V = 9 ->
    byte 0 = 2^0 + 2^2 = 5, byte 1 = 2^0 = 1."""
    m = torch.zeros(9, dtype=torch.bool)
    m[[0, 2, 8]] = True
    assert pack_allowed(m).tolist() == [5, 1]
    assert unpack_allowed(torch.tensor([5, 1], dtype=torch.uint8), 9).nonzero().flatten().tolist() == [0, 2, 8]


@pytest.mark.parametrize("V", [1, 7, 8, 9, 512, 1001])
def test_pack_unpack_round_trip(V):
    g = torch.Generator().manual_seed(V)
    m = torch.rand(3, 5, V, generator=g) < 0.3
    packed = pack_allowed(m)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, math.ceil(V / 8))
    assert torch.equal(unpack_allowed(packed, V), m)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_allowed(packed, V + 8)


def test_stored_set_replaces_top_k_top_p():
    """With ``allowed`` the filter is the stored set whatever top_k/top_p say; computed from the same
    logits it equals the recomputed filter, bool or packed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, generator=g)
    ref = apply_sampling_filters(x, temperature=0.7, top_k=5, top_p=0.8)
    a = allowed_set(x, temperature=0.7, top_k=5, top_p=0.8)
    assert torch.equal(apply_sampling_filters(x, temperature=0.7, allowed=a), ref)
    assert torch.equal(apply_sampling_filters(x, temperature=0.7, top_k=1, allowed=pack_allowed(a)), ref)
    with pytest.raises(ValueError, match="does not match"):
        apply_sampling_filters(x, allowed=a[:, :2])


def test_shared_minus_inf_pattern_is_finite_in_value_and_gradient():
    """Policy and reference restricted to the same F = {0, 1, 3} of V = 5 at τ = 0.7. Hand values on F:
    p = softmax(x_F/τ), q = softmax(y_F/τ); KL[p‖q] = Σ_F p log(p/q), H = -Σ_F p log p,
    log p(token 1). Gradients equal those of the hand formulas on the sub-vectors and are exactly 0
    outside F; nothing is NaN although log p = log q = -inf outside F."""
    x = torch.tensor([[[1.0, -0.5, 2.0, 0.3, -1.0]]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[[0.2, 0.4, -1.0, 1.5, 0.0]]], dtype=torch.float64, requires_grad=True)
    F = torch.tensor([True, True, False, True, False])
    allowed = pack_allowed(F.expand(1, 1, 5))
    px = apply_sampling_filters(x, temperature=0.7, allowed=allowed)
    qy = apply_sampling_filters(y, temperature=0.7, allowed=allowed)
    kl = exact_kl_from_logits(px, qy)
    ent = entropy_from_logits(px)
    lp = selective_logps(px, torch.tensor([[1]]))
    gx, gy = torch.autograd.grad(kl.sum() + ent.sum() + lp.sum(), [x, y])

    xs, ys = x.detach()[0, 0, F].requires_grad_(), y.detach()[0, 0, F].requires_grad_()
    lpx, lqy = torch.log_softmax(xs / 0.7, -1), torch.log_softmax(ys / 0.7, -1)
    hand_kl = (lpx.exp() * (lpx - lqy)).sum()
    hand_ent = -(lpx.exp() * lpx).sum()
    hand = hand_kl + hand_ent + lpx[1]
    hx, hy = torch.autograd.grad(hand, [xs, ys])
    assert kl.item() == pytest.approx(hand_kl.item(), rel=1e-13)
    assert ent.item() == pytest.approx(hand_ent.item(), rel=1e-13)
    assert lp.item() == pytest.approx(lpx[1].item(), rel=1e-13)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    torch.testing.assert_close(gx[0, 0, F], hx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy[0, 0, F], hy, rtol=1e-12, atol=1e-14)
    assert gx[0, 0, ~F].abs().max() == 0 and gy[0, 0, ~F].abs().max() == 0
    # the same model on both sides: exactly 0, with exactly zero gradient
    same = exact_kl_from_logits(px, apply_sampling_filters(x, temperature=0.7, allowed=allowed))
    assert same.item() == 0.0


# ---- the sampler records F_t ------------------------------------------------------------------------


def test_sampler_records_the_allowed_sets(stories):
    """top_k = k: exactly k allowed tokens at every sampled position (fp32 logits: no ties here), the
    sampled token among them; positions after EOS allow everything. No filter: nothing stored."""
    tok, model = stories
    ids = _prompt_ids(tok) * 2
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model,
        ids,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=24,
        generator=g,
        top_k=7,
        temperature=0.8,
    )
    V = model.config.vocab_size
    assert (
        b.allowed is not None
        and b.allowed.dtype == torch.uint8
        and b.allowed.shape == (*b.mask.shape, math.ceil(V / 8))
    )
    a = unpack_allowed(b.allowed, V)  # (B, T, V)
    picked = a.gather(-1, b.completion_ids[..., None])[..., 0]
    assert picked[b.mask].all()
    assert (a.sum(-1)[b.mask] == 7).all()
    assert a[~b.mask].all()
    # the set is the fp32 top-7 of the policy's own (full-pass) logits, up to ranking changes near the boundary
    top = completion_logits(model, b).topk(7, dim=-1).indices
    same = torch.zeros_like(a).scatter(-1, top, True)
    assert (same == a).all(-1)[b.mask].float().mean() > 0.99
    b2, _ = sample(
        model, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=4, generator=g, top_p=0.9
    )
    a2 = unpack_allowed(b2.allowed, V)
    assert a2.gather(-1, b2.completion_ids[..., None])[..., 0][b2.mask].all()
    b3, _ = sample(
        model, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=4, generator=g, temperature=0.7
    )
    assert b3.allowed is None
    assert b.select(slice(1, 3)).allowed.shape[0] == 2 and b.to("cpu").allowed is not None


def test_bf16_scoring_has_no_minus_inf(stories_path):
    """stories260K in bf16, top_k = 20, top_p = 0.9, 64 x 48 sampled tokens. Re-running the filter on the
    bf16 full-pass logits (the old scorer) loses sampled tokens at the top-k/top-p boundary (they score
    -inf; 138 of 73,728 tokens at this rate in a longer run); with the stored sets no policy or
    reference log-prob, and no KL estimate, is -inf or NaN."""
    from tether.modeling import load_tokenizer

    tok = load_tokenizer(stories_path)
    model = load_causal_lm(stories_path, dtype="bfloat16")
    reference = FrozenReference(load_causal_lm(stories_path, dtype="bfloat16"))
    f = {"top_k": 20, "top_p": 0.9}
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model,
        _prompt_ids(tok) * 16,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=48,
        generator=g,
        **f,
    )
    raw = completion_logits(model, b)  # (B, T, V) bf16, τ = 1, unfiltered
    old = selective_logps(apply_sampling_filters(raw, **f), b.completion_ids)  # the old scorer's re-filter
    n_old = int((torch.isinf(old) & b.mask).sum())
    assert n_old > 0, "the re-filter hazard is absent on this batch: the test would not discriminate"
    lp = completion_logps(model, b, **f)
    ref_lp = reference.logps(b, filters=f)
    assert torch.isfinite(lp[b.mask]).all() and torch.isfinite(ref_lp[b.mask]).all(), n_old
    sc = score(model, reference, b, sampling=f, estimators=ESTIMATOR_NAMES)
    for name in ESTIMATOR_NAMES:
        assert torch.isfinite(sc.kl[name]).all(), name
    restricted = score(model, reference, b, sampling=f, estimators=ESTIMATOR_NAMES, reference_filter="restricted")
    for name in ("k1", "k2", "k3", "exact"):  # bf16 model against its bf16 copy, the filter cost taken out
        assert restricted.seq(name).tolist() == [0.0] * b.mask.shape[0], name


# ---- a model against itself: 0 without top-k/top-p, the filter cost with them ------------------------


def _seq_cost_tol() -> float:
    """float32 rounding of a sequence sum of per-token log-ratios (|log p| ≲ 10 nats over ≤ 16 tokens):
    k1_t = log p(y) - log q(y) and the cost -log m_t = lse(all) - lse(F) are the same number computed
    through different logsumexps; 16 tokens x logits of magnitude ~20 bound the difference."""
    return f32_tol(16 * 20.0)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_model_against_its_copy_is_its_filter_cost(stories, stories_path, setting):
    """stories260K against a second loaded copy of itself at τ = 0.7, top_k = 20, top_p = 0.9 and all
    three. Temperature alone: every estimator exactly 0.0 (the reference is tempered too; before that,
    1.99-2.2 nats/seq). With top-k/top-p the sampled policy differs from the fixed reference π^τ_ref by
    the filter alone: k1 = exact = the filter cost per sequence (k1_t = -log m_t on every token), the
    cost is > 0, and the KL to the restricted reference is exactly 0 with every estimator."""
    tok, model = stories
    reference = FrozenReference(load_causal_lm(stories_path))
    f = SETTINGS[setting]
    res = measure(
        model, reference, _prompt_ids(tok), tokenizer=tok, samples_per_prompt=2, max_new_tokens=16, seed=0, sampling=f
    )
    if "top_k" not in f and "top_p" not in f:
        for name, v in res["estimators"].items():
            assert v["mean"] == 0.0 and v["stderr"] == 0.0, (name, v)
        assert res["token_mean"] == 0.0 and res["filter_cost"]["mean"] == 0.0
        return
    cost = res["filter_cost"]["mean"]
    assert cost > 0.05, res["filter_cost"]
    for name in ("k1", "exact"):
        assert res["estimators"][name]["mean"] == pytest.approx(cost, abs=_seq_cost_tol()), name
    assert res["estimators"]["k3"]["mean"] < cost  # k3 undercounts by Σ_t (1 - m_t) ≤ Σ_t -log m_t
    (smp,) = generate_batches(
        model,
        _prompt_ids(tok),
        tokenizer=tok,
        sampling=f,
        max_new_tokens=16,
        batch_size=8,
        seed=0,
        samples_per_prompt=2,
    )
    restricted = score(model, reference, smp, estimators=ESTIMATOR_NAMES, reference_filter="restricted")
    for name in ESTIMATOR_NAMES:
        assert restricted.seq(name).abs().max() == 0, name


def test_cli_model_against_itself_reports_the_filter_cost(tmp_path, stories_path, capsys):
    import json

    from tether.commands.kl import main as kl_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "kl.json"
    assert (
        kl_main(
            [
                "--policy",
                stories_path,
                "--reference",
                stories_path,
                "--prompts",
                str(prompts),
                "--samples",
                "2",
                "--max_new_tokens",
                "16",
                "--temperature",
                "0.7",
                "--top_k",
                "20",
                "--top_p",
                "0.9",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    cost = res["filter_cost"]["mean"]
    assert cost > 0.05
    for name in ("k1", "exact"):  # a model against itself under filters: its KL is the filter cost
        assert res["estimators"][name]["mean"] == pytest.approx(cost, abs=_seq_cost_tol()), name
    text = capsys.readouterr().out
    assert "filter cost:" in text and "a model against itself has exactly this KL" in text
    assert "KL without it (to the reference restricted to the sampled sets): 0.00000" in text
    assert (
        kl_main(
            [
                "--policy",
                stories_path,
                "--reference",
                stories_path,
                "--prompts",
                str(prompts),
                "--samples",
                "2",
                "--max_new_tokens",
                "16",
                "--temperature",
                "0.7",
            ]
        )
        == 0
    )
    assert "filter cost" not in capsys.readouterr().out  # no top-k/top-p: no cost, no line


def test_batch_without_stored_sets_falls_back_to_the_policys_fp32_filter(stories, stories_path):
    """A batch not from the sampler (make_batch: allowed None): the policy recomputes F_t in fp32; the
    reference is never filtered (π^τ_ref), and the restricted form uses the *policy's* sets — never
    the reference's own top-k. with_allowed attaches the policy's sets to a batch."""
    tok, model = stories
    reference = FrozenReference(load_causal_lm(stories_path))
    ids = _prompt_ids(tok)
    g = torch.Generator().manual_seed(1)
    sampled, _ = sample(
        model, ids, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12, generator=g, top_k=20
    )
    comps = [sampled.completion_ids[i][sampled.mask[i]].tolist() for i in range(len(ids))]
    b = make_batch(ids, comps, pad_id=tok.pad_token_id)
    f = {"temperature": 0.7, "top_k": 20}
    assert not torch.isinf(reference.logits(b, filters=f)).any()  # π^τ_ref: tempered, whole vocabulary
    sc = score(model, reference, b, sampling=f, estimators=ESTIMATOR_NAMES, reference_filter="restricted")
    assert all(sc.seq(n).abs().max() == 0 for n in ("k1", "k2", "k3", "exact"))
    assert (sc.filter_cost[b.mask] >= 0).all() and sc.filter_cost[b.mask].sum() > 1e-3  # top-20 of 512 leaves mass out
    logits = completion_logits(model, b, **f)
    assert torch.equal(unpack_allowed(with_allowed(b, logits).allowed, logits.shape[-1]), logits > float("-inf"))


def test_every_reference_form_scores_with_the_same_temperature_and_stored_sets(stories):
    """copy, offload, sync, lora (adapters off) and lora-sync (a second adapter at zero delta) of the
    same weights all return the fixed reference π^τ_ref on a sampled top-k/top-p batch: the logits
    divided by τ over the whole vocabulary (no -inf: the stored F_t restricts the policy only).
    precomputed refuses τ ≠ 1 (it holds τ = 1 log-probs only)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tether.reference import (
        LoraDisabledReference,
        LoraSyncedReference,
        OffloadedReference,
        PrecomputedReference,
        SyncedReference,
    )

    tok, model = stories
    f = SETTINGS["combined"]
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model, _prompt_ids(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=10, generator=g, **f
    )
    want = completion_logits(model.eval(), b, temperature=f["temperature"])  # (B, T, V) π^τ_ref, unfiltered
    lora = lambda: get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))  # noqa: E731
    forms = {
        "copy": FrozenReference(copy.deepcopy(model)),
        "offload": OffloadedReference(copy.deepcopy(model), compute_device="cpu"),
        "sync": SyncedReference(copy.deepcopy(model), mode="hard", every=10),
        "lora": LoraDisabledReference(lora()),
        "lora-sync": LoraSyncedReference(lora(), mode="hard", every=10),
    }
    assert not unpack_allowed(b.allowed, want.shape[-1])[b.mask].all()  # the filter did remove tokens
    for name, ref in forms.items():
        got = ref.logits(b, filters=f)
        assert not torch.isinf(got).any(), name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)  # peft's extra matmul rounds
        torch.testing.assert_close(ref.logps(b, filters=f), completion_logps(None, b, logits=want), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="live reference"):
        PrecomputedReference({}).logps(b, ids=[0, 1, 2, 3], filters=f)


# ---- a perturbed copy: k1 and exact agree; k3 undercounts by the reference mass outside F_t -------------


def test_perturbed_copy_at_top_k_k1_and_exact_agree_and_k3_undercounts(stories, stories_path, perturbed):
    """π_θ = perturbed copy, π_ref = stories260K, top_k = 20, 4 x 32 samples of 32 tokens. k1 and exact
    both estimate KL[π^F_θ‖π_ref] (the fixed reference) on the same samples: they agree within 4 combined
    standard errors (conservative: the samples are shared, so the difference's error is smaller).

    With p = π^F_θ, q̃ = π_ref (unfiltered), m_t = q̃(F_t) and q = q̃/m_t on F_t (the restricted
    reference; docs/theory.md §3), per sequence:
      exact(q̃) - exact(q) = Σ_t -log m_t = the scorer's filter_cost   (an identity, checked to fp32 rounding)
      E[k3(q̃)] = KL[p‖q̃] - Σ_t (1 - m_t)                          (k3 undercounts by the missing mass)"""
    tok, _ = stories
    reference = FrozenReference(load_causal_lm(stories_path))
    f = {"top_k": 20}
    res = measure(
        perturbed,
        reference,
        _prompt_ids(tok),
        tokenizer=tok,
        samples_per_prompt=32,
        max_new_tokens=32,
        seed=0,
        sampling=f,
    )
    est = res["estimators"]
    ex = est["exact"]
    assert 0.5 < ex["mean"] < 30.0, ex
    tol = 4 * math.sqrt(est["k1"]["stderr"] ** 2 + ex["stderr"] ** 2)
    assert abs(est["k1"]["mean"] - ex["mean"]) < tol, (est["k1"], ex, tol)

    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        perturbed,
        _prompt_ids(tok) * 32,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=32,
        generator=g,
        **f,
    )
    sc = score(perturbed, reference, b, sampling=f, estimators=("k3", "exact"))
    rs = score(perturbed, reference, b, sampling=f, estimators=("exact",), reference_filter="restricted")
    with torch.no_grad():
        unf = reference.logits(b)  # (B, T, V) q̃: τ = 1, whole vocabulary
    m = (torch.softmax(unf.float(), -1) * unpack_allowed(b.allowed, unf.shape[-1])).sum(-1)  # (B, T) q̃(F_t)
    cost = sc.seq("exact") - rs.seq("exact")  # (B,)
    # fp32 sums of 32 per-token terms of magnitude ≲ 20 nats (the logits), several spacings each
    torch.testing.assert_close(cost, (-(m.log()) * b.mask).sum(-1), rtol=0, atol=f32_tol(32 * 20.0))
    torch.testing.assert_close(cost, seq_sum(sc.filter_cost, b.mask), rtol=0, atol=f32_tol(32 * 20.0))
    missing = ((1 - m) * b.mask).sum(-1)  # (B,)
    unbiased = (sc.seq("k3") - (sc.seq("exact") - missing)).double()
    assert abs(unbiased.mean()) < 4 * unbiased.std() / math.sqrt(unbiased.numel()), (
        sc.seq("k3").mean(),
        missing.mean(),
    )
    bias = (sc.seq("exact") - sc.seq("k3")).double()
    assert bias.mean() > 3 * bias.std() / math.sqrt(bias.numel()), (bias.mean(), missing.mean())


# ---- the online rollout ---------------------------------------------------------------------------------


def test_rollout_scores_step0_kl_is_the_filter_cost_and_clamp_mask_is_returned(stories, stories_path, perturbed):
    """Policy against its own copy under τ = 0.7, top_k = 20, top_p = 0.9: old_logps finite; the exact
    KL is the filter cost token by token; with the restricted reference every KL is exactly 0 and
    ref_logps = logps exactly. A perturbed policy with clamp_output = 0.05 on k3: kl_tokens = min(k3, 0.05) and
    ``kl_clamped`` marks exactly the counted tokens whose k3 exceeded it; kl_exact is not clamped."""
    tok, model = stories
    f = SETTINGS["combined"]
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model, _prompt_ids(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=16, generator=g, **f
    )
    reference = FrozenReference(load_causal_lm(stories_path))
    out = score(model, reference, b, sampling=f, estimators=("k3",), chunk=3)  # what collect_rollout scores with
    assert out.kl_clamped is None
    assert torch.isfinite(out.logps).all() and (out.logps[b.mask] <= 0).all()  # 0: a one-token F_t
    # per token: Σ_F p (log p - log q̃) with p = q̃/m on F is -log m, through two logsumexps of logits ≲ 20
    torch.testing.assert_close(out.kl_exact, out.filter_cost, rtol=0, atol=f32_tol(20.0))
    assert (out.filter_cost[b.mask] >= 0).all() and out.filter_cost[b.mask].sum() > 0
    same = score(model, reference, b, sampling=f, estimators=("k3",), chunk=3, reference_filter="restricted")
    assert same.kl["k3"].abs().max() == 0 and torch.equal(same.logps, same.ref_logps)
    assert torch.equal(same.kl_exact, out.kl_exact)  # kl/ref is always the fixed reference's

    pb, _ = sample(
        perturbed,
        _prompt_ids(tok),
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=16,
        generator=g,
        **f,
    )
    free = score(perturbed, reference, pb, sampling=f, estimators=("k3",), chunk=4)
    clamped = score(perturbed, reference, pb, sampling=f, estimators=("k3",), chunk=4, clamp_output=0.05)
    over = (free.kl["k3"] > 0.05) & pb.mask
    assert 0 < over.sum() < pb.mask.sum()
    assert torch.equal(clamped.kl_clamped["k3"], over)
    torch.testing.assert_close(clamped.kl["k3"], free.kl["k3"].clamp(max=0.05), rtol=0, atol=0)
    assert torch.equal(clamped.kl_exact, free.kl_exact)


def test_loss_side_policy_stays_finite_after_the_policy_moves(stories, perturbed):
    """The loss scores the *updated* π_θ on the rollout's tokens with the stored F_t (groups.sampling_settings):
    every log-prob finite and differentiable. Re-running top-k on the moved policy would drop some
    sampled tokens (-inf, ratio 0) — the reason the loss used to skip top-k/top-p altogether."""
    from tether.groups import sampling_settings  # what online.optimise passes to the loss's forward
    from tether.modeling import forward_completion

    tok, model = stories
    f = {"temperature": 0.9, "top_k": 5}
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model,
        _prompt_ids(tok) * 2,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=24,
        generator=g,
        **f,
    )
    from tether.trainers.ppo import PPOConfig

    loss_filters = sampling_settings(PPOConfig(**f))
    assert loss_filters.filters() == {"temperature": 0.9, "top_k": 5, "top_p": 1.0}
    refiltered = completion_logps(perturbed, make_batch(*_rows(b), pad_id=tok.pad_token_id), **f)
    assert torch.isinf(refiltered[b.mask]).any()  # the hazard, with a re-filter
    perturbed.zero_grad()
    with torch.enable_grad():
        logits, _ = forward_completion(perturbed, b, filters=loss_filters)
        lp = selective_logps(logits, b.completion_ids).masked_fill(~b.mask, 0.0)
        assert torch.isfinite(lp).all()
        lp.sum().backward()
    grads = [p.grad for p in perturbed.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    perturbed.zero_grad(set_to_none=True)


def _rows(b):
    P = b.prompt_len
    prompts = [b.input_ids[i, :P][b.attention_mask[i, :P].bool()].tolist() for i in range(b.mask.shape[0])]
    comps = [b.completion_ids[i][b.mask[i]].tolist() for i in range(b.mask.shape[0])]
    return prompts, comps
