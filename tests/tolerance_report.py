"""Headroom of the suite's derived and measured tolerances, across CPU kernels and thread counts.

A tolerance that holds on the machine that wrote it can fail on the next one: matmul and vector
kernels (MKL's AVX-512 vs AVX2 paths, ATen's vectorised loops) round differently, and a trained
trajectory carries those differences forward. This runs the tests you name once per kernel setting
with ``TETHER_TOL_LOG`` set (every ``conftest.assert_close`` call records its worst
|got - want| / budget), then prints, per call site, the worst ratio over all settings. A ratio near
1 has no headroom; the suite's rule is at most about 0.3 (the tolerance is 3x the worst seen).

    python tests/tolerance_report.py tests/test_dpo_trainer.py tests/test_sft.py -m ""

The settings are ATen's dispatch (``ATEN_CPU_CAPABILITY``) and MKL's instruction set
(``MKL_ENABLE_INSTRUCTIONS``), each at 1 and 2 threads; on a CPU without AVX-512 the first setting
falls back to what the CPU has, which is harmless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "native-1t": {"OMP_NUM_THREADS": "1"},
    "avx2-2t": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": "2",
    },
    "default-1t": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OMP_NUM_THREADS": "1",
    },
}


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    worst: dict[str, dict] = {}
    failed = []
    keep = os.environ.get("TETHER_TOL_KEEP")  # a folder to keep each setting's log in
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in SETTINGS.items():
            log = Path(keep or tmp) / f"{name}.jsonl"
            log.unlink(missing_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv],
                cwd=root,
                env={**os.environ, **env, "TETHER_TOL_LOG": str(log)},
            )
            if proc.returncode not in (0, 5):
                failed.append(name)
            for line in log.read_text().splitlines() if log.exists() else []:
                r = json.loads(line)
                key = r["site"] + (f" {r['what']}" if r["what"] else "")
                if key not in worst or r["ratio"] > worst[key]["ratio"]:
                    worst[key] = {**r, "setting": name}
    print(f"\n{'call site':<60} {'worst ratio':>11} {'max |diff|':>11}  setting")
    for key, r in sorted(worst.items(), key=lambda kv: -kv[1]["ratio"]):
        print(f"{key[:60]:<60} {r['ratio']:>11.3g} {r['max_err']:>11.3g}  {r['setting']}")
    if failed:
        print("tests failed under: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
