"""Sharded training (``fsdp: true``, tether/fsdp.py) with 2 CPU processes on gloo, env as torchrun sets it.

- DPO: the 2-process sharded run follows the 1-process run (logged rows and final weights to 1e-5),
  its checkpoint resumes to the same last step, and final/ is a full Hugging Face model.
- GRPO: each rank samples its own prompts with its own generator (tests/test_online_trainers.py), so
  a 2-process run is compared with the 2-process *unsharded* run on the same samples: sharding must
  change nothing, with reference=copy sharded too.
- Memory: each process holds exactly its dim-0 chunk of every parameter (about half), checked
  inside the sharded DPO run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tether.data.preference import sentiment_pairs

from conftest import assert_close, measured_tol

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The little dog", "Once upon a time", "The sun was", "Lily and Tom", "A big tree", "The cat sat"]

_WORKER = """
import json, os, sys, torch
torch.set_num_threads(1)
import tether.training as training
from tether.fsdp import local_param_bytes
kind, cfg, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
shard = training.shard_model
def spy(model):  # the policy's parameter bytes on this process, once sharded, and the full shapes
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    out = shard(model)
    path = os.path.join(cfg["output_dir"], "mem%s.json" % os.environ["RANK"])
    open(path, "w").write(json.dumps({"local": local_param_bytes(model), "shapes": shapes}))
    return out
training.shard_model = spy
if kind == "dpo":
    from tether.trainers.dpo import DPOConfig, train_dpo
    train_dpo(DPOConfig(**cfg), resume=extra.get("resume", False))
else:
    from tether.trainers.grpo import GRPOConfig, train_grpo
    train_grpo(GRPOConfig(**cfg), prompts=extra["prompts"])
"""


def run_two(kind: str, cfg: dict, extra: dict | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, kind, json.dumps(cfg), json.dumps(extra or {})],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_weights(a, b, tol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def pairs_file(assets_dir, tmp_path_factory):
    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_pairs(pos, neg, n=48, seed=0)))
    return str(path)


def assert_half_the_parameters(out) -> None:
    """Each process holds rank r's torch.chunk(2) of dim 0 of every parameter: ceil(d0/2) rows on
    rank 0, floor on rank 1 (exact byte counts; float32 = 4 bytes), summing to the whole model."""
    mem = [json.loads((Path(out) / f"mem{r}.json").read_text()) for r in range(2)]
    shapes = mem[0]["shapes"]
    rest = {n: math.prod(s[1:]) for n, s in shapes.items()}
    want0 = sum(4 * math.ceil(s[0] / 2) * rest[n] for n, s in shapes.items())
    want1 = sum(4 * (s[0] // 2) * rest[n] for n, s in shapes.items())
    full = sum(4 * math.prod(s) for s in shapes.values())
    assert (mem[0]["local"], mem[1]["local"]) == (want0, want1)
    assert want0 + want1 == full and want0 <= 0.51 * full  # stories260K: 520,064 of 1,040,128 bytes each


@pytest.mark.slow
def test_dpo_two_sharded_processes_equal_one_and_resume(stories_path, pairs_file, tmp_path):
    """DPO, reference=copy sharded too, 3 steps of batch 4: half the parameter bytes per process; rows
    and final weights as 1 process; then
    the step-3 checkpoint is removed and the run resumed from step 2 (sharded weights and AdamW
    moments loaded from full tensors): step 3 and final/ come out the same again."""
    from tether.trainers.dpo import DPOConfig, train_dpo

    base = dict(
        model=stories_path,
        dataset=pairs_file,
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        max_length=48,
        eval_pairs=4,
        kl_prompts=0,
        progress=False,
        seed=0,
        reference="copy",
        save_every=2,
        report_to="none",
        padding_free=False,
    )  # fsdp trains padded (the packed path skips the root's all-gather)
    train_dpo(DPOConfig(**base, output_dir=str(tmp_path / "one")))
    run_two("dpo", {**base, "output_dir": str(tmp_path / "two"), "fsdp": True})
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert_half_the_parameters(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    # Sharded against unsharded over three steps: worst deviation 6.5e-6 over the kernel settings
    # (SSE4.2; 1.9e-6 native: tests/tolerance_report.py); log-prob sums (~-100) also get 1e-5 relative.
    for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "opt/grad_norm", "eval/rewards/accuracy"):
        assert_close(
            [r[k] for r in two if k in r], [r[k] for r in one if k in r], abs=measured_tol(6.5e-6), rel=1e-5, what=k
        )
    # Weights: Adam's first steps move each weight by ~lr·g/|g|, so a gradient element of rounding size
    # (two half-batch sums vs one batch) can move by up to 2·lr whatever the summation error: compare
    # the whole update instead. Measured: |Δ(two) - Δ(one)| / |Δ(one)| = 4.2e-5, 2 of 260,032
    # weights off by more than 1e-5 (3.0e-5 at most).
    w0, w1, w2 = weights(stories_path), weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert sorted(w1) == sorted(w2)
    diff = sum(float((w2[k] - w1[k]).pow(2).sum()) for k in w1) ** 0.5
    moved = sum(float((w1[k] - w0[k]).pow(2).sum()) for k in w1) ** 0.5
    assert moved > 0.1 and diff / moved < 1e-3, (diff, moved)
    assert sum(int(((w2[k] - w1[k]).abs() > 1e-5).sum()) for k in w1) <= 1e-4 * sum(v.numel() for v in w1.values())

    import shutil

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-3")
    shutil.copytree(tmp_path / "two" / "final", tmp_path / "final_before")
    run_two("dpo", {**base, "output_dir": str(tmp_path / "two"), "fsdp": True}, {"resume": True})
    again = rows(tmp_path / "two")
    assert [r["step"] for r in again] == [1, 2, 3]
    assert again[-1]["loss"] == pytest.approx(two[-1]["loss"], abs=1e-6)
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "final_before", 1e-6)


@pytest.mark.slow
def test_grpo_sharded_equals_unsharded(stories_path, tmp_path):
    """GRPO, 2 processes, reference=copy: fsdp=true logs the rows of fsdp=false (same samples: each rank's
    generator is seeded by (seed, step, rank)) and ends with the same full weights."""
    base = dict(
        model=stories_path,
        batch_size=8,
        samples_per_prompt=4,
        max_new_tokens=8,
        max_steps=2,
        learning_rate=1e-3,
        progress=False,
        sample_every=0,
        eval_max_prompts=2,
        eval_samples=1,
        report_to="none",
        beta=0.1,
        reward="reward_fns:length_reward",
        reference="copy",
        shared_prompt=False,  # fsdp keeps the padded layout (docs/speed.md): the same layout on both sides
    )  # a reward that varies within a group: updates
    run_two("grpo", {**base, "output_dir": str(tmp_path / "dp")}, {"prompts": PROMPTS})
    run_two("grpo", {**base, "output_dir": str(tmp_path / "fsdp"), "fsdp": True}, {"prompts": PROMPTS})
    dp, sh = rows(tmp_path / "dp"), rows(tmp_path / "fsdp")
    assert [r["step"] for r in sh] == [1, 2]
    # Both sum the same two per-rank gradients (all-reduce vs reduce-scatter): measured identical to the
    # last bit on gloo; 1e-5 leaves room for a backend that sums in another order.
    for k in ("grpo/policy_loss", "grpo/kl_loss", "kl/ref", "reward/score", "gen/response_len", "opt/grad_norm"):
        assert [r[k] for r in sh] == pytest.approx([r[k] for r in dp], rel=1e-5, abs=1e-5), k
    assert sh[1]["kl/ref"] > 0  # the policy moved, so the comparison is not of two untouched models
    assert_same_weights(tmp_path / "fsdp" / "final", tmp_path / "dp" / "final", 1e-5)


def test_fsdp_refuses_lora(stories_path, tmp_path):
    """fsdp with LoRA is refused with one line naming both fields (before any process group is needed)."""
    from tether.errors import UserError
    from tether.trainers.sft import SFTConfig
    from tether.training import check_fsdp

    with pytest.raises(UserError, match=r"fsdp=true .* with lora_r"):
        check_fsdp(SFTConfig(model=stories_path, fsdp=True, lora_r=4))


def test_accelerate_fsdp_config_turns_sharding_on(monkeypatch):
    """examples/accelerate_fsdp.yaml asks accelerate for FSDP2 (which exports ACCELERATE_USE_FSDP=true
    to the processes); tether reads that as fsdp=true."""
    import yaml

    from tether.trainers.sft import SFTConfig
    from tether.training import fsdp_requested

    spec = yaml.safe_load((ROOT / "examples" / "accelerate_fsdp.yaml").read_text())
    assert spec["distributed_type"] == "FSDP" and spec["fsdp_config"]["fsdp_version"] == 2
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested(SFTConfig()) and fsdp_requested(SFTConfig(fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_requested(SFTConfig())


def test_cli_refuses_fsdp_with_lora_before_loading(stories_path, pairs_file, tmp_path, capsys):
    """``tether dpo --fsdp true --lora_r 4``: exit 2, one line naming fsdp and lora_r, nothing written."""
    from tether.cli import main

    rc = main(
        [
            "dpo",
            "--model",
            stories_path,
            "--dataset",
            pairs_file,
            "--output_dir",
            str(tmp_path / "r"),
            "--fsdp",
            "true",
            "--lora_r",
            "4",
            "--max_steps",
            "1",
            "--progress",
            "false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fsdp=true" in err[0] and "lora_r" in err[0], err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
