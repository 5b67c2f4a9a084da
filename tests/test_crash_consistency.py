"""Crash consistency of ``tether sweep`` and ``tether demo`` through the real command line
(docs/reliability.md): the command's whole process tree (the command and every worker, one process
group) is killed with SIGKILL, either at exact writes (``*_WRITES``: a ``sitecustomize`` kills the group
just before a file is renamed into place, or with half of a directly written file on disk) or at
seeded random moments, ``TETHER_CRASH_KILLS`` times (3 by default); then the same command is rerun
until it exits 0. Then:

- every result equals that of an uninterrupted run of the same command in the same test, exactly:
  ``frontier.csv``, ``finals.csv``, ``samples.jsonl``, each run's evaluation rows, ``result.json``
  (wall-clock fields aside), training metrics (throughput aside) and final weights bit for bit. Exact,
  because every piece is deterministic: a run killed without a checkpoint starts over from the same
  seeds, and one with a checkpoint resumes bit-identically (``--resume``, tests/test_preemption.py);
- no finished run (one with ``result.json``, a demo stage with its marker) was redone: the files it
  had when a kill struck keep their inode, size and mtime to the end, and its worker never started
  again (``worker.log`` is rewritten by every launch).

Of the random kills, every second one waits for a checkpoint being written (a ``*.tmp`` folder, polled
every millisecond after a random delay) and strikes then; the others strike after a random delay
within the uninterrupted run's time; a tree that finished before its kill is checked and started
afresh. Each kill is printed (``pytest -s``) with what it struck: the runs
finished by then, the runs with checkpoints, and any half-written ``*.tmp`` it left behind.
``TETHER_CRASH_SEED`` changes the moments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tether.sweep.runner import read_points

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
KILLS = int(os.environ.get("TETHER_CRASH_KILLS", "3"))
SEED = int(os.environ.get("TETHER_CRASH_SEED", "0"))
TMP_GLOBS = tuple(  # checkpoints being written (no recursive glob: polled every millisecond)
    f"{runs}/*/train/{g}" for runs in ("runs", "work/runs") for g in ("checkpoints/*.tmp", "final.tmp")
) + tuple(f"work/{stage}/{g}" for stage in ("sft", "rm") for g in ("checkpoints/*.tmp", "final.tmp"))


KILLER = """
import os, pathlib, signal, sys
_name, _nth = os.environ.get("TETHER_TEST_KILL_FILE"), int(os.environ.get("TETHER_TEST_KILL_NTH", "1"))
if _name:
    _seen = [0]

    def _hit(path):
        if os.path.basename(os.fspath(path)) != _name or os.environ["TETHER_TEST_KILL_IN"] not in " ".join(sys.argv):
            return False
        _seen[0] += 1
        return _seen[0] == _nth

    def _kill():
        os.killpg(os.getpgid(0), signal.SIGKILL)

    _replace = os.replace

    def replace(src, dst, *a, **k):
        if _hit(dst):
            _kill()  # its complete temporary copy is on disk, not yet renamed into place
        return _replace(src, dst, *a, **k)

    os.replace = replace
    _write_text = pathlib.Path.write_text

    def write_text(self, data, *a, **k):
        if _hit(self):
            with open(self, "w") as f:
                f.write(data[: len(data) // 2])  # torn: the first half on disk
            _kill()
        return _write_text(self, data, *a, **k)

    pathlib.Path.write_text = write_text
"""


def env(killer: Path | None = None, at: tuple = ()) -> dict:
    """The test environment; with ``at`` = (file name, nth, process), the ``KILLER`` sitecustomize in
    ``killer`` kills the whole process group at the nth write of that file by a process whose command
    line contains ``process``: just before the rename that commits it (atomic writes), or with half of
    it written (direct writes)."""
    e = {
        **{k: v for k, v in os.environ.items() if k != "TETHER_DEBUG" and not k.startswith("TETHER_TEST_KILL")},
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    if at:
        (killer / "sitecustomize.py").write_text(KILLER)
        name, nth, proc = at
        e.update(
            PYTHONPATH=f"{killer}{os.pathsep}{ROOT}",
            TETHER_TEST_KILL_FILE=name,
            TETHER_TEST_KILL_NTH=str(nth),
            TETHER_TEST_KILL_IN=proc,
        )
    return e


def start(argv: list, log: Path, environ: dict | None = None) -> subprocess.Popen:
    """``python -m tether ARGV`` in its own session (process group: the command and its workers)."""
    with open(log, "a") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "tether", *argv],
            env=environ or env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies aside: they hold no lock and write nothing)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the whole group, then wait until none of it runs (as a scheduler does before it
    requeues a job: a worker in the middle of an fsync dies when the call returns)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.01)
    assert not group_alive(proc.pid)


def fingerprint(files: list[Path]) -> dict:
    return {str(p): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()}


def run_to_end(argv: list, log: Path, timeout: float = 600) -> float:
    t0 = time.time()
    proc = start(argv, log)
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return time.time() - t0


def crash_and_finish(
    argv: list, out: Path, *, seconds: float, finished, compare, log: Path, scripted: list, kills: int
) -> list[dict]:
    """Kill ``tether ARGV``: first at each ``scripted`` write (file, nth, process: see ``env``), then
    ``kills`` times at random moments; then rerun it to the end. ``finished(out)`` maps each finished unit
    (run or stage) to the files it must keep untouched from then on; ``compare(out)`` checks a finished
    tree against the uninterrupted one (a tree finished before a random kill is checked, then deleted:
    the next kill strikes a fresh start). Returns one record per kill."""
    rng = random.Random(SEED)
    records, seen = [], {}
    plan = [("at", at) for at in scripted] + [("random", i) for i in range(kills)]
    for kind, what in plan:
        mode = "at write" if kind == "at" else ("checkpoint write" if what % 2 else "random moment")
        # a rerun repeats its start-up (a quarter of the run here) and skips what is done: kills within the
        # first 60% of the uninterrupted run's time mostly strike work still to do
        delay = rng.uniform(0.1, 0.6) * seconds if mode == "random moment" else rng.uniform(0.0, 0.4) * seconds
        environ = env(log.parent, what) if kind == "at" else env()
        proc, t0, struck = start(argv, log, environ), time.time(), []
        if kind == "at":
            rc = proc.wait(timeout=600)
            assert rc == -signal.SIGKILL, f"{what}: the kill did not happen (exit {rc})"
        else:
            while proc.poll() is None and time.time() - t0 < delay:
                time.sleep(0.01)
            while mode == "checkpoint write" and proc.poll() is None and time.time() - t0 < 3 * seconds:
                struck = [p for g in TMP_GLOBS for p in out.glob(g)]
                if struck:
                    break
                time.sleep(0.001)
            rc = proc.poll()
        kill_tree(proc)
        units = finished(out)
        for name, files in units.items():  # a unit finished before this kill stays as it was
            fp = fingerprint(files)
            assert seen.setdefault(name, fp) == fp, f"{mode} {what}: finished {name} was redone"
        records.append(
            {
                "mode": mode,
                "at": list(what) if kind == "at" else None,
                "after_s": round(time.time() - t0, 2),
                "exited_before_kill": rc if kind != "at" else None,
                "writing": sorted(str(p.relative_to(out)) for p in struck),
                "left_tmp": sorted({str(p.relative_to(out)) for g in TMP_GLOBS + ("**/*.tmp",) for p in out.glob(g)}),
                "finished": sorted(units),
                "with_checkpoints": sorted(
                    {
                        str(p.parent.parent.relative_to(out))
                        for p in out.glob("**/checkpoints/step-*")
                        if p.suffix not in (".tmp", ".old")
                    }
                ),
            }
        )
        print("crash:", json.dumps(records[-1]))
        if rc == 0 and kind == "random":  # it finished before the kill: check it, then start afresh
            compare(out)
            shutil.rmtree(out)
            seen.clear()
    run_to_end(argv, log)  # the rerun, left to finish
    for name, fp in seen.items():
        assert fingerprint(finished(out)[name]) == fp, f"finished {name} was redone by the last rerun"
    compare(out)
    return records


def weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def metrics(train: Path) -> list[dict]:
    """metrics.jsonl without wall-clock throughput (the one value a resumed run cannot repeat)."""
    rows = [json.loads(ln) for ln in (train / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def no_clock(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("wall_s", "cpu_s")}


def assert_same_outputs(got: Path, want: Path, runs: str) -> None:
    for name in ("frontier.csv", "finals.csv", "samples.jsonl"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    names = sorted(p.name for p in (want / runs).iterdir())
    assert sorted(p.name for p in (got / runs).iterdir()) == names
    for name in names:
        g, w = got / runs / name, want / runs / name
        assert read_points(g) == read_points(w), name
        assert no_clock(json.loads((g / "result.json").read_text())) == no_clock(
            json.loads((w / "result.json").read_text())
        ), name
        if (w / "train" / "final").is_dir():
            assert metrics(g / "train") == metrics(w / "train"), name
            assert_same_weights(g / "train" / "final", w / "train" / "final")


# ---------------------------------------------------------------- tether sweep


def sweep_finished(out: Path) -> dict:
    return {
        d.name: [d / f for f in ("result.json", "eval.jsonl", "worker.log", "spec.json", "train/metrics.jsonl")]
        + [d / "train" / "final" / "model.safetensors"]
        for d in (out / "runs").glob("*")
        if (d / "result.json").exists()
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, stories_path):
    """Two PPO runs (β 0.05, 0.5) of 4 steps, evaluated and checkpointed every step, and the
    reference's evaluation, one worker at a time (the order of the writes, and so each scripted kill,
    does not depend on which of two parallel workers is faster). Returns (argv without --output_dir,
    the uninterrupted sweep's folder, its wall time)."""
    tmp = tmp_path_factory.mktemp("sweep")
    prompts = tmp / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\nLily was sad\nTom found a box\n")
    spec = {
        "method": "ppo",
        "base": {
            "model": stories_path,
            "prompts": str(prompts),
            "reward": "vader",
            "max_steps": 4,
            "batch_size": 4,
            "max_new_tokens": 6,
            "learning_rate": 1e-3,
        },
        "grid": {"beta": [0.05, 0.5]},
        "eval": {
            "prompts": str(prompts),
            "gold": "vader",
            "samples_per_prompt": 2,
            "max_new_tokens": 6,
            "eval_every": 1,
        },
    }
    cfg = tmp / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    argv = ["sweep", "--config", str(cfg), "--workers", "1"]
    seconds = run_to_end([*argv, "--output_dir", str(tmp / "straight")], tmp / "straight.log")
    return argv, tmp / "straight", seconds


# Kills at exact writes of the sweep (file, nth write of it, the process writing it), in the order the
# workers write them: the reference's result.json (torn), the first run's first checkpoint (complete,
# not yet renamed: no checkpoint to resume from), the other run's result.json (torn).
SWEEP_WRITES = [("result.json", 1, "reference"), ("step-1", 1, "ppo-beta0.05"), ("result.json", 1, "ppo-beta0.5")]


@pytest.mark.parametrize("how", ["at writes", "at random moments"])
def test_sweep_killed_ends_as_an_uninterrupted_one(tmp_path, sweep, how):
    argv, want, seconds = sweep
    got = tmp_path / "crashed"
    records = crash_and_finish(
        [*argv, "--output_dir", str(got)],
        got,
        seconds=seconds,
        finished=sweep_finished,
        compare=lambda out: assert_same_outputs(out, want, "runs"),
        log=tmp_path / "crashed.log",
        scripted=SWEEP_WRITES if how == "at writes" else [],
        kills=0 if how == "at writes" else KILLS,
    )
    assert len(records) == (len(SWEEP_WRITES) if how == "at writes" else KILLS)


# ---------------------------------------------------------------- tether demo


def demo_finished(out: Path) -> dict:
    work = out / "work"
    units = {
        d.name: [d / f for f in ("result.json", "eval.jsonl", "worker.log", "spec.json", "train/metrics.jsonl")]
        + [d / "train" / "final" / "model.safetensors"]
        for d in (work / "runs").glob("*")
        if (d / "result.json").exists()
    }
    for stage in ("sft", "rm"):
        if (work / f"{stage}.done").exists():
            units[stage] = [
                work / f"{stage}.done",
                work / stage / "metrics.jsonl",
                work / stage / "final" / "model.safetensors",
            ]
    prompts = [work / "pref_prompts.jsonl", work / "eval_prompts.jsonl"]  # one stage: done when both exist
    if all(p.exists() for p in prompts):
        units["prompts"] = prompts
    for name in ("prefs.jsonl", "reference_eval.json"):
        if (work / name).exists():
            units[name] = [work / name]
    return units


@pytest.fixture(scope="module")
def demo(tmp_path_factory, assets_dir):
    """``tether demo --tiny`` (every stage, a few steps each; DPO and PPO runs in 2 workers), run once
    uninterrupted: (argv without --output_dir, its folder, its wall time)."""
    tmp = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--tiny", "--assets", str(assets_dir), "--workers", "2"]
    seconds = run_to_end([*argv, "--output_dir", str(tmp / "straight")], tmp / "straight.log")
    return argv, tmp / "straight", seconds


# Kills at exact writes of the demo: the held-out prompt file (torn), the reward model's final/
# (complete, not yet renamed; the SFT's is done by then), a best-of-n result.json (torn), a PPO
# worker's result.json, a DPO worker's last rewrite of its eval.jsonl (its first is at its start). In
# this order: the sweep starts its longest runs first (pipeline.run_cost), PPO's before DPO's.
DEMO_WRITES = [
    ("eval_prompts.jsonl", 1, "--tiny"),
    ("final", 1, "--tiny"),
    ("result.json", 1, "--tiny"),
    ("result.json", 1, "ppo-kl4"),
    ("eval.jsonl", 2, "dpo-beta0.1"),
]


@pytest.mark.parametrize("how", ["at writes", "at random moments"])
def test_demo_killed_ends_as_an_uninterrupted_one(tmp_path, demo, how):
    argv, want, seconds = demo
    got = tmp_path / "crashed"
    records = crash_and_finish(
        [*argv, "--output_dir", str(got)],
        got,
        seconds=seconds,
        finished=demo_finished,
        compare=lambda out: assert_same_demo(out, want),
        log=tmp_path / "crashed.log",
        scripted=DEMO_WRITES if how == "at writes" else [],
        kills=0 if how == "at writes" else KILLS,
    )
    assert len(records) == (len(DEMO_WRITES) if how == "at writes" else KILLS)


def assert_same_demo(got: Path, want: Path) -> None:
    assert_same_outputs(got, want, "work/runs")
    for stage in ("sft", "rm"):
        assert_same_weights(got / "work" / stage / "final", want / "work" / stage / "final")
    for name in ("pref_prompts.jsonl", "eval_prompts.jsonl", "prefs.jsonl"):
        assert (got / "work" / name).read_bytes() == (want / "work" / name).read_bytes(), name
