"""List the packages ``benchmarks/gpu_check.py`` needs beyond torch, transformers, peft and accelerate,
pinned to the versions installed here, for ``make gpu-wheels`` to download as wheels.

tether's training path itself needs nothing beyond those four (and what they pull in: pyyaml, tqdm,
safetensors, numpy): the check runs with datasets, matplotlib, tensorboard, vaderSentiment, trl,
pyarrow, pandas and sentencepiece all absent (tests/test_gpu_check.py). Only the TRL comparison needs
more: trl and what it requires (datasets, pyarrow, pandas, ...). This prints that closure, minus
everything the four base packages already require, one ``name==version`` a line.

    python benchmarks/gpu_wheels.py > wheels/gpu/requirements.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

BASE = ("torch", "transformers", "peft", "accelerate")
WANTED = ("trl", "datasets")


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots) -> dict:
    """name -> installed version of ``roots`` and every package they require (no optional extras)."""
    seen: dict = {}
    todo = [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python, not installed here
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(_name(req))
    return seen


def main() -> None:
    base = closure(BASE)
    need = {n: v for n, v in closure(WANTED).items() if n not in base}
    for n in sorted(need):
        print(f"{n}=={need[n]}")
    print(f"{len(need)} packages beyond {', '.join(BASE)}", file=sys.stderr)


if __name__ == "__main__":
    main()
