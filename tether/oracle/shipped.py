"""Train a tabular problem with the trainers tether ships, and read the learned policy back exactly.

``tether certify`` judges the code users run: the problem's reference policy is written as a Hugging
Face causal LM (``oracle.lm``: a logit table behind ``AutoModelForCausalLM``, with a word-level
tokenizer), the shipped trainer — ``tether.trainers.online.train_online`` (PPO, GRPO, RLOO) or
``tether.trainers.dpo.train_dpo`` — trains it from that folder with its own sampler, scoring,
reference form, β controller, filters, temperature, dtype, micro-batching and process reductions,
and the model it saves in ``final/`` is loaded and read back as a ``TabularPolicy``, whose distance to
the target is then computed by enumerating every sequence.

Nothing here re-implements a method: the runners only build configs, data and reward functions.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .lm import preference_rows, prompt_texts, reward_function, save_tabular_lm, tabular_policy
from .tabular import TabularPolicy, TabularProblem

SAMPLES = 64  # completions per prompt per step in the online rows (the Monte-Carlo budget of a gradient)


@dataclass
class TrainerRun:
    """What a shipped trainer produced on the tabular problem."""

    policy: TabularPolicy  # the learned policy (from final/), float64
    history: list = field(default_factory=list)  # per-step metrics as the trainer logged them
    trainer: str = ""  # the shipped function that trained it


def _load_final(final: str, problem: TabularProblem) -> TabularPolicy:
    from tether.modeling import load_causal_lm

    return tabular_policy(load_causal_lm(final), problem.space)


def online_config(cls, problem: TabularProblem, *, samples: int = SAMPLES, **overrides):
    """A config of ``cls`` (PPOConfig, GRPOConfig, RLOOConfig) for the problem: every step draws
    ``samples`` completions of every prompt (one full pass over the repeated prompt list), completions
    of at most the horizon, cosine learning-rate decay, nothing written but the final model."""
    G = overrides.get("samples_per_prompt", cls.samples_per_prompt)
    P = problem.space.n_prompts
    if samples % G:
        raise ValueError(f"samples={samples} per prompt must divide into groups of {G}")
    base = dict(
        batch_size=P * samples,
        max_new_tokens=problem.space.horizon,
        learning_rate=0.05,
        lr_schedule="cosine",
        max_steps=60,
        eval_every=0,
        save_every=0,
        sample_every=0,
        log_every=10_000,
        progress=False,
        eval_max_prompts=P,
        eval_samples=2,
        seed=0,
    )
    base.update(overrides)
    return cls(**base)


def run_online(problem: TabularProblem, cfg, *, method=None, workdir: Optional[str] = None) -> TrainerRun:
    """Train ``cfg`` (an OnlineConfig subclass from ``online_config``) with ``train_online`` on the
    problem's reward; ``model``/``output_dir`` are filled in here. Runs in ``workdir`` (a temporary
    folder by default, removed afterwards)."""
    from tether.trainers.online import train_online

    with _folder(workdir) as d:
        model = save_tabular_lm(problem, Path(d) / "model")
        cfg = dataclasses.replace(cfg, model=str(model), output_dir=str(Path(d) / "run"))
        G = cfg.samples_per_prompt
        per_prompt = cfg.batch_size // (G * problem.space.n_prompts)
        prompts = prompt_texts(problem.space) * per_prompt  # each step visits every copy once
        res = train_online(cfg, method=method, prompts=prompts, reward=reward_function(problem))
        return TrainerRun(_load_final(res["final"], problem), res["history"], "tether.trainers.online.train_online")


def run_online_distributed(problem: TabularProblem, cfg, *, world_size: int = 2, method=None) -> TrainerRun:
    """``run_online`` in ``world_size`` processes on this machine (gloo over the loopback address, as
    ``torchrun`` would set them up): each process samples its shard of the prompts, losses use the
    global counts and gradients are all-reduced (``tether.distributed``). Returns rank 0's result."""
    import multiprocessing
    import socket

    with _folder(None) as d, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        model = save_tabular_lm(problem, Path(d) / "model")
        cfg = dataclasses.replace(cfg, model=str(model), output_dir=str(Path(d) / "run"))
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_distributed_worker, args=(rank, world_size, port, problem, cfg, method))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a {world_size}-process run failed (exit codes {[p.exitcode for p in procs]})")
        import json

        history = json.loads((Path(d) / "history.json").read_text())
        return TrainerRun(
            _load_final(str(Path(d) / "run" / "final"), problem),
            history,
            f"tether.trainers.online.train_online ({world_size} processes)",
        )


def _distributed_worker(rank: int, world_size: int, port: int, problem: TabularProblem, cfg, method) -> None:
    import json
    import os

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from tether.trainers.online import train_online

    per_prompt = cfg.batch_size // (cfg.samples_per_prompt * problem.space.n_prompts)
    res = train_online(
        cfg, method=method, prompts=prompt_texts(problem.space) * per_prompt, reward=reward_function(problem)
    )
    if rank == 0:
        (Path(cfg.output_dir).parent / "history.json").write_text(json.dumps(res["history"]))
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def run_dpo(problem: TabularProblem, cfg, rows: Sequence[dict], *, workdir: Optional[str] = None) -> TrainerRun:
    """Train ``cfg`` (a DPOConfig) with ``train_dpo`` on ``rows`` (TRL-style explicit preference rows
    spelled in the problem's tokens, ``lm.preference_rows``); the whole dataset is one batch unless the
    config says otherwise."""
    from tether.trainers.dpo import train_dpo

    history: list = []
    with _folder(workdir) as d:
        model = save_tabular_lm(problem, Path(d) / "model")
        cfg = dataclasses.replace(cfg, model=str(model), output_dir=str(Path(d) / "run"))
        res = train_dpo(
            cfg, rows=list(rows), eval_rows=list(rows[:8]), callback=lambda step, m: history.append({"step": step, **m})
        )
        return TrainerRun(_load_final(res["final"], problem), history, "tether.trainers.dpo.train_dpo")


def dpo_config(problem: TabularProblem, n_rows: int, **overrides):
    """A DPOConfig for the tabular problem: full-batch steps over the ``n_rows`` rows, the exact
    tabular sequences (no EOS appended: completions spell it), cosine decay, nothing evaluated."""
    from tether.trainers.dpo import DPOConfig

    base = dict(
        batch_size=n_rows,
        max_steps=150,
        learning_rate=0.05,
        lr_schedule="cosine",
        add_eos=False,
        max_length=2 * problem.space.horizon + 2,
        kl_prompts=0,
        eval_pairs=8,
        eval_every=0,
        save_every=0,
        log_every=10_000,
        progress=False,
        shuffle=False,
        group_by_length=False,
        seed=0,
    )
    base.update(overrides)
    return DPOConfig(**base)


class _folder:
    """A given folder, or a temporary one removed on exit."""

    def __init__(self, path: Optional[str]):
        self.path, self.tmp = path, None

    def __enter__(self) -> str:
        if self.path is not None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return self.path
        self.tmp = tempfile.TemporaryDirectory(prefix="tether-certify-")
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()
        return False


__all__ = [
    "SAMPLES",
    "TrainerRun",
    "dpo_config",
    "online_config",
    "preference_rows",
    "run_dpo",
    "run_online",
    "run_online_distributed",
]
