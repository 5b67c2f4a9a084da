"""Prompts for sampling: read them from a file, tokenize them.

Sampling, scoring and the KL itself are ``tether.engine`` (``measure``: what ``tether kl`` runs;
``evaluate``: what every trainer's evaluation runs).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from .errors import UserError

log = logging.getLogger(__name__)


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


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, max_prompt_length: Optional[int] = None, start: int = 0
) -> list[list[int]]:
    """Tokenize prompts with the tokenizer's BOS handling; error if one exceeds ``max_prompt_length``.
    ``start``: the index of ``prompts[0]`` in the whole list (for the error messages)."""
    out = []
    bos = getattr(tokenizer, "bos_token", None)
    for i, p in enumerate(prompts):
        # a chat-rendered prompt already starts with the template's BOS: do not add a second one
        ids = tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"]
        if not ids:
            raise UserError(
                f"prompt {start + i} tokenizes to nothing; give it some text (or a tokenizer that adds BOS)"
            )
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise UserError(
                f"prompt {start + i} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; "
                "shorten it or raise the limit"
            )
        out.append(ids)
    return out


EAGER_ENCODE_PROMPTS = 100_000
"""Up to this many prompts are tokenised when a run starts (every length error up front); a larger
``PromptTable`` is tokenised on demand, the rows each step draws (``EncodedPrompts``)."""


class EncodedPrompts(Sequence):
    """``encode_prompts(tokenizer, texts)`` built on demand: ``ids[i]`` tokenises prompt i when first
    asked for (the same ids and the same errors, raised then), keeping the last ``cache`` results.
    For prompt sets too large to tokenise whole at start-up (a slow tokenizer takes ~0.2 ms a prompt)."""

    def __init__(self, tokenizer, texts: Sequence[str], *, max_prompt_length: Optional[int] = None, cache: int = 4096):
        from collections import OrderedDict

        self.tokenizer, self.texts, self.max_prompt_length, self.cache = tokenizer, texts, max_prompt_length, cache
        self._ids: "OrderedDict[int, list[int]]" = OrderedDict()
        self.encoded = 0  # prompts tokenised so far (the tests count them)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> list[int]:
        if i < 0:
            i += len(self)
        if i in self._ids:
            self._ids.move_to_end(i)
            return self._ids[i]
        ids = encode_prompts(self.tokenizer, [self.texts[i]], max_prompt_length=self.max_prompt_length, start=i)[0]
        self.encoded += 1
        self._ids[i] = ids
        if len(self._ids) > self.cache:
            self._ids.popitem(last=False)
        return ids


def prompt_ids(tokenizer, texts: Sequence[str], *, max_prompt_length: Optional[int] = None) -> Sequence[list[int]]:
    """The token ids of ``texts``: ``encode_prompts`` (a list), or ``EncodedPrompts`` for more than
    ``EAGER_ENCODE_PROMPTS`` prompts given as a lazy sequence (``data.prompts.PromptTable.texts``)."""
    if not isinstance(texts, list) and len(texts) > EAGER_ENCODE_PROMPTS:
        log.info("%d prompts: tokenised as steps draw them (a prompt's length errors surface at that step)", len(texts))
        return EncodedPrompts(tokenizer, texts, max_prompt_length=max_prompt_length)
    return encode_prompts(tokenizer, list(texts), max_prompt_length=max_prompt_length)
