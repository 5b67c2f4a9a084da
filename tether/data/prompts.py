"""Prompts for sampling: the ``--prompts`` of ``ppo`` / ``grpo`` / ``rloo`` / ``bon`` and ``tether kl``.

A prompts argument is one of:

- a text file: one prompt per non-blank line;
- ``.jsonl`` / ``.json`` / ``.parquet`` (optionally ``.gz``): rows with a ``prompt`` field (or the
  column named by ``prompt_field`` / mapped by ``columns``) holding a string, or a conversation (a
  list of ``{"role", "content"}`` messages, TRL's conversational prompt format);
- a folder written by ``datasets.save_to_disk`` (its ``train`` split; a ``DatasetDict``'s
  ``test`` / ``validation`` split serves as evaluation prompts when none are given) or a folder of
  data files;
- a Hugging Face hub dataset name (``datasets.load_dataset``; offline, an error says what to pass).

A conversation is rendered with the chat template and its generation prompt
(``tether.data.chat.render_prompt``), so the sampler continues where the assistant's answer
starts. Every other column of a row is kept in ``Prompt.columns``; reward functions receive them
(TRL's ``fn(prompts, completions, **columns)``, ``tether.rewards.reward_columns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import UserError
from .chat import check_messages, is_messages, render_prompt, use_template
from .text import LineRows, column_map, eval_split_of, read_rows, rename_columns


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``text``: what the sampler continues (a conversation rendered with its template);
    ``prompt``: as in the data (a string, or the list of messages); ``columns``: the row's other fields."""

    text: str
    prompt: Any = None
    columns: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def prompt_from_row(
    row: Any, *, where: str, tokenizer=None, chat_template: Optional[str] = None, prompt_field: str = "prompt"
) -> Prompt:
    """One row (a string, or a dict with ``prompt_field``) -> ``Prompt``."""
    if isinstance(row, str):
        return Prompt(row, row)
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: expected a string or an object with a {prompt_field!r} field, got {type(row).__name__}"
        )
    if prompt_field not in row:
        raise UserError(
            f"{where}: no {prompt_field!r} field (found {sorted(row)}); name the prompt column with "
            "--prompt_field NAME or map it with --columns SOURCE=prompt"
        )
    p = row[prompt_field]
    cols = {k: v for k, v in row.items() if k != prompt_field}
    if isinstance(p, str):
        return Prompt(p, p, cols)
    if is_messages(p):
        msgs = check_messages(p, f"{where} field {prompt_field!r}")
        if tokenizer is None:
            raise UserError(f"{where}: conversational prompts need the model's tokenizer (to apply its chat template)")
        use_template(tokenizer, chat_template, where=where)
        return Prompt(render_prompt(tokenizer, msgs), msgs, cols)
    raise UserError(
        f"{where}: field {prompt_field!r} must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(p).__name__}"
    )


def as_prompts(
    items: Sequence,
    *,
    tokenizer=None,
    chat_template: Optional[str] = None,
    prompt_field: str = "prompt",
    where: str = "prompts",
) -> list[Prompt]:
    """Prompts from rows already in memory: strings, dicts (as in a data file) or ``Prompt`` objects."""
    return [
        p
        if isinstance(p, Prompt)
        else prompt_from_row(
            p, where=f"{where} row {i}", tokenizer=tokenizer, chat_template=chat_template, prompt_field=prompt_field
        )
        for i, p in enumerate(items)
    ]


class PromptTable(Sequence):
    """The prompts of a large text / ``.jsonl`` file, built on demand: ``table[i]`` is the ``Prompt``
    that ``load_prompts`` would give as its i-th, but only the line offsets are held
    (``tether.data.text.LineRows``), not a list of rows. Every row is checked once when the table is
    built (the same errors as ``load_prompts``, in the same order), then dropped. ``texts`` is the
    sequence of prompt texts, also built on demand."""

    def __init__(self, rows: LineRows, mapping: dict, *, where: str, **kw):
        self.rows, self.mapping, self.where, self.kw = rows, mapping, where, kw
        seen: set = set()
        for i in range(len(rows)):
            row = rows[i]
            if isinstance(row, dict):
                seen.update(k for k in mapping if k in row)
            try:
                self[i]
            except UserError:
                self._check_columns(seen, start=i + 1)  # a mapping typo is reported first, as rename_columns does
                raise
        self._check_columns(seen, start=len(rows))

    def _check_columns(self, seen: set, *, start: int) -> None:
        missing = [c for c in self.mapping if c not in seen]
        if not missing:
            return
        for j in range(start, len(self.rows)):
            row = self.rows[j]
            if isinstance(row, dict):
                seen.update(k for k in missing if k in row)
        still = [c for c in missing if c not in seen]
        first = next((r for r in (self.rows[j] for j in range(len(self.rows))) if isinstance(r, dict)), None)
        if still and first is not None:
            raise UserError(
                f"{self.where}: column(s) {still} named in the column mapping are not in the data "
                f"(its columns: {sorted(first)}); fix --columns / --*_field"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        row = self.rows[i]
        if self.mapping and isinstance(row, dict):
            row = {self.mapping.get(k, k): v for k, v in row.items()}
        return prompt_from_row(row, where=f"{self.where} row {i}", **self.kw)

    @property
    def texts(self) -> "_Texts":
        return _Texts(self)


class _Texts(Sequence):
    def __init__(self, table: "PromptTable | PromptSubset"):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [p.text for p in self.table[i]]
        return self.table[i].text


class PromptSubset(Sequence):
    """The rows ``indices`` (a 1-D int64 tensor) of a ``PromptTable``, in that order, still built on demand:
    what is left of a large prompt file to train on once evaluation prompts are held out of it."""

    def __init__(self, table: Sequence, indices):
        self.table, self.indices = table, indices

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.table[int(j)] for j in self.indices[i]]
        return self.table[int(self.indices[i])]

    @property
    def texts(self) -> "_Texts":
        return _Texts(self)


def prompt_texts(prompts: Sequence) -> Sequence[str]:
    """The texts of ``prompts``: a list, or a ``PromptTable``'s texts built on demand."""
    return prompts.texts if isinstance(prompts, (PromptTable, PromptSubset)) else [p.text for p in prompts]


def hold_out_prompts(rows: Sequence, n_eval: int, *, seed: int) -> tuple[Sequence, list]:
    """(training prompts, ``n_eval`` evaluation prompts): a seeded random part of ``rows`` held out, the
    rest kept in file order (a ``PromptTable`` stays on demand: a ``PromptSubset`` of it)."""
    import torch

    from .. import rng

    n = len(rows)
    if n_eval <= 0:
        return rows, []
    perm = torch.randperm(n, generator=rng.generator(seed + 104729))
    held = torch.sort(perm[:n_eval]).values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    kept = torch.nonzero(keep).flatten()
    evals = [rows[int(i)] for i in held]
    if isinstance(rows, list):
        return [rows[int(i)] for i in kept], evals
    return PromptSubset(rows, kept), evals


def load_prompts(
    spec: str,
    *,
    tokenizer=None,
    chat_template: Optional[str] = None,
    prompt_field: str = "prompt",
    columns=None,
    split: str = "train",
    assets: Optional[str] = None,
    lazy: bool = False,
) -> Sequence[Prompt]:
    """Every prompt of ``spec`` (see the module docstring), in file order. ``lazy``: for an uncompressed
    text or ``.jsonl`` file, a ``PromptTable`` (the same prompts, built on demand) instead of a list."""
    if not spec or not str(spec).strip():
        raise UserError(
            "prompts is empty: pass --prompts FILE (text, .jsonl, .json, .parquet), a datasets folder or a hub name"
        )
    if lazy and (lines := LineRows.open(spec)) is not None:
        if not len(lines):
            raise UserError(f"{spec}: no prompts found")
        mapping = column_map(columns, prompt=prompt_field)
        return PromptTable(lines, mapping, where=spec, tokenizer=tokenizer, chat_template=chat_template)
    rows = read_rows(spec, assets=assets, split=split)
    rows = rename_columns(rows, column_map(columns, prompt=prompt_field), where=spec)
    out = as_prompts(rows, tokenizer=tokenizer, chat_template=chat_template, where=spec)
    if not out:
        raise UserError(f"{spec}: no prompts found")
    return out


def eval_prompts_split(spec: Optional[str], *, split: str = "train") -> Optional[str]:
    """The split of ``spec`` to draw evaluation prompts from when none are given: a saved
    ``DatasetDict``'s ``test`` (else ``validation``) split, or None."""
    return eval_split_of(spec, split=split)


def prompt_options(cfg) -> dict:
    """The ``load_prompts`` keywords a command's config sets (its prompt_field, columns, chat_template, assets)."""
    return dict(
        prompt_field=getattr(cfg, "prompt_field", "prompt"),
        columns=getattr(cfg, "columns", None),
        chat_template=getattr(cfg, "chat_template", None),
        assets=getattr(cfg, "assets", None),
    )
