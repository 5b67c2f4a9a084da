"""``tether sweep`` (tether/sweep/): the report's arithmetic by hand, the config's errors, and a
miniature sweep end to end on the real stories260K (CSV, resume, the page in a real headless browser)."""

from __future__ import annotations

import csv
import math
import re
import shutil

import pytest
import yaml

from tether.cli import main as cli_main
from tether.errors import UserError
from tether.sweep.report import budget_table, default_budgets, pareto_front, settings
from tether.sweep.runner import read_points
from tether.sweep.spec import load_sweep

from conftest import rendered_dom


def test_pareto_front_by_hand():
    """(1, 0.2) beats (2, 0.1) (less KL, more reward); (3, 0.5) adds reward at more KL; (4, 0.5)
    ties it at more KL (dominated); (0, 0) is the reference, on the front."""
    pts = [(2.0, 0.1, "b"), (1.0, 0.2, "a"), (3.0, 0.5, "c"), (4.0, 0.5, "d"), (0.0, 0.0, "ref")]
    assert [p[2] for p in pareto_front(pts)] == ["ref", "a", "c"]


def test_settings_seed_spread_and_budget_table():
    """Two seeds of β = 0.1 with final (KL, reward) (4, 0.3) and (6, 0.5): mean (5, 0.4), sample
    std of the rewards √((0.1² + 0.1²)/1) = √0.02; β = 1 (one seed) at (1, 0.1): no spread (None, "n/a").
    Budget 2 -> only β = 1 fits; budget 5 -> β = 0.1 (mean KL 5 ≤ 5) wins with 0.4, smallest β 0.1."""
    finals = [
        {"method": "reference", "run": "reference", "kl": 0.0, "gold_reward": 0.0},
        {"method": "dpo", "run": "a0", "beta": 0.1, "seed": 0, "kl": 4.0, "gold_reward": 0.3},
        {"method": "dpo", "run": "a1", "beta": 0.1, "seed": 1, "kl": 6.0, "gold_reward": 0.5},
        {"method": "dpo", "run": "b0", "beta": 1.0, "seed": 0, "kl": 1.0, "gold_reward": 0.1},
    ]
    sets = {s["setting"]: s for s in settings(finals, "gold_reward", ["beta"])}
    a, b = sets["dpo beta=0.1"], sets["dpo beta=1"]
    assert a["n"] == 2 and a["kl"] == pytest.approx(5.0) and a["y"] == pytest.approx(0.4)
    assert a["y_seed_sd"] == pytest.approx(math.sqrt(0.02)) and a["kl_seed_sd"] == pytest.approx(math.sqrt(2.0))
    assert b["y_seed_sd"] is None and b["kl_seed_sd"] is None
    table = budget_table(list(sets.values()), [0.5, 2.0, 5.0])
    assert table[0]["best"]["setting"] == "reference" and table[0]["min_beta"] is None
    assert table[1]["best"]["setting"] == "dpo beta=1" and table[1]["min_beta"] == 1.0
    assert table[2]["best"]["setting"] == "dpo beta=0.1" and table[2]["min_beta"] == 0.1
    assert default_budgets(list(sets.values())) == [1.0, 2.0, 3.0, 5.0]


def test_read_points_keeps_the_later_row_of_a_step(tmp_path):
    """A resumed run re-evaluates the step it resumed from: that step's later row wins."""
    (tmp_path / "eval.jsonl").write_text(
        '{"step": 0, "kl": 0}\n{"step": 2, "kl": 1}\n{"step": 2, "kl": 3}\n{"step": 4, "kl": 5}\n'
    )
    assert [(p["step"], p["kl"]) for p in read_points(tmp_path)] == [(0, 0), (2, 3), (4, 5)]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"base": {}, "eval": {"prompts": "p.txt"}}, "'method' is missing"),
        ({"method": "sft", "eval": {"prompts": "p.txt"}}, "choose one of dpo, ppo"),
        ({"method": "ppo", "eval": {}}, "eval.prompts is missing"),
        ({"method": "ppo", "grid": {"beta": 0.1}, "eval": {"prompts": "p.txt"}}, "non-empty list"),
        ({"method": "ppo", "grid": {"beta": [0.1, "x"]}, "eval": {"prompts": "p.txt"}}, "beta"),
        ({"method": "ppo", "gird": {}, "eval": {"prompts": "p.txt"}}, "unknown sweep field"),
        ({"method": "dpo", "grid": {"kl_target": [3.0]}, "eval": {"prompts": "p.txt"}}, "kl_target"),
    ],
)
def test_bad_sweep_configs_are_one_line_user_errors(tmp_path, data, needle):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=re.escape(needle)):
        load_sweep(path)


def test_cli_missing_config_is_exit_2(tmp_path, capsys):
    assert cli_main(["sweep", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


@pytest.mark.slow
def test_miniature_sweep_end_to_end(tmp_path, stories_path, assets_dir, monkeypatch):
    """Two β × two seeds of PPO, two steps each, evaluated at steps 0, 1, 2 on 4 prompts x 2 samples:
    the CSV has one row per evaluation point (4 runs x 3 steps + the reference), a second invocation
    starts no process, a run without its marker resumes from its checkpoint (only its worker runs),
    and chromium renders the page, moved alone to another folder, with both images decoded and a row
    per run. The sweep names its prompts relative to itself and runs from another working folder.
    ~40 s of CPU in all (six worker processes, each importing torch): slow."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\nLily was sad\nTom found a box\n")
    sweep = {
        "method": "ppo",
        "base": {
            "model": stories_path,
            "prompts": "prompts.txt",  # beside the sweep file, not in the working folder
            "reward": "vader",
            "max_steps": 2,
            "batch_size": 4,
            "max_new_tokens": 6,
            "learning_rate": 1e-3,
        },
        "grid": {"beta": [0.05, 0.5], "seed": [0, 1]},
        "eval": {
            "prompts": "prompts.txt",
            "gold": "vader",
            "samples_per_prompt": 2,
            "max_new_tokens": 6,
            "eval_every": 1,
        },
    }
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli_main(["sweep", "--config", str(cfg_path), "--output_dir", str(out), "--workers", "2"]) == 0

    with open(out / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    for col in (
        "method",
        "run",
        "seed",
        "step",
        "kl",
        "kl_stderr",
        "gold_reward",
        "gold_stderr",
        "proxy_reward",
        "beta",
    ):
        assert col in rows[0], col
    runs = sorted({r["run"] for r in rows} - {"reference"})
    assert runs == ["ppo-beta0.05-seed0", "ppo-beta0.05-seed1", "ppo-beta0.5-seed0", "ppo-beta0.5-seed1"]
    assert len(rows) == 1 + 4 * 3
    for r in rows:
        assert float(r["kl_stderr"]) >= 0 and float(r["gold_stderr"]) >= 0
        if r["run"] != "reference":
            assert r["seed"] in ("0", "1") and r["step"] in ("0", "1", "2")
    step0 = [r for r in rows if r["step"] == "0"]  # one protocol: at step 0 every run is the reference
    assert {r["gold_reward"] for r in step0} == {step0[0]["gold_reward"]} and all(float(r["kl"]) == 0 for r in step0)

    # resume: nothing is redone (no worker starts: worker.log, eval.jsonl and result.json untouched)
    watched = [
        p for p in (out / "runs").rglob("*") if p.name in ("worker.log", "eval.jsonl", "result.json", "spec.json")
    ]
    assert len(watched) == 5 * 4
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert cli_main(["sweep", "--config", str(cfg_path), "--output_dir", str(out), "--workers", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before

    # an interrupted run (no result.json, checkpoints in train/) continues with the trainer's resume,
    # not from scratch: its evaluation points are unchanged and only its worker ran
    run = out / "runs" / "ppo-beta0.5-seed1"
    points = [(p["step"], p["kl"], p["gold_reward"]) for p in read_points(run)]
    (run / "result.json").unlink()
    assert any((run / "train" / "checkpoints").glob("step-*"))
    assert cli_main(["sweep", "--config", str(cfg_path), "--output_dir", str(out), "--workers", "2"]) == 0
    assert (run / "result.json").exists() and [
        (p["step"], p["kl"], p["gold_reward"]) for p in read_points(run)
    ] == points
    changed = {p for p in watched if p.exists() and p.stat().st_mtime_ns != before[p]}
    assert changed and all(p.parent == run for p in changed)

    moved = tmp_path / "moved" / "report.html"  # the page alone: its figures travel inside it
    moved.parent.mkdir()
    shutil.copy(out / "report.html", moved)
    dom, (images, loaded) = rendered_dom(moved)
    assert images == loaded == 2, (images, loaded)
    assert dom.count('class="run-row"') == 4 and dom.count('class="ref-row"') == 1
    assert "best setting" in dom and "Pareto front" in dom


def test_preflight_names_the_bad_run_before_any_process(tmp_path, stories_path):
    """A bad trainer field (a reward spec that is no file, model or function) is the trainer's own
    preflight error, prefixed by the run's name, raised before any worker starts."""
    from tether.sweep.runner import preflight
    from tether.sweep.spec import expand

    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "ppo",
                "base": {"model": stories_path, "prompts": str(prompts), "reward": "no/such/rm"},
                "grid": {"beta": [0.1]},
                "eval": {"prompts": str(prompts), "gold": "vader"},
            }
        )
    )
    cfg = load_sweep(path)
    with pytest.raises(UserError, match=r"sweep run ppo-beta0\.1: .*no/such/rm"):
        preflight(cfg, expand(cfg))
    assert not (tmp_path / "runs").exists()


def test_report_from_synthetic_rows(tmp_path):
    """write_report on hand-made rows without a gold reward: the proxy stands in (the page says so),
    one table row per run, the CSV keeps the base columns and drops the samples, and the side-by-side
    table takes from each setting the point nearest the smallest final KL (β = 1's final KL 2; β = 0.1
    passes KL 2.5 at step 1, nearer than its final 8)."""
    from tether.sweep.report import write_report

    def pt(run, beta, seed, step, kl, proxy):
        return {
            "method": "ppo",
            "run": run,
            "seed": seed,
            "step": step,
            "kl": kl,
            "kl_stderr": 0.1,
            "proxy_reward": proxy,
            "proxy_stderr": 0.01,
            "beta": beta,
            "beta_set": beta,
            "swept": ["beta", "seed"],
            "samples": [{"prompt": "p", "completion": f"{run}@{step}", "proxy": proxy}],
        }

    rows = [
        {
            "method": "reference",
            "run": "reference",
            "seed": 0,
            "step": 0,
            "kl": 0.0,
            "kl_stderr": 0.0,
            "proxy_reward": 0.0,
            "proxy_stderr": 0.01,
            "samples": [{"prompt": "p", "completion": "ref", "proxy": 0.0}],
        }
    ]
    rows += [
        pt("a", 0.1, 0, 0, 0.0, 0.0),
        pt("a", 0.1, 0, 1, 2.5, 0.5),
        pt("a", 0.1, 0, 2, 8.0, 0.9),
        pt("b", 1.0, 0, 0, 0.0, 0.0),
        pt("b", 1.0, 0, 2, 2.0, 0.3),
    ]
    finals = [{k: v for k, v in r.items() if k != "samples"} for r in (rows[0], rows[3], rows[5])]
    page = write_report(tmp_path, rows, finals, {}, meta={}).read_text()
    assert "the proxy reward stands in" in page
    assert page.count("class='run-row'") == 2 and page.count("class='ref-row'") == 1
    assert "a@1" in page and "b@2" in page and "a@2" not in page
    with open(tmp_path / "frontier.csv") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["method", "run", "seed", "step", "kl", "kl_stderr"] and "samples" not in header
    for name in ("frontier.png", "overoptimisation.png", "finals.csv"):
        assert (tmp_path / name).stat().st_size > 0


def test_base_reads_trl_names_nested_groups_and_a_trainer_file(tmp_path):
    """base goes through tether.config: TRL's names (model_name_or_path, dataset_name) and a nested
    group (lora: {r: 4}); base: {from: FILE, ...} reads the trainer YAML beside the sweep file, then
    replaces fields; the grid's product names the runs in the order written."""
    (tmp_path / "dpo.yaml").write_text("model_name_or_path: stories260K\ndataset_name: hh-rlhf\nmax_steps: 50\n")
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump(
            {
                "method": "dpo",
                "base": {"from": "dpo.yaml", "lora": {"r": 4}, "max_steps": 7},
                "grid": {"beta": [0.1], "learning_rate": [1e-4, 1e-3]},
                "eval": {"prompts": "p.txt", "gold": "vader"},
            }
        )
    )
    from tether.sweep.spec import expand

    runs = expand(load_sweep(tmp_path / "s.yaml"))
    assert [r.name for r in runs] == ["dpo-beta0.1-learning_rate0.0001", "dpo-beta0.1-learning_rate0.001"]
    for r, lr in zip(runs, (1e-4, 1e-3)):
        c = r.config
        assert (c["model"], c["dataset"], c["lora_r"], c["max_steps"], c["beta"], c["learning_rate"]) == (
            "stories260K",
            "hh-rlhf",
            4,
            7,
            0.1,
            lr,
        )


def test_plot_labels_colours_and_gao_fit_range():
    """Legends show 3 significant digits (an adaptive run's final β has 6); 18 settings get 18 distinct
    colours; each Gao fit carries its data's largest d = √KL, the end of its drawn curve."""
    from tether.sweep.report import _colours, _label, fit_curve, gao_fits

    assert _label("ppo beta=0.0423817, kl_target=6") == "ppo beta=0.0424, kl_target=6"
    assert _label("dpo beta=1e-05") == "dpo beta=1e-05" and _label("bon n=16") == "bon n=16"
    sets = [{"method": "ppo", "setting": f"ppo beta={i}"} for i in range(18)] + [
        {"method": "reference", "setting": "reference"}
    ]
    cols = _colours(sets)
    assert len({cols[s["setting"]] for s in sets if s["method"] == "ppo"}) == 18
    rows = [{"method": "reference", "run": "r", "kl": 0.0, "gold_reward": 0.0}]
    rows += [
        {"method": "bon", "run": f"n{n}", "kl": kl, "gold_reward": 0.1 * kl**0.5 - 0.01 * kl}
        for n, kl in ((2, 0.3), (4, 1.0), (8, 1.9), (16, 3.24))
    ]
    fits = gao_fits(rows, ykey="gold_reward")
    assert fits["bon"]["d_max"] == pytest.approx(1.8)
    xs, ys = fit_curve(fits["bon"])  # what plot_overoptimisation draws: up to the data's largest d, not past it
    assert max(xs) == pytest.approx(1.8) and min(xs) > 0
    assert ys[-1] == pytest.approx(fits["bon"]["fit"].predict(1.8**2))


def test_paths_are_read_relative_to_the_file_that_states_them(tmp_path, monkeypatch):
    """The sweep file in proj/, its base trainer YAML in proj/conf/: the base's prompts, chat template,
    reward file (file.py:function) and a named log reward are read from proj/conf/, the sweep's own
    base fields, grid values and eval paths from proj/; a hub id, vader, an asset name, an absolute path
    and a path that exists nowhere stay as written. Loaded from another working folder (elsewhere/),
    where none of the relative paths exist."""
    proj, conf, elsewhere = tmp_path / "proj", tmp_path / "proj" / "conf", tmp_path / "elsewhere"
    for d in (conf, elsewhere):
        d.mkdir(parents=True)
    for f in (conf / "train.txt", conf / "chat.jinja", conf / "rw.py", proj / "held_out.txt", proj / "judge.py"):
        f.write_text("x\n")
    (proj / "rms" / "rm_a").mkdir(parents=True)
    (conf / "ppo.yaml").write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "stories260K",  # an asset name: not a file beside either YAML
                "prompts": "train.txt",
                "chat_template": "chat.jinja",
                "reward": "rw.py:score",
                "log_rewards": ["judge=rw.py:other", "sent=vader"],
                "eval_prompts": str(proj / "held_out.txt"),  # absolute: as written
            }
        )
    )
    (proj / "sweep.yaml").write_text(
        yaml.safe_dump(
            {
                "method": "ppo",
                "base": {"from": "conf/ppo.yaml", "reference_model": "org/some-hub-model", "max_steps": 3},
                "grid": {"reward": ["rw_missing.py:f", "rms/rm_a"]},
                "eval": {"prompts": "held_out.txt", "gold": "judge.py:gold", "rewards": {"v": "vader"}},
            }
        )
    )
    monkeypatch.chdir(elsewhere)
    from tether.sweep.spec import expand

    cfg = load_sweep("../proj/sweep.yaml")
    assert cfg.eval.prompts == str(proj / "held_out.txt")
    assert cfg.eval.gold == f"{proj / 'judge.py'}:gold" and cfg.eval.rewards == {"v": "vader"}
    runs = expand(cfg)
    assert [r.name for r in runs] == ["ppo-rewardrw_missing.py_f", "ppo-rewardrms_rm_a"]  # names as written
    c = runs[0].config
    assert c["prompts"] == str(conf / "train.txt") and c["chat_template"] == str(conf / "chat.jinja")
    assert c["log_rewards"] == [f"judge={conf / 'rw.py'}:other", "sent=vader"]
    assert c["eval_prompts"] == str(proj / "held_out.txt")
    assert c["model"] == "stories260K" and c["reference_model"] == "org/some-hub-model"
    assert c["reward"] == "rw_missing.py:f"  # exists nowhere: left for the run's own check to name
    assert runs[1].config["reward"] == str(proj / "rms" / "rm_a")
    assert runs[1].overrides == {"reward": "rms/rm_a"}  # the report shows the grid as written


def _set(name, kl, y, se, beta=None, n=1):
    return {
        "setting": name,
        "method": "reference" if name == "reference" else "ppo",
        "runs": [name],
        "n": n,
        "kl": kl,
        "y": y,
        "y_se": se,
        "beta": beta,
        "kl_seed_sd": None,
        "y_seed_sd": None,
    }


def test_budget_recommends_a_setting_only_when_the_data_separate_it():
    """The reference at gold 0.143 ± 0.040, β = 0.5 at 0.129 ± 0.045 (KL 6.9), β = 0.02 at 0.813 ± 0.015
    (KL 16.4). Budget 10: the reference leads β = 0.5 by 0.014 < 2·sqrt(0.040² + 0.045²) = 0.120: nothing
    is recommended and the page says neither is distinguishable from the reference. Budget 20: β = 0.02
    leads the reference by 0.670 > 2·sqrt(0.040² + 0.015²) = 0.085 and β = 0.5 by 0.684 > 0.094: it is
    recommended. Threshold by hand: se 0.03 and 0.04 combine to 0.05, so a lead of 0.11 > 0.10 separates,
    0.09 does not; an unknown standard error never separates; the reference is never recommended, even
    when it is measurably best."""
    from tether.sweep.report import budget_advice, separated

    ref, b05, b002 = (
        _set("reference", 0.0, 0.143, 0.040),
        _set("β=0.5", 6.9, 0.129, 0.045, 0.5),
        _set("β=0.02", 16.4, 0.813, 0.015, 0.02),
    )
    t10, t20 = budget_table([ref, b05, b002], [10.0, 20.0])
    assert t10["best"] is ref and t10["recommended"] is None and t10["tied"] == [b05] and t10["min_beta"] == 0.5
    text = budget_advice(t10, "gold")
    assert "no setting within the budget is distinguishable from the reference" in text
    assert "0.143 ± 0.04" in text and "0.129 ± 0.045" in text
    assert t20["recommended"] is b002 and t20["tied"] == [] and "beats every other setting" in budget_advice(t20)

    a, b = _set("a", 1.0, 0.11, 0.03), _set("b", 1.0, 0.0, 0.04)
    assert separated(a, b) and not separated({**a, "y": 0.09}, b) and not separated(b, a)
    assert not separated(a, {**b, "y_se": None})
    (t,) = budget_table([a, {**b, "y_se": None}], [2.0])
    assert t["recommended"] is None and "distinguishable from a" in budget_advice(t)

    high_ref = _set("reference", 0.0, 0.5, 0.01)
    (t,) = budget_table([high_ref, _set("β=1", 3.0, 0.1, 0.01, 1.0)], [5.0])
    assert t["best"] is high_ref and t["recommended"] is None
    assert "no trained setting within the budget matches the reference" in budget_advice(t)


def test_gao_fits_are_checked_and_flagged_fits_not_drawn(tmp_path, monkeypatch):
    """Exact best-of-n gains d(α − β_g d) at six distinct KLs are fitted exactly (R² = 1): α = 0.3, β_g = 0.05
    passes; α = −0.1 is the wrong sign; β_g = −0.05 too; the first four points alone are too few; gains
    alternating ±0.1 are a poor fit (its R², recomputed here by least squares, is below 0.5). The page
    titles the columns "fit α" and "fit β_g" (not the KL's β), gives each flagged fit its reasons, and the
    overoptimisation figure draws only the fit that passes."""
    import numpy as np

    from tether.sweep import report
    from tether.sweep.report import fit_problems, gao_fits, write_report

    kls = [0.25, 1.0, 2.25, 4.0, 6.25, 9.0]  # d = 0.5 .. 3

    def rows(method, alpha, beta_g, points=kls, gains=None):
        ref = {"method": "reference", "run": "reference", "step": 0, "kl": 0.0, "gold_reward": 0.2}
        gains = gains or [math.sqrt(k) * (alpha - beta_g * math.sqrt(k)) for k in points]
        return [ref] + [
            {"method": method, "run": f"{method}{i}", "step": 0, "kl": k, "gold_reward": 0.2 + g}
            for i, (k, g) in enumerate(zip(points, gains))
        ]

    def problems(rs):
        (f,) = gao_fits(rs, ykey="gold_reward").values()
        return f, fit_problems(f)

    f, p = problems(rows("bon", 0.3, 0.05))
    assert p == [] and f["alpha"] == pytest.approx(0.3) and f["r2"] == pytest.approx(1.0)
    assert [x.split(":")[0] for x in problems(rows("bon", -0.1, 0.05))[1]] == ["α = -0.1 ≤ 0"]
    assert [x.split(":")[0] for x in problems(rows("bon", 0.3, -0.05))[1]] == ["β_g = -0.05 < 0"]
    assert problems(rows("bon", 0.3, 0.05, kls[:4]))[1] == [
        "too few points: 4 distinct KL > 0 for 2 coefficients (needs 5)"
    ]
    zigzag = [0.1, -0.1, 0.1, -0.1, 0.1, -0.1]
    f, p = problems(rows("bon", 0, 0, gains=zigzag))
    d = np.sqrt(np.array([0.0] + kls))  # the reference's own point (gain 0 at d = 0) is in the fit too
    y = np.array([0.0] + zigzag)
    A = np.stack([d, -d * d], axis=1)
    resid = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    r2 = 1 - (resid @ resid) / ((y - y.mean()) @ (y - y.mean()))
    assert r2 < 0.5 and f["r2"] == pytest.approx(r2) and any(x.startswith("poor fit") for x in p)

    drawn = []
    real = report.fit_curve
    monkeypatch.setattr(report, "fit_curve", lambda fit, *a: drawn.append(fit["kind"]) or real(fit, *a))
    good = rows("bon", 0.3, 0.05)
    bad = [{**r, "method": "ppo"} for r in rows("ppo", -0.1, 0.05)[1:]]
    page = write_report(tmp_path, good + bad, [good[0], good[-1], bad[-1]], {}, meta={}).read_text()
    assert drawn == ["bon"]  # the flagged ppo fit is not drawn
    assert "fit β_g (Gao curvature, not the KL β)" in page and "β (curvature)" not in page
    assert page.count("class='fit-bad warn'") == 1 and "not drawn: α =" in page


def _one_seed_report(out):
    """A two-setting PPO sweep with one seed each, gold rewards with standard errors."""
    from tether.sweep.report import write_report

    rows = [
        {"method": "reference", "run": "reference", "seed": 0, "step": 0, "kl": 0.0, "kl_stderr": 0.0,
         "gold_reward": 0.143, "gold_stderr": 0.04, "proxy_reward": 0.1, "proxy_stderr": 0.01}
    ]  # fmt: skip
    for beta, path in ((0.5, [(0, 0.143), (3.0, 0.13), (6.9, 0.129)]), (0.02, [(0, 0.143), (8.0, 0.5), (16.4, 0.813)])):
        for step, (kl, gold) in enumerate(path):
            rows.append(
                {"method": "ppo", "run": f"ppo-beta{beta}", "seed": 0, "step": step, "kl": kl, "kl_stderr": 0.1,
                 "gold_reward": gold, "gold_stderr": 0.045, "proxy_reward": gold, "proxy_stderr": 0.01,
                 "beta": beta, "beta_set": beta, "swept": ["beta"]}
            )  # fmt: skip
    finals = [rows[0], rows[3], rows[6]]
    return write_report(out, rows, finals, {}, meta={}, kl_budgets=[10, 20])


def test_report_one_seed_spread_is_na_and_figures_are_embedded(tmp_path):
    """One seed per setting: no "± 0" anywhere, the spread cells say n/a and the captions say why; the
    figures are embedded (data URIs), so the page names no PNG as a source; the budget table advises as
    budget_advice does (budget 10: the reference and β = 0.5 cannot be told apart)."""
    page = _one_seed_report(tmp_path / "out").read_text()
    assert re.search(r"± 0(?![.0-9])", page) is None
    assert page.count("n/a (one seed)") == 2 * 3  # the KL and gold spreads of 3 settings
    assert "Every setting here has one seed: its spread across seeds is n/a" in page
    assert re.search(r"src=['\"][^'\"]*\.png", page) is None
    assert page.count("src='data:image/png;base64,") == 2
    assert "no setting within the budget is distinguishable from the reference" in page
    assert "<b>ppo beta=0.02</b>" in page  # budget 20: separated from both


def test_moved_report_renders_every_image(tmp_path):
    """report.html moved alone to another folder still shows both figures in a real headless browser."""
    page = _one_seed_report(tmp_path / "out")
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    shutil.move(page, moved)
    _, (images, loaded) = rendered_dom(moved)
    assert images == loaded == 2, (images, loaded)


def test_a_rerun_gives_each_worker_the_same_threads(tmp_path, stories_path, monkeypatch):
    """The pool is sized by the whole sweep (reference + 2 runs on 4 cores: 3 workers of 4 // 3 = 1
    thread), also when a rerun has one run left: with 1 worker it would get 4 threads, and a sum split
    over other threads rounds differently (torch: a 3e6-element sum differs by 2e-4 between 1 and 2
    threads), so the resumed run would not repeat the uninterrupted one."""
    import tether.sweep.report
    import tether.sweep.runner as runner

    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "ppo",
                "base": {"model": stories_path, "prompts": str(prompts), "reward": "vader"},
                "grid": {"beta": [0.1, 1.0]},
                "eval": {"prompts": str(prompts), "gold": "vader"},
            }
        )
    )
    launched = []
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(
        runner, "launch_all", lambda jobs, *, module, workers: launched.append(([n for n, _ in jobs], workers))
    )
    monkeypatch.setattr(tether.sweep.report, "write_report", lambda *a, **k: tmp_path / "report.html")
    out = tmp_path / "out"
    runner.run_sweep(load_sweep(path), output_dir=str(out))
    for name in ("reference", "ppo-beta0.1"):  # finished before a kill
        (out / "runs" / name / "result.json").write_text("{}")
    runner.run_sweep(load_sweep(path), output_dir=str(out))
    assert launched == [(["reference", "ppo-beta0.1", "ppo-beta1"], 3), (["ppo-beta1"], 3)]


def test_a_setting_is_keyed_by_the_rows_own_swept_fields():
    """Two seeds of an adaptive PPO run end at different β (an outcome, logged as ``beta``) while DPO sweeps β:
    the PPO seeds are one setting, keyed by their own swept field (kl_target), and the DPO runs two."""
    finals = [
        {"method": "ppo", "run": "ppo-kl3", "seed": 0, "kl_target": 3.0, "beta": 0.69, "swept": ["kl_target"]},
        {"method": "ppo", "run": "ppo-kl3-seed1", "seed": 1, "kl_target": 3.0, "beta": 0.63, "swept": ["kl_target"]},
        {"method": "dpo", "run": "dpo-beta0.1", "seed": 0, "beta": 0.1, "swept": ["beta"]},
        {"method": "dpo", "run": "dpo-beta1", "seed": 0, "beta": 1.0, "swept": ["beta"]},
    ]
    for i, f in enumerate(finals):
        f.update(kl=1.0 + i, gold_reward=0.1 * i, gold_stderr=0.01)
    sets = {s["setting"]: s for s in settings(finals, "gold_reward", ["kl_target", "beta"])}
    assert set(sets) == {"ppo kl_target=3", "dpo beta=0.1", "dpo beta=1"}
    assert sets["ppo kl_target=3"]["n"] == 2 and sets["ppo kl_target=3"]["y"] == pytest.approx(0.05)
