"""Reliability (docs/reliability.md): no silent NaN, no run mixed with another, no pickle, recovery.

Runs are tether sft / dpo on the real stories260K for 1-4 steps (a few seconds each). NaN is
injected by wrapping the loss function a trainer calls, so the guard is tested on the shipped loop.
"""

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tether.trainers.sft as sft_mod
from tether.errors import UserError
from tether.rewards import RewardSet, RewardSource
from tether.runs import RunDir, read_state, rng_state, save_final, set_rng_state, write_state
from tether.trainers.sft import SFTConfig, train_sft


def sft_cfg(assets_dir, out, **kw) -> SFTConfig:
    base = dict(
        model=str(assets_dir / "stories260K"),
        assets=str(assets_dir),
        output_dir=str(out),
        dataset=str(assets_dir / "rt-polarity" / "rt-polarity.pos"),
        eval_examples=0,
        batch_size=4,
        max_length=16,
        learning_rate=1e-3,
        progress=False,
        seed=0,
        max_steps=3,
        save_every=1,
    )
    base.update(kw)
    return SFTConfig(**base)


def rows(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(folder) -> dict:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def nan_at(monkeypatch, steps: set):
    """Make tether sft's loss NaN (hence every gradient) on the given 1-based steps."""
    real, calls = sft_mod.token_nll, {"step": 0}

    def patched(model, mb):
        nll, n = real(model, mb)
        return (nll * float("nan") if calls["step"] in steps else nll), n

    def step_counter(*a, **k):  # one optimizer_step per training step
        calls["step"] += 1
        return real_step(*a, **k)

    real_step = sft_mod.optimizer_step
    calls["step"] = 1
    monkeypatch.setattr(sft_mod, "token_nll", patched)
    monkeypatch.setattr(sft_mod, "optimizer_step", step_counter)


# ---------------------------------------------------------------- non-finite guards


def test_one_nan_step_is_skipped_and_training_continues(assets_dir, tmp_path, monkeypatch):
    """Step 2's loss is NaN: its update is skipped (weights after step 2 == after step 1, bit for
    bit), it is logged as NaN with opt/nonfinite 1, and the run goes on (resumed to step 4)."""
    nan_at(monkeypatch, {2})
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=2))
    w1, w2 = weights(out / "checkpoints/step-1/model"), weights(out / "checkpoints/step-2/model")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    r = rows(out)
    assert "NaN" in (out / "metrics.jsonl").read_text().splitlines()[1]  # logged as it is, not dropped
    assert math.isnan(r[1]["loss"]) and math.isnan(r[1]["opt/grad_norm"])
    assert [x["opt/nonfinite"] for x in r] == [0, 1] and [x["opt/skipped_steps"] for x in r] == [0, 1]
    train_sft(sft_cfg(assets_dir, out, max_steps=4), resume=True)  # max_steps may change on resume
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss"]) for x in r[2:]) and [x["opt/skipped_steps"] for x in r] == [0, 1, 1, 1]
    assert all(bool(torch.isfinite(v).all()) for v in weights(out / "final").values())


def test_nonfinite_steps_in_a_row_stop_the_run_and_no_nan_is_saved(assets_dir, tmp_path, monkeypatch):
    """From step 2 on every loss is NaN: steps 2, 3, 4 are skipped, and the third in a row stops the
    run with a UserError naming the usual causes. Every checkpoint written holds step 1's finite
    weights and no final/ is written."""
    nan_at(monkeypatch, {2, 3, 4, 5, 6})
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"3 optimiser updates in a row .*non-finite.*beta.*learning_rate.*reward"):
        train_sft(sft_cfg(assets_dir, out, max_steps=6, max_nonfinite_steps=3))
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-2", "step-3"]  # keep=2; step 4 raised before its save
    w = [weights(p / "model") for p in ckpts]
    assert all(bool(torch.isfinite(v).all()) for x in w for v in x.values())
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not (out / "final").exists()


def test_dpo_with_infinite_beta_stops_and_saves_no_nan(assets_dir, tmp_path):
    """β = inf: at step 1 π_θ = π_ref, so every margin is inf·0 = NaN and so is the gradient. Three
    skipped updates stop the run; the weights never change, and nothing non-finite is written."""
    from tether.data.preference import sentiment_pairs
    from tether.trainers.dpo import DPOConfig, train_dpo

    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    out = tmp_path / "dpo"
    cfg = DPOConfig(
        model=str(assets_dir / "stories260K"),
        output_dir=str(out),
        max_steps=5,
        batch_size=4,
        beta=math.inf,
        learning_rate=1e-3,
        max_length=48,
        eval_pairs=4,
        kl_prompts=0,
        progress=False,
        seed=0,
        save_every=1,
    )
    with pytest.raises(UserError, match="non-finite loss or gradient"):
        train_dpo(cfg, rows=sentiment_pairs(pos, neg, n=16, seed=0))
    r = rows(out)
    assert [x["opt/skipped_steps"] for x in r] == [1, 2] and not any(math.isfinite(x["opt/grad_norm"]) for x in r)
    start = weights(assets_dir / "stories260K")
    for p in (out / "checkpoints").iterdir():
        w = weights(p / "model")
        assert all(torch.equal(w[k], start[k]) for k in w)  # no update ever applied, nothing non-finite saved
    assert not (out / "final").exists()


def test_save_final_and_checkpoints_refuse_nan_weights(stories, tmp_path):
    import copy

    model = copy.deepcopy(stories[1])
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        save_final(model, tmp_path)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        RunDir(tmp_path).save_checkpoint(1, model=model, state={})
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints" / "step-1").exists()


class _Const(RewardSource):
    def __init__(self, value):
        self.name, self.value = "const", value

    def __call__(self, prompts, completions):
        return torch.full((len(completions),), self.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_rewards_are_refused(value):
    with pytest.raises(UserError, match=r"reward 'const' .* 2 non-finite score\(s\) of 2"):
        RewardSet(_Const(value))(["a", "b"], ["x", "y"])
    scores, _ = RewardSet(_Const(1e30))(["a"], ["x"])  # legal, warned about once
    assert scores.tolist() == [pytest.approx(1e30)]


# ---------------------------------------------------------------- logs


def test_metrics_log_nan_and_inf_as_they_are(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    run.log(1, {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": torch.tensor(float("nan")), "e": 1.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert line == '{"step": 1, "a": NaN, "b": Infinity, "c": -Infinity, "d": NaN, "e": 1.5}\n'
    row = json.loads(line)
    assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf


# ---------------------------------------------------------------- no pickle


def test_trainer_state_round_trip_is_exact_without_pickle(tmp_path):
    """Optimizer moments (tensors), int-keyed dicts, tuples (Python RNG), numpy RNG arrays and NaN
    come back with the same types and bits; the files are safetensors + JSON."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random(), np.random.rand(), torch.rand(1)
    state = {
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
        "adapter": {0: torch.ones(2, dtype=torch.bfloat16)},
        "history": [{"step": 1, "loss": math.nan, "x": 0.1 + 0.2}],
    }
    write_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    back = read_state(tmp_path)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    want, got = opt.state_dict(), back["optimizer"]
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for i in want["state"]:
        for k, v in want["state"][i].items():
            assert got["state"][i][k].dtype == v.dtype and torch.equal(got["state"][i][k], v)
    assert back["adapter"][0].dtype == torch.bfloat16 and back["history"][0]["x"] == 0.1 + 0.2
    assert math.isnan(back["history"][0]["loss"])


def test_old_pickled_checkpoints_are_refused(assets_dir, tmp_path):
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=1))
    ck = out / "checkpoints" / "step-1"
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ck / name).unlink()
    (ck / "trainer_state.pt").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="trainer_state.pt, a pickle"):
        train_sft(sft_cfg(assets_dir, out, max_steps=2), resume=True)


def test_no_weights_only_false_in_the_package():
    root = Path(__file__).resolve().parents[1] / "tether"
    assert not [p for p in root.rglob("*.py") if "weights_only=False" in p.read_text()]


# ---------------------------------------------------------------- run identity


def test_run_identity(assets_dir, tmp_path):
    """Another run in a used output_dir is refused; --overwrite replaces it; --resume refuses a changed
    learning rate (naming it) and takes a changed max_steps; rows past the checkpoint are not repeated."""
    out = tmp_path / "run"
    cfg = sft_cfg(assets_dir, out, max_steps=2)
    train_sft(cfg)
    first = rows(out)
    with pytest.raises(UserError, match=r"output_dir .*run already holds a run.*--resume.*--overwrite"):
        train_sft(dataclasses.replace(cfg, seed=1))
    with pytest.raises(UserError, match=r"--resume: .*learning_rate \(0\.001 -> 0\.5\)"):
        train_sft(dataclasses.replace(cfg, learning_rate=0.5), resume=True)
    assert rows(out) == first  # refused before anything was written
    run = json.loads((out / "run.json").read_text())
    assert run["config"] == "SFTConfig" and len(run["fingerprint"]) == 64 and "max_steps" not in run["fields"]
    train_sft(dataclasses.replace(cfg, max_steps=3), resume=True)
    assert [x["step"] for x in rows(out)] == [1, 2, 3] and rows(out)[:2] == first
    assert "max_steps: 3" in (out / "config.yaml").read_text()  # the config in effect
    train_sft(dataclasses.replace(cfg, seed=1, overwrite=True, max_steps=1))
    assert [x["step"] for x in rows(out)] == [1] and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-1"
    ]
    assert json.loads((out / "run.json").read_text())["fields"]["seed"] == 1


def test_resume_without_checkpoint_in_another_runs_folder_is_refused(assets_dir, tmp_path):
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=1, save_every=0))
    for p in (out / "checkpoints").iterdir():
        import shutil

        shutil.rmtree(p)
    with pytest.raises(UserError, match="holds a different run: changed field.*seed"):
        train_sft(sft_cfg(assets_dir, out, max_steps=1, seed=3), resume=True)


def test_cli_refuses_a_used_output_dir_with_exit_2(assets_dir, tmp_path, capsys):
    from tether.cli import main

    args = [
        "sft",
        "--model",
        str(assets_dir / "stories260K"),
        "--dataset",
        str(assets_dir / "rt-polarity" / "rt-polarity.pos"),
        "--output_dir",
        str(tmp_path / "run"),
        "--eval_examples",
        "0",
        "--batch_size",
        "4",
        "--max_length",
        "16",
        "--progress",
        "false",
        "--max_steps",
        "1",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--learning_rate", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "already holds a run" in err[-1] and "--overwrite" in err[-1]
    assert main(args + ["--learning_rate", "0.5", "--overwrite"]) == 0


# ---------------------------------------------------------------- recovery


def test_truncated_checkpoint_torn_log_and_stray_files_resume_from_the_previous_checkpoint(assets_dir, tmp_path):
    """Checkpoints step-2 and step-3 kept; step-3's trainer state is cut in half, metrics.jsonl ends in a
    torn line, and checkpoints/ holds a stray folder, file and .tmp folder. --resume warns, goes back
    to step 2 and redoes step 3 bit-identically (same loss, same final weights)."""
    straight = tmp_path / "straight"
    train_sft(sft_cfg(assets_dir, straight))
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out))
    f = out / "checkpoints" / "step-3" / "trainer_state.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 1.2')
    (out / "checkpoints" / "step-notes").mkdir()
    (out / "checkpoints" / "README").write_text("stray")
    (out / "checkpoints" / "step-9.tmp").mkdir()
    train_sft(sft_cfg(assets_dir, out), resume=True)
    assert rows(out) == rows(straight)
    a, b = weights(straight / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_with_absurd_rewards_stops_instead_of_learning_nothing(stories_path, tmp_path):
    """Rewards of 1e30 (seen exiting 0 with a value loss logged as 1e308): the squared value error
    overflows float32 (1e60 > 3.4e38), every update's gradient is inf, and the run stops in its
    first step (2 epochs x 2 minibatches >= 3 updates) with the error naming the reward scale."""
    from tether.trainers.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / "ppo"),
        batch_size=8,
        max_new_tokens=8,
        max_steps=3,
        num_epochs=2,
        num_minibatches=2,
        progress=False,
        sample_every=0,
        eval_every=0,
        seed=0,
    )
    with pytest.raises(UserError, match="rewards of an extreme scale"):
        train_ppo(
            cfg, prompts=["Once upon a time", "The dog", "A girl", "The sun"] * 2, reward=lambda c: [1e30] * len(c)
        )
    assert not (tmp_path / "ppo" / "final").exists()


class _TwoRanks:
    """A Dist stand-in for the guard: this process sees ``mine``, the other process ``theirs``."""

    enabled = True

    def __init__(self, theirs: float):
        self.theirs = theirs

    def sum_float(self, x: float) -> float:
        return x + float(not math.isfinite(self.theirs))


def test_every_process_skips_when_one_sees_a_nonfinite_value():
    """The skip decision is all-reduced: a finite update here is skipped when another process's loss
    was NaN (else the replicas' weights would diverge), and counted; 2 in a row stop at limit 2."""
    from tether.training import StepGuard

    guard = StepGuard(limit=2)
    assert guard.check(_TwoRanks(theirs=0.5), 1.0, 0.3) is True
    assert guard.check(_TwoRanks(theirs=math.nan), 1.0, 0.3) is False
    assert guard.stats() == {"opt/skipped_steps": 1, "opt/nonfinite": 1}
    assert guard.check(_TwoRanks(theirs=0.5), 1.0, 0.3) is True  # a good update resets the run of skips
    assert guard.check(_TwoRanks(theirs=0.5), math.inf, 0.3) is False
    with pytest.raises(UserError, match="2 optimiser updates in a row"):
        guard.check(_TwoRanks(theirs=0.5), 1.0, math.nan)
    assert guard.stats() == {"opt/skipped_steps": 3, "opt/nonfinite": 2}


# ---------------------------------------------------------------- the step history


def test_the_step_history_lives_in_a_file_not_in_every_checkpoint(assets_dir, tmp_path):
    """Every step's metrics go to history.jsonl (the last row alone in memory); checkpoints no longer carry
    them (a 2,000-step run's trainer_state.json held 2.8 MB of rows). A run resumed from step 2 returns the
    same history as one never stopped, and history.jsonl holds each step once."""
    straight = tmp_path / "straight"
    whole = train_sft(sft_cfg(assets_dir, straight))
    out = tmp_path / "run"
    train_sft(dataclasses.replace(sft_cfg(assets_dir, out), max_steps=2))
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert "history" not in state["data"] and "eval_history" in state["data"]
    resumed = train_sft(sft_cfg(assets_dir, out), resume=True)
    assert resumed.history == whole.history and len(whole.history) == sft_cfg(assets_dir, out).max_steps
    steps = [json.loads(ln)["step"] for ln in (out / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(whole.history) + 1))


def test_history_keeps_the_last_row_and_writes_an_old_checkpoints_rows(tmp_path):
    from tether.runs import History

    run = RunDir(tmp_path / "o")
    h = History(run)
    assert len(h) == 0 and not h
    for s in (1, 2, 3):
        h.append({"step": s, "loss": 1.0 / s, "t": torch.tensor(0.5)})
    assert len(h) == 3 and h[-1]["step"] == 3 and [r["step"] for r in h.rows()] == [1, 2, 3]
    assert h.rows()[0]["t"] == 0.5  # tensors written as numbers
    with pytest.raises(IndexError):
        h[0]  # only the last row is held in memory
    old = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]  # a checkpoint of an older tether
    h2 = History(RunDir(tmp_path / "p"), legacy=old)
    assert h2.rows() == old and h2[-1] == old[-1] and len(h2) == 2
