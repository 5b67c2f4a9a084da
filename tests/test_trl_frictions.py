"""Frictions a TRL user met in a first hour with tether (docs/from-trl.md), each through the CLI in process
(``tether.cli.main``): a mistyped ``--chat_template`` path, null cells in required columns, the progress bar
before the first evaluation, ``save_strategy: "no"``, TRL's vLLM switches, and SFT's hold-out on a small
dataset. The error cases end before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether import cli

PAIRS = [{"prompt": "The film", "chosen": " was good", "rejected": " was bad"}] * 4


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _error(argv, capsys) -> str:
    """Run ``tether ARGV``; it must fail as a user error (exit 2, no traceback). Returns the error line."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # a config-file error ends through argparse's parser.error (exit 2)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # lines before it: progress bars of a model load
    assert last.startswith(f"tether {argv[0]}: error: "), err
    return last


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch, assets_dir, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default output_dir lands in the test's folder
    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    monkeypatch.setenv("TETHER_ASSETS", str(assets_dir))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a command loads a model's weights."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights loaded before the checks failed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# ---------------------------------------------------------------- --chat_template


@pytest.mark.parametrize("value", ["templates/chatml.jinja", "chatml.jinja", "chat.j2", "tpl/chat"])
def test_a_chat_template_path_that_is_not_a_file_is_an_error(value, tmp_path, capsys, no_weights):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = _error(["dpo", "--dataset", data, "--chat_template", value, "--output_dir", str(tmp_path / "o")], capsys)
    assert f"--chat_template {value}: no such file" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "template, says",
    [
        ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),  # unclosed expression
        ("{{ raise_exception('no system message') }}", "no system message"),
        ("<|im_start|>assistant\n", "without the user and assistant message's text"),  # constant text
    ],
)
def test_a_chat_template_must_render_a_conversation(template, says, tmp_path, capsys, no_weights):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = _error(["dpo", "--dataset", data, "--chat_template", template], capsys)
    assert line.startswith("tether dpo: error: --chat_template") and says in line


def test_a_chat_template_file_and_jinja_text_are_read():
    from tether.data.chat import check_template

    tpl = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    assert check_template(tpl) == tpl  # Jinja text holding '/' is text, not a path
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jinja") as f:
        f.write(tpl)
        f.flush()
        assert check_template(f.name) == tpl


# ---------------------------------------------------------------- null cells in required columns


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_a_null_cell_in_a_preference_row_is_a_bad_row(column, tmp_path, capsys):
    """``"prompt": null`` used to be read as an absent prompt (the pair's shared prefix became the prompt)."""
    bad = dict(PAIRS[0], **{column: None})
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [bad] + PAIRS[:1])
    line = _error(["dpo", "--dataset", data, "--output_dir", str(tmp_path / "o"), "--max_steps", "1"], capsys)
    assert f"row 2: field '{column}' is null" in line and "--skip_bad_rows" in line


def test_skip_bad_rows_skips_and_counts_null_cells():
    from tether.data.preference import check_rows

    rows = PAIRS[:2] + [dict(PAIRS[0], prompt=None), dict(PAIRS[0], chosen=None)] + PAIRS[:1]
    kept, skipped = check_rows(rows, skip_bad_rows=True)
    assert len(kept) == 3
    assert skipped == {"field 'prompt' is null": 1, "field 'chosen' is null": 1}


# ---------------------------------------------------------------- the progress bar


def test_the_progress_bar_shows_no_kl_before_there_is_one(tmp_path, capsys):
    """With no KL measured (``--kl_prompts 0``) the bar shows loss and accuracy only, never ``kl=nan``. ~3 s."""
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = ["dpo", "--dataset", data, "--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--batch_size", "2"]
    assert cli.main(argv + ["--kl_prompts", "0", "--eval_fraction", "0", "--progress", "true"]) == 0
    err = capsys.readouterr().err
    assert "loss=" in err and "acc=" in err
    assert "nan" not in err and "kl=" not in err


def test_postfix_leaves_out_missing_values():
    from tether.training import postfix

    got = postfix(loss=(0.5, ".3f"), kl=(float("nan"), ".2f"), beta=(None, ".3g"), score=(2.0, ".1f"))
    assert got == {"loss": "0.500", "score": "2.0"}


# ---------------------------------------------------------------- save_strategy


def _dpo_yaml(tmp_path, **trl) -> str:
    import yaml

    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = {"dataset_name": data, "output_dir": str(tmp_path / "o"), "max_steps": 2, "kl_prompts": 0, **trl}
    (tmp_path / "trl.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "trl.yaml")


def test_save_strategy_no_writes_no_checkpoint_but_the_final_model(tmp_path):
    """TRL's ``save_strategy: "no"`` (with save_steps set, which it then ignores): no checkpoint, neither
    periodic nor at the end; ``final/`` is written, as TRL's ``trainer.save_model()`` writes it. ~3 s."""
    config = _dpo_yaml(tmp_path, save_strategy="no", save_steps=1, per_device_train_batch_size=2)
    assert cli.main(["dpo", "--config", config, "--eval_fraction", "0", "--progress", "false"]) == 0
    out = tmp_path / "o"
    assert (out / "final").is_dir()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_save_strategy_steps_keeps_checkpoints_and_epoch_is_refused(tmp_path, capsys):
    from tether.config import parse_config
    from tether.trainers.dpo import DPOConfig

    assert parse_config(DPOConfig, ["--config", _dpo_yaml(tmp_path, save_strategy="steps")])[0].save_checkpoints
    assert not parse_config(DPOConfig, ["--config", _dpo_yaml(tmp_path, save_strategy="no")])[0].save_checkpoints
    line = _error(["dpo", "--config", _dpo_yaml(tmp_path, save_strategy="epoch")], capsys)
    assert "save_strategy" in line and "save_steps" in line


# ---------------------------------------------------------------- TRL's vLLM switches


def test_use_vllm_is_tethers_vllm_backend(tmp_path):
    from tether.config import parse_config
    from tether.trainers.dpo import DPOConfig
    from tether.trainers.grpo import GRPOConfig

    def cfg(cls, **trl):
        import yaml

        (tmp_path / "c.yaml").write_text(yaml.safe_dump(trl))
        return parse_config(cls, ["--config", str(tmp_path / "c.yaml")])[0]

    got = cfg(GRPOConfig, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5)
    assert (got.backend, got.vllm_gpu_memory_utilization) == ("vllm", 0.5)
    assert cfg(GRPOConfig, use_vllm=False).backend == "builtin"
    assert cfg(DPOConfig, use_vllm=False).beta == DPOConfig().beta  # a no-op where nothing is sampled


def test_use_vllm_reaches_the_vllm_backend_checks_and_server_mode_is_refused(tmp_path, capsys, no_weights):
    """``use_vllm: true`` selects the vLLM backend, whose preflight runs (on a CPU machine it stops there,
    before any weights load); ``vllm_mode: server`` is refused by name."""
    import yaml

    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe dog ran\n")
    base = {
        "dataset_name": str(prompts),
        "reward_funcs": f"{Path(__file__).parent / 'reward_fns.py'}:length_reward",
        "max_steps": 1,
    }
    (tmp_path / "server.yaml").write_text(yaml.safe_dump({**base, "use_vllm": True, "vllm_mode": "server"}))
    line = _error(["grpo", "--config", str(tmp_path / "server.yaml")], capsys)
    assert "vllm_mode: 'server' is not supported" in line and "colocate" in line
    (tmp_path / "colocate.yaml").write_text(yaml.safe_dump({**base, "use_vllm": True, "vllm_mode": "colocate"}))
    try:
        rc = cli.main(["grpo", "--config", str(tmp_path / "colocate.yaml"), "--top_k", "5"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "samples with the policy itself" not in err and "use_vllm" not in err
    # the vLLM backend's own checks ran and refused (on any machine): top_k, which vLLM cannot score; on a
    # CPU also stories260K's head size, outside vLLM's CPU attention; without vLLM, the missing package
    assert rc == 2 and "backend=vllm" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------- SFT's hold-out


def _sft(tmp_path, n: int, *extra: str) -> tuple[int, list[dict]]:
    data = tmp_path / "stories.txt"
    data.write_text("".join(f"Once upon a time there was a dog number {i}.\n" for i in range(n)))
    out = tmp_path / "o"
    argv = ["sft", "--dataset", str(data), "--output_dir", str(out), "--max_steps", "1", "--batch_size", "4"]
    rc = cli.main(argv + ["--max_length", "32", "--progress", "false", *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    return rc, rows


def test_sft_holds_out_a_tenth_of_a_small_dataset_by_default(tmp_path, caplog):
    """64 examples: 6 held out (10%, under the cap of 200), where the old default of 200 refused the run. ~2 s."""
    from tether.data.text import heldout_size

    assert [heldout_size(n, None) for n in (5, 64, 1999, 5000)] == [0, 6, 199, 200]
    rc, rows = _sft(tmp_path, 64)
    assert rc == 0 and any("eval/loss" in r for r in rows)


def test_sft_never_refuses_a_small_dataset_for_its_hold_out(tmp_path, caplog):
    """eval_examples as large as the data: a warning, and the run trains on all of it with no eval/loss."""
    rc, rows = _sft(tmp_path, 8, "--eval_examples", "8")
    assert rc == 0 and not any("eval/loss" in r for r in rows)
    assert "would leave nothing to train on" in caplog.text


# ---------------------------------------------------------------- a failed check leaves nothing behind


def _dpo_argv(data, out, *extra) -> list[str]:
    base = ["dpo", "--dataset", data, "--output_dir", str(out), "--max_steps", "1", "--batch_size", "2"]
    return [*base, "--kl_prompts", "0", "--eval_fraction", "0", "--progress", "false", *extra]


def test_a_run_that_fails_its_checks_leaves_no_folder_and_the_retry_needs_no_overwrite(tmp_path, capsys):
    """A bad row found after the model loaded (the data are read then) ended with config.yaml and
    run.json written, and the corrected retry was refused ("output_dir already holds a run"). ~3 s."""
    bad = _jsonl(tmp_path / "bad.jsonl", PAIRS[:3] + [{"prompt": None, "chosen": " a", "rejected": " b"}])
    out = tmp_path / "o"
    line = _error(_dpo_argv(bad, out), capsys)
    assert "null" in line
    assert not out.exists()  # the folder the run made is gone
    out.mkdir()  # a folder the user made stays, empty
    _error(_dpo_argv(bad, out), capsys)
    assert out.is_dir() and not any(out.iterdir())
    good = _jsonl(tmp_path / "good.jsonl", PAIRS)
    assert cli.main(_dpo_argv(good, out)) == 0  # no --overwrite needed
    assert (out / "final").is_dir()


def test_a_run_that_has_begun_is_kept_when_it_fails_later(tmp_path, monkeypatch):
    """Only a run with no logged step or checkpoint is removed: a failure after step 1 keeps the run (it
    resumes)."""
    from tether import preempt, runs

    out = tmp_path / "o"
    runs_before = runs.started_runs()

    @preempt.preemptible
    def train():
        out.mkdir()  # as RunDir.start leaves it: the run recorded, and then one step logged
        (out / "config.yaml").write_text("x: 1\n")
        runs._STARTED[str(out.resolve())] = True
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("a failure after the first step")

    with pytest.raises(RuntimeError):
        train()
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    assert runs.started_runs() == runs_before


# ---------------------------------------------------------------- resume from another directory


def test_the_recorded_config_holds_absolute_paths_and_resumes_from_anywhere(tmp_path, monkeypatch):
    """config.yaml stored ``pairs.jsonl`` as given: resuming from another directory could not find it, and
    the same file by its absolute path was refused as a changed config. ~6 s."""
    import yaml

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    _jsonl(a / "pairs.jsonl", PAIRS)
    assert cli.main(_dpo_argv("pairs.jsonl", "out", "--save_every", "1")) == 0
    recorded = yaml.safe_load((a / "out" / "config.yaml").read_text())
    assert recorded["dataset"] == str(a / "pairs.jsonl")
    assert recorded["ref_cache_dir"] in (None, str(a / "out" / "ref_cache"))
    monkeypatch.chdir(b)  # the run's own config, from another directory
    assert cli.main(["dpo", "--config", str(a / "out" / "config.yaml"), "--resume", "--max_steps", "2"]) == 0
    monkeypatch.chdir(a)  # the same file by its absolute path is the same run
    argv = _dpo_argv(str(a / "pairs.jsonl"), "out", "--resume")
    argv[argv.index("--max_steps") + 1] = "3"
    assert cli.main(argv) == 0


def test_paths_are_made_absolute_only_where_they_exist(tmp_path):
    from tether.paths import absolute_path

    (tmp_path / "r.py").write_text("def f(c): return [0.0] * len(c)\n")
    (tmp_path / "a.jsonl").write_text("")
    assert absolute_path("r.py:f", tmp_path) == f"{tmp_path / 'r.py'}:f"
    assert absolute_path("a.jsonl,b.jsonl", tmp_path) == f"{tmp_path / 'a.jsonl'},b.jsonl"
    for kept in ("stories260K", "vader", "Anthropic/hh-rlhf", "my_rewards.format_reward", "/abs/x.jsonl", ""):
        assert absolute_path(kept, tmp_path) == kept
    assert absolute_path("{% for m in messages %}{{ m.content }}{% endfor %}", tmp_path).startswith("{%")


# ---------------------------------------------------------------- one line, no usage block


def test_a_config_type_error_is_one_line_without_the_usage_block(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("learning_rate: abc\n")
    try:
        rc = cli.main(["dpo", "--config", str(tmp_path / "bad.yaml")])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "usage:" not in err
    assert err.strip().splitlines() == [
        "tether dpo: error: config field 'learning_rate': cannot read 'abc' as float; give a value of type float"
    ]


@pytest.mark.parametrize("command", ["dpo", "grpo", "certify", "shift"])
def test_an_unknown_flag_is_one_line_that_points_at_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--lerning_rate", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"tether {command}: error: ") and line.endswith(f"(tether {command} --help lists the flags)")
    assert "--lerning_rate" in line or "required" in line  # (shift names its required flags first)


# ---------------------------------------------------------------- accelerate with one process


def test_accelerate_asked_for_two_processes_but_started_one_is_said(monkeypatch, caplog):
    from tether import distributed

    one = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}
    assert distributed.launcher_gave_one_process(one)
    assert not distributed.launcher_gave_one_process({**one, "WORLD_SIZE": "2", "RANK": "0"})  # it did launch two
    assert not distributed.launcher_gave_one_process({k: v for k, v in one.items() if k != "MASTER_ADDR"})  # asked 1
    assert not distributed.launcher_gave_one_process({"MASTER_ADDR": "127.0.0.1"})  # not accelerate
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in one.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "_WARNED_LAUNCH", False)
    with caplog.at_level("WARNING"):
        distributed.Dist(), distributed.Dist()
    said = [r.message for r in caplog.records if "accelerate launch asked for several processes" in r.message]
    assert len(said) == 1 and "torchrun --nproc_per_node" in said[0]


# ---------------------------------------------------------------- checkpoints load on their own


def test_a_checkpoint_model_folder_holds_the_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert cli.main(_dpo_argv(data, tmp_path / "o", "--save_every", "1", "--max_steps", "2")) == 0
    folder = tmp_path / "o" / "checkpoints" / "step-1" / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tok("The film")["input_ids"] and model.config.vocab_size == len(tok)


# ---------------------------------------------------------------- online evaluation prompts are held out


def test_online_evaluation_prompts_are_held_out_of_a_prompts_file(tmp_path, stories_path):
    """The docstring said the evaluation read the first training prompts ("not held out"), the README that a
    seeded part is held out. Now: a seeded 10% of the file (at most eval_max_prompts), never trained on; the
    same split on every run; under 10 prompts, nothing is held out."""
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.online import _prompt_rows

    texts = [f"Prompt number {i} is here" for i in range(40)]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    cfg = GRPOConfig(model=str(stories_path), prompts=str(tmp_path / "p.txt"), eval_max_prompts=3)
    from tether.modeling import load_tokenizer

    tok = load_tokenizer(str(stories_path))
    train, ev = _prompt_rows(cfg, tok, None, None)
    train_texts, ev_texts = [p.text for p in train], [p.text for p in ev]
    assert len(ev_texts) == 3 and len(train_texts) == 37  # min(eval_max_prompts, 10% of 40)
    assert not set(ev_texts) & set(train_texts) and sorted(train_texts + ev_texts) == sorted(texts)
    assert train_texts == [t for t in texts if t not in ev_texts]  # file order kept
    assert [p.text for p in _prompt_rows(cfg, tok, None, None)[1]] == ev_texts  # seeded: the same split
    assert ev_texts != texts[:3]  # not the first prompts
    everything, same = _prompt_rows(cfg, tok, None, None, hold_out=False)  # an eval_hook brings its own prompts
    assert len(everything) == 40 and [p.text for p in same] == texts[:3]
    (tmp_path / "few.txt").write_text("\n".join(texts[:9]) + "\n")
    few = GRPOConfig(model=str(stories_path), prompts=str(tmp_path / "few.txt"))
    train, ev = _prompt_rows(few, tok, None, None)
    assert len(train) == 9 and [p.text for p in ev] == texts[:9]
    in_memory, ev = _prompt_rows(cfg, tok, texts, None)  # prompts given in memory: the caller decides
    assert len(in_memory) == 40 and [p.text for p in ev] == texts[:3]


def test_a_large_prompts_file_holds_out_on_demand(tmp_path, stories_path, monkeypatch):
    """The held-out split of a file read on demand (a PromptTable) leaves the training rows on demand too."""
    from tether.data import prompts as P
    from tether.data.prompts import PromptSubset, load_prompts
    from tether.modeling import load_tokenizer

    texts = [f"Prompt number {i} is here" for i in range(50)]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    tok = load_tokenizer(str(stories_path))
    table = load_prompts(str(tmp_path / "p.txt"), tokenizer=tok, lazy=True)
    eager = load_prompts(str(tmp_path / "p.txt"), tokenizer=tok)
    a_train, a_ev = P.hold_out_prompts(table, 5, seed=3)
    b_train, b_ev = P.hold_out_prompts(eager, 5, seed=3)
    if not isinstance(table, list):
        assert isinstance(a_train, PromptSubset)
    assert [p.text for p in a_ev] == [p.text for p in b_ev]
    assert list(P.prompt_texts(a_train)) == [p.text for p in b_train]
    assert [p.text for p in a_train[2:4]] == [p.text for p in b_train[2:4]]


def test_eval_strategy_no_means_no_evaluation(tmp_path, capsys):
    """TRL's ``eval_strategy: "no"`` was listed as ignored and the run still evaluated; it now turns evaluation
    off (eval_every 0, eval_final false), eval_steps beside it notwithstanding, as in TRL."""
    from tether.config import parse_config
    from tether.trainers.dpo import DPOConfig

    cfg = parse_config(DPOConfig, ["--config", _dpo_yaml(tmp_path, eval_strategy="no", eval_steps=5)])[0]
    assert cfg.eval_every == 0 and cfg.eval_final is False
    cfg = parse_config(DPOConfig, ["--config", _dpo_yaml(tmp_path, eval_strategy="steps", eval_steps=5)])[0]
    assert cfg.eval_every == 5 and cfg.eval_final is True
    line = _error(["dpo", "--config", _dpo_yaml(tmp_path, eval_strategy="epoch")], capsys)
    assert "eval_strategy" in line and '"no"' in line
