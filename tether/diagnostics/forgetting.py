"""The forgetting probe: how much did fine-tuning change the model away from its training data?

Two measurements (docs/theory.md §10 gives the definitions and why each is exact or unbiased):

1. **Teacher-forced on off-distribution text** (no sampling). Each text x_1..x_n is fed to both
   models; at every position t ≥ 2 (the first token has no context) with state s_t = x_<t:

   - NLL: -log π_θ(x_t|s_t) and -log π_ref(x_t|s_t), averaged over all tokens of all texts
     (perplexity = exp of that mean), and their change ``nll_delta`` = NLL_θ - NLL_ref (> 0: the
     policy predicts this text worse than its reference did);
   - the exact per-token KLs KL[π_ref(·|s_t)‖π_θ(·|s_t)] and KL[π_θ(·|s_t)‖π_ref(·|s_t)], full-
     vocabulary sums (``ops.logprobs.exact_kl_from_logits``, chunked over positions), averaged over
     the same tokens. They are exact for these states: no estimator, no sampling noise.

2. **Forward KL on the training prompts** (Shenfeld et al. 2025, "RL's Razor", arXiv:2509.04259:
   forgetting tracks E_x[KL(π_ref‖π_θ)] on the task's own inputs). Completions y are *sampled from
   π_ref* (τ = 1, no filters, up to ``max_new_tokens``) and, at each of their positions, the exact
   KL[π_ref(·|s_t)‖π_θ(·|s_t)] is summed over the completion. By the chain rule of the KL, the
   expectation of that sum over y ~ π_ref is the sequence-level forward KL KL[π_ref(·|x)‖π_θ(·|x)]
   (of the completion distribution truncated at ``max_new_tokens``), so its mean over prompts and
   samples is an unbiased, Rao-Blackwellised estimate of E_x[KL(π_ref‖π_θ)]. This is ``engine.measure``
   with the two models' roles swapped (it samples from its first model and scores KL[first‖second]):
   the one sampling-and-scoring engine, not a copy. The next-token forward KL at the prompt (the
   first position only) needs no sampling and is reported exactly alongside.

``ForgettingProbe`` is the same measurement 1 as the trainers run it every ``eval_every`` steps
(``eval/forgetting/*``). Default off-distribution text (``default_texts``): a seeded slice of a
shared asset the run did not train on.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..engine import mean_stderr, measure
from ..errors import UserError
from ..modeling import CompletionBatch, forward_completion, make_batch
from ..ops.logprobs import exact_kl_from_logits, selective_logps
from ..reference import FrozenReference, Reference, eval_mode

log = logging.getLogger(__name__)

ASSET_TEXTS = ("rt-polarity", "hh-rlhf")
"""Shared assets the default off-distribution text is drawn from, in order of preference."""

TEXT_FIELDS = ("text", "chosen", "completion", "prompt")
"""Fields a table row's text is read from (the first present; ``prompt`` + ``completion`` are joined)."""

_SUMS = ("nll_policy", "nll_reference", "kl_ref_to_policy", "kl_policy_to_ref")


# --------------------------------------------------------------------------------------------------
# the math: pure functions of tensors


def teacher_forced_sums(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-text sums of the teacher-forced quantities (docs/theory.md §10).

    Args:
        logits, ref_logits: (B, T, V) next-token logits of π_θ and π_ref, position t predicting targets[:, t].
        targets: (B, T) int64 the observed tokens x_t.
        mask: (B, T) bool, True = this position counts.
    Returns:
        {name: (B,) fp32 (fp64 for fp64 logits)} with names ``nll_policy`` = Σ_t -log π_θ(x_t|s_t),
        ``nll_reference`` = Σ_t -log π_ref(x_t|s_t), ``kl_ref_to_policy`` = Σ_t KL[π_ref‖π_θ](s_t),
        ``kl_policy_to_ref`` = Σ_t KL[π_θ‖π_ref](s_t), and ``tokens`` = Σ_t mask (all sums over mask).
    """
    logps = selective_logps(logits, targets)  # (B, T)
    ref_logps = selective_logps(ref_logits, targets)  # (B, T)
    fwd = exact_kl_from_logits(ref_logits, logits)  # (B, T) KL[π_ref‖π_θ] per position
    rev = exact_kl_from_logits(logits, ref_logits)  # (B, T) KL[π_θ‖π_ref] per position
    m = mask.to(logps.dtype)
    return {
        "nll_policy": -(logps * m).sum(-1),
        "nll_reference": -(ref_logps * m).sum(-1),
        "kl_ref_to_policy": (fwd * m).sum(-1),
        "kl_policy_to_ref": (rev * m).sum(-1),
        "tokens": m.sum(-1),
    }


def summarize(sums: dict[str, Sequence[float]]) -> dict:
    """Token-weighted means of per-text sums (``teacher_forced_sums`` over all texts) and derived numbers.

    Every mean is Σ_texts Σ_t value / Σ_texts tokens: per token, not per text. ``*_stderr`` is the
    standard error over texts of the per-text mean (a guide to how much another text sample would
    move the number; the KLs themselves are exact for the texts given)."""
    tokens = torch.tensor(list(sums["tokens"]), dtype=torch.float64)
    n_tok = float(tokens.sum())
    if n_tok == 0:
        raise UserError("the forgetting texts have no token to score: every text tokenizes to at most one token")
    out: dict = {"texts": int(tokens.numel()), "tokens": int(n_tok)}
    for name in _SUMS:
        v = torch.tensor(list(sums[name]), dtype=torch.float64)
        out[name] = float(v.sum()) / n_tok
        out[f"{name}_stderr"] = mean_stderr(v / tokens.clamp(min=1))[1]
    delta = torch.tensor(list(sums["nll_policy"]), dtype=torch.float64) - torch.tensor(
        list(sums["nll_reference"]), dtype=torch.float64
    )
    out["nll_delta"] = float(delta.sum()) / n_tok
    out["nll_delta_stderr"] = mean_stderr(delta / tokens.clamp(min=1))[1]
    out["ppl_policy"] = math.exp(out["nll_policy"])
    out["ppl_reference"] = math.exp(out["nll_reference"])
    out["ppl_delta"] = out["ppl_policy"] - out["ppl_reference"]
    return out


# --------------------------------------------------------------------------------------------------
# texts


def text_of(row, *, where: str) -> str:
    """The text of one data row: a string itself; a table row's ``text`` (or ``chosen``, or ``prompt`` +
    ``completion``, or one of them)."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            return row["prompt"] + row["completion"]
        for f in TEXT_FIELDS:
            if isinstance(row.get(f), str):
                return row[f]
        raise UserError(f"{where}: row has fields {sorted(row)}; the forgetting texts need one of {list(TEXT_FIELDS)}")
    raise UserError(f"{where}: expected a string or an object, got {type(row).__name__}")


def read_texts(spec: str, *, assets: Optional[str] = None, max_texts: int = 0, seed: int = 0) -> list[str]:
    """Texts from a text file (one per line), .jsonl/.json/.parquet, a ``datasets`` folder, or an asset
    name (``rt-polarity``, ``hh-rlhf``: its chosen dialogues). At most ``max_texts`` (0 = all), a seeded
    random selection in file order."""
    from ..data.text import read_rows

    if spec == "hh-rlhf":
        from ..assets import resolve
        from ..data.text import read_table_file

        rows = read_table_file(resolve("hh-rlhf", assets) / "harmless-base-test.jsonl.gz")
    else:
        try:
            rows = read_rows(spec, assets=assets)
        except FileNotFoundError as e:
            raise UserError(f"forgetting texts {spec!r}: {e}") from None
    texts = [t for i, r in enumerate(rows) if (t := text_of(r, where=f"{spec} row {i}")).strip()]
    if not texts:
        raise UserError(
            f"forgetting texts {spec!r}: no non-empty text found; pass a text file, .jsonl or datasets folder"
        )
    if max_texts and len(texts) > max_texts:
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_texts))
        texts = [texts[i] for i in keep]
    return texts


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def run_data_sample(config: dict, *, limit: int = 200) -> list[str]:
    """Up to ``limit`` lines of every existing file a run config names (its data and prompts)."""
    out: list[str] = []
    for s in _strings(config):
        p = Path(s)
        if (
            len(s) < 256
            and p.is_file()
            and p.stat().st_size < 50_000_000
            and p.suffix not in (".safetensors", ".bin", ".pt")
        ):
            try:
                out += [ln.strip() for ln in p.read_text(errors="replace").splitlines()[:limit] if ln.strip()]
            except OSError:
                continue
    return out


def trained_on(asset: str, config: dict, *, assets: Optional[str] = None) -> bool:
    """Whether a run config used the asset ``asset``: it names it, or a data file it names holds its
    text (an rt-polarity line starting with one of the file's first 200 lines, e.g. the demo's prompts;
    an HH dialogue). A heuristic: a short generic line ("the film") can match by chance, and then the
    default text is merely the other asset."""
    if any(asset in s for s in _strings(config)):
        return True
    sample = run_data_sample(config)
    if isinstance(config.get("prompts"), (list, tuple)):  # prompts given in memory (train_online(prompts=...))
        sample += [str(p) for p in config["prompts"][:500]]
    if asset == "hh-rlhf":
        return any("Human:" in s for s in sample)
    if asset == "rt-polarity":
        from ..assets import resolve

        root = resolve(asset, assets)
        lines = sorted(
            ln.strip()
            for f in ("rt-polarity.pos", "rt-polarity.neg")
            for ln in (root / f).read_text(encoding="latin-1").splitlines()
            if ln.strip()
        )
        for s in sample:
            if s.startswith("{"):  # a JSONL row: its prompt or text
                try:
                    row = json.loads(s)
                    s = next((row[k] for k in ("prompt", "text", "chosen") if isinstance(row.get(k), str)), s)
                except (json.JSONDecodeError, AttributeError):
                    pass
            s = s.strip()
            if len(s) >= 4:
                i = bisect.bisect_left(lines, s)
                if i < len(lines) and lines[i].startswith(s):
                    return True
        return False
    return False


def run_config_of(model_dir: str) -> dict:
    """The resolved config of the tether run that wrote ``model_dir`` (``RUN/final`` or
    ``RUN/checkpoints/step-N[/model]``), or {} (a hub name, an asset, a folder not written by tether)."""
    import yaml

    p = Path(str(model_dir)).expanduser()
    if not p.is_dir():
        return {}
    p = p.resolve()
    runs = (
        [p.parent]
        if p.name == "final"
        else [
            q for q in (p.parent.parent, p.parent.parent.parent) if "checkpoints" in p.parts and q.name != "checkpoints"
        ][:1]
    )
    for run in runs:
        cand = run / "config.yaml"
        if cand.is_file():
            try:
                data = yaml.safe_load(cand.read_text())
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def lineage(config: dict, *, depth: int = 3) -> dict:
    """``config`` with, under ``_model_run``, the config of the run that made its starting ``model`` (and
    so on, ``depth`` levels): a DPO run from an SFT reference also "trained on" the SFT data."""
    parent = run_config_of(config["model"]) if depth > 0 and isinstance(config.get("model"), str) else {}
    return {**config, "_model_run": lineage(parent, depth=depth - 1)} if parent else config


def default_texts(
    config: dict, *, assets: Optional[str] = None, max_texts: int = 256, seed: int = 0
) -> tuple[str, list[str]]:
    """(asset name, texts): a seeded slice of the first asset of ``ASSET_TEXTS`` the run (``config``:
    its resolved config, or {}) did not train on (``trained_on``), nor did the runs its model came from
    (``lineage``)."""
    config = lineage(config)
    for name in ASSET_TEXTS:
        if not trained_on(name, config, assets=assets):
            return name, read_texts(name, assets=assets, max_texts=max_texts, seed=seed)
    raise UserError(
        f"the run used every default forgetting text ({', '.join(ASSET_TEXTS)}); pass --texts FILE with "
        "text it did not train on"
    )


def text_batches(
    tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 8
) -> list[CompletionBatch]:
    """Texts as ``CompletionBatch``es for teacher forcing: the first token (BOS where the tokenizer adds
    one) is the prompt, the next ``max_length - 1`` tokens the scored completion. Texts of fewer than 2
    tokens are skipped (nothing to predict)."""
    if max_length < 2:
        raise UserError(f"max_length={max_length}: the forgetting probe needs at least 2 tokens per text")
    ids = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        out.append(make_batch([r[:1] for r in rows], [r[1:] for r in rows], pad_id=pad))
    return out


# --------------------------------------------------------------------------------------------------
# orchestration


class ModelReference(FrozenReference):
    """A model scored as a reference (``Reference.logits``) without being frozen: lets ``engine.measure``
    score KL[π_ref‖π_θ] with the policy in the reference's place."""

    static_copy = False  # the live model itself

    def __init__(self, model):
        self.model = model


def as_reference(model_or_reference) -> Reference:
    return model_or_reference if isinstance(model_or_reference, Reference) else ModelReference(model_or_reference)


@torch.no_grad()
def forgetting_on_texts(policy, reference, batches: Sequence[CompletionBatch], *, progress: bool = False) -> dict:
    """Measurement 1 over ``text_batches``: ``summarize`` of ``teacher_forced_sums``. ``reference``: a
    model or any ``Reference`` with distributions (not ``precomputed``). Both in eval mode."""
    reference = as_reference(reference)
    if not reference.has_distributions:
        raise UserError(
            "the forgetting probe needs the reference's full next-token distributions: use a live "
            "reference (copy, lora, offload, sync), not precomputed log-probs"
        )
    device = next(policy.parameters()).device
    sums: dict[str, list] = {k: [] for k in (*_SUMS, "tokens")}
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="forgetting: teacher-forced texts", unit="batch")
    with eval_mode(policy):
        for b in it:
            b = b.to(device)
            logits = forward_completion(policy, b)[0]  # (B, T, V) π_θ
            ref_logits = reference.logits(b).to(logits.device)  # (B, T, V) π_ref
            for k, v in teacher_forced_sums(logits, ref_logits, b.completion_ids, b.mask).items():
                sums[k] += v.tolist()
    return summarize(sums)


def forward_kl_on_prompts(
    policy,
    reference_model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Measurement 2: E_x[KL(π_ref(·|x)‖π_θ(·|x))] on ``prompt_ids`` (docs/theory.md §10).

    Returns ``forward_kl_on_prompts`` (mean over prompts and samples of the exact per-position forward
    KL summed over a completion sampled from π_ref: unbiased for the sequence forward KL), its
    ``_stderr``, ``forward_kl_token_mean`` (per completion token), ``forward_kl_next_token`` (exact
    E_x of the next-token forward KL at the prompt), ``samples`` and ``response_len``."""
    policy_ref = ModelReference(policy)
    seq = measure(
        reference_model,
        policy_ref,
        prompt_ids,
        tokenizer=tokenizer,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        estimators=("exact",),
        progress=progress,
    )
    first = measure(
        reference_model,
        policy_ref,
        prompt_ids,
        tokenizer=tokenizer,
        samples_per_prompt=1,
        max_new_tokens=1,
        batch_size=batch_size,
        seed=seed,
        estimators=("exact",),
    )  # one position: its state is x itself
    ex = seq["estimators"]["exact"]
    return {
        "forward_kl_on_prompts": ex["mean"],
        "forward_kl_on_prompts_stderr": ex["stderr"],
        "forward_kl_token_mean": seq["token_mean"],
        "forward_kl_next_token": first["estimators"]["exact"]["mean"],
        "samples": seq["samples"],
        "response_len": seq["response_len"],
    }


TRAINER_METRICS = {
    "nll_delta": "eval/forgetting/nll_delta",
    "kl_ref_to_policy": "eval/forgetting/kl_ref_policy",
    "kl_policy_to_ref": "eval/forgetting/kl_policy_ref",
}
"""The probe's numbers the trainers log, per token on the off-distribution texts."""


class ForgettingProbe:
    """Measurement 1 as the trainers run it at every evaluation: texts tokenized once, then
    ``probe(policy, reference) -> {eval/forgetting/nll_delta, .../kl_ref_policy, .../kl_policy_ref}``.

    ``spec``: a text source (``read_texts``) or ``auto`` (``default_texts`` for the run ``config``)."""

    def __init__(
        self,
        spec: str,
        tokenizer,
        *,
        config: Optional[dict] = None,
        assets: Optional[str] = None,
        max_texts: int = 64,
        max_length: int = 128,
        batch_size: int = 8,
        seed: int = 0,
    ):
        if spec == "auto":
            self.source, texts = default_texts(config or {}, assets=assets, max_texts=max_texts, seed=seed)
        else:
            self.source, texts = spec, read_texts(spec, assets=assets, max_texts=max_texts, seed=seed)
        self.batches = text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
        log.info("forgetting probe: %d texts from %s", len(texts), self.source)

    def __call__(self, policy, reference) -> dict:
        res = forgetting_on_texts(policy, reference, self.batches)
        return {name: res[key] for key, name in TRAINER_METRICS.items()}


def starting_model_probe(cfg, tokenizer, *, device, is_main: bool = True, start=None):
    """For trainers with no reference of their own (sft): ``probe(policy) -> eval/forgetting/*`` against
    a frozen copy of the starting model ``cfg.model``, or None without ``cfg.forgetting_text`` (or off
    the main process: only it logs). ``start``: the policy's starting weights (``training.Start``;
    default: ``cfg.model``)."""
    if not cfg.forgetting_text or not is_main:
        return None
    import dataclasses

    from ..assets import resolve_model
    from ..modeling import load_causal_lm

    ref = FrozenReference(
        load_causal_lm(resolve_model(cfg.model, cfg.assets), dtype=cfg.dtype, device=device)
        if start is None
        else start.load(dtype=cfg.dtype, device=device)
    )
    probe = ForgettingProbe(
        cfg.forgetting_text,
        tokenizer,
        config=dataclasses.asdict(cfg),
        assets=cfg.assets,
        max_texts=cfg.forgetting_max_texts,
        seed=cfg.seed,
    )
    return lambda policy: probe(policy, ref)
