"""Soak test: a long PPO run on stories260K, watched from outside for memory and disk growth.

One ``tether ppo`` run (the real CLI, in a subprocess) of ``--steps`` steps with a tiny batch, so
that thousands of steps fit in minutes on one core. While it runs, every ``--interval`` seconds the
script records:

- the resident memory (RSS) of the run's process tree (``/proc/<pid>/status`` of the process and
  all its descendants; psutil when installed),
- the step reached (rows of ``metrics.jsonl``),
- the sizes of ``metrics.jsonl``, ``samples.jsonl`` and the TensorBoard event file(s),
- the checkpoint folders present and the size of the newest one's ``trainer_state.json``.

Then it fits straight lines against the step (least squares):

- RSS after warm-up (samples from ``--warmup`` steps on): the growth per 1,000 steps, and the
  RSS at the first and last sample;
- each file's bytes per step, fitted on the first and on the second half of the run separately: a
  file that grows linearly has the same slope in both halves (the ratio is printed);
- checkpoint rotation: the most checkpoint folders ever seen and the count at the end (with
  ``save_total_limit`` = L, at most L, or L + 1 while a new one is being completed).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/soak.py                      # 2,000 steps, the table
    python benchmarks/soak.py --steps 50 --interval 1                # a quick look (steps/s)
    python benchmarks/soak.py --json soak.json                       # also write every sample
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Watching a process tree from outside


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB (0 once it has exited)."""
    try:
        import psutil

        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.Error:
            return 0.0
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20
    except ImportError:
        pass
    total_kib, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        except OSError:
            continue
        todo += _children(p)
    return total_kib / 1024


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Watcher:
    """Incremental reader of a run folder: steps from metrics.jsonl, file sizes, checkpoints."""

    def __init__(self, run: Path):
        self.run = run
        self.offset, self.rows, self.step = 0, 0, 0

    def _read_steps(self) -> None:
        path = self.run / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        for line in data[: end + 1].splitlines():
            try:
                self.step = max(self.step, int(json.loads(line)["step"]))
                self.rows += 1
            except (ValueError, KeyError):
                pass
        self.offset += end + 1

    def sample(self) -> dict:
        self._read_steps()
        ckpts = sorted(
            (p for p in (self.run / "checkpoints").glob("step-*") if p.is_dir()),
            key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
        )
        tb = sum(_size(p) for p in (self.run / "tb").glob("events.out.tfevents.*"))
        return {
            "step": self.step,
            "metrics_bytes": _size(self.run / "metrics.jsonl"),
            "samples_bytes": _size(self.run / "samples.jsonl"),
            "tb_bytes": tb,
            "checkpoints": len(ckpts),
            "state_json_bytes": _size(ckpts[-1] / "trainer_state.json") if ckpts else 0,
        }


# ----------------------------------------------------------------------------------------------------
# Fits


def linfit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs."""
    n = len(xs)
    if n < 2:
        return float("nan"), float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan"), my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def halves_slopes(samples: list[dict], key: str, steps: int) -> tuple[float, float, float]:
    """(slope over the run, slope over the first half of the steps, over the second half), per step."""
    pts = [(s["step"], s[key]) for s in samples if s["step"] > 0]
    first = [p for p in pts if p[0] <= steps / 2]
    second = [p for p in pts if p[0] >= steps / 2]
    whole = linfit(*zip(*pts))[0] if len(pts) > 1 else float("nan")
    a = linfit(*zip(*first))[0] if len(first) > 1 else float("nan")
    b = linfit(*zip(*second))[0] if len(second) > 1 else float("nan")
    return whole, a, b


# ----------------------------------------------------------------------------------------------------


def ppo_command(a, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tether", "ppo",
        "--model", a.model,
        "--prompts", str(ROOT / "examples" / "story_prompts.txt"),
        "--reward", "vader",
        "--output_dir", str(out), "--overwrite",
        "--seed", "0",
        "--max_steps", str(a.steps),
        "--batch_size", str(a.batch_size),
        "--max_new_tokens", str(a.max_new_tokens),
        "--num_epochs", str(a.num_epochs),
        "--save_every", str(a.save_every),
        "--save_total_limit", str(a.save_total_limit),
        "--eval_every", str(a.eval_every),
        "--eval_max_prompts", "4",
        "--eval_samples", "2",
        "--sample_every", "10",
        "--progress", "false",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--num_epochs", type=int, default=1)
    ap.add_argument("--save_every", type=int, default=100)
    ap.add_argument("--save_total_limit", type=int, default=2)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=200, help="steps before the RSS fit starts")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--output_dir", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write every sample and the summary here")
    a = ap.parse_args()

    tmp = None
    if a.output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tether-soak-")
        out = Path(tmp.name) / "run"
    else:
        out = Path(a.output_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = ppo_command(a, out)
    print(" ".join(cmd[1:]), file=sys.stderr)

    t0 = time.perf_counter()
    log = open(out.parent / f"{out.name}.log", "w") if out.parent.exists() else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    watch = Watcher(out)
    samples, max_ckpts = [], 0
    while proc.poll() is None:
        time.sleep(a.interval)
        rss = tree_rss_mb(proc.pid)
        s = {"t": time.perf_counter() - t0, "rss_mb": rss, **watch.sample()}
        max_ckpts = max(max_ckpts, s["checkpoints"])
        if proc.poll() is None and rss > 0:
            samples.append(s)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    final = watch.sample()
    max_ckpts = max(max_ckpts, final["checkpoints"])
    if proc.returncode != 0:
        sys.exit(f"soak: the run exited {proc.returncode} (log: {getattr(log, 'name', '-')})")

    steps = final["step"]
    warm = [s for s in samples if s["step"] >= a.warmup]
    rss_slope, _ = linfit([s["step"] for s in warm], [s["rss_mb"] for s in warm])
    first_t = next((s["t"] for s in samples if s["step"] >= 1), 0.0)
    rows = [
        ("steps", f"{steps}"),
        ("wall s (setup + steps)", f"{wall:.0f}"),
        ("steps/s (after the first step)", f"{(steps - 1) / max(wall - first_t, 1e-9):.2f}"),
        ("RSS samples after warm-up", f"{len(warm)} (steps {a.warmup}..{steps}, every {a.interval:g} s)"),
        ("RSS after warm-up, MiB", f"{warm[0]['rss_mb']:.1f}" if warm else "-"),
        ("RSS at the end, MiB", f"{warm[-1]['rss_mb']:.1f}" if warm else "-"),
        ("RSS growth per 1,000 steps, MiB (fit)", f"{1000 * rss_slope:+.2f}"),
        ("peak RSS, MiB (ru_maxrss)", f"{peak_mb:.1f}"),
    ]
    for key, name in (
        ("metrics_bytes", "metrics.jsonl"),
        ("samples_bytes", "samples.jsonl"),
        ("tb_bytes", "TensorBoard events"),
        ("state_json_bytes", "newest trainer_state.json"),
    ):
        whole, h1, h2 = halves_slopes(samples + [{**final, "rss_mb": 0, "t": wall}], key, steps)
        rows.append(
            (
                f"{name}: bytes/step (1st half, 2nd half)",
                f"{whole:.1f} ({h1:.1f}, {h2:.1f}); end {final[key] / 1e6:.2f} MB",
            )
        )
    rows.append(
        (
            f"checkpoint folders (save_every {a.save_every}, limit {a.save_total_limit})",
            f"{final['checkpoints']} at the end, at most {max_ckpts} seen",
        )
    )
    w = max(len(r[0]) for r in rows)
    print(f"\nSoak: tether ppo --model {a.model}, batch {a.batch_size}, {a.max_new_tokens} new tokens, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}\n")  # fmt: skip
    print(f"| {'measure':<{w}} | value |\n|{'-' * (w + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"args": vars(a), "rows": dict(rows), "samples": samples, "final": final}, indent=1)
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
