"""``tether shift``: does a prompt prefix shift the reference, and with it the KL penalty?

For each prompt x and each prefix p, with the target completion y of that prompt: log π_ref(y|x)
against log π_ref(y|p+x) (teacher-forced, exact sums over y's tokens), and a flag where the prefix
moves it by more than --threshold nats. With --policy: the policy's completions of x (sampled) scored
by the reference with and without each prefix, giving the exact KL[π_θ(·|x)‖π_ref(·|x)] and
KL[π_θ(·|x)‖π_ref(·|p+x)]: a prefix that makes the second small makes the KL penalty blind.

--prompts and --targets: one per line (a single target line serves every prompt). --prefixes: one per
line; or --search greedy|random finds one (--prefix_tokens, --search_steps, --candidates, --seed)
that raises the reference's mean log-probability of the targets. Prefix tokens go after the prompt's
BOS. The remedy during training: reference_prompt (docs/diagnostics.md, docs/theory.md §13).

Example:
  tether shift --reference stories260K --prompts prompts.txt --targets target.txt --search greedy \\
      --prefix_tokens 8 --search_steps 24 --policy runs/sft/final --json shift.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import resolve_model
from ..config import ArgumentParser
from ..diagnostics.shift import policy_kls, search_prefix, shift_rows
from ..errors import UserError
from ..measure import encode_prompts, read_prompts
from ..modeling import check_compatible, load_causal_lm, load_tokenizer
from ..runs import seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tether shift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="the reference model: a folder, hub name or asset short name")
    p.add_argument("--prompts", required=True, help="prompts, one per line (or JSONL with a 'prompt' field)")
    p.add_argument(
        "--targets", required=True, help="target completions, one per line paired with the prompts, or one line for all"
    )
    p.add_argument("--prefixes", default=None, help="prefixes to try on every prompt, one per line")
    p.add_argument(
        "--policy",
        default=None,
        help="a policy whose completions' KL is measured under the plain and prefixed reference",
    )
    p.add_argument(
        "--threshold", type=float, default=2.0, help="flag a row when |Δ log p| exceeds this many nats (default 2)"
    )
    p.add_argument(
        "--search",
        choices=("greedy", "random"),
        default=None,
        help="also search a prefix raising the reference's log-prob of the targets",
    )
    p.add_argument("--prefix_tokens", type=int, default=8, help="length of the searched prefix in tokens (default 8)")
    p.add_argument(
        "--search_steps", type=int, default=16, help="search steps (greedy: one prefix position each; default 16)"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=0,
        help="candidates per step: greedy, tokens tried (0 = the whole vocabulary); random, prefixes (0 = 64)",
    )
    p.add_argument("--samples", type=int, default=4, help="policy completions per prompt (default 4)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="policy completion length limit (default 32)")
    p.add_argument("--batch_size", type=int, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for the search and the policy's samples")
    p.add_argument("--assets", default=None, help="assets folder (for short names such as stories260K)")
    p.add_argument("--json", "--output", dest="json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _lines(path: str, what: str) -> list[str]:
    lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise UserError(f"--{what} {path}: no non-empty line; give one per line")
    return lines


def _validate(args) -> None:
    if not args.prefixes and not args.search:
        raise UserError("no prefix to try: pass --prefixes FILE (one per line) or --search greedy|random")
    for name in ("prefix_tokens", "samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("search_steps", "candidates"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.threshold < 0:
        raise UserError(f"--threshold must be >= 0 nats, got {args.threshold}")


def format_table(result: dict) -> str:
    lines = [f"{'prompt':>6}  {'prefix':>6}  {'log p(y|x)':>11}  {'log p(y|p+x)':>12}  {'Δ':>8}  flagged"]
    for r in result["rows"]:
        lines.append(
            f"{r['prompt']:>6}  {r['prefix']:>6}  {r['logp_plain']:>11.3f}  {r['logp_prefixed']:>12.3f}  "
            f"{r['delta']:>+8.3f}  {'YES' if r['flagged'] else 'no'}"
        )
    lines.append(
        f"{sum(r['flagged'] for r in result['rows'])} of {len(result['rows'])} (prompt, prefix) rows flagged "
        f"(|Δ| > {result['threshold']} nats)"
    )
    for j, pf in enumerate(result["prefixes"]):
        lines.append(
            f"prefix {j}: {pf['text']!r} ({len(pf['ids'])} tokens{', searched' if pf.get('searched') else ''})"
        )
        if "policy_kl" in pf:
            k = pf["policy_kl"]
            lines.append(
                f"  policy KL[π‖π_ref]: {k['kl_plain']:.4f} ± {k['kl_plain_stderr']:.4f} plain, "
                f"{k['kl_prefixed']:.4f} ± {k['kl_prefixed_stderr']:.4f} prefixed ({k['samples']} completions)"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    seed_everything(args.seed)
    prompts, targets = read_prompts(args.prompts), _lines(args.targets, "targets")
    if len(targets) == 1:
        targets = targets * len(prompts)
    elif len(targets) != len(prompts):
        raise UserError(
            f"--targets has {len(targets)} lines for {len(prompts)} prompts: give one per prompt, or one for all"
        )
    prefix_texts = _lines(args.prefixes, "prefixes") if args.prefixes else []
    ref_path = resolve_model(args.reference, args.assets)
    tok = load_tokenizer(ref_path)
    reference = load_causal_lm(ref_path)
    pad, bos = tok.pad_token_id if tok.pad_token_id is not None else 0, tok.bos_token_id
    prompt_ids = encode_prompts(tok, prompts)
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    for i, t in enumerate(target_ids):
        if not t:
            raise UserError(f"--targets line {i + 1} tokenizes to nothing; give it some text")
    prefixes = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in prefix_texts]
    result: dict = {"reference": args.reference, "threshold": args.threshold}
    if args.search:
        vocab = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
        cands = args.candidates or (0 if args.search == "greedy" else 64)
        sr = search_prefix(
            reference,
            prompt_ids,
            target_ids,
            pad_id=pad,
            bos_id=bos,
            vocab=vocab,
            method=args.search,
            prefix_tokens=args.prefix_tokens,
            steps=args.search_steps,
            candidates=cands,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        prefixes.append({"text": tok.decode(sr.prefix), "ids": sr.prefix, "searched": True})
        result["search"] = {
            "method": args.search,
            "objective": sr.objective,
            "start": sr.start,
            "plain": sr.plain,
            "gain": sr.objective - sr.plain,
            "history": sr.history,
        }
    result["rows"] = shift_rows(
        reference,
        prompt_ids,
        target_ids,
        [p["ids"] for p in prefixes],
        pad_id=pad,
        bos_id=bos,
        threshold=args.threshold,
        batch_size=args.batch_size,
    )
    if args.policy:
        policy_path = resolve_model(args.policy, args.assets)
        policy = load_causal_lm(policy_path)
        check_compatible(policy, reference, load_tokenizer(policy_path), tok)
        for j, pf in enumerate(prefixes):
            pk = policy_kls(
                policy,
                reference,
                prompt_ids,
                pf["ids"],
                tokenizer=tok,
                bos_id=bos,
                samples_per_prompt=args.samples,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                seed=args.seed,
            )
            pf["policy_kl"] = pk
            for r in result["rows"]:
                if r["prefix"] == j:
                    r["kl_plain"] = pk["kl_plain_per_prompt"][r["prompt"]]
                    r["kl_prefixed"] = pk["kl_prefixed_per_prompt"][r["prompt"]]
    result["prefixes"] = prefixes
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
