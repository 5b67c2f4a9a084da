"""The shared-prompt layout (tether.shared_prompt): a group of completions of one prompt scored as one row
under a prefix-tree mask gives the padded layout's log-probs, exact KL and gradients, on Llama (the real
stories260K), GPT-2 and Qwen2 (small seeded models), with sdpa and eager attention; unsupported models
fall back; the GRPO trainer with it on follows the trajectory it follows with it off."""

import copy
import dataclasses
import logging

import pytest
import torch

from tether.errors import UserError
from tether.modeling import forward_completion, make_batch
from tether.ops.kl import kl_per_token
from tether.ops.logprobs import selective_logps
from tether.shared_prompt import prefer_shared, shared_layout, shared_prompt_mode

from conftest import assert_close, f32_tol, logit_magnitude, seq_logps_tol

VOCAB = 512


def _tiny(arch: str, attn: str = "sdpa", **extra):
    """A seeded 2-layer model of ``arch`` with stories260K's vocabulary size (GQA for Qwen2)."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2, **extra)
    else:
        cfg = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **extra,
        )
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg).eval()


def _reference(model):
    """A reference that differs from ``model``: its copy with every weight perturbed by 5% of its mean size."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return ref.eval()


def _groups(seed: int = 1):
    """3 prompts of different lengths with 4 completions each (one empty, lengths 0..8), and one lone prompt:
    groups of several rows, ragged completions, and a row that shares nothing."""
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for i, plen in enumerate((3, 9, 6)):
        p = torch.randint(3, VOCAB, (plen,), generator=g).tolist()
        for j in range(4):
            n = 0 if (i, j) == (1, 2) else int(torch.randint(1, 9, (1,), generator=g))
            prompts.append(p)
            comps.append(torch.randint(3, VOCAB, (n,), generator=g).tolist())
    prompts.append(torch.randint(3, VOCAB, (5,), generator=g).tolist())
    comps.append(torch.randint(3, VOCAB, (7,), generator=g).tolist())
    return make_batch(prompts, comps, pad_id=0)


@pytest.fixture(scope="module")
def models(stories):
    return {
        "llama": stories[1],
        "gpt2": _tiny("gpt2"),
        "qwen2": _tiny("qwen2"),
        "gpt2-eager": _tiny("gpt2", "eager"),
        "qwen2-eager": _tiny("qwen2", "eager"),
    }


def test_layout_by_hand():
    """prompt [5, 6] with completions [7, 8, 9] and [10]: one row [5, 6, 7, 8] (token 9 predicts nothing
    counted; [10] needs only the prompt's last position), positions 0..3, completion 1 attending to the
    prompt and to itself; the lone prompt [4] with [11, 12] its own row [4, 11]."""
    b = make_batch([[5, 6], [5, 6], [4]], [[7, 8, 9], [10], [11, 12]], pad_id=0)
    lay = shared_layout(b)
    assert lay.input_ids.tolist() == [[5, 6, 7, 8], [4, 11, 0, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    T = True
    F = False
    assert lay.allowed[0].tolist() == [[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]
    assert lay.allowed[1, :2, :2].tolist() == [[T, F], [T, T]] and not lay.allowed[1, :2, 2:].any()
    assert lay.keep.tolist() == [1, 2, 3, 4, 5]  # flat (R·W) indices: row 0 pos 1..3, row 1 pos 0..1
    U = 5
    assert lay.src.tolist() == [[0, 1, 2], [0, U, U], [3, 4, U]]
    assert (lay.tokens, lay.padded_tokens) == (8, 3 * (2 + 3))


def test_two_completions_do_not_see_each_other():
    """Completion 2 placed after completion 1 in the row attends to the prompt and itself only."""
    b = make_batch([[5, 6]] * 2, [[7, 8, 9], [10, 11]], pad_id=0)
    lay = shared_layout(b)
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 10]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert lay.allowed[0, 4].tolist() == [True, True, False, False, True]


def _logps(logits, b):
    return selective_logps(logits, b.completion_ids).masked_fill(~b.mask, 0.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt2-eager", "qwen2-eager"])
def test_logps_kl_and_gradients_equal_the_padded_layout(arch, models):
    """Per-token log-probs, the exact per-token KL against a second model, the value-head hidden states and
    every parameter's gradient of a loss over them, shared layout against padded.

    Tolerances: a log-prob is logit - logsumexp, two kernels differ by float32 spacings of the logit's
    dot-product magnitude (``logit_magnitude``): seq_logps_tol(m, 1) per token. The exact KL per token is
    Σ_v p_v (log p_v - log q_v): each log-prob carries 2·m of rounding for either model, weighted by p
    (summing to 1), plus p's own rounding times the largest |log p - log q|. Gradients: the
    reference value is the padded layout run in float64, and the shared layout's float32 gradient must be
    no further from it than 8x the padded layout's own float32 distance from it plus 8 spacings of the
    gradient's size: the layout may add another summation order's rounding (independent errors of the same
    size; measured over the kernel settings of tests/tolerance_report.py: up to 1.9x), nothing else. (A float64 run is
    not exact here: Llama's and Qwen2's RMSNorm compute in float32 whatever the model's dtype, so even two
    float64 runs of one layout differ by float32-sized amounts when only their summation order differs.)"""
    model = models[arch]
    ref = _reference(model)
    b = _groups()
    bs = dataclasses.replace(b, shared_prompt="on")
    lay = shared_layout(b)
    assert lay.tokens < lay.padded_tokens  # the point: fewer positions computed

    def run(batch, m, r):
        m.zero_grad(set_to_none=True)
        logits, h = forward_completion(m, batch, hidden=True)
        with torch.no_grad():
            ref_logits = forward_completion(r, batch)[0]
        lp = _logps(logits, batch)  # tether's: float32
        kl = kl_per_token(
            lp, _logps(ref_logits, batch), batch.mask, estimator="exact", logits=logits, ref_logits=ref_logits
        ).per_token
        # the loss in the model's own dtype (tether's log-prob ops compute in float32): Σ w·log p(y) + exact KL
        # + a value-head-like term on the hidden states, counted tokens only
        logp, logq = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        y = logp.gather(-1, batch.completion_ids[..., None])[..., 0]
        kl_m = (logp.exp() * (logp - logq)).sum(-1)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        loss = ((w * y + kl_m + 1e-2 * h.sum(-1)) * batch.mask).sum()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        return lp.detach(), kl.detach(), h.detach(), grads

    lp0, kl0, h0, g0 = run(b, model, ref)
    lp1, kl1, h1, g1 = run(bs, model, ref)
    mag = logit_magnitude(model, b.input_ids)
    mag_ref = logit_magnitude(ref, b.input_ids)
    assert_close(lp1, lp0, abs=seq_logps_tol(mag, 1), what=f"{arch} logps")
    assert (lp1[~b.mask] == 0).all()
    spread = float((lp0 - _logps(forward_completion(ref, b)[0].detach(), b)).abs().max()) + 1.0
    assert_close(kl1, kl0, abs=f32_tol(2 * mag, 2 * mag_ref, spread), what=f"{arch} exact KL")
    hmag = float(h0.abs().max())
    assert_close(h1[b.mask], h0[b.mask], abs=f32_tol(hmag, mag), what=f"{arch} hidden")
    assert g0.keys() == g1.keys() and len(g0) > 0

    # the reference value of the gradient: the padded layout in float64 (sdpa: eager's padded layout gives NaN
    # gradients in float64 on the left padding's fully masked rows)
    m64, r64 = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
    for m in (m64, r64):
        m.config._attn_implementation = "sdpa"
    _, _, _, e0 = run(b, m64, r64)
    for n in e0:
        own = float((g0[n].double() - e0[n]).abs().max())  # the padded layout's own float32 error
        assert_close(g1[n].double(), e0[n], abs=8 * own + f32_tol(float(e0[n].abs().max())), what=f"{arch} grad {n}")


def test_unsupported_attention_falls_back_to_the_padded_layout(caplog):
    """A model whose attention cannot take the mask (sliding-window layers here) keeps the padded layout,
    with identical numbers, and says so once."""
    model = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    b = _groups()
    with caplog.at_level(logging.INFO, logger="tether.shared_prompt"):
        got = forward_completion(model, dataclasses.replace(b, shared_prompt="on"))[0]
    want = forward_completion(model, b)[0]
    assert torch.equal(got, want)
    assert "padded layout" in caplog.text and "sliding" in caplog.text


def test_auto_chooses_by_arithmetic(stories):
    """auto: long prompts in groups -> shared; two-token prompts with long completions -> padded (the
    dense mask over G·T positions costs more attention than the prompt saves)."""
    model = stories[1]
    long_prompt = make_batch([list(range(3, 200))] * 8, [list(range(3, 35))] * 8, pad_id=0)
    short = make_batch([[3, 4]] * 8, [list(range(3, 200))] * 8, pad_id=0)
    lone = make_batch([list(range(3, 200)), list(range(4, 201))], [[5, 6], [7, 8]], pad_id=0)
    assert prefer_shared(model, long_prompt, shared_layout(long_prompt))
    assert not prefer_shared(model, short, shared_layout(short))
    assert not prefer_shared(model, lone, shared_layout(lone))  # nothing shared


def test_mode_values():
    assert [shared_prompt_mode(v) for v in ("auto", "true", True, "on", "false", False, "off")] == [
        "auto",
        "on",
        "on",
        "on",
        "off",
        "off",
        "off",
    ]
    with pytest.raises(UserError, match="shared_prompt"):
        shared_prompt_mode("sometimes")


# A long shared prompt (the stories260K tokenizer: ~4 characters a token), so each group's prompt is most of
# its arithmetic, as on the real workloads (docs/speed.md).
LONG = (
    "Once upon a time, in a small town by the sea, there lived a little girl named Lily who loved to walk on "
    "the beach with her dog. One sunny morning she found a shiny shell"
)
SAME_TRAJECTORY = [
    "kl/ref",
    "kl/penalty",
    "kl/ref_token_mean",
    "policy/entropy",
    "reward/score",
    "opt/grad_norm",
    "gen/response_len",
]
TRAINER_PROMPTS = [LONG, LONG.replace("Lily", "Tom").replace("girl", "boy"), "The little dog", "One day, a cat"]


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_trainer_trajectory_with_and_without_the_shared_layout(method, stories_path, tmp_path, monkeypatch):
    """GRPO, RLOO and PPO on stories260K, 3 steps, G = 4, two micro-batches (GRPO), one (RLOO, whose KL is in
    the reward), or PPO's scoring pass, value model (a critic: its own padded forward) and 2 epochs of 2
    minibatches: shared_prompt true against false. The rollouts are the same samples (sampling does not use
    the layout), every forward of the update and of the reference runs in the shared layout (counted), and
    the trajectory's metrics agree (KL, entropy, scores, gradient norm, every step). Tolerance: as for
    score_from_update's comparison (tests/test_online_trainers.py), the two runs compute the same mathematics
    in another summation order; a wrong position, mask or gathered row moves the log-probs by whole nats
    (test above), and the run moves kl/ref by ~1e-2. The weights themselves are not compared: Adam turns a
    rounding-sized gradient element into a ±lr step (measured here: up to 1e-4 of 1.5e-3 moved), so the
    gradients are compared before any step, in the test above."""
    import tether.modeling as modeling
    from tether.trainers.grpo import GRPOConfig, train_grpo
    from tether.trainers.ppo import PPOConfig, train_ppo
    from tether.trainers.rloo import RLOOConfig, train_rloo

    cls, train = {"grpo": (GRPOConfig, train_grpo), "rloo": (RLOOConfig, train_rloo), "ppo": (PPOConfig, train_ppo)}[
        method
    ]
    extra = dict(num_epochs=2, num_minibatches=2) if method == "ppo" else {}
    used = []
    inner = modeling.forward_completion_shared

    def counted(*a, **k):
        out = inner(*a, **k)
        used.append(out is not None)
        return out

    monkeypatch.setattr(modeling, "forward_completion_shared", counted)
    runs = {}
    for on in (False, True):
        used.clear()
        cfg = cls(
            model=stories_path,
            output_dir=str(tmp_path / f"{method}{on}"),
            batch_size=16,
            samples_per_prompt=4,
            grad_accum=2 if method == "grpo" else 1,
            max_steps=3,
            max_new_tokens=12,
            learning_rate=5e-4,
            progress=False,
            sample_every=0,
            eval_every=0,
            eval_max_prompts=4,
            eval_samples=1,
            seed=0,
            shared_prompt=on,
            **extra,
        )
        runs[on] = (train(cfg, prompts=TRAINER_PROMPTS), list(used))
    (off, used_off), (on, used_on) = runs[False], runs[True]
    assert not used_off and used_on and all(used_on)  # off: never tried; on: every forward over a rollout shared
    assert len(used_on) >= 3 * 2  # per step at least the reference's and the policy's forward
    # (mismatch/* is left out: it measures the sampler's rounding against the scorer's, ~1e-7 either way)
    keys = SAME_TRAJECTORY
    # The score_from_update trajectory test's budget (rel 1e-4, abs 1e-6); tests/tolerance_report.py measured
    # the worst |diff| / tolerance of these rows at 0.24 over the native, AVX2 and SSE4.2 kernels (~4x headroom),
    # while the run's metrics move by > 1e-3 (the kl/ref check below).
    for a, b in zip(off["history"], on["history"], strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert off["history"][-1]["kl/ref"] > 1e-3  # the run moved
