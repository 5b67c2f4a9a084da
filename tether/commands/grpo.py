"""``tether grpo``: online RL with GRPO (group-normalised advantages, KL in the loss).

Example::

    tether grpo --model stories260K --prompts examples/story_prompts.txt --reward vader \\
        --output_dir runs/grpo --samples_per_prompt 4 --beta 0.04 --kl_estimator k3
    accelerate launch --config_file examples/accelerate_fsdp.yaml -m tether grpo \\
        --config examples/grpo_stories_vader.yaml
        # sharded over the GPUs with FSDP2 (same as torchrun ... --fsdp true)

``--kl_estimator k3 --kl_placement loss`` is DeepSeekMath's choice (its gradient is that of the
forward KL); ``--kl_placement loss_is`` makes it the unbiased reverse-KL gradient (see
``tether.trainers.grpo``). ``--resume`` continues from the latest checkpoint in ``--output_dir``.
"""

from __future__ import annotations

from .ppo import online_command


def main(argv=None) -> int:
    return online_command("grpo", argv, doc=__doc__)
