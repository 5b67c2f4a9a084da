"""The sweep's report: frontier.csv, frontier.png, overoptimisation.png and report.html.

Input: evaluation rows ``{method, run, seed, step, kl, kl_stderr, gold_reward, gold_stderr,
proxy_reward, proxy_stderr, beta, <swept fields>}`` (the reference is one row with method
``reference``), the final row of each run, and each run's final samples. What the page shows:

- the frontier: reward against the exact sequence KL, each run's path, its final point with error
  bars (KL stderr and reward stderr over evaluation samples), the mean over seeds of each setting
  with the spread across seeds (sample std; "n/a" with one seed), and the Pareto front of the final points;
- overoptimisation: the reward gain over the reference against d = √KL with the Gao et al. fits
  (``tether.diagnostics.hacking.fit_gao``; docs/theory.md §8), the proxy beside it; a fit on too few
  points, with coefficients of the wrong sign or a poor R² is flagged in the table and not drawn
  (``fit_problems``);
- for each KL budget X, the setting the data recommend: the best mean reward within X, named only when it
  exceeds every other setting within X (the reference included) by more than ``SEPARATION_Z`` combined
  standard errors; otherwise the page says which settings cannot be told apart (``budget_table``,
  ``budget_advice``). The reference (KL 0) is the baseline, never a recommended β. And the smallest β within X;
- completions side by side at a matched KL: for each setting the evaluation point (any step) nearest
  the smallest final KL, so every column is as far from the reference (same prompts and sampling
  seed in every run). Rows may carry their ``samples``; else a run's final samples are used.

Where no gold reward was given, the proxy stands in (``y_key``) and the page says so. The page embeds its
figures (base64 data URIs), so it can be moved or mailed alone; the PNG files are written beside it too.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import statistics
from pathlib import Path
from typing import Optional

BASE_COLUMNS = [
    "method",
    "run",
    "seed",
    "step",
    "kl",
    "kl_stderr",
    "gold_reward",
    "gold_stderr",
    "proxy_reward",
    "proxy_stderr",
    "beta",
]
TEXT_COLUMNS = {"method", "run"}
REFERENCE = "reference"
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
SETTING_SKIP = {"seed", "name"}
BON_METHODS = ("bon", "best_of_n")  # sampled, not trained: Gao et al.'s best-of-n form
SEPARATION_Z = 2.0
"""A setting is recommended within a KL budget only when its mean reward exceeds every other setting's there
by more than SEPARATION_Z·sqrt(se₁² + se₂²) (two combined standard errors: a two-sided ≈ 95% test for the
difference of two independent normal means)."""
MIN_FIT_POINTS = 5
"""A Gao fit needs at least this many distinct non-zero KLs: its 2 coefficients leave 3 degrees of freedom
to check the form against."""
MIN_FIT_R2 = 0.5
"""A Gao fit explaining less than this share of the reward gain's variance is flagged as poor."""


def csv_columns(rows: list[dict]) -> list[str]:
    """The base columns, then every other scalar column (swept fields, other rewards) in first-seen order."""
    cols = list(BASE_COLUMNS)
    for r in rows:
        for k, v in r.items():
            if k not in cols and k != "samples" and (v is None or isinstance(v, (int, float, str))):
                cols.append(k)
    return cols


def write_csv(rows: list[dict], path: Path, columns: Optional[list[str]] = None) -> None:
    cols = columns or csv_columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})


def read_csv(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if k in TEXT_COLUMNS or v == "":
                    row[k] = v if k in TEXT_COLUMNS else None
                else:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out


def y_key(rows: list[dict]) -> str:
    """gold_reward if any row has it, else proxy_reward (the proxy stands in)."""
    return "gold_reward" if any(r.get("gold_reward") is not None for r in rows) else "proxy_reward"


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def setting_of(row: dict, swept: list[str]) -> str:
    """The run's setting: its swept fields other than the seed (runs differing only in seed share it). A row
    that names its own ``swept`` fields is set by those alone: an adaptive run's final β, logged as ``beta``,
    is an outcome that differs between seeds, not a setting, even where another method sweeps β."""
    if row["method"] == REFERENCE:
        return REFERENCE
    own = row.get("swept")
    keys = [k for k in swept if k in row and (not own or k in own)]
    parts = [f"{k}={row[k]:g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in keys]
    return f"{row['method']} " + (", ".join(parts) if parts else row["run"])


def swept_fields(finals: list[dict]) -> list[str]:
    keys = []
    for r in finals:
        for k in r.get("swept", []) or []:
            if k not in keys and k not in SETTING_SKIP:
                keys.append(k)
    return keys


def settings(finals: list[dict], ykey: str, swept: list[str]) -> list[dict]:
    """Per setting: the mean over seeds of the final KL and reward, the spread across seeds (sample
    standard deviation, n − 1; None with one seed: it has no spread), and ``y_se``, the standard error of
    the mean reward: the larger of the evaluation error sqrt(Σ seᵢ²)/n (each run's reward stderr over its
    evaluation prompts) and, with two or more seeds, the across-seed error sd/√n (None when neither is known)."""
    skey = ykey.replace("_reward", "_stderr")
    groups: dict[str, list[dict]] = {}
    for r in finals:
        groups.setdefault(setting_of(r, swept), []).append(r)
    out = []
    for name, rs in groups.items():
        kls = [x for x in (_num(r.get("kl")) for r in rs) if x is not None]
        ys = [x for x in (_num(r.get(ykey)) for r in rs) if x is not None]
        if not kls or not ys:
            continue
        ses = [_num(r.get(skey)) for r in rs]
        eval_se = math.sqrt(sum(x * x for x in ses)) / len(ses) if ses and None not in ses else None
        seed_se = statistics.stdev(ys) / math.sqrt(len(ys)) if len(ys) > 1 else None
        known = [x for x in (eval_se, seed_se) if x is not None]
        out.append(
            {
                "setting": name,
                "method": rs[0]["method"],
                "runs": [r["run"] for r in rs],
                "n": len(rs),
                "kl": statistics.fmean(kls),
                "kl_seed_sd": statistics.stdev(kls) if len(kls) > 1 else None,
                "y": statistics.fmean(ys),
                "y_seed_sd": statistics.stdev(ys) if len(ys) > 1 else None,
                "y_se": max(known) if known else None,
                "beta": _num(rs[0].get("beta_set", rs[0].get("beta"))),
            }
        )
    return out


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (kl, reward, name) no other point beats on both (no more KL and at least as much
    reward, one strictly), in increasing KL."""
    front, best = [], -math.inf
    for kl, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((kl, y, name))
            best = y
    return front


def separated(a: dict, b: dict, z: float = SEPARATION_Z) -> bool:
    """Whether setting ``a``'s mean reward exceeds ``b``'s by more than z·sqrt(se_a² + se_b²); False when
    either standard error is unknown (the data cannot tell)."""
    if a["y_se"] is None or b["y_se"] is None:
        return False
    return a["y"] - b["y"] > z * math.sqrt(a["y_se"] ** 2 + b["y_se"] ** 2)


def budget_table(sets: list[dict], budgets: list[float], z: float = SEPARATION_Z) -> list[dict]:
    """For each KL budget X, over the settings whose mean final KL is ≤ X (the reference among them):

    - ``best``: the highest mean reward (may be the reference);
    - ``tied``: the others ``best`` does not beat by more than z combined standard errors (``separated``);
    - ``recommended``: ``best`` when it is a trained setting and ``tied`` is empty, else None (the data do
      not single one out; the reference is the baseline, never a recommended setting);
    - ``min_beta``: the smallest fixed β among the trained settings within X."""
    out = []
    for X in budgets:
        within = sorted((s for s in sets if s["kl"] <= X), key=lambda s: -s["y"])
        best = within[0] if within else None
        tied = [s for s in within[1:] if not separated(best, s, z)]
        trained = best is not None and best["method"] != REFERENCE
        betas = [s["beta"] for s in within if s["beta"] is not None and s["method"] != REFERENCE]
        out.append(
            {
                "budget": X,
                "best": best,
                "within": within,
                "tied": tied,
                "recommended": best if trained and not tied else None,
                "min_beta": min(betas) if betas else None,
            }
        )
    return out


def _with_se(s: dict, ylab: str) -> str:
    se = f" ± {s['y_se']:.2g}" if s["y_se"] is not None else " (standard error unknown)"
    return f"{s['setting']} ({ylab} {s['y']:.3g}{se}, KL {s['kl']:.3g})"


def budget_advice(b: dict, ylab: str = "gold", z: float = SEPARATION_Z) -> str:
    """The budget table's verdict for one row of ``budget_table``, in words."""
    best, tied, within = b["best"], b["tied"], b["within"]
    if best is None:
        return "nothing fits: every setting's mean final KL is above this budget"
    rule = f"more than {z:g} combined standard errors"
    if len(within) == 1:
        if best["method"] == REFERENCE:
            return "only the reference (KL 0, the baseline) is within this budget: no trained setting fits"
        return f"{_with_se(best, ylab)} is the only setting within this budget (nothing to compare it with)"
    if b["recommended"] is not None:
        return f"{_with_se(best, ylab)}: its mean beats every other setting within the budget by {rule}"
    if best["method"] == REFERENCE and not tied:
        return (
            f"no trained setting within the budget matches the reference ({ylab} {best['y']:.3g}): every one is "
            f"lower by {rule}; stay at the reference or widen the budget"
        )
    others = ", ".join(_with_se(s, ylab) for s in tied)
    name = "the reference (the baseline, KL 0)" if best["method"] == REFERENCE else best["setting"]
    return (
        f"no setting within the budget is distinguishable from {name} at the measured noise: "
        f"{_with_se(best, ylab)} against {others} (a recommendation needs a lead of {rule}); "
        "more evaluation prompts or seeds would narrow the errors"
    )


def default_budgets(sets: list[dict]) -> list[float]:
    """Round budgets between the smallest and largest mean final KL of the trained settings."""
    kls = sorted(s["kl"] for s in sets if s["method"] != REFERENCE)
    if not kls:
        return []
    nice = [0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500]
    pick = [x for x in nice if kls[0] <= x <= kls[-1]]
    above = next((x for x in nice if x >= kls[-1]), None)
    if above is not None and above not in pick:
        pick.append(above)
    return [float(x) for x in pick[-5:]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(sets: list[dict]) -> dict[str, str]:
    """One colour per setting: the palette while it lasts, else evenly spaced along a colour map (a cycled
    palette would give two settings of an 18-run sweep the same colour)."""
    names = [s["setting"] for s in sets if s["method"] != REFERENCE]
    if len(names) <= len(PALETTE):
        return {REFERENCE: "#000000", **{n: PALETTE[i] for i, n in enumerate(names)}}
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["turbo"]
    return {REFERENCE: "#000000", **{n: to_hex(cmap(0.05 + 0.9 * i / (len(names) - 1))) for i, n in enumerate(names)}}


def _label(setting: str) -> str:
    """A setting for a legend: its numbers to 3 significant digits (an adaptive run's final β has 6)."""
    return re.sub(r"=(-?[0-9][0-9.]*(?:e[-+]?[0-9]+)?)", lambda m: f"={float(m.group(1)):.3g}", setting)


def _by_run(rows: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    for pts in runs.values():
        pts.sort(key=lambda r: r.get("step") or 0)
    return runs


def plot_frontier(rows, finals, sets, path: Path, *, ykey: str, swept: list[str]) -> list:
    plt = _plt()
    colours = _colours(sets)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for run, pts in _by_run(rows).items():
        c = colours.get(setting_of(pts[-1], swept), "#7f7f7f")
        xs, ys = [p["kl"] for p in pts], [p.get(ykey) for p in pts]
        if None in ys:
            continue
        if len(pts) > 1:
            ax.plot(xs, ys, "-", color=c, alpha=0.3, lw=1)
            ax.scatter(xs[:-1], ys[:-1], s=10, color=c, alpha=0.4)
        last = pts[-1]
        ax.errorbar(
            [last["kl"]],
            [last[ykey]],
            xerr=[_num(last.get("kl_stderr")) or 0],
            yerr=[_num(last.get(ykey.replace("_reward", "_stderr"))) or 0],
            fmt="*" if last["method"] == REFERENCE else "o",
            ms=14 if last["method"] == REFERENCE else 5,
            color=c,
            elinewidth=0.8,
            capsize=2,
            alpha=0.8,
            zorder=4,
        )
    for s in sets:  # the mean over seeds, with the spread across seeds (one seed: its run's point is it)
        if s["method"] == REFERENCE:
            continue
        if s["n"] == 1:
            ax.scatter(
                [s["kl"]],
                [s["y"]],
                s=30,
                marker="D" if s["method"] in BON_METHODS else "o",
                color=colours[s["setting"]],
                zorder=5,
                label=_label(s["setting"]),
            )
            continue
        ax.errorbar(
            [s["kl"]],
            [s["y"]],
            xerr=[s["kl_seed_sd"] or 0.0],  # None: fewer than two runs had the number
            yerr=[s["y_seed_sd"] or 0.0],
            fmt="s",
            ms=8,
            mfc="none",
            mec=colours[s["setting"]],
            color=colours[s["setting"]],
            elinewidth=2,
            capsize=4,
            zorder=5,
            label=f"{_label(s['setting'])} (mean of {s['n']} seed{'s' if s['n'] > 1 else ''})",
        )
    pts = [
        (r["kl"], r[ykey], r["run"]) for r in finals if _num(r.get("kl")) is not None and _num(r.get(ykey)) is not None
    ]
    front = pareto_front(pts)
    if front:
        ax.plot(
            [p[0] for p in front],
            [p[1] for p in front],
            "-",
            color="gold",
            lw=5,
            alpha=0.45,
            zorder=2,
            label="Pareto front (final points)",
        )
        ax.scatter(
            [p[0] for p in front], [p[1] for p in front], s=140, facecolor="none", edgecolor="goldenrod", lw=2, zorder=6
        )
    ax.set_xlabel("KL[π ‖ π_ref]  (nats per completion, exact estimator)")
    ax.set_ylabel(ykey.replace("_", " ") + ("" if ykey == "gold_reward" else "  (no gold reward: the proxy stands in)"))
    ax.set_title("Reward–KL frontier (up and to the left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return front


def gao_fits(rows: list[dict], *, ykey: str) -> dict[str, dict]:
    """Per method, ``fit_gao`` on every evaluation point of its runs: the reward gain over the
    reference against the KL (best-of-n: the "bon" form; trained policies: the "rl" form)."""
    from ..diagnostics.hacking import fit_gao

    ref = next((r for r in rows if r["method"] == REFERENCE), None)
    base = _num(ref.get(ykey)) if ref else None
    if base is None:
        return {}
    fits = {}
    for method in sorted({r["method"] for r in rows} - {REFERENCE}):
        pts = [
            (r["kl"], r[ykey] - base)
            for r in rows
            if r["method"] == method and _num(r.get("kl")) is not None and _num(r.get(ykey)) is not None
        ]
        try:
            fit = fit_gao(
                [max(p[0], 0.0) for p in pts], [p[1] for p in pts], kind="bon" if method in BON_METHODS else "rl"
            )
        except ValueError:  # too few distinct KLs to fix both coefficients: no curve for this method
            continue
        d_max = max(math.sqrt(max(p[0], 0.0)) for p in pts)  # the fit is drawn over its data's range only
        gains = [p[1] for p in pts]
        mean = statistics.fmean(gains)
        ss_tot = sum((g - mean) ** 2 for g in gains)
        r2 = 1 - fit.rmse**2 * len(pts) / ss_tot if ss_tot > 0 else None  # rmse² · n: the residual sum of squares
        distinct = len({p[0] for p in pts if p[0] > 0})
        fits[method] = {k: fit[k] for k in fit.keys()} | {
            "n": len(pts),
            "distinct": distinct,
            "r2": r2,
            "fit": fit,
            "d_max": d_max,
        }
        fits[method]["problems"] = fit_problems(fits[method])
    return fits


def fit_problems(f: dict) -> list[str]:
    """Why a Gao fit (``gao_fits``'s entry) should not be read as the shape of the data (empty: none):
    fewer than ``MIN_FIT_POINTS`` distinct non-zero KLs; α ≤ 0 (Gao et al.'s fits rise from the
    reference: the gain's scale is α); β_g < 0 (curving upwards: the form's overoptimisation turn has the
    wrong sign, no peak); R² below ``MIN_FIT_R2`` (or undefined: every gain equal)."""
    out = []
    if f["distinct"] < MIN_FIT_POINTS:
        out.append(f"too few points: {f['distinct']} distinct KL > 0 for 2 coefficients (needs {MIN_FIT_POINTS})")
    if f["alpha"] <= 0:
        out.append(f"α = {f['alpha']:.3g} ≤ 0: wrong sign (the fitted gain does not rise from the reference)")
    if f["beta"] < 0:
        out.append(f"β_g = {f['beta']:.3g} < 0: wrong sign (curves upwards, no overoptimisation peak)")
    if f["r2"] is None:
        out.append("R² undefined: every reward gain is the same")
    elif f["r2"] < MIN_FIT_R2:
        out.append(f"poor fit: R² = {f['r2']:.2f} < {MIN_FIT_R2:g}")
    return out


def fit_curve(fit: dict, points: int = 100) -> tuple[list[float], list[float]]:
    """The points a Gao fit (``gao_fits``'s entry) is drawn through: d = √KL over (0, its data's largest d],
    never past it (the forms are fitted, not known, beyond the data), and the predicted gain at each."""
    xs = [fit["d_max"] * j / points for j in range(1, points + 1)]
    return xs, [fit["fit"].predict(x * x) for x in xs]


def plot_overoptimisation(rows, sets, fits, path: Path, *, ykey: str, swept: list[str]) -> None:
    plt = _plt()
    colours = _colours(sets)
    ref = next((r for r in rows if r["method"] == REFERENCE), {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharex=True)
    keys = [(ykey, f"{ykey.replace('_', ' ')} gain over the reference"), ("proxy_reward", "proxy reward gain")]
    for run, pts in _by_run(rows).items():
        c = colours.get(setting_of(pts[-1], swept), "#7f7f7f")
        d = [math.sqrt(max(p["kl"] or 0.0, 0.0)) for p in pts]
        for ax, (key, _) in zip(axes, keys):
            b = _num(ref.get(key))
            ys = [_num(p.get(key)) for p in pts]
            if b is None or None in ys:
                continue
            ax.plot(
                d,
                [y - b for y in ys],
                "D" if pts[-1]["method"] in BON_METHODS else ("o-" if len(pts) > 1 else "*"),
                color=c,
                alpha=0.7,
                ms=4,
            )
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    valid = {m: f for m, f in fits.items() if not f["problems"]}
    for i, (method, fit) in enumerate(valid.items()):  # each over [0, its own data's largest d]: no extrapolation
        xs, ys = fit_curve(fit)
        lab = (
            f"Gao fit, {method} ({fit['kind']}): fit α={fit['alpha']:.3g}, fit β_g={fit['beta']:.3g}, "
            f"peak KL={fit['peak_kl']:.3g}, R²={fit['r2']:.2f}"
        )
        axes[0].plot(xs, ys, linestyle=styles[i % len(styles)], color="#444", lw=1.2, label=lab)
    flagged = [m for m in fits if m not in valid]
    if flagged:  # said on the figure too, so the picture alone does not suggest a fit was not attempted
        axes[0].set_title(
            "Gao fit not drawn (flagged in the report's table): " + ", ".join(flagged), fontsize=8, color="#a00"
        )
    for ax, (_, name) in zip(axes, keys):
        ax.axhline(0, color="#000", lw=0.6)
        ax.set_xlabel("d = sqrt(KL)  (nats^½)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if valid:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Overoptimisation (Gao et al. 2022): reward gain against the distance from the reference")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def matched_points(rows: list[dict], sets: list[dict], *, k: int = 3) -> tuple[Optional[float], list[dict]]:
    """Evaluation points of up to ``k`` settings at a common KL: the target is the smallest mean final
    KL of the trained settings (every run's path passes near it), and each setting contributes the
    point (any run, any step) closest to it, the reference first."""
    ref = [r for r in rows if r["method"] == REFERENCE][:1]
    trained = [s for s in sets if s["method"] != REFERENCE]
    if not trained:
        return None, ref
    target = min(s["kl"] for s in trained)
    picks = []
    for s in trained:
        pts = [r for r in rows if r["run"] in s["runs"] and _num(r.get("kl")) is not None]
        if pts:
            picks.append(min(pts, key=lambda r: (abs(r["kl"] - target), -(r.get("step") or 0))))
    picks = sorted(picks, key=lambda r: abs(r["kl"] - target))[:k]
    return target, ref + sorted(picks, key=lambda r: r["kl"])


def spread(sd: Optional[float], n: int) -> str:
    """A spread across seeds for the page: "n/a" with one seed (it has none), else 2 significant digits."""
    if n < 2:
        return "n/a (one seed)"
    return "n/a" if sd is None else f"{sd:.2g}"


def data_uri(path: Path) -> str:
    """A PNG as a ``data:`` URI, so the page shows it wherever the page goes."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _img(out_dir: Path, name: str, alt: str) -> str:
    """An <img> of ``out_dir/name`` embedded in the page (a missing file keeps the link, and says so by
    failing to load)."""
    f = out_dir / name
    src = data_uri(f) if f.is_file() else name
    return f"<img src='{html.escape(src)}' alt='{html.escape(alt)}' data-file='{html.escape(name)}'>"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def write_html(
    out_dir: Path,
    rows,
    finals,
    sets,
    samples,
    budgets,
    fits,
    *,
    ykey: str,
    swept: list[str],
    meta: dict,
    title: str = "tether sweep: the reward–KL frontier",
    intro: str = "",
    extra_figs: tuple = (),
    sections_before: str = "",
    sections_after: str = "",
) -> Path:
    """The page. ``sections_before`` (HTML) goes before the frontier, ``sections_after`` after the frontier's
    figures (the demo's own parts)."""
    esc = html.escape
    ylab = "gold" if ykey == "gold_reward" else "proxy (stands in for gold)"
    skey = ykey.replace("_reward", "_stderr")
    cols = [
        "method",
        "run",
        "seed",
        "step",
        *[k for k in swept if k not in ("seed",)],
        "beta",
        "kl",
        "kl_stderr",
        ykey,
        skey,
    ]
    cols = list(dict.fromkeys(cols + (["proxy_reward"] if ykey != "proxy_reward" else [])))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join(
        f"<tr class='{'ref-row' if r['method'] == REFERENCE else 'run-row'}'>"
        + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in cols)
        + "</tr>"
        for r in sorted(finals, key=lambda r: (r["method"] != REFERENCE, r["kl"] or 0))
    )
    set_rows = "".join(
        f"<tr><td>{esc(s['setting'])}</td><td>{s['n']}</td><td>{s['kl']:.3g}</td>"
        f"<td>{esc(spread(s['kl_seed_sd'], s['n']))}</td><td>{s['y']:.3g}</td>"
        f"<td>{esc(spread(s['y_seed_sd'], s['n']))}</td>"
        f"<td>{esc(f'{s_se:.2g}' if (s_se := s['y_se']) is not None else 'unknown')}</td></tr>"
        for s in sorted(sets, key=lambda s: s["kl"])
    )
    one_seed = [s for s in sets if s["n"] < 2]
    seed_note = (
        ""
        if not one_seed
        else (
            "Every setting here has one seed: its spread across seeds is n/a (one run has none), so the "
            "errors below are the evaluation's only; two or more seeds measure the run-to-run noise."
            if len(one_seed) == len(sets)
            else f"{len(one_seed)} setting(s) have one seed: their spread across seeds is n/a."
        )
    )
    bud_rows = ""
    for b in budgets:
        rec = b["recommended"]
        what = f"<b>{esc(rec['setting'])}</b>" if rec is not None else "none singled out"
        cls = "" if rec is not None else " class='warn'"
        beta = _fmt(b["min_beta"]) if b["min_beta"] is not None else "—"
        bud_rows += (
            f"<tr><td>{b['budget']:g}</td><td{cls}>{what}</td><td class='advice'>{esc(budget_advice(b, ylab))}</td>"
            f"<td>{esc(beta)}</td></tr>"
        )

    def fit_row(m: str, f: dict) -> str:
        r2 = f"{f['r2']:.2f}" if f["r2"] is not None else "undefined"
        peak = f"{f['peak_kl']:.4g}" if math.isfinite(f["peak_kl"]) else "none (never turns down)"
        verdict = "drawn" if not f["problems"] else "not drawn: " + "; ".join(f["problems"])
        return (
            f"<tr class='{'fit-ok' if not f['problems'] else 'fit-bad warn'}'><td>{esc(m)}</td><td>{f['kind']}</td>"
            f"<td>{f['alpha']:.4g}</td><td>{f['beta']:.4g}</td><td>{peak}</td><td>{r2}</td>"
            f"<td>{f['distinct']} ({f['n']})</td><td>{esc(verdict)}</td></tr>"
        )

    fit_rows = "".join(fit_row(m, f) for m, f in fits.items())
    target, picks = matched_points(rows, sets)
    side = ""
    if picks:
        lists = [r.get("samples") or samples.get(r["run"], []) for r in picks]
        depth = min((len(x) for x in lists), default=0)
        hdr = "".join(
            f"<th>{esc(r['run'])}<br><small>step {_fmt(r.get('step'))}, KL {r['kl']:.2f}</small></th>" for r in picks
        )
        trs = ""
        for i in range(min(depth, 6)):
            p = lists[0][i].get("prompt", "")
            cells = "".join(
                f"<td>{esc(x[i].get('completion', ''))}<br><small>{ylab.split()[0]} "
                f"{_fmt(x[i].get('gold' if ykey == 'gold_reward' else 'proxy'))}</small></td>"
                for x in lists
            )
            trs += f"<tr><td class='p'>{esc(p)}</td>{cells}</tr>"
        side = f"<table class='side'><tr><th>prompt</th>{hdr}</tr>{trs}</table>"
    proxy_note = (
        ""
        if ykey == "gold_reward"
        else "<p class='warn'><b>No gold reward was given: the proxy reward stands in for it "
        "on every plot and table.</b> "
        "A frontier measured with the reward being optimised cannot show overoptimisation.</p>"
    )
    meta_html = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items())
    figs = "".join(f"<div><h2>{esc(t)}</h2>{_img(out_dir, f, t)}</div>" for t, f in extra_figs)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto; \
color: #222; line-height: 1.45; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }} td, th {{ border: 1px solid #ddd; padding: \
3px 8px; text-align: right; vertical-align: top; }}
td:nth-child(-n+2) {{ text-align: left; }} th {{ background: #f3f3f3; }} .side td {{ text-align: left; font-family: \
Georgia, serif; max-width: 260px; }}
img {{ max-width: 100%; border: 1px solid #eee; }} .p {{ color: #888; }} .warn {{ background: #fff3cd; padding: 6px \
10px; }} td.advice {{ text-align: left; max-width: 520px; }}
.figs {{ display: flex; gap: 12px; flex-wrap: wrap; }}
</style>
<script>/* for headless checks (tests/test_sweep.py): how many images decoded */
window.addEventListener("load", () => {{ document.body.dataset.imagesLoaded = [...document.images].filter(i => \
i.complete && i.naturalWidth > 0).length;
document.body.dataset.images = document.images.length; }});</script></head><body>
<h1>{esc(title)}</h1>
{intro}
<p>Every run is evaluated with one protocol: the same held-out prompts, the same sampling seed, the exact
sequence KL[π‖π_ref] with its standard error, and the mean {ylab} reward with its standard error over the
evaluation samples. Up and to the left is better.</p>
{proxy_note}
{sections_before}
<h2>Frontier</h2>{_img(out_dir, "frontier.png", "frontier plot")}
<p>Small markers: each run's final point with error bars of one standard error (KL and reward, over evaluation
samples). Hollow squares: the mean over seeds of a setting, error bars one standard deviation across seeds
(a setting with one seed has no spread across seeds: n/a, its dot is its run's point). {seed_note}
Gold band: the Pareto front of the final points. (Also saved beside this page as frontier.png.)</p>
<h2>Overoptimisation</h2>{_img(out_dir, "overoptimisation.png", "overoptimisation plot")}
<table><tr><th>method</th><th>form</th><th>fit α</th><th>fit β_g (Gao curvature, not the KL β)</th>\
<th>fitted peak KL</th><th>R²</th><th>distinct KL &gt; 0 (points)</th><th>fit check</th></tr>{fit_rows}</table>
<p>Gao, Schulman &amp; Hilton (2022) forms, fitted by least squares to the reward gain over the reference against
d = √KL: RL d(α − β_g log d), best-of-n d(α − β_g d) (docs/theory.md §8); β_g is the fit's curvature, unrelated
to the KL coefficient β. A fit is drawn only when it has at least {MIN_FIT_POINTS} distinct KL &gt; 0 for its 2
coefficients, α &gt; 0, β_g ≥ 0 and R² ≥ {MIN_FIT_R2:g}; a flagged fit is listed with its reasons and not drawn.</p>
<div class="figs">{figs}</div>
{sections_after}
<h2>Choosing β: the best setting within a KL budget</h2>
<table><tr><th>KL budget (nats)</th><th>recommended setting</th><th>what the data say (mean ± standard error)</th>\
<th>smallest β within the budget</th></tr>{bud_rows}</table>
<p>A setting is recommended for a budget only when its mean final {ylab} reward (over seeds) exceeds that of every
other setting within the budget, the reference included, by more than {SEPARATION_Z:g}·sqrt(se₁² + se₂²)
(standard errors of the means: the larger of the evaluation error and, with several seeds, the across-seed
error). The reference (KL 0) is the baseline every setting is compared with, never a recommended β.</p>
<h2>Settings (mean and spread across seeds)</h2>
<table><tr><th>setting</th><th>seeds</th><th>final KL</th><th>KL spread across seeds</th><th>final {ylab}</th>\
<th>{ylab} spread across seeds</th><th>standard error of the mean</th></tr>{set_rows}</table>
<p>Spread: one standard deviation across seeds; n/a with one seed (one run has no spread).</p>
<h2>Every run's final numbers</h2>
<table id="runs"><tr>{head}</tr>{body}</table>
<h2>Samples at a matched KL, side by side{f" (≈ {target:.2f} nats)" if target is not None else ""}</h2>{side}
<h2>Settings of this sweep</h2><ul>{meta_html}</ul>
<p>Data: <a href="frontier.csv">frontier.csv</a> (every evaluation point), <a href="finals.csv">finals.csv</a>, <a \
href="samples.jsonl">samples.jsonl</a>.</p>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def write_report(
    out_dir: Path,
    rows: list[dict],
    finals: list[dict],
    samples: dict,
    *,
    meta: dict,
    kl_budgets: Optional[list] = None,
    **page,
) -> Path:
    """Write every file of the report into ``out_dir``; returns the path of report.html. ``rows`` may
    keep each point's ``samples`` (for the side-by-side table); the CSVs leave them out."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    swept = []
    for r in rows:
        for k in r.get("swept", []) or []:
            if k not in swept:
                swept.append(k)
    cols = csv_columns(rows)
    write_csv(rows, out_dir / "frontier.csv", cols)
    write_csv(finals, out_dir / "finals.csv", cols)
    with open(out_dir / "samples.jsonl", "w") as f:
        for run, items in samples.items():
            for s in items:
                f.write(json.dumps({"run": run, **s}) + "\n")
    ykey = y_key(rows)
    swept = [k for k in swept if k not in SETTING_SKIP]
    sets = settings(finals, ykey, swept)
    plot_frontier(rows, finals, sets, out_dir / "frontier.png", ykey=ykey, swept=swept)
    fits = gao_fits(rows, ykey=ykey)
    plot_overoptimisation(rows, sets, fits, out_dir / "overoptimisation.png", ykey=ykey, swept=swept)
    budgets = budget_table(sets, [float(b) for b in (kl_budgets or default_budgets(sets))])
    return write_html(out_dir, rows, finals, sets, samples, budgets, fits, ykey=ykey, swept=swept, meta=meta, **page)
