"""The one table of training methods: name -> config class, train function, preflight, help.

The CLI (``tether <name>``), ``tether sweep`` (``method: <name>``), the exact tier of ``tether certify``
and ``train_online``'s choice of method (``method_for``) all read ``METHODS``. Entries name their
objects as "module:attribute" strings, imported only when used, so ``tether --help`` stays fast and
this module imports nothing of tether's.

Adding an online method is its own file (a config class with ``method: ClassVar[str] = "<name>"``, an
``OnlineMethod`` of ``prepare``/``loss`` from ``tether.trainers.method``, a train function), one row
here (or one ``register_method(...)`` call from user code), and its tests::

    register_method(MethodSpec("reinforce", "online RL: REINFORCE with a baseline",
                               config="mypkg.reinforce:ReinforceConfig", train="tether.trainers.online:train_online",
                               online="mypkg.reinforce:REINFORCE"))

(``tests/test_registry.py`` adds such a method in the test alone and trains it from the CLI.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

ONLINE_PREFLIGHT = "tether.checks:preflight_online"
ONLINE_COMMAND = (
    "tether.commands.ppo"  # the shared online command (``online_command``), for a method with no module of its own
)


@dataclass(frozen=True)
class MethodSpec:
    """One training method. ``config``, ``train``, ``preflight`` and ``online`` are "module:attribute" strings
    (imported when used) or the objects themselves. An online method's ``train`` may be
    ``"tether.trainers.online:train_online"``: it finds the method from the config's ``method`` name."""

    name: str
    help: str  # the one line ``tether --help`` shows
    config: Any  # the config dataclass (its fields are the command's flags and the sweep's fields)
    train: (
        Any  # train(cfg, *, resume=False, eval_hook=None, preflight=True, ...) -> TrainResult; None: not trained (bon)
    )
    preflight: Any = (
        ONLINE_PREFLIGHT  # preflight(cfg, **in_memory): the whole input before any weights load (UserError)
    )
    online: Any = None  # the OnlineMethod (prepare/loss) of an online method; None: not online
    command: Optional[str] = None  # the CLI module with main(argv); None: the shared online command
    sweep: bool = True  # ``tether sweep`` can vary it
    title: str = ""  # its panel in ``tether certify --plot`` (default: the name in capitals)

    @property
    def is_online(self) -> bool:
        return self.online is not None

    def load(self, what: str) -> Any:
        """The object a field names: ``spec.load("config")`` is the config class."""
        ref = getattr(self, what)
        if ref is None:
            raise ValueError(f"method {self.name!r} has no {what}")
        return resolve(ref)


def resolve(ref) -> Any:
    """ "module:attribute" -> the attribute (imported now); an object (registered from code) is itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add (or replace) a method; the CLI, sweep, certify and ``train_online`` see it from then on."""
    if spec.command is None and not spec.is_online:
        raise ValueError(f"method {spec.name!r}: an offline method needs its own command module (command=...)")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str, *, field: str = "method", online: bool = False, sweep: bool = False) -> MethodSpec:
    """The registered method ``name``; a ``UserError`` naming ``field`` and the choices otherwise."""
    from .errors import UserError

    choices = [n for n, m in METHODS.items() if (m.is_online or not online) and (m.sweep or not sweep)]
    if name not in choices:
        raise UserError(f"{field} is {name!r}; choose one of {', '.join(choices)}")
    return METHODS[name]


def run_preflight(name: str, cfg, **in_memory) -> None:
    """Method ``name``'s preflight on ``cfg``: what ``tether <name>`` checks before any weights load. Every
    train function runs it first (``preflight=True``, its default), so a Python caller gets the same
    ``UserError`` as the command line. ``in_memory``: the data the train function was given instead of
    the config's files (an online method's ``prompts``/``eval_prompts``/``reward``/``log_rewards``, DPO's
    ``rows``/``eval_rows``), passed on so their file checks are skipped."""
    METHODS[name].load("preflight")(cfg, **in_memory)


def online_names() -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if m.is_online)


def sweep_names() -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if m.sweep)


for _spec in (
    MethodSpec(
        "sft",
        "supervised fine-tuning (makes the reference model)",
        config="tether.trainers.sft:SFTConfig",
        train="tether.trainers.sft:train_sft",
        preflight="tether.checks:preflight_sft",
        command="tether.commands.sft",
        sweep=False,
    ),
    MethodSpec(
        "rm",
        "train a Bradley-Terry reward model on preference pairs",
        config="tether.trainers.reward_model:RMConfig",
        train="tether.trainers.reward_model:train_reward_model",
        preflight="tether.checks:preflight_rm",
        command="tether.commands.rm",
        sweep=False,
    ),
    MethodSpec(
        "dpo",
        "offline preference optimisation: DPO and its variants",
        config="tether.trainers.dpo:DPOConfig",
        train="tether.trainers.dpo:train_dpo",
        preflight="tether.checks:preflight_dpo",
        command="tether.commands.dpo",
    ),
    MethodSpec(
        "ppo",
        "online RLHF: PPO with the KL-penalised reward",
        config="tether.trainers.ppo:PPOConfig",
        train="tether.trainers.ppo:train_ppo",
        online="tether.trainers.ppo:PPO",
        command="tether.commands.ppo",
    ),
    MethodSpec(
        "grpo",
        "online RL: GRPO (group-normalised advantages, KL in the loss)",
        config="tether.trainers.grpo:GRPOConfig",
        train="tether.trainers.grpo:train_grpo",
        online="tether.trainers.grpo:GRPO",
        command="tether.commands.grpo",
    ),
    MethodSpec(
        "rloo",
        "online RL: RLOO (leave-one-out baseline, KL in the reward)",
        config="tether.trainers.rloo:RLOOConfig",
        train="tether.trainers.rloo:train_rloo",
        online="tether.trainers.rloo:RLOO",
        command="tether.commands.rloo",
    ),
    MethodSpec(
        "bon",
        "best-of-n sampling baseline with its exact KL bound",
        config="tether.commands.bon:BoNConfig",
        train=None,
        preflight="tether.checks:preflight_bon_reward",
        command="tether.commands.bon",
    ),
):
    register_method(_spec)
