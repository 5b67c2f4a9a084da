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
from .text import column_map, eval_split_of, read_rows, rename_columns


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


def load_prompts(
    spec: str,
    *,
    tokenizer=None,
    chat_template: Optional[str] = None,
    prompt_field: str = "prompt",
    columns=None,
    split: str = "train",
    assets: Optional[str] = None,
) -> list[Prompt]:
    """Every prompt of ``spec`` (see the module docstring), in file order."""
    if not spec or not str(spec).strip():
        raise UserError(
            "prompts is empty: pass --prompts FILE (text, .jsonl, .json, .parquet), a datasets folder or a hub name"
        )
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
