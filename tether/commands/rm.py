"""``tether rm``: train a Bradley–Terry reward model on preference pairs.

A scalar head on the causal LM (``AutoModelForSequenceClassification``, num_labels=1); ``final/``
loads with plain ``transformers`` and is a reward source for ``tether ppo/grpo/rloo/bon --reward``.

Example (the demo's learned sentiment proxy: positive snippets preferred over negative ones)::

    tether rm --model runs/sft/final --dataset rt-polarity --output_dir runs/rm --max_steps 150
"""

from __future__ import annotations

import json

from ..checks import preflight_rm
from ..config import parse_config
from ..trainers.reward_model import RMConfig, train_reward_model


def main(argv=None) -> int:
    cfg, ns = parse_config(
        RMConfig,
        argv,
        prog="tether rm",
        description=__doc__.split("\n\n")[0],
        extra=[(("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint in output_dir"})],
    )
    preflight_rm(cfg)  # the whole input, before any weights load
    result = train_reward_model(cfg, resume=getattr(ns, "resume", False), preflight=False)  # checked just above
    print(json.dumps(result.summary(("loss", "rm/accuracy")), indent=2, default=str))
    return 0
