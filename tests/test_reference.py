"""The reference model in every form: same ref_logps, never trained, synced only when asked."""

import copy

import pytest
import torch

from tether.modeling import completion_logps, make_batch
from tether.reference import (
    REF_ADAPTER,
    FrozenReference,
    LoraDisabledReference,
    LoraSyncedReference,
    OffloadedReference,
    PrecomputedReference,
    SyncedReference,
    build_reference,
)

from conftest import assert_close, f32_tol, logit_magnitude

PROMPTS = ["Once upon a time", "The little dog", "Lily"]
COMPLETIONS = [" there was a big cat.", " ran to the park and played", " smiled"]


@pytest.fixture(scope="module")
def batch_rows(stories):
    tok, _ = stories
    rows = []
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        p_ids = tok(p)["input_ids"]
        c_ids = tok(p + c)["input_ids"][len(p_ids) :]
        rows.append((i, p_ids, c_ids))
    batch = make_batch([r[1] for r in rows], [r[2] for r in rows], pad_id=tok.pad_token_id)
    return rows, batch


def _lora(model, r=4):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    # Make the adapter non-trivial (peft initialises B = 0): the reference must still ignore it.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return m


def test_every_form_gives_the_same_ref_logps(stories, batch_rows, tmp_path):
    tok, model = stories
    rows, batch = batch_rows
    expected = completion_logps(model.eval(), batch)  # (B, T) the model itself, no grad needed
    forms = {
        "copy": FrozenReference(copy.deepcopy(model)),
        "offload": OffloadedReference(copy.deepcopy(model), compute_device="cpu"),
        "sync": SyncedReference(copy.deepcopy(model), mode="hard", every=10),
        "lora": LoraDisabledReference(_lora(model)),
    }
    forms["precomputed"] = PrecomputedReference.build(
        forms["copy"], model, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path, batch_size=2
    )
    # fp32 attention over padded rows (batch of 2 vs 3 in the precomputed form, peft's extra matmul in
    # the lora form) reorders sums: a token's log-prob (logit - logsumexp) carries a few float32
    # spacings of the dot products its logits are accumulated from.
    tol = f32_tol(2 * logit_magnitude(model, batch.input_ids, attention_mask=batch.attention_mask))
    for name, ref in forms.items():
        got = ref.logps(batch, ids=[r[0] for r in rows])
        assert_close(got, expected.detach(), abs=tol, what=f"form {name}")
        assert not got.requires_grad
    # The lora form is the adapted policy with adapters off: the adapted policy itself differs.
    lora_policy = forms["lora"].model
    assert (completion_logps(lora_policy.eval(), batch) - expected).abs().max() > 1e-2


def test_precomputed_cache_is_keyed_by_model_and_data(stories, batch_rows, tmp_path):
    tok, model = stories
    rows, batch = batch_rows
    ref = FrozenReference(copy.deepcopy(model))
    a = PrecomputedReference.build(ref, model, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path)
    b = PrecomputedReference.build(ref, model, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path)
    assert a.path == b.path and len(list(tmp_path.glob("*.safetensors"))) == 1  # second call read the cache
    # Different data -> different file; different weights -> different file.
    c = PrecomputedReference.build(ref, model, rows[:2], pad_id=tok.pad_token_id, cache_dir=tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.01)
    d = PrecomputedReference.build(FrozenReference(other), other, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path)
    assert len({a.path, c.path, d.path}) == 3
    assert (d.logps(batch, ids=[0, 1, 2]) - a.logps(batch, ids=[0, 1, 2])).abs().max() > 1e-4
    with pytest.raises(ValueError, match="exact KL estimator"):
        a.logits(batch)
    with pytest.raises(KeyError, match="not in the precomputed"):
        a.logps(batch, ids=[0, 1, 99])


def test_precomputed_packed_pass_equals_the_padded_pass(stories, tmp_path):
    """The cache built padding-free (``packed=True``: rows packed into shared rows like DPO training, no
    attention mask, restarting positions) holds the padded pass's per-token log-probs: 14 rows of 1-17
    completion tokens after 2-6 prompt tokens, 5 rows per pass (so packs and paddings both differ).
    Tolerance: a log-prob is z_y - logsumexp(z) with logits z = W h, so rounding scales with the
    largest Σ_i |h_i W_vi| over the rows; 16 float32 spacings of it because five layers of
    differently-ordered sums (packed rows, other widths) feed h."""
    from conftest import f32_tol

    torch.set_num_threads(1)
    tok, model = stories
    model.eval()
    texts = ["Once upon a time", "The dog", "Lily and Tom went to", "A", "The big red ball was"]
    rows = []
    for i in range(14):
        p_ids = tok(texts[i % len(texts)])["input_ids"]
        c_ids = tok(" there was a little girl who liked to play in the sun with her cat", add_special_tokens=False)[
            "input_ids"
        ]
        rows.append((100 + i, p_ids, c_ids[: 1 + (5 * i) % 17]))
    ref = FrozenReference(copy.deepcopy(model))
    padded = PrecomputedReference.build(
        ref, model, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path / "a", batch_size=5
    )
    packed = PrecomputedReference.build(
        ref, model, rows, pad_id=tok.pad_token_id, cache_dir=tmp_path / "b", batch_size=5, packed=True
    )
    batch = make_batch([r[1] for r in rows], [r[2] for r in rows], pad_id=tok.pad_token_id)
    with torch.no_grad():
        h = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
    mag = float((h.abs() @ model.lm_head.weight.abs().t()).max())
    for rid, _, comp in rows:
        a, b = padded.table[rid], packed.table[rid]
        assert a.shape == b.shape == (len(comp),)
        assert float((a - b).abs().max()) <= f32_tol(mag, ulps=16), rid
    assert float((padded.table[100] - packed.table[101][:1]).abs().max()) > 1e-3  # rows are not all alike


def test_reference_never_receives_gradients_or_changes(stories, batch_rows):
    _, model = stories
    _, batch = batch_rows
    policy = copy.deepcopy(model).train()
    ref = build_reference("copy", policy=policy)
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    for step in range(1, 3):
        logps = completion_logps(policy, batch)
        ref_logps = ref.logps(batch)
        loss = -(logps - ref_logps).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert not ref.on_step(policy, step)
    assert all(p.grad is None and not p.requires_grad for p in ref.model.parameters())
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not ref.model.training


def test_lora_reference_restores_train_mode_and_trainable_flags(stories, batch_rows):
    _, model = stories
    _, batch = batch_rows
    policy = _lora(model).train()
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    ref = LoraDisabledReference(policy)
    ref.logps(batch)
    assert policy.training
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags


def test_hard_and_soft_sync(stories):
    _, model = stories
    policy = copy.deepcopy(model)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    hard = SyncedReference(copy.deepcopy(ref_model), mode="hard", every=3)
    assert not hard.on_step(policy, 1) and not hard.on_step(policy, 2)
    w0 = next(hard.model.parameters()).clone()
    assert hard.on_step(policy, 3)
    torch.testing.assert_close(next(hard.model.parameters()), next(policy.parameters()), rtol=0, atol=0)
    assert not torch.equal(w0, next(hard.model.parameters()))

    soft = SyncedReference(copy.deepcopy(ref_model), mode="soft", every=1, alpha=0.25)
    soft.on_step(policy, 1)
    p_ref, p_pol, p_old = next(soft.model.parameters()), next(policy.parameters()), next(ref_model.parameters())
    # θ_ref ← αθ + (1-α)θ_ref with α = 0.25 (TR-DPO soft update); here θ = θ_old + 0.1.
    torch.testing.assert_close(p_ref, 0.25 * p_pol + 0.75 * p_old, rtol=0, atol=1e-6)
    state = soft.state_dict()
    fresh = SyncedReference(copy.deepcopy(ref_model), mode="soft", every=1, alpha=0.25)
    fresh.load_state_dict(state)
    torch.testing.assert_close(next(fresh.model.parameters()), p_ref, rtol=0, atol=0)
    assert fresh.syncs == 1


def test_lora_synced_reference(stories, batch_rows):
    _, model = stories
    _, batch = batch_rows
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ref = LoraSyncedReference(policy, mode="hard", every=2)
    base = completion_logps(model.eval(), batch)
    # Zero delta at start (peft's B = 0): the reference is the base model.
    torch.testing.assert_close(ref.logps(batch), base.detach(), atol=1e-5, rtol=0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n and ".default." in n:
                p.normal_(0, 0.5)
    trained = completion_logps(policy.eval(), batch).detach()
    assert not ref.on_step(policy, 1)
    torch.testing.assert_close(ref.logps(batch), base.detach(), atol=1e-5, rtol=0)  # unchanged until synced
    assert ref.on_step(policy, 2)
    torch.testing.assert_close(ref.logps(batch), trained, atol=1e-5, rtol=0)  # now equals the policy
    # The policy adapter is still the active, trainable one; the reference adapter is frozen.
    assert any(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if f".{REF_ADAPTER}." in n)


def test_lora_reference_memory_overhead(stories):
    """The LoRA-disabled reference costs only the adapters, not a second model copy (measured)."""
    _, model = stories
    policy = _lora(model, r=4)
    n_base = sum(p.numel() for p in model.parameters())
    n_adapter = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    ref = build_reference("lora", policy=policy)
    extra = sum(p.numel() for p in getattr(ref, "model").parameters()) - n_base - n_adapter
    assert extra == 0  # the reference adds no parameters at all
    copy_ref = build_reference("copy", policy=copy.deepcopy(model))
    assert sum(p.numel() for p in copy_ref.model.parameters()) == n_base  # a copy costs the whole model
    assert n_adapter / n_base < 0.05


def test_vocab_mismatch_is_a_clear_error(stories):
    _, model = stories
    other = copy.deepcopy(model)
    other.resize_token_embeddings(600)
    with pytest.raises(ValueError, match="different vocabularies"):
        build_reference("copy", policy=model, reference_model=other)


def test_tokenizer_mismatch_is_a_clear_error(stories, stories_path):
    from tether.modeling import check_compatible, load_tokenizer

    tok, model = stories
    other_tok = load_tokenizer(stories_path)
    other_tok.add_tokens(["<extra_token_a>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_compatible(model, model, tok, other_tok)


def test_unknown_form_and_peft_without_reference(stories):
    _, model = stories
    with pytest.raises(ValueError, match="reference must be one of"):
        build_reference("magic", policy=model)
    with pytest.raises(ValueError, match="needs a peft"):
        build_reference("lora", policy=model)


# ------------------------------------------------------------------ reference_from_config: the one builder


def test_reference_from_config_builds_each_form(stories, stories_path, batch_rows):
    """Each config form gives its class; every loaded reference scores as the starting policy; the
    TR-DPO fields come from a config that has them (DPO) and default for one that does not (PPO)."""
    from tether.reference import reference_from_config
    from tether.trainers.dpo import DPOConfig
    from tether.trainers.ppo import PPOConfig

    tok, model = stories
    _, batch = batch_rows
    expected = completion_logps(model.eval(), batch)
    build = lambda cfg, policy=model, policy_path=stories_path, **kw: reference_from_config(  # noqa: E731
        cfg, policy=policy, tokenizer=tok, policy_path=policy_path, device="cpu", **kw
    )
    dpo = lambda form, **kw: DPOConfig(model=stories_path, reference=form, **kw)  # noqa: E731
    want = {
        "copy": FrozenReference,
        "precomputed": FrozenReference,
        "offload": OffloadedReference,
        "sync": SyncedReference,
    }
    for form, cls in want.items():
        ref = build(dpo(form, ref_sync_mode="soft", ref_sync_every=3, ref_sync_alpha=0.25))
        assert type(ref) is cls, form
        assert ref.model is not model and not ref.model.training
        assert torch.equal(ref.logps(batch), expected.detach()), form  # loaded from disk: the same weights
    assert (ref.mode, ref.every, ref.alpha) == ("soft", 3, 0.25)  # the sync fields of the DPO config
    # reference_model as an asset name, resolved like --model; its tokenizer is checked (same here).
    assert torch.equal(build(dpo("copy", reference_model="stories260K")).logps(batch), expected.detach())
    ref = build(PPOConfig(model=stories_path, reference="offload"), forms=("copy", "lora", "offload"))
    assert type(ref) is OffloadedReference and next(ref.model.parameters()).device.type == "cpu"

    # A LoRA policy: no second model for lora / precomputed / sync; a model loaded from disk for copy.
    peft_forms = {
        "lora": LoraDisabledReference,
        "precomputed": LoraDisabledReference,
        "sync": LoraSyncedReference,
        "copy": FrozenReference,
    }
    for form, cls in peft_forms.items():
        ref = build(dpo(form), policy=_lora(model))
        assert type(ref) is cls, form
        if form != "sync":  # (the synced adapter starts as the policy's, which _lora made non-zero)
            torch.testing.assert_close(ref.logps(batch), expected.detach(), atol=1e-5, rtol=0, msg=form)
    assert build(dpo("sync", ref_sync_every=7), policy=_lora(model)).every == 7
    ref = build(PPOConfig(model=stories_path), policy=model, policy_path=None)  # no path: a deep copy of the policy
    assert type(ref) is FrozenReference and ref.model is not model and torch.equal(ref.logps(batch), expected.detach())


def test_reference_from_config_errors_name_the_field(stories, stories_path, tmp_path):
    from tether.modeling import load_tokenizer
    from tether.reference import reference_from_config
    from tether.trainers.dpo import DPOConfig
    from tether.trainers.ppo import PPOConfig

    tok, model = stories
    build = lambda cfg, policy=model, policy_path=stories_path, **kw: reference_from_config(  # noqa: E731
        cfg, policy=policy, tokenizer=tok, policy_path=policy_path, device="cpu", **kw
    )
    with pytest.raises(
        ValueError,
        match=r"^reference must be one of \('copy', 'lora', 'offload'\), got 'precomputed'; set --reference$",
    ):
        build(PPOConfig(reference="precomputed"), forms=("copy", "lora", "offload"))
    with pytest.raises(ValueError, match=r"^reference must be one of .*'sync'\), got 'mirror'; set --reference$"):
        build(DPOConfig(reference="mirror"))
    with pytest.raises(ValueError, match="needs a peft"):
        build(DPOConfig(reference="lora"))
    with pytest.raises(ValueError, match="reference_model cannot be used with reference='lora'"):
        build(DPOConfig(reference="lora", reference_model=stories_path), policy=_lora(model))
    with pytest.raises(ValueError, match="reference_model cannot be used with reference='sync' and a LoRA policy"):
        build(DPOConfig(reference="sync", reference_model=stories_path), policy=_lora(model))
    with pytest.raises(ValueError, match="load the reference model separately"):  # a LoRA policy cannot be deep-copied
        build(DPOConfig(reference="copy"), policy=_lora(model), policy_path=None)
    other = tmp_path / "other_tokenizer"
    model.save_pretrained(other)
    other_tok = load_tokenizer(stories_path)
    other_tok.add_tokens(["<extra_token_a>"])
    other_tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizers differ"):
        build(DPOConfig(reference="copy", reference_model=str(other)))


def test_only_a_plain_frozen_copy_is_a_static_copy():
    """``static_copy`` (capability, not class name): the forms that hold their own weights, loaded once and never
    written, may be sharded (fsdp) or moved off the accelerator (DPO's eval-only reference). Offloaded copies
    already move, synced ones are written from the policy, ModelReference is the live policy itself."""
    from tether import reference as ref_mod
    from tether.diagnostics.forgetting import ModelReference
    from tether.reference_prompt import PromptMappedReference

    forms = [
        ref_mod.FrozenReference,
        ref_mod.OffloadedReference,
        ref_mod.SyncedReference,
        ref_mod.LoraDisabledReference,
        ref_mod.LoraSyncedReference,
        ref_mod.LaggedReference,
        ref_mod.PrecomputedReference,
        ModelReference,
        PromptMappedReference,
    ]
    assert [f.__name__ for f in forms if f.static_copy] == ["FrozenReference"]
