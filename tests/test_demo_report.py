"""The demo report's readings (tether/demo/report_parts.py) on hand-made evaluation rows: the rule-of-thumb row
of a β, the turn of a run in standard errors, what a ladder run did, the best β, and the DPO failure rule."""

import json
import math

import pytest

from tether.demo.pipeline import DPO_UNSTABLE_LOSS, PRESETS, DemoConfig, final_train_loss, first_hacking_step
from tether.demo.report_parts import agrees, best_beta, hacking_verdict, ladder_table, rule_row


def test_rule_of_thumb_rows():
    assert rule_row(0.0)[0] == rule_row(0.01)[0] == "0–0.01"
    assert rule_row(0.05) == ("0.02–0.1", "standard")
    assert rule_row(0.3) == ("0.2–0.5", "conservative")
    assert rule_row(1.0)[0] == rule_row(2.0)[0] == "≥ 1"
    assert rule_row(0.15) == ("between 0.02–0.1 and 0.2–0.5", "")  # between rows: no prediction


def _pts(golds, proxies, se=0.01, run="r"):
    return [
        {"run": run, "step": 20 * i, "kl": float(i), "gold_reward": g, "gold_stderr": se, "proxy_reward": p}
        for i, (g, p) in enumerate(zip(golds, proxies))
    ]


def test_turn_in_standard_errors_by_hand():
    v = hacking_verdict(_pts([0.1, 0.3, 0.1], [0.0, 1.0, 2.0]), 40)
    assert v["peak_step"] == 20 and v["final_step"] == 40
    assert v["fall_z"] == pytest.approx(0.2 / math.hypot(0.01, 0.01))  # 14.1 combined standard errors
    assert v["hacked"] and v["proxy_rise"] == pytest.approx(1.0) and v["monitor_step"] == 40
    assert not hacking_verdict(_pts([0.1, 0.3, 0.29], [0.0, 1.0, 2.0]), None)["hacked"]  # 0.7 s.e.: noise
    assert not hacking_verdict(_pts([0.1, 0.3, 0.1], [0.0, 1.0, 0.5]), None)["hacked"]  # the proxy fell too
    # the first maximum is the peak: a later equal value does not move it
    assert hacking_verdict(_pts([0.1, 0.3, 0.3], [0.0, 1.0, 2.0]), None)["peak_step"] == 20


def test_ladder_rows_say_what_each_run_did():
    rows, finals = [], []
    cases = {  # run: (β, golds, kls, monitor step)
        "ladder-beta0": (0.0, [0.1, 0.3, 0.05], [0, 20, 40], 40),
        "ladder-beta0.05": (0.05, [0.1, 0.2, 0.4], [0, 10, 20], None),
        "ladder-beta2": (2.0, [0.1, 0.1, 0.11], [0, 1, 1.5], None),
        "ladder-beta0.3": (0.3, [0.1, 0.1, 0.12], [0, 3, 6], None),  # gold unchanged but it moved 6 nats
    }
    for run, (beta, golds, kls, mon) in cases.items():
        pts = [
            {"method": "ppo", "run": run, "group": "ladder", "step": 20 * i, "kl": k, "kl_stderr": 0.1,
             "gold_reward": g, "gold_stderr": 0.01, "proxy_reward": float(i), "beta": beta, "seed": 0}
            for i, (g, k) in enumerate(zip(golds, kls))
        ]  # fmt: skip
        rows += pts
        finals.append({**pts[-1], "hacking_step": mon})
    table = {r["run"]: r for r in ladder_table(rows, finals, "ladder", (0.1, 0.01))}
    assert table["ladder-beta0"]["did"] == "hacked" and agrees(table["ladder-beta0"]) == "yes"
    assert table["ladder-beta0.05"]["did"] == "moved, no hacking" and agrees(table["ladder-beta0.05"]) == "yes"
    assert table["ladder-beta2"]["did"] == "barely moved" and agrees(table["ladder-beta2"]) == "yes"
    assert table["ladder-beta0.3"]["did"] == "moved, no hacking"  # KL 6 > 3 nats: not "barely"
    best = best_beta(list(table.values()))
    assert best["beta"] == 0.05 and best["runner_up"] == 0.3
    assert best["margin_z"] == pytest.approx((0.4 - 0.12) / math.hypot(0.01, 0.01))


def test_first_hacking_step_and_dpo_failure_read_the_runs_own_logs(tmp_path):
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    assert first_hacking_step(run) is None and final_train_loss(run) is None  # nothing logged yet
    metrics = [{"step": 0, "eval/hacking": 0.0}, {"step": 5, "loss": 1.0}, {"step": 40, "eval/hacking": 1.0}]
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    assert first_hacking_step(run) == 40
    losses = [0.7] * 20 + [0.5] * 4 + [1.0] * 6  # 30 steps: the last max(5, 3) = 5 steps are all 1.0
    (run / "train" / "history.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses))
    )
    assert final_train_loss(run) == pytest.approx(1.0) and final_train_loss(run) > DPO_UNSTABLE_LOSS
    assert final_train_loss(run, tail=0.5) == pytest.approx((0.7 * 5 + 0.5 * 4 + 1.0 * 6) / 15)


def test_quick_preset_runs():
    """The quick preset's runs: the frontier (two seeds of PPO-on-proxy), the ladder with a second seed of
    β = 0, the second task's ladder against the small proxy, and PPO-GT from the weak reference."""
    runs = {s["run"]: s for s in DemoConfig().runs()}
    assert {r for r in runs if r.startswith("ppo-")} == {"ppo-kl3", "ppo-kl8", "ppo-kl8-seed1"}
    full = {s["run"] for s in DemoConfig(**PRESETS["full"]).runs() if s["run"].startswith("ppo-")}
    assert len(full) == 12 and "ppo-kl3-seed2" in full  # 4 targets x 3 seeds
    assert [r for r in runs if r.startswith("ladder-")] == [
        "ladder-beta0", "ladder-beta0-seed1", "ladder-beta0.01", "ladder-beta0.05", "ladder-beta0.3", "ladder-beta2"
    ]  # fmt: skip
    assert all("kl_target" not in s and s["steps"] == 120 for r, s in runs.items() if r.startswith("ladder"))
    assert {s["proxy"] for r, s in runs.items() if r.startswith("ladder_small")} == {"rm_small"}
    assert runs["ppo_gt-kl6-weakref"]["reference"] == "sft_weak"


def test_dpo_learning_rate_over_beta():
    """The full preset divides DPO's learning rate by β above 1 only; the quick preset keeps one rate."""
    from tether.demo.pipeline import PRESETS, dpo_lr_for

    full = DemoConfig(**PRESETS["full"])
    assert [dpo_lr_for(full, b) for b in (0.05, 1.0, 5.0)] == [1.5e-4, 1.5e-4, 1.5e-4 / 5]
    quick = DemoConfig()
    assert {dpo_lr_for(quick, b) for b in (0.05, 1.0, 5.0)} == {5e-4}


@pytest.mark.parametrize(
    "flag", ["--ladder_betas=-1", "--small_proxy_fraction=0", "--weak_sft_steps=0", "--ladder_steps=0"]
)
def test_bad_demo_fields_exit_2_with_one_line(flag, capsys, tmp_path):
    from tether.commands.demo import main as demo_main

    with pytest.raises(SystemExit) as e:
        demo_main([flag, "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag[2:].split("=")[0] in err[-1] and not (tmp_path / "out").exists()


def test_report_sentences_follow_the_numbers(tmp_path):
    """The page's verdicts flip with the data: DPO's β orders its KL only when ρ < 0; the side-by-side pair
    is called alike only within 2 s.e. of proxy; a β = 0 run that did not turn is reported as such."""
    from tether.demo.report_parts import frontier_notes_html, hacking_html, side_by_side

    def dpo(beta, kl):
        return {"method": "dpo", "run": f"dpo-beta{beta:g}", "beta": beta, "kl": kl, "gold_reward": 0.1}

    assert "β orders its final KL" in frontier_notes_html([dpo(0.1, 9.0), dpo(1.0, 2.0), dpo(5.0, 1.0)])
    assert "does not order" in frontier_notes_html([dpo(0.1, 1.0), dpo(1.0, 2.0), dpo(5.0, 9.0)])
    assert "by construction" in frontier_notes_html([dpo(0.1, 9.0), dpo(1.0, 2.0)])

    def pt(run, step, proxy, gold):
        sample = {"prompt": "a", "completion": "b", "gold": gold}
        return {"run": run, "step": step, "kl": 1.0, "proxy_reward": proxy, "proxy_stderr": 0.05,
                "gold_reward": gold, "gold_stderr": 0.01, "samples": [sample]}  # fmt: skip

    caption, pair = side_by_side([pt("h", 40, 3.0, 0.05), pt("p", 40, 2.95, 0.4)], {"h": 40}, ["p"])
    assert "alike; the gold does not" in caption and [p["run"] for p in pair] == ["h", "p"]
    caption, _ = side_by_side([pt("h", 40, 3.0, 0.05), pt("p", 40, 1.0, 0.4)], {"h": 40}, ["p"])
    assert "alike" not in caption and "higher" in caption  # 28 s.e. apart in proxy: not a matched pair
    before_turn = [pt("h", 20, 3.0, 0.05), pt("p", 40, 2.9, 0.4)]
    assert side_by_side(before_turn, {"h": 40}, ["p"])[1] == []  # only points at or after the monitor fired

    rows = [
        {"method": "ppo", "run": "ladder-beta0", "group": "ladder", "step": s, "kl": float(s), "kl_stderr": 0.1,
         "gold_reward": g, "gold_stderr": 0.01, "proxy_reward": s / 10, "proxy_stderr": 0.05, "beta": 0.0, "seed": 0}
        for s, g in ((0, 0.1), (20, 0.2), (40, 0.21))
    ]  # fmt: skip
    finals = [{**rows[-1], "hacking_step": None}]
    table = ladder_table(rows, finals, "ladder", (0.1, 0.01))
    page = hacking_html(tmp_path, rows, finals, table)
    assert "not every seed turned within 40 steps" in page and "fired on no run" in page
    assert (tmp_path / "hacking.png").stat().st_size > 0
