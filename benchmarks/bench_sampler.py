"""Tokens/s of tether's built-in sampler against transformers' ``model.generate`` (and against the
sampler as it was before compaction and the lean decode step, ``tests/reference_sampler.py``, and against itself with
the model's own forward instead of ``tether.decode.LlamaDecoder``, ``decoder="hf"``), on the real stories260K on CPU.

All four sample the same prompts with temperature 1, fp32, a KV cache, the same number of torch
threads, in one process, interleaved over ``--repeats`` rounds (the machine may be shared; the table
shows the median). Two workloads:

- ``fixed``: no EOS (tether: ``eos_id=None``; generate: ``min_new_tokens = max_new_tokens``), so each
  row produces exactly ``max_new_tokens`` tokens: the per-step cost alone.
- ``stop``: rows stop at their first "." (stories260K, a llama2.c model, practically never emits its
  EOS: it separates stories with BOS), so rows finish at different steps as they do in training;
  tokens/s counts the completion tokens kept (through the stop token). Here finished rows stop costing
  compute in tether's sampler; ``generate`` keeps computing them until every row is done.

``cpu`` divides by the process's CPU time (robust on a shared machine), ``wall`` by elapsed time.

``--long``: the prompt prefilled once per group (``sample(prefill_once=True)``, the default) against every
row prefilled (``prefill_once=False``), on real long prompts: HH-RLHF dialogue prefixes (the implicit prompt,
up to the last "Assistant:" turn) of 128-256 tokens, each repeated G times as the online trainers lay a
group out, no EOS, at stories260K or ``--model llama-20M`` (bench_dpo's seeded random ~20M Llama). Both
settings draw the same tokens (checked); the table gives the median over interleaved repeats of a whole
``sample`` call and of the prompt pass alone (``max_new_tokens=1``: the prefill and one draw), and the
prefill's share of the sampling time.

Usage::

    python benchmarks/bench_sampler.py                      # prints the table
    python benchmarks/bench_sampler.py --batch_size 64 --max_new_tokens 128 --repeats 3 --threads 1
    python benchmarks/bench_sampler.py --long --model llama-20M --groups 2 --group_size 8 --max_new_tokens 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "One day, a girl",
    "Tom was",
    "The sun was",
    "Lily saw a",
    "The cat",
    "In the park,",
    "Ben and Mia",
    "The big tree",
    "Sam had a",
    "At night,",
]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 128; 32 with --long")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--assets", default=None)
    p.add_argument("--long", action="store_true", help="the long-prompt prefill-once workload (see above)")
    p.add_argument("--model", default="stories260K", choices=("stories260K", "llama-20M"), help="with --long")
    p.add_argument("--groups", type=int, default=2, help="with --long: distinct prompts per batch")
    p.add_argument("--group_size", type=int, default=8, help="with --long: rows per prompt (G)")
    p.add_argument("--decoder", default="auto", choices=("auto", "hf", "lean"), help="with --long: sample's decoder")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tether-bench"), help="llama-20M weights")
    args = p.parse_args()
    if args.long:
        args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else 32
        return long_prompts(args)
    args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else 128

    import torch
    from transformers import AutoModelForCausalLM

    from tether.assets import resolve_model
    from tether.modeling import load_tokenizer
    from tether.sampling import sample

    from reference_sampler import reference_sample

    torch.set_num_threads(args.threads)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "assets")
    if args.assets is None and not os.environ.get("TETHER_ASSETS") and os.path.isdir(shared):
        args.assets = shared
    path = resolve_model("stories260K", args.assets)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.batch_size)]
    N = args.max_new_tokens
    stop = tok(".", add_special_tokens=False)["input_ids"][-1]

    def tether_run(fn, eos):
        def go():
            b, _ = fn(
                model,
                rows,
                pad_id=tok.pad_token_id,
                eos_id=stop if eos else None,
                max_new_tokens=N,
                generator=torch.Generator().manual_seed(0),
            )
            return int(b.mask.sum())

        return go

    def hf_run(eos):
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")

        def go():
            torch.manual_seed(0)
            kw = {} if eos else {"min_new_tokens": N}
            out = model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=N,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
                eos_token_id=stop if eos else tok.eos_token_id,
                **kw,
            )
            comp = out[:, enc["input_ids"].shape[1] :]  # (B, T)
            if not eos:
                return comp.numel()
            is_eos = (comp == stop).int()
            before = (is_eos.cumsum(-1) - is_eos) == 0  # through the first EOS
            return int(before.sum())

        return go

    def hf_forward(*a, **k):  # the sampler with the model's own forward (no tether.decode.LlamaDecoder)
        return sample(*a, decoder="hf", **k)

    runs = {
        "tether (now)": lambda eos: tether_run(sample, eos),
        "tether (hf forward)": lambda eos: tether_run(hf_forward, eos),
        "tether (before)": lambda eos: tether_run(reference_sample, eos),
        "model.generate": hf_run,
    }
    print(
        f"stories260K on CPU, {args.threads} thread(s), {args.batch_size} rows x {N} new tokens, "
        f"median of {args.repeats}"
    )
    print(
        "| workload | sampler | tokens | tokens/s (cpu) | tokens/s (wall) | vs generate (cpu) | vs before (cpu) "
        "| vs hf forward (cpu) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for eos in (False, True):
        res: dict = {k: [] for k in runs}
        for name, mk in runs.items():  # warm-up
            mk(eos)()
        for _ in range(args.repeats):
            for name, mk in runs.items():
                res[name].append(timed(mk(eos)))
        med = {
            k: (v[0][0], statistics.median(n / c for n, _, c in v), statistics.median(n / w for n, w, _ in v))
            for k, v in res.items()
        }
        for name, (n, cpu, wall) in med.items():
            print(
                f"| {'stop' if eos else 'fixed'} | {name} | {n} | {cpu:.0f} | {wall:.0f} | "
                f"{cpu / med['model.generate'][1]:.2f}x | {cpu / med['tether (before)'][1]:.2f}x | "
                f"{cpu / med['tether (hf forward)'][1]:.2f}x |"
            )


def hh_prompts(tok, n: int, lo: int = 128, hi: int = 256) -> list[list[int]]:
    """The first ``n`` HH-RLHF (harmless-base test) implicit prompts whose token count is in [lo, hi]."""
    import gzip
    import json

    from tether.assets import resolve
    from tether.data.preference import implicit_prompt

    out = []
    with gzip.open(resolve("hh-rlhf") / "harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            ids = tok(implicit_prompt(row["chosen"], row["rejected"])[0])["input_ids"]
            if lo <= len(ids) <= hi:
                out.append(ids)
                if len(out) == n:
                    return out
    raise RuntimeError(f"fewer than {n} HH-RLHF prompts of {lo}-{hi} tokens")


def long_prompts(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tether.assets import resolve_model
    from tether.modeling import load_tokenizer
    from tether.sampling import sample

    torch.set_num_threads(args.threads)
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "assets")
    if args.assets is None and not os.environ.get("TETHER_ASSETS") and os.path.isdir(shared):
        args.assets = shared
    if args.assets:
        os.environ.setdefault("TETHER_ASSETS", args.assets)
    if args.model == "llama-20M":
        from pathlib import Path

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_dpo import make_llama20m

        path = make_llama20m(Path(args.cache) / "llama20m")
    else:
        path = resolve_model("stories260K", args.assets)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = hh_prompts(tok, args.groups)
    rows = [p for p in prompts for _ in range(args.group_size)]  # G contiguous copies: a group
    N = args.max_new_tokens

    def run(once: bool, n: int):
        def go():
            b, _ = sample(
                model, rows, pad_id=tok.pad_token_id, eos_id=None, max_new_tokens=n,
                generator=torch.Generator().manual_seed(0), prefill_once=once, decoder=args.decoder,
            )  # fmt: skip
            return b

        return go

    a, b = run(True, N)(), run(False, N)()  # warm-up, and the check that both draw the same tokens
    same = torch.equal(a.input_ids, b.input_ids) and torch.equal(a.behaviour_logps, b.behaviour_logps)
    cases = {(once, n): run(once, n) for once in (True, False) for n in (N, 1)}
    res: dict = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: a shared machine's load falls on every case alike
        for k, fn in cases.items():
            _, wall, cpu = timed(fn)
            res[k].append((cpu, wall))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in res.items()}
    lens = [len(p) for p in prompts]
    print(
        f"{args.model} on CPU, decoder {args.decoder}, {args.threads} thread(s), {args.groups} HH-RLHF prompts "
        f"of {lens} tokens x G = {args.group_size}, {N} new tokens (no EOS), median of {args.repeats} "
        "interleaved repeats; "
        f"same tokens and log-probs on/off: {'yes' if same else 'NO'}"
    )
    print("| prefill once | sample (cpu s) | sample (wall s) | prompt pass (cpu s) | prefill share | speed-up (cpu) |")
    print("|---|---:|---:|---:|---:|---:|")
    for once in (False, True):
        (cpu, wall), (pcpu, _) = med[(once, N)], med[(once, 1)]
        print(
            f"| {'on' if once else 'off'} | {cpu:.3f} | {wall:.3f} | {pcpu:.3f} | {pcpu / cpu:.0%} | "
            f"{med[(False, N)][0] / cpu:.2f}x |"
        )


if __name__ == "__main__":
    main()
