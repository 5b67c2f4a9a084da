"""``tether dpo``: offline preference optimisation (DPO and its variants) with the KL to the
reference measured every ``eval_every`` steps.

Examples::

    tether dpo --model stories260K --dataset hh-rlhf --skip_bad_rows true --output_dir runs/dpo \\
        --beta 0.1 --loss_type sigmoid --max_steps 200 --batch_size 16 --learning_rate 5e-4
    tether dpo --config examples/dpo_hh.yaml --beta 0.05        # YAML plus command-line overrides
    tether dpo --config examples/dpo_hh.yaml --resume           # continue an interrupted run
    torchrun --nproc_per_node 2 -m tether dpo --config ...      # data parallel (or accelerate launch)
    torchrun --nproc_per_node 2 -m tether dpo --config ... --reference copy --fsdp true   # sharded (FSDP2)
"""

from __future__ import annotations

import json

from ..checks import preflight_dpo
from ..config import parse_config
from ..trainers.dpo import DPOConfig, train_dpo


def main(argv=None) -> int:
    cfg, ns = parse_config(
        DPOConfig,
        argv,
        prog="tether dpo",
        description=__doc__.split("\n\n")[0],
        extra=[(("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint in output_dir"})],
    )
    preflight_dpo(cfg)  # the whole input, before any weights load
    result = train_dpo(cfg, resume=getattr(ns, "resume", False), preflight=False)  # checked just above
    print(json.dumps(result.summary(), indent=2, default=str))
    return 0
