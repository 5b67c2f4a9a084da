"""The demo report's own parts, around the sweep report's frontier (``report.write_report`` puts them on the
page in this order):

1. hacking without the penalty (``hacking_verdicts``, ``plot_hacking``, ``hacking_html``): the ladder's
   smallest-β runs against the proxy, their gold peak and fall in standard errors, where the trainer's own
   monitor fired (``eval/hacking`` in the run's metrics), and completions side by side at a matched proxy score;
3. what β does on this task and a second one (``ladder_table``, ``plot_ladder``, ``ladder_html``): the fixed-β
   ladder's final KL, gold and proxy, the practitioners' rule-of-thumb row of each β and what the run did;
4. the reference's ceiling (``plot_reference_ceiling``, ``reference_html``): PPO-GT from the SFT reference and
   from a weak one;
5. forgetting and KL noise (``diagnostics_html``; figures from ``tether.demo.diagnose``).

Every number is read from the evaluation rows (``pipeline.collect``): nothing here recomputes a metric.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

from ..sweep.report import _img

RULE_OF_THUMB = (
    (0.0, 0.01, "0–0.01", "near-unconstrained; reward hacking likely"),
    (0.02, 0.1, "0.02–0.1", "standard"),
    (0.2, 0.5, "0.2–0.5", "conservative"),
    (1.0, math.inf, "≥ 1", "barely moves"),
)
"""Practitioners' rule of thumb for a fixed β against a learned reward model: (low, high, row, what it
predicts). Folklore, not a published table; its data points are the β of published runs (InstructGPT, Ouyang et
al. 2022: 0.02; Stiennon et al. 2020: about 0.05), both in the "standard" row."""

FALL_Z = 3.0
"""The report calls a gold fall real when it exceeds this many combined standard errors (the monitor's z)."""

BARELY_KL = 3.0
"""A run "barely moves" when its final KL is under this many nats (an eighth of a nat per token of the quick
preset's 24-token completions) and its gold is within 2 combined standard errors of the reference's: the
evaluation cannot tell what it writes from what the reference writes."""


def rule_row(beta: float) -> tuple[str, str]:
    """The rule-of-thumb row of a β: (row, prediction); β between rows -> ("between a and b", "")."""
    for lo, hi, row, what in RULE_OF_THUMB:
        if lo <= beta <= hi:
            return row, what
    below = max((r for r in RULE_OF_THUMB if r[1] < beta), key=lambda r: r[1])
    above = min((r for r in RULE_OF_THUMB if r[0] > beta), key=lambda r: r[0])
    return f"between {below[2]} and {above[2]}", ""


def _se(v) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


def hacking_verdict(points: list[dict], hacking_step: Optional[int]) -> dict:
    """One run's turn, from its evaluation rows in step order: the gold's peak (the first maximum), the final
    gold's fall below it in combined standard errors, the proxy's change since the peak, and the step at which
    the trainer's monitor fired. ``hacked``: the fall exceeds ``FALL_Z`` standard errors while the proxy rose."""
    pts = sorted(points, key=lambda r: r["step"])
    p = max(range(len(pts)), key=lambda i: (pts[i]["gold_reward"], -i))
    peak, last = pts[p], pts[-1]
    se = math.hypot(_se(peak.get("gold_stderr")), _se(last.get("gold_stderr")))
    fall = peak["gold_reward"] - last["gold_reward"]
    fall_z = fall / se if se > 0 else (math.inf if fall > 0 else 0.0)
    proxy_rise = last["proxy_reward"] - peak["proxy_reward"]
    return {
        "peak_step": peak["step"],
        "peak_kl": peak["kl"],
        "peak_gold": peak["gold_reward"],
        "peak_gold_stderr": peak.get("gold_stderr"),
        "final_step": last["step"],
        "final_kl": last["kl"],
        "final_gold": last["gold_reward"],
        "final_gold_stderr": last.get("gold_stderr"),
        "fall": fall,
        "fall_z": fall_z,
        "proxy_at_peak": peak["proxy_reward"],
        "final_proxy": last["proxy_reward"],
        "proxy_rise": proxy_rise,
        "hacked": bool(fall_z > FALL_Z and proxy_rise > 0),
        "monitor_step": hacking_step,
    }


def runs_of(rows: list[dict], group: str) -> dict[str, list[dict]]:
    """{run: its evaluation rows in step order} for one group."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("group") == group and r["method"] != "reference":
            out.setdefault(r["run"], []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


def ladder_table(rows: list[dict], finals: list[dict], group: str, reference_gold: tuple[float, float]) -> list[dict]:
    """One row per ladder run of ``group`` (seed order within a β): β, seed, rule-of-thumb row, the final point,
    the turn (``hacking_verdict``) and what the run did: "hacked" (the monitor fired), "barely moved" (KL <
    ``BARELY_KL`` and gold within 2 standard errors of the reference's), else "moved, no hacking"."""
    fin = {f["run"]: f for f in finals}
    out = []
    for run, pts in runs_of(rows, group).items():
        f = fin[run]
        v = hacking_verdict(pts, f.get("hacking_step"))
        g0, se0 = reference_gold
        near_ref = abs(f["gold_reward"] - g0) <= 2 * math.hypot(_se(f.get("gold_stderr")), se0)
        if v["monitor_step"] is not None:
            did = "hacked"
        elif f["kl"] < BARELY_KL and near_ref:
            did = "barely moved"
        else:
            did = "moved, no hacking"
        row, what = rule_row(float(f["beta_set"] if f.get("beta_set") is not None else f["beta"]))
        out.append(
            {
                "run": run,
                "beta": float(f.get("beta_set", f["beta"])),
                "seed": f.get("seed"),
                "rule_row": row,
                "rule_says": what,
                "kl": f["kl"],
                "kl_stderr": f.get("kl_stderr"),
                "gold": f["gold_reward"],
                "gold_stderr": f.get("gold_stderr"),
                "proxy": f["proxy_reward"],
                "did": did,
                **{k: v[k] for k in ("peak_gold", "peak_step", "final_step", "fall_z", "monitor_step", "hacked")},
            }
        )
    return sorted(out, key=lambda r: (r["beta"], r["seed"] or 0))


def agrees(r: dict) -> str:
    """Does what the run did match its rule-of-thumb row? "yes", "no", or "" (β between rows)."""
    expected = {
        "0–0.01": "hacked",
        "≥ 1": "barely moved",
        "0.02–0.1": "moved, no hacking",
        "0.2–0.5": "moved, no hacking",
    }
    e = expected.get(r["rule_row"])
    return "" if e is None else ("yes" if r["did"] == e else "no")


def first_seed(table: list[dict]) -> dict[float, dict]:
    """{β: the run of the demo's own seed} (its name has no "-seed" suffix; else the first listed)."""
    first: dict[float, dict] = {}
    for r in sorted(table, key=lambda r: "-seed" in r["run"]):
        first.setdefault(r["beta"], r)
    return first


def best_beta(table: list[dict]) -> Optional[dict]:
    """The ladder row with the highest final gold among the demo seed's runs, with ``margin_z``: its lead over
    the runner-up in combined standard errors (treating the two evaluations as independent; they share prompts
    and the sampling draw, so this overstates the error of the difference: conservative)."""
    first = first_seed(table)
    ranked = sorted(first.values(), key=lambda r: -r["gold"])
    if not ranked:
        return None
    best = dict(ranked[0])
    if len(ranked) > 1:
        nxt = ranked[1]
        se = math.hypot(_se(best["gold_stderr"]), _se(nxt["gold_stderr"]))
        best["margin_z"] = (best["gold"] - nxt["gold"]) / se if se > 0 else math.inf
        best["runner_up"] = nxt["beta"]
    return best


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hacking(rows: list[dict], finals: list[dict], runs: list[str], path: Path) -> None:
    """Gold (left) and proxy (right) reward against the training step for ``runs``, ±1 standard error, with a
    cross where the run's own hacking monitor fired."""
    plt = _plt()
    fin = {f["run"]: f for f in finals}
    by_run = {r: sorted((x for x in rows if x["run"] == r), key=lambda x: x["step"]) for r in runs}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, pts in by_run.items():
        steps = [p["step"] for p in pts]
        (line,) = a.plot(steps, [p["gold_reward"] for p in pts], marker="o", ms=3, label=run)
        a.errorbar(
            steps,
            [p["gold_reward"] for p in pts],
            yerr=[_se(p.get("gold_stderr")) for p in pts],
            fmt="none",
            ecolor=line.get_color(),
            capsize=2,
        )
        b.errorbar(
            steps,
            [p["proxy_reward"] for p in pts],
            yerr=[_se(p.get("proxy_stderr")) for p in pts],
            marker="o",
            ms=3,
            capsize=2,
            color=line.get_color(),
            label=run,
        )
        at = fin.get(run, {}).get("hacking_step")
        if at is not None:
            g = next(p["gold_reward"] for p in pts if p["step"] == at)
            a.plot([at], [g], "x", color="red", ms=12, mew=2.5, zorder=5)
            a.annotate(
                f"monitor fired\n(step {at})",
                (at, g),
                textcoords="offset points",
                xytext=(-30, 14),
                fontsize=7,
                color="red",
            )
    a.set_title("gold reward (VADER), the judgement")
    a.set_xlabel("PPO step")
    a.set_ylabel("mean gold reward (±1 s.e.)")
    b.set_title("proxy reward (the learned RM being optimised)")
    b.set_xlabel("PPO step")
    b.set_ylabel("mean proxy reward (±1 s.e.)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ladder(tables: dict[str, list[dict]], path: Path) -> None:
    """Final gold (left) and final KL (right) against the fixed β, one line per task, first seed's runs;
    hacked runs drawn as red crosses."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    right = 2 * max((r["beta"] for t in tables.values() for r in t), default=2.0) or 1.0
    for name, table in tables.items():
        pts = sorted(first_seed(table).values(), key=lambda r: r["beta"])
        x = [r["beta"] for r in pts]
        (line,) = a.plot(x, [r["gold"] for r in pts], marker="o", label=name)
        a.errorbar(
            x,
            [r["gold"] for r in pts],
            yerr=[_se(r["gold_stderr"]) for r in pts],
            fmt="none",
            ecolor=line.get_color(),
            capsize=3,
        )
        b.plot(x, [r["kl"] for r in pts], marker="o", color=line.get_color(), label=name)
        for r in pts:
            if r["did"] == "hacked":
                a.plot([r["beta"]], [r["gold"]], "x", color="red", ms=10, mew=2)
    for lo, hi, row, _ in RULE_OF_THUMB[1:3]:
        for ax in (a, b):
            ax.axvspan(lo, hi, color="#2ca02c" if row == "0.02–0.1" else "#ff7f0e", alpha=0.08)
    a.set_ylabel("final gold reward (±1 s.e.; red x: the monitor fired)")
    b.set_ylabel("final KL[π‖π_ref] (nats)")
    b.set_yscale("symlog", linthresh=1.0)
    for ax in (a, b):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, right)
        ax.set_xlabel("fixed β (symlog; shaded: 'standard' and 'conservative' rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_title("final gold reward against β")
    b.set_title("final KL against β")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reference_ceiling(rows: list[dict], refs: dict[str, dict], path: Path) -> None:
    """Gold against KL to each run's own reference: the PPO-GT runs from the SFT reference (group "frontier")
    and from the weak one (group "weak_reference"), each run's points joined in step order, the references
    at KL 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    colours = {"frontier": "#2ca02c", "weak_reference": "#8c564b"}
    names = {"frontier": "from the SFT reference", "weak_reference": "from the weak reference"}
    for group in ("frontier", "weak_reference"):
        for run, pts in runs_of([r for r in rows if r["method"] == "ppo_gt"], group).items():
            ax.errorbar(
                [p["kl"] for p in pts],
                [p["gold_reward"] for p in pts],
                yerr=[_se(p.get("gold_stderr")) for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                color=colours[group],
                label=f"PPO-GT {run} ({names[group]})",
            )
    for group, ref in refs.items():
        ax.errorbar(
            [0],
            [ref["gold_reward"]],
            yerr=[_se(ref.get("gold_stderr"))],
            marker="s",
            ms=7,
            capsize=3,
            color=colours[group],
            mfc="white",
            label=f"reference: {names[group].split('from the ')[1]}",
        )
    ax.set_xlabel("KL[π‖π_ref] to the run's own reference (nats)")
    ax.set_ylabel("mean gold reward (±1 s.e.)")
    ax.set_title("the reference sets a ceiling: the same PPO-GT from two references")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(v, se, fmt="{:.3f}") -> str:
    return fmt.format(v) + ("" if se is None else " ± " + fmt.format(se))


def side_by_side(rows: list[dict], hacked: dict[str, int], penalised_runs: list[str]) -> tuple[str, list[dict]]:
    """The closest pair in proxy score between a hacked run's point at or after its monitor fired (``hacked``:
    {run: step it fired}) and any point of a penalised run: the two "look equally good" to the proxy. Returns
    (caption, [hacked point, penalised point])."""
    after = [r for r in rows if r["run"] in hacked and r["step"] >= hacked[r["run"]] and r.get("samples")]
    cands = [r for r in rows if r["run"] in penalised_runs and r.get("samples")]
    if not after or not cands:
        return "", []
    h, p = min(
        ((a, b) for a in after for b in cands), key=lambda ab: abs(ab[0]["proxy_reward"] - ab[1]["proxy_reward"])
    )
    z_proxy = _z(h["proxy_reward"], h.get("proxy_stderr"), p["proxy_reward"], p.get("proxy_stderr"))
    z_gold = _z(p["gold_reward"], p.get("gold_stderr"), h["gold_reward"], h.get("gold_stderr"))
    numbers = (
        f"proxy {h['proxy_reward']:.2f} against {p['proxy_reward']:.2f} ({z_proxy:+.1f} s.e.), gold "
        f"{h['gold_reward']:.3f} against {p['gold_reward']:.3f} ({-z_gold:+.1f} s.e.)"
    )
    if abs(z_proxy) <= 2 and z_gold > 2:
        verdict = "the proxy rates them alike; the gold does not"
    elif z_proxy > 2 and z_gold > 2:
        verdict = "the proxy rates the unpenalised run's completions higher; the gold rates them lower"
    else:
        verdict = "the proxy and the gold do not disagree beyond 2 standard errors here"
    return f"{numbers}: {verdict}", [h, p]


def _z(a: float, se_a, b: float, se_b) -> float:
    """(a − b) in combined standard errors, sqrt(se_a² + se_b²) (independent evaluations: conservative here)."""
    se = math.hypot(_se(se_a), _se(se_b))
    return (a - b) / se if se > 0 else (math.inf if a > b else -math.inf if a < b else 0.0)


def samples_table(points: list[dict], k: int = 6) -> str:
    esc = html.escape
    lists = [p.get("samples") or [] for p in points]
    depth = min((len(x) for x in lists), default=0)
    hdr = "".join(
        f"<th>{esc(p['run'])}<br><small>step {p['step']}, KL {p['kl']:.1f}, proxy {p['proxy_reward']:.2f}, "
        f"gold {p['gold_reward']:.3f}</small></th>"
        for p in points
    )
    trs = ""
    for i in range(min(depth, k)):
        cells = "".join(
            f"<td>{esc(x[i].get('completion', ''))}<br><small>gold {x[i].get('gold', float('nan')):.3f}</small></td>"
            for x in lists
        )
        trs += f"<tr><td class='p'>{esc(lists[0][i].get('prompt', ''))}</td>{cells}</tr>"
    return f"<table class='side'><tr><th>prompt</th>{hdr}</tr>{trs}</table>"


def gao_note(rows: list[dict], runs: list[str]) -> str:
    """Gao et al.'s RL form d(α − β_g log d), d = √KL, fitted (``sweep.report.gao_fits``) to every evaluation
    point of ``runs`` (the gold gain over the reference), as a sentence: its coefficients, its peak KL and R²,
    or why it should not be read."""
    from ..sweep.report import gao_fits

    pts = [{**r, "method": "unpenalised"} for r in rows if r["run"] in runs]
    ref = next((r for r in pts if r["step"] == 0), None)
    if ref is None:
        return ""
    fits = gao_fits([{**ref, "method": "reference"}] + pts, ykey="gold_reward")
    f = fits.get("unpenalised")
    if f is None:
        return "Too few distinct KLs to fit Gao et al.'s curve to these runs."
    what = (
        f"Gao et al.'s (2022) RL form d(α − β_g log d), d = √KL, fitted to these runs' {f['n']} points: "
        f"α = {f['alpha']:.3g}, β_g = {f['beta']:.3g}, R² = {f['r2']:.2f}"
        if f["r2"] is not None
        else "Gao et al.'s RL form: R² undefined"
    )
    if f["problems"]:
        return f"{what}; not a shape to read: {'; '.join(f['problems'])}."
    return f"{what}; its peak is at KL {f['peak_kl']:.3g} nats: past it, more KL buys less gold."


def hacking_html(out_dir: Path, rows: list[dict], finals: list[dict], table: list[dict]) -> str:
    """Part 1's section; draws hacking.png."""
    esc = html.escape
    if not table:
        return ""
    small = [r for r in table if r["rule_row"] == "0–0.01"]
    best = best_beta(table)
    shown = [r["run"] for r in small] + ([best["run"]] if best and best["run"] not in {r["run"] for r in small} else [])
    plot_hacking(rows, finals, shown, out_dir / "hacking.png")
    lines = ""
    for r in table:
        mon = f"fired at step {r['monitor_step']}" if r["monitor_step"] is not None else "did not fire"
        cls = "warn" if r["monitor_step"] is not None else ""
        lines += (
            f"<tr class='{cls}'><td>{esc(r['run'])}</td><td>{r['beta']:g}</td>"
            f"<td>{r['seed']}</td><td>{r['peak_gold']:.3f} (step {r['peak_step']})</td>"
            f"<td>{_pm(r['gold'], r['gold_stderr'])}</td><td>{r['fall_z']:.1f}</td><td>{r['proxy']:.2f}</td>"
            f"<td>{r['kl']:.1f}</td><td>{esc(mon)}</td></tr>"
        )
    hacked = {r["run"]: r["monitor_step"] for r in small if r["monitor_step"] is not None}
    penalised = [r["run"] for r in table if r["monitor_step"] is None and r["beta"] > 0.01]
    side = ""
    caption, pts = side_by_side(rows, hacked, penalised) if hacked and penalised else ("", [])
    if pts:
        side = (
            "<p>Completions side by side at a matched proxy score (the closest pair in proxy score between an "
            f"unpenalised run after its monitor fired and a penalised run): {esc(caption)}.</p>{samples_table(pts)}"
        )
    false_alarms = [r["run"] for r in table if r["monitor_step"] is not None and not r["hacked"]]
    missed = [r["run"] for r in table if r["hacked"] and r["monitor_step"] is None]
    flagged = [r["run"] for r in table if r["monitor_step"] is not None]
    if false_alarms or missed:
        checks = (
            f"The monitor and the {FALL_Z:g}-standard-error reading disagree on: {', '.join(false_alarms + missed)}."
        )
    elif flagged:
        checks = (
            f"The monitor fired on {', '.join(flagged)}: each has a final gold more than {FALL_Z:g} standard errors "
            f"below its peak with a rising proxy, and no other run has one."
        )
    else:
        checks = f"The monitor fired on no run, and no run's gold fell more than {FALL_Z:g} standard errors."
    zero = [r for r in small if r["beta"] == 0]
    if zero and all(r["hacked"] for r in zero):
        lead = (
            "Without the penalty (β = 0, every seed) the proxy kept rising while the gold reward peaked and fell, by "
            + ", ".join(f"{r['fall_z']:.0f}" for r in zero)
            + " standard errors: the policy found what the proxy rewards and the gold does not."
        )
    elif zero:
        lead = (
            "Without the penalty (β = 0) the gold's fall from its peak was "
            + ", ".join(f"{r['fall_z']:.1f}" for r in zero)
            + f" standard errors: not every seed turned within {zero[0]['final_step']} steps."
        )
    else:
        lead = "This ladder has no β = 0 run; its smallest β are shown."
    fit_note = gao_note(rows, [r["run"] for r in small])
    title = "1. Reward hacking without the penalty" if zero else "1. Reward hacking at the smallest β"
    return f"""<h2>{title}</h2>
<p>PPO against the learned proxy at fixed β (β = 0: no KL penalty at all). {esc(lead)}
The red cross marks the step at which the trainer's own hacking monitor (<code>eval/hacking</code>, in the run's
metrics) fired: the gold below its peak by more than {FALL_Z:g} combined standard errors at two evaluations
running, while the proxy is above its value there by as much.</p>
{_img(out_dir, "hacking.png", "gold and proxy reward against step, without and with the penalty")}
<table><tr><th>run</th><th>β</th><th>seed</th><th>gold peak</th><th>final gold ± s.e.</th>
<th>fall below the peak (s.e.)</th><th>final proxy</th><th>final KL</th><th>hacking monitor</th></tr>{lines}</table>
<p>{esc(checks)}</p>
<p>{esc(fit_note)}</p>
{side}"""


def ladder_html(out_dir: Path, tables: dict[str, list[dict]], *, steps: int, notes: dict[str, str]) -> str:
    """Part 3's section; draws ladder.png."""
    esc = html.escape
    tables = {k: v for k, v in tables.items() if v}
    if not tables:
        return ""
    plot_ladder(tables, out_dir / "ladder.png")
    body, bests, best_betas = "", [], []
    for name, table in tables.items():
        trs = "".join(
            f"<tr><td>{r['beta']:g}</td><td>{r['seed']}</td><td>{esc(r['rule_row'])}</td><td>{esc(r['rule_says'])}</td>"
            f"<td>{_pm(r['kl'], r['kl_stderr'], '{:.2f}')}</td><td>{_pm(r['gold'], r['gold_stderr'])}</td>"
            f"<td>{r['proxy']:.2f}</td><td>{esc(r['did'])}</td><td>{agrees(r)}</td></tr>"
            for r in table
        )
        body += (
            f"<h3>{esc(name)}</h3><p>{esc(notes.get(name, ''))}</p><table><tr><th>β</th><th>seed</th>"
            "<th>rule-of-thumb row</th><th>the rule says</th><th>final KL (nats)</th><th>final gold ± s.e.</th>"
            f"<th>final proxy</th><th>what the run did</th><th>as the rule says?</th></tr>{trs}</table>"
        )
        b = best_beta(table)
        if b:
            margin = ""
            if "margin_z" in b:
                margin = f", {b['margin_z']:.1f} standard errors above β = {b['runner_up']:g}"
                margin += "" if b["margin_z"] > 2 else ": not distinguishable from it"
            bests.append(f"{name}: β = {b['beta']:g} (gold {b['gold']:.3f}{margin})")
            best_betas.append(b["beta"])
    moved = len(set(best_betas)) > 1
    closing = (
        "The best β moved between the tasks: β trades reward units against nats, so a β tuned on one reward "
        "does not carry over to another."
        if moved
        else ("The best β is the same on both tasks here." if len(best_betas) > 1 else "")
    )
    return f"""<h2>3. What β does{" on two tasks" if len(tables) > 1 else ""}</h2>
<p>The same PPO at a ladder of fixed β, {steps} steps each, against a learned proxy. The rule of thumb
practitioners quote for β on a reward model's scale (folklore rather than a published table; InstructGPT ran
at 0.02, Stiennon et al. 2020 at about 0.05): 0–0.01 near-unconstrained, reward hacking likely; 0.02–0.1
standard; 0.2–0.5 conservative; 1 and above, the policy barely moves. "What the run did" is measured: hacked
(its monitor fired), barely moved (final KL under {BARELY_KL:g} nats and gold within 2 standard errors of the
reference), or moved without hacking.</p>
{_img(out_dir, "ladder.png", "final gold and KL against β for both tasks")}
{body}
<p><b>The best β</b> (highest final gold of the demo's seed): {esc("; ".join(bests))}. {closing}</p>"""


def reference_html(out_dir: Path, rows: list[dict], refs: dict[str, dict], weak_steps: Optional[int]) -> str:
    """Part 4's section; draws reference_ceiling.png. Each target's final points from the two references are
    compared in combined standard errors."""
    if "weak_reference" not in refs or not any(r.get("group") == "weak_reference" for r in rows):
        return ""
    plot_reference_ceiling(rows, refs, out_dir / "reference_ceiling.png")
    finals = {
        g: [pts[-1] for pts in runs_of([r for r in rows if r["method"] == "ppo_gt"], g).values()]
        for g in ("frontier", "weak_reference")
    }
    verdict = ""
    for a, b in zip(
        sorted(finals["frontier"], key=lambda r: r["kl_target"]),
        sorted(finals["weak_reference"], key=lambda r: r["kl_target"]),
    ):
        se = math.hypot(_se(a.get("gold_stderr")), _se(b.get("gold_stderr")))
        z = (a["gold_reward"] - b["gold_reward"]) / se if se > 0 else math.nan
        verdict += (
            f"Target {a['kl_target']:g}: {a['gold_reward']:.3f} ± {_se(a.get('gold_stderr')):.3f} at "
            f"{a['kl']:.1f} nats "
            f"from the SFT reference, {b['gold_reward']:.3f} ± {_se(b.get('gold_stderr')):.3f} at {b['kl']:.1f} nats "
            f"from the weak one ({z:+.1f} standard errors). "
        )
        if z > 2 and b["kl"] >= a["kl"] - 0.5:
            verdict += "From the weaker reference, as much KL or more bought less gold. "
        elif z <= 2:
            verdict += "The two are not separated by more than 2 standard errors here. "
    if not verdict:
        verdict = "There is no PPO-GT run from the SFT reference to compare with."
    trs = ""
    for group, label in (("frontier", "SFT reference"), ("weak_reference", "weak reference")):
        ref = refs[group]
        for run, pts in runs_of([r for r in rows if r["method"] == "ppo_gt"], group).items():
            best = max(pts, key=lambda p: p["gold_reward"])
            trs += (
                f"<tr><td>{label}</td><td>{html.escape(run)}</td><td>{_pm(ref['gold_reward'], ref.get('gold_stderr'))}"
                f"</td><td>{_pm(pts[-1]['gold_reward'], pts[-1].get('gold_stderr'))} at {pts[-1]['kl']:.1f} nats</td>"
                f"<td>{best['gold_reward']:.3f} at {best['kl']:.1f} nats</td></tr>"
            )
    return f"""<h2>4. The reference sets a ceiling</h2>
<p>The optimum of the KL-regularised objective is π* ∝ π_ref·exp(r/β): it reweights what the reference already
writes. The same PPO-GT (optimising the gold itself, same KL targets) from the SFT reference and from a weak one
(the same SFT stopped after {weak_steps} steps). {html.escape(verdict)}</p>
{_img(out_dir, "reference_ceiling.png", "PPO-GT frontier from two references")}
<table><tr><th>reference</th><th>run</th><th>reference's gold (KL 0)</th><th>final gold</th><th>best point</th></tr>
{trs}</table>"""


def diagnostics_html(out_dir: Path, diagnostics: Optional[dict]) -> str:
    """Part 5's section; draws forgetting.png and kl_noise.png (``tether.demo.diagnose``)."""
    if not diagnostics or not diagnostics.get("forgetting"):
        return ""
    from .diagnose import forgetting_spearman, plot_forgetting, plot_kl_noise

    esc = html.escape
    rows = diagnostics["forgetting"]
    plot_forgetting(rows, out_dir / "forgetting.png", source=diagnostics.get("texts_source"))
    plot_kl_noise(diagnostics["kl_noise"], out_dir / "kl_noise.png")
    trs = "".join(
        f"<tr><td>{r['beta']:g}</td><td>{_pm(r['nll_delta'], r['nll_delta_stderr'], '{:.4f}')}</td>"
        f"<td>{_pm(r['kl_ref_to_policy'], r['kl_ref_to_policy_stderr'], '{:.4f}')}</td>"
        f"<td>{_pm(r['forward_kl_on_prompts'], r['forward_kl_on_prompts_stderr'], '{:.2f}')}</td></tr>"
        for r in sorted(rows, key=lambda r: r["beta"])
    )
    rho = forgetting_spearman(rows)
    noise = ""
    for label, res in diagnostics["kl_noise"].items():
        est = res["estimators"]
        ratio = est["k1"]["stderr"] / est["exact"]["stderr"] if est["exact"]["stderr"] else float("nan")
        noise += (
            f"<tr><td>{esc(label)}</td><td>{res['samples']}</td><td>{res['response_len']:.1f}</td>"
            f"<td>{_pm(est['exact']['mean'], est['exact']['stderr'], '{:.3f}')}</td>"
            f"<td>{_pm(est['k1']['mean'], est['k1']['stderr'], '{:.3f}')}</td>"
            f"<td>{_pm(est['k3']['mean'], est['k3']['stderr'], '{:.3f}')}</td><td>{ratio:.2f}×</td></tr>"
        )
    return f"""<h2>5. Forgetting and KL noise</h2>
<p>What each ladder policy lost away from its task, on {diagnostics.get("texts")} texts the demo never trained on
({esc(str(diagnostics.get("texts_source")))}): the change of the per-token NLL against the reference and the exact
KL[π_ref‖π_θ] there, and the forward KL E_x[KL(π_ref‖π_θ)] on the evaluation prompts (sampled from the
reference; <code>tether forgetting</code>). Spearman correlation of β with the NLL change: {rho:.2f} (−1: the
smaller the β, the more the model forgot).</p>
{_img(out_dir, "forgetting.png", "forgetting against beta")}
<table><tr><th>β</th><th>NLL change (nats/token)</th><th>KL[π_ref‖π_θ] on the texts (nats/token)</th>
<th>forward KL on the prompts (nats/completion)</th></tr>{trs}</table>
<p>The KL's own noise (<code>tether kl --by_position</code>): the exact per-token KL along the completion, and
the standard error of the sequence KL of the first L tokens for k1, k3 and the exact full-vocabulary estimator.
Single-sample estimators add the sampling noise of every token, so their error grows with the completion's
length; the exact estimator sums the KL over the vocabulary at each position and keeps only the noise of the
visited states.</p>
{_img(out_dir, "kl_noise.png", "KL by position and estimator noise by length")}
<table><tr><th>policy</th><th>samples</th><th>mean length</th><th>exact ± s.e.</th><th>k1 ± s.e.</th>
<th>k3 ± s.e.</th><th>k1 s.e. / exact s.e.</th></tr>{noise}</table>"""


def _mean_se(groups: dict) -> float:
    ses = [_se(f.get("gold_stderr")) for fs in groups.values() for f in fs]
    return sum(ses) / len(ses) if ses else math.nan


def frontier_notes_html(finals: list[dict]) -> str:
    """Part 2's readings under the frontier: whether DPO's β orders its final KL (Spearman's ρ over the DPO
    runs that did not fail; −1: the larger the β, the smaller the KL, as the objective says), and the spread
    of PPO-on-proxy's final gold across training seeds at each KL target."""
    import torch

    from ..diagnostics.hacking import spearman

    esc = html.escape
    out = ""
    dpo = sorted((f for f in finals if f["method"] == "dpo" and not f.get("unstable")), key=lambda f: f["beta"])
    if len(dpo) >= 2:
        rho = spearman(torch.tensor([f["beta"] for f in dpo]), torch.tensor([f["kl"] for f in dpo]))
        kls = ", ".join(f"β = {f['beta']:g}: {f['kl']:.1f}" for f in dpo)
        says = "orders" if rho < 0 else "does not order"
        by_construction = " (with two runs ρ is ±1 by construction)" if len(dpo) == 2 else ""
        out += (
            f"<p>DPO's β {says} its final KL: Spearman ρ(β, KL) = {rho:.2f} over {len(dpo)} runs{by_construction} "
            f"({esc(kls)} nats).</p>"
        )
    ppo: dict[float, list[dict]] = {}
    for f in finals:
        if f["method"] == "ppo" and f.get("group", "frontier") == "frontier" and f.get("kl_target") is not None:
            ppo.setdefault(f["kl_target"], []).append(f)
    rows = ""
    for t, fs in sorted(ppo.items()):
        golds = [f["gold_reward"] for f in fs]
        sd = (sum((g - sum(golds) / len(golds)) ** 2 for g in golds) / (len(golds) - 1)) ** 0.5 if len(fs) > 1 else None
        each = ", ".join(f"seed {f.get('seed')}: {f['gold_reward']:.3f} at {f['kl']:.1f} nats" for f in fs)
        rows += (
            f"<tr><td>{t:g}</td><td>{len(fs)}</td><td>{sum(golds) / len(golds):.3f}</td>"
            f"<td>{'n/a' if sd is None else f'{sd:.3f}'}</td><td>{esc(each)}</td></tr>"
        )
    if rows:
        out += (
            "<p>PPO against the learned proxy, across training seeds (every seed evaluated on the same draw). "
            "Compare the spread between seeds with one evaluation's standard error (about "
            f"{_mean_se(ppo):.3f}): where the spread is larger, the run-to-run noise dominates and one seed is not "
            "a result.</p><table><tr><th>KL target</th><th>seeds</th><th>mean final gold</th><th>spread (sd)</th>"
            f"<th>each seed</th></tr>{rows}</table>"
        )
    return f"<h2>2. The frontier: readings</h2>{out}" if out else ""
