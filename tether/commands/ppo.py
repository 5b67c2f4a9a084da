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

from ..config import parse_config
from ..registry import method_spec


def online_command(method: str, argv, *, doc: str | None = None) -> int:
    """``tether <method>`` for every online method of ``tether.registry`` (``ppo``, ``grpo``, ``rloo``, and
    any registered one): parse (YAML + flags), preflight, train, print a summary."""
    spec = method_spec(method, online=True)
    cfg, ns = parse_config(
        spec.load("config"),
        argv,
        prog=f"tether {method}",
        description=(doc or spec.help).split("\n\n")[0],
        extra=[(("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint in output_dir"})],
    )
    spec.load("preflight")(cfg)  # the whole input, before any weights load
    result = spec.load("train")(cfg, resume=getattr(ns, "resume", False), preflight=False)  # checked just above
    keys = ("kl/ref", "kl/penalty", "beta", "reward/score", "reward/total", "gen/response_len")
    print(json.dumps(result.summary(keys), indent=2, default=str))
    return 0


def main(argv=None) -> int:
    return online_command("ppo", argv, doc=__doc__)
