"""Colocated vLLM backend: a weight push + a generation, against the built-in sampler's generation.

The target: on the 20M-parameter model, ``update_weights`` + ``generate`` with the vLLM
backend cost no more than one built-in-sampler ``generate``. Both sample the same prompts
(``--batch_size`` rows, stories260K's tokenizer), temperature 1, fp32, ``--max_new_tokens`` tokens
with no EOS stop (``eos_id=None``: a random-init model's EOS would end rows at random, so every row
costs the same in both), in one process, interleaved over ``--repeats`` rounds (median shown). The
engine's first generation (warm-up) is not timed; the push is timed every round.

Runs in the vLLM environment (``make test-vllm`` builds .venv-vllm)::

    OMP_NUM_THREADS=2 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/bench_vllm.py
    ... --model llama-20M --batch_size 64 --max_new_tokens 64 --repeats 3   # the defaults

``OMP_NUM_THREADS`` sets the threads of both (``torch.set_num_threads`` is a no-op once the engine
exists). ``cpu`` columns divide by the process's CPU time, ``wall`` by elapsed time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="llama-20M", help="llama-20M (built by bench_dpo.make_llama20m) or a model folder"
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from tether.generation import BuiltinBackend, make_backend
    from tether.groups import SamplingSettings
    from tether.modeling import load_causal_lm, load_tokenizer

    from bench_dpo import make_llama20m

    path = (
        make_llama20m(Path(tempfile.gettempdir()) / "tether-bench-llama20m")
        if args.model == "llama-20M"
        else args.model
    )
    tok, model = load_tokenizer(path), load_causal_lm(path)
    n_params = sum(p.numel() for p in model.parameters())
    rows = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch_size)]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    ids = dict(pad_id=tok.pad_token_id, eos_id=None)
    builtin = BuiltinBackend(model)
    vllm, build_s, _ = timed(lambda: make_backend("vllm", model, max_model_len=256, kv_cache_bytes=512 << 20))
    gen = torch.Generator().manual_seed(0)
    vllm.generate(rows, settings, gen, **ids)  # warm-up, untimed
    res = {"builtin": [], "vllm push": [], "vllm generate": [], "vllm push+generate": []}
    tokens = {}
    for _ in range(args.repeats):
        (b, _), w, c = timed(lambda: builtin.generate(rows, settings, gen, **ids))
        res["builtin"].append((w, c))
        tokens["builtin"] = int(b.mask.sum())
        _, pw, pc = timed(lambda: vllm.update_weights(model))
        (v, _), gw, gc = timed(lambda: vllm.generate(rows, settings, gen, **ids))
        tokens["vllm"] = int(v.mask.sum())
        res["vllm push"].append((pw, pc))
        res["vllm generate"].append((gw, gc))
        res["vllm push+generate"].append((pw + gw, pc + gc))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
    print(
        f"model {args.model} ({n_params / 1e6:.1f}M parameters), {args.batch_size} rows x {args.max_new_tokens} "
        "tokens, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}, engine build {build_s:.1f} s, {args.repeats} "
        "rounds (median)"
    )
    print(f"tokens: builtin {tokens['builtin']}, vllm {tokens['vllm']}")
    print("| step | wall s | cpu s | wall / builtin | cpu / builtin |\n|---|---|---|---|---|")
    for k, (w, c) in med.items():
        print(f"| {k} | {w:.3f} | {c:.3f} | {w / med['builtin'][0]:.2f} | {c / med['builtin'][1]:.2f} |")


if __name__ == "__main__":
    main()
