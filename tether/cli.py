"""The ``tether`` command: ``tether <command> [--flags]``. Each tool lives in ``tether/commands/<name>.py``
with a ``main(argv)``; the training methods (and their help lines) come from ``tether.registry``, whose
online methods without a module of their own run the shared online command. Imports are lazy so
``tether --help`` is fast.

Errors: a bad input (``tether.errors.UserError``, a file the user named that is missing or unreadable)
ends as one line ``tether <command>: error: <message>`` on stderr with exit code 2 and no traceback;
argparse's own errors (unknown flag, bad value) also exit 2 with its usage line. ``--debug`` anywhere
on the command line (or ``TETHER_DEBUG=1``) shows the traceback instead. Any other exception is a bug
and keeps its traceback.

Exit codes: 0 done; 2 bad input, a run directory in use by another process, or a failing write (full
disk, I/O error: the message names the path and the cause); 75 stopped by SIGTERM, SIGINT or SIGUSR1
after writing a checkpoint (``--resume`` continues it; tether.preempt); 1 a bug (with its traceback).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from .registry import METHODS

TOOLS = {  # commands that are not training methods: tether/commands/<name>.py
    "kl": "measure KL[policy‖reference] with every estimator side by side",
    "certify": "certify each training method against the exact KL-regularised optimum",
    "sweep": "run a grid of one trainer's settings and draw the reward-KL frontier (choosing β)",
    "demo": "the reward-KL frontier on a real tiny model (the main job)",
    "forgetting": "forgetting probe: NLL change and exact KLs on off-distribution text, forward KL on prompts",
    "reference-check": (
        "score candidate references on preference data: NLL of chosen/rejected, "
        "how often the reference finds chosen likely"
    ),
    "shift": "reference-shift diagnostic: does a prompt prefix move log π_ref(y|x) and the policy's KL?",
}


def commands() -> dict[str, str]:
    """name -> one-line help: the tools, then every method of ``tether.registry`` (registered ones too)."""
    tools = list(TOOLS.items())
    return {**dict(tools[:2]), **{name: m.help for name, m in METHODS.items()}, **dict(tools[2:])}


COMMANDS = commands()  # as tether was installed (``commands()`` also lists methods registered later)


EXIT_CODES = (
    "exit codes: 0 done; 2 bad input, output_dir in use by another run, or a failing write (full disk); "
    "75 stopped by SIGTERM/SIGINT/SIGUSR1 after writing a checkpoint (continue with --resume); "
    "1 a bug (docs/reliability.md)"
)


def usage() -> str:
    cmds = commands()
    width = max(map(len, cmds))
    lines = ["usage: tether <command> [--flags]   (tether <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in cmds.items()]
    lines += ["", EXIT_CODES]
    return "\n".join(lines)


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere in argv (removed before the command parses it) or TETHER_DEBUG=1."""
    flag = "--debug" in argv
    env = os.environ.get("TETHER_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    return flag or env, [a for a in argv if a != "--debug"]


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an exception caused by bad user input, or None for a bug."""
    from .errors import UserError

    if isinstance(e, UserError):
        return " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and e.filename:
        what = {
            FileNotFoundError: "no such file or folder",
            IsADirectoryError: "is a folder, not a file",
            NotADirectoryError: "a part of this path is not a folder",
            PermissionError: "permission denied",
        }.get(type(e), e.strerror)
        return f"{e.filename}: {what}; check the path"
    if isinstance(e, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
            "(run with --debug to see which read failed)"
        )
    return None


def main(argv=None) -> int:
    debug, argv = _debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands():
        print(f"tether: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .distributed import quiet_other_ranks

    quiet_other_ranks()  # torchrun / accelerate: only rank 0 prints
    if name in METHODS and METHODS[name].command is None:  # an online method without a module of its own
        from .commands.ppo import online_command

        run = lambda argv: online_command(name, argv)  # noqa: E731
    else:
        module = METHODS[name].command if name in METHODS else f"tether.commands.{name.replace('-', '_')}"
        run = importlib.import_module(module).main  # reference-check -> reference_check
    from .preempt import EXIT_PREEMPTED, Preempted

    try:
        return int(run(rest) or 0)
    except Preempted as e:  # a signal: the step in flight finished and was checkpointed
        print(f"tether {name}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as e:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        message = None if debug else user_error_message(e)
        if message is None:
            raise
        print(f"tether {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
