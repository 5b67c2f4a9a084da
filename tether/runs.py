"""Run directories: resolved config, metrics (JSONL + TensorBoard), atomic checkpoints, resume.

Layout of ``output_dir``::

    config.yaml          the resolved config of the run
    metrics.jsonl        one JSON object per logged step, with "step"
    tb/                  TensorBoard events
    samples.jsonl        sample completions logged every N steps (trainers that generate)
    checkpoints/step-N/  model (safetensors), optimizer.pt, scheduler.pt, trainer_state.pt
    final/               the trained model in Hugging Face format

Checkpoints are written to ``step-N.tmp`` and renamed into place (``os.replace`` is atomic), so an
interruption never leaves a half-written checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import save_config

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().tolist()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class RunDir:
    """Owns a run's output folder. Only the main process (``is_main``) writes."""

    def __init__(self, output_dir: str | os.PathLike, *, is_main: bool = True, tensorboard: bool = True):
        self.path = Path(output_dir)
        self.is_main = is_main
        self._tb = None
        self._tensorboard = tensorboard
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg) -> None:
        if self.is_main:
            save_config(cfg, self.path / "config.yaml")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path / "tb"))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.is_main:
            with open(self.path / "samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": int(step), **s}) + "\n")

    def truncate_logs(self, step: int) -> None:
        """On resume from ``step``: drop logged rows after it so the files continue cleanly."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            p = self.path / name
            if p.exists():
                rows = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
                p.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def latest_checkpoint(self) -> Optional[Path]:
        if not self.checkpoints.is_dir():
            return None
        steps = [
            (int(p.name.split("-")[1]), p)
            for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
        ]
        return max(steps)[1] if steps else None

    def save_checkpoint(self, step: int, *, model, state: dict, keep: int = 2) -> Optional[Path]:
        """Atomically write ``checkpoints/step-N``: the model in HF format (safetensors) and
        ``trainer_state.pt`` holding ``state`` (optimizer, scheduler, controller, RNG, data position...)."""
        if not self.is_main:
            return None
        final = self.checkpoints / f"step-{step}"
        tmp = self.checkpoints / f"step-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(
            (int(p.name.split("-")[1]), p) for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
        )
        for _, p in done[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint_state(ckpt: Path) -> dict:
        return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def save_model(model, path: Path, *, tokenizer=None, merge_lora: bool = False) -> None:
    """Save in Hugging Face format (safetensors). A peft model is saved as an adapter, or merged into
    the base weights (loadable with ``AutoModelForCausalLM``) with ``merge_lora``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def save_final(model, output_dir: Path, *, tokenizer=None, merge_lora: bool = True, is_main: bool = True) -> Path:
    """Write ``final/`` atomically (tmp folder + rename)."""
    final = Path(output_dir) / "final"
    if not is_main:
        return final
    tmp = Path(output_dir) / "final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, tokenizer=tokenizer, merge_lora=merge_lora)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_model_weights(model, ckpt_model_dir: Path) -> None:
    """Load weights saved by ``save_model`` (full model or peft adapter) into ``model`` in place."""
    from safetensors.torch import load_file

    ckpt_model_dir = Path(ckpt_model_dir)
    adapter = ckpt_model_dir / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(ckpt_model_dir.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once: lm_head.weight may legitimately be "missing".
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_model_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
