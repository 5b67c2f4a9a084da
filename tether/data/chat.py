"""Conversational data: the one place where lists of ``{"role", "content"}`` messages become text.

Every trainer (SFT, DPO, PPO/GRPO/RLOO prompts, ``tether kl``, ``tether bon``) renders messages
with these functions, so a prompt is the same string, and the same tokens, wherever it is used:

- ``use_template(tokenizer, chat_template)``: installs ``--chat_template`` (a Jinja string or a file
  holding one) on the tokenizer; errors if neither it nor the tokenizer has a template.
  ``check_template`` reads and renders it without a tokenizer, before any weights load: a value that
  looks like a path and is not a file, or a template that cannot render a conversation, is an error.
- ``render_prompt``: a prompt's messages with the template's generation prompt (the text after
  which the assistant's answer starts; ``add_generation_prompt=True``), what the sampler continues.
- ``split_completion``: prompt messages + completion messages -> (prompt text, completion texts),
  split where the renderings stop agreeing (what DPO and SFT's prompt/completion rows use).
- ``assistant_spans``: a whole conversation -> its text and the character spans of the assistant
  turns, found by rendering prefixes: the turn of message j runs from the end of
  ``render(messages[:j], add_generation_prompt=True)`` to the end of ``render(messages[:j+1])``, so
  it includes whatever the template puts after the content (its end-of-turn token), which the model
  must learn to emit. SFT trains on exactly the tokens inside these spans. A template that marks
  assistant text with ``{% generation %}`` (Hugging Face's assistant mask) is read through that mask
  instead (``generation_spans``), which also serves templates whose prefixes are not prefixes of the
  whole conversation (e.g. ones that drop earlier turns' reasoning).

Rendered text already holds the template's special tokens (BOS, turn markers); it is tokenised
without adding special tokens again when it starts with the BOS string.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)


def is_messages(v: Any) -> bool:
    """True for a non-empty list of dicts (a conversation); its messages are checked by ``check_messages``."""
    return isinstance(v, list) and len(v) > 0 and all(isinstance(m, dict) for m in v)


def check_messages(v: Sequence[dict], where: str) -> list[dict]:
    """The messages as plain ``{"role", "content"}`` dicts; a UserError naming ``where`` otherwise."""
    out = []
    for j, m in enumerate(v):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}[{j}]: each message needs string 'role' and 'content' (got keys {sorted(m)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".tmpl")
# A two-turn conversation every chat template must render, with both contents in its text.
PROBE_CONVERSATION = (
    {"role": "user", "content": "tether-probe-question"},
    {"role": "assistant", "content": "tether-probe-answer"},
)


def looks_like_template_path(spec: str) -> bool:
    """True for a ``--chat_template`` value meant as a file: one line, no Jinja markers, and a template
    file suffix or a path separator (Jinja text holds ``{{`` / ``{%``, a path does not)."""
    s = spec.strip()
    if "\n" in s or "{{" in s or "{%" in s:
        return False
    return s.lower().endswith(TEMPLATE_SUFFIXES) or "/" in s or os.sep in s or s.startswith("~")


def read_template(chat_template: str, *, field: str = "chat_template") -> str:
    """The Jinja text of ``--chat_template``: the file's contents when it names a file, the value itself
    when it is Jinja text. A value that looks like a path but is not a file is a UserError (it would
    otherwise become a template that prints the path)."""
    try:
        p = Path(chat_template).expanduser()
        if p.is_file():
            return p.read_text()
    except OSError:  # Jinja text too long to be a file name
        return chat_template
    if looks_like_template_path(chat_template):
        what = "is a folder" if p.is_dir() else "no such file"
        raise UserError(
            f"--{field} {chat_template}: {what}; pass an existing template file (.jinja) or the Jinja text itself"
        )
    return chat_template


def check_template(chat_template: str, *, field: str = "chat_template") -> str:
    """Read ``--chat_template`` (``read_template``) and render ``PROBE_CONVERSATION`` with it, without a
    tokenizer: a template that does not compile, fails on a user/assistant exchange, or drops the
    messages' text is a one-line UserError. Returns the template text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    text = read_template(chat_template, field=field)
    try:
        (rendered,), _ = render_jinja_template(
            [list(PROBE_CONVERSATION)], chat_template=text, bos_token="", eos_token="", pad_token="", unk_token=""
        )
    except Exception as e:  # jinja2's TemplateSyntaxError / UndefinedError, or the template's raise_exception
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(
            f"--{field}: the template does not render a user/assistant conversation ({reason}); fix the template"
        ) from None
    missing = [m["role"] for m in PROBE_CONVERSATION if m["content"] not in rendered]
    if missing:
        raise UserError(
            f"--{field}: the template renders a user/assistant conversation without the {' and '.join(missing)} "
            f"message's text (got {rendered[:60]!r}); the template must print each message's content"
        )
    return text


def use_template(tokenizer, chat_template: Optional[str], *, where: str = "data") -> str:
    """Install ``chat_template`` (Jinja text, or a path to a file holding it) on ``tokenizer`` and
    return the template in force. Raises UserError when there is none."""
    if chat_template:
        tokenizer.chat_template = read_template(chat_template)
    tpl = getattr(tokenizer, "chat_template", None)
    if not tpl:
        raise UserError(
            f"{where}: conversational data (lists of messages) needs a chat template, and the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none: pass --chat_template TEMPLATE (a Jinja string or "
            "a file holding one), or give plain-text data"
        )
    return tpl


def render(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The template's text for ``messages`` (``[]`` renders as ``""``)."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """A prompt's messages rendered with the generation prompt: the text the sampler continues."""
    return render(tokenizer, messages, add_generation_prompt=True)


def split_completion(tokenizer, prompt: Sequence[dict], completions: Sequence[Sequence[dict]]) -> tuple[str, list[str]]:
    """(prompt text, one completion text per entry of ``completions``): the prompt rendered with its
    generation prompt, each completion the rest of ``render(prompt + completion)``.

    Some templates render a conversation's prefix differently alone than followed by an answer: the
    split is then where all renderings stop agreeing (never past the rendered prompt), with a warning."""
    p = render_prompt(tokenizer, prompt)
    full = [render(tokenizer, list(prompt) + list(c)) for c in completions]
    k = min(len(os.path.commonprefix([p, *full])), len(p))
    if k < len(p):
        log.warning("chat template renders the prompt differently alone; the completion starts at the common prefix")
    return p[:k], [f[k:] for f in full]


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def generation_spans(tokenizer, messages: Sequence[dict]) -> Optional[tuple[str, list[tuple[int, int]]]]:
    """(text, character spans of the template's ``{% generation %}`` blocks), read from
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` and the fast tokenizer's offsets;
    None when the template has no such block, the tokenizer is not fast, or the two tokenisations differ."""
    tpl = getattr(tokenizer, "chat_template", None)
    if not (isinstance(tpl, str) and _GENERATION.search(tpl) and getattr(tokenizer, "is_fast", False)):
        return None
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    text = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(out["input_ids"]):
        return None
    spans: list[tuple[int, int]] = []
    for (a, b), m in zip(enc["offset_mapping"], out["assistant_masks"]):
        if not m:
            continue
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
    return text, spans


def assistant_spans(
    tokenizer, messages: Sequence[dict], *, train_from: int = 0, roles: Sequence[str] = ("assistant",)
) -> tuple[str, list[tuple[int, int]]]:
    """(text of the whole conversation, character spans ``[start, end)`` of the trained turns).

    A turn is trained when its index is >= ``train_from`` and its role is in ``roles`` (SFT on
    ``messages``: every assistant turn; on conversational prompt/completion: every completion message,
    ``train_from = len(prompt)``, ``roles = None`` meaning any role). See the module docstring for how
    spans are found; a template whose prefixes are not prefixes of the whole text is an error unless
    it marks assistant text with ``{% generation %}`` (then, for every assistant turn, its mask)."""
    if train_from == 0 and tuple(roles or ()) == ("assistant",):
        marked = generation_spans(tokenizer, messages)
        if marked is not None:
            return marked
    text = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for j in range(train_from, len(messages)):
        if roles is not None and messages[j]["role"] not in roles:
            continue
        start = len(os.path.commonprefix([render(tokenizer, messages[:j], add_generation_prompt=True), text]))
        end_text = render(tokenizer, messages[: j + 1])
        if not text.startswith(end_text):
            raise UserError(
                f"the chat template renders the first {j + 1} messages as text that is not a prefix of the whole "
                "conversation, so assistant turns cannot be located; use a template that renders turns in order, or "
                "one that marks assistant text with {% generation %} (and a fast tokenizer)"
            )
        if spans and start < spans[-1][1]:
            start = spans[-1][1]
        if len(end_text) > start:
            spans.append((start, len(end_text)))
    return text, spans
