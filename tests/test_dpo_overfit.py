"""The overfit-DPO detector (tether/diagnostics/overfit.py): a pure function of the metric history,
checked on synthetic histories (it fires on saturation together with a growing KL, never on either
alone), the trainer's one warning, and a short real DPO run at a high learning rate that trips it."""

import json
import logging

import pytest

from tether.diagnostics.overfit import SATURATION_LOSS, OverfitMonitor, dpo_overfit


def history(losses, kls, *, every=5, stderr=None):
    """Rows as the DPO trainer logs them: a loss every step, kl/ref (and kl/ref_stderr) every ``every`` steps."""
    rows, it = [], iter(kls)
    for step, loss in enumerate(losses, 1):
        row = {"step": step, "loss": loss}
        kl = next(it, None) if step % every == 0 else None
        if kl is not None:
            row["kl/ref"] = kl
            if stderr is not None:
                row["kl/ref_stderr"] = stderr
        rows.append(row)
    return rows


SATURATED = [0.3] * 5 + [0.02] * 10  # running mean of the last 10: 0.02 < -ln 0.95 = 0.0513
LEARNING = [0.6] * 15


def test_threshold_is_the_implied_preference_probability():
    """exp(-mean of -log σ(z_i)) = (Π σ(z_i))^(1/n): the geometric-mean preference probability; 0.95 at the
    threshold."""
    assert SATURATION_LOSS == pytest.approx(0.051293, abs=1e-6)
    v = dpo_overfit(history([SATURATION_LOSS] * 10, []))
    assert (
        v.implied_preference == pytest.approx(0.95, abs=1e-12) and not v.saturated
    )  # strict: at the threshold, not below


def test_fires_on_saturation_and_growth_only():
    both = dpo_overfit(history(SATURATED, [1.0, 2.0, 3.5]))
    assert both.flagged and both.saturated and both.kl_growing and both.kls == (1.0, 2.0, 3.5)
    assert both.running_loss == pytest.approx(0.02)
    flat_kl = dpo_overfit(history(SATURATED, [1.0, 3.0, 2.9]))  # converged: the KL stopped growing
    assert flat_kl.saturated and not flat_kl.kl_growing and not flat_kl.flagged
    still_learning = dpo_overfit(history(LEARNING, [1.0, 2.0, 3.5]))  # KL grows, loss far from 0
    assert still_learning.kl_growing and not still_learning.saturated and not still_learning.flagged
    too_few = dpo_overfit(history(SATURATED[:10], [1.0, 2.0]))  # two evaluations: no trend yet
    assert not too_few.kl_growing and not too_few.flagged
    assert not dpo_overfit([]).flagged


def test_growth_must_exceed_the_standard_errors_when_logged():
    """Rise 1.0 -> 1.2 with stderr 0.1 at both ends: 0.2 < 2·hypot(0.1, 0.1) = 0.283, noise; 1.0 -> 1.5 is not."""
    assert not dpo_overfit(history(SATURATED, [1.0, 1.1, 1.2], stderr=0.1)).flagged
    assert dpo_overfit(history(SATURATED, [1.0, 1.2, 1.5], stderr=0.1)).flagged
    assert dpo_overfit(history(SATURATED, [1.0, 1.1, 1.2], stderr=0.1), z=0).flagged


def test_monitor_warns_once_and_is_off_for_bounded_losses(caplog):
    mon = OverfitMonitor("sigmoid")
    flags = []
    with caplog.at_level(logging.WARNING, logger="tether.diagnostics.overfit"):
        for row in history(SATURATED + [0.01] * 10, [1.0, 2.0, 3.0, 4.0, 5.0]):
            mon.record(row)
            if "kl/ref" in row:
                flags.append(mon.check(row["step"])["dpo/overfit"])
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0]
    warnings = [r.getMessage() for r in caplog.records if "dpo/overfit" in r.getMessage()]
    assert len(warnings) == 1 and "loss_type=ipo" in warnings[0] and "learning_rate" in warnings[0]
    hooked = OverfitMonitor("sigmoid")  # an eval_hook's eval/kl (the demo's protocol) stands in for kl/ref
    for row in history(SATURATED, [1.0, 2.0, 3.0]):
        hooked.record({("eval/kl" if k == "kl/ref" else k): v for k, v in row.items()})
    assert hooked.check(15) == {"dpo/overfit": 1.0}
    ipo = OverfitMonitor("ipo")
    for row in history(SATURATED, [1.0, 2.0, 3.0]):
        ipo.record(row)
    assert ipo.check(15) == {}


def test_short_dpo_run_at_high_lr_trips_the_detector(stories_path, assets_dir, tmp_path, caplog):
    """8 training pairs, lr 3e-3, 24 steps of all 8 pairs: the loss is ~1e-5 by step 8 (the pairs are
    memorised) while kl/ref, measured every 8 steps on held-out prompts, keeps rising (measured: 64 ->
    76 -> 84 nats; it flattens near 86 by step 32, where the detector would stop firing)."""
    from tether.data.preference import sentiment_pairs
    from tether.trainers.dpo import DPOConfig, train_dpo

    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    rows = sentiment_pairs(pos, neg, n=16, seed=0)
    cfg = DPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / "run"),
        max_steps=24,
        batch_size=8,
        learning_rate=3e-3,
        max_length=32,
        eval_every=8,
        eval_pairs=8,
        kl_prompts=8,
        kl_samples=2,
        kl_max_new_tokens=16,
        progress=False,
        seed=0,
        beta=0.1,
    )
    with caplog.at_level(logging.WARNING, logger="tether.diagnostics.overfit"):
        train_dpo(cfg, rows=rows[:8], eval_rows=rows[8:])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logged if "dpo/overfit" in m]
    assert [m["step"] for m in evals] == [8, 16, 24]
    assert [m["dpo/overfit"] for m in evals[:2]] == [0.0, 0.0]  # fewer than 3 evaluations: no trend yet
    assert evals[-1]["dpo/overfit"] == 1.0, [(m["step"], m["loss"], m["kl/ref"]) for m in evals]
    assert sum("dpo/overfit" in r.getMessage() for r in caplog.records) == 1
