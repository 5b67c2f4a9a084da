"""One resolver for the real models and data tether's tests, benchmarks and demo use.

Lookup order for an asset folder laid out like ``../shared/assets`` (see its README):

1. an explicit ``--assets DIR`` (the ``assets`` argument);
2. the ``TETHER_ASSETS`` environment variable;
3. a cache folder (``TETHER_CACHE`` or ``~/.cache/tether/assets``), filled on first use by
   downloading the same things from their public homes (Hugging Face hub). Offline, step 3 fails
   with an error that says to pass ``--assets``.

Names: ``stories260K`` (a Hugging Face model folder), ``rt-polarity`` (``rt-polarity.pos``/``.neg``),
``hh-rlhf`` (``harmless-base-test.jsonl.gz``).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Optional

from .errors import UserError

ASSETS = {
    "stories260K": ("config.json", "model.safetensors", "tokenizer.json"),
    "rt-polarity": ("rt-polarity.pos", "rt-polarity.neg"),
    "hh-rlhf": ("harmless-base-test.jsonl.gz",),
}


class AssetError(UserError, RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether")) / "assets"


def assets_root(assets: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The user-chosen assets folder (argument, then TETHER_ASSETS), or None."""
    for candidate in (assets, os.environ.get("TETHER_ASSETS")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise AssetError(f"assets folder {path} does not exist (from --assets or TETHER_ASSETS)")
            return path
    return None


def _complete(folder: Path, name: str) -> bool:
    return all((folder / f).exists() for f in ASSETS[name])


def resolve(name: str, assets: Optional[str | os.PathLike] = None, *, download: bool = True) -> Path:
    """Path of the asset folder ``name``; downloads into the cache if no assets folder has it."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    root = assets_root(assets)
    if root is not None:
        if _complete(root / name, name):
            return root / name
        raise AssetError(f"{root / name} is missing or incomplete (needs {ASSETS[name]})")
    cached = cache_dir() / name
    if _complete(cached, name):
        return cached
    if not download:
        raise AssetError(f"asset {name!r} not found: pass --assets DIR or set TETHER_ASSETS")
    cached.mkdir(parents=True, exist_ok=True)
    try:
        _DOWNLOADERS[name](cached)
    except ImportError as e:  # an optional dependency of the conversion (sentencepiece): not a network problem
        raise AssetError(f"could not build asset {name!r}: {e}. Or pass --assets DIR / set TETHER_ASSETS.") from e
    except Exception as e:  # network errors, hub errors
        raise AssetError(
            f"could not download asset {name!r} ({type(e).__name__}: {e}). Offline? Pass --assets DIR or set "
            "TETHER_ASSETS to a folder laid out like shared/assets."
        ) from e
    return cached


def resolve_model(model: str, assets: Optional[str | os.PathLike] = None) -> str:
    """A model argument: an existing path or hub name is returned as is; the short name
    ``stories260K`` resolves through the assets."""
    if model in ASSETS and not Path(model).exists():
        return str(resolve(model, assets))
    return model


def _download_rt_polarity(dest: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("cornell-movie-review-data/rotten_tomatoes")
    lines = {0: [], 1: []}
    for split in ds.values():
        for row in split:
            lines[int(row["label"])].append(row["text"].strip())
    (dest / "rt-polarity.neg").write_text("\n".join(lines[0]) + "\n")
    (dest / "rt-polarity.pos").write_text("\n".join(lines[1]) + "\n")


def _download_hh(dest: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    tmp = dest / "harmless-base-test.jsonl.gz.tmp"
    with gzip.open(tmp, "wt") as f:
        for row in ds:
            f.write(json.dumps({"chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
    os.replace(tmp, dest / "harmless-base-test.jsonl.gz")


def _download_stories(dest: Path) -> None:
    from huggingface_hub import hf_hub_download

    from .llama2c import convert_llama2c_checkpoint

    ckpt = hf_hub_download("karpathy/tinyllamas", "stories260K/stories260K.pt")
    tok = hf_hub_download("karpathy/tinyllamas", "stories260K/tok512.model")
    convert_llama2c_checkpoint(ckpt, tok, dest)


_DOWNLOADERS = {"rt-polarity": _download_rt_polarity, "hh-rlhf": _download_hh, "stories260K": _download_stories}
