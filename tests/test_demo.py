"""A miniature of `tether demo` end to end (every stage, a few steps each), so the pipeline and
its report files cannot silently break."""

import csv
import json

import pytest

from tether.commands.demo import main as demo_main

from conftest import rendered_dom


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, assets_dir):
    out = tmp_path / "demo"
    assert demo_main(["--tiny", "--output_dir", str(out), "--assets", str(assets_dir), "--workers", "2"]) == 0
    for name in (
        "report.html",
        "frontier.png",
        "frontier.csv",
        "overoptimisation.png",
        "beta_kl.png",
        "finals.csv",
        "samples.jsonl",
        "hacking.png",
        "ladder.png",
        "ladder.csv",
        "reference_ceiling.png",
        "forgetting.png",
        "kl_noise.png",
        "all_points.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"method", "run", "seed", "step", "kl", "kl_stderr", "gold_reward", "gold_stderr", "proxy_reward"} <= set(
        rows[0]
    )
    assert all(r["seed"] == "0" and float(r["gold_stderr"]) >= 0 for r in rows)
    methods = {r["method"] for r in rows}
    assert methods == {"reference", "dpo", "ppo", "ppo_gt", "best_of_n"}
    ref = [r for r in rows if r["method"] == "reference"]
    assert len(ref) == 1 and float(ref[0]["kl"]) == 0.0
    runs = {r["run"] for r in rows if r["method"] != "reference"}
    assert runs == {"dpo-beta0.1", "dpo-beta1", "ppo-kl4", "ppo_gt-kl4", "bon-n2", "bon-n4"}  # the frontier's
    with open(out / "all_points.csv") as f:
        every = list(csv.DictReader(f))
    groups = {r["run"]: r["group"] for r in every}
    assert {k: v for k, v in groups.items() if v != "frontier"} == {
        "ladder-beta0": "ladder",
        "ladder-beta1": "ladder",
        "ladder_small-beta0.1": "ladder_small",
        "ppo_gt-kl4-weakref": "weak_reference",
    }
    with open(out / "ladder.csv") as f:
        ladder = {r["run"]: r for r in csv.DictReader(f)}
    assert ladder["ladder-beta0"]["rule_row"] == "0–0.01" and ladder["ladder-beta1"]["rule_row"] == "≥ 1"
    assert float(ladder["ladder-beta0"]["beta"]) == 0.0
    for run in ("dpo-beta0.1", "ppo-kl4"):  # evaluated at step 0, every 2 steps, and at the end
        steps = sorted(float(r["step"]) for r in rows if r["run"] == run)
        assert steps[0] == 0 and len(steps) >= 2
        step0 = [r for r in rows if r["run"] == run and float(r["step"]) == 0][0]
        assert abs(float(step0["kl"])) < 1e-4  # the untrained policy is the reference: KL 0
    for r in rows:
        assert float(r["kl"]) >= -1e-6 and -1.0 <= float(r["gold_reward"]) <= 1.0
    bon = {r["run"]: float(r["kl"]) for r in rows if r["method"] == "best_of_n"}
    assert 0 <= bon["bon-n2"] <= bon["bon-n4"] <= 1.0  # log 4 - 3/4 ≈ 0.64 is the bound
    html = (out / "report.html").read_text()
    assert "frontier.png" in html and "dpo-beta0.1" in html and "Samples at a matched KL" in html
    for part in ("1. Reward hacking", "3. What β does", "4. The reference sets a ceiling", "5. Forgetting and KL"):
        assert part in html, part
    dom, (images, loaded) = rendered_dom(out / "report.html")  # a real browser decodes every figure
    assert images == loaded == 8, (images, loaded)  # hacking, frontier, overoptimisation, β-KL, ladder, ceiling, 2
    assert "ladder-beta0" in dom
    # Resume: a second invocation redoes nothing and rewrites the same report.
    mtime = (out / "work" / "runs" / "dpo-beta0.1" / "result.json").stat().st_mtime
    assert demo_main(["--tiny", "--output_dir", str(out), "--assets", str(assets_dir), "--workers", "2"]) == 0
    assert (out / "work" / "runs" / "dpo-beta0.1" / "result.json").stat().st_mtime == mtime
    assert json.loads((out / "work" / "rm.done").read_text())["final"].endswith("final")
