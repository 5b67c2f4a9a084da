"""Bad input through the real ``tether`` command (docs/cli.md, Errors): each kind must end with exit code 2, no
traceback, and one last line ``tether <command>: error: <message>`` that names the field or file.

Every case fails before any weights load (``tether.checks``), so a subprocess costs about the
import time of tether + transformers; they run two at a time. ``--debug`` / ``TETHER_DEBUG=1`` show
the traceback, and an internal error (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (case id, argv after `tether`, text the last line must contain). Files named here are made by
# `inputs` below; {d} is that folder. The first word of argv is the command.
CASES = [
    # tether kl
    ("kl-samples-0", "kl --policy stories260K --reference stories260K --prompts {d}/p.txt --samples 0", "samples"),
    (
        "kl-null-prompt",
        "kl --policy stories260K --reference stories260K --prompts {d}/null.jsonl",
        "null.jsonl row 1: field 'prompt'",
    ),
    ("kl-non-utf8", "kl --policy stories260K --reference stories260K --prompts {d}/latin1.txt", "latin1.txt: line 2"),
    (
        "kl-prompts-is-folder",
        "kl --policy stories260K --reference stories260K --prompts {d}/folder",
        "folder is neither",
    ),  # a datasets folder is a prompt source
    ("kl-empty-prompts", "kl --policy stories260K --reference stories260K --prompts {d}/empty.txt", "empty.txt"),
    ("kl-missing-prompts", "kl --policy stories260K --reference stories260K --prompts {d}/nope.txt", "nope.txt"),
    (
        "kl-bad-json-line",
        "kl --policy stories260K --reference stories260K --prompts {d}/broken.jsonl",
        "broken.jsonl:2",
    ),
    (
        "kl-jsonl-no-prompt",
        "kl --policy stories260K --reference stories260K --prompts {d}/noprompt.jsonl",
        "'prompt' field",
    ),
    ("kl-policy-missing-path", "kl --policy {d}/no_model --reference stories260K --prompts {d}/p.txt", "--policy"),
    (
        "kl-policy-hub-offline",
        "kl --policy someone/not-a-model --reference stories260K --prompts {d}/p.txt",
        "neither a local model folder",
    ),
    ("kl-reference-not-model", "kl --policy stories260K --reference {d}/folder --prompts {d}/p.txt", "--reference"),
    (
        "kl-context-too-long",
        "kl --policy stories260K --reference stories260K --prompts {d}/p.txt --max_new_tokens 600",
        "max_new_tokens",
    ),
    (
        "kl-temperature-0",
        "kl --policy stories260K --reference stories260K --prompts {d}/p.txt --temperature 0",
        "temperature",
    ),
    ("kl-top-p", "kl --policy stories260K --reference stories260K --prompts {d}/p.txt --top_p 1.5", "top_p"),
    ("kl-missing-policy", "kl --reference stories260K --prompts {d}/p.txt", "--policy"),
    # tether ppo / grpo / rloo
    ("ppo-max-steps-negative", "ppo --prompts {d}/p.txt --max_steps -5", "max_steps"),
    ("ppo-batch-size-0", "ppo --prompts {d}/p.txt --batch_size 0", "batch_size"),
    ("ppo-beta-nan", "ppo --prompts {d}/p.txt --beta nan", "beta"),
    ("ppo-lr-inf", "ppo --prompts {d}/p.txt --learning_rate inf", "learning_rate"),
    ("ppo-lr-negative", "ppo --prompts {d}/p.txt --learning_rate -1e-3", "learning_rate"),
    ("ppo-lr-abbreviation", "ppo --prompts {d}/p.txt --lr 1e-4", "--lr"),
    ("ppo-kl-estimator", "ppo --prompts {d}/p.txt --kl_estimator k9", "kl_estimator"),
    ("ppo-kl-reference-filter", "ppo --prompts {d}/p.txt --kl_reference_filter matched", "kl_reference_filter"),
    ("ppo-behaviour-correction", "ppo --prompts {d}/p.txt --behaviour_correction tis", "behaviour_correction"),
    (
        "grpo-behaviour-cap",
        "grpo --prompts {d}/p.txt --behaviour_correction seq_mis --behaviour_cap 1",
        "behaviour_cap",
    ),
    ("grpo-vllm-head-dim-8", "grpo --prompts {d}/p.txt --backend vllm", "backend=vllm"),
    ("grpo-decoder-unknown", "grpo --prompts {d}/p.txt --decoder fast", "--decoder"),
    ("grpo-decoder-with-vllm", "grpo --prompts {d}/p.txt --backend vllm --decoder hf", "backend builtin"),
    ("ppo-reward-no-module", "ppo --prompts {d}/p.txt --reward no_such_module_x:fn", "no_such_module_x"),
    ("ppo-reward-no-file", "ppo --prompts {d}/p.txt --reward {d}/nope.py:fn", "nope.py"),
    ("ppo-reward-bad-spec", "ppo --prompts {d}/p.txt --reward sentiment", "--reward"),
    ("ppo-reward-not-rm", "ppo --prompts {d}/p.txt --reward {d}/folder", "config.json"),
    ("ppo-log-rewards", "ppo --prompts {d}/p.txt --log_rewards gold=no_such_module_x:f", "log_rewards"),
    ("ppo-lora-reference", "ppo --prompts {d}/p.txt --reference lora", "lora_r"),
    ("ppo-kl-target-negative", "ppo --prompts {d}/p.txt --kl_target -3", "kl_target"),
    ("ppo-beta-position-decay", "ppo --prompts {d}/p.txt --beta_position_decay -1", "beta_position_decay"),
    (
        "rloo-beta-position-both",
        "rloo --prompts {d}/p.txt --beta_position_weights 4,1 --beta_position_decay 0.5",
        "not both",
    ),
    ("dpo-beta-zero", "dpo --dataset {d}/pairs.jsonl --beta 0", "--beta"),
    (
        "ppo-context-too-long",
        "ppo --prompts {d}/p.txt --max_prompt_length 500 --max_new_tokens 32",
        "max_prompt_length",
    ),
    ("ppo-missing-prompts", "ppo --prompts {d}/nope.txt", "nope.txt"),
    ("ppo-wrong-type", "ppo --prompts {d}/p.txt --max_steps abc", "max_steps"),
    ("ppo-unknown-flag", "ppo --prompts {d}/p.txt --bogus_flag 1", "--bogus_flag"),
    ("ppo-yaml-syntax", "ppo --config {d}/syntax.yaml", "syntax.yaml"),
    ("ppo-yaml-unknown-field", "ppo --config {d}/unknown.yaml", "bogus_field"),
    ("ppo-yaml-missing", "ppo --config {d}/nope.yaml", "nope.yaml"),
    ("ppo-yaml-not-mapping", "ppo --config {d}/list.yaml", "mapping"),
    ("ppo-model-not-model", "ppo --prompts {d}/p.txt --model {d}/folder", "config.json"),
    ("ppo-lr-schedule", "ppo --prompts {d}/p.txt --lr_schedule cos", "lr_schedule"),
    ("ppo-dtype", "ppo --prompts {d}/p.txt --dtype float8", "dtype"),
    ("grpo-group-of-one", "grpo --prompts {d}/p.txt --samples_per_prompt 1", "samples_per_prompt"),
    ("rloo-indivisible", "rloo --prompts {d}/p.txt --batch_size 6", "batch_size"),
    # tether dpo
    ("dpo-loss-type", "dpo --dataset {d}/pairs.jsonl --loss_type bogus", "loss_type"),
    ("dpo-reference", "dpo --dataset {d}/pairs.jsonl --reference bogus", "reference"),
    ("dpo-beta-inf", "dpo --dataset {d}/pairs.jsonl --beta inf", "beta"),
    ("dpo-beta-negative", "dpo --dataset {d}/pairs.jsonl --beta -1", "beta"),
    ("dpo-missing-dataset", "dpo --dataset {d}/nope.jsonl", "nope.jsonl"),
    ("dpo-non-utf8-dataset", "dpo --dataset {d}/latin1.jsonl", "latin1.jsonl: line 2"),
    ("dpo-context-too-long", "dpo --dataset {d}/pairs.jsonl --max_length 2000", "max_length"),
    ("dpo-eval-fraction", "dpo --dataset {d}/pairs.jsonl --eval_fraction 1.5", "eval_fraction"),
    ("dpo-grad-accum", "dpo --dataset {d}/pairs.jsonl --batch_size 8 --grad_accum 3", "grad_accum"),
    # tether sft / rm
    ("sft-no-dataset", "sft", "--dataset"),
    ("sft-context-too-long", "sft --dataset {d}/p.txt --max_length 1000", "max_length"),
    ("sft-model-missing", "sft --dataset {d}/p.txt --model {d}/no_model", "--model"),
    ("sft-warmup-negative", "sft --dataset {d}/p.txt --warmup_steps -1", "warmup_steps"),
    ("rm-missing-dataset", "rm --dataset {d}/nope.jsonl", "nope.jsonl"),
    ("rm-context-too-long", "rm --dataset {d}/pairs.jsonl --max_length 1000", "max_length"),
    # tether bon
    ("bon-n-0", "bon --prompts {d}/p.txt --n 0", "n="),
    ("bon-no-prompts", "bon", "--prompts"),
    ("bon-gold", "bon --prompts {d}/p.txt --gold no_such_module_x:f", "gold"),
    ("bon-kl-samples", "bon --prompts {d}/p.txt --kl_samples -1", "kl_samples"),
    ("bon-max-new-tokens", "bon --prompts {d}/p.txt --max_new_tokens 0", "max_new_tokens"),
]


def make_inputs(d: Path) -> None:
    (d / "p.txt").write_text("Once upon a time\nThe dog ran\n")
    (d / "null.jsonl").write_text('{"prompt": "fine"}\n{"prompt": null}\n')
    (d / "latin1.txt").write_bytes("a good film\nun caf\u00e9 tr\u00e8s bon\n".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\u00e9", "chosen": "b", "rejected": "c"}\n'
        ).encode("latin-1")
    )
    (d / "folder").mkdir()
    (d / "empty.txt").write_text("\n\n")
    (d / "broken.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
    (d / "noprompt.jsonl").write_text('{"text": "hello"}\n')
    (d / "pairs.jsonl").write_text('{"prompt": "The film", "chosen": " was good", "rejected": " was bad"}\n' * 4)
    (d / "syntax.yaml").write_text("prompts: p.txt\nbeta: [0.1\n")
    (d / "unknown.yaml").write_text("bogus_field: 3\n")
    (d / "list.yaml").write_text("- beta\n- 0.1\n")


def run_tether(argv: list[str], cwd: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TETHER_DEBUG"}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        **env_extra,
    )
    return subprocess.run(
        [sys.executable, "-m", "tether", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _verdict(case, proc) -> str | None:
    """None if the run ended as a clean user error naming what it should; else what went wrong."""
    name, argv, names = case
    command = argv.split()[0]
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if proc.returncode != 2:
        return f"{name}: exit code {proc.returncode}, not 2; stderr ends {proc.stderr[-600:]!r}"
    if "Traceback" in proc.stderr:
        return f"{name}: a traceback: {proc.stderr[-600:]!r}"
    if not last.startswith(f"tether {command}: error:"):
        return f"{name}: last line {last!r} is not 'tether {command}: error: ...'"
    if names not in last:
        return f"{name}: the message does not name {names!r}: {last!r}"
    return None


def test_cli_error_cases_are_distinct_and_many():
    assert len({c[0] for c in CASES}) == len(CASES) >= 45
    assert len({c[1] for c in CASES}) == len(CASES)


@pytest.mark.slow  # ~60 subprocesses at ~2-4 s each on two cores
def test_every_bad_input_ends_as_one_clean_error(tmp_path, assets_dir):
    make_inputs(tmp_path)

    def run(case):
        argv = case[1].format(d=tmp_path).split()
        return _verdict(case, run_tether(argv, tmp_path, TETHER_ASSETS=str(assets_dir)))

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [v for v in pool.map(run, CASES) if v is not None]
    assert not failures, f"{len(failures)} of {len(CASES)} bad inputs did not end cleanly:\n" + "\n".join(failures)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, assets_dir, how):
    make_inputs(tmp_path)
    argv = [
        "kl",
        "--policy",
        "stories260K",
        "--reference",
        "stories260K",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--samples",
        "0",
    ]
    extra = {"TETHER_ASSETS": str(assets_dir)}
    if how == "flag":
        argv.insert(3, "--debug")  # anywhere on the line, removed before the command parses it
    else:
        extra["TETHER_DEBUG"] = "1"
    proc = run_tether(argv, tmp_path, **extra)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError: samples=0" in proc.stderr, proc.stderr[-800:]


# In-process checks of the CLI's sorting of exceptions (no subprocess: milliseconds).


def _fake_command(monkeypatch, exc):
    import tether.commands.kl as kl

    def main(argv):
        raise exc

    monkeypatch.setattr(kl, "main", main)


def test_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    from tether import cli
    from tether.errors import UserError

    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    _fake_command(monkeypatch, UserError("--prompts x.txt: no such file;\n check the path"))
    assert cli.main(["kl"]) == 2
    assert capsys.readouterr().err == "tether kl: error: --prompts x.txt: no such file; check the path\n"


def test_a_missing_file_is_named(monkeypatch, capsys):
    from tether import cli

    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    _fake_command(monkeypatch, FileNotFoundError(2, "No such file or directory", "data/train.jsonl"))
    assert cli.main(["kl"]) == 2
    assert capsys.readouterr().err == "tether kl: error: data/train.jsonl: no such file or folder; check the path\n"


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), ValueError("an internal shape mismatch"), KeyError("k")])
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    from tether import cli

    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    _fake_command(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["kl"])


def test_debug_flag_reraises_user_errors(monkeypatch):
    from tether import cli
    from tether.errors import UserError

    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    _fake_command(monkeypatch, UserError("bad"))
    with pytest.raises(UserError):
        cli.main(["kl", "--debug"])


def test_negative_numbers_parse_and_abbreviations_do_not():
    from tether.config import parse_config
    from tether.trainers.dpo import DPOConfig

    cfg, _ = parse_config(DPOConfig, ["--learning_rate", "-1e-3", "--beta", "-.5", "--dataset", "x"])
    assert cfg.learning_rate == -1e-3 and cfg.beta == -0.5  # parsed as values; refused later by the checks
    with pytest.raises(SystemExit):
        parse_config(DPOConfig, ["--lr", "1e-4"])


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_floats_are_refused_at_parse_time(value, capsys):
    from tether.config import parse_config
    from tether.trainers.dpo import DPOConfig

    with pytest.raises(SystemExit) as e:
        parse_config(DPOConfig, ["--beta", value])
    assert e.value.code == 2
    assert "config field 'beta'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_sft_truncation_is_counted_and_warned(stories_path, caplog):
    """Truncation to max_length is SFT's documented behaviour: it must be counted, never silent."""
    from tether.data.text import TextExample, prepare_sft
    from tether.modeling import load_tokenizer

    tok = load_tokenizer(stories_path)
    short, long = TextExample("", "Once"), TextExample("", "Once upon a time there was a little dog " * 4)
    n_long = len(tok("")["input_ids"]) + len(tok(long.completion, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert n_long > 16
    with caplog.at_level("WARNING", logger="tether.data.text"):
        out = prepare_sft(tok, [short, long], max_length=16, packing=False)
    assert [len(t.ids) for t in out][1] == 16
    assert "truncated 1 of 2 examples to max_length=16" in caplog.text


def test_context_check_names_both_fields_and_the_limit():
    from types import SimpleNamespace

    from tether.checks import check_context, model_positions
    from tether.errors import UserError

    assert model_positions(SimpleNamespace(max_position_embeddings=512)) == 512
    assert model_positions(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2's name
    assert model_positions(SimpleNamespace()) is None
    cfg = SimpleNamespace(max_position_embeddings=512)
    check_context(cfg, need=512, fields="max_prompt_length (480) + max_new_tokens (32)")  # exactly full: fine
    with pytest.raises(
        UserError, match=r"max_prompt_length \(481\) \+ max_new_tokens \(32\) = 513 tokens.*512 positions"
    ):
        check_context(cfg, need=513, fields="max_prompt_length (481) + max_new_tokens (32)")


def test_text_file_check_names_the_line_of_bad_bytes(tmp_path):
    import gzip

    from tether.checks import check_text_file
    from tether.errors import UserError

    (tmp_path / "a.txt").write_bytes(b"one\ntwo\nthr\xe9e\n")
    with pytest.raises(UserError, match=r"--prompts .*a\.txt: line 3 is not UTF-8"):
        check_text_file(tmp_path / "a.txt", field="prompts")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl\.gz: line 2 is not UTF-8"):
        check_text_file(tmp_path / "b.jsonl.gz", field="dataset")
    (tmp_path / "ok.txt").write_text("caf\u00e9\n", encoding="utf-8")
    assert check_text_file(tmp_path / "ok.txt", field="prompts") == tmp_path / "ok.txt"
