"""Reward sources: text in, one float per (prompt, completion) out, composable.

Every source is a ``RewardSource``: ``source(prompts, completions) -> scores`` with ``scores`` a
(B,) float32 CPU tensor (one per sequence) and a ``.name`` used in metric
names (``reward/<name>``). Three kinds:

- ``RewardModelSource(path)``: a reward model trained by ``tether rm`` (any
  ``AutoModelForSequenceClassification`` with ``num_labels=1``), scoring the text
  ``join_text(prompt, completion)`` = prompt + completion, exactly as ``tether rm`` trained it.
- ``CallableSource("module:function")`` (or ``"path/to/file.py:function"``): a Python function with
  TRL's reward signature, ``fn(prompts, completions, **columns) -> list[float]``: every other column
  of each prompt's dataset row arrives as one list per column aligned with the batch (a
  ``ground_truth`` column as ``ground_truth=[...]``), plus ``completion_ids``. Conversational prompts
  arrive as their messages and completions as ``[{"role": "assistant", "content": text}]`` (TRL's
  convention); a function gets only the keywords its signature names (all of them with ``**kwargs``),
  so ``fn(completions)`` and ``fn(completions, prompts)`` keep working.
- ``VaderSource()``: the VADER compound sentiment of the completion in [-1, 1] (Hutto & Gilbert
  2014; the ``vaderSentiment`` package ships its lexicon, so it works offline). The project's gold
  reward for the movie-review demo.

``build_reward(spec)`` makes one from a string (``vader``, a reward-model folder, ``module:function``,
``file.py:function`` or TRL's ``module.function``, optionally prefixed ``name=`` to choose its metric
name). ``WeightedRewards(sources, weights)`` is several rewards as one, TRL GRPOTrainer's
``reward_funcs`` with ``reward_weights``: Σ_k w_k·r_k per completion, a function's ``None`` ("not
applicable") left out. ``RewardSet`` is the "gold versus proxy" view used by online trainers (Gao,
Schulman & Hilton 2022): the ``optimised`` source (often a learned proxy; or a ``WeightedRewards``) is
normalised/clipped and returned for optimisation, while every source, optimised and ``logged`` (the
gold), is reported raw as ``reward/<name>``, and each reward of a ``WeightedRewards`` separately.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError
from .ops.reward_model import update_moments, weighted_reward_sum
from .trl_names import is_dotted_name

log = logging.getLogger(__name__)


def join_text(prompt: str, completion: str) -> str:
    """The text a reward model scores: the prompt immediately followed by the completion.

    Plain concatenation (no separator) so that a completion sampled after a prompt is scored as the
    exact string the policy produced, and so that HH-RLHF-style pairs (prompt = shared prefix of two
    dialogues) score the full dialogue. ``tether rm`` trains on the same join.
    """
    return prompt + completion


def _check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"reward source got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per "
            "completion"
        )


class RewardSource:
    """Base class: ``__call__(prompts, completions, **columns) -> (B,) float32`` CPU tensor of ``scores``.

    ``prompts`` / ``completions`` are the texts the policy saw and wrote; ``columns`` (see
    ``reward_columns``) carry the prompts' dataset rows. Sources that score text ignore them; a
    subclass whose ``__call__`` takes no ``**columns`` is called without them."""

    name: str = "reward"
    may_abstain: bool = False
    """True for a source whose scores may hold NaN meaning "not applicable" (a reward function's ``None``,
    TRL's convention): allowed inside ``WeightedRewards``, where another reward scores that completion."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------------
# Reward models


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row, for left or right padding: (B, L) -> (B,) long."""
    L = attention_mask.shape[1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward-model output per sequence: (B, L) ids + mask -> (B,) ``scores`` (model dtype).

    ``model`` is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (possibly wrapped by
    peft). We run its backbone and its ``score`` head ourselves and read the head at the last
    *attended* token, with position ids counted over real tokens, instead of calling the class's
    forward: that forward pools at the rightmost token that differs from ``pad_token_id``, which is
    wrong when pad = eos (tether's tokenizers, stories260K's) and a text ends in eos, and it numbers
    left-padded positions from 0. For right-padded text that does not end in the pad token both give
    the same number (tests/test_reward_model.py checks this), so a model trained here scores the same
    under plain ``transformers``.
    """
    from .modeling import position_ids

    core = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # peft: LoRA layers are injected in place
    head = getattr(core, "score", None)
    if head is None:
        raise ValueError(
            f"{type(core).__name__} has no 'score' head; a tether reward model is an "
            "AutoModelForSequenceClassification (e.g. LlamaForSequenceClassification) with num_labels=1"
        )
    backbone = getattr(core, core.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state  # (B, L, H)
    last = last_token_index(attention_mask)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    out = head(pooled)  # (B, num_labels)
    if out.shape[-1] != 1:
        raise ValueError(f"reward model must have num_labels=1 (one scalar per sequence), this one has {out.shape[-1]}")
    return out[:, 0]  # (B,)


def load_reward_model(path: str, *, device: str | torch.device = "cpu", dtype: str = "float32"):
    """(tokenizer, model) of a reward-model folder, model in eval mode; tokenizer right-padded."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import DTYPES, load_tokenizer

    tok = load_tokenizer(path, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model.to(device).eval()


def _check_is_reward_model(path: str) -> None:
    import json

    archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"{path} holds a {archs[0]}, not a reward model (an ...ForSequenceClassification with num_labels=1); "
            f"train one with `tether rm --model {path}` and pass its final/ folder"
        )


class RewardModelSource(RewardSource):
    """Scores ``join_text(prompt, completion)`` with a reward model trained by ``tether rm``.

    path: a folder loadable by ``AutoModelForSequenceClassification`` (num_labels=1).
    batch_size: texts per forward pass. max_length: token limit; longer texts keep their *last*
    tokens (the score is read at the last token), None = no truncation.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: Optional[int] = None,
        name: str = "rm",
        dtype: str = "float32",
    ):
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(
                f"reward model folder {path} has no config.json; pass the final/ folder written by `tether rm`"
            )
        _check_is_reward_model(path)
        self.path, self.name, self.batch_size, self.max_length = str(path), name, int(batch_size), max_length
        self.device = torch.device(device)
        self.tokenizer, self.model = load_reward_model(self.path, device=self.device, dtype=dtype)
        self.tokenizer.truncation_side = "left"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(prompts, completions)
        texts = [join_text(p, c) for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(self.device)
            out.append(sequence_scores(self.model, enc["input_ids"], enc["attention_mask"]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# Python callables


def split_callable(spec: str) -> tuple[str, str]:
    """``module.path:function``, ``file.py:function`` or TRL's dotted ``module.path.function`` ->
    (module or file, function name)."""
    target, sep, attr = spec.rpartition(":")
    if not sep and is_dotted_name(spec):
        target, _, attr = spec.rpartition(".")
    elif not sep or not target or not attr:
        raise UserError(
            f"callable reward {spec!r} must look like 'module.path:function', 'file.py:function' or "
            "'module.path.function'"
        )
    return target, attr


def _with_working_directory(fn: Callable):
    """``fn()``, retried with the working directory on ``sys.path`` (last) if its module was not found:
    a ``tether`` console script's ``sys.path`` starts at the script's folder, not where it was run, and
    ``my_rewards.format_reward`` next to the user's config should import as under ``python -m``."""
    import os
    import sys

    try:
        return fn()
    except ModuleNotFoundError:
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return fn()


def import_module(target: str):
    """``importlib.import_module(target)``, also from the working directory (``_with_working_directory``)."""
    return _with_working_directory(lambda: importlib.import_module(target))


def find_module(target: str):
    """``importlib.util.find_spec(target)`` (None if absent), also in the working directory; imports
    nothing but the parent packages of ``target``."""

    def find():
        found = importlib.util.find_spec(target)
        if found is None:
            raise ModuleNotFoundError(target)
        return found

    try:
        return _with_working_directory(find)
    except (ImportError, ValueError):
        return None


def _import_callable(spec: str) -> Callable:
    """``module.path:function``, ``path/to/file.py:function`` or ``module.path.function`` -> the function."""
    target, attr = split_callable(spec)
    if target.endswith(".py"):
        if not Path(target).exists():
            raise FileNotFoundError(f"callable reward {spec!r}: file {target} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"tether_reward_{Path(target).stem}", target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = import_module(target)
        except ImportError as e:
            raise ImportError(
                f"callable reward {spec!r}: cannot import module {target!r} ({e}); is it on PYTHONPATH?"
            ) from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"callable reward {spec!r}: module {target!r} has no function {attr!r}")
    return fn


def _accepts_prompts(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "prompts" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


CHAT_PROMPTS = "_chat_prompts"
"""Key of ``reward_columns`` holding the prompts as in the data (messages for conversational rows)."""


def reward_columns(rows: Optional[Sequence] = None, completion_ids: Optional[Sequence] = None) -> dict[str, list]:
    """The keyword arguments of a batch's reward call: for prompt ``rows`` (``tether.data.prompts.Prompt``,
    one per completion) every column of their dataset rows as one list aligned with the batch (None
    where a row lacks it), the prompts as in the data under ``CHAT_PROMPTS`` when any is a
    conversation, and ``completion_ids`` (one list of token ids per completion) when given."""
    out: dict[str, list] = {}
    if rows is not None:
        names = list(dict.fromkeys(k for r in rows for k in r.columns))
        out.update({k: [r.columns.get(k) for r in rows] for k in names})
        if any(r.conversational for r in rows):
            out[CHAT_PROMPTS] = [r.prompt for r in rows]
    if completion_ids is not None:
        out["completion_ids"] = [list(c) for c in completion_ids]
    return out


def call_source(src: "RewardSource", prompts: Sequence[str], completions: Sequence[str], columns: dict) -> torch.Tensor:
    """``src(prompts, completions, **columns)``, or without the columns if its ``__call__`` takes none."""
    if columns:
        try:
            params = inspect.signature(src.__call__).parameters.values()
        except (TypeError, ValueError):
            params = ()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return src(prompts, completions, **columns)
    return src(prompts, completions)


class CallableSource(RewardSource):
    """A Python function as a reward, with TRL's signature ``fn(prompts, completions, **columns) -> list[float]``.

    ``fn`` is a callable or a ``"module:function"`` / ``"file.py:function"`` string. It is called once
    per batch with keywords: ``completions`` (positionally if it has no parameter of that name), and
    ``prompts`` and each column of ``reward_columns`` only if its signature names them or has
    ``**kwargs``. Conversational prompts (``CHAT_PROMPTS`` present) are passed as their messages, and
    their completions as ``[{"role": "assistant", "content": text}]``. A column the function requires
    but the data lacks is an error naming it. It must return one finite number per completion, or
    ``None`` where it does not apply (TRL's convention; a NaN score, allowed only among several rewards:
    ``WeightedRewards``); anything else is a ``UserError`` (``function_scores``).
    """

    may_abstain = True

    def __init__(self, fn: Callable | str, *, name: Optional[str] = None):
        self.spec = fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
        self.fn = _import_callable(fn) if isinstance(fn, str) else fn
        self.name = name or getattr(self.fn, "__name__", "callable")
        self._pass_prompts = _accepts_prompts(self.fn)
        try:
            self._params = dict(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):
            self._params = {}
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._params.values())

    def _arguments(self, prompts: Sequence[str], completions: Sequence[str], columns: dict) -> tuple[list, dict]:
        """(positional, keyword) arguments of one call (see the class docstring)."""
        columns = dict(columns)
        raw = columns.pop(CHAT_PROMPTS, None)
        p_arg, c_arg = list(prompts), list(completions)
        if raw is not None:  # TRL's conversational convention, row by row
            p_arg = list(raw)
            c_arg = [
                [{"role": "assistant", "content": c}] if isinstance(r, list) else c for r, c in zip(raw, completions)
            ]
        kw = {k: v for k, v in columns.items() if self._var_kw or k in self._params}
        if self._pass_prompts:
            kw["prompts"] = p_arg
        named = "completions" in self._params
        if named:
            kw["completions"] = c_arg
        P = inspect.Parameter
        free = [n for n, p in self._params.items() if p.kind in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD)]
        first = None if named or not free else free[0]  # takes the completions positionally
        missing = [n for n in free if self._params[n].default is P.empty and n not in kw and n != first]
        if missing:
            raise UserError(
                f"reward function {self.spec} needs {missing}, which the prompts data does not have (its "
                f"columns: {sorted(k for k in columns if k != 'completion_ids')}); add the column(s) or map "
                "them with --columns SOURCE=NAME"
            )
        return ([] if named else [c_arg]), kw

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(prompts, completions)
        args, kw = self._arguments(prompts, completions, columns)
        return function_scores(self.spec, self.fn(*args, **kw), len(completions))


def function_scores(spec: str, out, n: int) -> torch.Tensor:
    """A reward function's return value ``out`` for ``n`` completions -> (n,) float32 scores, NaN where it
    returned ``None`` ("not applicable", TRL's convention). Anything but a sequence of ``n`` finite
    numbers or Nones is a ``UserError`` naming the function ``spec`` and the fix."""
    fix = f"return a list with one float per completion (here {n}), e.g. [score(c) for c in completions]"
    if isinstance(out, (int, float)) or getattr(out, "ndim", None) == 0:  # a float, numpy or 0-d tensor scalar
        raise UserError(f"reward function {spec} returned one number ({out!r}), not one per completion; {fix}")
    if out is None or isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise UserError(f"reward function {spec} returned {type(out).__name__}, not a list of floats; {fix}")
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(float("nan"))
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise UserError(
                f"reward function {spec} must return a list of floats, and returned {type(v).__name__} {v!r} at "
                f"completion {i}; {fix} (None where the reward does not apply)"
            ) from None
        if not math.isfinite(x):
            raise UserError(
                f"reward function {spec} returned a non-finite value ({x}) at completion {i}; a reward is a finite "
                "number, or None where it does not apply (in a list of rewards)"
            )
        values.append(x)
    if len(values) != n:
        raise UserError(f"reward function {spec} returned {len(values)} values for {n} completions; {fix}")
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# VADER sentiment


class VaderSource(RewardSource):
    """VADER compound sentiment of the completion (Hutto & Gilbert 2014), in [-1, 1].

    Scores the completion only (the prompt is shared context, and would shift every sample by the
    same sentiment). ``include_prompt=True`` scores ``join_text(prompt, completion)`` instead.
    """

    def __init__(self, *, include_prompt: bool = False, name: str = "vader"):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - it is a declared dependency
            raise ImportError("the vader reward needs the vaderSentiment package: pip install vaderSentiment") from e
        self.analyzer = SentimentIntensityAnalyzer()
        self.include_prompt, self.name = include_prompt, name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        _check_batch(prompts, completions)
        texts = [join_text(p, c) for p, c in zip(prompts, completions)] if self.include_prompt else list(completions)
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Construction from a string


_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)=(.+)$")


def build_reward(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    assets: Optional[str] = None,
    batch_size: int = 32,
    max_length: Optional[int] = None,
) -> RewardSource:
    """A reward source from a string:

    - ``vader`` — ``VaderSource()``;
    - a folder with ``config.json`` — ``RewardModelSource(folder)`` (a ``tether rm`` output's final/,
      or a run folder containing final/);
    - ``module.path:function``, ``file.py:function`` or TRL's ``module.path.function`` — ``CallableSource``
      (a string that is an existing folder is a reward model, whatever it looks like);
    - any of these prefixed by ``NAME=`` (e.g. ``gold=vader``, ``proxy=runs/rm/final``) to set the
      source's ``name`` (its metric is ``reward/NAME``).

    ``assets`` is accepted for symmetry with model arguments (a reward model given as an asset short
    name resolves through it).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("reward spec is empty; pass 'vader', a reward-model folder, or 'module:function'")
    spec = spec.strip()
    name = None
    m = _NAMED.match(spec)
    if m and not Path(spec).exists():
        name, spec = m.group(1), m.group(2)
    kw = {"name": name} if name else {}
    if spec.lower() == "vader":
        return VaderSource(**kw)
    from .assets import resolve_model

    path = Path(resolve_model(spec, assets))
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
            path = path / "final"
        return RewardModelSource(str(path), device=device, batch_size=batch_size, max_length=max_length, **kw)
    if ":" in spec or is_dotted_name(spec):  # an existing folder of that name was taken above
        return CallableSource(spec, **kw)
    raise UserError(
        f"reward spec {spec!r} is not 'vader', an existing reward-model folder, or 'module:function'; "
        "check the path (reward models are the final/ folder of `tether rm`)"
    )


def reward_specs(value) -> list:
    """The config's ``reward`` as a list of specs: a YAML list as is, a string split at commas
    (``--reward fmt.py:f,acc.py:g``) unless the whole string is an existing path. Python objects
    (a ``RewardSource``, a function) pass through. An empty list is a ``UserError``."""
    if isinstance(value, (list, tuple)):
        specs = list(value)
    elif isinstance(value, str) and "," in value and not Path(value).expanduser().exists():
        specs = [v.strip() for v in value.split(",")]
    else:
        specs = [value]
    what = "'vader', a reward-model folder, 'module:function' or a comma-separated list of them"
    if not specs or any(isinstance(v, str) and not v.strip() for v in specs):
        raise UserError(f"reward {value!r} has an empty entry; give {what}")
    for v in specs:
        if not (isinstance(v, (str, RewardSource)) or callable(v)):
            raise UserError(f"reward {value!r}: {v!r} is not a reward; give {what}")
    return specs


def reward_weights_for(weights, n: int) -> Optional[list[float]]:
    """``reward_weights`` checked against ``n`` rewards: None (every weight 1.0) or ``n`` finite floats."""
    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)):
        weights = [weights]
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UserError(f"reward_weights {list(weights)!r}: give one number per reward, e.g. 1.0,0.5") from None
    if len(out) != n:
        raise UserError(
            f"reward_weights has {len(out)} weight(s) for {n} reward(s); give one weight per entry of reward, in the "
            "same order (or leave reward_weights out: every weight 1.0)"
        )
    if not all(math.isfinite(w) for w in out):
        raise UserError(f"reward_weights {out}: every weight must be a finite number")
    return out


# --------------------------------------------------------------------------------------------------
# Several rewards


def distinct_names(names: Sequence[str]) -> list[str]:
    """Names made distinct by suffixes: [f, f, g] -> [f, f_2, g] (two functions both called ``reward``)."""
    out: list[str] = []
    for n in names:
        m, k = n, 2
        while m in out or (m != n and m in names):
            m, k = f"{n}_{k}", k + 1
        out.append(m)
    return out


class WeightedRewards(RewardSource):
    """Several rewards as one: ``Σ_k w_k·r_k`` per completion, TRL GRPOTrainer's ``reward_funcs`` with
    ``reward_weights``. A reward function may return ``None`` for a completion it does not apply to
    (NaN in ``per_func``): the sum leaves it out (``ops.reward_model.weighted_reward_sum``, a nansum). A
    completion that no reward scores is refused with a ``UserError`` (TRL warns and trains on 0: a made-up
    reward that moves the group's baseline).

    sources: the rewards (``RewardSource``s); weights: one float each (None = all 1.0); ``names``: their
    metric names (``reward/<name>/mean`` and ``/std``), the sources' names made distinct (f, f_2).
    """

    def __init__(
        self, sources: Sequence[RewardSource], weights: Optional[Sequence[float]] = None, *, name: str = "weighted_sum"
    ):
        self.sources = list(sources)
        if not self.sources:
            raise UserError("reward is an empty list; give at least one reward")
        w = reward_weights_for(weights, len(self.sources))
        self.weights = torch.tensor([1.0] * len(self.sources) if w is None else w, dtype=torch.float32)  # (K,)
        self.names = distinct_names([s.name for s in self.sources])
        self.name = name

    def per_func(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        """(B, K) float32: each reward's scores, NaN where a function returned None."""
        _check_batch(prompts, completions)
        cols = []
        for src in self.sources:
            s = call_source(src, prompts, completions, columns).float()
            checked_scores(src, s[~torch.isnan(s)] if src.may_abstain else s)
            cols.append(s)
        m = torch.stack(cols, dim=1) if cols else torch.zeros(len(completions), 0)
        none = torch.isnan(m).all(dim=1)
        if bool(none.any()):
            i = int(none.nonzero()[0])
            raise UserError(
                f"no reward scored completion {i} of {len(completions)} ({', '.join(self.names)} all returned None; "
                f"prompt {str(prompts[i])[:60]!r}, completion {str(completions[i])[:60]!r}); at least one reward "
                "must return a number for every completion (return 0.0 where that is meant)"
            )
        return m

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        return weighted_reward_sum(self.per_func(prompts, completions, **columns), self.weights)  # (B,)

    def components(self, per_func: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: (B,) scores}`` of ``per_func``'s columns (NaN where not applicable)."""
        return {n: per_func[:, k] for k, n in enumerate(self.names)}


def combine_rewards(sources: Sequence[RewardSource], weights: Optional[Sequence[float]] = None) -> RewardSource:
    """One source: the source itself when there is one with weight 1 (or none given; every metric as for
    a single reward), else ``WeightedRewards(sources, weights)``."""
    w = reward_weights_for(weights, len(sources))
    if len(sources) == 1 and (w is None or w == [1.0]):
        return sources[0]
    return WeightedRewards(sources, w)


# --------------------------------------------------------------------------------------------------
# Gold versus proxy


class RunningMoments:
    """Running mean and (population) variance of every score seen, with a checkpointable state."""

    def __init__(self) -> None:
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.mean, self.var, self.count = update_moments(self.mean, self.var, self.count, x)

    @property
    def std(self) -> float:
        return float(self.var.sqrt())

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = torch.tensor(float(state["mean"]), dtype=torch.float64)
        self.var = torch.tensor(float(state["var"]), dtype=torch.float64)
        self.count = torch.tensor(float(state["count"]), dtype=torch.float64)


# A reward this large overflows float32 once squared (value loss, whitening): 3e19² > 3.4e38.
# Rewards of |r| > LARGE_REWARD are legal but make value losses and advantages dominate; warned once.
LARGE_REWARD = 1e4
_warned_large: set = set()


def checked_scores(src: RewardSource, scores: torch.Tensor) -> torch.Tensor:
    """Refuse non-finite scores from any source (VADER, reward model, function). Refused rather than
    skipped: dropping completions would bias the batch towards those the reward could score, and a
    reward that returns NaN is a bug to fix, not noise to average over. Warn once per source about
    scores beyond ±LARGE_REWARD (±1e30 rewards made PPO's value loss overflow)."""
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        if src.may_abstain and bool(torch.isnan(scores[i])):  # a function's None: "not applicable"
            raise UserError(
                f"reward {src.name!r} returned None for completion {i} of {scores.numel()}; None means 'does not "
                "apply' and needs another reward to score that completion (--reward a,b); return a number"
            )
        raise UserError(
            f"reward {src.name!r} ({type(src).__name__}) returned {int((~finite).sum())} non-finite score(s) of "
            f"{scores.numel()} (first: {float(scores[i])} at completion {i}); a reward must be a finite number for "
            "every "
            "completion: fix the reward (or the reward model's weights)"
        )
    big = float(scores.abs().max()) if scores.numel() else 0.0
    if big > LARGE_REWARD and src.name not in _warned_large:
        _warned_large.add(src.name)
        log.warning(
            "reward %r returned a score of magnitude %.3g: rewards this large swamp the KL penalty and can "
            "overflow the value loss; rescale the reward, or pass --reward_normalize true / --reward_clip",
            src.name,
            big,
        )
    return scores


class RewardSet:
    """The reward to optimise plus rewards to watch (Gao et al. 2022: optimise a proxy, log the gold).

    ``rs(prompts, completions) -> (scores, metrics)``:

    - ``scores`` (B,) float32: the ``optimised`` source's scores, then, if ``normalize``, standardised
      with the running mean/std of every optimised score seen so far *including this batch*
      (``(s - mean) / sqrt(var + eps)``; openai/lm-human-preferences and OpenRLHF normalise the same
      way), then, if ``clip`` is set, clamped to [-clip, clip] (after normalisation, so ``clip`` is
      in standard deviations when both are on);
    - ``metrics``: ``{"reward/<name>": (B,) raw scores}`` for the optimised source and each logged one.

    ``state_dict()`` / ``load_state_dict()`` carry the running statistics, so a resumed run
    normalises exactly as the uninterrupted one would.
    """

    def __init__(
        self,
        optimised: RewardSource,
        logged: Sequence[RewardSource] = (),
        *,
        clip: Optional[float] = None,
        normalize: bool = False,
        eps: float = 1e-8,
    ):
        names = [optimised.name] + list(getattr(optimised, "names", ())) + [s.name for s in logged]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(
                f"reward sources need distinct names (metric reward/<name>); duplicated: {dup}. Use NAME=spec to rename"
            )
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"reward clip must be a positive number or None, got {clip}")
        self.optimised, self.logged = optimised, list(logged)
        self.clip, self.normalize, self.eps = clip, normalize, eps
        self.moments = RunningMoments()

    @property
    def sources(self) -> list[RewardSource]:
        return [self.optimised, *self.logged]

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **columns
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``columns``: the prompts' dataset rows (``reward_columns``), passed on to every source that takes them."""
        scores, metrics, _ = self.score(prompts, completions, **columns)
        return scores, metrics

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], **columns
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(scores, metrics, components)``: as ``__call__``, plus, when the optimised source is a
        ``WeightedRewards``, ``{name: (B,) raw scores}`` of each of its rewards (NaN where not applicable;
        ``metrics`` then holds their weighted sum under ``reward/<its name>``), else ``{}``."""
        components: dict[str, torch.Tensor] = {}
        if isinstance(self.optimised, WeightedRewards):
            per_func = self.optimised.per_func(prompts, completions, **columns)  # (B, K)
            components = self.optimised.components(per_func)
            raw = weighted_reward_sum(per_func, self.optimised.weights)  # (B,)
        else:
            raw = call_source(self.optimised, prompts, completions, columns).float()
        raw = checked_scores(self.optimised, raw)  # (B,)
        metrics = {f"reward/{self.optimised.name}": raw}
        for src in self.logged:
            metrics[f"reward/{src.name}"] = checked_scores(src, call_source(src, prompts, completions, columns).float())
        scores = raw
        if self.normalize:
            self.moments.update(raw)
            scores = ((raw.double() - self.moments.mean) / torch.sqrt(self.moments.var + self.eps)).float()
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores, metrics, components

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])


def build_reward_set(
    reward,
    gold: Sequence[str] = (),
    *,
    weights: Optional[Sequence[float]] = None,
    clip: Optional[float] = None,
    normalize: bool = False,
    device: str | torch.device = "cpu",
    assets: Optional[str] = None,
    batch_size: int = 32,
) -> RewardSet:
    """``RewardSet(combine_rewards([build_reward(r) for r in reward_specs(reward)], weights),
    [build_reward(g) for g in gold], clip=, normalize=)``: ``reward`` one spec, a comma-separated list or a
    list of specs (several: their weighted sum is optimised, ``WeightedRewards``)."""
    sources = [build_reward(r, device=device, assets=assets, batch_size=batch_size) for r in reward_specs(reward)]
    logged = [build_reward(g, device=device, assets=assets, batch_size=batch_size) for g in gold]
    return RewardSet(combine_rewards(sources, weights), logged, clip=clip, normalize=normalize)
