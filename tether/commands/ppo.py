"""``tether ppo``: online RLHF with PPO and the KL-penalised reward.

Example (positive-sentiment stories, adaptive β toward 4 nats)::

    tether ppo --model stories260K --prompts examples/story_prompts.txt --reward vader \\
        --output_dir runs/ppo --kl_target 4 --kl_horizon 64 --max_steps 100

``--reward`` is ``vader``, a reward-model folder (``tether rm``'s final/) or ``module:function``;
``--log_rewards gold=vader,...`` logs more rewards without optimising them (gold vs proxy).
``--resume`` continues from the latest checkpoint in ``--output_dir``.
"""

from __future__ import annotations

import json

from ..checks import preflight_online
from ..config import parse_config


def online_command(cfg_cls, train_fn, argv, *, prog: str, doc: str) -> int:
    """Shared by ``tether ppo``, ``grpo`` and ``rloo``: parse (YAML + flags), train, print a summary."""
    cfg, ns = parse_config(
        cfg_cls, argv, prog=prog, description=doc.split("\n\n")[0],
        extra=[(("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint in output_dir"})],
    )
    preflight_online(cfg)  # the whole input, before any weights load
    result = train_fn(cfg, resume=getattr(ns, "resume", False))
    last = result["metrics"]
    keys = ["kl/ref", "kl/penalty", "beta", "reward/score", "reward/total", "gen/response_len"]
    keys += [k for k in last if k.startswith("eval/")]
    print(json.dumps({"final": result["final"], **{k: last[k] for k in keys if k in last}}, indent=2))
    return 0


def main(argv=None) -> int:
    from ..trainers.ppo import PPOConfig, train_ppo

    return online_command(PPOConfig, train_ppo, argv, prog="tether ppo", doc=__doc__)
