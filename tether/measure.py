"""Prompts for sampling: read them from a file, tokenize them.

Sampling, scoring and the KL itself are ``tether.engine`` (``measure``: what ``tether kl`` runs;
``evaluate``: what every trainer's evaluation runs).
"""

from __future__ import annotations

from typing import Optional, Sequence


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a ``prompt`` field."""
    import json
    from pathlib import Path

    text = Path(path).read_text()
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{i}: JSONL prompts need a 'prompt' field (found {sorted(row)})")
            if not isinstance(row["prompt"], str):
                raise ValueError(f"{path}:{i}: 'prompt' must be a string")
            out.append(row["prompt"])
    else:
        out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_length: Optional[int] = None) -> list[list[int]]:
    """Tokenize prompts with the tokenizer's BOS handling; error if one exceeds ``max_prompt_length``."""
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing; give it some text (or a tokenizer that adds BOS)")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; "
                "shorten it or raise the limit"
            )
        out.append(ids)
    return out
