"""Test configuration: real assets from ../shared/assets (never copied into the repo)."""

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
