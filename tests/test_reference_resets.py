"""Moving references of the online trainers (docs/theory.md §14): the ProRL hard reset
(``ref_reset_every``, optionally with ``ref_reset_optimizer``) and the rolling reference that lags N
steps behind (``ref_lag``), on the tabular LM of ``tether.oracle`` (tiny, so every check is exact)."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from tether.errors import UserError
from tether.oracle import shipped
from tether.oracle.certify import PROBLEM
from tether.oracle.lm import prompt_texts, reward_function, save_tabular_lm, tabular_lm
from tether.oracle.tabular import make_problem
from tether.reference import LaggedReference, SyncedReference
from tether.trainers.online import train_online
from tether.trainers.ppo import PPOConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return make_problem(**PROBLEM)


def _cfg(problem, tmp_path, name, **kw):
    model = save_tabular_lm(problem, tmp_path / "model")
    base = dict(
        beta=0.5,
        kl_estimator="k1",
        num_epochs=2,
        lam=1.0,
        gamma=1.0,
        max_steps=4,
        samples=8,
        learning_rate=0.2,
        lr_schedule="constant",
    )
    cfg = shipped.online_config(PPOConfig, problem, **{**base, **kw})
    return dataclasses.replace(cfg, model=str(model), output_dir=str(tmp_path / name))


def _train(problem, cfg, **kw):
    per_prompt = cfg.batch_size // (cfg.samples_per_prompt * problem.space.n_prompts)
    return train_online(cfg, prompts=prompt_texts(problem.space) * per_prompt, reward=reward_function(problem), **kw)


def test_reset_makes_the_next_rollouts_kl_exactly_zero(problem, tmp_path):
    """Reset after steps 2 and 4: the rollouts of steps 3 and 5 sample θ_2 / θ_4 against a reference
    equal to it, so the exact kl/ref is 0.0 exactly (same weights, same forward); in between it is not."""
    run = _train(problem, _cfg(problem, tmp_path, "reset", max_steps=5, ref_reset_every=2))
    kl = [h["kl/ref"] for h in run["history"]]  # history[i] = the rollout of step i+1 (policy θ_i)
    assert kl[0] == 0.0 and kl[2] == 0.0 and kl[4] == 0.0
    assert kl[1] > 1e-4 and kl[3] > 1e-4


def test_lagged_reference_is_the_policy_n_steps_ago_bit_for_bit(problem):
    policy = tabular_lm(problem.space)
    params = [p for p in policy.parameters() if p.requires_grad]
    ref = LaggedReference(SyncedReference(tabular_lm(problem.space), every=2**62), lag=3)
    history = [[p.detach().clone() for p in params]]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        history.append([p.detach().clone() for p in params])
        changed = ref.on_step(policy, step)
        assert changed == (step > 3)
        want = history[max(step - 3, 0)]
        got = [p for p in ref.inner.model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), step
        assert len(ref.snapshots) == min(step, 3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(ref_lag=2),
        dict(ref_reset_every=2, ref_reset_optimizer=True),
        dict(ref_lag=2, reference="lora", lora_r=4, lora_alpha=8, lora_target_modules=["lm_head"]),
    ],
    ids=["lag", "reset_optimizer", "lag_lora"],
)
def test_resume_is_bit_identical(problem, tmp_path, kw):
    """Interrupt after step 3 (delete the later checkpoints), resume: every logged number and the final
    weights equal the uninterrupted run's (the snapshots / reference weights are in the checkpoint)."""
    cfg = _cfg(problem, tmp_path, "run", max_steps=6, save_every=3, **kw)
    full = _train(problem, cfg)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    weights = (Path(cfg.output_dir) / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(ckpts / "step-6")
    shutil.rmtree(Path(cfg.output_dir) / "final")
    resumed = _train(problem, cfg, resume=True)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert full["history"] == resumed["history"]
    assert (Path(cfg.output_dir) / "final" / "model.safetensors").read_bytes() == weights
    # and the moving reference mattered: the run differs from a fixed-reference one
    fixed = _train(
        problem,
        dataclasses.replace(
            cfg, ref_lag=0, ref_reset_every=0, ref_reset_optimizer=False, output_dir=str(tmp_path / "fixed")
        ),
    )
    assert fixed["history"][-1]["kl/ref"] != full["history"][-1]["kl/ref"]


def test_reset_optimizer_clears_adam_state(problem, tmp_path):
    """With ref_reset_optimizer the checkpoint written right after a reset (step 2) holds an empty
    optimiser state (Adam restarts from zero moments); without it the state is kept."""
    from tether.runs import RunDir

    cfg = _cfg(problem, tmp_path, "opt", max_steps=3, save_every=2, ref_reset_every=2, ref_reset_optimizer=True)
    _train(problem, cfg)
    state = RunDir.load_checkpoint_state(Path(cfg.output_dir) / "checkpoints" / "step-2")
    assert state["optimizer"]["state"] == {}
    cfg2 = _cfg(problem, tmp_path, "opt2", max_steps=3, save_every=2, ref_reset_every=2)
    _train(problem, cfg2)
    state2 = RunDir.load_checkpoint_state(Path(cfg2.output_dir) / "checkpoints" / "step-2")
    assert state2["optimizer"]["state"] != {}


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(ref_lag=2, ref_reset_every=2), "ref_reset_every and ref_lag"),
        (dict(ref_lag=-1), "ref_lag must be >= 0"),
        (dict(ref_lag=2, reference="offload"), "reference 'copy'"),
        (dict(ref_reset_optimizer=True), "ref_reset_optimizer needs ref_reset_every"),
    ],
)
def test_bad_settings_are_user_errors(problem, tmp_path, kw, field):
    with pytest.raises(UserError, match=field):
        _train(problem, _cfg(problem, tmp_path, "bad", max_steps=1, **kw))
