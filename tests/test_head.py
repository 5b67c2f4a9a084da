"""tether.ops.head.head_scores: log-probs, exact KL, entropy and filter cost from hidden states, the LM
head applied chunk by chunk, equal in value and gradient to the (B, T, V) logits path of ops.logprobs.

Both paths compute the same operations on each row; the head's product over a chunk of rows may take
another BLAS kernel than over all rows, so logits differ by δ ≤ 8 float32 spacings of their dot-product
magnitude M_z = max Σ_i |h_i W_vi| / τ, and every score (a log-softmax of the logits, or a p-weighted sum
of differences of two) by at most 4δ plus the rounding of its own size."""

from __future__ import annotations

import pytest
import torch

from tether.ops.head import head_scores
from tether.ops.logprobs import (
    apply_sampling_filters,
    entropy_from_logits,
    exact_kl_from_logits,
    filter_cost_from_logits,
    pack_allowed,
    selective_logps,
)

from conftest import f32_tol


def _problem(seed=0, B=3, T=13, D=16, V=300, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).requires_grad_()
    W = (torch.randn(V, D, generator=g) / 2).requires_grad_()
    b = (torch.randn(V, generator=g) / 4).requires_grad_() if bias else None
    rh, rW = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) / 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    return h, W, b, rh, rW, tokens


def _full(h, W, b, rh, rW, tokens, tau, allowed):
    """The (B, T, V) path: forward_completion's logits, the reference's tempered ones, ops.logprobs."""
    z = apply_sampling_filters(torch.nn.functional.linear(h, W, b), temperature=tau, allowed=allowed)
    zq = torch.nn.functional.linear(rh, rW) / tau
    return {
        "logps": selective_logps(z, tokens),
        "ref_logps": selective_logps(zq, tokens),
        "kl_exact": exact_kl_from_logits(z, zq),
        "entropy": entropy_from_logits(z),
        "filter_cost": filter_cost_from_logits(z, zq),
    }, z


@pytest.mark.parametrize("tau,filtered,bias", [(1.0, False, False), (0.7, True, False), (1.3, True, True)])
def test_head_scores_equal_the_logits_path(tau, filtered, bias):
    """Values of all five scores and gradients (to hidden, head weight and bias) of a random mix of the
    differentiable ones, chunks of 8 of 39 positions (the last one short) against the full logits.

    Gradient tolerance: the gradient of the logits G_z (B, T, V) reaches h as G_z W / τ and W as G_zᵀ h / τ;
    each is a sum whose rounding is 8 spacings of its magnitude M = max |G_z| |W| (or |G_z|ᵀ |h|) / τ, and
    G_z itself (p-weighted terms of the logits) moves by at most 4δ relative when the recomputed logits
    differ by δ: f32_tol(M) · (1 + 4 M_z)."""
    h, W, b, rh, rW, tokens = _problem(bias=bias)
    allowed = None
    if filtered:  # a top-5 set per position, as the sampler stores it (packed)
        z0 = torch.nn.functional.linear(h, W).detach() / tau
        top = torch.topk(z0, 5, -1)
        allowed = pack_allowed(z0 >= top.values[..., -1:])
        pick = torch.randint(0, 5, (*tokens.shape, 1), generator=torch.Generator().manual_seed(2))
        tokens = top.indices.gather(-1, pick).squeeze(-1)  # sampled tokens lie in F_t
    want, z = _full(h, W, b, rh, rW, tokens, tau, allowed)
    got = head_scores(
        h, W, tokens, bias=b, ref_hidden=rh, ref_weight=rW, temperature=tau, allowed=allowed, chunk_size=8
    )
    Mz = float((h.detach().abs() @ W.detach().abs().t()).max() + (b.detach().abs().max() if bias else 0)) / tau
    Mzq = float((rh.abs() @ rW.abs().t()).max()) / tau
    for k, w in want.items():
        err = float((got[k] - w).detach().abs().max())
        assert err <= f32_tol(4 * (Mz + Mzq), float(w.detach().abs().max())), (k, err)
    c = torch.randn(3, *tokens.shape, generator=torch.Generator().manual_seed(1))

    def loss(s):
        return (c[0] * s["logps"] + c[1] * s["kl_exact"] + c[2] * s["entropy"]).sum()

    params = [h, W] + ([b] if bias else [])
    g_want = torch.autograd.grad(loss(want), params + [z], retain_graph=True)
    g_z = g_want[-1].detach().abs().nan_to_num(0.0).reshape(-1, W.shape[0])  # (N, V)
    g_got = torch.autograd.grad(loss(got), params)
    bounds = [
        (g_z @ W.detach().abs()).max() / tau,  # dL/dh
        (g_z.t() @ h.detach().abs().reshape(-1, h.shape[-1])).max() / tau,  # dL/dW
        g_z.sum(0).max() / tau,  # dL/db
    ]
    for name, gw, gg, M in zip(("hidden", "weight", "bias"), g_want, g_got, bounds):
        err = float((gg - gw).abs().max())
        assert err <= f32_tol(float(M)) * (1 + 4 * Mz), (name, err)
        assert float(gw.abs().max()) > 100 * err  # a real gradient, compared


def test_head_scores_without_reference_and_no_grad():
    """Without a reference only logps and entropy; under no_grad no graph; shapes follow the tokens."""
    h, W, _, _, _, tokens = _problem(B=2, T=5)
    with torch.no_grad():
        s = head_scores(h, W, tokens, chunk_size=3)
        want = selective_logps(torch.nn.functional.linear(h, W), tokens)
    assert set(s) == {"logps", "entropy"} and s["logps"].shape == (2, 5) and not s["logps"].requires_grad
    Mz = float((h.detach().abs() @ W.detach().abs().t()).max())
    assert float((s["logps"] - want).abs().max()) <= f32_tol(4 * Mz)
    with pytest.raises(ValueError, match="positions"):
        head_scores(h, W, tokens[:, :4])


def test_head_scores_on_stories_equal_score_rows(stories):
    """On the real stories260K, a sample with τ = 0.8 and top-k 9: the scores from the final hidden states
    (``forward_completion(hidden=True)``) and the heads equal ``engine.score_rows`` on the policy's and a
    perturbed reference's logits (the (B, T, V) path the online update uses)."""
    import copy

    from tether.engine import score_rows
    from tether.modeling import forward_completion
    from tether.sampling import sample

    from conftest import logit_magnitude

    torch.set_num_threads(1)
    tok, model = stories
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids = [tok(t)["input_ids"] for t in ("Once upon a time", "The little dog", "Tom was")]
    filters = {"temperature": 0.8, "top_k": 9}
    batch, _ = sample(model, ids, pad_id=0, eos_id=None, max_new_tokens=10, generator=torch.Generator(), **filters)
    with torch.no_grad():
        logits, hidden = forward_completion(model, batch, filters=filters, hidden=True)
        ref_logits, ref_hidden = forward_completion(ref, batch, filters={"temperature": 0.8}, hidden=True)
        want = score_rows(logits, ref_logits, batch, estimators=("exact",))
        got = head_scores(
            hidden, model.lm_head.weight, batch.completion_ids, ref_hidden=ref_hidden,
            ref_weight=ref.lm_head.weight, temperature=0.8, allowed=batch.allowed, chunk_size=7,
        )  # fmt: skip
    mag = (logit_magnitude(model, batch.input_ids) + logit_magnitude(ref, batch.input_ids)) / 0.8
    for k in ("logps", "ref_logps", "kl_exact", "entropy", "filter_cost"):
        err = float((got[k].masked_fill(~batch.mask, 0.0) - want[k]).abs().max())
        assert err <= f32_tol(4 * mag, float(want[k].abs().max())), (k, err)
