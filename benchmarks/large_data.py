"""Start-up time and peak memory of ``tether dpo`` and ``tether grpo`` on large generated data.

Generates (once, into ``--data_dir``) a preference file of N rows (``pairs-N.jsonl``: short
``prompt`` / ``chosen`` / ``rejected`` strings) and a prompts file of N lines (``prompts-N.txt``),
for each N of ``--rows``, then runs each command through the real CLI in a fresh subprocess with
``--max_steps 1`` on stories260K (tiny batch, a few new tokens), so the run is almost all start-up:
reading, checking and tokenising the data, loading the model, one step, the final save.

- wall s: the subprocess's elapsed time, start to exit (one step included, the same for every N);
- CPU s: its user + system CPU time (with one thread, the work done: robust on a shared machine);
- peak RSS: the subprocess's high-water resident memory (``ru_maxrss`` of the child, from
  ``os.wait4``); it counts the pages of memory-mapped files read (the data file itself, which the
  kernel can drop at any time), so the last column is the peak of the private part alone
  (``RssAnon`` of ``/proc/<pid>/status``, sampled every 0.2 s).

The smallest N is the baseline: what grows with N is what the data costs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/large_data.py                        # 10^3 and 10^6 rows
    python benchmarks/large_data.py --rows 1000 100000 --commands grpo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the a little big dog cat girl boy tree park sun day night happy sad ran saw found played "
    "red blue old new ball box house garden friend mom dad bird fish"
).split()


def _phrase(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def make_pairs(path: Path, n: int, seed: int = 0) -> None:
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            p = _phrase(r, 4).capitalize()
            row = {"prompt": p, "chosen": f" {_phrase(r, 5)} happy.", "rejected": f" {_phrase(r, 5)} sad {i}."}
            f.write(json.dumps(row) + "\n")


def make_prompts(path: Path, n: int, seed: int = 1) -> None:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(_phrase(r, 4).capitalize() + "\n")


def data_files(data_dir: Path, n: int) -> tuple[Path, Path]:
    pairs, prompts = data_dir / f"pairs-{n}.jsonl", data_dir / f"prompts-{n}.txt"
    if not pairs.exists():
        make_pairs(pairs.with_suffix(".tmp"), n)
        pairs.with_suffix(".tmp").rename(pairs)
    if not prompts.exists():
        make_prompts(prompts.with_suffix(".tmp"), n)
        prompts.with_suffix(".tmp").rename(prompts)
    return pairs, prompts


def command(name: str, data: Path, out: Path, model: str) -> list[str]:
    common = ["--model", model, "--output_dir", str(out), "--overwrite", "--max_steps", "1", "--progress", "false"]
    if name == "dpo":
        return [sys.executable, "-m", "tether", "dpo", "--dataset", str(data), "--batch_size", "2", *common]
    return [
        sys.executable, "-m", "tether", name, "--prompts", str(data), "--reward", "vader",
        "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "8", *common,
    ]  # fmt: skip


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(cmd: list[str], env: dict) -> tuple[float, float, float, float, int, str]:
    """(wall s, CPU s, peak RSS MiB, peak anonymous RSS MiB, exit code, output tail) of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    peak_anon, done = [0], threading.Event()

    def watch():  # RssAnon: private memory, without the pages of mapped files (the data file, libraries)
        while not done.wait(0.2):
            peak_anon[0] = max(peak_anon[0], _anon_kib(proc.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, peak_anon[0] / 1024, proc.returncode, out.decode(errors="replace")[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 1_000_000])
    ap.add_argument("--commands", nargs="+", default=["dpo", "grpo"], choices=["dpo", "grpo", "ppo", "rloo"])
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--data_dir", default=None, help="where the generated files are kept (default: a temporary folder)")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="tether-large-")
    data_dir = Path(a.data_dir) if a.data_dir else Path(tmp.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for n in a.rows:
        t0 = time.perf_counter()
        pairs, prompts = data_files(data_dir, n)
        print(f"data: {n:,} rows ready in {time.perf_counter() - t0:.1f} s ({data_dir})", file=sys.stderr)
        for name in a.commands:
            data = pairs if name == "dpo" else prompts
            wall, cpu, peak, anon, rc, tail = run(command(name, data, Path(tmp.name) / f"run-{name}-{n}", a.model), env)
            if rc != 0:
                sys.exit(f"tether {name} on {n:,} rows exited {rc}:\n{tail}")
            results.append((name, n, data.stat().st_size, wall, cpu, peak, anon))
            line = f"  tether {name}: {wall:.1f} s ({cpu:.1f} s CPU), peak {peak:.0f} MiB ({anon:.0f} anonymous)"
            print(line, file=sys.stderr)
    print(f"\ntether <command> --max_steps 1 --model {a.model}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}\n")
    print("| command | rows | file MB | wall s (start-up + 1 step) | CPU s | peak RSS MiB | of which anonymous |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, size, wall, cpu, peak, anon in results:
        print(f"| {name} | {n:,} | {size / 1e6:.1f} | {wall:.1f} | {cpu:.1f} | {peak:.0f} | {anon:.0f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
