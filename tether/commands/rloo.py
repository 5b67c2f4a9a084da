"""``tether rloo``: online RL with RLOO (leave-one-out baseline, detached sequence KL in the reward).

Example::

    tether rloo --model stories260K --prompts examples/story_prompts.txt --reward vader \\
        --output_dir runs/rloo --samples_per_prompt 4 --beta 0.05

``--resume`` continues from the latest checkpoint in ``--output_dir``.
"""

from __future__ import annotations

from .ppo import online_command


def main(argv=None) -> int:
    return online_command("rloo", argv, doc=__doc__)
