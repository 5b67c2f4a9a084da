"""``tether certify``: train every KL-regularised method tether ships on a small tabular problem and
measure how far it ends from the exact optimum its theory predicts (``tether.oracle.certify``).

Prints one table (method, configuration, expected target, KL[π_learned‖target], KL[π_learned‖π*],
objective gap, steps, verdict) and exits 1 if any configuration misses its expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..config import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tether certify", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write the certificate (a list, one object per configuration) to FILE",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="NAME",
        help="run a subset: configuration names (see --list) or method names (ppo, grpo, ...), comma-separated; "
        "a configuration name wins over a method of the same name",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the convergence curves of the exact-tier rows (distance to target vs steps, log scale)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes to spread the configurations over (default: min(2, CPU count); 1 = sequential)",
    )
    p.add_argument("--list", action="store_true", help="list the methods and configurations and exit")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p


FAMILIES = (  # (method prefix, panel title), first match wins; then the online methods of tether.registry
    ("pg_kl_reward", "REINFORCE, KL in the reward"),
    ("pg_kl_loss_is", "REINFORCE + KL in the loss x π/π_old"),
    ("pg_kl_loss", "REINFORCE + KL in the loss"),
    ("adaptive_kl", "β controllers"),
    ("constraint_kl", "β controllers"),
    ("scheduled_beta", "β controllers"),
    ("fdpo", "f-DPO"),
    ("hinge", "hinge, SimPO (no target: KL to π*)"),
    ("simpo", "hinge, SimPO (no target: KL to π*)"),
)


def panels() -> tuple:
    """FAMILIES, then one panel per online method of ``tether.registry`` (its ``title``, or its name in capitals)."""
    from ..registry import METHODS

    return FAMILIES + tuple((n, m.title or n.upper()) for n, m in METHODS.items() if m.is_online)


def family(method: str) -> str:
    return next((title for prefix, title in panels() if method.startswith(prefix)), "DPO, cDPO, robust DPO, IPO")


def plot(certs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {}
    for c in certs:
        if c.curve:
            families.setdefault(family(c.method), []).append(c)
    n = max(len(families), 1)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, (fam, items) in zip(axes.flat, families.items()):
        for c in items:
            xs = [max(s, 1) for s, _ in c.curve]
            ys = [max(d, 1e-16) for _, d in c.curve]
            ax.plot(xs, ys, marker=".", ms=3, lw=1, label=f"{c.name}: {c.target} ({'ok' if c.ok else 'FAIL'})")
        ax.axhline(1e-3, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(fam)
        ax.set_xlabel("steps")
        ax.set_ylabel("KL[π‖target]  (π* if none)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quiet() -> None:
    """The rows run the shipped trainers dozens of times: keep their per-run logs and the Hugging Face
    load/save progress bars out of the certificate's output (warnings still show)."""
    import logging

    logging.getLogger("tether").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..oracle import certify

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    _quiet()
    if args.list:
        for name, method in certify.names():
            print(f"{method:18s} {name}")
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    t0 = time.perf_counter()

    def progress(c):
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:24s} {c.seconds:5.1f}s", file=sys.stderr, flush=True)

    try:
        jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
        certs = certify.run_certification(only, progress=progress, jobs=jobs)
    except ValueError as e:
        print(f"tether certify: error: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    print(certify.format_table(certs, markdown=args.markdown))
    failed = [c.name for c in certs if not c.ok]
    print(
        f"\n{len(certs) - len(failed)}/{len(certs)} configurations certified in {total:.1f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps([c.to_json() for c in certs], indent=2, ensure_ascii=False))
    if args.plot:
        plot(certs, args.plot)
    return 1 if failed else 0
