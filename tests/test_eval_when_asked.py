"""Evaluation only when asked, through the command line: ``--eval_every 0 --eval_final false`` runs no
evaluation (no eval/* or kl/ref keys in metrics.jsonl, the TrainResult or eval_history), the default
evaluates at the last step, and ``--eval_max_prompts 0`` is refused with the switch to use instead.
GRPO, RLOO and PPO share the online loop; DPO has its own."""

import json
from pathlib import Path

import pytest

from tether.cli import main

EVAL_KEYS = ("eval/", "kl/ref_stderr")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _eval_keys(row: dict) -> list[str]:
    return sorted(k for k in row if k.startswith(EVAL_KEYS))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\nThe little dog\nLily wanted\nOne day, Ben\n")
    return path


def _online(method, stories_path, prompts, out, *extra) -> int:
    argv = [method, "--model", stories_path, "--prompts", str(prompts), "--reward", "vader"]
    argv += ["--output_dir", str(out), "--max_steps", "2", "--batch_size", "4", "--samples_per_prompt", "2"]
    argv += ["--max_new_tokens", "6", "--eval_max_prompts", "2", "--eval_samples", "2", "--progress", "false"]
    return main(argv + list(extra))


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_online_run_without_evaluation_logs_no_eval_metrics(method, stories_path, prompts, tmp_path):
    assert _online(method, stories_path, prompts, tmp_path / "off", "--eval_every", "0", "--eval_final", "false") == 0
    rows = _rows(tmp_path / "off")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(_eval_keys(r) == [] for r in rows), [_eval_keys(r) for r in rows]
    assert "kl/ref" in rows[-1]  # the training KL is still measured every step


def test_online_default_evaluates_at_the_last_step_only(stories_path, prompts, tmp_path):
    assert _online("grpo", stories_path, prompts, tmp_path / "on") == 0
    rows = _rows(tmp_path / "on")
    assert _eval_keys(rows[0]) == [] and "eval/kl" in rows[-1] and "eval/reward/vader" in rows[-1]


def test_eval_max_prompts_zero_names_the_switch(stories_path, prompts, tmp_path, capsys):
    assert _online("grpo", stories_path, prompts, tmp_path / "zero", "--eval_max_prompts", "0") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--eval_every 0 --eval_final false" in err


def test_dpo_without_evaluation(stories_path, tmp_path):
    from tether.trainers.dpo import DPOConfig, train_dpo

    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Once upon a time", "chosen": " there was a happy cat.", "rejected": " the cat was sad."},
        {"prompt": "The little dog", "chosen": " ran to the park and played.", "rejected": " sat alone."},
    ] * 6
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["dpo", "--model", stories_path, "--dataset", str(data), "--max_steps", "2", "--batch_size", "4"]
    argv += ["--max_length", "32", "--eval_fraction", "0.25", "--kl_prompts", "2", "--kl_max_new_tokens", "4"]
    argv += ["--progress", "false"]
    assert main(argv + ["--output_dir", str(tmp_path / "off"), "--eval_every", "0", "--eval_final", "false"]) == 0
    assert main(argv + ["--output_dir", str(tmp_path / "on")]) == 0
    off, on = _rows(tmp_path / "off"), _rows(tmp_path / "on")
    assert all(_eval_keys(r) == [] and "kl/ref" not in r for r in off)
    assert "eval/rewards/accuracy" in on[-1] and "kl/ref" in on[-1] and _eval_keys(on[0]) == []
    # the Python API's TrainResult: no evaluation keys and no eval_history when off
    cfg = DPOConfig(
        model=stories_path,
        dataset=str(data),
        output_dir=str(tmp_path / "api"),
        max_steps=1,
        batch_size=4,
        max_length=32,
        eval_fraction=0.25,
        kl_prompts=2,
        kl_max_new_tokens=4,
        progress=False,
        eval_final=False,
    )
    result = train_dpo(cfg)
    assert result.eval_history == [] and _eval_keys(result.metrics) == [] and "kl/ref" not in result.metrics
