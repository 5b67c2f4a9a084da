"""tether.decode.LlamaDecoder: the sampler's lean KV-cached forward computes the model's own logits.

It fuses products and keeps a static cache, so it may round differently from the Hugging Face
forward; the logits are compared with one full (uncached) forward to float32 tolerance, through a
left-padded prompt pass, single-token steps and a row compaction. The sampler's tokens with it are
checked equal to those with the Hugging Face forward (the same generator).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tether import decode
from tether.decode import LlamaDecoder, supports
from tether.modeling import position_ids
from tether.sampling import sample

from conftest import f32_tol


@pytest.mark.parametrize("fuse", [True, False])
def test_decoder_logits_equal_the_full_forward(stories, monkeypatch, fuse):
    """Prompt pass (slots 0..P-1, rows left-padded by 0-4), then one token per step, dropping rows
    {1, 4, 7} half-way: every step's last-position logits equal the uncached forward's at the same
    position. Tolerance: the logits are products of the final normed hidden state h with the head W,
    so rounding scales with max_t Σ_i |h_i W_vi| (28 here); 16 float32 spacings of it (not the default
    8) because five layers of differently-ordered sums feed h (measured: 0.4 of this budget).
    ``fuse=False``: the separate products a model above ``FUSE_MAX_BYTES`` gets."""
    import tether.decode

    if not fuse:
        monkeypatch.setattr(tether.decode, "FUSE_MAX_BYTES", 0)
    torch.set_num_threads(1)
    tok, model = stories
    model.eval()
    B, P, N = 10, 7, 12
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (B, P + N), generator=g)
    attn = torch.ones(B, P + N, dtype=torch.long)
    for i, pad in enumerate([0, 2, 4, 1, 0, 3, 0, 0, 2, 1]):
        attn[i, :pad] = 0
    pos = position_ids(attn)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
        want = out.logits  # (B, P + N, V)
        mag = (out.hidden_states[-1].abs() @ model.lm_head.weight.abs().t()).max()
        dec = LlamaDecoder(model, B, P + N)
        assert isinstance(dec.layers[0][2], torch.Tensor) == fuse
        dec.set_mask(attn)
        rows = torch.arange(B)
        got = dec.forward(ids[:, :P], pos[:, :P], 0)  # (B, V)
        assert torch.allclose(got, want[:, P - 1], rtol=0, atol=f32_tol(mag, ulps=16))
        for t in range(1, N):
            if t == N // 2:
                keep = torch.tensor([i for i in range(B) if i not in (1, 4, 7)])
                dec.select(keep)
                rows = rows[keep]
            s = P + t - 1
            got = dec.forward(ids[rows, s : s + 1], pos[rows, s : s + 1], s)  # (b, V)
            err = (got - want[rows, s]).abs().max()
            assert err <= f32_tol(mag, ulps=16), (t, float(err))


@pytest.mark.parametrize("filters", [{}, {"top_k": 9, "temperature": 0.8}])
def test_sampler_tokens_equal_with_either_decoder(stories, filters):
    """sample(decoder="lean") and sample(decoder="hf"): the same tokens, masks and generator state for one
    generator, with "." as EOS so rows finish at different steps and the batch is compacted. (Equal
    unless two tokens' p/q ratios tie to within float32 rounding of the logits: not expected in
    18 x 30 draws.)"""
    torch.set_num_threads(1)
    tok, model = stories
    eos = tok(".", add_special_tokens=False)["input_ids"][-1]
    texts = ["Once upon a time", "The little dog", "One day, a girl", "Tom was", "Lily saw a", "The big tree"]
    ids = [tok(t)["input_ids"] for t in texts] * 3
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a, a_no = sample(
        model, ids, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=30, generator=g1, decoder="hf", **filters
    )
    b, b_no = sample(
        model, ids, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=30, generator=g2, decoder="lean", **filters
    )
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask) and torch.equal(a_no, b_no)
    assert (a.allowed is None) == (b.allowed is None) and (a.allowed is None or torch.equal(a.allowed, b.allowed))
    assert torch.equal(g1.get_state(), g2.get_state())
    assert int((~a_no).sum()) >= 3  # rows did finish early: the compaction ran


def test_supports_only_plain_llama(stories):
    """The lean path is taken only where it is the same mathematics: a Llama with q/k/v biases or
    scaled RoPE keeps the Hugging Face forward; an unknown decoder name is refused."""
    _, model = stories
    assert supports(model)
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    assert not supports(LlamaForCausalLM(LlamaConfig(**base, attention_bias=True)))
    assert not supports(LlamaForCausalLM(LlamaConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0})))
    assert supports(LlamaForCausalLM(LlamaConfig(**base)))
    with pytest.raises(ValueError, match="decoder"):
        sample(model, [[1, 2]], pad_id=0, eos_id=None, max_new_tokens=1, decoder="fast")
    biased = LlamaForCausalLM(LlamaConfig(**base, attention_bias=True))  # forcing lean where it is not the same maths
    with pytest.raises(ValueError, match="decoder='lean' needs a plain LlamaForCausalLM"):
        sample(biased, [[1, 2]], pad_id=0, eos_id=None, max_new_tokens=1, decoder="lean")


def test_builtin_backend_takes_the_decoder_option(stories):
    """make_backend("builtin", model, decoder=...) reaches the sampler (the same tokens either way, as above);
    an unknown decoder is a UserError naming the option."""
    from tether.errors import UserError
    from tether.generation import make_backend
    from tether.groups import SamplingSettings

    tok, model = stories
    ids = [tok(t)["input_ids"] for t in ("Once upon a time", "Tom was")]
    settings, ends = SamplingSettings(max_new_tokens=8), dict(pad_id=tok.pad_token_id, eos_id=None)
    a, _ = make_backend("builtin", model, decoder="hf").generate(
        ids, settings, torch.Generator().manual_seed(2), **ends
    )
    b, _ = make_backend("builtin", model).generate(ids, settings, torch.Generator().manual_seed(2), **ends)
    assert make_backend("builtin", model, decoder="hf").decoder == "hf"
    assert torch.equal(a.input_ids, b.input_ids)
    with pytest.raises(UserError, match="decoder"):
        make_backend("builtin", model, decoder="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_llama_rmsnorm(dtype):
    """decode._rms (one fused F.rms_norm) against transformers' own LlamaRMSNorm, to the bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x = (3 * torch.randn(5, 3, 64, generator=g)).to(dtype)
    with torch.no_grad():
        assert torch.equal(decode._rms(x, norm.weight, norm.variance_epsilon), norm(x))


def test_decoder_field_reaches_the_backend_and_is_checked(stories):
    """The sampling group's ``decoder`` (ppo/grpo/rloo, kl, bon): backend_for passes it to the builtin backend;
    with another backend, or lean on a model that is not a Llama, the preflight refuses it naming the flag."""
    from transformers import GPT2Config

    from tether.checks import check_backend_model
    from tether.errors import UserError
    from tether.generation import backend_for, check_backend
    from tether.trainers.grpo import GRPOConfig

    _, model = stories
    assert backend_for(GRPOConfig(decoder="hf"), model).decoder == "hf"
    assert backend_for(GRPOConfig(), model).decoder == "auto"
    with pytest.raises(UserError, match="backend builtin"):
        backend_for(GRPOConfig(backend="vllm", decoder="lean"), model)
    with pytest.raises(UserError, match="--decoder"):
        check_backend("builtin", "fast")
    with pytest.raises(UserError, match="decoder=lean .* 'gpt2'"):
        check_backend_model("builtin", GPT2Config(), {}, decoder="lean")
    check_backend_model("builtin", LlamaConfig(), {}, decoder="lean")  # a Llama passes the preflight
