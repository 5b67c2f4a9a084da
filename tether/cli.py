"""The ``tether`` command: ``tether <command> [--flags]``. Each command lives in
``tether/commands/<name>.py`` with a ``main(argv)``; imports are lazy so ``tether --help`` is fast."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "kl": "measure KL[policy‖reference] with every estimator side by side",
    "certify": "certify each training method against the exact KL-regularised optimum",
    "sft": "supervised fine-tuning (makes the reference model)",
    "rm": "train a Bradley-Terry reward model on preference pairs",
    "dpo": "offline preference optimisation: DPO and its variants",
    "ppo": "online RLHF: PPO with the KL-penalised reward",
    "grpo": "online RL: GRPO (group-normalised advantages, KL in the loss)",
    "rloo": "online RL: RLOO (leave-one-out baseline, KL in the reward)",
    "bon": "best-of-n sampling baseline with its exact KL bound",
    "demo": "the reward-KL frontier on a real tiny model (the main job)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tether <command> [--flags]   (tether <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tether: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(f"tether.commands.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
