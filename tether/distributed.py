"""Several processes: data parallelism with torch.distributed, launched by ``accelerate launch`` or
``torchrun`` (both set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).

Exactness rule (2 processes == 1): every process computes its shard's loss *sum* divided by the
**global** normaliser (token or sequence count over all processes and micro-batches), and gradients
are all-reduced with SUM. The result equals the single-process full-batch gradient up to float
summation order, which is what the 2-process == 1-process test checks. Metrics are reduced here
and nowhere else.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def quiet_other_ranks() -> bool:
    """Under torchrun or accelerate (``RANK`` set), let only rank 0 talk: on every other process,
    stdout goes to /dev/null (tables, the final JSON summary), logging shows errors only, Python
    warnings are ignored and Hugging Face progress bars are off. stderr stays open, so an exception on
    any rank is still seen. Returns True if this process was quietened. Called once by the CLI."""
    import logging
    import sys
    import warnings

    if int(os.environ.get("RANK", "0")) == 0:
        return False
    for var in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ[var] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    sys.stdout = open(os.devnull, "w")
    return True


_OWN_GROUP = False  # True when tether initialised the process group (and so must destroy it)


def process_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process, as torchrun
    and accelerate launch them), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA (gloo cannot reduce CUDA tensors
    fast, and FSDP2's collectives on CUDA need NCCL), gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


_WARNED_LAUNCH = False


def launcher_gave_one_process(env=os.environ) -> bool:
    """Whether ``accelerate launch`` was asked for several processes but started one. Its single-process
    launcher (used on a CPU-only machine unless MPI is configured) sets MASTER_ADDR / MASTER_PORT when
    ``--num_processes`` > 1 but no RANK / WORLD_SIZE: the run then trains alone, at the full batch."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env
    return launched_by_accelerate and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "RANK" not in env


class Dist:
    """Process-group facade; a single process behaves as world_size 1 with no communication."""

    def __init__(self) -> None:
        global _WARNED_LAUNCH
        if not _WARNED_LAUNCH and launcher_gave_one_process():
            _WARNED_LAUNCH = True
            import logging

            logging.getLogger(__name__).warning(
                "accelerate launch asked for several processes but started one (on a machine without GPUs it "
                "runs a single process unless MPI is set up): this run trains in 1 process; for several CPU "
                "processes use torchrun --nproc_per_node N -m tether ... (docs/distributed.md)"
            )
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = process_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's communicator and every default-device op use this GPU
        if self.world_size > 1 and not dist.is_initialized():
            global _OWN_GROUP
            backend = process_group_backend(self.device)
            dist.init_process_group(backend, **({"device_id": self.device} if backend == "nccl" else {}))
            _OWN_GROUP = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This process's contiguous slice of a global batch (sizes must divide exactly)."""
        if len(items) % self.world_size:
            raise ValueError(f"global batch of {len(items)} does not divide over {self.world_size} processes")
        n = len(items) // self.world_size
        return items[self.rank * n : (self.rank + 1) * n]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def sum_float(self, x: float) -> float:
        return float(self.sum(torch.tensor(float(x), dtype=torch.float64)))

    def all_gather_float(self, values: list[float]) -> list[float]:
        """Concatenate equal-length lists of floats from every process (rank order)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [v for o in out for v in o.tolist()]

    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce SUM of gradients (losses are already divided by global normalisers)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None and type(p.grad) is torch.Tensor:  # fsdp's DTensor grads are reduce-scattered already
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def broadcast_params(self, module: torch.nn.Module) -> None:
        """Make every process start from rank 0's weights."""
        if self.enabled:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)

    def reduce_metrics(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Global means: Σ_processes sums[k] / Σ_processes counts[k] (one all-reduce)."""
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64)
        t = self.sum(t)
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() if t[n + i] > 0 else float("nan") for i, k in enumerate(keys)}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def finish(self) -> None:
        """End of a training run: wait for every process (rank 0 may still be writing final/), then
        destroy the process group if tether created it. Without this a rank that finishes first exits
        with gloo's threads alive, and the C++ runtime aborts it ("terminate called without an active
        exception", exit -6), which fails the whole launch. A group the caller created is left alone."""
        global _OWN_GROUP
        if self.enabled and dist.is_initialized():
            dist.barrier()
            if _OWN_GROUP:
                dist.destroy_process_group()
                _OWN_GROUP = False
