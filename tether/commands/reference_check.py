"""``tether reference-check``: is this reference good enough for my preference data?

A KL-regularised method can only reweight what its reference already produces: the optimum is
π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β) (docs/theory.md §5, §14), so a response the reference finds very
unlikely needs a large KL to become likely. Before spending a run, this scores each candidate reference
on the user's preference pairs (loaded and tokenized as ``tether dpo`` does: the same loaders, chat
template, column mapping and truncation) and reports, per candidate:

- ``nll_chosen`` / ``nll_rejected``: mean NLL per token of the chosen / rejected responses given the
  prompt, Σ_pairs −log π_ref(y|x) / Σ_pairs |y| (nats per token; EOS counted as in DPO);
- ``prefers_chosen``: the fraction of pairs where log π_ref(y_w|x) > log π_ref(y_l|x) (ties count as
  not preferring), and ``prefers_chosen_per_token`` with both sides divided by their lengths;
- ``chosen_likely``: the fraction of chosen responses whose per-token NLL is at most a threshold m.
  By default m is the (lower) median per-token NLL of the reference's *own* completions, sampled at
  temperature 1 for each distinct prompt (``--samples`` per prompt, at most ``--max_new_tokens``
  tokens, seeded): a chosen response counts as likely when it is at least as probable, per token, as
  a typical response of the reference. A reference that produces the chosen responses scores about
  0.5; one far from the data scores near 0 and caps what DPO/RLHF from it can reach.
  ``--likely_threshold NATS`` sets m instead (then no sampling). ``rejected_likely`` is the same for
  the rejected responses.

Each candidate is tokenized with its own tokenizer, so per-token numbers of candidates with different
tokenizers count different units; compare those by ``prefers_chosen`` and ``chosen_likely``.

Example:
  tether reference-check --references stories260K,runs/sft/final --dataset hh-rlhf --limit 256 --json ref.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import ArgumentParser
from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="tether reference-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--references",
        required=True,
        help="comma-separated candidate references: Hugging Face folders, hub names or asset short names",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="preference pairs, as tether dpo reads them: .jsonl/.json/.parquet (prompt, chosen, rejected; or "
        "chosen/rejected dialogues with an implicit prompt), a datasets folder, a hub name, or hh-rlhf",
    )
    p.add_argument("--dataset_split", default="train", help="split of a datasets folder or hub dataset (default train)")
    p.add_argument(
        "--columns", default=None, help="rename columns first: 'question=prompt,response_j=chosen,response_k=rejected'"
    )
    p.add_argument("--prompt_field", default="prompt", help="column holding the prompt")
    p.add_argument("--chosen_field", default="chosen", help="column holding the chosen response")
    p.add_argument("--rejected_field", default="rejected", help="column holding the rejected response")
    p.add_argument("--chat_template", default=None, help="Jinja chat template (string or file) for conversational rows")
    p.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--limit", type=int, default=256, help="pairs used at most, the first ones (0 = all; default 256)")
    p.add_argument(
        "--max_length", type=int, default=256, help="prompt + completion tokens at most, as in dpo (default 256)"
    )
    p.add_argument("--max_prompt_length", type=int, default=None, help="prompt tokens at most (default: no limit)")
    p.add_argument(
        "--max_completion_length", type=int, default=None, help="completion tokens at most (default: no limit)"
    )
    p.add_argument("--no_add_eos", action="store_true", help="do not end completions with EOS (dpo's add_eos=false)")
    p.add_argument(
        "--likely_threshold",
        type=float,
        default=None,
        help="per-token NLL (nats) at or below which a response is 'likely' (default: the median of the "
        "reference's own samples)",
    )
    p.add_argument(
        "--samples", type=int, default=1, help="reference samples per distinct prompt for the median (default 1)"
    )
    p.add_argument("--max_new_tokens", type=int, default=64, help="length limit of those samples (default 64)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--dtype", default="float32", help="weights dtype: float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference's samples")
    p.add_argument("--assets", default=None, help="assets folder (for short names such as stories260K, hh-rlhf)")
    p.add_argument("--json", "--output", dest="json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _bar(it, *, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch")


@torch.no_grad()
def pair_logps(model, pairs: Sequence[dict], *, pad_id: int, batch_size: int, progress: bool = False) -> dict:
    """Sequence log-probs and lengths of the chosen and rejected completions of tokenized ``pairs``
    (``tokenize_pairs`` rows): ``{"chosen", "rejected"}`` (N,) float64 sums of log π(y_t|x, y_<t) and
    ``{"chosen_len", "rejected_len"}`` (N,) token counts. Eval mode, no gradient."""
    from ..modeling import completion_logps, make_batch
    from ..reference import eval_mode

    device = next(model.parameters()).device
    out: dict = {k: [] for k in ("chosen", "rejected", "chosen_len", "rejected_len")}
    with eval_mode(model):
        for s in _bar(range(0, len(pairs), batch_size), enabled=progress, desc="scoring pairs"):
            chunk = pairs[s : s + batch_size]
            for side in ("chosen", "rejected"):
                batch = make_batch([p["prompt_ids"] for p in chunk], [p[f"{side}_ids"] for p in chunk], pad_id=pad_id)
                lp = completion_logps(model, batch.to(device)).double()  # (b, T), 0 off-mask
                out[side].append(lp.sum(-1).cpu())
                out[f"{side}_len"].append(batch.mask.sum(-1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def own_sample_nll(
    model,
    tok,
    prompt_ids: Sequence[Sequence[int]],
    *,
    samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> torch.Tensor:
    """(n,) per-token NLL −(1/|y|) Σ_t log π(y_t|x, y_<t) of the model's own completions, ``samples``
    per prompt, temperature 1, no filter, through the first EOS (``tether.engine.generate_batches``)."""
    from ..engine import generate_batches
    from ..modeling import completion_logps
    from ..reference import eval_mode

    out = []
    with eval_mode(model):
        for sb in generate_batches(
            model,
            prompt_ids,
            tokenizer=tok,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            samples_per_prompt=samples,
            progress=progress,
            desc="reference samples",
        ):
            lp = completion_logps(model, sb.batch).double()
            n = sb.batch.mask.sum(-1).clamp_min(1)
            out.append((-lp.sum(-1) / n).cpu())
    return torch.cat(out)


def summarize(lp: dict, threshold: float) -> dict:
    """The reported numbers from ``pair_logps`` and a likely-threshold (nats per token)."""
    cw, cl, nw, nl = lp["chosen"], lp["rejected"], lp["chosen_len"].double(), lp["rejected_len"].double()
    per_w, per_l = -cw / nw, -cl / nl  # per-token NLL of each response
    return {
        "pairs": int(cw.numel()),
        "chosen_tokens": int(nw.sum()),
        "rejected_tokens": int(nl.sum()),
        "nll_chosen": float(-cw.sum() / nw.sum()),
        "nll_rejected": float(-cl.sum() / nl.sum()),
        "prefers_chosen": float((cw > cl).double().mean()),
        "prefers_chosen_per_token": float((cw / nw > cl / nl).double().mean()),
        "logratio_margin": float((cw - cl).mean()),  # mean log π(y_w|x) − log π(y_l|x): DPO's starting implicit margin
        "likely_threshold": float(threshold),
        "chosen_likely": float((per_w <= threshold).double().mean()),
        "rejected_likely": float((per_l <= threshold).double().mean()),
    }


def check_reference(path: str, *, raw_rows: list, args) -> dict:
    """Load one candidate, tokenize the pairs with its tokenizer as dpo does, score them, and (unless a
    threshold is given) sample from it for the median threshold."""
    from ..data.preference import check_rows, tokenize_pairs
    from ..data.text import column_map, rename_columns
    from ..modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype=args.dtype, device=args.device)
    mapping = column_map(args.columns, prompt=args.prompt_field, chosen=args.chosen_field, rejected=args.rejected_field)
    rows, skipped = check_rows(
        rename_columns(raw_rows, mapping, where=args.dataset),
        skip_bad_rows=args.skip_bad_rows,
        tokenizer=tok,
        chat_template=args.chat_template,
        source=args.dataset,
    )
    pairs, report = tokenize_pairs(
        rows,
        tok,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        add_eos=not args.no_add_eos,
        source=args.dataset,
    )
    progress = not args.no_progress
    lp = pair_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=args.batch_size, progress=progress)
    extra: dict = {}
    if args.likely_threshold is None:
        prompts = list(dict.fromkeys(tuple(p["prompt_ids"]) for p in pairs))  # distinct prompts, first-seen order
        nll = own_sample_nll(
            model,
            tok,
            [list(p) for p in prompts],
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=progress,
        )
        threshold = float(nll.median())  # the lower median
        extra = {
            "threshold_source": "median of own samples",
            "own_samples": int(nll.numel()),
            "own_sample_nll_mean": float(nll.mean()),
        }
    else:
        threshold = args.likely_threshold
        extra = {"threshold_source": "given"}
    res = summarize(lp, threshold)
    res.update(extra)
    res.update(
        {
            "reference": path,
            "skipped_rows": sum(skipped.values()),
            "dropped_identical": report.dropped_identical,
            "truncated_completions": report.completion_truncated,
        }
    )
    return res


def format_table(results: Sequence[dict]) -> str:
    head = (
        "reference",
        "NLL chosen",
        "NLL rejected",
        "prefers y_w",
        "per token",
        "chosen likely",
        "threshold",
        "pairs",
    )
    rows = [head] + [
        (
            r["name"],
            f"{r['nll_chosen']:.3f}",
            f"{r['nll_rejected']:.3f}",
            f"{r['prefers_chosen']:.1%}",
            f"{r['prefers_chosen_per_token']:.1%}",
            f"{r['chosen_likely']:.1%}",
            f"{r['likely_threshold']:.3f}",
            str(r["pairs"]),
        )
        for r in results
    ]
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    lines.append(
        "NLL: nats per token given the prompt; prefers y_w: log π(y_w|x) > log π(y_l|x) (per token: each side "
        "divided by its length); chosen likely: per-token NLL of y_w <= threshold (default: the median of the "
        "reference's own samples). A low 'chosen likely' means the data is far from what the reference produces: "
        "the KL penalty anchors training there (docs/theory.md §14)."
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = [r.strip() for r in args.references.split(",") if r.strip()]
    if not names:
        raise UserError("--references is empty: give one or more models, e.g. --references stories260K,runs/sft/final")
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.likely_threshold is not None and not (math.isfinite(args.likely_threshold) and args.likely_threshold >= 0):
        raise UserError(f"--likely_threshold is a per-token NLL in nats (>= 0), got {args.likely_threshold}")
    from ..assets import resolve_model
    from ..data.preference import read_raw_rows
    from ..runs import seed_everything

    seed_everything(args.seed)
    raw = read_raw_rows(args.dataset, split=args.dataset_split, assets=args.assets)
    if args.limit:
        raw = raw[: args.limit]
    results = []
    for name in names:
        res = check_reference(resolve_model(name, args.assets), raw_rows=raw, args=args)
        results.append({"name": name, **res})
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "references": results}, indent=2))
    return 0
