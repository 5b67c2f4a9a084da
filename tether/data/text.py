"""Text data for supervised fine-tuning: rows from files, folders or the hub; tokenising; packing.

A dataset argument (``--dataset``) is one of, or a comma-separated list of:

- a text file (``.txt``, rt-polarity's ``.pos`` / ``.neg``, anything not listed below; ``.gz`` ok):
  one example per non-blank line;
- ``.jsonl`` / ``.json`` (a list of objects, or an object of equal-length lists) / ``.parquet``,
  optionally ``.gz``: rows with a ``text`` field, ``prompt`` + ``completion`` fields (strings, or
  lists of ``{"role", "content"}`` messages), or a ``messages`` conversation; ``columns`` /
  ``*_field`` rename source columns (``column_map``, ``rename_columns``);
- a folder written by ``datasets.Dataset.save_to_disk`` (its ``train`` split if it is a
  ``DatasetDict``; ``eval_split_of`` names its ``test`` / ``validation`` split for evaluation), or a
  folder of the data files above (read in name order);
- the asset short name ``rt-polarity`` (both files of shared/assets/rt-polarity);
- otherwise a Hugging Face hub dataset name (``datasets.load_dataset(name, split="train")``).

Every row becomes a ``TextExample(prompt, completion)``; plain text is ``prompt=""``. A conversation
is rendered whole by its chat template (``tether.data.chat``) with ``spans``: the characters the loss
trains on (assistant turns, or completion messages). Tokenising
gives ``(ids, targets)`` where ``targets[i]`` is True when token i is predicted by the loss (never the
first token, which has no context). ``completion_only_loss`` restricts targets to completion tokens.

Packing concatenates tokenised examples (each ending in EOS) into blocks of exactly ``max_length``
tokens. Attention crosses example boundaries inside a block (the GPT-2/nanoGPT "naive" packing): it
wastes no compute on padding, and the EOS separators tell the model where a new text starts; the
cost is that a few tokens after a boundary can attend to the previous example.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import rng
from ..errors import UserError

log = logging.getLogger(__name__)

_TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class TextExample:
    """One SFT example. Plain text has ``prompt == ""`` and the whole text as ``completion``.

    A conversation rendered by its chat template has ``prompt == ""``, the whole rendered text as
    ``completion`` and ``spans``: the character spans ``[start, end)`` the loss trains on (the
    assistant turns, or the completion messages; ``tether.data.chat.assistant_spans``)."""

    prompt: str
    completion: str
    spans: Optional[tuple] = None


# --------------------------------------------------------------------------------------------------
# Rows


def _strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def _is_table_file(path: Path) -> bool:
    return _strip_gz(path).endswith(_TABLE_SUFFIXES)


def read_table_file(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.parquet`` file (each optionally ``.gz``)."""
    path = Path(path)
    name = _strip_gz(path)
    raw = _read_bytes(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(raw)).to_pylist()
    text = raw.decode("utf-8")
    if name.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return rows
    data = json.loads(text)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UserError(f"{path}: a JSON object of columns needs equal-length lists, got lengths {sorted(lengths)}")
        keys = list(data)
        return [dict(zip(keys, vals)) for vals in zip(*data.values())]
    if isinstance(data, list):
        return data
    raise UserError(f"{path}: a .json dataset must be a list of objects or an object of equal-length lists")


def read_text_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a text file (``.gz`` ok), stripped; undecodable bytes are replaced."""
    text = _read_bytes(Path(path)).decode("utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


# Bytes other than "\n" that str.splitlines() also breaks lines at; a file holding any of them is read whole.
_OTHER_BREAKS = (b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


class LineRows(Sequence):
    """The rows of an uncompressed text or ``.jsonl`` file, read on demand: the byte offsets of its
    non-blank lines (two int64 arrays, 16 bytes a row) over a memory-mapped file, instead of a list of
    Python rows. ``rows[i]`` is exactly what ``read_rows`` gives as its i-th row (the stripped line of a
    text file, the parsed object of a JSON line). Build with ``LineRows.open``, which returns None for
    a file this reader does not cover (compressed, other formats, line breaks other than ``\\n``)."""

    def __init__(self, path: Path, starts, ends, *, jsonl: bool):
        import mmap

        self.path, self.starts, self.ends, self.jsonl = path, starts, ends, jsonl
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if len(starts) else b""

    @classmethod
    def open(cls, spec: str) -> Optional["LineRows"]:
        import numpy as np

        path = Path(spec).expanduser()
        if not path.is_file() or path.name.lower().endswith(".gz"):
            return None
        name = path.name.lower()
        jsonl = name.endswith(".jsonl")
        if not jsonl and name.endswith(_TABLE_SUFFIXES):
            return None
        import mmap

        if path.stat().st_size:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
                if any(whole.find(b) >= 0 for b in _OTHER_BREAKS):
                    return None
        from array import array

        starts, ends, pos = array("q"), array("q"), 0  # 8 bytes a row while scanning
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                if line.decode("utf-8", errors="replace").strip():  # read_rows skips blank lines
                    if jsonl:
                        try:
                            json.loads(line.decode("utf-8"))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    starts.append(pos)
                    ends.append(pos + len(line))
                pos += len(line)
        return cls(path, np.frombuffer(starts, dtype=np.int64), np.frombuffer(ends, dtype=np.int64), jsonl=jsonl)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        raw = self._map[int(self.starts[i]) : int(self.ends[i])]
        return json.loads(raw.decode("utf-8")) if self.jsonl else raw.decode("utf-8", errors="replace").strip()


def _read_dir(path: Path, split: str) -> list[dict]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists() or (path / "dataset_info.json").exists():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise UserError(f"{path}: dataset has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return [dict(r) for r in ds]
    files = sorted(p for p in path.iterdir() if p.is_file() and _is_table_file(p))
    if not files:
        raise UserError(f"{path}: folder is neither a saved `datasets` dataset nor holds .jsonl/.json/.parquet files")
    return [r for f in files for r in read_table_file(f)]


def read_rows(spec: str, *, assets: Optional[str] = None, split: str = "train") -> list:
    """Raw rows of ONE dataset argument: dicts for tables, strings for text files."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_dir(path, split)
    if path.is_file():
        return read_table_file(path) if _is_table_file(path) else read_text_lines(path)
    if spec == "rt-polarity":
        from ..assets import resolve

        root = resolve("rt-polarity", assets)
        return read_text_lines(root / "rt-polarity.pos") + read_text_lines(root / "rt-polarity.neg")
    if spec.endswith(_TABLE_SUFFIXES + (".txt", ".gz")) or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(2, f"dataset file {spec} does not exist", spec)
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(spec, split=split)]
    except Exception as e:
        raise UserError(
            f"dataset {spec!r} is not a file or folder here, and loading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}); pass a local .txt/.jsonl/.json/.parquet file or a saved dataset folder"
        ) from e


def column_map(value, *, field: str = "columns", **renames: Optional[str]) -> dict[str, str]:
    """Source column -> tether column. ``value``: a dict (YAML ``columns: {question: prompt}``), a
    string ``"question=prompt,response_j=chosen"`` (the command line) or a list of ``"src=dst"``;
    ``renames`` adds ``dst=src`` pairs from the ``--prompt_field``-style flags (``prompt="question"``),
    ignored when ``src`` is None or already ``dst``."""
    out: dict[str, str] = {}
    if isinstance(value, str) and value.strip().startswith("{"):
        import yaml

        value = yaml.safe_load(value)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            src, sep, dst = str(v).partition("=")
            if not sep or not src.strip() or not dst.strip():
                raise UserError(
                    f"{field}: {v!r} is not SOURCE=TARGET (e.g. --{field} question=prompt,response_j=chosen)"
                )
            items.append((src.strip(), dst.strip()))
    elif value is None:
        items = []
    else:
        raise UserError(f"{field}: expected a mapping of source column to column name, got {type(value).__name__}")
    out.update({str(k): str(v) for k, v in items})
    for dst, src in renames.items():
        if src and src != dst:
            out[src] = dst
    return out


def rename_columns(rows: list, mapping: dict[str, str], *, where: str = "dataset") -> list:
    """Rows with their columns renamed by ``mapping`` (source -> target); strings pass unchanged.
    A source column missing from every row is an error naming it (a typo in the mapping)."""
    if not mapping:
        return rows
    dicts = [r for r in rows if isinstance(r, dict)]
    if dicts:
        missing = [s for s in mapping if not any(s in r for r in dicts)]
        if missing:
            raise UserError(
                f"{where}: column(s) {missing} named in the column mapping are not in the data "
                f"(its columns: {sorted(dicts[0])}); fix --columns / --*_field"
            )
    return [{mapping.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r for r in rows]


def eval_split_of(spec: Optional[str], *, split: str = "train") -> Optional[str]:
    """The held-out split of a saved ``DatasetDict`` folder (``test``, else ``validation``) when
    ``spec`` is one and ``split`` is its training split, else None."""
    if not spec or "," in spec:
        return None
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "dataset_dict.json").exists()):
        return None
    try:
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, json.JSONDecodeError):
        return None
    for name in ("test", "validation"):
        if name in splits and name != split:
            return name
    return None


def _chat_example(
    tokenizer, chat_template: Optional[str], messages: list, *, where: str, train_from: Optional[int], roles
) -> TextExample:
    """A conversation rendered whole; trained spans: messages from ``train_from`` with a role in
    ``roles`` (any role if None), or the whole text when ``train_from`` is None."""
    from .chat import assistant_spans, check_messages, render, use_template

    if tokenizer is None:
        raise UserError(f"{where}: conversational rows need the model's tokenizer (to apply its chat template)")
    use_template(tokenizer, chat_template, where=where)
    msgs = check_messages(messages, where)
    if train_from is None:  # train on the whole conversation
        text = render(tokenizer, msgs)
        return TextExample("", text, ((0, len(text)),))
    text, spans = assistant_spans(tokenizer, msgs, train_from=train_from, roles=roles)
    if not spans:
        raise UserError(f"{where}: conversation has no {'assistant' if roles else 'completion'} message to train on")
    return TextExample("", text, tuple(spans))


def row_to_example(
    row,
    *,
    where: str,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    tokenizer=None,
    chat_template: Optional[str] = None,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
) -> TextExample:
    """One row -> TextExample. Conversational rows (``messages``, or ``prompt``/``completion`` lists of
    messages) are rendered with the chat template; their ``spans`` are the trained text: the
    assistant turns (``assistant_only_loss``) or the completion messages (``completion_only_loss``),
    else the whole conversation."""
    from .chat import is_messages

    if isinstance(row, str):
        return TextExample("", row)
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object, got {type(row).__name__}")
    chat = dict(tokenizer=tokenizer, chat_template=chat_template, where=where)
    if messages_field in row:
        msgs = row[messages_field]
        if not is_messages(msgs):
            raise UserError(f"{where}: '{messages_field}' must be a list of {{'role', 'content'}} messages")
        return _chat_example(messages=msgs, train_from=0 if assistant_only_loss else None, roles=("assistant",), **chat)
    if prompt_field in row and completion_field in row:
        p, c = row[prompt_field], row[completion_field]
        if is_messages(p) and is_messages(c):
            return _chat_example(
                messages=list(p) + list(c), train_from=len(p) if completion_only_loss else None, roles=None, **chat
            )
        if not isinstance(p, str) or not isinstance(c, str):
            raise UserError(
                f"{where}: '{prompt_field}' and '{completion_field}' must both be strings or both lists of messages"
            )
        return TextExample(p, c)
    if text_field in row:
        if not isinstance(row[text_field], str):
            raise UserError(f"{where}: '{text_field}' must be a string")
        return TextExample("", row[text_field])
    raise UserError(
        f"{where}: row has fields {sorted(row)}; SFT needs '{text_field}' (plain text), '{messages_field}' (a "
        f"conversation) or '{prompt_field}' + '{completion_field}' (set --text_field / --messages_field / "
        "--prompt_field / --completion_field or --columns to map other names)"
    )


def load_text_examples(
    dataset: str,
    *,
    assets: Optional[str] = None,
    split: str = "train",
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    columns=None,
    tokenizer=None,
    chat_template: Optional[str] = None,
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
) -> list[TextExample]:
    """All examples of a (comma-separated list of) dataset argument(s), in file order. ``columns``
    renames source columns first (``column_map``); ``tokenizer`` / ``chat_template`` render
    conversational rows."""
    if not dataset or not dataset.strip():
        raise UserError(
            "dataset is empty: pass --dataset FILE (text, .jsonl, .json, .parquet), a folder, or a hub name"
        )
    mapping = column_map(columns)
    kw = dict(
        text_field=text_field,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
        tokenizer=tokenizer,
        chat_template=chat_template,
        completion_only_loss=completion_only_loss,
        assistant_only_loss=assistant_only_loss,
    )
    out: list[TextExample] = []
    for spec in [s.strip() for s in dataset.split(",") if s.strip()]:
        rows = rename_columns(read_rows(spec, assets=assets, split=split), mapping, where=spec)
        out += [row_to_example(r, where=f"{spec} row {i}", **kw) for i, r in enumerate(rows)]
    out = [e for e in out if e.prompt or e.completion.strip()]
    if not out:
        raise UserError(f"dataset {dataset!r} has no non-empty examples")
    return out


HELDOUT_FRACTION = 0.1
HELDOUT_CAP = 200


def heldout_size(n: int, n_eval: Optional[int]) -> int:
    """Examples to hold out of ``n``: ``n_eval`` when given, else 10% capped at 200 (0 under 10
    examples). A hold-out that would leave nothing to train on is dropped, with a warning: a small
    dataset is never refused for its evaluation."""
    if n_eval is None:
        n_eval = min(HELDOUT_CAP, int(n * HELDOUT_FRACTION))
        if n_eval == 0 and n:
            log.warning("sft data: %d examples are too few to hold any out; no eval/loss (pass eval_dataset)", n)
    if n_eval >= n > 0:
        log.warning(
            "sft data: eval_examples=%d would leave nothing to train on (%d examples); training on all of "
            "them with no hold-out (no eval/loss; pass eval_dataset or a smaller eval_examples)",
            n_eval,
            n,
        )
        return 0
    return max(n_eval, 0)


def split_heldout(examples: Sequence, n_eval: Optional[int], *, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random ``heldout_size(len(examples), n_eval)`` examples held out."""
    n_eval = heldout_size(len(examples), n_eval)
    if n_eval <= 0:
        return list(examples), []
    perm = torch.randperm(len(examples), generator=rng.generator(seed + 7919)).tolist()
    held = set(perm[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# --------------------------------------------------------------------------------------------------
# Tokens


@dataclass
class Tokenized:
    """ids: token ids; targets: same length, True where the token is predicted by the loss."""

    ids: list[int]
    targets: list[bool]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> Tokenized:
    """Rendered chat text -> ids, with targets on the tokens inside ``spans``. The token boundary of a
    character offset c is where ``tokenize(text[:c])`` stops agreeing with ``tokenize(text)`` (tokens
    can merge across it); a token that straddles a span's start is trained, one that straddles its
    end is not. Special tokens are not added again when the text starts with the BOS string."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    enc = lambda t: list(tokenizer(t, add_special_tokens=special)["input_ids"])  # noqa: E731
    ids = enc(text)
    targets = [False] * len(ids)
    for start, end in spans:
        lo, hi = _common_prefix(enc(text[:start]), ids), _common_prefix(enc(text[:end]), ids)
        for i in range(lo, hi):
            targets[i] = True
    if targets:
        targets[0] = False
    return Tokenized(ids, targets)


def tokenize_example(
    tokenizer,
    ex: TextExample,
    *,
    completion_only_loss: bool = True,
    append_eos: bool = True,
) -> Tokenized:
    """Prompt and completion are tokenised separately (prompt with the tokenizer's BOS, completion
    without special tokens, then EOS), the way the sampler sees them: prompt tokens, then generated
    tokens. The first token is never a target (nothing predicts it). Chat-rendered examples
    (``ex.spans``) are tokenised whole, with targets inside the spans and no EOS added: the
    template's end-of-turn text ends each trained turn."""
    if ex.spans is not None:
        return _tokenize_spans(tokenizer, ex.completion, ex.spans)
    p_ids = tokenizer(ex.prompt)["input_ids"] if ex.prompt else tokenizer("")["input_ids"]
    c_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    ids = list(p_ids) + list(c_ids)
    targets = [not (completion_only_loss and ex.prompt)] * len(p_ids) + [True] * len(c_ids)
    if targets:
        targets[0] = False
    return Tokenized(ids, targets)


def truncate(t: Tokenized, max_length: int) -> Tokenized:
    return Tokenized(t.ids[:max_length], t.targets[:max_length])


def pack(items: Sequence[Tokenized], max_length: int) -> list[Tokenized]:
    """Concatenate and cut into blocks of ``max_length`` tokens (the last block may be shorter).
    The first token of each block is not a target: it has no context inside the block."""
    ids = [i for t in items for i in t.ids]
    targets = [m for t in items for m in t.targets]
    blocks = []
    for s in range(0, len(ids), max_length):
        b = Tokenized(ids[s : s + max_length], targets[s : s + max_length])
        b.targets[0] = False
        if len(b.ids) > 1 and any(b.targets):
            blocks.append(b)
    return blocks


def prepare_sft(
    tokenizer,
    examples: Sequence[TextExample],
    *,
    max_length: int,
    packing: bool,
    completion_only_loss: bool = True,
    append_eos: bool = True,
    seed: int = 0,
) -> list[Tokenized]:
    """Tokenise (and pack, or truncate) a list of examples. Examples left with no target token (a
    prompt that fills ``max_length``) are dropped with a warning."""
    if max_length < 2:
        raise UserError(f"max_length must be >= 2 tokens, got {max_length}")
    toks = [
        tokenize_example(tokenizer, e, completion_only_loss=completion_only_loss, append_eos=append_eos)
        for e in examples
    ]
    if packing:
        # Shuffle before packing (seeded) so a block mixes examples from different files.
        perm = torch.randperm(len(toks), generator=rng.generator(seed + 104729)).tolist()
        return pack([toks[i] for i in perm], max_length)
    n_cut = sum(len(t.ids) > max_length for t in toks)
    if n_cut:  # truncation is the documented behaviour: counted, never silent
        log.warning(
            "truncated %d of %d examples to max_length=%d tokens (their tails are not trained on); raise "
            "max_length to keep them",
            n_cut,
            len(toks),
            max_length,
        )
    out = [truncate(t, max_length) for t in toks]
    kept = [t for t in out if any(t.targets)]
    if len(kept) < len(out):
        log.warning(
            "dropped %d of %d examples with no completion token within max_length=%d",
            len(out) - len(kept),
            len(out),
            max_length,
        )
    return kept


def collate(items: Sequence[Tokenized], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids (B, L) long, attention_mask (B, L) long,
    targets (B, L) bool (True = this token is predicted by the loss)."""
    L = max(len(t.ids) for t in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    targets = torch.zeros((B, L), dtype=torch.bool)
    for i, t in enumerate(items):
        n = len(t.ids)
        ids[i, :n] = torch.tensor(t.ids, dtype=torch.long)
        attn[i, :n] = 1
        targets[i, :n] = torch.tensor(t.targets, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attn, "targets": targets}


def batch_indices(step: int, batch_size: int, n: int, *, seed: int) -> list[int]:
    """Example indices of optimiser step ``step`` (0-based): a seeded permutation per epoch, read in
    order across epoch boundaries. A pure function of (seed, step), so a resumed run reads exactly
    the batches the uninterrupted run would have."""
    if n <= 0:
        raise UserError("no training examples")
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        out.append(int(_epoch_perm(n, seed, epoch)[pos]))
    return out


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s permutation of ``n`` examples, as a tensor (8 bytes an example; a list of
    Python ints would take 36)."""
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=rng.generator(seed * 1_000_003 + epoch))
    return _PERM_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Preference pairs from labelled text


def polarity_pairs(
    assets: Optional[str] = None, *, seed: int = 0, pos: Optional[str] = None, neg: Optional[str] = None
) -> list[dict]:
    """Preference pairs from the rt-polarity movie-review snippets: ``{"prompt": "", "chosen": a
    positive snippet, "rejected": a negative snippet}``, positives and negatives each shuffled with
    ``seed`` and zipped (5,331 pairs). A reward model trained on them scores the sentiment of any
    text — the learned proxy for the VADER gold reward in the movie-review demo. An empty prompt
    (not a shared prefix) because the two snippets of a pair are unrelated reviews: the pair says
    only "this text is more positive than that one", which is what the proxy should learn.
    ``pos`` / ``neg`` override the two files (default: the rt-polarity asset)."""
    if pos is None or neg is None:
        from ..assets import resolve

        root = resolve("rt-polarity", assets)
        pos, neg = pos or str(root / "rt-polarity.pos"), neg or str(root / "rt-polarity.neg")
    p, n = read_text_lines(pos), read_text_lines(neg)
    g = rng.generator(seed)
    pp = [p[i] for i in torch.randperm(len(p), generator=g).tolist()]
    nn = [n[i] for i in torch.randperm(len(n), generator=g).tolist()]
    return [{"prompt": "", "chosen": a, "rejected": b} for a, b in zip(pp, nn)]
