"""Prompts for sampling: read them from a file, tokenize them.

Sampling, scoring and the KL itself are ``tether.engine`` (``measure``: what ``tether kl`` runs;
``evaluate``: what every trainer's evaluation runs).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .errors import UserError


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a ``prompt`` field."""
    import json
    from pathlib import Path

    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(row, dict) or "prompt" not in row:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path}:{i}: JSONL prompts need a 'prompt' field (found {found})")
            if not isinstance(row["prompt"], str):
                got = "null" if row["prompt"] is None else type(row["prompt"]).__name__
                raise UserError(f"{path}:{i}: 'prompt' is {got}; it must be a string (fix or remove the row)")
            out.append(row["prompt"])
    else:
        out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise UserError(f"{path}: no prompts found; give one prompt per line (or JSONL with a 'prompt' field)")
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_length: Optional[int] = None) -> list[list[int]]:
    """Tokenize prompts with the tokenizer's BOS handling; error if one exceeds ``max_prompt_length``."""
    out = []
    bos = getattr(tokenizer, "bos_token", None)
    for i, p in enumerate(prompts):
        # a chat-rendered prompt already starts with the template's BOS: do not add a second one
        ids = tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"]
        if not ids:
            raise UserError(f"prompt {i} tokenizes to nothing; give it some text (or a tokenizer that adds BOS)")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise UserError(
                f"prompt {i} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; "
                "shorten it or raise the limit"
            )
        out.append(ids)
    return out
