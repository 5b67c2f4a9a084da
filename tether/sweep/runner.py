"""Run a sweep: every run in its own process, resumable, then the report.

Markers: ``DIR/runs/<run>/result.json`` is written last by a finished run (``worker.py``); a run with
it is never started again. A run without it is relaunched, and continues from its checkpoints with
the trainer's resume (a worker stopped by a signal writes a checkpoint first and exits 75; so does the
sweep, once its workers have). ``DIR/runs/reference`` is the reference policy evaluated once with the same
protocol (the KL = 0 point every frontier starts from).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from .. import preempt
from .spec import RunSpec, SweepConfig, expand

log = logging.getLogger(__name__)

REFERENCE = "reference"


def default_workers(n_runs: int) -> int:
    """One process per core, at most one per run."""
    return max(1, min(n_runs, os.cpu_count() or 1))


@preempt.preemptible
def launch_all(jobs: list[tuple[str, Path]], *, module: str, workers: int, desc: str = "sweep") -> None:
    """Run ``python -m MODULE SPEC`` for each (name, spec file) with ``workers`` at a time, each with
        cores / workers threads; its output goes to worker.log beside the spec. Raises with the tail of
        every failed run's log. On SIGTERM, SIGINT or SIGUSR1 (tether.preempt) no new run starts, the running
    workers are asked to stop (each checkpoints its step and exits 75) and ``Preempted`` is raised."""
    if not jobs:
        return
    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // workers)
    bar = tqdm(total=len(jobs), desc=f"{desc} ({workers} parallel)", unit="run")
    failures, stopped, not_started = [], [], []

    def launch(job: tuple[str, Path]) -> None:
        name, spec_file = job
        if preempt.requested() is not None:  # stopping: start no new run
            not_started.append(name)
            return
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TETHER_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        logp = spec_file.parent / "worker.log"
        with open(logp, "w") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(spec_file)], stdout=logf, stderr=subprocess.STDOUT, env=env
            )
            rc, forwarded = wait_forwarding(proc)
        if rc == preempt.EXIT_PREEMPTED or (forwarded and rc == -signal.SIGTERM):  # (killed before its handlers)
            stopped.append(name)
        elif rc != 0:
            failures.append((name, rc, logp))
        bar.update(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(launch, jobs))
    bar.close()
    if failures:
        tails = "\n".join(
            f"--- {name} (exit {rc}), last lines of {logp}:\n" + "\n".join(logp.read_text().splitlines()[-15:])
            for name, rc, logp in failures
        )
        raise RuntimeError(f"{len(failures)} run(s) failed:\n{tails}")
    if stopped or not_started:
        raise preempt.Preempted(
            preempt.signal_name(),
            detail=(
                f"before every run finished: {len(stopped)} run(s) stopped, {len(not_started)} not started; run the "
                "same "
                "command again to continue (finished runs are not redone, stopped ones resume from their checkpoints)"
            ),
        )


def wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for a worker; once this process is asked to stop (tether.preempt), pass the request on as
    SIGTERM (whatever the signal was: a Ctrl-C also reaches the worker from the terminal, and a second
    SIGINT would stop it at once, without its checkpoint). Returns its exit code and whether it was
    asked to stop."""
    forwarded = False
    while True:
        try:
            return proc.wait(timeout=0.2), forwarded
        except subprocess.TimeoutExpired:
            if preempt.requested() is not None and not forwarded:
                proc.send_signal(signal.SIGTERM)
                forwarded = True


def read_points(run_dir: Path) -> list[dict]:
    """A run's evaluation rows, one per step (a step evaluated twice, by a resumed run, keeps the later row)."""
    f = run_dir / "eval.jsonl"
    by_step: dict = {}
    if f.exists():
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def run_sweep(
    cfg: SweepConfig, *, output_dir: Optional[str] = None, workers: int = 0, on_rows: Optional[Callable] = None
) -> Path:
    """Run (or resume) the sweep ``cfg``; returns the path of report.html."""
    from .report import write_report

    out = Path(output_dir or cfg.output_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    specs = expand(cfg)
    ev = asdict(cfg.eval)
    first = specs[0]
    jobs_all = [
        (
            REFERENCE,
            {
                "role": "reference",
                "method": cfg.method,
                "tag_method": REFERENCE,
                "run": REFERENCE,
                "overrides": {},
                "config": first.config,
                "eval": ev,
            },
        )
    ]
    jobs_all += [
        (
            s.name,
            {
                "role": "run",
                "method": s.method,
                "tag_method": s.method,
                "run": s.name,
                "overrides": s.overrides,
                "config": s.config,
                "eval": ev,
            },
        )
        for s in specs
    ]
    preflight(cfg, [s for s in specs if not (runs_dir / s.name / "result.json").exists()])
    todo = []
    for name, blob in jobs_all:
        run_dir = runs_dir / name
        if (run_dir / "result.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_file = run_dir / "spec.json"
        spec_file.write_text(json.dumps(blob, indent=1, default=str))
        todo.append((name, spec_file))
    # sized by the whole sweep, not by what is left: a rerun gives each worker the same number of threads
    # (cores // workers), and a different thread count changes float sums, so a resumed run would differ
    n = workers or cfg.workers or default_workers(len(jobs_all))
    log.info("sweep: %d runs (+ the reference), %d to do, %d in parallel -> %s", len(specs), len(todo), n, out)
    launch_all(todo, module="tether.sweep.worker", workers=n)
    rows, finals, samples = collect(runs_dir, [REFERENCE] + [s.name for s in specs])
    meta = {
        "method": cfg.method,
        "runs": len(specs),
        "eval prompts": ev["prompts"],
        "max eval prompts": ev["max_prompts"],
        "samples per prompt": ev["samples_per_prompt"],
        "eval seed": ev["seed"],
        "gold reward": ev["gold"] or "none (the proxy stands in)",
        "swept": ", ".join(sorted({k for s in specs for k in s.overrides})) or "-",
    }
    return write_report(out, rows, finals, samples, meta=meta, kl_budgets=ev["kl_budgets"])


def preflight(cfg: SweepConfig, specs: list[RunSpec]) -> None:
    """The trainers' own input checks (``tether.checks``) on every run still to do, and the evaluation's
    reward specs, before any process starts or any weights load: a bad run is a UserError naming it."""
    import dataclasses

    from ..checks import check_reward_spec
    from ..config import from_dict
    from ..errors import UserError
    from ..registry import METHODS
    from .spec import trainer_class

    assets = specs[0].config.get("assets") if specs else None
    for key in ("gold", "proxy"):
        if getattr(cfg.eval, key):
            check_reward_spec(getattr(cfg.eval, key), field=f"eval.{key}", assets=assets)
    for name, spec in cfg.eval.rewards.items():
        check_reward_spec(spec, field=f"eval.rewards.{name}", assets=assets)
    optimises_reward = "reward" in {f.name for f in dataclasses.fields(trainer_class(cfg.method))}
    if not cfg.eval.gold and not cfg.eval.proxy and not optimises_reward:  # DPO
        raise UserError(
            f"a {cfg.method.upper()} sweep needs eval.gold or eval.proxy (a reward spec): {cfg.method.upper()} "
            "optimises no reward the report could show"
        )
    for s in specs:
        tcfg = from_dict(trainer_class(s.method), s.config, source=f"sweep run {s.name}")
        try:
            METHODS[s.method].load("preflight")(tcfg)  # tether.registry: the method's own preflight
        except UserError as e:
            raise UserError(f"sweep run {s.name}: {e}") from None


def collect(runs_dir: Path, names: list[str]) -> tuple[list[dict], list[dict], dict]:
    """(every evaluation row, the final row of each run, the final samples of each run)."""
    rows, finals, samples = [], [], {}
    for name in names:
        pts = read_points(runs_dir / name)
        if not pts:
            continue
        rows += pts  # with their samples: the report shows some side by side at a matched KL
        finals.append({k: v for k, v in pts[-1].items() if k != "samples"})
        samples[name] = pts[-1].get("samples", [])
    return rows, finals, samples
