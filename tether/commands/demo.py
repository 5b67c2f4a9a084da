"""``tether demo``: the case for the KL penalty, on a real tiny model (the main job).

One report, five parts: (1) reward hacking without the penalty (PPO at β = 0 against a learned proxy:
the proxy rises while the gold reward peaks and falls, and the trainer's hacking monitor fires); (2)
the reward–KL frontier (DPO at several β, PPO on the proxy at KL targets over seeds, PPO on the gold,
best-of-n); (3) a ladder of fixed β on two tasks against the practitioners' rule of thumb; (4) the
reference's ceiling (the same PPO-GT from a weak reference); (5) forgetting and the KL's noise.
``--quick`` (default) takes about 10 minutes on 2 CPU cores; ``--full`` runs the larger sweep (DPO
β ∈ {0.05, 0.1, 0.5, 1, 5}, PPO targets {3, 6, 9, 12} over 3 seeds, as in the DPO paper's Figure 2).
Any field of the demo config can be overridden (``--dpo_betas 0.1,1 --ppo_steps 60``...). Writes
OUTPUT_DIR/report.html and beside it every figure (hacking.png, frontier.png, overoptimisation.png,
beta_kl.png, ladder.png, reference_ceiling.png, forgetting.png, kl_noise.png) and the data
(frontier.csv, finals.csv, all_points.csv, ladder.csv, samples.jsonl); rerunning the same command
resumes and skips finished runs.

Examples::

    tether demo --quick --output_dir outputs/demo          # what `make demo` runs
    tether demo --full --output_dir outputs/demo_full      # the DPO paper's sweep, longer runs
    tether demo --methods dpo,best_of_n --dpo_betas 0.1,1 --eval_samples 4 --output_dir outputs/demo_dpo
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ..config import build_parser, check_finite, flag_values, from_dict, parse_args
from ..demo.pipeline import METHODS, PRESETS, DemoConfig, run_demo


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = [
        (("--quick",), {"action": "store_true", "help": "the quick preset (default; about 10 minutes on 2 cores)"}),
        (("--full",), {"action": "store_true", "help": "the larger sweep"}),
        (("--tiny",), {"action": "store_true", "help": "a miniature run of every stage (for tests)"}),
    ]
    parser = build_parser(
        DemoConfig, prog="tether demo", description=__doc__.replace("``", ""), extra=extra, raw_description=True
    )
    ns = parse_args(parser, argv)  # --kebab-case too
    chosen = [p for p in ("quick", "full", "tiny") if getattr(ns, p, False)]
    if len(chosen) > 1:
        parser.error("choose one of --quick, --full, --tiny")
    preset = chosen[0] if chosen else "quick"
    data = dict(PRESETS[preset])
    if getattr(ns, "config", None):
        data.update(yaml.safe_load(Path(ns.config).read_text()) or {})
    data.update(flag_values(DemoConfig, ns))
    try:
        cfg = from_dict(DemoConfig, data, source="tether demo")
        check_finite(cfg)
    except ValueError as e:
        parser.error(str(e))
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown demo method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    problems = [
        f"{name}={getattr(cfg, name)} must be {need}"
        for name, ok, need in (
            ("small_proxy_fraction", 0 < cfg.small_proxy_fraction <= 1, "in (0, 1]"),
            ("weak_sft_steps", cfg.weak_sft_steps >= 1, ">= 1"),
            ("ladder_steps", cfg.ladder_steps >= 1, ">= 1"),
            ("ladder_betas", all(b >= 0 for b in cfg.ladder_betas), "β values >= 0"),
            ("small_proxy_betas", all(b >= 0 for b in cfg.small_proxy_betas), "β values >= 0"),
        )
        if not ok
    ]
    if problems:
        parser.error(problems[0])
    report = run_demo(cfg)
    print(f"report: {report}")
    print(f"frontier: {report.parent / 'frontier.png'}  data: {report.parent / 'frontier.csv'}")
    return 0
