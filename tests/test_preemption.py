"""Through the real command line (docs/reliability.md): a signal at several points of a run ends it
after the step in flight with a checkpoint and exit 75, and ``--resume`` finishes it exactly as an
uninterrupted run (every metric but wall-clock throughput, and the final weights, bit for bit); a
second process on a live run's folder exits 2 naming the holder's PID, and kill -9 leaves no stale
lock.

A signal at a precise point (during the update, a checkpoint write, an evaluation, sampling) is sent
by the process to itself from a wrapper around the function running at that point, which then runs
``tether.cli.main`` as ``python -m tether`` would; "after step k" is a plain ``kill`` from outside
once metrics.jsonl shows step k. Each run is a few seconds on stories260K; all are marked slow.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WRAPPER = """
import importlib, os, signal, sys
module, attr, nth, sig = sys.argv[1:5]
mod, count = importlib.import_module(module), [0]
real = getattr(mod, attr)
def patched(*a, **k):
    count[0] += 1
    if count[0] == int(nth) and os.environ.get("SIGNAL_RANK", os.environ.get("RANK", "0")) \
== os.environ.get("RANK", "0"):
        os.kill(os.getpid(), getattr(signal, sig))  # the handler runs here, in the middle of the call
    return real(*a, **k)
setattr(mod, attr, patched)
from tether.cli import main
sys.exit(main(sys.argv[5:]))
"""


def env() -> dict:
    return {
        **{k: v for k, v in os.environ.items() if k != "TETHER_DEBUG"},
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }


def tether(*argv, at: tuple = ()) -> list[str]:
    """The command line of ``python -m tether ARGV``, or of the wrapper signalling at ``at``
    (module, function, nth call, signal name)."""
    if at:
        return [sys.executable, "-c", WRAPPER, *map(str, at), *argv]
    return [sys.executable, "-m", "tether", *argv]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without wall-clock throughput (the one value a resumed run cannot repeat)."""
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_run(got: Path, want: Path) -> None:
    assert metrics(got) == metrics(want)
    a, b = weights(want / "final"), weights(got / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stopped_at(proc: subprocess.CompletedProcess, command: str, signame: str, out: Path) -> int:
    """Checks a preempted run's exit (75) and its last line; returns the step it stopped after."""
    assert proc.returncode == 75, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"tether {command}: stopped by {signame} after step (\d+); checkpoint (\S+); continue with --resume", last
    )
    assert m, last
    step = int(m.group(1))
    assert m.group(2) == str(out / "checkpoints" / f"step-{step}") and (out / "checkpoints" / f"step-{step}").is_dir()
    assert not (out / "final").exists() and [r["step"] for r in metrics(out)][-1] == step
    return step


# ---------------------------------------------------------------- dpo


@pytest.fixture(scope="module")
def dpo_flags(assets_dir, tmp_path_factory):
    from tether.data.preference import sentiment_pairs

    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    data = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(pos, neg, n=48, seed=0)))
    return [
        "--model",
        str(assets_dir / "stories260K"),
        "--dataset",
        str(data),
        "--max_steps",
        "8",
        "--batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--max_length",
        "48",
        "--eval_pairs",
        "4",
        "--kl_prompts",
        "0",
        "--eval_every",
        "3",
        "--save_every",
        "2",
        "--progress",
        "false",
    ]


@pytest.fixture(scope="module")
def dpo_straight(dpo_flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "dpo"
    proc = run(tether("dpo", *dpo_flags, "--output_dir", str(out)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


DPO_POINTS = {
    # name: (wrapper target (module, function, nth call), signal, the step the run stops after)
    "update of step 3": (("tether.trainers.dpo", "optimizer_step", 3), "SIGUSR1", 3),
    "checkpoint write of step 2": (("tether.runs", "write_state", 1), "SIGINT", 2),
    "evaluation of step 3": (("tether.trainers.dpo", "eval_pairs", 1), "SIGTERM", 3),
}


@pytest.mark.parametrize("point", list(DPO_POINTS))
def test_dpo_signalled_during_a_step_resumes_bit_identically(point, dpo_flags, dpo_straight, tmp_path):
    target, sig, want = DPO_POINTS[point]
    out = tmp_path / "dpo"
    proc = run(tether("dpo", *dpo_flags, "--output_dir", str(out), at=(*target, sig)))
    assert stopped_at(proc, "dpo", sig, out) == want
    resumed = run(tether("dpo", *dpo_flags, "--output_dir", str(out), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, dpo_straight)


def test_dpo_sigterm_from_outside_after_step_2_is_logged(dpo_flags, dpo_straight, tmp_path):
    out = tmp_path / "dpo"
    proc = subprocess.Popen(
        tether("dpo", *dpo_flags, "--output_dir", str(out)),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            log = out / "metrics.jsonl"
            if log.exists() and any(
                json.loads(ln)["step"] >= 2 for ln in log.read_text().splitlines() if ln.endswith("}")
            ):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    step = stopped_at(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "dpo", "SIGTERM", out)
    assert 2 <= step < 8
    resumed = run(tether("dpo", *dpo_flags, "--output_dir", str(out), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, dpo_straight)


def test_two_processes_stop_after_the_same_step_when_one_is_signalled(dpo_flags, tmp_path):
    """torchrun, 2 processes: only rank 1 gets SIGTERM, during step 2's update. The all-reduced flag
    stops both after step 2 (rank 0 names "a signal on another process"), one checkpoint is written,
    and a 2-process --resume equals an uninterrupted 2-process run bit for bit."""
    wrapper = tmp_path / "signal_wrapper.py"
    wrapper.write_text(WRAPPER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = [*dpo_flags, "--max_steps", "4"]
    straight, out = tmp_path / "straight", tmp_path / "two"
    proc = run([*torchrun, "-m", "tether", "dpo", *flags, "--output_dir", str(straight)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [
            *torchrun,
            str(wrapper),
            "tether.trainers.dpo",
            "optimizer_step",
            "2",
            "SIGTERM",
            "dpo",
            *flags,
            "--output_dir",
            str(out),
        ],
        env={**env(), "SIGNAL_RANK": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0  # torchrun reports its workers' exit 75 as a failure
    assert f"tether dpo: stopped by SIGTERM after step 2; checkpoint {out / 'checkpoints' / 'step-2'}" in proc.stderr
    assert "tether dpo: stopped by a signal on another process after step 2" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and metrics(out)[-1]["step"] == 2
    proc = run([*torchrun, "-m", "tether", "dpo", *flags, "--output_dir", str(out), "--resume"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, straight)


# ---------------------------------------------------------------- grpo


def test_grpo_signalled_during_sampling_resumes_bit_identically(assets_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["Once upon a time", "The dog", "A girl named Lily", "The sun was"]) + "\n")
    flags = [
        "--model",
        str(assets_dir / "stories260K"),
        "--prompts",
        str(prompts),
        "--reward",
        "vader",
        "--max_steps",
        "4",
        "--batch_size",
        "8",
        "--samples_per_prompt",
        "4",
        "--max_new_tokens",
        "8",
        "--learning_rate",
        "1e-3",
        "--eval_every",
        "0",
        "--sample_every",
        "0",
        "--progress",
        "false",
    ]
    straight, out = tmp_path / "straight", tmp_path / "grpo"
    proc = run(tether("grpo", *flags, "--output_dir", str(straight)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(
        tether("grpo", *flags, "--output_dir", str(out), at=("tether.trainers.online", "collect_rollout", 2, "SIGTERM"))
    )
    assert stopped_at(proc, "grpo", "SIGTERM", out) == 2
    resumed = run(tether("grpo", *flags, "--output_dir", str(out), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight)


# ---------------------------------------------------------------- one writer per run directory


def test_a_second_process_on_a_live_run_exits_2_and_kill_9_leaves_no_stale_lock(dpo_flags, tmp_path):
    """While a run trains, another start on its folder (with --overwrite, or --resume) exits 2 with one
    line naming the holder's PID and deletes nothing; after kill -9 of the first, --resume starts."""
    out = tmp_path / "dpo"
    flags = [*dpo_flags, "--output_dir", str(out), "--max_steps", "2000", "--eval_every", "0", "--save_every", "1"]
    first = subprocess.Popen(tether("dpo", *flags), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "checkpoints" / "step-1").is_dir():
            assert first.poll() is None
            time.sleep(0.05)
        for extra in (["--overwrite"], ["--resume"]):
            second = run(tether("dpo", *flags, *extra))
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2, second.stderr[-3000:]
            assert re.fullmatch(
                rf"tether dpo: error: output_dir {out} is in use by another run \(pid {first.pid} on host "
                r"\S+, since \S+\); wait for it to end or stop it \(its lock goes with the process\), or "
                r"choose another --output_dir",
                lines[-1],
            ), lines[-1]
            assert "Traceback" not in second.stderr
            assert first.poll() is None and (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run(tether("dpo", *flags, "--resume", "--max_steps", "3"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert (out / "final").is_dir() and f"pid {first.pid} " not in (out / "run.lock").read_text()


# ---------------------------------------------------------------- a sweep


def test_sweep_stopped_by_sigterm_continues_to_the_same_frontier(stories_path, tmp_path):
    """SIGTERM to the sweep process alone (as Kubernetes sends it) while its first worker trains: the
    worker is asked to stop (checkpoint, exit 75), the second run is not started, and the sweep exits
    75 with one line. Rerun, the sweep finishes with the frontier of an uninterrupted sweep."""
    import csv

    import yaml

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\nLily was sad\nTom found a box\n")
    sweep = {
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
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(sweep))
    argv = ["sweep", "--config", str(cfg), "--workers", "1"]
    proc = run(tether(*argv, "--output_dir", str(tmp_path / "straight")), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    sweep_proc = subprocess.Popen(
        tether(*argv, "--output_dir", str(out)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 400
        while (
            time.time() < deadline
            and sweep_proc.poll() is None
            and not any(p.stat().st_size for p in (out / "runs").glob("*/train/metrics.jsonl"))
        ):
            time.sleep(0.05)
        sweep_proc.send_signal(signal.SIGTERM)
        _, stderr = sweep_proc.communicate(timeout=400)
    finally:
        sweep_proc.kill()
    assert sweep_proc.returncode == 75, stderr[-3000:]
    assert re.fullmatch(
        r"tether sweep: stopped by SIGTERM before every run finished: 1 run\(s\) stopped, 1 not started; "
        r"run the same command again to continue \(finished runs are not redone, stopped ones resume "
        r"from their checkpoints\)",
        stderr.strip().splitlines()[-1],
    ), stderr[-2000:]
    stopped = [p.parent.parent for p in (out / "runs").glob("*/train/checkpoints")]
    assert len(stopped) == 1 and not (stopped[0] / "result.json").exists()
    assert "tether worker: stopped by SIGTERM after step" in (stopped[0] / "worker.log").read_text()
    proc = run(tether(*argv, "--output_dir", str(out)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def frontier(d):
        with open(d / "frontier.csv") as f:
            return sorted(
                ({k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(f)),
                key=lambda r: (r["run"], int(r["step"])),
            )

    assert frontier(out) == frontier(tmp_path / "straight")
    a, b = (
        weights(tmp_path / "straight" / "runs" / stopped[0].name / "train" / "final"),
        weights(stopped[0] / "train" / "final"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the demo


def test_tiny_demo_stopped_by_sigterm_continues_to_the_same_frontier(assets_dir, tmp_path):
    """SIGTERM to ``tether demo --tiny`` while its trained runs are in their workers: they checkpoint
    and exit 75, the demo exits 75; rerun, it finishes with the frontier of an uninterrupted demo
    (every evaluation point equal; wall-clock columns aside)."""
    import csv

    # runs long enough that the two started first (the longest: pipeline.run_cost) are mid-run at the signal
    argv = ["demo", "--tiny", "--assets", str(assets_dir), "--workers", "2", "--ladder_steps", "8"]
    straight, out = tmp_path / "straight", tmp_path / "demo"
    proc = run(tether(*argv, "--output_dir", str(straight)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = subprocess.Popen(
        tether(*argv, "--output_dir", str(out)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 600
        while (
            time.time() < deadline
            and demo.poll() is None
            and not any(p.stat().st_size for p in (out / "work" / "runs").glob("*/train/metrics.jsonl"))
        ):
            time.sleep(0.05)
        demo.send_signal(signal.SIGTERM)
        _, stderr = demo.communicate(timeout=600)
    finally:
        demo.kill()
    assert demo.returncode == 75, stderr[-3000:]
    assert re.fullmatch(
        r"tether demo: stopped by SIGTERM before every run finished: [1-9]\d* run\(s\) stopped, \d+ not "
        r"started; run the same command again to continue \(finished runs are not redone, stopped ones "
        r"resume from their checkpoints\)",
        stderr.strip().splitlines()[-1],
    ), stderr[-2000:]
    proc = run(tether(*argv, "--output_dir", str(out)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def frontier(d):
        with open(d / "frontier.csv") as f:
            return sorted(
                ({k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(f)),
                key=lambda r: (r["run"], float(r["step"])),
            )

    assert frontier(out) == frontier(straight)
