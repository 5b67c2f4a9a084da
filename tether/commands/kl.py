"""``tether kl``: how far has a fine-tuned model drifted from its reference?

Samples completions from the policy for each prompt and reports the mean sequence KL[π‖π_ref] with
its standard error under every estimator (k1, k2, k3, exact) on the same samples, the exact
per-token mean and the response length. The exact (Rao-Blackwellised) estimator has the smallest
standard error; k1 the largest.

Sampling settings (docs/theory.md §3): --temperature τ, --top_k and --top_p set how the policy is
sampled. At each position the sampler records the set F_t of tokens its filter allowed; the policy
is π^{τ,F}(v|s_t) = softmax(logits/τ) restricted to F_t and renormalised. The reference is the fixed
process π^τ_ref: its logits divided by the same τ (as TRL does), over the whole vocabulary. The KL
reported is KL[π^{τ,F}_θ‖π^τ_ref]; k1 and exact are unbiased for it, k3 undercounts it by the
reference's mass outside F_t, k2 is biased as always. With top-k/top-p the filter cost
E Σ_t -log π^τ_ref(F_t) is reported beside it: the part of the KL the filter alone causes, which is the
whole KL of a model against itself (0 without top-k/top-p).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..assets import resolve_model
from ..checks import preflight_sampling
from ..config import parse_config
from ..data.prompts import load_prompts, prompt_options
from ..distributed import process_device
from ..engine import measure
from ..errors import UserError
from ..generation import backend_for
from ..groups import SamplingConfig, sampling_settings
from ..measure import encode_prompts
from ..modeling import check_compatible, load_causal_lm, load_tokenizer
from ..reference import FrozenReference
from ..runs import seed_everything


@dataclass
class KLConfig(SamplingConfig):
    """Config of ``tether kl`` (plus the sampling group, shared with the online trainers and tether bon)."""

    policy: str = ""
    """Policy model: a Hugging Face folder, a hub name or an asset name (required)."""
    reference: str = ""
    """Reference model: a Hugging Face folder, a hub name or an asset name (required)."""
    prompts: str = ""
    """Prompts (required): a text file (one per line), .jsonl/.json/.parquet with a 'prompt' column (a string or a
    list of messages), a saved datasets folder or a hub name."""
    prompt_field: str = "prompt"
    """Column holding the prompt in table rows."""
    columns: Optional[dict] = None
    """Rename prompt-data columns first: a YAML map {question: prompt} or 'question=prompt'."""
    chat_template: Optional[str] = None
    """Jinja chat template (string or file) for conversational prompts when the tokenizer has none."""
    samples: int = 8
    """Completions sampled per prompt."""
    batch_size: int = 64
    """Sequences per sampling batch."""
    seed: int = 0
    """Sampling seed."""
    assets: Optional[str] = None
    """Assets folder (for short names such as stories260K)."""
    json: Optional[str] = None
    """Also write the result as JSON to this file."""
    by_position: bool = False
    """Also report the exact per-token KL at each completion position (mean over the samples reaching it) and, per
    completion-length bucket (0-3, 4-15, 16-63, 64+ tokens), every estimator's mean and standard error, and the same
    for the KL of each sample's first 4/16/64/256/1024 tokens: how the noise grows with length and how much the exact
    estimator removes. Adds by_position, by_position_n, by_length and by_prefix to the JSON."""


def format_table(result: dict) -> str:
    rows = [("estimator", "mean KL (nats/seq)", "stderr", "stderr / exact")]
    exact_se = result["estimators"].get("exact", {}).get("stderr")
    for name, v in result["estimators"].items():
        ratio = v["stderr"] / exact_se if exact_se else float("nan")
        rows.append((name, f"{v['mean']:.5f}", f"{v['stderr']:.5f}", f"{ratio:.2f}x" if exact_se else "-"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    tm = result["token_mean"]
    lines.append(f"\nexact per-token mean KL: {tm:.5f} nats/token" if tm is not None else "")
    lines.append(f"mean response length: {result['response_len']:.1f} tokens over {result['samples']} samples")
    fc = result.get("filter_cost")
    if fc is not None and fc["mean"] > 0:
        lines.append(format_filter_cost(result))
    if "by_length" in result:
        lines.append("\n" + format_by_position(result))
    return "\n".join(lines)


def format_filter_cost(result: dict) -> str:
    """The top-k/top-p lines: the filter cost E Σ_t -log π^τ_ref(F_t) and the KL left without it."""
    fc = result["filter_cost"]
    se = f" ± {fc['stderr']:.5f}" if fc["stderr"] == fc["stderr"] else ""
    out = [
        f"filter cost: {fc['mean']:.5f}{se} nats/seq = E Σ_t -log π_ref(F_t), π_ref(F_t) the reference's (tempered) "
        "mass inside the sampled top-k/top-p set: the part of the KL above that the filter alone causes (a model "
        "against itself has exactly this KL)"
    ]
    if "exact" in result["estimators"]:
        rest = max(result["estimators"]["exact"]["mean"] - fc["mean"], 0.0)  # a KL: ≥ 0 up to float32 rounding
        out.append(f"KL without it (to the reference restricted to the sampled sets): {rest:.5f} nats/seq")
    return "\n".join(out)


def format_by_position(result: dict) -> str:
    """The --by_position tables: per-position means (bucketed, with the first positions one by one) and the
    standard error of the sequence KL per completion-length bucket, each estimator against exact."""
    pos, n = result["by_position"], result["by_position_n"]
    lines = ["exact per-token KL by completion position (mean over samples reaching it):"]
    lines += [f"  t={t:<3d} {pos[t]:.5f}  (n={n[t]})" for t in range(min(4, len(pos)))]
    if len(pos) > 4:
        lines.append(f"  t>=4  {sum(p * k for p, k in zip(pos[4:], n[4:])) / max(sum(n[4:]), 1):.5f}  (token-weighted)")
    names = list(result["estimators"])
    lines.append("\nsequence KL standard error by completion length (tokens):")
    lines.append("  " + "  ".join(["length", "n"] + [f"{e} se" for e in names] + ["k1 se / exact se"]))
    for row in result["by_length"]:
        est = row["estimators"]
        ses = [est[e]["stderr"] for e in names]
        ratio = (
            est["k1"]["stderr"] / est["exact"]["stderr"]
            if {"k1", "exact"} <= est.keys() and est["exact"]["stderr"]
            else float("nan")
        )
        lines.append("  " + "  ".join([row["lengths"], str(row["n"])] + [f"{x:.5f}" for x in ses] + [f"{ratio:.2f}x"]))
    lines.append("\nKL of the first L tokens: standard error across samples")
    lines.append("  " + "  ".join(["L"] + [f"{e} se" for e in names] + ["k1 se / exact se"]))
    for row in result.get("by_prefix", []):
        est = row["estimators"]
        ratio = (
            est["k1"]["stderr"] / est["exact"]["stderr"]
            if {"k1", "exact"} <= est.keys() and est["exact"]["stderr"]
            else float("nan")
        )
        lines.append(
            "  " + "  ".join([str(row["tokens"])] + [f"{est[e]['stderr']:.5f}" for e in names] + [f"{ratio:.2f}x"])
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args, _ = parse_config(
        KLConfig, argv, prog="tether kl", description="\n\n".join(__doc__.split("\n\n")[:3]), raw_description=True
    )
    missing = [f"--{name}" for name in ("policy", "reference", "prompts") if not getattr(args, name)]
    if missing:
        raise UserError(f"tether kl needs {', '.join(missing)}: the policy, its reference and a prompts file")
    if args.samples < 1:
        raise UserError(f"samples={args.samples} must be >= 1 (completions per prompt); set --samples")
    for name in ("policy", "reference"):  # the whole input, before any weights load
        preflight_sampling(
            args,
            model=getattr(args, name),
            model_field=name,
            prompts_path=args.prompts,
            batch_size=args.batch_size,
            assets=args.assets,
        )
    seed_everything(args.seed)
    policy_path = resolve_model(args.policy, args.assets)
    ref_path = resolve_model(args.reference, args.assets)
    tok = load_tokenizer(policy_path)
    ref_tok = load_tokenizer(ref_path)
    device = process_device()  # a GPU when there is one (cuda:LOCAL_RANK), else the CPU
    policy = load_causal_lm(policy_path, device=device)
    ref_model = load_causal_lm(ref_path, device=device)
    check_compatible(policy, ref_model, tok, ref_tok)
    reference = FrozenReference(ref_model)
    prompts = encode_prompts(tok, [p.text for p in load_prompts(args.prompts, tokenizer=tok, **prompt_options(args))])
    result = measure(
        policy,
        reference,
        prompts,
        tokenizer=tok,
        samples_per_prompt=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sampling=sampling_settings(args),
        progress=True,
        by_position=args.by_position,
        backend=backend_for(args, policy),
    )
    print(format_table(result))
    if args.json:
        out = {k: v for k, v in result.items() if k != "per_sequence"}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
