"""``make gpu-check``'s script, end to end in its CPU mode (``--device cpu --tiny``), in an environment where
tether's dependencies beyond torch, transformers, peft and accelerate cannot be imported: the claim that
the GPU check needs nothing else (only its TRL comparison does, and it is skipped with one line)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("datasets", "matplotlib", "tensorboard", "vaderSentiment", "trl", "pyarrow", "pandas", "sentencepiece")


def test_gpu_check_runs_tiny_on_cpu_without_the_other_dependencies(tmp_path, assets_dir):
    shadow = tmp_path / "shadow"
    for name in ABSENT:  # each import raises ImportError, as if the package were not installed
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}",
        "TETHER_ASSETS": str(assets_dir),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--workdir",
            str(tmp_path / "work"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    for stage in (
        "dpo",
        "grpo",
        "ppo",
    ):  # the KL at step 0 is checked against its bound for every stage with a reference
        assert re.search(rf"{stage}: \d+ metric rows, all finite: True, KL at step 0 = ", out), out
    assert "sft: " in out and "TRL: skipped, trl is not importable" in out
    assert "gpu-check passed on CPU" in out


def test_gpu_check_refuses_cpu_without_tiny():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "add --tiny" in proc.stdout


def test_gpu_check_flags_every_non_finite_metric():
    """The finiteness check reads every number of every row (a NaN or an infinity anywhere fails it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import nonfinite

    rows = [{"step": 1, "loss": 0.5, "kl/ref": 0.0, "ok": True}, {"step": 2, "loss": float("nan"), "x": float("-inf")}]
    assert nonfinite(rows) == ["step 2: loss=nan", "step 2: x=-inf"]
    assert nonfinite(rows[:1]) == []
