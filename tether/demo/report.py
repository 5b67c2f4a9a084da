"""The demo's report: the sweep's report (``tether.sweep.report``: frontier.csv, finals.csv,
frontier.png with error bars and the Pareto front, overoptimisation.png with the Gao et al. fits, the
KL-budget table, samples side by side, report.html) plus ``beta_kl.png`` (β against the final KL).

Input: evaluation rows ``{method, run, seed, step, kl, kl_stderr, gold_reward, gold_stderr,
proxy_reward, beta, kl_target, n, ...}`` (one per evaluation point; the reference is one row with
method ``reference``), the final row of each run, and sample completions per run.
"""

from __future__ import annotations

from pathlib import Path

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
The reference is the real <code>stories260K</code> Llama fine-tuned on movie-review snippets; the gold
reward is the VADER sentiment of the completion; the proxy is a reward model trained on preference pairs
ranked by it. Runs: DPO at several β, PPO against the proxy at adaptive KL targets, PPO-GT against the gold
reward, best-of-n by the proxy.</p>"""


def write_report(
    out_dir: Path, rows: list[dict], finals: list[dict], samples: dict[str, list[dict]], *, meta: dict
) -> Path:
    from ..sweep.report import write_report as sweep_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_beta_kl(finals, out_dir / "beta_kl.png")
    return sweep_report(
        out_dir,
        rows,
        finals,
        samples,
        meta=meta,
        title="tether demo: the reward–KL frontier on a real tiny model",
        intro=INTRO,
        extra_figs=(("β against final KL", "beta_kl.png"),),
    )
