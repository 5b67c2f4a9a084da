"""Peak memory of one micro-batch's scores and their backward at a real vocabulary: the (B, T, V) logits
path (``ops.logprobs`` on the policy's and the reference's logits, as the online update computes them)
against ``ops.head.head_scores`` (the LM head applied in checkpointed row chunks from hidden states).

Only the head and what follows it are measured: final hidden states h (B·T, D) of the policy (with
gradients) and of the reference, heads (V, D), as in a Qwen2-0.5B-shaped model (V = 151,936, D = 896),
τ = 0.8 and a top-50 set F_t per position (packed, as the sampler stores it). The loss is
Σ (a·log π(y) + KL_exact + c·H), then its backward to h and W. Each variant runs in its own process;
the figure is the rise of the process's peak resident memory (VmHWM, reset after the set-up) over the
set-up's, on the CPU.

Usage::

    python benchmarks/bench_head_memory.py                  # B = 8, T = 128
    python benchmarks/bench_head_memory.py --rows 8 --length 256 --chunk 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    from tether.ops.head import head_scores
    from tether.ops.logprobs import (
        apply_sampling_filters,
        entropy_from_logits,
        exact_kl_from_logits,
        filter_cost_from_logits,
        pack_allowed,
        selective_logps,
    )

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T, D, V, tau = args.rows, args.length, args.hidden, args.vocab, 0.8
    W = (torch.randn(V, D, generator=g) * 0.02).requires_grad_()
    rW = W.detach() + 0.001 * torch.randn(V, D, generator=g)
    h = torch.randn(B, T, D, generator=g).requires_grad_()
    rh = h.detach() + 0.01 * torch.randn(B, T, D, generator=g)
    allowed, tokens = [], []
    with torch.no_grad():  # F_t: top-50 of the policy's tempered logits; y_t the best of them (in F_t)
        for s in range(0, T, 16):
            z = F.linear(h[:, s : s + 16], W) / tau
            top = torch.topk(z, 50, -1)
            allowed.append(pack_allowed(z >= top.values[..., -1:]))
            tokens.append(top.indices[..., 0])
    allowed, tokens = torch.cat(allowed, 1), torch.cat(tokens, 1)  # (B, T, V/8), (B, T)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident size
    base = _hwm_kb()
    t0 = time.perf_counter()
    if args.variant == "logits":
        z = apply_sampling_filters(F.linear(h, W), temperature=tau, allowed=allowed)  # (B, T, V), graph kept
        with torch.no_grad():
            zq = F.linear(rh, rW) / tau  # (B, T, V) the reference's
        s = {
            "logps": selective_logps(z, tokens),
            "kl_exact": exact_kl_from_logits(z, zq),
            "entropy": entropy_from_logits(z),
            "filter_cost": filter_cost_from_logits(z.detach(), zq),
        }
    else:
        s = head_scores(
            h, W, tokens, ref_hidden=rh, ref_weight=rW, temperature=tau, allowed=allowed, chunk_size=args.chunk
        )
    loss = (0.5 * s["logps"] + s["kl_exact"] + 0.01 * s["entropy"]).sum()
    loss.backward()
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "variant": args.variant,
                "peak_mb": (_hwm_kb() - base) / 1024,
                "wall_s": wall,
                "loss": float(loss),
                "kl_mean": float(s["kl_exact"].mean()),
                "grad_w": float(W.grad.norm()),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--paths", default="logits,head", help="which to run: logits, head or both (comma-separated)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    res: dict = {v: [] for v in args.paths.split(",")}
    for _ in range(args.repeats):
        for v in res:
            cmd = [sys.executable, __file__, "--variant", v] + [
                f"--{k}={getattr(args, k)}" for k in ("rows", "length", "hidden", "vocab", "chunk", "threads")
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[v].append(json.loads(out.strip().splitlines()[-1]))
    BTV = args.rows * args.length * args.vocab
    print(
        f"B = {args.rows}, T = {args.length}, V = {args.vocab}, D = {args.hidden}, chunk {args.chunk}, "
        f"{args.threads} thread(s); one (B, T, V) float32 tensor = {BTV * 4 / 2**20:.0f} MiB"
    )
    print("| path | peak rise (MiB) | wall (s) | loss | mean KL |")
    print("|---|---:|---:|---:|---:|")
    for v, rows in res.items():
        r = min(rows, key=lambda x: x["wall_s"])
        peak = max(x["peak_mb"] for x in rows)
        print(f"| {v} | {peak:.0f} | {r['wall_s']:.2f} | {r['loss']:.6g} | {r['kl_mean']:.6g} |")


if __name__ == "__main__":
    main()
