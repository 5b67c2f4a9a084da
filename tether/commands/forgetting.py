"""``tether forgetting``: what did fine-tuning cost the model outside its training data?

Teacher-forced on off-distribution text (no sampling): the per-token NLL and perplexity of the policy
and of its reference and their change, and the exact per-token KL[π_ref‖π_θ] and KL[π_θ‖π_ref]
(full-vocabulary sums at every position, averaged over tokens). With --prompts (the run's training
prompts): the forward KL E_x[KL(π_ref‖π_θ)], which forgetting tracks (Shenfeld et al. 2025, RL's
Razor, arXiv:2509.04259), estimated without bias from completions sampled from the reference with the
exact per-position KL summed over each completion, and the exact next-token forward KL at the prompts.

Default --texts: a seeded slice of a shared asset the run did not train on (rt-polarity, else
hh-rlhf; read from the config.yaml of the runs that made the policy and the reference). Definitions: docs/theory.md §10.

Example:
  tether forgetting --policy runs/dpo/final --reference stories260K --prompts prompts.txt --json forgetting.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import resolve_model
from ..config import ArgumentParser
from ..diagnostics.forgetting import (
    default_texts,
    forgetting_on_texts,
    forward_kl_on_prompts,
    lineage,
    read_texts,
    run_config_of,
    text_batches,
)
from ..errors import UserError
from ..measure import encode_prompts, read_prompts
from ..modeling import check_compatible, load_causal_lm, load_tokenizer
from ..runs import seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="tether forgetting", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--policy", required=True, help="fine-tuned model: a Hugging Face folder (e.g. RUN/final) or hub name"
    )
    p.add_argument("--reference", required=True, help="its reference model: a folder, hub name or asset short name")
    p.add_argument(
        "--texts",
        "--text",
        dest="texts",
        default=None,
        help="off-distribution text: a text file (one per line), .jsonl/.json/.parquet (text, chosen, or "
        "prompt + completion), a datasets folder, or rt-polarity / hh-rlhf (default: an asset the run "
        "did not train on)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="the run's training prompts (text file or JSONL with 'prompt'): adds the forward KL on them",
    )
    p.add_argument(
        "--max_texts", type=int, default=256, help="texts scored at most, a seeded selection (0 = all; default 256)"
    )
    p.add_argument("--max_length", type=int, default=128, help="tokens per text at most (default 128)")
    p.add_argument("--max_prompts", type=int, default=64, help="prompts used at most for the forward KL (default 64)")
    p.add_argument(
        "--samples", type=int, default=4, help="completions sampled from the reference per prompt (default 4)"
    )
    p.add_argument(
        "--max_new_tokens", type=int, default=32, help="completion length limit for the forward KL (default 32)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="texts (or sampled rows / 4) per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for the text selection and the reference's samples")
    p.add_argument("--assets", default=None, help="assets folder (for short names such as stories260K)")
    p.add_argument("--json", "--output", dest="json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def format_table(result: dict) -> str:
    t = result["on_texts"]
    rows = [
        ("per token, on the texts", "policy", "reference", "change"),
        (
            "NLL (nats)",
            f"{t['nll_policy']:.4f}",
            f"{t['nll_reference']:.4f}",
            f"{t['nll_delta']:+.4f} ± {t['nll_delta_stderr']:.4f}",
        ),
        ("perplexity", f"{t['ppl_policy']:.2f}", f"{t['ppl_reference']:.2f}", f"{t['ppl_delta']:+.2f}"),
        ("KL[π_ref‖π_θ] (nats)", "", "", f"{t['kl_ref_to_policy']:.4f} ± {t['kl_ref_to_policy_stderr']:.4f}"),
        ("KL[π_θ‖π_ref] (nats)", "", "", f"{t['kl_policy_to_ref']:.4f} ± {t['kl_policy_to_ref_stderr']:.4f}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    lines.append(
        f"{t['texts']} texts from {result['texts_source']}, {t['tokens']} scored tokens (± = standard error over texts)"
    )
    if "forward_kl_on_prompts" in result:
        lines.append(
            f"\nforward KL E_x[KL(π_ref‖π_θ)] on the prompts: {result['forward_kl_on_prompts']:.4f} ± "
            f"{result['forward_kl_on_prompts_stderr']:.4f} nats/completion "
            f"({result['forward_kl_token_mean']:.4f}/token, {result['prompts_samples']} completions of "
            f"{result['prompts_response_len']:.1f} tokens sampled from π_ref)"
        )
        lines.append(f"next-token forward KL at the prompts (exact): {result['forward_kl_next_token']:.4f} nats")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_texts", "max_prompts"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (0 = all), got {getattr(args, name)}")
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    seed_everything(args.seed)
    policy_path = resolve_model(args.policy, args.assets)
    ref_path = resolve_model(args.reference, args.assets)
    tok, ref_tok = load_tokenizer(policy_path), load_tokenizer(ref_path)
    policy, ref_model = load_causal_lm(policy_path), load_causal_lm(ref_path)
    check_compatible(policy, ref_model, tok, ref_tok)
    if args.texts:
        source, texts = args.texts, read_texts(args.texts, assets=args.assets, max_texts=args.max_texts, seed=args.seed)
    else:
        run = {**run_config_of(policy_path), "_reference_run": lineage(run_config_of(ref_path))}  # what both trained on
        source, texts = default_texts(run, assets=args.assets, max_texts=args.max_texts, seed=args.seed)
    batches = text_batches(tok, texts, max_length=args.max_length, batch_size=args.batch_size)
    res = forgetting_on_texts(policy, ref_model, batches, progress=not args.no_progress)
    result: dict = {
        "policy": args.policy,
        "reference": args.reference,
        "texts_source": source,
        "on_texts": res,
        **{
            k: res[k]
            for k in (
                "nll_policy",
                "nll_reference",
                "nll_delta",
                "ppl_policy",
                "ppl_reference",
                "kl_ref_to_policy",
                "kl_policy_to_ref",
            )
        },
    }
    if args.prompts:
        texts_p = read_prompts(args.prompts)
        if args.max_prompts:
            texts_p = texts_p[: args.max_prompts]
        fwd = forward_kl_on_prompts(
            policy,
            ref_model,
            encode_prompts(tok, texts_p),
            tokenizer=tok,
            samples_per_prompt=args.samples,
            max_new_tokens=args.max_new_tokens,
            batch_size=4 * args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        result.update({k: v for k, v in fwd.items() if k.startswith("forward_kl")})
        result.update(
            {"prompts": len(texts_p), "prompts_samples": fwd["samples"], "prompts_response_len": fwd["response_len"]}
        )
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
