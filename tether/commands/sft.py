"""``tether sft``: supervised fine-tuning of a causal LM on text or prompt/completion data.

Its ``final/`` folder is the usual reference model for ``tether dpo`` / ``ppo`` / ``grpo`` / ``rloo``.

Example (the movie-review reference model of the demo)::

    tether sft --model stories260K --dataset rt-polarity --output_dir runs/sft --max_steps 200
"""

from __future__ import annotations

import json

from ..checks import preflight_sft
from ..config import parse_config
from ..trainers.sft import SFTConfig, train_sft


def main(argv=None) -> int:
    cfg, ns = parse_config(
        SFTConfig,
        argv,
        prog="tether sft",
        description=__doc__.split("\n\n")[0],
        extra=[(("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint in output_dir"})],
    )
    preflight_sft(cfg)  # the whole input, before any weights load
    result = train_sft(cfg, resume=getattr(ns, "resume", False), preflight=False)  # checked just above
    print(json.dumps(result.summary(("loss",)), indent=2, default=str))
    return 0
