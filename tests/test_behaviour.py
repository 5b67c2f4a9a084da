"""The behaviour policy μ (tether.ops.behaviour, tether.trainers.mismatch): every backend's log μ, the
mismatch/* metrics, the corrections' weights and biases, and their wiring into PPO, GRPO and RLOO."""

from __future__ import annotations

import math

import pytest
import torch

from tether.errors import UserError
from tether.ops.behaviour import CORRECTION_NAMES, CORRECTIONS, correction_weights, mismatch_stats

from conftest import f32_tol

# two sequences, the second one token shorter; ratios r = π_old/μ = [[2.5, 1, 3], [0.25, 1, (off)]]
OLD = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.4, 0.3]], dtype=torch.float64))
MU = torch.log(torch.tensor([[0.2, 0.2, 0.3], [0.4, 0.4, 0.3]], dtype=torch.float64))
MASK = torch.tensor([[True, True, True], [True, True, False]])


def _w(correction, cap=2.0):
    return correction_weights(OLD, MU, MASK, correction=correction, cap=cap)


def test_correction_weights_by_hand():
    """Hand-derived from the ratios above (C = 2): sequence ratios W = 2.5·1·3 = 7.5 and 0.25·1 = 0.25."""
    none = _w("none")
    assert torch.equal(none.weights, torch.ones(2, 3, dtype=torch.float64)) and not none.cut.any()
    tis = _w("token_tis")
    assert torch.allclose(tis.weights, torch.tensor([[2.0, 1.0, 2.0], [0.25, 1.0, 1.0]], dtype=torch.float64))
    assert tis.cut.tolist() == [[True, False, True], [False, False, False]] and tis.cut_seq.tolist() == [True, False]
    assert torch.equal(tis.state_weights, torch.ones(2, 3, dtype=torch.float64))  # a token ratio corrects no state
    seq = _w("seq_tis")
    assert torch.allclose(seq.weights, torch.tensor([[2.0, 2.0, 2.0], [0.25, 0.25, 1.0]], dtype=torch.float64))
    assert torch.equal(seq.state_weights, seq.weights)  # W corrects the states too
    assert seq.cut.tolist() == [[True, True, True], [False, False, False]]
    mis = _w("token_mis")  # band [1/2, 2]: 2.5, 3 and 0.25 leave it
    assert torch.allclose(mis.weights, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64))
    assert mis.cut_seq.tolist() == [True, True]
    smis = _w("seq_mis")
    assert torch.allclose(smis.weights, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    wide = _w("seq_mis", cap=8.0)  # 7.5 and 0.25 both inside [1/8, 8]: plain IS weights
    assert torch.allclose(wide.weights[MASK], torch.tensor([7.5, 7.5, 7.5, 0.25, 0.25], dtype=torch.float64))
    assert set(CORRECTIONS) == set(CORRECTION_NAMES)
    with pytest.raises(ValueError):
        _w("bogus")


def test_corrections_have_the_bias_they_state():
    """One state, exact enumeration over the token: with μ = π_old perturbed, E_μ[w·g] against E_π_old[g]
    for g an arbitrary per-token function. TIS: E_π_old[g] - E_μ[(r - C)_+ g]; MIS: E_π_old[1[r ∈ band] g];
    with C above every ratio both are exact."""
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    mu = torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    r = pi / mu  # 2.5, 1, 0.5, 0.25
    old, beh, mask = (
        pi.log()[:, None],
        mu.log()[:, None],
        torch.ones(4, 1, dtype=torch.bool),
    )  # 4 "sequences" of 1 token
    for C in (2.0, 10.0):
        for name in ("token_tis", "seq_tis"):
            w = correction_weights(old, beh, mask, correction=name, cap=C).weights[:, 0]
            want = (pi * g).sum() - (mu * (r - C).clamp(min=0) * g).sum()
            assert float((mu * w * g).sum()) == pytest.approx(float(want), abs=1e-12)
        for name in ("token_mis", "seq_mis"):
            w = correction_weights(old, beh, mask, correction=name, cap=C).weights[:, 0]
            band = (r >= 1 / C) & (r <= C)
            assert float((mu * w * g).sum()) == pytest.approx(float((pi * band * g).sum()), abs=1e-12)
    w = correction_weights(old, beh, mask, correction="seq_tis", cap=10.0).weights[:, 0]
    assert float((mu * w * g).sum()) == pytest.approx(float((pi * g).sum()), abs=1e-12)  # exact IS
    assert float((mu * g).sum()) != pytest.approx(float((pi * g).sum()), abs=1e-3)  # none: biased


def test_mismatch_stats_by_hand():
    s, c = mismatch_stats(OLD, MU, MASK, _w("token_tis"))
    mean = {k: s[k] / c[k] for k in s}
    lr = (MU - OLD).masked_fill(~MASK, 0)  # k1 = log μ - log π_old per token
    k1_seq = lr.sum(-1)
    assert mean["mismatch/kl_k1"] == pytest.approx(float(k1_seq.mean()), abs=1e-12)
    assert mean["mismatch/kl_k1_stderr"] == pytest.approx(float(k1_seq.std() / math.sqrt(2)), abs=1e-12)
    r = torch.exp(OLD - MU)
    k3_seq = ((r - 1 - r.log()) * MASK).sum(-1)
    assert mean["mismatch/kl_k3"] == pytest.approx(float(k3_seq.mean()), abs=1e-12)
    assert mean["mismatch/ratio_max"] == pytest.approx(3.0) and mean["mismatch/ratio_min"] == pytest.approx(0.25)
    assert mean["mismatch/ratio_p50"] == pytest.approx(1.0)
    assert mean["mismatch/cut_token_frac"] == pytest.approx(2 / 5) and mean["mismatch/cut_seq_frac"] == pytest.approx(
        1 / 2
    )
    assert mean["mismatch/weight_mean"] == pytest.approx((2 + 1 + 2 + 0.25 + 1) / 5)


def test_builtin_sampler_logs_log_mu_equal_to_the_scorer(stories):
    """The built-in sampler's behaviour_logps are the scorer's log π_old up to float32 rounding of the two
    forwards (KV cache or lean step against one full pass; measured ~1e-5 nats per token). Bound: a
    log-softmax moves by at most 2·max|Δz|/τ for a logit change Δz, and the logits agree within 16 float32
    spacings of max_t Σ_i |h_i W_vi| (tests/test_decode.py's bound); plus the log-softmax's own rounding
    (spacings of the largest tempered logit)."""
    from tether.modeling import forward_completion
    from tether.ops.logprobs import selective_logps
    from tether.sampling import sample

    tok, model = stories
    prompts = [tok("Once upon a time")["input_ids"], tok("The cat")["input_ids"]] * 3
    for decoder in ("hf", "lean"):
        for filters in ({"temperature": 1.0, "top_k": 0, "top_p": 1.0}, {"temperature": 0.7, "top_k": 0, "top_p": 0.9}):
            batch, _ = sample(
                model,
                prompts,
                pad_id=tok.pad_token_id,
                eos_id=tok.eos_token_id,
                max_new_tokens=16,
                generator=torch.Generator().manual_seed(0),
                decoder=decoder,
                **filters,
            )
            with torch.no_grad():
                logits, _ = forward_completion(model, batch, filters=filters)
                old = selective_logps(logits, batch.completion_ids).masked_fill(~batch.mask, 0.0)
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
                mag = (out.hidden_states[-1].abs() @ model.lm_head.weight.abs().t()).max()
            tau = filters["temperature"]
            tol = 2 / tau * f32_tol(mag, ulps=16) + f32_tol(out.logits.abs().max() / tau)
            mu = batch.behaviour_logps
            assert mu.shape == batch.mask.shape and not mu[~batch.mask].any()
            err = float((old - mu)[batch.mask].abs().max())
            assert err <= tol, (decoder, filters, err, tol)


def _tabular_run(tmp_path, cls, **kw):
    from tether.oracle import make_problem
    from tether.oracle.shipped import online_config, run_online

    problem = make_problem(3, 3, n_prompts=2, seed=0)
    cfg = online_config(cls, problem, samples=8, max_steps=2, **kw)
    return run_online(problem, cfg, workdir=str(tmp_path))


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_builtin_backend_mismatch_is_zero_and_corrections_change_nothing(tmp_path, method):
    """On the tabular LM μ = π_old up to the float32 log-softmax's own rounding: the logits are exact table
    lookups in both the sampler and the scorer, but the two log-softmaxes run on (b, V) and (B, T, V)
    tensors, whose vectorised exp/log may differ by an ulp (measured: 2e-8 nats per sequence). Bound per
    token: 8 float32 spacings of the largest quantities, max|z| and |log p| ≤ 2·max|z| + log V; per
    sequence T times that. Every mismatch metric is within it of its μ = π_old value (KL 0, ratios 1,
    nothing cut), and a run with a correction on (weights 1 within it) ends where the uncorrected one does."""
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.rloo import RLOOConfig

    cls = {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}[method]
    kw = {"samples_per_prompt": 2} if method != "ppo" else {}
    base = _tabular_run(tmp_path / "a", cls, **kw)
    z = float(base.policy.table.abs().max())
    tok_tol = f32_tol(z, 2 * z + math.log(3))
    T = 3
    for row in base.history:
        for k in ("mismatch/kl_k1", "mismatch/kl_k3", "mismatch/kl_k1_stderr", "mismatch/kl_k3_stderr"):
            assert abs(row[k]) <= T * tok_tol, (k, row[k])
        for k in (
            "mismatch/ratio_min",
            "mismatch/ratio_p01",
            "mismatch/ratio_p50",
            "mismatch/ratio_p99",
            "mismatch/ratio_max",
            "mismatch/weight_mean",
        ):
            assert abs(row[k] - 1.0) <= tok_tol, (k, row[k])
        assert row["mismatch/cut_token_frac"] == 0.0 and row["mismatch/cut_seq_frac"] == 0.0
    corrected = _tabular_run(tmp_path / "b", cls, behaviour_correction="seq_mis", behaviour_cap=1.5, **kw)
    assert corrected.history[-1]["mismatch/cut_seq_frac"] == 0.0
    # step 1 samples the same tokens; its loss is a token mean of w·ρ·A with w within T·tok_tol of 1 and |A| < 10
    # (centred or whitened N(0, 1) scores of 16 samples). (The final tables are not compared: Adam turns a
    # gradient that is 0 in one run and 1e-9 in the other into a full step of either sign.)
    a, b = base.history[0][f"{method}/policy_loss"], corrected.history[0][f"{method}/policy_loss"]
    assert abs(a - b) <= 10 * T * tok_tol + f32_tol(abs(a), 10), (a, b)
    assert abs(corrected.history[0]["mismatch/weight_mean"] - 1.0) <= T * tok_tol


def test_perturbed_backend_metrics_measure_the_true_mismatch():
    """The certificate's perturbed sampler (logits + δ) on a single-token problem: mismatch/kl_k3 and kl_k1
    estimate the exact KL[μ‖π_old] (enumerated) within 4 of their standard errors (4000 samples)."""
    import tempfile
    from pathlib import Path

    from tether.groups import SamplingSettings
    from tether.modeling import forward_completion, load_causal_lm
    from tether.ops.logprobs import selective_logps
    from tether.oracle import make_problem
    from tether.oracle.certify_mismatch import DELTA_T1, PerturbedBackend
    from tether.oracle.lm import save_tabular_lm

    problem = make_problem(5, 1, n_prompts=2, seed=0)
    with tempfile.TemporaryDirectory() as d:
        model = load_causal_lm(str(save_tabular_lm(problem, Path(d) / "m")))
    V = problem.space.vocab_size
    batch, _ = PerturbedBackend(model, delta=DELTA_T1).generate(
        [[V + p] for p in range(2)] * 2000,
        SamplingSettings(max_new_tokens=1),
        torch.Generator().manual_seed(0),
        pad_id=0,
        eos_id=None,
    )
    filters = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    with torch.no_grad():
        logits, _ = forward_completion(model, batch, filters=filters)
    old = selective_logps(logits, batch.completion_ids).masked_fill(~batch.mask, 0.0)
    s, c = mismatch_stats(
        old,
        batch.behaviour_logps,
        batch.mask,
        correction_weights(old, batch.behaviour_logps, batch.mask, correction="none", cap=2.0),
    )
    m = {k: s[k] / c[k] for k in s}
    z = logits[:2, 0].double()
    delta = torch.zeros(z.shape[-1], dtype=torch.float64)
    delta[: len(DELTA_T1)] = torch.tensor(DELTA_T1, dtype=torch.float64)
    lp, lm = z.log_softmax(-1), (z + delta).log_softmax(-1)
    exact = float((lm.exp() * (lm - lp)).sum(-1).mean())  # the two prompts, equally often
    for est in ("k1", "k3"):
        assert abs(m[f"mismatch/kl_{est}"] - exact) < 4 * m[f"mismatch/kl_{est}_stderr"], (est, m, exact)
    assert exact > 0.04  # a real mismatch, ratios away from 1
    assert m["mismatch/ratio_max"] > 2.0 and m["mismatch/ratio_min"] < 0.5


def test_loss_gradient_carries_the_weights():
    """PPO's and GRPO's loss at π_θ = π_old with μ ≠ π_old: d loss / d logps_t = -w_t·A_t / n_tokens
    (token_mean; the clip is inactive at ratio 1), w the correction's weight; GRPO's KL term (k3,
    ∇ = (1 - π_ref/π_θ)) is weighted the same way."""
    from tether.trainers import grpo, ppo
    from tether.trainers.online import Counts, LossInputs

    logps = OLD.float().clone().requires_grad_(True)
    ref = torch.log(torch.tensor([[0.3, 0.3, 0.5], [0.2, 0.2, 0.4]]))
    adv = torch.tensor([[1.0, -0.5, 2.0], [0.5, 1.5, 0.0]])
    counts = Counts(tokens=5.0, seqs=2.0)
    for corr in ("none", "token_tis", "seq_tis", "token_mis", "seq_mis"):
        w = correction_weights(OLD, MU, MASK, correction=corr, cap=2.0).weights.float()
        x = LossInputs(
            logps=logps,
            old_logps=logps.detach(),
            ref_logps=ref,
            mask=MASK,
            advantages=adv,
            behaviour_logps=MU.float(),
            values=torch.zeros(2, 3),
            old_values=torch.zeros(2, 3),
            returns=torch.zeros(2, 3),
        )
        cfg = ppo.PPOConfig(behaviour_correction=corr, loss_aggregation="token_mean", vf_coef=0.0)
        (g,) = torch.autograd.grad(ppo.loss(x, cfg=cfg, beta=0.1, counts=counts)[0], logps)
        assert torch.allclose(g, (-w * adv / 5.0) * MASK, atol=f32_tol(3.0)), corr
        gcfg = grpo.GRPOConfig(behaviour_correction=corr, loss_aggregation="token_mean", kl_estimator="k3")
        (g,) = torch.autograd.grad(grpo.loss(x, cfg=gcfg, beta=0.1, counts=counts)[0], logps)
        k3_grad = 1 - torch.exp(ref - logps.detach())
        assert torch.allclose(g, (w * (-adv + 0.1 * k3_grad) / 5.0) * MASK, atol=f32_tol(3.0)), corr


def test_config_errors_are_one_line_user_errors():
    from tether.trainers.mismatch import check_correction, loss_weights
    from tether.trainers.ppo import PPOConfig

    with pytest.raises(UserError, match="behaviour_correction must be one of"):
        check_correction(PPOConfig(behaviour_correction="tis"))
    for cap in (1.0, 0.5, float("inf")):
        with pytest.raises(UserError, match="behaviour_cap"):
            check_correction(PPOConfig(behaviour_correction="token_tis", behaviour_cap=cap))
    check_correction(PPOConfig(behaviour_correction="seq_mis", behaviour_cap=3))

    class X:  # a micro-batch from a backend that returned no log μ
        old_logps, behaviour_logps, mask = OLD, None, MASK

    with pytest.raises(UserError, match="returns none"):
        loss_weights(X, PPOConfig(behaviour_correction="token_tis"))
    assert torch.equal(loss_weights(X, PPOConfig()).weights, torch.ones(2, 3, dtype=torch.float64))
