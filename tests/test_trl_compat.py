"""A TRL user's configs and habits (docs/from-trl.md): TRL's field names, kebab-case flags,
bare booleans, nested config groups, and TRL-format YAML files run unchanged through tether."""

import gzip
import json
import logging

import pytest
import yaml

from tether.config import build_parser, from_dict, load_config, parse_config, save_config
from tether.groups import SamplingConfig
from tether.trainers.dpo import DPOConfig
from tether.trainers.grpo import GRPOConfig
from tether.trainers.sft import SFTConfig

STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy"]


def _parse_error(cls, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_config(cls, argv)
    return capsys.readouterr().err


def _yaml(tmp_path, data: dict, name="trl.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------- TRL-format YAML run through tether


def test_trl_dpo_yaml_runs_through_tether_dpo(stories_path, assets_dir, tmp_path, caplog):
    """A DPO YAML as a TRL user writes it (every key below is a DPOConfig / ModelConfig / ScriptArguments
    field of TRL), with dataset_name pointing at a local JSONL file of real HH-RLHF pairs. tether-only
    settings (no KL sampling, fewer eval pairs) come as kebab-case flags. ~5 s on 2 CPU cores."""
    from tether.commands.dpo import main

    with gzip.open(assets_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = _yaml(
        tmp_path,
        {
            "model_name_or_path": stories_path,
            "dataset_name": str(data),
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 5.0e-4,
            "max_steps": 2,
            "beta": 0.1,
            "loss_type": "sigmoid",
            "max_length": 64,
            "max_prompt_length": 32,
            "logging_steps": 1,
            "save_steps": 2,
            "output_dir": str(out),
            "bf16": False,
            "report_to": "none",
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": 0,
            "gradient_checkpointing": False,
            "seed": 0,
            "run_name": "trl-dpo",
            "logging_first_step": True,
            "push_to_hub": False,
            "remove_unused_columns": False,
            "use_peft": False,
            "torch_dtype": "float32",
        },
    )
    with caplog.at_level(logging.INFO, logger="tether.config"):
        rc = main(["--config", config, "--kl-prompts", "0", "--eval-pairs", "2", "--progress", "false"])
    assert rc == 0
    ignored = [r.getMessage() for r in caplog.records if "ignored:" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].endswith(
        "ignored: bf16, run_name, logging_first_step, push_to_hub, remove_unused_columns"
    )  # bf16 false: float32 anyway
    saved = load_config(DPOConfig, out / "config.yaml")  # the resolved config round-trips through load
    assert (saved.model, saved.dataset, saved.output_dir) == (stories_path, str(data), str(out))
    assert (saved.batch_size, saved.grad_accum) == (4, 2)  # global batch = 2 per device x 2 accumulation x 1 process
    assert (saved.log_every, saved.save_every, saved.lr_schedule, saved.dtype, saved.lora_r) == (
        1,
        2,
        "constant",
        "float32",
        0,
    )
    assert saved.report_to == "none" and saved.max_prompt_length == 32 and saved.learning_rate == 5e-4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2]
    assert (out / "final").is_dir()


def test_trl_grpo_yaml_runs_through_tether_grpo(stories_path, tmp_path):
    """A GRPO YAML in TRL's names: dataset_name is the prompts, num_generations the group size,
    max_completion_length the sampling length, loss_type dapo the token-mean aggregation, use_peft LoRA
    (r 16 unless lora_r is given), reward_funcs the one reward (TRL's dotted path read as module:function).
    ~8 s on 2 CPU cores."""
    from tether.commands.grpo import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(STORY_PROMPTS) + "\n")
    out = tmp_path / "run"
    config = _yaml(
        tmp_path,
        {
            "model_name_or_path": stories_path,
            "dataset_name": str(prompts),
            "reward_funcs": ["reward_fns.length_reward"],
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "num_generations": 2,
            "max_completion_length": 8,
            "temperature": 0.9,
            "learning_rate": 1.0e-3,
            "beta": 0.04,
            "max_steps": 2,
            "loss_type": "dapo",
            "scale_rewards": "group",
            "num_iterations": 1,
            "epsilon": 0.2,
            "logging_steps": 1,
            "output_dir": str(out),
            "bf16": False,
            "report_to": ["none"],
            "use_vllm": False,
            "use_peft": True,
            "lora_alpha": 32,
            "lora_target_modules": "all-linear",
            "seed": 0,
            "save_strategy": "no",
        },
    )
    rc = main(
        [
            "--config",
            config,
            "--eval-max-prompts",
            "2",
            "--eval-samples",
            "1",
            "--sample-every",
            "0",
            "--progress",
            "false",
        ]
    )
    assert rc == 0
    saved = load_config(GRPOConfig, out / "config.yaml")
    assert (saved.model, saved.prompts, saved.reward) == (stories_path, str(prompts), "reward_fns:length_reward")
    assert (saved.batch_size, saved.samples_per_prompt, saved.max_new_tokens, saved.temperature) == (4, 2, 8, 0.9)
    assert (saved.loss_aggregation, saved.scale_rewards, saved.num_epochs, saved.clip_eps) == (
        "token_mean",
        True,
        1,
        0.2,
    )
    assert (saved.lora_r, saved.lora_alpha) == (16, 32)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "grpo/policy_loss" in r] == [1, 2]
    assert rows[0]["reward/score"] > 0 and rows[0]["opt/grad_norm"] > 0  # a real learning signal
    assert rows[0]["kl/ref"] == 0.0  # step 1 samples from π_θ = π_ref (LoRA's B starts at 0)
    assert (out / "final").is_dir()


def test_the_trl_names_example_is_the_dpo_example():
    """examples/dpo_hh_trl_names.yaml is examples/dpo_hh.yaml in TRL's names: the same run (plus a
    warm-up of ceil(0.05 x 200) = 10 steps, logging every step and no TensorBoard)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    trl = load_config(DPOConfig, root / "dpo_hh_trl_names.yaml")
    ours = load_config(DPOConfig, root / "dpo_hh.yaml")
    for name in (
        "model",
        "dataset",
        "batch_size",
        "learning_rate",
        "max_steps",
        "beta",
        "loss_type",
        "max_length",
        "eval_every",
        "save_every",
        "skip_bad_rows",
        "kl_prompts",
        "seed",
        "reference",
        "dtype",
        "lora_r",
    ):
        assert getattr(trl, name) == getattr(ours, name), name
    assert (trl.grad_accum, trl.warmup_steps, trl.log_every, trl.report_to) == (2, 10, 1, "none")


# ---------------------------------------------------------------- names: TRL aliases, kebab-case, bare booleans


def test_kebab_case_and_bare_boolean_flags():
    cfg, _ = parse_config(
        SFTConfig,
        [
            "--packing",
            "--output-dir",
            "runs/x",
            "--learning-rate",
            "1e-3",
            "--completion-only-loss",
            "false",
            "--max-steps=3",
            "--lora-r=4",
            "--progress",
        ],
    )
    assert (cfg.packing, cfg.output_dir, cfg.learning_rate, cfg.completion_only_loss) == (True, "runs/x", 1e-3, False)
    assert (cfg.max_steps, cfg.lora_r, cfg.progress) == (3, 4, True)
    assert parse_config(SFTConfig, ["--packing", "false"])[0].packing is False
    assert parse_config(SFTConfig, ["--packing", "true", "--max_steps", "2"])[0].max_steps == 2
    # TRL's boolean names are bare flags too: bf16 -> dtype bfloat16, use_peft -> LoRA rank 16
    cfg, _ = parse_config(SFTConfig, ["--bf16", "--use-peft", "--model-name-or-path", "m"])
    assert (cfg.dtype, cfg.lora_r, cfg.model) == ("bfloat16", 16, "m")


def test_trl_names_map_to_tether_fields(monkeypatch):
    """Global batch = per_device x grad_accum x WORLD_SIZE: 2 x 3 x 2 = 12 (hand-computed)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = from_dict(
        GRPOConfig,
        {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 3,
            "num_generations": 4,
            "max_completion_length": 16,
            "logging_steps": 5,
            "save_steps": 7,
            "eval_steps": 9,
            "lr_scheduler_type": "cosine",
            "dataset_name": "p.txt",
            "disable_dropout": True,
            "num_iterations": 2,
        },
    )
    assert (cfg.batch_size, cfg.grad_accum, cfg.samples_per_prompt, cfg.max_new_tokens) == (12, 3, 4, 16)
    assert (cfg.log_every, cfg.save_every, cfg.eval_every, cfg.lr_schedule) == (5, 7, 9, "cosine")
    assert (cfg.prompts, cfg.keep_dropout, cfg.num_epochs) == ("p.txt", False, 2)
    monkeypatch.delenv("WORLD_SIZE")
    dpo = from_dict(
        DPOConfig,
        {
            "dataset_name": "pairs.jsonl",
            "max_completion_length": 24,
            "use_peft": False,
            "lora_r": 16,
            "num_train_epochs": 1.5,
        },
    )
    assert (dpo.dataset, dpo.max_completion_length, dpo.lora_r, dpo.epochs) == ("pairs.jsonl", 24, 0, 1.5)
    # GRPO's loss_type is tether's loss_aggregation; dpo's is its own field
    assert from_dict(GRPOConfig, {"loss_type": "grpo"}).loss_aggregation == "seq_mean_token_mean"
    assert from_dict(DPOConfig, {"loss_type": "ipo"}).loss_type == "ipo"
    assert from_dict(GRPOConfig, {"scale_rewards": "none"}).scale_rewards is False
    assert from_dict(GRPOConfig, {"reward_funcs": "my_lib.rewards.length"}).reward == "my_lib.rewards:length"
    # several: a list, each dotted name read as module:function; reward_weights is tether's name too
    trl = {"reward_funcs": ["my_lib.fmt", "acc.py:f", "vader"], "reward_weights": [1, 0.5, 2]}
    several = from_dict(GRPOConfig, trl)
    assert (several.reward, several.reward_weights) == (["my_lib:fmt", "acc.py:f", "vader"], [1, 0.5, 2])


def test_a_trl_sft_yaml_reads_as_tether_sft(tmp_path, capsys):
    """The keys of a typical TRL SFT recipe. warmup_ratio 0.05 x max_steps 100 = 5 warm-up steps
    (transformers' get_warmup_steps rounds up: 0.05 x 30 = 1.5 -> 2)."""
    config = _yaml(
        tmp_path,
        {
            "model_name_or_path": "m",
            "model_revision": "main",
            "torch_dtype": "bfloat16",
            "attn_implementation": "sdpa",
            "dataset_name": "data/chat",
            "dataset_text_field": "text",
            "max_length": 512,
            "packing": True,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 4,
            "learning_rate": 2.0e-5,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05,
            "max_steps": 100,
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            "bf16": True,
            "logging_steps": 10,
            "save_strategy": "steps",
            "save_steps": 50,
            "eval_strategy": "no",
            "output_dir": "runs/sft",
            "report_to": "none",
            "use_peft": True,
            "lora_r": 32,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "lora_target_modules": "all-linear",
            "push_to_hub": False,
            "seed": 42,
        },
    )
    cfg, _ = parse_config(SFTConfig, ["--config", config])
    assert (cfg.model, cfg.dtype, cfg.dataset, cfg.text_field, cfg.max_length, cfg.packing) == (
        "m",
        "bfloat16",
        "data/chat",
        "text",
        512,
        True,
    )
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps) == (
        16,
        4,
        "cosine",
        5,
        100,
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.gradient_checkpointing) == (32, 16, 0.05, True)
    assert (cfg.log_every, cfg.save_every, cfg.report_to, cfg.seed) == (10, 50, "none", 42)
    # warmup_ratio follows the steps the command line sets: ceil(0.05 x 30) = 2
    assert parse_config(SFTConfig, ["--config", config, "--max_steps", "30"])[0].warmup_steps == 2
    err = _parse_error(SFTConfig, ["--config", config, "--num_train_epochs", "1"], capsys)
    assert "warmup_ratio with num_train_epochs" in err


@pytest.mark.parametrize(
    "key, value, advice",
    [
        ("epsilon_high", 0.28, "tether clips symmetrically"),
        ("vllm_mode", "server", "tether runs vLLM inside the training process only"),
        ("fp16", True, "use bf16: true"),
        ("optim", "adafactor", "tether uses torch AdamW"),
        ("loss_type", "dr_grpo", "use loss_aggregation"),
    ],
)
def test_a_trl_field_tether_cannot_honour_fails_with_one_message(tmp_path, capsys, key, value, advice):
    config = _yaml(tmp_path, {"model_name_or_path": "m", "learning_rate": 1e-5, key: value})
    err = _parse_error(GRPOConfig, ["--config", config], capsys)
    message = err.strip().splitlines()[-1]
    assert f"TRL field {key}: {value!r} is not supported by tether; {advice}" in message
    # the same setting at the value tether already uses is accepted
    if key in ("epsilon_high", "vllm_mode", "fp16"):
        from_dict(GRPOConfig, {key: {"epsilon_high": None, "vllm_mode": "colocate", "fp16": False}[key]})


def test_alias_conflicts_name_both_keys(tmp_path, capsys):
    config = _yaml(tmp_path, {"model": "a", "model_name_or_path": "b"})
    err = _parse_error(DPOConfig, ["--config", config], capsys)
    assert "model (" in err and "model_name_or_path (" in err and "both set model" in err
    err = _parse_error(DPOConfig, ["--model", "a", "--model-name-or-path", "b"], capsys)
    assert "both set model" in err
    err = _parse_error(DPOConfig, ["--batch_size", "8", "--per_device_train_batch_size", "2"], capsys)
    assert "batch_size" in err and "per_device_train_batch_size" in err
    # the same value twice is fine, and the command line overrides the file (no conflict)
    assert from_dict(DPOConfig, {"model": "a", "model_name_or_path": "a"}).model == "a"
    assert (
        parse_config(DPOConfig, ["--config", _yaml(tmp_path, {"model_name_or_path": "b"}, "b.yaml"), "--model", "c"])[
            0
        ].model
        == "c"
    )
    file_batch = _yaml(tmp_path, {"per_device_train_batch_size": 2, "grad_accum": 2}, "c.yaml")
    assert parse_config(DPOConfig, ["--config", file_batch])[0].batch_size == 4
    assert parse_config(DPOConfig, ["--config", file_batch, "--grad_accum", "4"])[0].batch_size == 8
    assert parse_config(DPOConfig, ["--config", file_batch, "--batch_size", "6"])[0].batch_size == 6


# ---------------------------------------------------------------- nested groups


def test_nested_yaml_groups_and_round_trip(tmp_path, capsys):
    config = _yaml(
        tmp_path,
        {
            "model": "m",
            "sampling": {"temperature": 0.7, "top-k": 5},
            "lora": {"r": 8, "alpha": 32, "target_modules": ["q_proj"]},
            "beta": {"beta": 0.02, "target": 3.0, "horizon": 64},
            "reference": {"model": "ref", "reference": "offload"},
        },
    )
    cfg, _ = parse_config(GRPOConfig, ["--config", config, "--top_p", "0.9"])
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens) == (0.7, 5, 0.9, 32)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules) == (8, 32, ["q_proj"])
    assert (cfg.beta, cfg.kl_target, cfg.kl_horizon) == (0.02, 3.0, 64)
    assert (cfg.reference_model, cfg.reference) == ("ref", "offload")
    save_config(cfg, tmp_path / "saved.yaml")  # flat and readable; loads back to the same config
    assert load_config(GRPOConfig, tmp_path / "saved.yaml") == cfg
    err = _parse_error(GRPOConfig, ["--config", _yaml(tmp_path, {"lora": {"rank": 8}}, "bad.yaml")], capsys)
    assert "lora.rank is not in the lora group; it has: lora_r" in err
    dpo = from_dict(DPOConfig, {"data": {"dataset": "pairs", "split": "test", "max_length": 64}})
    assert (dpo.dataset, dpo.dataset_split, dpo.max_length) == ("pairs", "test", 64)
    # dpo's beta group has no controller: a nested kl target is refused with the reason
    err = _parse_error(DPOConfig, ["--config", _yaml(tmp_path, {"beta": {"target": 3}}, "dpo.yaml")], capsys)
    assert "beta.target: dpo supports a fixed or scheduled beta" in err


def test_help_lists_flags_under_group_headings():
    grpo = build_parser(GRPOConfig, prog="tether grpo").format_help()
    for heading in (
        "training group:",
        "lora group:",
        "beta group:",
        "sampling group:",
        "reference group:",
        "data group:",
        "tether grpo options:",
    ):
        assert heading in grpo
    assert "--model_name_or_path" not in grpo  # TRL's names are accepted, not listed
    dpo = build_parser(DPOConfig, prog="tether dpo").format_help()
    assert "--beta_schedule" in dpo and "--kl_target" not in dpo and "--ref_sync_every" in dpo


def test_kl_and_bon_use_the_shared_sampling_group():
    from tether.commands.bon import BoNConfig
    from tether.commands.kl import KLConfig
    from tether.trainers.online import OnlineConfig

    assert all(issubclass(c, SamplingConfig) for c in (KLConfig, BoNConfig, OnlineConfig))
    cfg, _ = parse_config(
        KLConfig, ["--policy", "p", "--reference", "r", "--prompts", "x.txt", "--top-p", "0.9", "--max-new-tokens", "8"]
    )
    assert (cfg.top_p, cfg.max_new_tokens, cfg.samples) == (0.9, 8, 8)
    with pytest.raises(ValueError, match="TRL field bf16 sets dtype, which this command does not have"):
        from_dict(KLConfig, {"bf16": True})
