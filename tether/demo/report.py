"""The demo's report: frontier.csv, three plots and an HTML page (DPO paper Figure 2 at small scale).

Input: evaluation rows ``{method, run, step, kl, kl_stderr, gold_reward, proxy_reward, beta, ...}``
(one per evaluation point; the reference is one row with method ``reference``), the final row of
each run, and sample completions per run. Output, in ``out_dir``: ``frontier.csv``,
``frontier.png`` (gold reward vs sequence KL, a colour per method, each run's points joined, the
reference at KL = 0), ``overoptimisation.png`` (gold and proxy reward vs sqrt(KL), Gao et al. 2022),
``beta_kl.png`` (β vs final KL), ``samples.jsonl`` and ``report.html``.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Optional

CSV_COLUMNS = ["method", "run", "step", "kl", "kl_stderr", "gold_reward", "proxy_reward", "beta", "kl_target", "n"]

COLOURS = {
    "reference": "#000000",
    "dpo": "#d62728",
    "ppo": "#1f77b4",
    "ppo_gt": "#2ca02c",
    "best_of_n": "#9467bd",
}
LABELS = {"dpo": "DPO", "ppo": "PPO (proxy RM)", "ppo_gt": "PPO-GT (gold reward)", "best_of_n": "best-of-n", "reference": "reference (SFT)"}


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") if r.get(k) is not None else "" for k in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if k in ("method", "run"):
                    row[k] = v
                elif v == "":
                    row[k] = None
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def _runs(rows: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    for pts in runs.values():
        pts.sort(key=lambda r: (r["step"] or 0))
    return runs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict], path: Path, *, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    seen = set()
    for run, pts in _runs(rows).items():
        method = pts[0]["method"]
        colour = COLOURS.get(method, "#7f7f7f")
        label = LABELS.get(method, method) if method not in seen else None
        seen.add(method)
        xs, ys = [p["kl"] for p in pts], [p["gold_reward"] for p in pts]
        if method == "reference":
            ax.scatter(xs, ys, marker="*", s=220, color=colour, zorder=5, label=label)
            continue
        if method == "best_of_n":
            ax.scatter(xs, ys, marker="D", s=40, color=colour, zorder=4, label=label)
            continue
        ax.plot(xs, ys, "-", color=colour, alpha=0.35, lw=1)
        ax.scatter(xs[:-1], ys[:-1], s=14, color=colour, alpha=0.5)
        ax.scatter(xs[-1:], ys[-1:], s=46, color=colour, edgecolor="black", lw=0.6, zorder=4, label=label)
        if pts[-1].get("tag"):
            ax.annotate(pts[-1]["tag"], (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    ax.set_xlabel("KL[π ‖ π_ref]  (nats per completion, exact estimator)")
    ax.set_ylabel("gold reward (mean VADER compound)")
    ax.set_title(title or "Reward–KL frontier (up and to the left is better)")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=-0.05 * max([r["kl"] or 0 for r in rows] + [1]))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_overoptimisation(rows: list[dict], path: Path) -> None:
    """Gold and proxy reward vs d = sqrt(KL) (Gao, Schulman & Hilton 2022): the proxy keeps rising
    while the gold reward flattens or falls."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharex=True)
    for run, pts in _runs(rows).items():
        method = pts[0]["method"]
        colour = COLOURS.get(method, "#7f7f7f")
        d = [math.sqrt(max(p["kl"] or 0.0, 0.0)) for p in pts]
        for ax, key in zip(axes, ("gold_reward", "proxy_reward")):
            ys = [p.get(key) for p in pts]
            if any(y is None for y in ys):
                continue
            style = "*" if method == "reference" else ("D" if method == "best_of_n" else "o-")
            ax.plot(d, ys, style, color=colour, alpha=0.7, ms=4 if style == "o-" else 8)
    for ax, name in zip(axes, ("gold reward (VADER)", "proxy reward (learned RM)")):
        ax.set_xlabel("sqrt(KL)  (nats^½)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="-", label=LABELS.get(m, m)) for m, c in COLOURS.items()
               if any(r["method"] == m for r in rows)]
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle("Overoptimisation: proxy vs gold reward as the policy moves away from the reference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def matched_samples(finals: list[dict], samples: dict[str, list[dict]], *, k: int = 4) -> tuple[Optional[float], list[tuple]]:
    """For each method, the run whose final KL is closest to a common KL (the median of the
    methods' final KLs), with up to k of its samples; the reference first."""
    by_method: dict[str, list[dict]] = {}
    for r in finals:
        if r["method"] != "reference":
            by_method.setdefault(r["method"], []).append(r)
    if not by_method:
        return None, []
    kls = sorted(r["kl"] for rs in by_method.values() for r in rs if r["kl"] is not None)
    target = kls[len(kls) // 2] if kls else None
    chosen = []
    ref_run = next((r["run"] for r in finals if r["method"] == "reference"), None)
    if ref_run and ref_run in samples:
        chosen.append(("reference", ref_run, 0.0, samples[ref_run][:k]))
    for method, rs in by_method.items():
        best = min(rs, key=lambda r: abs((r["kl"] or 0) - (target or 0)))
        chosen.append((method, best["run"], best["kl"], samples.get(best["run"], [])[:k]))
    return target, chosen


def write_html(out_dir: Path, finals: list[dict], samples: dict[str, list[dict]], *, meta: dict) -> Path:
    esc = html.escape
    target, chosen = matched_samples(finals, samples)
    rows_html = "".join(
        "<tr>" + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in ("method", "run", "step", "kl", "kl_stderr", "gold_reward", "proxy_reward", "beta")) + "</tr>"
        for r in sorted(finals, key=lambda r: (r["method"] != "reference", r["method"], r["kl"] or 0))
    )
    sample_html = ""
    for method, run, kl, items in chosen:
        lis = "".join(
            f"<li><span class='p'>{esc(s.get('prompt', ''))}</span>{esc(s.get('completion', ''))} "
            f"<span class='score'>gold {s.get('gold', float('nan')):+.2f}</span></li>" for s in items
        )
        sample_html += f"<h3 style='color:{COLOURS.get(method, '#333')}'>{esc(LABELS.get(method, method))} — {esc(run)} (KL {kl:.2f})</h3><ul>{lis}</ul>"
    meta_html = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tether demo: reward–KL frontier</title>
<style>
body {{ font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
td:nth-child(-n+2) {{ text-align: left; }} th {{ background: #f3f3f3; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .p {{ color: #888; }} .score {{ color: #555; font-size: 12px; margin-left: 6px; }}
ul {{ font-family: Georgia, serif; }} .figs {{ display: flex; gap: 12px; flex-wrap: wrap; }} .figs img {{ max-width: 540px; }}
</style></head><body>
<h1>The reward–KL frontier, on a real tiny model</h1>
<p>Controlled sentiment generation as in the DPO paper (Rafailov et al. 2023, Figure 2), at laptop scale.
The reference is the real <code>stories260K</code> Llama fine-tuned on movie-review snippets; the gold
reward is the VADER sentiment of the completion. Each point is one evaluation on held-out prompts:
x = mean sequence KL[π‖π_ref] (exact estimator), y = mean gold reward. Up and to the left is better:
more reward for the same departure from the reference.</p>
<h2>Frontier</h2><img src="frontier.png" alt="frontier plot">
<div class="figs"><div><h2>Overoptimisation</h2><img src="overoptimisation.png" alt="overoptimisation plot"></div>
<div><h2>β against final KL</h2><img src="beta_kl.png" alt="beta vs KL plot"></div></div>
<h2>Every run's final numbers</h2>
<table><tr><th>method</th><th>run</th><th>step</th><th>KL</th><th>KL stderr</th><th>gold</th><th>proxy</th><th>β</th></tr>{rows_html}</table>
<h2>Samples at a matched KL{f" (≈ {target:.2f} nats)" if target is not None else ""}</h2>{sample_html}
<h2>Run settings</h2><ul>{meta_html}</ul>
<p>Data behind the plots: <a href="frontier.csv">frontier.csv</a>, <a href="finals.csv">finals.csv</a>, <a href="samples.jsonl">samples.jsonl</a>.</p>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def write_report(out_dir: Path, rows: list[dict], finals: list[dict], samples: dict[str, list[dict]], *, meta: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "frontier.csv")
    write_csv(finals, out_dir / "finals.csv")
    with open(out_dir / "samples.jsonl", "w") as f:
        for run, items in samples.items():
            for s in items:
                f.write(json.dumps({"run": run, **s}) + "\n")
    plot_frontier(rows, out_dir / "frontier.png")
    plot_overoptimisation(rows, out_dir / "overoptimisation.png")
    plot_beta_kl(finals, out_dir / "beta_kl.png")
    return write_html(out_dir, finals, samples, meta=meta)
