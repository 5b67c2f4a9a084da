"""Several weighted rewards, as TRL's GRPOTrainer takes them (``reward_funcs`` + ``reward_weights``): the
weighted nansum with ``None`` = "not applicable", each reward's mean/std metric, TRL's dotted
``module.function`` names, the comma list on the command line, and the one-line errors for a reward
function's bad return value and for weights that do not match the rewards (docs/from-trl.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tether import cli
from tether.checks import check_reward_list
from tether.errors import UserError
from tether.ops.reward_model import nan_mean_std, weighted_reward_sum
from tether.rewards import (
    CallableSource,
    RewardSet,
    WeightedRewards,
    build_reward,
    combine_rewards,
    distinct_names,
    reward_specs,
)

NAN = float("nan")
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy"]

# Two reward functions of the end-to-end runs: small integers and halves, so that every weighted sum
# below is exact in float32 and the checks are equalities.
REWARDS_PY = '''
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def words_reward(completions, **kwargs):
    """Words in the completion, or None (not applicable) when it has an odd number of characters."""
    return [None if len(c) % 2 else float(len(c.split())) for c in completions]


def one_number(completions, **kwargs):
    return 0.5
'''


def _fn(values, name):
    def f(completions):
        return list(values)[: len(completions)]

    f.__name__ = name
    return CallableSource(f)


# ---------------------------------------------------------------- the math, by hand


def test_weighted_nansum_by_hand():
    """TRL: rewards = (rewards_per_func * weights).nansum(dim=1). Rows: both rewards, only the first, only the
    second. 0.5·2 + 2·3 = 7; 0.5·4 = 2; 2·(-1) = -2."""
    per_func = torch.tensor([[2.0, 3.0], [4.0, NAN], [NAN, -1.0]])
    assert weighted_reward_sum(per_func, torch.tensor([0.5, 2.0])).tolist() == [7.0, 2.0, -2.0]
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        weighted_reward_sum(per_func, torch.tensor([1.0]))


def test_nan_mean_std_by_hand():
    """[1, NaN, 3]: mean 2, sample std sqrt(((1-2)² + (3-2)²) / (2-1)) = sqrt(2) (TRL's nanmean / nanstd)."""
    mean, std = nan_mean_std(torch.tensor([1.0, NAN, 3.0]))
    assert mean == 2.0 and std == math.sqrt(2.0)  # exact: each step is exact in float64, the sqrt correctly rounded
    assert math.isnan(nan_mean_std(torch.tensor([5.0, NAN]))[1])  # one value: no std
    assert all(math.isnan(v) for v in nan_mean_std(torch.tensor([NAN, NAN])))


def test_reward_set_of_several_rewards_by_hand():
    """f = [1, None, 3, 4], g = [None, 2, 0.5, -1], weights (0.5, 2): totals 0.5, 4, 2.5, 0; the optimised score is
    the total (then normalised/clipped as for one reward), each reward comes back raw with NaN for None."""
    rs = RewardSet(
        WeightedRewards([_fn([1.0, None, 3.0, 4.0], "f"), _fn([None, 2.0, 0.5, -1.0], "g")], [0.5, 2.0]),
        [_fn([9.0, 9.0, 9.0, 9.0], "gold")],
        clip=2.0,
    )
    scores, metrics, components = rs.score(["p"] * 4, ["a", "b", "c", "d"])
    assert metrics["reward/weighted_sum"].tolist() == [0.5, 4.0, 2.5, 0.0]
    assert scores.tolist() == [0.5, 2.0, 2.0, 0.0]  # reward_clip applies to the weighted total
    assert metrics["reward/gold"].tolist() == [9.0] * 4
    assert set(components) == {"f", "g"}
    assert components["f"][[0, 2, 3]].tolist() == [1.0, 3.0, 4.0] and math.isnan(float(components["f"][1]))
    assert math.isnan(float(components["g"][0])) and components["g"][1:].tolist() == [2.0, 0.5, -1.0]
    assert rs(["p"] * 4, ["a", "b", "c", "d"])[0].tolist() == scores.tolist()  # __call__: (scores, metrics)


def test_a_completion_no_reward_scores_is_an_error():
    """TRL warns and trains on a 0 it made up; tether refuses, naming the completion and the rewards."""
    both_none = WeightedRewards([_fn([1.0, None], "f"), _fn([2.0, None], "g")])
    with pytest.raises(UserError, match=r"no reward scored completion 1 of 2 \(f, g all returned None"):
        both_none(["p", "q"], ["a", "b"])
    alone = RewardSet(_fn([1.0, None], "f"))  # one reward: None has no other reward to fall back on
    with pytest.raises(UserError, match="returned None for completion 1 of 2"):
        alone(["p", "q"], ["a", "b"])
    with pytest.raises(UserError, match="non-finite value"):  # NaN is a bug, None is the way to abstain
        WeightedRewards([_fn([NAN], "f"), _fn([1.0], "g")])(["p"], ["a"])


def test_names_weights_and_the_single_reward_path():
    assert distinct_names(["reward", "reward", "g", "reward"]) == ["reward", "reward_2", "g", "reward_3"]
    assert distinct_names(["f", "f", "f_2"]) == ["f", "f_3", "f_2"]
    two = WeightedRewards([_fn([1.0], "reward"), _fn([2.0], "reward")])
    assert two.names == ["reward", "reward_2"] and two.weights.tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match=r"reward_weights has 3 weight\(s\) for 2 reward\(s\)"):
        WeightedRewards([_fn([1.0], "f"), _fn([2.0], "g")], [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="duplicated: \\['gold'\\]"):  # a reward of the sum and a logged one
        RewardSet(WeightedRewards([_fn([1.0], "gold"), _fn([2.0], "g")]), [_fn([0.0], "gold")])
    one = _fn([1.0], "f")
    assert combine_rewards([one]) is one and combine_rewards([one], [1.0]) is one  # metrics as ever
    assert isinstance(combine_rewards([one], [3.0]), WeightedRewards)


def test_reward_specs_from_yaml_and_command_line(tmp_path):
    assert reward_specs("vader") == ["vader"]
    assert reward_specs("fmt.py:f, acc.py:g") == ["fmt.py:f", "acc.py:g"]
    assert reward_specs(["a:f", "vader"]) == ["a:f", "vader"]
    odd = tmp_path / "rm,v2"  # an existing path with a comma is one spec
    odd.mkdir()
    assert reward_specs(str(odd)) == [str(odd)]
    with pytest.raises(UserError, match="empty entry"):
        reward_specs("a.py:f,,b.py:g")
    with pytest.raises(UserError, match=r"1 weight\(s\) for 2 reward\(s\)"):
        check_reward_list("vader,vader", [1.0])


@pytest.mark.parametrize(
    "out, says",
    [
        (0.5, "returned one number (0.5), not one per completion"),
        (torch.tensor(1.0), "returned one number"),
        ([1.0], "returned 1 values for 2 completions"),
        ("good", "returned str, not a list of floats"),
        ([1.0, "x"], "returned str 'x' at completion 1"),
        ([1.0, float("inf")], "non-finite value (inf) at completion 1"),
    ],
)
def test_a_reward_functions_bad_return_is_a_user_error(out, says):
    def my_reward(completions):
        return out

    with pytest.raises(UserError) as e:
        CallableSource(my_reward)(["p", "q"], ["a", "b"])
    assert says in str(e.value) and "my_reward" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- TRL's dotted names


def test_dotted_module_function_from_the_working_directory(tmp_path, monkeypatch):
    """``my_rewards_wd.length_reward`` imports from the folder the command runs in (as ``trl grpo`` would)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "my_rewards_wd.py").write_text(REWARDS_PY)
    check_reward_list("my_rewards_wd.length_reward,my_rewards_wd.words_reward", None)  # the preflight finds it
    src = build_reward("my_rewards_wd.length_reward")
    assert isinstance(src, CallableSource) and src.name == "length_reward"
    assert src(["p"], ["abc"]).tolist() == [3.0]
    sys.modules.pop("my_rewards_wd", None)
    with pytest.raises(UserError, match="cannot find module 'no_such_pkg_x'"):
        check_reward_list("no_such_pkg_x.f", None)


def test_an_existing_folder_wins_over_a_dotted_name(tmp_path, monkeypatch):
    """A folder named like ``pkg.reward`` is a reward-model path: it is read as one (and here refused as a causal
    LM, not a reward model), never imported as a module."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "pkg.reward"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="holds a LlamaForCausalLM, not a reward model"):
        check_reward_list("pkg.reward", None)
    from tether.trl_names import translate

    assert translate("reward_funcs", ["pkg.reward", "a.b"], {"reward"}) == [("reward", ["pkg.reward", "a:b"])]


# ---------------------------------------------------------------- through the command line


@pytest.fixture
def cli_env(monkeypatch, assets_dir, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    monkeypatch.setenv("TETHER_ASSETS", str(assets_dir))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "wd_rewards.py").write_text(REWARDS_PY)
    (tmp_path / "file_rewards.py").write_text(REWARDS_PY)
    yield tmp_path
    sys.modules.pop("wd_rewards", None)


def _grpo(tmp_path, stories_path, *extra):
    argv = ["grpo", "--model", stories_path, "--prompts", str(tmp_path / "prompts.txt"), "--output_dir"]
    argv += [str(tmp_path / "run"), "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "8"]
    argv += ["--max_steps", "2", "--eval_max_prompts", "2", "--eval_samples", "2", "--progress", "false"]
    return cli.main(argv + list(extra))


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_grpo_with_two_weighted_rewards_logs_each_and_their_sum(cli_env, stories_path):
    """`tether grpo --reward wd_rewards.length_reward,file_rewards.py:words_reward --reward_weights 0.5,2`: a
    dotted name from the working directory and a file, weighted. Every completion of the step is in
    samples.jsonl, so each logged number is checked against the per-completion values. ~6 s."""
    rc = _grpo(
        cli_env,
        stories_path,
        "--reward",
        "wd_rewards.length_reward,file_rewards.py:words_reward",
        "--reward_weights",
        "0.5,2",
        "--sample_every",
        "1",
        "--num_logged_samples",
        "4",
    )
    assert rc == 0
    run = cli_env / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    step1 = [s for s in samples if s["step"] == 1]
    assert len(step1) == 4
    for s in step1:
        length, words = s["reward/length_reward"], s["reward/words_reward"]
        assert length == len(s["completion"])
        assert words == (None if len(s["completion"]) % 2 else len(s["completion"].split()))
        # the optimised score is the weighted nansum: small integers and halves, exact in float32
        assert s["score"] == s["reward/weighted_sum"] == 0.5 * length + (0.0 if words is None else 2.0 * words)
    m = next(r for r in rows if r["step"] == 1 and "reward/score" in r)
    lengths = [s["reward/length_reward"] for s in step1]
    assert m["reward/length_reward/mean"] == sum(lengths) / 4  # integers: exact in float64
    mean = sum(lengths) / 4
    # float64 of 4 small numbers: the two sides differ only by the rounding order of 4 squares, their sum and the
    # sqrt (a few float64 spacings)
    want = math.sqrt(sum((x - mean) ** 2 for x in lengths) / 3)
    assert math.isclose(m["reward/length_reward/std"], want, rel_tol=8 * sys.float_info.epsilon)
    words = [s["reward/words_reward"] for s in step1 if s["reward/words_reward"] is not None]
    if words:  # the mean over the completions the reward applies to
        assert m["reward/words_reward/mean"] == sum(words) / len(words)
    else:
        assert "reward/words_reward/mean" not in m
    # the step's mean of the totals: halves and small integers, exact in the float32 sum and the float64 mean
    assert m["reward/score"] == m["reward/weighted_sum"] == sum(s["score"] for s in step1) / 4
    last = rows[-1]
    assert {"eval/reward/weighted_sum", "eval/reward/length_reward/mean"} <= set(last)


def test_a_reward_function_returning_a_float_ends_with_one_line(cli_env, stories_path, capsys):
    rc = _grpo(cli_env, stories_path, "--reward", "file_rewards.py:one_number", "--sample_every", "0")
    assert rc == 2
    line = _error(capsys)
    assert line.startswith("tether grpo: error: reward function file_rewards.py:one_number returned one number (0.5)")


def test_weights_that_do_not_match_the_rewards_fail_before_weights_load(cli_env, stories_path, capsys, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights loaded before the checks failed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    rc = _grpo(cli_env, stories_path, "--reward", "file_rewards.py:length_reward,vader", "--reward_weights", "1")
    assert rc == 2
    assert "reward_weights has 1 weight(s) for 2 reward(s)" in _error(capsys)
    rc = _grpo(cli_env, stories_path, "--reward", "file_rewards.py:length_reward,nowhere.py:f")
    assert rc == 2
    assert "nowhere.py" in _error(capsys)  # every spec of the list is checked
    assert not (cli_env / "run").exists()


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_python_api_takes_a_list_of_functions(method, cli_env, stories_path):
    """``train_grpo(cfg, reward=[f, g])`` (and RLOO's, PPO's), the weights from the config. ~3 s each."""
    import importlib

    module = importlib.import_module(f"tether.trainers.{method}")
    Config, train = getattr(module, f"{method.upper()}Config"), getattr(module, f"train_{method}")

    def fmt(completions, **kw):
        return [1.0 if c.startswith(" ") else 0.0 for c in completions]

    def acc(completions, **kw):
        return [float(len(c) > 10) for c in completions]

    cfg = Config(
        model=stories_path,
        prompts=str(cli_env / "prompts.txt"),
        output_dir=str(cli_env / "py"),
        batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=8,
        max_steps=1,
        eval_every=0,
        eval_max_prompts=2,
        eval_samples=1,
        reward_weights=[1.0, 0.25],
        progress=False,
    )
    res = train(cfg, reward=[fmt, acc])
    assert {"reward/fmt/mean", "reward/fmt/std", "reward/acc/mean", "reward/weighted_sum"} <= set(res.metrics)
    m = res.metrics
    # the total's batch mean is the weighted sum of the means (no None here); values 0 / 1 / 0.25 / 1.25 over 4
    # completions: every sum and mean is exact, in float32 and float64 alike
    assert m["reward/weighted_sum"] == m["reward/fmt/mean"] + 0.25 * m["reward/acc/mean"]
    with pytest.raises(UserError, match=r"2 weight\(s\) for 3 reward\(s\)"):
        train(cfg, reward=[fmt, acc, fmt])


def test_a_reward_that_is_not_a_spec_is_a_user_error():
    for value in (None, 3, ["vader", 1.5]):
        with pytest.raises(UserError, match="is not a reward"):
            reward_specs(value)


_WORKER = """
import json, os, sys, torch
torch.set_num_threads(1)
from tether.trainers.grpo import GRPOConfig, train_grpo
cfg = GRPOConfig(**json.loads(sys.argv[1]))
res = train_grpo(cfg, prompts=json.loads(sys.argv[2]))
json.dump(res.history, open(os.path.join(cfg.output_dir, f"history{os.environ['RANK']}.json"), "w"))
"""


@pytest.mark.slow
def test_two_processes_log_each_reward_over_the_global_batch(stories_path, tmp_path):
    """GRPO under 2 processes (gloo on CPU, as torchrun sets the env) with two integer-valued rewards weighted
    0.5 and 2: each reward's mean is over both processes' completions, so the globally reduced mean of the
    weighted sum equals 0.5·mean(length) + 2·mean(echo) exactly (integers and halves over 8 completions). A
    per-process mean would miss it. ~30 s."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cfg = dict(
        model=stories_path,
        output_dir=str(out),
        reward="reward_fns:length_reward,reward_fns:prompt_echo",
        reward_weights=[0.5, 2.0],
        batch_size=8,
        samples_per_prompt=2,
        max_new_tokens=8,
        max_steps=2,
        progress=False,
        sample_every=0,
        eval_max_prompts=2,
        eval_samples=1,
    )
    tests = str(Path(__file__).resolve().parent)
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, json.dumps(cfg), json.dumps(PROMPTS)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-3000:]
    h0, h1 = (json.loads((out / f"history{r}.json").read_text()) for r in range(2))
    assert h0 == h1  # every process logs the same global numbers
    for h in h0:
        assert h["reward/weighted_sum"] == 0.5 * h["reward/length_reward/mean"] + 2.0 * h["reward/prompt_echo/mean"]
        assert h["reward/length_reward/std"] >= 0 and "reward/prompt_echo/std" in h
