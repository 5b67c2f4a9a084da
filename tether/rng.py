"""The one place random generators are made: from a seed and the device of the tensors they draw for.

torch keeps one random stream per device type: a CPU generator cannot fill a CUDA tensor
(``exponential_``, ``randint``, ``randperm`` refuse it) and a CUDA generator cannot fill a CPU one. So
every generator tether draws with is made here, on the device of the tensors it will fill, which is
the model's device for everything the sampler and the trainers draw (tokens, minibatch order) and the
CPU for host-side data order (dataset shuffles, whose indices go to Python lists).

Reproducibility (README "Reproducibility"): the same seed on the CPU gives the same draws, bit for
bit, as before this module existed (a CPU generator seeded ``s`` is ``torch.Generator().manual_seed(s)``).
On CUDA the stream is another one (Philox, not the CPU's Mersenne Twister), so CUDA samples are not the
CPU's; they repeat from run to run on one machine only where the kernels do (see the README).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

Device = Union[str, torch.device, None]


def mix(*keys: int) -> int:
    """One 62-bit seed from integers (seed, step, rank, purpose, ...): s <- s·1_000_003 + k, mod 2^62."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2**62)
    return s


def generator(seed: int, device: Device = None) -> torch.Generator:
    """A generator on ``device`` (default the CPU) seeded ``seed``. On the CPU it is exactly
    ``torch.Generator().manual_seed(seed)``: same-seed CPU runs keep their draws."""
    return torch.Generator(device=torch.device("cpu" if device is None else device)).manual_seed(int(seed))


def device_of(model) -> torch.device:
    """The device of ``model``'s first parameter (where its logits, and so every draw for them, live)."""
    return next(model.parameters()).device


def check(gen: Optional[torch.Generator], tensor: torch.Tensor, *, what: str = "generator") -> None:
    """Refuse a generator whose device type is not the tensor's, with the fix in the message (torch's own
    error names neither the caller nor the cure)."""
    if gen is not None and gen.device.type != tensor.device.type:
        raise ValueError(
            f"{what} is on {gen.device} but draws for a tensor on {tensor.device}; make it with "
            f"tether.rng.generator(seed, device) on the model's device"
        )
