"""Chunked log-probs / entropy / exact KL equal their naive full-tensor formulas, in value and in
gradient, sampling filters behave like transformers' warpers, and the chunked
version never materialises a second (B, T, V) fp32 tensor (measured, in a subprocess)."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tether.ops.logprobs import (
    apply_sampling_filters,
    entropy_from_logits,
    exact_kl_from_logits,
    selective_logps,
)

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = [1, 4, 5, 21, 100]  # B*T = 21 below: sizes that do not divide 21, that equal it, that exceed it


def _logits(*shape, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _naive_logps(logits, tokens):
    return logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


def _naive_entropy(logits):
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _naive_kl(p_logits, q_logits):
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _value_and_grads(fn, inputs, weights):
    """fn(*inputs) and the gradients of Σ weights·fn w.r.t. every input (random upstream weights,
    so a gradient that is right only in its sum would fail)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    return out.detach(), grads


# ---- value and gradient equivalence, float64 (the math, with no rounding to hide behind) ------------


@pytest.mark.parametrize("chunk", CHUNKS)
def test_selective_logps_equals_naive_fp64(chunk):
    logits = _logits(3, 7, 11)  # (B, T, V)
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    w = _logits(3, 7, seed=2)
    got, (g_got,) = _value_and_grads(lambda x: selective_logps(x, tokens, chunk_size=chunk), [logits], w)
    ref, (g_ref,) = _value_and_grads(lambda x: _naive_logps(x, tokens), [logits], w)
    assert got.dtype == torch.float64 and got.shape == (3, 7)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_entropy_equals_naive_fp64(chunk):
    logits = _logits(3, 7, 11, seed=3)
    w = _logits(3, 7, seed=4)
    got, (g_got,) = _value_and_grads(lambda x: entropy_from_logits(x, chunk_size=chunk), [logits], w)
    ref, (g_ref,) = _value_and_grads(_naive_entropy, [logits], w)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-13, atol=1e-13)
    assert (got > 0).all() and (got < torch.log(torch.tensor(11.0, dtype=torch.float64))).all()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_exact_kl_equals_naive_fp64(chunk):
    p, q = _logits(3, 7, 11, seed=5), _logits(3, 7, 11, seed=6)
    w = _logits(3, 7, seed=7)
    got, g_got = _value_and_grads(lambda a, b: exact_kl_from_logits(a, b, chunk_size=chunk), [p, q], w)
    ref, g_ref = _value_and_grads(_naive_kl, [p, q], w)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert (got > 0).all()
    zero = exact_kl_from_logits(p, p + 5.0)  # a constant shift does not change the distribution
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-13)


def test_exact_kl_hand_value():
    """p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ log 2 + ½ log(2/3) = ½ log(4/3) = 0.143841..."""
    p = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).log()
    q = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64).log()
    got = exact_kl_from_logits(p, q)
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)


def test_dtypes_and_shape_errors():
    x32 = _logits(2, 3, 5, dtype=torch.float32)
    t = torch.zeros(2, 3, dtype=torch.long)
    assert selective_logps(x32, t).dtype == torch.float32
    assert selective_logps(x32.double(), t).dtype == torch.float64  # fp64 is not rounded to fp32
    assert entropy_from_logits(x32.half()).dtype == torch.float32  # fp16 is upcast
    with pytest.raises(ValueError, match="disagree"):
        selective_logps(x32, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="share the vocabulary"):
        exact_kl_from_logits(x32, _logits(2, 3, 6, dtype=torch.float32))
    empty = selective_logps(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long), chunk_size=2)
    assert empty.shape == (0, 3)


# ---- bf16 logits: computed in fp32 -------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [5, 100])
def test_bf16_logits_match_naive_upcast(chunk):
    logits = _logits(3, 7, 50, seed=8, dtype=torch.bfloat16)
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(9))
    w = _logits(3, 7, seed=10, dtype=torch.float32)
    got, (g_got,) = _value_and_grads(lambda x: selective_logps(x, tokens, chunk_size=chunk), [logits], w)
    ref, (g_ref,) = _value_and_grads(lambda x: _naive_logps(x.float(), tokens), [logits], w)
    assert got.dtype == torch.float32 and g_got.dtype == torch.bfloat16
    # Both are fp32 computations on the same bf16 inputs (log-softmax vs gather - logsumexp): equal
    # to a few fp32 ulps of |logp| ≲ 20.
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    # The fp32 gradients differ by fp32 rounding, then both are rounded to bf16 (8-bit mantissa): a
    # rounding boundary between them can make them differ by one bf16 ulp, i.e. 2^-7 relative.
    torch.testing.assert_close(g_got.float(), g_ref.float(), rtol=2**-7, atol=1e-6)
    # And the fp32 result is far more accurate than a bf16 log_softmax would be (error ~ 2^-8 |logp|).
    exact = _naive_logps(logits.double(), tokens)
    assert (got.double() - exact).abs().max() < 1e-5
    got_e = entropy_from_logits(logits, chunk_size=chunk)
    torch.testing.assert_close(got_e, _naive_entropy(logits.float()), rtol=1e-6, atol=1e-5)
    got_kl = exact_kl_from_logits(logits, logits.flip(-1), chunk_size=chunk)
    torch.testing.assert_close(got_kl, _naive_kl(logits.float(), logits.flip(-1).float()), rtol=1e-5, atol=1e-5)


# ---- sampling filters ---------------------------------------------------------------------------------


def test_temperature_divides_logits():
    x = torch.tensor([1.0, 2.0, -4.0])
    torch.testing.assert_close(apply_sampling_filters(x, temperature=2.0), torch.tensor([0.5, 1.0, -2.0]))
    with pytest.raises(ValueError):
        apply_sampling_filters(x, temperature=0.0)


def test_top_k_keeps_k_largest_and_ties():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 1.0]])
    out = apply_sampling_filters(x, top_k=2)
    inf = float("-inf")
    assert out[0].tolist() == [inf, 3.0, 2.0, inf]
    # ties with the k-th value are kept (as transformers' TopKLogitsWarper: scores < kth are removed)
    assert out[1].tolist() == [5.0, 5.0, 5.0, inf]
    assert torch.equal(apply_sampling_filters(x, top_k=0), x)  # 0 = off
    assert torch.equal(apply_sampling_filters(x, top_k=4), x)


def test_top_p_keeps_smallest_nucleus():
    """p = (0.5, 0.3, 0.15, 0.05). top_p = 0.75: the ascending cumsum is (0.05, 0.2, 0.5, 1.0); tokens
    with cumsum ≤ 1 - 0.75 = 0.25 go, so 0.15 and 0.05 go and {0.5, 0.3} (mass 0.8 ≥ 0.75) stays.
    top_p = 0.4: only 0.5 stays. A tiny top_p still keeps the most likely token."""
    x = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(apply_sampling_filters(x, top_p=0.75)) == [True, True, False, False]
    assert kept(apply_sampling_filters(x, top_p=0.4)) == [True, False, False, False]
    assert kept(apply_sampling_filters(x, top_p=1e-9)) == [True, False, False, False]
    assert kept(apply_sampling_filters(x, top_p=1.0)) == [True, True, True, True]
    # order: temperature, then top-k, then top-p (transformers' warper order); at T = 2 the
    # distribution flattens to ∝ sqrt(p) = (0.39, 0.30, 0.21, 0.12) and top_p 0.75 keeps three.
    assert kept(apply_sampling_filters(x, temperature=2.0, top_p=0.75)) == [True, True, True, False]
    assert kept(apply_sampling_filters(x, top_k=3, top_p=0.99)) == [True, True, True, False]


def test_kl_and_entropy_with_filtered_tokens_have_no_nan_grads():
    """p = top-2 of softmax(x): renormalised p' on the kept support. KL[p'‖q] = Σ_kept p' log(p'/q),
    H[p'] = -Σ_kept p' log p'; the -inf entries contribute 0 to both, and to the gradients."""
    x = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[[0.0, 0.5, 1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    filtered = apply_sampling_filters(x, top_k=2)
    kl = exact_kl_from_logits(filtered, q)
    ent = entropy_from_logits(filtered)
    p_kept = torch.softmax(x.detach()[0, 0, :2], -1)
    logq = torch.log_softmax(q.detach()[0, 0], -1)
    assert kl.item() == pytest.approx((p_kept * (p_kept.log() - logq[:2])).sum().item(), rel=1e-13)
    assert ent.item() == pytest.approx(-(p_kept * p_kept.log()).sum().item(), rel=1e-13)
    gx, gq = torch.autograd.grad(kl.sum() + ent.sum(), [x, q])
    assert torch.isfinite(gx).all() and torch.isfinite(gq).all()
    assert gx[0, 0, 2:].abs().max() == 0  # filtered-out logits receive no gradient
    # reverse direction: q puts mass where the filtered p has none -> KL[q‖p'] = +inf, not NaN
    assert exact_kl_from_logits(q.detach(), filtered.detach()).item() == float("inf")


# ---- memory: chunked never materialises a second (B, T, V) fp32 tensor ------------------------------

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, os, resource
    import torch
    from tether.ops.logprobs import selective_logps
    torch.set_num_threads(1)
    B, T, V, CHUNK = 4, 256, 50257, 128
    FNS = {
        "chunked": lambda x, t: selective_logps(x, t, chunk_size=CHUNK),
        "naive": lambda x, t: x.float().log_softmax(-1).gather(-1, t[..., None])[..., 0],
    }
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # warm-up on a tiny input: lazy initialisation (kernels, autograd, checkpoint) is not the algorithm
    for fn in FNS.values():
        small = torch.randn(2, 3, 7, requires_grad=True)
        fn(small, torch.randint(0, 7, (2, 3))).sum().backward()
    results = {}
    for mode in FNS:
        for grad in (False, True):
            # one forked child per measurement: its ru_maxrss starts at the parent's current RSS,
            # so each peak is measured from a clean slate while torch is imported only once
            r, w = os.pipe()
            if os.fork() == 0:
                g = torch.Generator().manual_seed(0)
                logits = torch.randn(B, T, V, generator=g).requires_grad_(grad)
                tokens = torch.randint(0, V, (B, T), generator=g)
                before = peak_mb()
                out = FNS[mode](logits, tokens)  # with grad, what autograd keeps stays alive in `out`
                os.write(w, json.dumps(peak_mb() - before).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                results[f"{mode}/{'grad' if grad else 'no_grad'}"] = json.loads(f.read())
            os.wait()
    print(json.dumps({"extra_mb": results, "full_mb": B * T * V * 4 / 2**20}))
    """
)


def test_chunked_logps_memory_on_50k_vocab():
    """Peak-RSS growth of computing (4, 256, 50257) fp32 log-probs, chunked (128 rows a chunk) vs
    naive log_softmax + gather, without and with autograd. One full (B, T, V) fp32 tensor is 196 MB.

    Expected: chunked = one chunk's fp32 temporary (128/1024 of a full tensor = 24.5 MB: the
    exp(x - max) inside logsumexp), with or without grad (checkpointing keeps nothing but the input);
    naive ≥ one full tensor (the log_softmax output, which autograd also keeps). Margins: chunked <
    0.5 full (4 chunks: on a loaded CI machine 57 MB = 2.3 chunks was measured — the fp32 cast of the
    chunk and the exp temporary can coexist, plus allocator/page rounding), naive > 0.95 full: the two
    stay separated by a factor of 2 or more.
    MALLOC_MMAP_THRESHOLD_ fixes glibc's threshold so every large buffer is mmapped and unmapped on
    free; with the default dynamic threshold, freed chunk buffers can stay in the heap and the
    measurement sometimes reads 5 chunks instead of 1 (allocator caching, not the algorithm).
    Note DEFAULT_CHUNK = 1024 = B·T here would be a single chunk, hence the explicit chunk size.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    full, extra = res["full_mb"], res["extra_mb"]
    assert full == pytest.approx(196.3, rel=1e-3)
    for grad in ("no_grad", "grad"):
        assert extra[f"chunked/{grad}"] < 0.5 * full, res
        assert extra[f"naive/{grad}"] > 0.95 * full, res
