"""The demo's report: the sweep's report (``tether.sweep.report``: frontier.csv, finals.csv,
frontier.png with error bars and the Pareto front, overoptimisation.png with the Gao et al. fits, the
KL-budget table, samples side by side, report.html) plus ``beta_kl.png`` (β against the final KL).

Input: evaluation rows ``{method, run, seed, step, kl, kl_stderr, gold_reward, gold_stderr,
proxy_reward, beta, kl_target, n, ...}`` (one per evaluation point; the reference is one row with
method ``reference``), the final row of each run, and sample completions per run.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

COLOURS = {
    "reference": "#000000",
    "dpo": "#d62728",
    "ppo": "#1f77b4",
    "ppo_gt": "#2ca02c",
    "best_of_n": "#9467bd",
}
LABELS = {
    "dpo": "DPO",
    "ppo": "PPO (proxy RM)",
    "ppo_gt": "PPO-GT (gold reward)",
    "best_of_n": "best-of-n",
    "reference": "reference (SFT)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_beta_kl(finals: list[dict], path: Path) -> None:
    """β (final value for adaptive runs) against the final KL: smaller β, larger KL."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in ("dpo", "ppo", "ppo_gt"):
        pts = sorted((r["beta"], r["kl"]) for r in finals if r["method"] == method and r.get("beta"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLOURS[method], label=LABELS[method])
    ax.set_xscale("log")
    ax.set_xlabel("β (final value for the adaptive controller)")
    ax.set_ylabel("final KL[π ‖ π_ref] (nats)")
    ax.set_title("β against final KL")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


INTRO = """<p>Controlled sentiment generation as in the DPO paper (Rafailov et al. 2023, Figure 2), at laptop scale.
The reference is the real <code>stories260K</code> Llama fine-tuned on movie-review snippets. The <b>gold</b>
reward, the judgement we care about, is the VADER sentiment of the completion. The <b>proxy</b> is what RLHF
actually optimises: a reward model trained on a finite set of preference pairs (reference samples ranked by the
gold), as in Gao et al. 2022. It agrees with the gold on the kind of text it was trained on and is blind off it:
a policy free to drift finds text it scores highly and the gold does not. That gap, a learned reward from a few
hundred labelled prompts, is the realistic one; the KL penalty is what keeps the policy where the proxy is
right.</p>"""


def write_report(
    out_dir: Path,
    rows: list[dict],
    finals: list[dict],
    samples: dict[str, list[dict]],
    *,
    meta: dict,
    weak_reference: Optional[dict] = None,
    diagnostics: Optional[dict] = None,
    ladder_steps: Optional[int] = None,
) -> Path:
    """The demo's page: part 1 (hacking), the sweep report's frontier (part 2: only the frontier's runs, DPO
    runs that ended unstable left off and listed), parts 3-5 (``report_parts``), then the sweep report's
    tables."""
    from ..sweep.report import csv_columns, write_csv
    from ..sweep.report import write_report as sweep_report
    from .report_parts import (
        diagnostics_html,
        frontier_notes_html,
        hacking_html,
        ladder_html,
        ladder_table,
        reference_html,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unstable = {f["run"] for f in finals if f.get("unstable")}
    frontier_rows = [r for r in rows if r.get("group", "frontier") == "frontier" and r["run"] not in unstable]
    frontier_finals = [f for f in finals if f.get("group", "frontier") == "frontier" and f["run"] not in unstable]
    frontier_samples = {k: v for k, v in samples.items() if k in {f["run"] for f in frontier_finals}}
    plot_beta_kl(frontier_finals, out_dir / "beta_kl.png")
    ref = next(f for f in finals if f["method"] == "reference")
    ref_gold = (ref["gold_reward"], ref.get("gold_stderr") or 0.0)
    ladder = ladder_table(rows, finals, "ladder", ref_gold)
    small = ladder_table(rows, finals, "ladder_small", ref_gold)
    fraction = meta.get("small proxy fraction")
    first_task = "task 1: sentiment, the proxy from every preference pair"
    second_task = (
        f"task 2: sentiment, a proxy from {fraction:g} of the preference prompts' pairs" if fraction else "task 2"
    )
    tasks = {first_task: ladder}
    if small:
        tasks[second_task] = small
    notes = {
        first_task: "The proxy of the frontier above and of part 1.",
        second_task: "A reward model trained the same way on the pairs of a fraction of the preference prompts: a "
        "different reward on the same model, with a different scale and more blind spots (Gao et al. 2022: a proxy "
        "learned from fewer labels is overoptimised sooner). Its proxy column is that reward model's score.",
    }
    write_csv(rows, out_dir / "all_points.csv", csv_columns(rows))  # every group's evaluation points
    write_csv(
        [{"group": "ladder", **r} for r in ladder] + [{"group": "ladder_small", **r} for r in small],
        out_dir / "ladder.csv",
    )
    before = hacking_html(out_dir, rows, finals, ladder)
    if unstable:
        lines = ", ".join(
            f"{f['run']} (final training loss {f['final_loss']:.3f})" for f in finals if f["run"] in unstable
        )
        before += (
            "<p class='warn'><b>Failed runs, not drawn:</b> DPO runs whose training loss ended above ln 2 = 0.693 "
            f"(the loss at the reference, before any training): {html.escape(lines)}.</p>"
        )
    refs = {"frontier": ref, **({"weak_reference": weak_reference} if weak_reference else {})}
    after = frontier_notes_html(finals)
    after += ladder_html(out_dir, tasks, steps=ladder_steps or 0, notes=notes)
    after += reference_html(out_dir, rows, refs, meta.get("weak reference SFT steps"))
    after += diagnostics_html(out_dir, diagnostics)
    return sweep_report(
        out_dir,
        frontier_rows,
        frontier_finals,
        frontier_samples,
        meta=meta,
        title="tether demo: the case for the KL penalty, on a real tiny model",
        intro=INTRO,
        extra_figs=(("β against final KL", "beta_kl.png"),),
        sections_before=before,
        sections_after=after,
    )
