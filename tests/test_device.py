"""The sampler on a device that is not the CPU, checked on a CPU-only torch.

There is no GPU in the tests, so the model is put on torch's ``meta`` device: tensors with shapes and a
device but no data. Every operation the sampler queues on it runs (shapes only), and two things that
would break on CUDA show up:

- a random draw with a generator on another device (torch refuses ``exponential_`` on a CUDA tensor
  with a CPU generator): ``DeviceCheck`` records the generator's device and the tensor's at every call
  that takes ``generator=``;
- a read of the device by the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``): a meta tensor
  has no data to read, and ``DeviceCheck`` stops the run there, so a test counts the draws before the
  first read: the decode loop must run ``SYNC_EVERY`` steps before it reads.

A generator cannot be made on ``meta`` (nor on CUDA without the CUDA library), so ``torch.Generator`` is
replaced by ``DeviceTaggedGenerator``: a CPU generator that reports the device it was asked for. The
draw itself runs without the generator (meta tensors hold no values to draw).

Both tests fail on a sampler that makes its generator on the CPU (``torch.Generator(device="cpu")``) or
reads the device every step.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

from tether import rng
from tether.engine import generate
from tether.generation import BuiltinBackend
from tether.modeling import CACHE_KW
from tether.sampling import SYNC_EVERY, draw_tokens, sample, sync_interval

_REAL_GENERATOR = torch.Generator


class DeviceTaggedGenerator(_REAL_GENERATOR):
    """A CPU generator that reports the device it was made for (meta/CUDA generators cannot be made here)."""

    def __new__(cls, device="cpu"):
        self = super().__new__(cls)  # on the CPU
        self._tagged = torch.device(device)
        return self

    @property
    def device(self):
        return self._tagged


class HostRead(Exception):
    """The host asked the device for a value."""


_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.cpu,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.numpy,
}


class DeviceCheck(TorchFunctionMode):
    """Records (generator device, tensor device) of every call with ``generator=`` and stops at the first
    host read of a non-CPU tensor."""

    def __init__(self):
        super().__init__()
        self.draws: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _READS and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            raise HostRead(getattr(func, "__name__", str(func)))
        gen = kwargs.pop("generator", None)
        if gen is not None:
            target = args[0] if args and isinstance(args[0], torch.Tensor) else None
            device = target.device if target is not None else torch.device(kwargs.get("device") or "cpu")
            self.draws.append((gen.device.type, device.type))
            if device.type == "meta":
                return func(*args, **kwargs)  # shapes only: nothing to draw
            kwargs["generator"] = gen
        return func(*args, **kwargs)


class TinyLM(torch.nn.Module):
    """A stand-in causal LM for the Hugging Face path (decoder="hf"): embedding -> head, no cache."""

    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, **cache):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)), **{CACHE_KW: None})


def _meta_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def _meta_tiny():
    with torch.device("meta"):
        return TinyLM()


TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)
PROMPTS = [[5, 6, 7], [8, 9], [10]]


@pytest.fixture
def tagged(monkeypatch):
    monkeypatch.setattr(torch, "Generator", DeviceTaggedGenerator)


@pytest.mark.parametrize("make, decoder", [(_meta_llama, "lean"), (_meta_tiny, "hf")])
@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9, "top_k": 8}])
def test_generator_is_made_on_the_model_device(tagged, make, decoder, filters):
    """engine.generate(seed=...) (how tether kl, evaluations and best-of-n sample) draws every token with a
    generator on the model's device: on CUDA a CPU generator is refused by torch."""
    model = make()
    check = DeviceCheck()
    with check, pytest.raises(HostRead):  # the run stops at the loop's first read of the (data-less) device
        generate(
            model,
            PROMPTS,
            tokenizer=TOKENIZER,
            seed=0,
            max_new_tokens=2 * SYNC_EVERY,
            sampling=filters,
            backend=BuiltinBackend(model, decoder=decoder),
        )
    assert check.draws, "no random draw reached"
    assert all(g == t == "meta" for g, t in check.draws), check.draws


@pytest.mark.parametrize("make, decoder", [(_meta_llama, "lean"), (_meta_tiny, "hf")])
def test_decode_loop_reads_the_device_every_sync_every_steps(tagged, make, decoder):
    """The first host read of the device comes after SYNC_EVERY steps (SYNC_EVERY draws), not after each
    step: nothing in the per-token loop waits for the GPU. The HF path uses a stand-in model here: a real
    Hugging Face Llama forward reads its attention mask on the host (transformers' own code)."""
    model = make()
    check = DeviceCheck()
    with check, pytest.raises(HostRead):
        sample(
            model,
            PROMPTS,
            pad_id=0,
            eos_id=1,
            max_new_tokens=3 * SYNC_EVERY,
            decoder=decoder,
            generator=rng.generator(0, "meta"),
            top_p=0.9,
        )
    assert len(check.draws) == SYNC_EVERY
    assert sync_interval(torch.device("meta")) == SYNC_EVERY > 1 and sync_interval(torch.device("cpu")) == 1


def test_a_generator_on_another_device_is_refused_with_the_fix():
    probs = torch.full((2, 4), 0.25, device="meta")
    with pytest.raises(ValueError, match="tether.rng.generator"):
        draw_tokens(probs, torch.arange(2, device="meta"), 2, _REAL_GENERATOR())
    model = _meta_llama()
    with pytest.raises(ValueError, match="on the model's device"):
        sample(model, PROMPTS, pad_id=0, eos_id=1, max_new_tokens=2, generator=_REAL_GENERATOR())


def test_cpu_generators_draw_what_they_always_did():
    """rng.generator(s) on the CPU is torch.Generator().manual_seed(s), and rng.mix is the seed formula the
    online trainers used (s <- s·1_000_003 + k mod 2^62): same-seed CPU runs keep their samples."""
    a, b = rng.generator(123), _REAL_GENERATOR().manual_seed(123)
    assert torch.equal(a.get_state(), b.get_state())
    assert rng.mix(7) == 7 and rng.mix(1, 2) == 1_000_003 + 2 and rng.mix(2**61, 3) == (2**61 * 1_000_003 + 3) % 2**62


@pytest.mark.parametrize("filters", [{}, {"top_k": 9, "temperature": 0.8}, {"top_p": 0.85}])
@pytest.mark.parametrize("every", [3, 8])
def test_sync_interval_changes_no_sample(stories, filters, every):
    """Reading the device every k steps (as on a GPU) instead of every step gives the same tokens, masks,
    no-EOS flags and stored sets, and leaves the generator where it would be: the steps run past the last
    EOS are undone in the generator (two batches in a row on one generator check the stream after). EOS is
    "." so rows end at different steps, some between two reads."""
    tok, model = stories
    eos = tok(".", add_special_tokens=False)["input_ids"][-1]
    ids = [tok(t)["input_ids"] for t in ["Once upon a time", "The little dog", "One day, a girl", "Tom was"]] * 2
    g1, g2 = rng.generator(3), rng.generator(3)
    undone = 0  # batches whose last EOS fell between two reads (the generator was set back)
    for _ in range(2):
        want, want_no_eos = sample(
            model, ids, pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=40, generator=g1, sync_every=1, **filters
        )
        got, got_no_eos = sample(
            model,
            ids,
            pad_id=tok.pad_token_id,
            eos_id=eos,
            max_new_tokens=40,
            generator=g2,
            sync_every=every,
            **filters,
        )
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.mask, want.mask)
        assert torch.equal(got_no_eos, want_no_eos)
        assert (got.allowed is None) == (want.allowed is None)
        if want.allowed is not None:
            assert torch.equal(got.allowed, want.allowed)
        assert torch.equal(g1.get_state(), g2.get_state())
        undone += bool(want.mask.shape[1] % every) and not bool(want_no_eos.all())
    assert undone, "every batch ended on a read: nothing was undone in the generator (pick another interval)"


def test_processes_pick_nccl_and_their_gpu_when_cuda_is_there(monkeypatch):
    """torch.distributed (and so FSDP2's collectives) use NCCL for CUDA tensors, gloo on the CPU; each
    process takes the GPU of its LOCAL_RANK."""
    from tether.distributed import process_device, process_group_backend

    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device() == torch.device("cpu")


def test_autocast_computes_in_bf16_and_keeps_float32_weights(stories_path):
    """autocast=True: float32 weights, bf16 logits from the matrix products; a deep copy (the frozen
    reference) computes the same way, so at step 0 policy and reference logits are equal to the bit; autocast
    is off again after a call, also after one that raised; the sampler runs under it."""
    import copy

    from tether.modeling import autocast_dtype, load_causal_lm

    model = load_causal_lm(stories_path, autocast=True)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and autocast_dtype(model) == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 13]])
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    ref = copy.deepcopy(model)
    assert torch.equal(ref(input_ids=ids).logits, logits)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # DPO's packed layout calls these two directly
    assert model.get_output_embeddings()(hidden).dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    plain = load_causal_lm(stories_path)
    assert plain(input_ids=ids).logits.dtype == torch.float32
    with pytest.raises(Exception):
        model(input_ids=torch.tensor([[10**6]]))  # out of the vocabulary: the forward raises
    assert not torch.is_autocast_enabled("cpu")
    b, _ = sample(model, [[1, 5, 9]], pad_id=0, eos_id=None, max_new_tokens=4, generator=rng.generator(0))
    assert b.mask.shape == (1, 4) and int(b.completion_ids.max()) < model.config.vocab_size


def test_autocast_needs_float32_weights():
    from tether.checks import check_train_config
    from tether.errors import UserError
    from tether.trainers.sft import SFTConfig

    with pytest.raises(UserError, match="autocast keeps float32 weights"):
        check_train_config(SFTConfig(autocast=True, dtype="bfloat16"))
