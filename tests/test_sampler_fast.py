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
#
# Each row's cache and logits come from the same operations on the same numbers with or without sharing,
# but the prompt pass's matrix products have U·P rows instead of B·P, and the CPU BLAS picks its kernel
# (and so its summation order) by shape: on short prompts the logits differ by float32 rounding (measured
# up to 1e-5 in a log-prob on stories260K), on the long HH-RLHF prompts they were equal to the bit. So the
# tokens, masks, sets F_t and generator state are compared exactly (a token could differ only where two
# p/q ratios tie to within that rounding: not expected in these draws, as for the compaction above), and
# logits and log-probs to float32 tolerance.


def _tiny(arch: str):
    """A seeded 2-layer GPT-2 or Qwen2 (vocabulary 512, stories260K's tokenizer ids), initialised with a
    large spread so its next-token distributions are peaked."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=512, n_positions=512, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    else:
        cfg = Qwen2Config(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.3,
        )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _hh_prompts(assets_dir, tok, n: int) -> list:
    """The first ``n`` HH-RLHF implicit prompts (up to the last "Assistant:" turn) of 128-256 tokens."""
    import gzip
    import json

    from tether.data.preference import implicit_prompt

    out = []
    with gzip.open(assets_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            ids = tok(implicit_prompt(row["chosen"], row["rejected"])[0])["input_ids"]
            if 128 <= len(ids) <= 256:
                out.append(ids)
                if len(out) == n:
                    return out
    raise AssertionError("too few long HH-RLHF prompts")


def _layouts(tok, assets_dir):
    ids = [tok(t)["input_ids"] for t in ("Once upon a time", "The little dog", "One day, a girl", "Tom was")]
    return {
        "groups": [p for p in ids for _ in range(4)],  # the online trainers' layout: G contiguous copies
        "scattered": [ids[i] for i in (0, 1, 0, 2, 3, 3, 1, 0, 2)],  # repeats, not contiguous
        "distinct": ids,  # nothing to share: the plain prefill
        "long": [p for p in _hh_prompts(assets_dir, tok, 2) for _ in range(4)],  # real dialogue prefixes
    }


def _model(stories, arch):
    return stories[1] if arch == "stories" else _tiny(arch)


ARCHS = [("stories", "hf"), ("stories", "lean"), ("gpt2", "hf"), ("qwen2", "hf")]


@pytest.mark.parametrize("arch,decoder", ARCHS)
@pytest.mark.parametrize("layout", ["groups", "scattered", "distinct", "long"])
def test_prefill_once_samples_the_same(stories, assets_dir, arch, decoder, layout):
    """prefill_once on and off: the same tokens, masks, no-EOS flags, stored sets F_t and generator state
    afterwards, for the Hugging Face forward (Llama, GPT-2, Qwen2) and the lean decoder, with rows
    finishing at different steps (EOS is the token most rows draw, so the batch is compacted after the
    copied prefill). The behaviour log-probs agree to float32 rounding of the logits: log μ = z/τ −
    logsumexp(z/τ) moves by at most 2δ/τ for a logit error δ, and δ is 16 spacings of the logits'
    dot-product magnitude (the budget tests/test_decode.py derives for a cached pass against another)."""
    from conftest import f32_tol, logit_magnitude

    torch.set_num_threads(1)
    tok, model = stories[0], _model(stories, arch)
    prompts = _layouts(tok, assets_dir)[layout]
    for filters in ({}, {"top_k": 9, "temperature": 0.8}):
        # EOS: the token most rows draw in a run without one (the same draws up to each row's first EOS)
        free, _ = sample(
            model, prompts, pad_id=0, eos_id=None, max_new_tokens=24, generator=torch.Generator().manual_seed(3),
            decoder=decoder, **filters,
        )  # fmt: skip
        ids = free.completion_ids
        eos = max(range(int(ids.max()) + 1), key=lambda v: int((ids == v).any(-1).sum()))
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
        assert torch.equal(a_g, b_g)
        assert (a.allowed is None) == (b.allowed is None) and (a.allowed is None or torch.equal(a.allowed, b.allowed))
        assert int((~a_no).sum()) >= 2 and len(set(a.mask.sum(-1).tolist())) >= 2  # rows ended at different steps
        mag = logit_magnitude(model, a.input_ids, attention_mask=a.attention_mask)
        tau = filters.get("temperature", 1.0)
        err = float((a.behaviour_logps - b.behaviour_logps).abs().max())
        assert err <= 2 * f32_tol(mag, ulps=16) / tau, err


def test_distinct_prompts():
    """first rows of each distinct prompt in order of appearance, and every row's index into them."""
    from tether.sampling import distinct_prompts

    assert distinct_prompts([[1, 2], [3], [1, 2], [1], [3], [1, 2]]) == ([0, 1, 3], [0, 1, 0, 2, 1, 0])
    assert distinct_prompts([[5, 6, 7]] * 3) == ([0], [0, 0, 0])
    assert distinct_prompts([[1], [1, 0]]) == ([0, 1], [0, 1])  # a prefix is another prompt


@pytest.mark.parametrize("arch,decoder", ARCHS)
@pytest.mark.parametrize("layout", ["scattered", "long"])
def test_prefill_once_logits_equal_the_duplicated_prefill(stories, assets_dir, arch, decoder, layout):
    """The shared prefill's last-position logits, copied to the rows, equal the prefill of every row, and
    so do the logits of the next step computed through the copied cache (Hugging Face cache or the lean
    decoder's static one), to 16 float32 spacings of the logits' dot-product magnitude (another kernel
    for fewer rows; see above). The rows of one prompt get exact copies of its prompt pass."""
    from tether.decode import LlamaDecoder
    from tether.modeling import CACHE_KW, make_batch, position_ids
    from tether.sampling import _prefill_distinct, distinct_prompts

    from conftest import f32_tol, logit_magnitude

    torch.set_num_threads(1)
    tok, model = stories[0], _model(stories, arch).eval()
    prompts = _layouts(tok, assets_dir)[layout]
    base = make_batch(prompts, [[]] * len(prompts), pad_id=0)
    P, B = base.prompt_len, len(prompts)
    ids = torch.cat([base.input_ids[:, :P], torch.full((B, 1), 7)], 1)  # (B, P + 1): every row then reads token 7
    attn = torch.cat([base.attention_mask[:, :P], torch.ones(B, 1, dtype=torch.long)], 1)
    pos = position_ids(attn)
    first, inverse = (torch.tensor(x) for x in distinct_prompts(prompts))
    assert len(first) < B

    def two_steps(shared: bool):  # (B, V) logits of the prompt's last position, then of token 7 after it
        dec = None
        if decoder == "lean":
            dec = LlamaDecoder(model, len(first) if shared else B, P + 1)
            dec.set_mask(attn[first] if shared else attn)
        if shared:
            last, past = _prefill_distinct(model, dec, ids[:, :P], attn[:, :P], pos[:, :P], first, inverse)
        elif dec is not None:
            last = dec.forward(ids[:, :P], pos[:, :P], 0)
        else:
            out = model(input_ids=ids[:, :P], attention_mask=attn[:, :P], position_ids=pos[:, :P], use_cache=True)
            last, past = out.logits[:, -1], getattr(out, CACHE_KW)
        if dec is not None:
            return last, dec.forward(ids[:, P:], pos[:, P:], P)
        out = model(
            input_ids=ids[:, P:], attention_mask=attn, position_ids=pos[:, P:], use_cache=True, **{CACHE_KW: past}
        )
        return last, out.logits[:, -1]

    with torch.no_grad():
        got, want = two_steps(True), two_steps(False)
    tol = f32_tol(logit_magnitude(model, ids, attention_mask=attn), ulps=16)
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= tol
    # the prompt pass's rows of one prompt are copies (later steps need not be: a CPU matrix product may
    # round a row differently by its place in the batch, the main blocks or the remainder). The lean decoder
    # copies the last hidden state and then applies the LM head to all B rows, so there the same rounding
    # applies (seen with MKL's AVX2 kernels): equal within the float32 budget; the Hugging Face path copies
    # the logits themselves, bit for bit.
    if decoder == "lean":
        assert float((got[0] - got[0][first][inverse]).abs().max()) <= tol
    else:
        assert torch.equal(got[0], got[0][first][inverse])
