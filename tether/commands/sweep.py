"""``tether sweep``: run a grid of one trainer's settings, evaluate every run with one protocol, and
draw the reward–KL frontier.

Example::

    tether sweep --config examples/sweep_dpo.yaml --output_dir runs/sweep_dpo --workers 2

SWEEP.yaml::

    method: dpo                      # dpo | ppo | grpo | rloo | bon
    base: dpo_hh.yaml                # a trainer YAML (beside this file), or the trainer config inline (TRL names work)
    grid: {beta: [0.05, 0.5], seed: [0, 1]}   # their product; or runs: [{beta: 0.1}, {beta: 1, seed: 2}]
    eval: {prompts: story_prompts.txt, gold: vader, samples_per_prompt: 2, max_prompts: 32, eval_every: 10}

Paths are read relative to the file that states them (the sweep file, or the trainer YAML named by
base); a value that is no existing path there (a hub id, vader, an asset name) stays as written.

Writes OUTPUT_DIR/report.html, frontier.png, frontier.csv (every evaluation point: method, run, seed,
step, kl, kl_stderr, gold_reward, gold_stderr, proxy_reward, the swept fields), overoptimisation.png,
finals.csv and samples.jsonl; each run in OUTPUT_DIR/runs/<run>/. Rerunning the same command resumes:
finished runs (runs/<run>/result.json) are never redone, an interrupted one continues from its
checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from ..config import ArgumentParser
from ..errors import UserError


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        prog="tether sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the SWEEP.yaml (method, base, grid or runs, eval)")
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        default=None,
        help="where the runs and the report go (default: the YAML's output_dir, else runs/sweep)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="parallel run processes (default: one per core, at most one per run)"
    )
    ns = parser.parse_args(argv)
    if ns.workers < 0:
        raise UserError(f"--workers is {ns.workers}; give a positive number of processes (or 0 for one per core)")
    from ..sweep.runner import run_sweep
    from ..sweep.spec import load_sweep

    cfg = load_sweep(ns.config)
    report = run_sweep(cfg, output_dir=ns.output_dir, workers=ns.workers)
    print(f"report: {report}")
    print(f"frontier: {report.parent / 'frontier.png'}  data: {report.parent / 'frontier.csv'}")
    return 0
