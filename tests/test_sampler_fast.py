"""The built-in sampler's speed-ups change no sample (docs/speed.md).

``tether.sampling.sample`` drops finished rows from the forward pass and draws its tokens with
``draw_tokens`` instead of ``torch.multinomial``. Both are checked against the plain loop it replaced
(``tests/reference_sampler.py``): the same tokens, masks, no-EOS flags, stored sets F_t and generator
state afterwards, on the real stories260K, with an "EOS" common enough that rows finish at different
steps and the batch is compacted several times.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tether.sampling import draw_tokens, sample

from reference_sampler import reference_sample


def test_draw_tokens_is_torch_multinomial():
    """torch.multinomial(p, 1) = argmax(p / q), q ~ Exp(1) over the whole (B, V) tensor: the same tokens
    and the same generator state, also when only some rows are computed (the rest still draw)."""
    torch.manual_seed(0)
    p = torch.softmax(3 * torch.randn(16, 37), -1)  # (B, V)
    p[3, 5:] = 0.0  # a filtered row
    p[3] /= p[3].sum()
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(5):
        want = torch.multinomial(p, 1, generator=g1).squeeze(-1)
        rows = torch.tensor([0, 3, 4, 9, 15])
        got = draw_tokens(p[rows], rows, 16, g2)
        assert torch.equal(got, want[rows])
        assert torch.equal(g1.get_state(), g2.get_state())


def test_draw_tokens_distribution():
    """Frequencies of 40,000 draws from p = (0.5, 0.3, 0.15, 0.05, 0) against p: Pearson's χ² with 3
    degrees of freedom stays below 16.27 (the 0.999 quantile, so a correct sampler fails 1 run in 1000;
    the seed is fixed) and the zero-probability token never appears."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 40_000
    g = torch.Generator().manual_seed(5)
    probs = p.expand(n, 5).contiguous()
    tok = draw_tokens(probs, torch.arange(n), n, g)
    counts = torch.bincount(tok, minlength=5).double()
    assert counts[4] == 0
    expected = n * p[:4].double()
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, chi2


def _prompts(tok):
    texts = ["Once upon a time", "The little dog", "One day, a girl", "Tom was", "Lily saw a", "The big tree"]
    return [tok(t)["input_ids"] for t in texts] * 3  # 18 rows, prompts of different lengths (left padding)


@pytest.mark.parametrize("filters", [{}, {"top_k": 9, "temperature": 0.8}, {"top_p": 0.85}])
def test_sampler_equals_the_plain_loop(stories, filters):
    """Token for token equal to the loop without compaction, for the same generator. EOS is taken to be
    "." so rows end at different steps (the compaction runs several times); two batches in a row with one
    generator check that the random stream after a batch is unchanged too."""
    torch.set_num_threads(1)
    tok, model = stories
    eos = tok(".", add_special_tokens=False)["input_ids"][-1]
    ids = _prompts(tok)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    finished_at = set()
    for _ in range(2):
        want, want_no_eos = reference_sample(
            model, ids, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=40, generator=g1, **filters
        )
        got, got_no_eos = sample(
            model, ids, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=40, generator=g2, **filters
        )
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.mask, want.mask) and torch.equal(got.attention_mask, want.attention_mask)
        assert torch.equal(got_no_eos, want_no_eos)
        assert (got.allowed is None) == (want.allowed is None)
        if want.allowed is not None:
            assert got.allowed.shape == (*got.mask.shape, math.ceil(model.config.vocab_size / 8))
            assert torch.equal(got.allowed, want.allowed)
        assert torch.equal(g1.get_state(), g2.get_state())
        finished_at |= set(got.mask.sum(-1)[~got_no_eos].tolist())
    assert len(finished_at) >= 3  # rows ended at several different steps: the batch shrank more than once


def test_sampler_without_eos_runs_every_step(stories):
    """eos_id=None: every row gets exactly max_new_tokens tokens, none finished."""
    tok, model = stories
    b, no_eos = sample(
        model,
        _prompts(tok)[:4],
        pad_id=tok.pad_token_id,
        eos_id=None,
        max_new_tokens=6,
        generator=torch.Generator().manual_seed(0),
    )
    assert b.mask.shape == (4, 6) and bool(b.mask.all()) and bool(no_eos.all())


def test_engine_samples_through_the_backend_it_is_given(stories):
    """engine.generate / measure hand the prompts, settings and generator to the backend (tether.generation)
    and use what it returns: a counting wrapper around the built-in backend gives the same samples as the
    default, and sees the SamplingSettings with the tokenizer's pad/EOS."""
    from tether.engine import generate, measure
    from tether.generation import BuiltinBackend, GenerationBackend
    from tether.groups import SamplingSettings
    from tether.reference import FrozenReference

    tok, model = stories
    seen = []

    class Counting(BuiltinBackend):
        def generate(self, prompt_ids, settings, generator, *, pad_id, eos_id):
            seen.append((settings, pad_id, eos_id))
            return super().generate(prompt_ids, settings, generator, pad_id=pad_id, eos_id=eos_id)

    backend = Counting(model)
    assert isinstance(backend, GenerationBackend)
    ids = _prompts(tok)[:4]
    a = generate(model, ids, tokenizer=tok, sampling={"top_k": 5}, max_new_tokens=5, seed=1, backend=backend)
    b = generate(model, ids, tokenizer=tok, sampling={"top_k": 5}, max_new_tokens=5, seed=1)
    assert a.completion_ids == b.completion_ids and torch.equal(a.batch.allowed, b.batch.allowed)
    assert seen == [(SamplingSettings(max_new_tokens=5, top_k=5), tok.pad_token_id, tok.eos_token_id)]
    m = measure(
        model,
        FrozenReference(copy.deepcopy(model)),
        ids,
        tokenizer=tok,
        max_new_tokens=3,
        batch_size=2,
        seed=0,
        estimators=("exact",),
        backend=backend,
    )
    assert len(seen) == 3 and m["samples"] == 4 and m["estimators"]["exact"]["mean"] == 0.0


def test_unknown_backend_is_a_user_error():
    from tether.errors import UserError
    from tether.generation import check_backend, make_backend

    with pytest.raises(UserError, match="backend"):
        make_backend("nope", None)
    with pytest.raises(UserError, match="--backend"):
        check_backend("nope")
    check_backend("builtin")


# --- the prompt prefilled once per distinct prompt (sample(prefill_once=True)) ---------------------------


def _tiny(arch: str):
    """A seeded 2-layer GPT-2 or Qwen2 (vocabulary 512, stories260K's tokenizer ids), initialised with a
    large spread so its next-token distributions are peaked and a common token can serve as EOS."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=512, n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    else:
        cfg = Qwen2Config(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.3,
        )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _layouts(tok):
    ids = [tok(t)["input_ids"] for t in ("Once upon a time", "The little dog", "One day, a girl", "Tom was")]
    return {
        "groups": [p for p in ids for _ in range(4)],  # the online trainers' layout: G contiguous copies
        "scattered": [ids[i] for i in (0, 1, 0, 2, 3, 3, 1, 0, 2)],  # repeats, not contiguous
        "distinct": ids,  # nothing to share: the plain prefill
    }


@pytest.mark.parametrize("arch,decoder", [("stories", "hf"), ("stories", "lean"), ("gpt2", "hf"), ("qwen2", "hf")])
@pytest.mark.parametrize("layout", ["groups", "scattered", "distinct"])
def test_prefill_once_samples_the_same(stories, arch, decoder, layout):
    """prefill_once on and off: the same tokens, masks, no-EOS flags, stored sets F_t, behaviour log-probs
    and generator state afterwards, to the bit, for the Hugging Face forward (Llama, GPT-2, Qwen2) and the
    lean decoder. Exact by construction on the CPU: each row's cache and logits come from the same
    operations on the same numbers, only fewer rows of them. EOS is the token most rows draw, so rows
    finish at different steps and the batch is compacted after the copied prefill."""
    torch.set_num_threads(1)
    tok, model = stories
    if arch != "stories":
        model = _tiny(arch)
    prompts = _layouts(tok)[layout]
    for filters in ({}, {"top_k": 9, "temperature": 0.8}):
        # EOS: the token most rows draw in a run without one (the same draws up to each row's first EOS)
        free, _ = sample(
            model,
            prompts,
            pad_id=0,
            eos_id=None,
            max_new_tokens=24,
            generator=torch.Generator().manual_seed(3),
            **filters,
        )
        ids = free.completion_ids
        eos = max(range(ids.max() + 1), key=lambda v: int((ids == v).any(-1).sum()))
        got = []
        for once in (True, False):
            g = torch.Generator().manual_seed(3)
            b, no_eos = sample(
                model, prompts, pad_id=0, eos_id=eos, max_new_tokens=24, generator=g, decoder=decoder,
                prefill_once=once, **filters,
            )  # fmt: skip
            got.append((b, no_eos, g.get_state()))
        (a, a_no, a_g), (b, b_no, b_g) = got
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask) and torch.equal(a_no, b_no)
        assert torch.equal(a.behaviour_logps, b.behaviour_logps) and torch.equal(a_g, b_g)
        assert (a.allowed is None) == (b.allowed is None) and (a.allowed is None or torch.equal(a.allowed, b.allowed))
        assert int((~a_no).sum()) >= 2 and len(set(a.mask.sum(-1).tolist())) >= 2  # rows ended at different steps


def test_distinct_prompts():
    """first rows of each distinct prompt in order of appearance, and every row's index into them."""
    from tether.sampling import distinct_prompts

    assert distinct_prompts([[1, 2], [3], [1, 2], [1], [3], [1, 2]]) == ([0, 1, 3], [0, 1, 0, 2, 1, 0])
    assert distinct_prompts([[5, 6, 7]] * 3) == ([0], [0, 0, 0])
    assert distinct_prompts([[1], [1, 0]]) == ([0, 1], [0, 1])  # a prefix is another prompt


@pytest.mark.parametrize("arch", ["stories", "gpt2", "qwen2"])
def test_prefill_once_cache_and_logits_equal_the_duplicated_prefill(stories, arch):
    """The shared prefill's Hugging Face cache (every layer's keys and values) and last-position logits,
    copied to the rows, equal the prefill of every row to the bit on the CPU (the same per-row arithmetic;
    fewer rows in each product)."""
    from tether.modeling import CACHE_KW, make_batch, position_ids
    from tether.sampling import _prefill_distinct, distinct_prompts

    torch.set_num_threads(1)
    tok, model = stories
    if arch != "stories":
        model = _tiny(arch)
    model.eval()
    prompts = _layouts(tok)["scattered"]
    base = make_batch(prompts, [[]] * len(prompts), pad_id=0)
    ids, attn = base.input_ids[:, : base.prompt_len], base.attention_mask[:, : base.prompt_len]
    pos = position_ids(attn)
    first, inverse = (torch.tensor(x) for x in distinct_prompts(prompts))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        last, past = _prefill_distinct(model, None, ids, attn, pos, first, inverse)
    assert len(first) == 4 and torch.equal(last, full.logits[:, -1])
    want = getattr(full, CACHE_KW)
    for lw, lg in zip(want.layers, past.layers, strict=True):
        assert torch.equal(lg.keys, lw.keys) and torch.equal(lg.values, lw.values)


def test_prefill_once_lean_cache_equals_the_duplicated_prefill(stories):
    """The same for the lean decoder's static cache: U rows prefilled, then ``select``ed out to B rows,
    equal the B-row prefill's keys, values, key mask and logits to the bit."""
    from tether.decode import LlamaDecoder
    from tether.modeling import make_batch, position_ids
    from tether.sampling import _prefill_distinct, distinct_prompts

    torch.set_num_threads(1)
    tok, model = stories
    model.eval()
    prompts = _layouts(tok)["scattered"]
    base = make_batch(prompts, [[]] * len(prompts), pad_id=0)
    P = base.prompt_len
    ids, attn = base.input_ids[:, :P], base.attention_mask
    attn = torch.cat([attn, torch.ones(len(prompts), 5, dtype=attn.dtype)], 1)  # (B, P + 5)
    pos = position_ids(attn[:, :P])
    first, inverse = (torch.tensor(x) for x in distinct_prompts(prompts))
    with torch.no_grad():
        full = LlamaDecoder(model, len(prompts), P + 5)
        full.set_mask(attn)
        want = full.forward(ids, pos, 0)
        dec = LlamaDecoder(model, len(first), P + 5)
        dec.set_mask(attn[first])
        got, _ = _prefill_distinct(model, dec, ids, attn[:, :P], pos, first, inverse)
    assert torch.equal(got, want) and torch.equal(dec.key_bias, full.key_bias)
    for i in range(len(dec.k)):
        assert torch.equal(dec.k[i], full.k[i]) and torch.equal(dec.v[i], full.v[i])
