"""Preference losses (tether.ops.preference): hand-derived values and gradients, equivalences,
population minimisers on a small categorical problem (the claims in ``TARGETS``), and TRL's loss.

Conventions used in the derivations: lr = logπ_θ - logπ_ref per response, Δ = lr_w - lr_l, h = β·Δ,
σ the logistic function. Identities: d/dh[-log σ(h)] = -σ(-h); d/dh[-log σ(-h)] = σ(h);
-log σ(-h) = -log σ(h) + h. Gradients w.r.t. chosen_logps are β·dL/dh, w.r.t. rejected_logps -β·dL/dh.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tether.errors import UserError
from tether.ops.preference import LOSS_TYPES, TARGETS, f_divergence_score, preference_loss

LOG3 = math.log(3.0)
BETA = 0.5


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _batch(lr_w, lr_l, ref_w=(-3.0, -4.0, -1.5), ref_l=(-2.0, -4.0, -2.5)):
    """(B=len(lr_w)) leaf tensors with given per-response log-ratios; refs require grad to prove they get none."""
    ref_w = torch.tensor(ref_w[: len(lr_w)], requires_grad=True)
    ref_l = torch.tensor(ref_l[: len(lr_l)], requires_grad=True)
    chosen = (ref_w.detach() + torch.tensor(lr_w)).requires_grad_()
    rejected = (ref_l.detach() + torch.tensor(lr_l)).requires_grad_()
    return chosen, rejected, ref_w, ref_l


def _loss_and_grads(loss_type, lr_w, lr_l, beta=BETA, lengths=None, **kw):
    chosen, rejected, ref_w, ref_l = _batch(lr_w, lr_l)
    lens = (None, None) if lengths is None else (torch.tensor(lengths[0]), torch.tensor(lengths[1]))
    losses, stats = preference_loss(chosen, rejected, ref_w, ref_l, *lens, beta=beta, loss_type=loss_type, **kw)
    losses.sum().backward()
    assert ref_w.grad is None and ref_l.grad is None, "the reference must receive no gradient"
    return losses.detach(), chosen.grad, rejected.grad, stats


# Two examples in every batch: (lr_w, lr_l) = (log 3, -log 3) -> Δ = 2 log 3, h = log 3, σ(h) = 3/4;
# and (0.3, 0.3) -> Δ = 0, h = 0, σ(h) = 1/2.
LR_W, LR_L = [LOG3, 0.3], [-LOG3, 0.3]


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_dpo_sigmoid_value_and_grad():
    """L = -log σ(h). h = log 3: L = log(4/3), dL/dh = -σ(-h) = -1/4 -> d/dchosen = β·(-1/4) = -1/8.
    h = 0: L = log 2, dL/dh = -1/2 -> d/dchosen = -1/4. d/drejected is the negative."""
    losses, g_w, g_l, _ = _loss_and_grads("sigmoid", LR_W, LR_L)
    _close(losses, [math.log(4 / 3), math.log(2)])
    _close(g_w, [-BETA / 4, -BETA / 2])
    _close(g_l, [BETA / 4, BETA / 2])


def test_cdpo_value_grad_and_stationary_point():
    """L = (1-ε)(-log σ(h)) + ε(-log σ(-h)), dL/dh = σ(h) - (1-ε).
    ε = 0.1, h = log 3: L = 0.9·log(4/3) + 0.1·log 4, dL/dh = 3/4 - 0.9 = -0.15.
    h = 0: L = log 2, dL/dh = 1/2 - 0.9 = -0.4. Stationary where σ(h) = 1-ε, h* = logit(0.9) = log 9:
    the gradient vanishes there, is negative below and positive above (a minimum)."""
    eps = 0.1
    losses, g_w, g_l, _ = _loss_and_grads("cdpo", LR_W, LR_L, label_smoothing=eps)
    _close(losses, [0.9 * math.log(4 / 3) + 0.1 * math.log(4), math.log(2)])
    _close(g_w, [BETA * -0.15, BETA * -0.4])
    _close(g_l, [-BETA * -0.15, -BETA * -0.4])

    h_star = math.log(9.0)  # logit(1 - ε)
    delta = [h_star / BETA + d for d in (-0.2, 0.0, 0.2)]
    _, g_w, _, _ = _loss_and_grads("cdpo", [x / 2 for x in delta], [-x / 2 for x in delta], label_smoothing=eps)
    assert g_w[0] < -1e-3 and abs(g_w[1]) < 1e-6 and g_w[2] > 1e-3


def test_robust_value_and_grad():
    """L = [(1-ε)(-log σ(h)) - ε(-log σ(-h))]/(1-2ε), dL/dh = -[(1-ε)σ(-h) + εσ(h)]/(1-2ε).
    ε = 0.1, h = log 3: L = (0.9·log(4/3) - 0.1·log 4)/0.8, dL/dh = -(0.9/4 + 0.1·3/4)/0.8 = -0.375.
    h = 0: L = (0.8·log 2)/0.8 = log 2, dL/dh = -(0.45 + 0.05)/0.8 = -0.625."""
    eps = 0.1
    losses, g_w, g_l, _ = _loss_and_grads("robust", LR_W, LR_L, label_smoothing=eps)
    _close(losses, [(0.9 * math.log(4 / 3) - 0.1 * math.log(4)) / 0.8, math.log(2)])
    _close(g_w, [BETA * -0.375, BETA * -0.625])
    _close(g_l, [BETA * 0.375, BETA * 0.625])


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_robust_is_unbiased_under_label_flips(eps):
    """Chowdhury et al.: if the label is flipped with probability ε (chosen and rejected swapped), the
    expected robust loss is the clean DPO loss, exactly: (1-ε)·L(h) + ε·L(-h) = -log σ(h) — and so is
    its gradient. The expectation is computed exactly by evaluating both label outcomes."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)
    ref_w, ref_l = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)

    def grads(fn):
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        value = fn(c, r)
        value.sum().backward()
        return value.detach(), c.grad, r.grad

    def expected_robust(c, r):
        kept, _ = preference_loss(c, r, ref_w, ref_l, beta=0.3, loss_type="robust", label_smoothing=eps)
        flipped, _ = preference_loss(r, c, ref_l, ref_w, beta=0.3, loss_type="robust", label_smoothing=eps)
        return (1 - eps) * kept + eps * flipped

    def clean_dpo(c, r):
        return preference_loss(c, r, ref_w, ref_l, beta=0.3, loss_type="sigmoid")[0]

    for a, b in zip(grads(expected_robust), grads(clean_dpo)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the noisy *DPO* loss is biased, so the check above can fail:
    noisy_dpo = (1 - eps) * clean_dpo(chosen, rejected) + eps * preference_loss(
        rejected, chosen, ref_l, ref_w, beta=0.3, loss_type="sigmoid"
    )[0]
    assert (noisy_dpo - clean_dpo(chosen, rejected)).abs().max() > 1e-2


def test_ipo_with_and_without_length_normalisation():
    """L = (gap - 1/(2β))², β = 0.5 -> 1/(2β) = 1, dL/dgap = 2(gap - 1).
    Sequence sums (DPO reference code): gap = Δ = 2 log 3 -> L = (2 log 3 - 1)², d/dchosen = 2(2 log 3 - 1).
    Per-token (TRL), |y_w| = 2, |y_l| = 4: gap = log3/2 + log3/4 = 3 log3/4,
    L = (3 log3/4 - 1)², d/dchosen = 2(gap-1)/2, d/drejected = -2(gap-1)/4.
    Second example: Δ = 0 -> L = 1, d/dchosen = -2 (raw); normalised with |y_w| = |y_l| = 3, gap = 0.3/3 - 0.3/3
    = 0, L = 1, d/dchosen = -2/3, d/drejected = +2/3."""
    losses, g_w, g_l, _ = _loss_and_grads("ipo", LR_W, LR_L)
    _close(losses, [(2 * LOG3 - 1) ** 2, 1.0])
    _close(g_w, [2 * (2 * LOG3 - 1), -2.0])
    _close(g_l, [-2 * (2 * LOG3 - 1), 2.0])

    gap = 0.75 * LOG3
    losses, g_w, g_l, _ = _loss_and_grads("ipo", LR_W, LR_L, lengths=([2, 3], [4, 3]), ipo_length_normalize=True)
    _close(losses, [(gap - 1) ** 2, 1.0])
    _close(g_w, [2 * (gap - 1) / 2, -2.0 / 3])
    _close(g_l, [-2 * (gap - 1) / 4, 2.0 / 3])


def test_hinge_value_and_grad():
    """L = max(0, 1 - h). β = 0.5: h = log 3 > 1 -> L = 0, no gradient; h = 0 -> L = 1, dL/dh = -1,
    d/dchosen = -β. β = 0.25, h = log3/2 < 1 -> L = 1 - log3/2, d/dchosen = -0.25."""
    losses, g_w, g_l, _ = _loss_and_grads("hinge", LR_W, LR_L)
    _close(losses, [0.0, 1.0])
    _close(g_w, [0.0, -BETA])
    _close(g_l, [0.0, BETA])
    losses, g_w, _, _ = _loss_and_grads("hinge", LR_W, LR_L, beta=0.25)
    _close(losses, [1 - LOG3 / 2, 1.0])
    _close(g_w, [-0.25, -0.25])


def test_fdpo_reverse_kl_is_dpo_exactly():
    g = torch.Generator().manual_seed(1)
    args = [-20 * torch.rand(16, generator=g) for _ in range(4)]
    out = {}
    for lt in ("sigmoid", "fdpo_reverse_kl"):
        c, r = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
        losses, stats = preference_loss(c, r, args[2], args[3], beta=0.1, loss_type=lt)
        losses.sum().backward()
        out[lt] = (losses, c.grad, r.grad, *stats.values())
    for a, b in zip(out["sigmoid"], out["fdpo_reverse_kl"]):
        assert torch.equal(a, b)


def test_fdpo_forward_kl_value_and_grad():
    """f′(u) = -1/u = -exp(-lr). lr_w = log 3, lr_l = -log 3: f′_w - f′_l = -1/3 + 3 = 8/3, h = β·8/3 = 4/3,
    L = -log σ(4/3). dL/dlr_w = -σ(-h)·β·exp(-lr_w) = -σ(-4/3)·β/3; dL/dlr_l = +σ(-h)·β·exp(-lr_l) = σ(-4/3)·3β.
    Second example (lr_w = lr_l = 0.3): h = 0, L = log 2, dL/dlr = ∓(1/2)·β·exp(-0.3)."""
    losses, g_w, g_l, _ = _loss_and_grads("fdpo_forward_kl", LR_W, LR_L)
    s = sig(-4 / 3)
    _close(losses, [-math.log(sig(4 / 3)), math.log(2)])
    _close(g_w, [-s * BETA / 3, -0.5 * BETA * math.exp(-0.3)])
    _close(g_l, [s * BETA * 3, 0.5 * BETA * math.exp(-0.3)])


def test_fdpo_js_value_and_grad():
    """f′(u) = log(2u/(1+u)) = log 2 + log σ(lr); d/dlr = σ(-lr). lr_w = log 3: log σ = log(3/4);
    lr_l = -log 3: log σ = log(1/4). h = β·log 3 = log √3, L = log(1 + 1/√3), σ(-h) = 1/(1+√3).
    dL/dlr_w = -σ(-h)·β·σ(-log 3) = -σ(-h)·β/4; dL/dlr_l = σ(-h)·β·σ(log 3) = σ(-h)·3β/4."""
    losses, g_w, g_l, _ = _loss_and_grads("fdpo_js", LR_W, LR_L)
    s = 1 / (1 + math.sqrt(3))
    _close(losses[:1], [math.log(1 + 1 / math.sqrt(3))])
    _close(g_w[:1], [-s * BETA / 4])
    _close(g_l[:1], [s * BETA * 3 / 4])


def test_fdpo_alpha_value_grad_and_limits():
    """Paper's α: f′(u) = (1 - u^-α)/α, d/dlr = u^-α. α = 1/2, u_w = 3, u_l = 1/3:
    f′_w - f′_l = 2(1 - 3^-½) - 2(1 - 3^½) = 2(√3 - 1/√3) = 4/√3, h = 2/√3, L = -log σ(2/√3).
    dL/dlr_w = -σ(-h)·β·3^-½; dL/dlr_l = σ(-h)·β·3^½.
    Limits: α = 0 is the reverse KL exactly; α = 1 is the forward KL (same f′, different float ops)."""
    losses, g_w, g_l, _ = _loss_and_grads("fdpo_alpha", LR_W, LR_L, alpha=0.5)
    h = 2 / math.sqrt(3)
    _close(losses[:1], [-math.log(sig(h))])
    _close(g_w[:1], [-sig(-h) * BETA / math.sqrt(3)])
    _close(g_l[:1], [sig(-h) * BETA * math.sqrt(3)])

    lr = torch.linspace(-5, 5, 11)
    assert torch.equal(f_divergence_score(lr, divergence="alpha", alpha=0.0), lr)
    torch.testing.assert_close(
        f_divergence_score(lr, divergence="alpha", alpha=1.0), f_divergence_score(lr, divergence="forward_kl") + 1.0
    )  # f′ = 1 - 1/u vs -1/u
    for a, b in zip(
        _loss_and_grads("fdpo_alpha", LR_W, LR_L, alpha=1.0)[:3], _loss_and_grads("fdpo_forward_kl", LR_W, LR_L)[:3]
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_simpo_value_and_grad():
    """L = -log σ(β·logπ_w/|y_w| - β·logπ_l/|y_l| - γ). β = 2, γ = 0.5, logπ_w = -2 over 2 tokens (-1 per token),
    logπ_l = -6 over 3 tokens (-2 per token): z = 2·(-1 + 2) - 0.5 = 1.5, L = -log σ(1.5).
    dL/dlogπ_w = -σ(-z)·β/|y_w| = -σ(-1.5); dL/dlogπ_l = σ(-z)·β/|y_l| = σ(-1.5)·2/3. No reference needed."""
    c = torch.tensor([-2.0], requires_grad=True)
    r = torch.tensor([-6.0], requires_grad=True)
    losses, stats = preference_loss(
        c, r, None, None, torch.tensor([2]), torch.tensor([3]), beta=2.0, loss_type="simpo", simpo_gamma=0.5
    )
    losses.sum().backward()
    _close(losses.detach(), [-math.log(sig(1.5))])
    _close(c.grad, [-sig(-1.5)])
    _close(r.grad, [sig(-1.5) * 2 / 3])
    _close(stats["chosen_rewards"], [-2.0])  # β·logπ/|y| = 2·(-1)
    _close(stats["margins"], [2.0])


def test_stats_are_implicit_rewards_per_example():
    """chosen/rejected rewards = β·lr: (β log 3, -β log 3) and (0.15, 0.15); margins = β·Δ = (log 3, 0);
    accuracy = chosen > rejected strictly: (1, 0). All detached, shape (B,)."""
    _, _, _, stats = _loss_and_grads("ipo", LR_W, LR_L)
    _close(stats["chosen_rewards"], [BETA * LOG3, BETA * 0.3])
    _close(stats["rejected_rewards"], [-BETA * LOG3, BETA * 0.3])
    _close(stats["margins"], [LOG3, 0.0])
    _close(stats["accuracy"], [1.0, 0.0])
    assert all(not v.requires_grad and v.shape == (2,) for v in stats.values())


def test_every_loss_type_has_a_target_and_bad_options_raise():
    assert set(TARGETS) == set(LOSS_TYPES) and len(LOSS_TYPES) == 10
    c = torch.zeros(2)
    with pytest.raises(UserError, match="loss_type must be one of"):
        preference_loss(c, c, c, c, beta=0.1, loss_type="dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(c, c, c, c, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="robust"):
        preference_loss(c, c, c, c, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(c, c, c, c, beta=0.1, loss_type="ipo", ipo_length_normalize=True)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(c, c, beta=0.1, loss_type="sigmoid")


# ---------------------------------------------------------------------------------------------------
# Population minimisers: the claims in TARGETS, on a 3-response categorical "language model".
# π = softmax(θ); every ordered pair (i, j), i ≠ j, is drawn with probability μ_i μ_j and labelled
# "i chosen" with probability q_ij (BT: q_ij = σ(r_i - r_j), possibly flipped at rate ε). The exact
# expected loss Σ μ_i μ_j q_ij L(chosen=i, rejected=j) is minimised over θ by L-BFGS, in fp64 throughout
# (preference_loss keeps fp64 inputs in fp64).
# ---------------------------------------------------------------------------------------------------

R = torch.tensor([1.0, 0.0, -0.7], dtype=torch.float64)
PI_REF = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
MU = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
B_POP = 0.5


def _bt(r):
    return torch.sigmoid(r[:, None] - r[None, :])  # (K, K) p(i ≻ j)


def _minimise(loss_type, r=R, pi_ref=PI_REF, mu=MU, flip=0.0, beta=B_POP, lengths=None, **kw):
    K = r.shape[0]
    p = _bt(r)
    q = (1 - flip) * p + flip * p.T  # observed label probabilities
    i, j = zip(*[(a, b) for a in range(K) for b in range(K) if a != b])
    i, j = torch.tensor(i), torch.tensor(j)
    w = mu[i] * mu[j] * q[i, j]  # (P,) fp64
    log_ref = pi_ref.log()
    lens = (None, None) if lengths is None else (lengths[i], lengths[j])
    theta = log_ref.clone().requires_grad_()  # start at π = π_ref
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logp = theta.log_softmax(-1)
        losses, _ = preference_loss(
            logp[i], logp[j], log_ref[i], log_ref[j], *lens, beta=beta, loss_type=loss_type, **kw
        )
        total = (w * losses).sum()
        total.backward()
        return total

    opt.step(closure)
    return theta.detach().log_softmax(-1)  # log π at the minimum


def _spread(x):
    return (x.max() - x.min()).item()


@pytest.mark.parametrize(
    "loss_type,flip,kw",
    [
        ("sigmoid", 0.0, {}),
        ("fdpo_reverse_kl", 0.0, {}),
        ("robust", 0.2, {"label_smoothing": 0.2}),  # labels flipped at exactly the assumed rate
    ],
)
def test_population_minimiser_is_reverse_kl_optimum(loss_type, flip, kw):
    """DPO / f-DPO reverse / robust DPO with matched noise reach π* ∝ π_ref exp(r/β) (docs/theory.md §5)."""
    logp = _minimise(loss_type, flip=flip, **kw)
    pi_star = (PI_REF.log() + R / B_POP).softmax(-1)
    torch.testing.assert_close(logp.exp(), pi_star, atol=1e-6, rtol=0)


def test_population_cdpo_does_not_reach_pi_star():
    """cDPO (ε = 0.1) with clean BT labels. Two responses: the minimiser has σ(h) = (1-2ε)p + ε exactly.
    Three responses: the pairwise targets logit((1-2ε)p_ij + ε) are not differences of one reward, and the
    minimiser is visibly not π* (differs by > 0.02; DPO's own minimiser matches it to 1e-6 above)."""
    eps = 0.1
    r2, ref2, mu2 = R[:2], torch.tensor([0.4, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    logp = _minimise("cdpo", r=r2, pi_ref=ref2, mu=mu2, label_smoothing=eps)
    h = B_POP * ((logp[0] - ref2.log()[0]) - (logp[1] - ref2.log()[1]))
    p = torch.sigmoid(r2[0] - r2[1])
    torch.testing.assert_close(torch.sigmoid(h), (1 - 2 * eps) * p + eps, atol=1e-5, rtol=0)

    logp3 = _minimise("cdpo", label_smoothing=eps)
    pi_star = (PI_REF.log() + R / B_POP).softmax(-1)
    assert (logp3.exp() - pi_star).abs().max() > 0.02


def test_population_robust_with_clean_labels_overshoots():
    """Robust DPO (assumed ε = 0.1) on clean labels, two responses: σ(h) = (p - ε)/(1 - 2ε) > p."""
    eps = 0.1
    r2, ref2, mu2 = R[:2], torch.tensor([0.4, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    logp = _minimise("robust", r=r2, pi_ref=ref2, mu=mu2, label_smoothing=eps)
    h = B_POP * ((logp[0] - ref2.log()[0]) - (logp[1] - ref2.log()[1]))
    p = torch.sigmoid(r2[0] - r2[1])
    torch.testing.assert_close(torch.sigmoid(h), (p - eps) / (1 - 2 * eps), atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalise", [False, True])
def test_population_ipo_tilts_by_win_rate_against_mu(normalise):
    """IPO reaches lr(y) = P(y ≻ μ)/β + c with P(y ≻ μ) = Σ_j μ_j p(y ≻ y_j) (p(y ≻ y) = 1/2)
    (Azar et al. 2023); length-normalised, lr(y)/|y| = P(y ≻ μ)/β + c. Checked as a constant spread < 1e-5."""
    lengths = torch.tensor([1, 2, 4]) if normalise else None
    logp = _minimise("ipo", lengths=lengths, ipo_length_normalize=normalise)
    lr = logp - PI_REF.log()
    if normalise:
        lr = lr / lengths
    win = _bt(R) @ MU  # (K,) P(y_i ≻ μ)
    assert _spread(lr - win / B_POP) < 1e-5
    assert _spread(lr - R / B_POP) > 0.1  # and it is not π*


@pytest.mark.parametrize("loss_type,kw", [("fdpo_forward_kl", {}), ("fdpo_js", {}), ("fdpo_alpha", {"alpha": 0.3})])
def test_population_fdpo_reaches_f_regularised_optimum(loss_type, kw):
    """f-DPO reaches β·f′(π/π_ref) = r - λ for one constant λ (Wang et al. 2023): β·f′(u_i) - r_i has
    zero spread (< 1e-5) over responses, while the reverse-KL optimum condition β·lr - r does not."""
    logp = _minimise(loss_type, **kw)
    lr = logp - PI_REF.log()
    div = {"fdpo_forward_kl": "forward_kl", "fdpo_js": "js", "fdpo_alpha": "alpha"}[loss_type]
    score = f_divergence_score(lr, divergence=div, **kw)
    assert _spread(B_POP * score - R) < 1e-5
    assert _spread(B_POP * lr - R) > 1e-2


def test_hinge_population_minimiser_is_ordering_only():
    """Expected hinge loss on one pair, p = σ(r_w - r_l): p·max(0, 1-h) + (1-p)·max(0, 1+h), piecewise
    linear, minimised at h = 1 for any p > 1/2 — whatever the size of the reward gap."""
    h = torch.linspace(-3, 3, 601)
    zero = torch.zeros_like(h)
    for gap in (0.2, 3.0):
        p = sig(gap)
        fwd, _ = preference_loss(h, zero, zero, zero, beta=1.0, loss_type="hinge")
        rev, _ = preference_loss(zero, h, zero, zero, beta=1.0, loss_type="hinge")
        expected = p * fwd + (1 - p) * rev
        assert abs(h[expected.argmin()].item() - 1.0) < 1e-6


# ---------------------------------------------------------------------------------------------------
# TRL 1.16: the losses live inside DPOTrainer._compute_loss (model forward, 15 loss branches, metrics).
# It is called unbound with a stub ``self`` and a fake model that returns per-token log-probs, so only
# the loss arithmetic runs. If TRL's private internals change, the stub breaks and the test skips.
# ---------------------------------------------------------------------------------------------------


def _trl_loss(loss_type, chosen, rejected, ref_c, ref_r, len_c, len_r, *, beta, eps=0.0, f_div="reverse_kl", coef=0.5):
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    B, T = chosen.shape[0], int(max(len_c.max(), len_r.max()))
    lens = torch.cat([len_c, len_r])  # (2B,) batch is [chosen, rejected]
    seq = torch.cat([chosen, rejected])  # (2B,)
    counted = torch.arange(T)[None, :] < lens[:, None]  # (2B, T)
    log_probs = torch.where(counted, seq[:, None] / lens[:, None], 0.0).requires_grad_()  # sums to seq
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), counted.long()], dim=1)  # (2B, T+1)
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(2 * B, T),
        mean_logits=torch.zeros(2 * B, T),
        is_top1=torch.zeros(2 * B, T, dtype=torch.bool),
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
        f_divergence_type=f_div,
        f_alpha_divergence_coef=coef,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05),
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    try:
        loss = dpo.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    except (AttributeError, KeyError, TypeError) as err:
        pytest.skip(f"TRL's DPOTrainer._compute_loss internals changed, stub no longer fits: {err!r}")
    loss.backward()
    grad = log_probs.grad[:, 0]  # TRL sums the tokens, so each counted token's grad is d loss / d seq_logp
    return loss.detach(), grad[:B], grad[B:]


@pytest.mark.parametrize(
    "trl_type,ours,kw,trl_kw",
    [
        ("sigmoid", "sigmoid", {}, {}),
        ("hinge", "hinge", {}, {}),
        ("ipo", "ipo", {"ipo_length_normalize": True}, {}),  # TRL normalises IPO per token
        ("robust", "robust", {"label_smoothing": 0.1}, {"eps": 0.1}),
        ("sigmoid", "fdpo_forward_kl", {}, {"f_div": "forward_kl"}),
        ("sigmoid", "fdpo_js", {}, {"f_div": "js_divergence"}),
        ("sigmoid", "fdpo_alpha", {"alpha": 0.3}, {"f_div": "alpha_divergence", "coef": 0.7}),  # TRL coef = 1 - α
    ],
)
def test_matches_trl_dpo_trainer(trl_type, ours, kw, trl_kw):
    g = torch.Generator().manual_seed(3)
    B = 5
    chosen, rejected = -3 * torch.rand(B, generator=g) - 1, -3 * torch.rand(B, generator=g) - 1
    ref_c, ref_r = chosen + torch.randn(B, generator=g), rejected + torch.randn(B, generator=g)
    len_c, len_r = torch.randint(1, 6, (B,), generator=g), torch.randint(1, 6, (B,), generator=g)
    trl_loss, trl_gc, trl_gr = _trl_loss(trl_type, chosen, rejected, ref_c, ref_r, len_c, len_r, beta=0.4, **trl_kw)

    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    losses, _ = preference_loss(c, r, ref_c, ref_r, len_c, len_r, beta=0.4, loss_type=ours, **kw)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean().detach(), trl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.grad, trl_gc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad, trl_gr, atol=1e-5, rtol=1e-5)
