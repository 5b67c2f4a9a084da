"""One validation path: each rule is one function raising one ``UserError``, every train function runs its
method's preflight (so a notebook gets the message the command line prints), the CLI runs it once, and
every loop returns one ``TrainResult`` with one meaning of ``eval_hook``."""

from __future__ import annotations

import json

import pytest

from tether import cli
from tether.errors import UserError

PROMPTS = ["Once upon a time", "The little dog", "One day, a girl", "Tom was"]
PAIRS = [{"prompt": "The movie was", "chosen": " great and fun.", "rejected": " dull."}] * 4


def _cli_message(argv, capsys) -> str:
    """The message of the one error line ``tether <command>: error: <message>`` (exit code 2)."""
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = f"tether {argv[0]}: error: "
    assert line.startswith(prefix), line
    return line[len(prefix) :]


def _python_message(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return " ".join(str(e.value).split())  # as the CLI prints it (one line)


# ---- the same message from Python as from the command line, per trainer family ------------------------------


def test_sft_python_and_cli_refuse_alike(stories_path, tmp_path, capsys):
    from tether.trainers.sft import SFTConfig, train_sft

    data = tmp_path / "d.txt"
    data.write_text("Once upon a time there was a dog.\n" * 4)
    flags = {"model": stories_path, "dataset": str(data), "output_dir": str(tmp_path / "run"), "max_length": 1}
    msg = _python_message(train_sft, SFTConfig(**flags))
    assert "max_length" in msg
    assert _cli_message(["sft", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]], capsys) == msg
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_rm_python_and_cli_refuse_alike(stories_path, tmp_path, capsys):
    from tether.trainers.reward_model import RMConfig, train_reward_model

    flags = {"model": stories_path, "dataset": str(tmp_path / "missing.jsonl"), "output_dir": str(tmp_path / "run")}
    msg = _python_message(train_reward_model, RMConfig(**flags))
    assert "missing.jsonl" in msg
    assert _cli_message(["rm", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]], capsys) == msg


@pytest.mark.parametrize(
    "bad", [{"loss_type": "nope"}, {"loss_type": "sigmoid", "label_smoothing": 0.1}, {"reference": "mirror"}]
)
def test_dpo_python_and_cli_refuse_alike(stories_path, tmp_path, capsys, bad):
    """train_dpo(cfg) runs ``tether dpo``'s preflight (loss options were checked by the CLI only before)."""
    from tether.trainers.dpo import DPOConfig, train_dpo

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    flags = {"model": stories_path, "dataset": str(data), "output_dir": str(tmp_path / "run"), **bad}
    msg = _python_message(train_dpo, DPOConfig(**flags))
    assert next(iter(bad)) in msg
    assert _cli_message(["dpo", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]], capsys) == msg
    rows = {k: v for k, v in flags.items() if k != "dataset"}  # in-memory rows: the same check of the option
    assert _python_message(train_dpo, DPOConfig(**rows), rows=PAIRS) == msg


@pytest.mark.parametrize(
    "method,bad,field",
    [
        ("ppo", {"top_p": 1.5}, "top_p"),
        ("ppo", {"temperature": 0.0}, "temperature"),
        ("grpo", {"samples_per_prompt": 1}, "samples_per_prompt"),
        ("rloo", {"kl_estimator": "k9"}, "kl_estimator"),
        ("ppo", {"reference": "precomputed"}, "reference"),
    ],
)
def test_online_python_and_cli_refuse_alike(stories_path, tmp_path, capsys, method, bad, field):
    """train_ppo / train_grpo / train_rloo run the registry's preflight (sampling ranges included, which
    only ``tether kl`` checked before), with prompts given in memory as with a prompts file."""
    from tether.registry import METHODS

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    flags = {
        "model": stories_path,
        "prompts": str(prompts),
        "reward": "vader",
        "output_dir": str(tmp_path / "run"),
        "batch_size": 4,
        "samples_per_prompt": 2,
        **bad,
    }
    spec = METHODS[method]
    msg = _python_message(spec.load("train"), spec.load("config")(**flags))
    assert field in msg
    assert _cli_message([method, *[a for k, v in flags.items() for a in (f"--{k}", str(v))]], capsys) == msg
    in_memory = {k: v for k, v in flags.items() if k != "prompts"}
    assert _python_message(spec.load("train"), spec.load("config")(**in_memory), prompts=PROMPTS) == msg


def test_best_of_n_python_and_cli_refuse_alike(stories, stories_path, tmp_path, capsys):
    from tether.trainers.best_of_n import best_of_n

    tok, model = stories
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    msg = _python_message(best_of_n, model, tok, PROMPTS, n=0, reward="vader")
    assert msg.startswith("n=[0]")
    argv = [
        "bon",
        "--model",
        stories_path,
        "--prompts",
        str(prompts),
        "--reward",
        "vader",
        "--n",
        "0",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert _cli_message(argv, capsys) == msg


def test_the_cli_runs_the_preflight_once(stories_path, tmp_path, monkeypatch, capsys):
    """``tether sft`` checks the input once (its command, then train_sft(preflight=False)); train_sft from
    Python checks it once too. Counted on a rule every preflight runs, with the run stopped right after."""
    import tether.checks as checks
    import tether.trainers.sft as sft

    calls = []
    real = checks.check_train_config
    monkeypatch.setattr(checks, "check_train_config", lambda cfg: (calls.append(1), real(cfg))[1])

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(sft, "RunDir", stop)
    data = tmp_path / "d.txt"
    data.write_text("Once upon a time there was a dog.\n" * 4)
    flags = {"model": stories_path, "dataset": str(data), "output_dir": str(tmp_path / "run")}
    with pytest.raises(Stop):
        cli.main(["sft", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]])
    assert len(calls) == 1
    with pytest.raises(Stop):
        sft.train_sft(sft.SFTConfig(**flags))
    assert len(calls) == 2
    with pytest.raises(Stop):
        sft.train_sft(sft.SFTConfig(**flags), preflight=False)
    assert len(calls) == 2


# ---- one function per rule ------------------------------------------------------------------------------------


def test_each_rule_is_one_function_with_one_message(stories):
    """The reference form, the estimator and the loss type are refused with the same UserError wherever
    they are checked (the preflight's config checks, the factories, the scorer, the loss)."""
    import torch

    from tether.engine import score_rows
    from tether.groups import SamplingSettings, sampling_settings
    from tether.ops.kl import kl_per_token
    from tether.ops.preference import preference_loss
    from tether.reference import build_reference
    from tether.trainers.dpo import DPOConfig, check_config
    from tether.trainers.online import _validate, method_for
    from tether.trainers.ppo import PPOConfig

    _, model = stories

    def message(fn, *a, **k) -> str:
        with pytest.raises(UserError) as e:
            fn(*a, **k)
        return str(e.value)

    ref = message(check_config, DPOConfig(dataset="x", reference="mirror"))
    assert ref == message(build_reference, "mirror", policy=model)
    assert ref.startswith("reference must be one of ('copy', 'lora', 'precomputed', 'offload', 'sync'), got 'mirror'")
    cfg = PPOConfig(reference="precomputed")
    assert "live model" in message(_validate, cfg, method_for(cfg))
    x, m = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    rule = "is an unknown estimator; choose from k1, k2, k3, exact"
    assert (
        message(_validate, PPOConfig(kl_estimator="k9"), method_for(cfg))
        == f"kl_estimator='k9' {rule} (set --kl_estimator)"
    )
    assert message(kl_per_token, x, x, m, estimator="k9") == f"estimator='k9' {rule} (set --estimator)"
    assert "reference_filter" in message(
        score_rows, x[..., None], x[..., None], None, estimators=(), reference_filter="x"
    )
    loss = message(check_config, DPOConfig(dataset="x", loss_type="nope"))
    c = torch.zeros(2)
    assert loss == message(preference_loss, c, c, c, c, beta=0.1, loss_type="nope")
    # the sampling group: one type, checked when it is made (from a config, a mapping or directly)
    assert message(sampling_settings, PPOConfig(top_k=-1)) == message(SamplingSettings, top_k=-1)
    assert message(sampling_settings, {"top_p": 0.0}).startswith("top_p=0.0 must lie in (0, 1]")
    assert "unknown sampling settings" in message(sampling_settings, {"top_q": 1})


def test_sampling_settings_are_derived_once_from_any_sampling_group():
    from tether.commands.bon import BoNConfig
    from tether.commands.kl import KLConfig
    from tether.groups import SamplingSettings, sampling_settings
    from tether.trainers.grpo import GRPOConfig

    want = SamplingSettings(max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9)
    for cls in (KLConfig, BoNConfig, GRPOConfig):
        assert sampling_settings(cls(max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9)) == want
    assert sampling_settings(want) == want and sampling_settings(None) == SamplingSettings()
    assert sampling_settings({"temperature": 0.7}, max_new_tokens=3) == SamplingSettings(
        max_new_tokens=3, temperature=0.7
    )
    assert want.for_reference() == SamplingSettings(max_new_tokens=12, temperature=0.7)
    assert want.same_distribution(SamplingSettings(max_new_tokens=1, temperature=0.7, top_k=5, top_p=0.9))
    assert isinstance(SamplingSettings(top_k=2.0).top_k, int)


# ---- one result type -------------------------------------------------------------------------------------------


def test_train_result_reads_like_the_old_dicts():
    from tether.trainers.result import TrainResult

    r = TrainResult(
        final="out/final",
        metrics={"loss": 0.5, "eval/loss": 0.7, "opt/lr": 1e-3},
        history=[{"step": 1, "loss": 0.5}],
        eval_history=[{"step": 1, "eval/loss": 0.7}],
        info={"train_pairs": 8},
    )
    assert (r["final"], r["loss"], r["eval/loss"], r["train_pairs"]) == ("out/final", 0.5, 0.7, 8)
    assert r["metrics"] is r.metrics and r["history"][0]["step"] == 1
    assert "loss" in r and "missing" not in r and r.get("missing") is None
    with pytest.raises(KeyError):
        r["missing"]
    assert r.summary() == {"final": "out/final", "train_pairs": 8, "loss": 0.5, "eval/loss": 0.7, "opt/lr": 1e-3}
    assert r.summary(("loss",)) == {"final": "out/final", "train_pairs": 8, "loss": 0.5, "eval/loss": 0.7}


def test_dpo_eval_hook_is_the_sampled_evaluation(stories_path, tmp_path):
    """train_dpo with an eval_hook: the hook runs at step 0 and at every evaluation instead of kl/ref (as in
    train_online), the held-out pair metrics still run, and all of it is one row of eval_history."""
    from tether.trainers.dpo import DPOConfig, train_dpo
    from tether.trainers.result import TrainResult

    seen = []

    def hook(step, policy, *, beta):
        seen.append(step)
        return {"eval/kl": float(step)}

    cfg = DPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        eval_every=1,
        kl_prompts=2,
        max_length=32,
        progress=False,
        report_to="none",
    )
    res = train_dpo(cfg, rows=PAIRS, eval_rows=PAIRS[:2], eval_hook=hook)
    assert isinstance(res, TrainResult) and seen == [0, 1, 2]
    assert [e["step"] for e in res.eval_history] == [0, 1, 2]
    assert all("kl/ref" not in e and "eval/loss" in e for e in res.eval_history)
    assert [h["step"] for h in res.history] == [1, 2] and res["eval/kl"] == 2.0
    assert "train_pairs" in res.info and res["final"].endswith("final")
