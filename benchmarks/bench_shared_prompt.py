"""The shared-prompt layout against the padded layout, one training micro-batch at a time.

What the online update does per micro-batch — the reference's forward (no grad) and the policy's forward
and backward over a group of G completions of one prompt — timed in one process with each layout and,
for the shared layout, each way of giving the mask to the attention: a boolean 4D mask to sdpa (what
``tether.shared_prompt`` uses), an additive float mask to sdpa, an additive mask to eager attention.
Prompts are HH-RLHF dialogue prefixes (the shared assets) cut to ``--prompt_tokens``; completions are
random tokens of ``--completion_tokens`` (the arithmetic does not depend on their values). Repeats are
interleaved; the table shows the median CPU seconds per micro-batch and the positions the trunk computed.

Usage::

    python benchmarks/bench_shared_prompt.py --model stories260K
    python benchmarks/bench_shared_prompt.py --model llama-20M --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path


def hh_prompts(tok, n: int, tokens: int, assets: Path) -> list[list[int]]:
    """``n`` HH-RLHF dialogue prefixes (the chosen text up to its last "Assistant:") with at least ``tokens``
    tokens, cut to their last ``tokens`` tokens (the end of a dialogue, where the reply starts)."""
    out = []
    with gzip.open(assets / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            prefix = text[: text.rfind("Assistant:") + len("Assistant:")]
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                out.append(ids[-tokens:])
            if len(out) == n:
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("stories260K", "llama-20M"), default="stories260K")
    p.add_argument("--prompt_tokens", type=int, default=192)
    p.add_argument("--completion_tokens", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=2, help="groups per micro-batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="/tmp/tether-bench")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tether import shared_prompt as sp
    from tether.assets import resolve_model
    from tether.modeling import forward_completion, load_causal_lm, load_tokenizer, make_batch
    from tether.ops.logprobs import selective_logps

    assets = Path(os.environ.get("TETHER_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    if args.model == "llama-20M":
        from bench_dpo import make_llama20m

        path = make_llama20m(Path(args.cache) / "llama20m")
    else:
        path = resolve_model("stories260K", str(assets))
    tok = load_tokenizer(path)
    policy, reference = load_causal_lm(path), load_causal_lm(path)
    policy.train()
    g = torch.Generator().manual_seed(0)
    prompts = hh_prompts(tok, args.prompts, args.prompt_tokens, assets)
    rows_p, rows_c = [], []
    for pr in prompts:
        for _ in range(args.group):
            rows_p.append(pr)
            rows_c.append(torch.randint(3, 512, (args.completion_tokens,), generator=g).tolist())
    batch = make_batch(rows_p, rows_c, pad_id=tok.pad_token_id)

    def step(b) -> float:
        t0 = time.process_time()
        with torch.no_grad():
            forward_completion(reference, b)
        logits, _ = forward_completion(policy, b)
        selective_logps(logits, b.completion_ids).masked_fill(~b.mask, 0.0).sum().backward()
        policy.zero_grad(set_to_none=True)
        return time.process_time() - t0

    real_mask = sp.attention_mask_4d

    def float_mask(allowed, model, dtype):
        m = allowed[:, None]
        return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)

    def set_impl(impl):
        for m in (policy, reference):
            m.config._attn_implementation = impl

    variants = {
        "padded (sdpa)": (batch, "sdpa", real_mask),
        "shared, bool mask, sdpa": (dataclasses.replace(batch, shared_prompt="on"), "sdpa", real_mask),
        "shared, float mask, sdpa": (dataclasses.replace(batch, shared_prompt="on"), "sdpa", float_mask),
        "shared, float mask, eager": (dataclasses.replace(batch, shared_prompt="on"), "eager", real_mask),
        "padded (eager)": (batch, "eager", real_mask),
    }
    times: dict = {k: [] for k in variants}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, (b, impl, mask_fn) in variants.items():
            set_impl(impl)
            sp.attention_mask_4d = mask_fn
            times[name].append(step(b))
    sp.attention_mask_4d = real_mask
    set_impl("sdpa")
    lay = sp.shared_layout(batch)
    base = statistics.median(times["padded (sdpa)"][1:])
    print(
        f"{args.model}, CPU, {args.threads} thread(s): {args.prompts} prompts x G={args.group}, prompt "
        f"{args.prompt_tokens} tokens (HH-RLHF), completions {args.completion_tokens} tokens; reference forward + "
        f"policy forward/backward per micro-batch; median of {args.repeats} interleaved"
    )
    print(f"trunk positions: padded {lay.padded_tokens}, shared {lay.tokens} ({lay.tokens / lay.padded_tokens:.2f}x)")
    print(f"auto would choose: {'shared' if sp.prefer_shared(policy, batch, lay) else 'padded'}")
    for name, ts in times.items():
        med = statistics.median(ts[1:])
        print(f"{name:<28} {med:8.3f} s   {base / med:5.2f}x padded (sdpa)")


if __name__ == "__main__":
    main()
