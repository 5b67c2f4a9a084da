"""The tabular oracle as a Hugging Face causal LM (``tether.oracle.lm``): the shipped scoring, sampling,
packing, loading, LoRA, bf16, reward and critic paths must see exactly the tabular policy.

Problem throughout: ``make_problem(3, 3, n_prompts=2, seed=0)``: V = 3 (eos = 0), T = 3, so S = 7
prefixes and K = 15 sequences per prompt; H = 2·7 + 1 = 15 states; the HF vocabulary is V + P = 5.
"""

import copy
import math

import pytest
import torch

from tether.modeling import (
    completion_logits,
    completion_logps,
    forward_completion,
    load_causal_lm,
    load_tokenizer,
    make_batch,
)
from tether.oracle.lm import (
    PROMPT_LOGIT,
    TabularLM,
    completion_text,
    parse_completion,
    preference_rows,
    prompt_texts,
    reward_function,
    save_tabular_lm,
    tabular_lm,
    tabular_policy,
)
from tether.oracle.tabular import Completions, TabularPolicy, make_problem, reward_of

from conftest import f32_tol

V, T, P = 3, 3, 2


@pytest.fixture(scope="module")
def problem():
    return make_problem(V, T, n_prompts=P, seed=0)


@pytest.fixture(scope="module")
def folder(problem, tmp_path_factory):
    return str(save_tabular_lm(problem, tmp_path_factory.mktemp("tabular_lm")))


@pytest.fixture(scope="module")
def model(folder):
    return load_causal_lm(folder)


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


def all_sequences_batch(space):
    """A ``CompletionBatch`` of every (prompt, complete sequence), with the matching ``Completions``."""
    c = space.all_completions()
    prompts = [[space.vocab_size + int(p)] for p in c.prompt_ids]
    return make_batch(prompts, [c.tokens[i][c.mask[i]].tolist() for i in range(len(prompts))], pad_id=space.eos), c


def as_completions(space, batch) -> Completions:
    """A sampled ``CompletionBatch`` (one-token prompts) back to tabular ``Completions``."""
    tokens = torch.where(batch.mask, batch.completion_ids, space.eos)
    tokens = torch.cat([tokens, torch.full((tokens.shape[0], T - tokens.shape[1]), space.eos)], 1)  # (B, T)
    mask = torch.cat([batch.mask, torch.zeros(tokens.shape[0], T - batch.mask.shape[1], dtype=torch.bool)], 1)
    return Completions(batch.input_ids[:, batch.prompt_len - 1] - space.vocab_size, tokens, mask)


def test_loaded_model_scores_exactly_the_tabular_policy(problem, model):
    """Logits and per-token log-probs of every sequence through ``tether.modeling`` (left-padded prompts,
    ``logits_to_keep``) = ``TabularPolicy.logits`` / ``.logps`` to fp32 rounding (|logit| < 4: 1e-6)."""
    sp = problem.space
    assert isinstance(model, TabularLM) and model.config.hidden_size == P * sp.n_prefixes + 1
    batch, c = all_sequences_batch(sp)
    prompts = [[sp.vocab_size + int(p)] for p in c.prompt_ids]
    prompts[0] = [sp.vocab_size + 1, 1, 2] + prompts[0]  # a longer prompt: left padding elsewhere, reset by <p0>
    batch = make_batch(prompts, [c.tokens[i][c.mask[i]].tolist() for i in range(len(prompts))], pad_id=sp.eos)
    logits = completion_logits(model, batch)  # (B, T, V + P)
    assert logits.dtype == torch.float32 and logits.shape == (P * sp.n_sequences, T, V + P)
    ref = problem.ref.logits(c.prompt_ids, c.tokens)  # (B, T, V)
    # fp32 model vs fp64 table: rounding of the largest logit (conftest.f32_tol); a log-prob sums T
    # log-softmax terms, each rounded relative to the logits it was computed from.
    big = float(ref[c.mask].abs().max())
    assert torch.allclose(logits[..., :V][c.mask].double(), ref[c.mask], atol=f32_tol(big), rtol=0)
    assert (logits[..., V:] == PROMPT_LOGIT).all()
    logps = completion_logps(model, batch).double()
    assert torch.allclose(logps, problem.ref.logps(c.prompt_ids, c.tokens, c.mask), atol=f32_tol(T * big), rtol=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=0)
    assert out.logits.shape[1] == batch.input_ids.shape[1]  # 0 keeps every position


def test_state_tracking_rules(problem, model):
    """Hand-derived states (h = p·S + prefix index, off = H - 1) for the three rules: the most recent
    prompt token starts its root; an attention-masked token is skipped (here a prompt token, which would
    otherwise restart); ``position_ids`` 0 starts a new sequence (packed rows), which without a prompt
    token is off-tree; eos and depth T leave the tree."""
    sp = problem.space
    S, off, a, b, p0, p1 = sp.n_prefixes, model.config.hidden_size - 1, 1, 2, V, V + 1
    st = lambda p, *prefix: p * S + sp.prefix_index[prefix]  # noqa: E731
    cases = [  # (tokens, attention_mask, position_ids, expected states)
        ([p1, a, p0, b, 0, a], [1, 1, 0, 1, 1, 1], None, [st(1), st(1, a), st(1, a), st(1, a, b), off, off]),
        ([p0, a, b, a, p1, b], None, [0, 1, 0, 1, 0, 1], [st(0), st(0, a), off, off, st(1), st(1, b)]),
        ([b, p0, a, b, a, p1], None, None, [off, st(0), st(0, a), st(0, a, b), off, st(1)]),
    ]
    for ids, mask, pos, want in cases:
        kw = {k: torch.tensor([v]) for k, v in (("attention_mask", mask), ("position_ids", pos)) if v is not None}
        hidden = model.get_decoder()(input_ids=torch.tensor([ids]), **kw).last_hidden_state  # (1, L, H)
        assert hidden.argmax(-1)[0].tolist() == want


def test_sampling_matches_sequence_probs(problem, model):
    """``tether.sampling.sample`` (KV-cache path) draws sequences with π_ref's exact probabilities: each
    of the P·K = 30 cells within 4.5 standard errors sqrt(p(1-p)/n) (n = 10^4 per prompt; a false alarm
    has probability < 30·7e-6), and ``no_eos`` exactly on the full-length sequences."""
    from tether.sampling import sample

    sp, n = problem.space, 10_000
    prompts = [[sp.vocab_size + p] for p in range(P) for _ in range(n)]
    batch, no_eos = sample(
        model, prompts, pad_id=sp.eos, eos_id=sp.eos, max_new_tokens=T, generator=torch.Generator().manual_seed(0)
    )
    comp = as_completions(sp, batch)
    ids = sp.sequence_ids(comp.tokens, comp.mask)
    counts = torch.zeros(P, sp.n_sequences, dtype=torch.float64)
    counts.index_put_((comp.prompt_ids, ids), torch.ones(len(ids), dtype=torch.float64), accumulate=True)
    probs = problem.ref.sequence_probs()
    stderr = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4.5 * stderr + 1e-12).all()
    full_length = torch.tensor([len(sp.sequences[k]) == T and sp.sequences[k][-1] != sp.eos for k in ids.tolist()])
    assert full_length.any() and torch.equal(no_eos, full_length)


def test_packed_dpo_path(problem, model, tok):
    """``preference_rows`` tokenized by ``tokenize_pairs(add_eos=False)`` are exactly the tabular
    sequences; the DPO trainer's packed layout scores them as the padded one, and both give the
    exact sequence log-probs."""
    from tether.data.preference import pack_pairs, tokenize_pairs
    from tether.trainers.dpo import packed_logps, packing_works

    sp = problem.space
    full = next(k for k, y in enumerate(sp.sequences) if len(y) == T and sp.eos not in y)
    pairs_idx = [
        (0, sp.seq_index[(sp.eos,)], full, 2),
        (1, sp.seq_index[(1, 2, sp.eos)], sp.seq_index[(2, sp.eos)]),
        (1, full, 3),
    ]
    rows = preference_rows(problem, pairs_idx)
    assert len(rows) == 4 and rows[0] == rows[1] and rows[0]["chosen"] == " </s>"
    pairs, _ = tokenize_pairs(rows, tok, add_eos=False)
    for pr, (p, c, r) in zip(pairs, [(0, *pairs_idx[0][1:3])] * 2 + [tuple(x) for x in pairs_idx[1:]]):
        assert pr["prompt_ids"] == [V + p]
        assert (pr["chosen_ids"], pr["rejected_ids"]) == (list(sp.sequences[c]), list(sp.sequences[r]))
    assert packing_works(model, pairs, pad_id=tok.pad_token_id, device="cpu")
    lp = packed_logps(model, pack_pairs(pairs, pad_id=tok.pad_token_id))  # (2N,) chosen then rejected
    seq_lp = problem.ref.sequence_log_probs()
    want = [
        seq_lp[p, sp.seq_index[tuple(pr[key])]]
        for key in ("chosen_ids", "rejected_ids")
        for pr, p in zip(pairs, [0, 0, 1, 1])
    ]
    assert torch.allclose(lp.double(), torch.stack(want), atol=1e-5, rtol=0)


def test_round_trip_lora_and_bf16(problem, folder, model):
    """save -> load -> ``tabular_policy`` is the table (fp32 storage: 1e-6); another table round-trips
    too; with LoRA on lm_head (B perturbed) the read-back equals the merged weights and the model's own
    forward; bf16 loads, stays finite, and reads back the table rounded to bf16."""
    from peft import LoraConfig, get_peft_model

    sp = problem.space
    assert torch.allclose(
        tabular_policy(model, sp).table, problem.ref.table, rtol=0, atol=f32_tol(problem.ref.table.abs().max())
    )  # stored as fp32
    other = TabularPolicy.random(sp, seed=7, scale=2.0)
    assert torch.allclose(tabular_policy(tabular_lm(sp, other), sp).table, other.table, atol=2e-6, rtol=0)

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], task_type="CAUSAL_LM")
    )
    lora = peft_model.base_model.model.lm_head
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(0))
    learned = tabular_policy(peft_model, sp).table
    delta = 2.0 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight  # alpha / r = 2; (V + P, H)
    want = problem.ref.table + delta[:V, :-1].T.reshape(P, sp.n_prefixes, V).double()
    assert (learned - problem.ref.table).abs().max() > 0.1  # the adapter moved the policy
    assert torch.allclose(learned, want, atol=1e-5, rtol=0)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert torch.allclose(tabular_policy(merged, sp).table, learned, atol=1e-5, rtol=0)
    batch, c = all_sequences_batch(sp)
    logps = completion_logps(peft_model, batch).double()
    assert torch.allclose(logps, TabularPolicy(sp, learned).logps(c.prompt_ids, c.tokens, c.mask), atol=1e-5, rtol=0)

    bf16 = load_causal_lm(folder, dtype="bfloat16")
    logits = completion_logits(bf16, batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    read = tabular_policy(bf16, sp).table
    assert torch.equal(read, problem.ref.table.float().to(torch.bfloat16).double())  # stored fp32, loaded as bf16
    assert torch.equal(logits[..., :V][c.mask].double(), TabularPolicy(sp, read).logits(c.prompt_ids, c.tokens)[c.mask])


def test_reward_function_on_decoded_samples(problem, model, tok):
    """Texts from ``decode_completions`` parse back to the sampled sequences: reward = reward_of."""
    from tether.sampling import sample
    from tether.trainers.rollout import decode_completions

    sp = problem.space
    prompts = [[sp.vocab_size + p] for p in range(P) for _ in range(200)]
    batch, _ = sample(
        model,
        prompts,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=T,
        generator=torch.Generator().manual_seed(1),
    )
    texts = decode_completions(tok, batch)
    prompt_strs = [prompt_texts(sp)[p] for p in range(P) for _ in range(200)]
    got = reward_function(problem)(prompt_strs, texts)
    want = reward_of(problem.rewards, sp, as_completions(sp, batch))
    assert got.shape == (2 * 200,) and torch.allclose(got.double(), want, atol=f32_tol(want.abs().max()), rtol=0)
    assert len(set(texts)) > 5  # many distinct sequences were drawn
    for k, y in enumerate(sp.sequences):  # both text forms: eos spelled, or dropped as decoded
        assert (
            parse_completion(sp, completion_text(sp, y)) == k == parse_completion(sp, completion_text(sp, y, eos=False))
        )
    for bad_prompt, bad in [
        ("<p0>", "a b c a"),
        ("<p0>", "a z"),
        ("<p0>", "a b c </s>"),
        ("<p0>", "</s> a"),
        ("<p2>", "a"),
    ]:
        with pytest.raises(ValueError):
            reward_function(problem)([bad_prompt], [bad])


def test_critic_is_a_tabular_value_function(problem, model, folder):
    """The ``critic`` value model runs on the backbone: with head weight w, V(s_t) = w[p·S + prefix_t] + b;
    the policy's hidden states (``head`` value model) are the same one-hot states."""
    from tether.value import build_value_model

    sp = problem.space
    vm = build_value_model("critic", model, model_path=folder)
    batch, c = all_sequences_batch(sp)
    H = model.config.hidden_size
    with torch.no_grad():
        vm.head.weight.copy_(torch.arange(H, dtype=torch.float32)[None])
        vm.head.bias.fill_(0.5)
    values = vm.values(batch)  # (B, T)
    state = c.prompt_ids[:, None] * sp.n_prefixes + sp.prefix_ids(c.tokens)  # (B, T)
    assert values.shape == (P * sp.n_sequences, T)
    assert torch.equal(values, torch.where(c.mask, state.float() + 0.5, 0.0))
    _, hidden = forward_completion(model, batch, hidden=True)  # (B, T, H)
    assert torch.equal(hidden.argmax(-1)[c.mask], state[c.mask]) and math.isclose(
        float(hidden.sum()), hidden.numel() / H
    )


def test_import_stays_light_and_lm_names_resolve():
    """``import tether.oracle`` does not import transformers (a fresh interpreter: ~3 s); its ``lm``
    names resolve lazily to ``tether.oracle.lm``'s, whose import registered the model type (the
    ``load_causal_lm`` calls above rely on it)."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    import tether.oracle

    code = "import sys, tether.oracle; assert 'transformers' not in sys.modules, 'tether.oracle imported transformers'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert tether.oracle.TabularLM is TabularLM and tether.oracle.save_tabular_lm is save_tabular_lm
    assert AutoModelForCausalLM._model_mapping[tether.oracle.TabularLMConfig] is TabularLM
