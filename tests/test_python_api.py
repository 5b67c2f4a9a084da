"""The Python API a TRL user writes (docs/python-api.md): the trainer classes, model / tokenizer / peft /
dataset objects, callbacks. The two scripts of the page run here as they are written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tether
from tether import DPOConfig, GRPOConfig, UserError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy"]
PAIRS = [
    {"prompt": "The film was", "chosen": " a joy.", "rejected": " a bore."},
    {"prompt": "The story", "chosen": " was fun.", "rejected": " was dull."},
] * 4


def _tested_scripts() -> dict[str, str]:
    """The ```python blocks of docs/python-api.md marked ``<!-- tested: NAME -->``."""
    found = re.findall(r"<!-- tested: (\w+) -->\s*```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(found)


def test_the_page_marks_a_grpo_and_a_dpo_script():
    assert set(_tested_scripts()) == {"grpo", "dpo"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "dpo"])
def test_the_scripts_of_the_python_api_page_run(name, tmp_path, stories_path, assets_dir):
    """Each script as written, in a fresh interpreter, with the stories260K model as MODEL. ~20 s each."""
    (tmp_path / "script.py").write_text(_tested_scripts()[name])
    env = {**os.environ, "MODEL": str(stories_path), "TETHER_ASSETS": str(assets_dir), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(tether.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / f"{name}-api"
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer_config.json").exists()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["kl/ref"] >= 0
    if name == "grpo":  # two weighted rewards: each logged, and their weighted sum
        assert {"reward/reward_short/mean", "reward/reward_sentence/mean", "reward/weighted_sum"} <= rows[-1].keys()


# --------------------------------------------------------------------------------------------------
# model objects: the same run as from the path


def _grpo_args(tmp_path, name="o", **kw):
    base = dict(
        output_dir=str(tmp_path / name),
        max_steps=2,
        batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=6,
        eval_every=0,
        eval_max_prompts=2,
        progress=False,
        save_checkpoints=False,
    )
    return GRPOConfig(**{**base, **kw})


def _length(completions, **kw):
    return [len(c) / 10 for c in completions]


def test_a_model_object_trains_as_its_path_does(tmp_path, stories_path):
    """GRPO from ``model=AutoModelForCausalLM.from_pretrained(path)`` with its tokenizer follows the run
    from the path exactly (same weights, same seeds, same reference): identical metrics, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tether.train_grpo(_grpo_args(tmp_path, "a", model=str(stories_path)), prompts=PROMPTS, reward=_length)
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    tok = AutoTokenizer.from_pretrained(stories_path)
    b = tether.GRPOTrainer(
        model=model, args=_grpo_args(tmp_path, "b"), train_dataset=PROMPTS, processing_class=tok, reward_funcs=_length
    ).train()
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra == rb
    assert a["kl/ref"] > 0  # the reference stayed the starting model while the policy moved
    assert any(
        not torch.equal(p, q)
        for p, q in zip(  # trained in place
            model.state_dict().values(), AutoModelForCausalLM.from_pretrained(stories_path).state_dict().values()
        )
    )


def test_ppo_from_a_model_object_builds_its_critic_and_reference_from_the_starting_weights(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM

    from tether import PPOConfig

    common = dict(
        max_steps=2,
        batch_size=4,
        max_new_tokens=6,
        eval_every=0,
        eval_max_prompts=2,
        progress=False,
        save_checkpoints=False,
    )
    a = tether.train_ppo(
        PPOConfig(output_dir=str(tmp_path / "a"), model=str(stories_path), **common), prompts=PROMPTS, reward=_length
    )
    b = tether.train_ppo(
        PPOConfig(output_dir=str(tmp_path / "b"), **common),
        prompts=PROMPTS,
        reward=_length,
        model=AutoModelForCausalLM.from_pretrained(stories_path),
    )
    assert a.history == b.history


def test_peft_config_is_the_lora_of_the_config_fields(tmp_path, stories_path):
    """``peft_config=LoraConfig(...)`` on a model object trains what ``lora_r`` / ``lora_alpha`` / ``lora_dropout``
    train from the path: identical DPO losses (the reference: the base with the adapters off)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    common = dict(
        max_steps=3,
        batch_size=4,
        kl_prompts=0,
        eval_fraction=0.0,
        progress=False,
        learning_rate=1e-3,
        save_checkpoints=False,
        reference="lora",
    )
    a = tether.train_dpo(
        DPOConfig(
            output_dir=str(tmp_path / "a"),
            model=str(stories_path),
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            lora_target_modules=["q_proj", "v_proj"],
            **common,
        ),
        rows=PAIRS,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    b = tether.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(stories_path),
        args=DPOConfig(output_dir=str(tmp_path / "b"), **common),
        train_dataset=PAIRS,
        peft_config=lora,
    ).train()
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert a.history[-1]["loss"] != a.history[0]["loss"]  # it trained


def test_a_datasetdict_gives_the_train_and_the_held_out_split(tmp_path, stories_path):
    from datasets import Dataset, DatasetDict

    data = DatasetDict({"train": Dataset.from_list(PAIRS), "test": Dataset.from_list(PAIRS[:2])})
    res = tether.DPOTrainer(
        model=str(stories_path),
        args=DPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, batch_size=4, kl_prompts=0, progress=False),
        train_dataset=data,
    ).train()
    assert res["train_pairs"] == len(PAIRS) and res["eval_pairs"] == 2
    assert "eval/loss" in res.metrics


def test_sft_and_rm_take_datasets_and_record_them_for_resume(tmp_path, stories_path):
    """SFT and RM read in-memory rows through the run's own copy (OUTPUT_DIR/dataset.jsonl), which the saved
    config names: the run resumes from the command line."""
    from datasets import Dataset

    from tether import RewardTrainer, RMConfig, SFTConfig, SFTTrainer
    from tether.cli import main

    texts = Dataset.from_dict({"text": [f"Once upon a time there was a cat number {i}." for i in range(12)]})
    sft = SFTTrainer(
        model=str(stories_path),
        train_dataset=texts,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4, progress=False, save_every=1),
    ).train()
    assert sft["train_examples"] if "train_examples" in sft else True
    saved = (tmp_path / "sft" / "dataset.jsonl").read_text().splitlines()
    assert [json.loads(ln)["text"] for ln in saved] == texts["text"]
    assert (
        main(
            [
                "sft",
                "--config",
                str(tmp_path / "sft" / "config.yaml"),
                "--resume",
                "--max_steps",
                "3",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    rm = RewardTrainer(
        model=str(stories_path),
        train_dataset=PAIRS,
        eval_dataset=PAIRS[:2],
        args=RMConfig(output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, progress=False),
    ).train()
    assert (tmp_path / "rm" / "eval_dataset.jsonl").exists() and "eval/rm/accuracy" in rm.metrics


def test_reward_trainer_takes_a_sequence_classifier_and_refuses_a_causal_lm(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tether import RewardTrainer, RMConfig

    args = RMConfig(output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, progress=False, eval_fraction=0.0)
    scorer = AutoModelForSequenceClassification.from_pretrained(stories_path, num_labels=1)
    res = RewardTrainer(model=scorer, args=args, train_dataset=PAIRS).train()
    assert res["loss"] > 0
    with pytest.raises(UserError, match="sequence classifier with one output"):
        RewardTrainer(
            model=AutoModelForCausalLM.from_pretrained(stories_path),
            args=RMConfig(output_dir=str(tmp_path / "rm2"), max_steps=1),
            train_dataset=PAIRS,
        ).train()
    assert not (tmp_path / "rm2").exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------------
# callbacks


def test_callbacks_of_each_kind_are_called_and_can_stop_the_run(tmp_path, stories_path):
    from transformers import TrainerCallback as HFCallback

    from tether import TrainerCallback

    seen = {"fn": [], "saves": [], "end": None, "hf": []}

    class Mine(TrainerCallback):
        def on_log(self, step, metrics):
            return step >= 3  # stop after step 3 of 6

        def on_save(self, step, path):
            seen["saves"].append((step, Path(path).name))

        def on_train_end(self, result):
            seen["end"] = result

    class Theirs(HFCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen["hf"].append((state.global_step, state.max_steps, args.output_dir, "loss" in logs))

    args = DPOConfig(
        output_dir=str(tmp_path / "o"),
        max_steps=6,
        batch_size=4,
        kl_prompts=0,
        eval_fraction=0.0,
        progress=False,
        save_every=2,
    )
    res = tether.train_dpo(
        args, model=str(stories_path), rows=PAIRS, callbacks=[Mine(), Theirs(), lambda step, m: seen["fn"].append(step)]
    )
    assert seen["fn"] == [1, 2, 3] and [s for s, *_ in seen["hf"]] == [1, 2, 3]
    assert seen["hf"][0][1:] == (6, str(tmp_path / "o"), True)
    assert seen["saves"] == [(2, "step-2"), (3, "step-3")]  # the periodic one, then the stopped run's
    assert seen["end"] is res and len(res.history) == 3 and (tmp_path / "o" / "final").is_dir()


def test_a_transformers_callback_stops_through_its_control(tmp_path, stories_path):
    from transformers import TrainerCallback as HFCallback

    class Early(HFCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            control.should_training_stop = state.global_step >= 2

    res = tether.GRPOTrainer(
        model=str(stories_path),
        args=_grpo_args(tmp_path, max_steps=5),
        train_dataset=PROMPTS,
        reward_funcs=_length,
        callbacks=[Early()],
    ).train()
    assert [r["step"] for r in res.history] == [1, 2]


# --------------------------------------------------------------------------------------------------
# mistakes


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (dict(args=object()), "args: pass tether.GRPOConfig"),
        (dict(model=3), "model: pass a model folder"),
        (dict(tokenizer="gpt2", processing_class=None), "tokenizer (processing_class): pass a transformers tokenizer"),
        (dict(ref_model=torch.nn.Linear(2, 2)), "ref_model: pass the reference model's folder"),
        (dict(callbacks=[3]), "callbacks: int is neither"),
        (dict(peft_config="lora", args=GRPOConfig(lora_r=4)), "peft_config and lora_r > 0"),
    ],
)
def test_mistakes_are_one_line_errors_before_anything_runs(kwargs, says, tmp_path, stories_path):
    kw = dict(model=str(stories_path), train_dataset=PROMPTS, reward_funcs=_length, args=_grpo_args(tmp_path))
    kw.update(kwargs)
    if isinstance(kw["args"], GRPOConfig):
        import dataclasses

        kw["args"] = dataclasses.replace(kw["args"], output_dir=str(tmp_path / "o"))
    with pytest.raises((UserError, TypeError), match=re.escape(says)):
        tether.GRPOTrainer(**kw).train()
    assert not (tmp_path / "o").exists()


def test_the_trainers_and_callbacks_are_exported():
    for name in (
        "SFTTrainer",
        "RewardTrainer",
        "DPOTrainer",
        "GRPOTrainer",
        "RLOOTrainer",
        "PPOTrainer",
        "TrainerCallback",
    ):
        assert name in tether.__all__ and getattr(tether, name).__name__ == name


def test_datasets_or_rows_not_both():
    from datasets import Dataset, DatasetDict

    from tether.inputs import datasets_as_rows

    with pytest.raises(UserError, match="pass train_dataset / eval_dataset or prompts, not both"):
        datasets_as_rows(PROMPTS, None, PROMPTS, None, names="prompts")
    assert datasets_as_rows(None, None, ["a"], ["b"], names="prompts") == (["a"], ["b"])
    d = DatasetDict({"train": Dataset.from_list(PAIRS), "validation": Dataset.from_list(PAIRS[:1])})
    rows, held = datasets_as_rows(d, None, None, None, names="rows")
    assert rows == PAIRS and held == PAIRS[:1]
