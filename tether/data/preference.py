"""Preference pairs: loading TRL-compatible data, checking it, tokenising, truncating, batching.

Three row formats (the ones TRL's DPOTrainer accepts):

- explicit prompt   ``{"prompt": str, "chosen": str, "rejected": str}``
- implicit prompt   ``{"chosen": str, "rejected": str}`` sharing a prefix (HH-RLHF): the prompt is
                    their common prefix, cut back to end at the last ``"\\n\\nAssistant:"`` turn
                    (``prompt_marker``); without a marker in it, the whole common prefix (as TRL).
- conversational    ``prompt``/``chosen``/``rejected`` as lists of ``{"role", "content"}`` messages
                    (``prompt`` optional: the common leading messages), rendered to text with the
                    tokenizer's chat template (or ``chat_template``); a tokenizer without one is an
                    error that says what to pass.

Sources: local ``.json`` / ``.jsonl`` / ``.parquet`` (each optionally ``.gz``), a folder written by
``datasets.save_to_disk`` (or of data files ``datasets`` can read), a hub dataset name, the asset
short name ``hh-rlhf``, or rows already in memory (a list of dicts or a ``datasets.Dataset``).

Bad rows (missing field, non-string value, empty or identical chosen/rejected) raise
``PreferenceDataError`` naming the row and field, or are skipped and counted with ``skip_bad_rows``.

Tokenisation follows TRL: the completion starts where the tokenised prompt and the tokenised
prompt+completion diverge (tokens can merge across the boundary), and EOS ends each completion.
Truncation never cuts the start of a completion silently: prompts lose tokens from the left (the
start of a long dialogue; BOS is kept), completions from the right, and every truncation is counted
in ``TruncationReport`` and logged.
"""

from __future__ import annotations

import gzip
import heapq
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from .. import rng
from ..errors import UserError
from .chat import check_messages, is_messages, split_completion, use_template

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
HH_MARKER = "\n\nAssistant:"
DATA_ASSETS = {"hh-rlhf": "harmless-base-test.jsonl.gz"}


class PreferenceDataError(UserError):
    """A preference row or source that cannot be used; the message names the row, field and fix."""


# ----------------------------------------------------------------------------------------------------
# Reading raw rows
# ----------------------------------------------------------------------------------------------------


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> list:
    rows = []
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many ".json" files are JSON lines
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        if len(lists) == 1:
            return lists[0]
        if all(isinstance(v, list) for v in data.values()) and len({len(v) for v in data.values()}) == 1:
            keys = list(data)  # column layout {"chosen": [...], "rejected": [...]}
            return [dict(zip(keys, vals)) for vals in zip(*data.values())]
        raise PreferenceDataError(f"{path}: a JSON file must hold a list of rows (or {{'data': [...]}})")
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: a JSON file must hold a list of rows, found {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return pq.read_table(io.BytesIO(f.read())).to_pylist()
    return pq.read_table(path).to_pylist()


def _from_datasets_obj(ds, split: str, where: str) -> list:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise PreferenceDataError(f"{where} has splits {sorted(ds)}, not {split!r}: pass --dataset_split NAME")
        ds = ds[split]
    return ds.to_list()


def read_raw_rows(source: Any, *, split: str = "train", assets: Optional[str] = None) -> list:
    """Rows as stored (dicts), before checking. ``source``: a path, a hub name, ``hh-rlhf``, a list
    of dicts or a ``datasets.Dataset``."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return source.to_list()
    if not isinstance(source, (str, os.PathLike)):
        raise PreferenceDataError(f"dataset must be a path, a hub name or a list of rows, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists() and str(source) in DATA_ASSETS:
        from ..assets import resolve

        path = resolve(str(source), assets) / DATA_ASSETS[str(source)]
    if path.is_file():
        name = path.name[:-3] if path.suffix == ".gz" else path.name
        if name.endswith(".jsonl"):
            return _read_jsonl(path)
        if name.endswith(".json"):
            return _read_json(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
        raise PreferenceDataError(f"{path}: unknown file type; use .json, .jsonl or .parquet (optionally .gz)")
    if path.is_dir():
        import datasets

        if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return _from_datasets_obj(datasets.load_from_disk(str(path)), split, str(path))
        try:
            return _from_datasets_obj(datasets.load_dataset(str(path), split=split), split, str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise PreferenceDataError(f"{path}: not a datasets folder or a folder of data files ({e})") from e
    looks_local = str(source).endswith((".json", ".jsonl", ".parquet", ".gz"))
    if looks_local or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise PreferenceDataError(f"dataset {source!r} does not exist (a local path was expected)")
    import datasets

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as e:  # noqa: BLE001 - network/hub errors, re-raised with the fix
        raise PreferenceDataError(
            f"could not load dataset {source!r} from the hub ({type(e).__name__}: {e}). Offline? Pass a local "
            "JSON/JSONL/Parquet file or a datasets folder instead."
        ) from e
    return ds.to_list()


# ----------------------------------------------------------------------------------------------------
# Checking rows and extracting prompts
# ----------------------------------------------------------------------------------------------------


def _is_messages(v: Any) -> bool:
    return is_messages(v)


def _check_messages(v: list, where: str) -> None:
    try:
        check_messages(v, where)
    except UserError as e:
        raise PreferenceDataError(str(e)) from None


def implicit_prompt(chosen: str, rejected: str, *, marker: str = HH_MARKER) -> tuple[str, str, str]:
    """Split two strings sharing a prefix into (prompt, chosen, rejected).

    The prompt is the common prefix cut back to end right after the last ``marker`` in it (HH-RLHF:
    ``"\\n\\nAssistant:"``, so the prompt ends at the final assistant turn and each completion is that
    turn's text). Without the marker, the whole common prefix, less a trailing space (TRL's rule).
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker) if marker else -1
    if cut >= 0:
        k = cut + len(marker)
    else:
        k = len(common)
        if k and k < len(chosen) and chosen[k - 1] == " ":
            k -= 1  # keep the space with the completion, as TRL's extract_prompt does
    return chosen[:k], chosen[k:], rejected[k:]


def _render_chat(tokenizer, prompt_msgs: list, chosen_msgs: list, rejected_msgs: list) -> dict:
    p, (c, r) = split_completion(tokenizer, prompt_msgs, [chosen_msgs, rejected_msgs])
    return {"prompt": p, "chosen": c, "rejected": r, "templated": True}


def check_row(
    row: Any, i: int, *, tokenizer=None, chat_template: Optional[str] = None, prompt_marker: str = HH_MARKER
) -> dict:
    """One raw row -> ``{"prompt", "chosen", "rejected"}`` strings (+ ``"templated": True`` for
    conversational rows, whose text already holds the template's special tokens). Raises
    ``PreferenceDataError`` naming row ``i`` and the field."""
    where = f"row {i}"
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected an object with 'chosen' and 'rejected', got {type(row).__name__}")
    for f in ("chosen", "rejected"):
        if f not in row:
            raise PreferenceDataError(f"{where}: missing field {f!r} (found {sorted(row)})")
    for f in ("prompt", "chosen", "rejected"):  # a null cell is a bad row, never an empty or implicit prompt
        if f in row and row[f] is None:
            raise PreferenceDataError(f"{where}: field {f!r} is null")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    conversational = _is_messages(chosen) or _is_messages(rejected)
    if conversational:
        for f, v in (("chosen", chosen), ("rejected", rejected)):
            if not _is_messages(v):
                raise PreferenceDataError(
                    f"{where}: field {f!r} must be a list of messages like the other, got {type(v).__name__}"
                )
            _check_messages(v, f"{where} field {f!r}")
        if _is_messages(prompt):
            _check_messages(prompt, f"{where} field 'prompt'")
            p_msgs, c_msgs, r_msgs = prompt, chosen, rejected
        else:  # implicit prompt: the common leading messages (a string prompt is ignored, as in TRL)
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            p_msgs, c_msgs, r_msgs = chosen[:k], chosen[k:], rejected[k:]
        for f, v in (("chosen", c_msgs), ("rejected", r_msgs)):
            if not v or all(not m["content"].strip() for m in v):
                raise PreferenceDataError(f"{where}: field {f!r} has no completion after the prompt messages")
        if c_msgs == r_msgs:
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' are identical")
        if tokenizer is None:
            raise PreferenceDataError(f"{where}: conversational rows need a tokenizer (to apply its chat template)")
        try:
            use_template(tokenizer, chat_template, where=where)
        except UserError as e:
            raise PreferenceDataError(str(e)) from None
        return _render_chat(tokenizer, p_msgs, c_msgs, r_msgs)
    for f, v in (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if prompt is not None else ()):
        if not isinstance(v, str):
            raise PreferenceDataError(
                f"{where}: field {f!r} must be a string (or a list of messages), got {type(v).__name__}"
            )
    if prompt is None:
        prompt, chosen, rejected = implicit_prompt(chosen, rejected, marker=prompt_marker)
    for f, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise PreferenceDataError(
                f"{where}: field {f!r} is empty" + (" after the shared prompt" if "prompt" not in row else "")
            )
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_rows(
    raw: Iterable,
    *,
    skip_bad_rows: bool = False,
    tokenizer=None,
    chat_template: Optional[str] = None,
    prompt_marker: str = HH_MARKER,
    source: str = "dataset",
) -> tuple[list[dict], dict[str, int]]:
    """Check every row; returns (rows, skipped) with ``skipped`` counting bad rows by reason."""
    rows, skipped = [], {}
    for i, row in enumerate(raw):
        try:
            rows.append(
                check_row(row, i, tokenizer=tokenizer, chat_template=chat_template, prompt_marker=prompt_marker)
            )
        except PreferenceDataError as e:
            if not skip_bad_rows:
                raise PreferenceDataError(
                    f"{source}: {e}; fix the data or pass --skip_bad_rows to skip such rows"
                ) from None
            reason = str(e).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
    if skipped:
        log.warning("%s: skipped %d bad rows: %s", source, sum(skipped.values()), skipped)
    if not rows:
        raise PreferenceDataError(f"{source}: no usable preference rows")
    return rows, skipped


def load_preference_rows(
    source: Any,
    *,
    split: str = "train",
    tokenizer=None,
    chat_template: Optional[str] = None,
    skip_bad_rows: bool = False,
    prompt_marker: str = HH_MARKER,
    assets: Optional[str] = None,
    limit: Optional[int] = None,
    columns: Optional[dict] = None,
) -> list[dict]:
    """Load and check preference data: a list of ``{"prompt", "chosen", "rejected"}`` strings.

    ``tokenizer`` is needed only for conversational rows (chat template). ``limit`` keeps the first
    N raw rows. ``columns`` renames source columns first (``tether.data.text.column_map``'s result,
    e.g. ``{"question": "prompt", "response_j": "chosen", "response_k": "rejected"}``). Skipped rows
    (with ``skip_bad_rows``) are counted in the log."""
    from .text import rename_columns

    raw = read_raw_rows(source, split=split, assets=assets)
    if limit:
        raw = raw[:limit]
    name = str(source) if isinstance(source, (str, os.PathLike)) else "rows"
    raw = rename_columns(raw, columns or {}, where=name)
    rows, _ = check_rows(
        raw,
        skip_bad_rows=skip_bad_rows,
        tokenizer=tokenizer,
        chat_template=chat_template,
        prompt_marker=prompt_marker,
        source=name,
    )
    return rows


# ----------------------------------------------------------------------------------------------------
# Tokenising and truncating
# ----------------------------------------------------------------------------------------------------


@dataclass
class TruncationReport:
    """How many pairs tokenisation changed (each pair counted once per kind)."""

    pairs: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped_identical: int = 0
    """Pairs whose chosen and rejected became identical after truncation (no signal): dropped."""
    boundary_merges: int = 0
    """Pairs where prompt and completion tokens merge across the boundary (completion starts earlier)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def log(self, name: str = "data") -> None:
        if self.prompt_truncated or self.completion_truncated or self.dropped_identical:
            log.warning(
                "%s: of %d pairs, %d had prompts truncated (from the left), %d had completions truncated (from the "
                "right), %d were dropped as identical after truncation",
                name,
                self.pairs,
                self.prompt_truncated,
                self.completion_truncated,
                self.dropped_identical,
            )


def truncate_pair(
    prompt: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    *,
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    bos_id: Optional[int] = None,
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit a pair into ``max_length`` tokens per sequence (prompt + completion).

    Rules, in order: completions are cut from the right to ``max_completion_length``; the prompt is
    cut from the left to ``max_prompt_length`` (keeping a leading ``bos_id``); then, if
    prompt + longer completion still exceeds ``max_length``, the prompt gives up tokens from the left
    down to ``max_prompt_length`` (default ``max_length // 2``) and the completions are cut from the
    right to what remains. The first tokens of a completion are never dropped.
    Returns (prompt, chosen, rejected, prompt_truncated, completion_truncated).
    """
    p, c, r = list(prompt), list(chosen), list(rejected)
    p_cut = c_cut = False

    def cut_left(ids: list[int], n: int) -> list[int]:
        n = max(n, 1)
        if len(ids) <= n:
            return ids
        if bos_id is not None and ids and ids[0] == bos_id and n >= 2:
            return [ids[0]] + ids[len(ids) - (n - 1) :]
        return ids[len(ids) - n :]

    if max_completion_length is not None and max(len(c), len(r)) > max_completion_length:
        c, r, c_cut = c[:max_completion_length], r[:max_completion_length], True
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p, p_cut = cut_left(p, max_prompt_length), True
    if max_length is not None:
        longest = max(len(c), len(r))
        if len(p) + longest > max_length:
            floor = max_prompt_length if max_prompt_length is not None else max_length // 2
            keep_p = min(len(p), max(max_length - longest, floor, 1))
            if keep_p < len(p):
                p, p_cut = cut_left(p, keep_p), True
            room = max_length - len(p)
            if room < 1:
                raise UserError(
                    f"max_length={max_length} leaves no room for a completion after a {len(p)}-token prompt"
                )
            if longest > room:
                c, r, c_cut = c[:room], r[:room], True
    return p, c, r, p_cut, c_cut


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenized(
    rows: Sequence[dict],
    tokenizer,
    report: TruncationReport,
    *,
    max_length: Optional[int],
    max_prompt_length: Optional[int],
    max_completion_length: Optional[int],
    add_eos: bool,
    source: str,
    start: int = 0,
):
    """``tokenize_pairs``' pairs, one at a time, counting into ``report``; ``start``: the index of
    ``rows[0]`` in the whole list (its ``row`` and the error messages)."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token_id
    if add_eos and eos is None:
        raise UserError("add_eos=True but the tokenizer has no eos token; set add_eos=False or give it one")

    def enc(texts: list[str]) -> list[list[int]]:
        plain = [j for j, t in enumerate(texts) if not (bos and t.startswith(bos))]
        templated = [j for j, t in enumerate(texts) if bos and t.startswith(bos)]  # (already hold BOS)
        ids: list = [None] * len(texts)
        for idx, special in ((plain, True), (templated, False)):
            if idx:
                for j, x in zip(idx, tokenizer([texts[j] for j in idx], add_special_tokens=special)["input_ids"]):
                    ids[j] = list(x)
        return ids

    prompts = enc([r["prompt"] for r in rows])
    full_c = enc([r["prompt"] + r["chosen"] for r in rows])
    full_r = enc([r["prompt"] + r["rejected"] for r in rows])
    for i, (row, p, fc, fr) in enumerate(zip(rows, prompts, full_c, full_r), start):
        k = min(_common_prefix(p, fc), _common_prefix(p, fr))
        if k < len(p):
            report.boundary_merges += 1
        p_ids, c_ids, r_ids = p[:k], fc[k:], fr[k:]
        if add_eos and not row.get("templated"):
            c_ids = c_ids if c_ids[-1:] == [eos] else c_ids + [eos]
            r_ids = r_ids if r_ids[-1:] == [eos] else r_ids + [eos]
        if not p_ids:
            raise PreferenceDataError(
                f"{source}: row {i}: the prompt tokenizes to nothing; every completion needs context (use a tokenizer "
                "that adds BOS, or give a prompt)"
            )
        p_ids, c_ids, r_ids, p_cut, c_cut = truncate_pair(
            p_ids,
            c_ids,
            r_ids,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            bos_id=tokenizer.bos_token_id,
        )
        report.pairs += 1
        report.prompt_truncated += p_cut
        report.completion_truncated += c_cut
        if c_ids == r_ids:
            report.dropped_identical += 1
            continue
        yield {"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "row": i}


def tokenize_pairs(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    add_eos: bool = True,
    source: str = "data",
) -> tuple[list[dict], TruncationReport]:
    """Rows of strings -> ``[{"prompt_ids", "chosen_ids", "rejected_ids", "row"}]`` plus a report.

    As TRL: tokenise the prompt and prompt+completion, start the completion where they diverge,
    end it with EOS (``add_eos``; not for chat-templated rows, whose template ends the turn).
    Special tokens (BOS) are added unless the text already starts with the BOS string (rendered
    chat templates). ``row`` is the index in ``rows``. Pairs identical after truncation are dropped.
    """
    report = TruncationReport()
    out = list(
        _tokenized(
            rows,
            tokenizer,
            report,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            add_eos=add_eos,
            source=source,
        )
    )
    report.log(source)
    if not out:
        raise PreferenceDataError(f"{source}: no pairs left after tokenisation and truncation")
    return out, report


# ----------------------------------------------------------------------------------------------------
# Large files: checked and tokenised in chunks, pairs kept as flat token arrays
# ----------------------------------------------------------------------------------------------------

EAGER_PAIRS = 100_000
"""A ``.jsonl`` preference file with more rows than this is read by ``load_large_pairs`` (rows on
demand, pairs in flat arrays); smaller ones as a list (``read_raw_rows`` ... ``tokenize_pairs``)."""


class PairStore(Sequence):
    """Tokenised pairs in three flat arrays instead of a list of dicts of lists: all token ids
    (int32), three end offsets per pair (prompt, chosen, rejected) and the row index. ``store[i]`` is
    the dict ``tokenize_pairs`` gives (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``row``),
    built when asked for; about 4 bytes a token and 32 a pair."""

    def __init__(self):
        from array import array

        self._tokens, self._ends, self._rows = array("i"), array("q"), array("q")

    def append(self, pair: dict) -> None:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            self._tokens.extend(pair[key])
            self._ends.append(len(self._tokens))
        self._rows.append(pair["row"])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a = self._ends[3 * i - 1] if i else 0
        b, c, d = self._ends[3 * i], self._ends[3 * i + 1], self._ends[3 * i + 2]
        t = self._tokens
        return {"prompt_ids": t[a:b].tolist(), "chosen_ids": t[b:c].tolist(), "rejected_ids": t[c:d].tolist(),
                "row": self._rows[i]}  # fmt: skip

    def __add__(self, other: Sequence) -> "_Joined":
        return _Joined(self, other)


class _Joined(Sequence):
    """``a + b`` of two sequences without copying them."""

    def __init__(self, a: Sequence, b: Sequence):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]


def large_pair_rows(source: Any):
    """``text.LineRows`` of a preference ``.jsonl`` file with more than ``EAGER_PAIRS`` rows, else None."""
    from .text import LineRows

    if not isinstance(source, (str, os.PathLike)) or not str(source).endswith(".jsonl"):
        return None
    try:
        lines = LineRows.open(str(source))
    except UserError as e:  # a bad JSON line: the eager reader words it
        raise PreferenceDataError(str(e)) from None
    return lines if lines is not None and len(lines) > EAGER_PAIRS else None


def load_large_pairs(
    lines,
    *,
    tokenizer,
    mapping: dict,
    eval_fraction: float,
    eval_pairs: Optional[int],
    seed: int,
    source: str,
    skip_bad_rows: bool = False,
    chat_template: Optional[str] = None,
    chunk: int = 8192,
    **trunc,
) -> tuple[PairStore, list[dict], dict, TruncationReport]:
    """(train pairs, held-out pairs, skipped, train report) of a large file, the pairs ``check_rows``,
    ``split_holdout`` and ``tokenize_pairs`` would give, with peak memory bounded by ``chunk`` rows:
    one pass checks every row (keeping only the indices of the good ones), then the training rows
    are re-read, checked and tokenised ``chunk`` at a time into a ``PairStore``. Held-out rows are
    tokenised until ``eval_pairs`` are kept."""
    from array import array

    def row(i):
        raw = lines[i]
        return {mapping.get(k, k): v for k, v in raw.items()} if mapping and isinstance(raw, dict) else raw

    check = dict(tokenizer=tokenizer, chat_template=chat_template)
    good, skipped, seen = array("q"), {}, set()
    for i in range(len(lines)):
        raw = lines[i]
        if isinstance(raw, dict):
            seen.update(k for k in mapping if k in raw)
        try:
            check_row(row(i), i, **check)
        except PreferenceDataError as e:
            if not skip_bad_rows:
                _missing_columns(lines, mapping, seen, start=i + 1, where=source)
                raise PreferenceDataError(
                    f"{source}: {e}; fix the data or pass --skip_bad_rows to skip such rows"
                ) from None
            reason = str(e).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        good.append(i)
    _missing_columns(lines, mapping, seen, start=len(lines), where=source)
    if skipped:
        log.warning("%s: skipped %d bad rows: %s", source, sum(skipped.values()), skipped)
    if not good:
        raise PreferenceDataError(f"{source}: no usable preference rows")
    tr, ho = split_holdout(len(good), eval_fraction, seed=seed)

    def checked(positions: Sequence[int]) -> list[dict]:
        return [check_row(row(good[j]), good[j], **check) for j in positions]

    train, report = PairStore(), TruncationReport()
    for s in range(0, len(tr), chunk):
        for pair in _tokenized(checked(tr[s : s + chunk]), tokenizer, report, source="train pairs", start=s, **trunc):
            train.append(pair)
    report.log("train pairs")
    if not len(train):
        raise PreferenceDataError("train pairs: no pairs left after tokenisation and truncation")
    held: list[dict] = []
    held_report = TruncationReport()
    for s in range(0, len(ho), chunk):
        if eval_pairs and len(held) >= eval_pairs:
            break
        held += _tokenized(
            checked(ho[s : s + chunk]), tokenizer, held_report, source="held-out pairs", start=s, **trunc
        )
    if ho and not held:
        raise PreferenceDataError("held-out pairs: no pairs left after tokenisation and truncation")
    return train, held[:eval_pairs] if eval_pairs else held, skipped, report


def _missing_columns(lines, mapping: dict, seen: set, *, start: int, where: str) -> None:
    """``rename_columns``' error for a mapped column found in no row (rows from ``start`` on not yet seen)."""
    missing = [c for c in mapping if c not in seen]
    if not missing:
        return
    for j in range(start, len(lines)):
        raw = lines[j]
        if isinstance(raw, dict):
            seen.update(k for k in missing if k in raw)
    still = [c for c in missing if c not in seen]
    first = next((r for r in (lines[j] for j in range(len(lines))) if isinstance(r, dict)), None)
    if still and first is not None:
        raise UserError(
            f"{where}: column(s) {still} named in the column mapping are not in the data "
            f"(its columns: {sorted(first)}); fix --columns / --*_field"
        )


# ----------------------------------------------------------------------------------------------------
# Splitting, ordering and collating
# ----------------------------------------------------------------------------------------------------


def split_holdout(n: int, fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index lists: a seeded permutation, the last ``fraction`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=rng.generator(seed)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[: n - k]), sorted(perm[n - k :])


def pair_width(pair: dict) -> int:
    """Tokens one pair's rows occupy when batched: prompt + the longer completion."""
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


def pair_tokens(pair: dict) -> int:
    """Real (non-padding) tokens of a pair's two sequences."""
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def epoch_batches(
    widths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    window: int = 32,
) -> list[list[int]]:
    """The global batches (index lists) of one epoch, a pure function of (seed, epoch).

    ``shuffle``: a permutation from ``rng.generator(seed + epoch)`` (else data order).
    ``group_by_length``: the permutation is cut into windows of ``window`` batches, each window is
    sorted by width and cut into batches, and the batches are shuffled again, so each batch holds
    pairs of similar length (little padding) while batch order stays random. The incomplete last
    batch is dropped so every step has exactly ``batch_size`` pairs.
    """
    n = len(widths)
    if n < batch_size:
        raise UserError(f"only {n} training pairs for batch_size={batch_size}: use a smaller batch or more data")
    g = rng.generator(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    order = order[: n - n % batch_size]
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    span = batch_size * max(window, 1)
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda j: (widths[j], j))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class StepBatches:
    """Step -> global batch, deterministic from (seed, step) so a resumed run continues exactly.
    Epoch e's order is ``epoch_batches(..., epoch=e)``; epochs are built on demand and cached."""

    def __init__(
        self,
        widths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        window: int = 32,
    ):
        self.widths, self.batch_size, self.seed = list(widths), batch_size, seed
        self.kw = dict(shuffle=shuffle, group_by_length=group_by_length, window=window)
        self.per_epoch = len(self.widths) // batch_size
        if self.per_epoch == 0:
            raise UserError(f"only {len(self.widths)} training pairs for batch_size={batch_size}")
        self._cache: dict[int, list[list[int]]] = {}

    def __call__(self, step: int) -> list[int]:
        """Indices of the global batch of optimiser step ``step`` (0-based)."""
        epoch, j = divmod(step, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.widths, self.batch_size, seed=self.seed, epoch=epoch, **self.kw)}
        return self._cache[epoch][j]

    def visited(self, steps: range) -> list[int]:
        """Sorted indices of every pair used by ``steps``."""
        return sorted({i for s in steps for i in self(s)})


def collate_pairs(pairs: Sequence[dict], *, pad_id: int):
    """A ``CompletionBatch`` of 2B rows: the B chosen completions, then the B rejected ones, each after
    its prompt (one forward pass scores both)."""
    from ..modeling import make_batch

    prompts = [p["prompt_ids"] for p in pairs]
    completions = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    return make_batch(prompts + prompts, completions, pad_id=pad_id)


@dataclass
class PackedPairs:
    """Padding-free layout of a batch of pairs: the 2B sequences (prompt + completion; chosen ones
    first, then rejected) packed first-fit-decreasing into R rows of width W.

    Without shared prompts (``segment`` None): each sequence is laid out whole, W is the longest
    sequence, each sequence's ``position_ids`` restart at 0, and the model is called with no attention
    mask, so Hugging Face models build a block-diagonal causal mask (``find_packed_sequence_indices``):
    no token attends across sequences. The tail of a row is padding with its own positions (its own
    block), and nothing reads it.

    With shared prompts (``segment``/``branch`` set; ``pack_sequences(..., share_prompts=True)``):
    sequences with the same prompt form one segment [prompt, completion 1, completion 2, ...] (a
    pair: [prompt, chosen, rejected], Wang et al. 2024, arXiv:2410.20305), each completion's positions
    continuing from the prompt length, and the model needs the prefix-tree attention mask
    ``ops.attention.prefix_tree_mask(segment, branch)``: position resets cannot express it.

    input_ids, position_ids: (R, W) long. src: (N,) flat index r·W + w of the hidden state that
    predicts each of the N completion tokens; targets: (N,) those tokens; seq: (N,) the sequence
    (0..2B-1) each belongs to, entries of one sequence consecutive and sequences in order; lengths:
    (2B,) completion lengths. segment, branch: (R, W) long or None (``ops.attention``; a row's
    padding tail is segment -1).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    src: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    lengths: torch.Tensor
    segment: Optional[torch.Tensor] = None
    branch: Optional[torch.Tensor] = None

    @property
    def n_seqs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def shared_prompts(self) -> bool:
        return self.segment is not None

    def to(self, device) -> "PackedPairs":
        return PackedPairs(
            *(
                None if t is None else t.to(device)
                for t in (
                    self.input_ids,
                    self.position_ids,
                    self.src,
                    self.targets,
                    self.seq,
                    self.lengths,
                    self.segment,
                    self.branch,
                )
            )
        )


def pack_pairs(pairs: Sequence[dict], *, pad_id: int, share_prompts: bool = False) -> PackedPairs:
    """Pack the chosen and rejected sequences of ``pairs`` into as few rows as first-fit decreasing
    finds. Without ``share_prompts`` each row is no wider than the longest sequence (so no row is
    longer than the padded layout's); with it, a pair's prompt is laid out once, followed by both
    completions (rows as wide as the longest [prompt, chosen, rejected])."""
    seqs = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    return pack_sequences(seqs, pad_id=pad_id, share_prompts=share_prompts)


def _first_fit(lens: Sequence[int]) -> tuple[dict[int, tuple[int, int]], list[int], int]:
    """First-fit decreasing of items of lengths ``lens`` into rows of width W = max(lens):
    (item -> (row, offset), room left in each row, W)."""
    W = max(lens)
    free: list[int] = []  # room left in each row
    by_room: dict[int, list[int]] = {}  # room -> min-heap of the rows with exactly that room
    place: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(lens)), key=lambda j: (-lens[j], j)):
        # first fit: the lowest-numbered row with room >= L (heap tops per room value: O(W log R), not O(R))
        fits = [by_room[room][0] for room in range(lens[i], W + 1) if by_room.get(room)]
        if fits:
            r = min(fits)
            heapq.heappop(by_room[free[r]])
            place[i] = (r, W - free[r])
            free[r] -= lens[i]
        else:
            r = len(free)
            place[i] = (r, 0)
            free.append(W - lens[i])
        if free[r]:
            heapq.heappush(by_room.setdefault(free[r], []), r)
    return place, free, W


def pack_sequences(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int, share_prompts: bool = False
) -> PackedPairs:
    """``pack_pairs`` for any (prompt_ids, completion_ids) sequences (the precomputed reference pass packs
    single rows this way): sequence i of the result is ``seqs[i]``, and its completion tokens are
    entries ``seq == i`` of ``src``/``targets``, in order.

    ``share_prompts``: sequences whose prompts are equal token for token share one copy of it (a
    segment [prompt, completion, completion, ...]; ``PackedPairs``), so the batch computes each
    distinct prompt once."""
    if not share_prompts:
        groups = [(p, [i]) for i, (p, _) in enumerate(seqs)]
    else:
        by_prompt: dict[tuple, int] = {}
        groups = []
        for i, (p, _) in enumerate(seqs):
            g = by_prompt.setdefault(tuple(p), len(groups))
            if g == len(groups):
                groups.append((p, []))
            groups[g][1].append(i)
    lens = [len(p) + sum(len(seqs[i][1]) for i in members) for p, members in groups]
    place, free, W = _first_fit(lens)
    R = len(free)
    ids = torch.full((R, W), pad_id, dtype=torch.long)
    pos = torch.zeros((R, W), dtype=torch.long)
    segment = torch.full((R, W), -1, dtype=torch.long)
    branch = torch.zeros((R, W), dtype=torch.long)
    first = [0] * len(seqs)  # flat index of the hidden state predicting each sequence's first completion token
    offset = [0] * len(seqs)  # flat index of each sequence's first completion token
    for g, (p, members) in enumerate(groups):
        r, o = place[g]
        P = len(p)
        ids[r, o : o + P] = torch.tensor(list(p), dtype=torch.long)
        pos[r, o : o + P] = torch.arange(P)
        segment[r, o : o + lens[g]] = g
        at = o + P
        for k, i in enumerate(members, start=1):
            c = seqs[i][1]
            ids[r, at : at + len(c)] = torch.tensor(list(c), dtype=torch.long)
            pos[r, at : at + len(c)] = torch.arange(P, P + len(c))
            branch[r, at : at + len(c)] = k
            first[i], offset[i] = r * W + o + P - 1, r * W + at
            at += len(c)
    for r, room in enumerate(free):
        if room:
            pos[r, W - room :] = torch.arange(room)  # padding tail: a block (segment -1) of its own
    src, tgt, seq = [], [], []
    for i, (_, c) in enumerate(seqs):
        # the last prompt token predicts completion token 0; completion token t - 1 predicts token t
        src.extend([first[i]] + list(range(offset[i], offset[i] + len(c) - 1)) if len(c) else [])
        tgt.extend(c)
        seq.extend([i] * len(c))
    return PackedPairs(
        ids,
        pos,
        torch.tensor(src, dtype=torch.long),
        torch.tensor(tgt, dtype=torch.long),
        torch.tensor(seq, dtype=torch.long),
        torch.tensor([len(c) for _, c in seqs], dtype=torch.long),
        segment if share_prompts else None,
        branch if share_prompts else None,
    )


SHARED_PROMPT_MIN_SAVING = 0.15
"""``auto`` shares prompts in a batch when that computes at least this fraction fewer token slots (rows x
width) than one sequence per completion. Measured on CPU (docs/speed.md): HH-RLHF pairs (~230-token
prompts) compute 0.65x the slots and train 1.5-1.6x faster; rt-polarity pairs (2-4-word prompts) 1.0x
the slots and 0.85-0.95x as fast (the wider rows cost more attention than the prompts save)."""


def share_prompts_pays(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], mode: str) -> bool:
    """Whether to lay ``seqs`` out with shared prompts: ``mode`` "on" always, "off" never, "auto" when
    it saves at least ``SHARED_PROMPT_MIN_SAVING`` of the token slots (both packings are planned from
    the lengths alone, nothing is built)."""
    if mode in ("on", "off"):
        return mode == "on"
    plain = [len(p) + len(c) for p, c in seqs]
    groups: dict[tuple, int] = {}
    for p, c in seqs:
        groups[tuple(p)] = groups.get(tuple(p), len(p)) + len(c)
    _, free_a, w_a = _first_fit(plain)
    _, free_b, w_b = _first_fit(list(groups.values()))
    return len(free_b) * w_b <= (1.0 - SHARED_PROMPT_MIN_SAVING) * len(free_a) * w_a


def sentiment_pairs(
    positive: Sequence[str], negative: Sequence[str], *, n: int, prompt_words: tuple[int, int] = (2, 4), seed: int = 0
) -> list[dict]:
    """Synthetic preference pairs from sentiment-labelled snippets (e.g. rt-polarity): the prompt is the
    first few words of a positive snippet, chosen its continuation, rejected the continuation of a
    negative snippet after as many words. A controlled-sentiment task in the spirit of the DPO
    paper's IMDb experiment (§6.1), for tests, benchmarks and demos."""
    g = rng.generator(seed)
    pos = [p.split() for p in positive]
    neg = [q.split() for q in negative]
    lo, hi = prompt_words
    rows = []
    for j in torch.randperm(min(len(pos), len(neg)), generator=g).tolist():
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        p, q = pos[j], neg[j]
        if len(p) <= k or len(q) <= k:
            continue
        rows.append({"prompt": " ".join(p[:k]), "chosen": " " + " ".join(p[k:]), "rejected": " " + " ".join(q[k:])})
        if len(rows) == n:
            break
    return rows
