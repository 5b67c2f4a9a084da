"""Test configuration: real assets from ../shared/assets (never copied into the repo)."""

import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_shared = ROOT.parent / "shared" / "assets"
if not os.environ.get("TETHER_ASSETS") and _shared.is_dir():
    os.environ["TETHER_ASSETS"] = str(_shared)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tests run as 2 xdist workers on 2 cores


def _assets() -> Path:
    path = os.environ.get("TETHER_ASSETS")
    if not path or not Path(path).is_dir():
        pytest.skip("real assets not available: set TETHER_ASSETS to a folder laid out like shared/assets")
    return Path(path)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return _assets()


@pytest.fixture(scope="session")
def stories_path(assets_dir) -> str:
    return str(assets_dir / "stories260K")


@pytest.fixture(scope="session")
def stories(stories_path):
    """(tokenizer, model) of the real stories260K, loaded once per worker; tests must not mutate it."""
    from tether.modeling import load_causal_lm, load_tokenizer

    return load_tokenizer(stories_path), load_causal_lm(stories_path)


# Float32 tolerances. Rounding is relative: each float32 operation may be off by half a spacing of
# its result, and the spacing near x is about F32_EPS·|x|. An error budget therefore scales with the
# largest quantities a result was computed from, not with the result: DPO's loss at π_θ = π_ref is
# ln 2 ≈ 0.69, but it is computed from sequence log-prob sums of ~-150 nats, whose float32 spacing is
# 1.5e-5; β·(c - c_ref - r + r_ref) of four such sums moves the loss by up to β/2 times their rounding.
F32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23: the spacing of float32 numbers in [1, 2)


def f32_tol(*magnitudes: float, ulps: float = 8) -> float:
    """Absolute tolerance for a float32 result compared with its exact value: ``ulps`` float32
    spacings of each magnitude it was computed from, added up (pass every large intermediate, each
    weighted by how much it moves the result). ``ulps`` = 8 covers rounding accumulated over a few
    dozen operations (a sum of T terms drifts by about √T spacings in practice) with a margin; a test
    that needs more says why."""
    return ulps * F32_EPS * sum(abs(float(m)) for m in magnitudes)


def dpo_log2_tol(row: dict, beta: float) -> float:
    """Tolerance of a logged DPO loss at π_θ = π_ref against ln 2 (rows of metrics.jsonl).

    loss = mean_i -log σ(h_i), h_i = β((c_i - c_ref,i) - (r_i - r_ref,i)), exactly 0 in exact
    arithmetic. d(-log σ(h))/dh = -1/2 at h = 0, so rounding δ in the four sequence sums moves the
    loss by (β/2)·Σ|δ| ≤ (β/2)·k·F32_EPS·(|c| + |c_ref| + |r| + |r_ref|) = k·F32_EPS·β·(|c| + |r|)
    (the reference sums equal the policy's; log-probs are negative, so the mean of |·| is |mean|),
    plus the rounding of ln 2 itself. Measured on stories260K (48 tokens, β = 0.1, 4 seeds x 3
    steps): at most 0.41 of the k = 1 budget; the flaky abs=1e-6 was 0.3 of it."""
    return f32_tol(math.log(2), beta * (abs(row["logps/chosen"]) + abs(row["logps/rejected"])))
