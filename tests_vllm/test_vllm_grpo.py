"""A short GRPO run with the vLLM backend against the same run with the built-in sampler."""

import copy

import pytest
import torch

import tether.trainers.online as online
from tether.engine import generate, score
from tether.modeling import load_tokenizer
from tether.reference import FrozenReference
from tether.trainers.grpo import GRPOConfig, train_grpo

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl",
    "Tom was",
    "The sun was",
    "Lily saw a",
    "The cat",
    "In the park,",
    "Ben and Mia",
    "The big tree",
    "Sam had a",
    "At night,",
]
STEPS = 6
T_995_5 = 4.032  # two-sided 99% quantile of Student's t with STEPS - 1 = 5 degrees of freedom
STATS = ("reward/score", "kl/ref", "gen/response_len")


def _run(model_dir, tmp_path, backend, monkeypatch):
    made = {}
    make = online.backend_for

    def spy(cfg, model):  # keep the backend and the live policy it samples, to check them afterwards
        made["backend"], made["policy"] = make(cfg, model), model
        return made["backend"]

    monkeypatch.setattr(online, "backend_for", spy)
    update, made["gaps"] = online.optimise, []

    def checked(*a, **kw):  # every step: the engine's log-probs of its samples against the trainer's old_logps
        out = update(*a, **kw)  # (with one update per rollout the update's own forward fills old_logps)
        ro = a[5]
        if backend == "vllm":
            m = ro.mask.cpu()
            made["gaps"].append((ro.old_logps.cpu()[m] - made["backend"].last_logps[m]).abs().max().item())
        return out

    monkeypatch.setattr(online, "optimise", checked)
    cfg = GRPOConfig(
        model=model_dir,
        output_dir=str(tmp_path / backend),
        backend=backend,
        reward="reward_fns_vllm:chars",
        batch_size=16,
        samples_per_prompt=4,
        max_new_tokens=16,
        learning_rate=3e-3,
        max_steps=STEPS,
        progress=False,
        sample_every=0,
        eval_every=0,
        eval_max_prompts=4,
        eval_samples=1,
        seed=0,
    )
    return train_grpo(cfg, prompts=PROMPTS)["history"], made


@pytest.mark.slow
def test_grpo_trajectory_matches_builtin(small_model_dir, tmp_path, monkeypatch):
    """Both runs start from the same weights and seed but draw different samples (different kernels
    and random streams), so their step statistics differ by Monte-Carlo noise only if the backend is
    right. Paired by step (the common trend cancels), the mean difference over the STEPS steps must
    lie within t_{0.995, 5} of its standard error, for the mean score, the exact sequence KL to the
    reference and the response length. At every step the engine's log-probs of its samples equal the
    trainer's ``old_logps`` (float32 agreement is ~1e-6, test_vllm_backend.py; one step of staleness
    is > 1e-2), and after the loop's last push the engine scores like the trained policy."""
    hb, _ = _run(small_model_dir, tmp_path, "builtin", monkeypatch)
    hv, made = _run(small_model_dir, tmp_path, "vllm", monkeypatch)
    assert len(hb) == len(hv) == STEPS
    assert hv[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6) and hv[-1]["kl/ref"] > 1e-3  # it trained
    for key in STATS:
        d = torch.tensor([v[key] - b[key] for v, b in zip(hv, hb)], dtype=torch.float64)
        se = d.std() / STEPS**0.5
        print(key, [round(b[key], 4) for b in hb], [round(v[key], 4) for v in hv])
        assert abs(float(d.mean())) <= T_995_5 * float(se) + 1e-9, (key, d.tolist())
    print("engine vs old_logps, per step:", made["gaps"])

    assert len(made["gaps"]) == STEPS and max(made["gaps"]) < 1e-4, made["gaps"]  # pushed before every rollout
    policy, backend = made["policy"], made["backend"]
    tok = load_tokenizer(small_model_dir)
    smp = generate(policy, [tok.encode(p) for p in PROMPTS], tokenizer=tok, max_new_tokens=8, seed=0, backend=backend)
    sc = score(policy, FrozenReference(copy.deepcopy(policy)), smp)
    mask = smp.mask.cpu()
    diff = (sc.logps.cpu()[mask] - backend.last_logps[mask]).abs().max().item()
    assert diff < 1e-4, diff  # f32 agreement is ~1e-6 (test_vllm_backend.py); a stale engine is off by > 1e-2


def test_grpo_logs_the_mismatch_and_weights_the_loss_with_the_engines_logps(small_model_dir, tmp_path, monkeypatch):
    """A 2-step GRPO run with the vLLM backend and ``behaviour_correction: seq_tis``: every step logs
    ``mismatch/*`` at float32 rounding (the per-token bar of the test above, 1e-4, times the 16 tokens of a
    completion), nothing is cut, and the loss's correction weights are computed from the engine's own
    log-probs (the rollout rows of ``last_logps``, as the loss received them)."""
    import tether.trainers.grpo as grpo_mod

    seen, made = [], {}
    weights, make = grpo_mod.loss_weights, online.backend_for

    def spy(x, cfg):
        seen.append((x.behaviour_logps.detach().cpu().clone(), cfg.behaviour_correction))
        return weights(x, cfg)

    def keep(cfg, model):
        made["backend"] = make(cfg, model)
        return made["backend"]

    monkeypatch.setattr(grpo_mod, "loss_weights", spy)
    monkeypatch.setattr(online, "backend_for", keep)
    cfg = GRPOConfig(
        model=small_model_dir,
        output_dir=str(tmp_path / "run"),
        backend="vllm",
        behaviour_correction="seq_tis",
        behaviour_cap=2.0,
        reward="reward_fns_vllm:chars",
        batch_size=16,
        samples_per_prompt=4,
        max_new_tokens=16,
        learning_rate=3e-3,
        max_steps=2,
        progress=False,
        sample_every=0,
        eval_every=0,
        eval_max_prompts=4,
        eval_samples=1,
        seed=0,
    )
    history = train_grpo(cfg, prompts=PROMPTS)["history"]
    bar = 16 * 1e-4
    for row in history:
        assert abs(row["mismatch/kl_k1"]) < bar and abs(row["mismatch/kl_k3"]) < bar, row
        assert abs(row["mismatch/ratio_max"] - 1) < 2e-4 and abs(row["mismatch/weight_mean"] - 1) < bar, row
        assert row["mismatch/cut_token_frac"] == 0.0 and row["mismatch/cut_seq_frac"] == 0.0
    assert len(seen) == 2 and all(c == "seq_tis" for _, c in seen)
    got, want = seen[-1][0], made["backend"].last_logps  # the last rollout (rows permuted by the minibatch order)
    assert torch.equal(got.sum(-1).sort().values, want.sum(-1).sort().values)
