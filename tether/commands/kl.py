"""``tether kl``: how far has a fine-tuned model drifted from its reference?

Samples completions from the policy for each prompt and reports the mean sequence KL[π‖π_ref] with
its standard error under every estimator (k1, k2, k3, exact) on the same samples, the exact
per-token mean and the response length. The exact (Rao-Blackwellised) estimator has the smallest
standard error; k1 the largest.

Sampling settings (docs/theory.md §3): --temperature τ, --top_k and --top_p set how the policy is
sampled. At each position the sampler records the set F_t of tokens its filter allowed; the policy
is π^{τ,F}(v|s_t) = softmax(logits/τ) restricted to F_t and renormalised, and the reference is
scored the same way (its logits divided by τ and restricted to the same F_t, as TRL also divides the
reference's logits by τ). The KL reported is KL[π^{τ,F}_θ‖π^{τ,F}_ref]: exactly 0 for a model against
itself at any settings; k1, k3 and exact are unbiased for it; k2 is biased, as always. (Scoring the
reference unfiltered instead would make E[k3] undercount the KL by the reference's mass outside F_t.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..assets import resolve_model
from ..engine import measure
from ..measure import encode_prompts, read_prompts
from ..modeling import check_compatible, load_causal_lm, load_tokenizer
from ..reference import FrozenReference
from ..runs import seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tether kl", description="\n\n".join(__doc__.split("\n\n")[:3]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="policy model: a Hugging Face folder or hub name")
    p.add_argument("--reference", required=True, help="reference model: a Hugging Face folder or hub name")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL with a 'prompt' field")
    p.add_argument("--samples", type=int, default=8, help="completions sampled per prompt (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="completion length limit (default 32)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature τ of the policy; the reference's logits are divided by the same τ (default 1)")
    p.add_argument("--top_k", type=int, default=0,
                   help="sample the policy from its k most likely tokens (0 = off); the reference is restricted to the "
                        "same sampled sets")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="sample the policy from its top-p nucleus (1.0 = off); the reference is restricted to the same "
                        "sampled sets")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=None, help="assets folder (for short names such as stories260K)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    return p


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
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)
    policy_path = resolve_model(args.policy, args.assets)
    ref_path = resolve_model(args.reference, args.assets)
    tok = load_tokenizer(policy_path)
    ref_tok = load_tokenizer(ref_path)
    policy = load_causal_lm(policy_path)
    ref_model = load_causal_lm(ref_path)
    check_compatible(policy, ref_model, tok, ref_tok)
    reference = FrozenReference(ref_model)
    prompts = encode_prompts(tok, read_prompts(args.prompts))
    result = measure(
        policy, reference, prompts, tokenizer=tok, samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
        sampling={"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}, progress=True,
    )
    print(format_table(result))
    if args.json:
        out = {k: v for k, v in result.items() if k != "per_sequence"}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
