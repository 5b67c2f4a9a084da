"""tether: KL-regularised fine-tuning of language models.

Layers: ``tether.ops`` holds the pure torch math (log-probs, KL estimators, losses,
advantages); ``tether.control`` the β controllers; ``tether.reference`` is the one place that owns
the reference model; trainers and the CLI orchestrate them.

The configs and train functions are importable from here, as in TRL
(``from tether import GRPOConfig, train_grpo``); each is loaded on first use, so ``import tether``
stays cheap for the command line.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "SFTConfig": "tether.trainers.sft",
    "train_sft": "tether.trainers.sft",
    "RMConfig": "tether.trainers.reward_model",
    "train_reward_model": "tether.trainers.reward_model",
    "DPOConfig": "tether.trainers.dpo",
    "train_dpo": "tether.trainers.dpo",
    "PPOConfig": "tether.trainers.ppo",
    "train_ppo": "tether.trainers.ppo",
    "GRPOConfig": "tether.trainers.grpo",
    "train_grpo": "tether.trainers.grpo",
    "RLOOConfig": "tether.trainers.rloo",
    "train_rloo": "tether.trainers.rloo",
    "TrainResult": "tether.trainers.result",
    "SFTTrainer": "tether.trainers.api",
    "RewardTrainer": "tether.trainers.api",
    "DPOTrainer": "tether.trainers.api",
    "GRPOTrainer": "tether.trainers.api",
    "RLOOTrainer": "tether.trainers.api",
    "PPOTrainer": "tether.trainers.api",
    "TrainerCallback": "tether.callbacks",
    "SamplingSettings": "tether.groups",
    "ESTIMATORS": "tether.ops.kl",
    "register_method": "tether.registry",
    "UserError": "tether.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'tether' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
