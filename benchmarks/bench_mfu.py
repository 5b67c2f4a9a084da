"""Share of the machine's float32 matmul peak that a DPO step and a GRPO step reach on the 20M model.

- peak: FLOP/s of a loop of square ``torch.matmul`` products (2·n³ FLOP each, n = ``--n``), the best
  of ``--repeats`` timed rounds: what this CPU and torch's BLAS reach on the best-shaped work there is.
- a step's achieved FLOP/s: its useful arithmetic over its CPU time (steady state: steps 2 .. N-1).
  Useful arithmetic counts the real (non-padding) tokens: 6·N·tokens for a pass trained through
  (forward + backward), 2·N·tokens for a forward-only pass, with N the parameters that multiply
  (everything but the input embedding, a lookup). Attention's own products (O(L²·d) per layer, under 3%
  here at L ≈ 40-80) and padding are left out, so the share is a lower bound on the hardware's
  utilisation and an upper bound on nothing.

  DPO (``tether dpo``, precomputed reference): training only, 6·N·tokens of both sequences of every pair.
  GRPO (``tether grpo``): sampling (2·N per prompt and completion token: every token passes the model
  once), scoring under the reference (2·N·tokens), training (6·N·tokens): 10·N·tokens. With one update per
  rollout the update's own forward supplies the policy's scores (``score_from_update``), so no policy
  scoring pass is counted (before it, 12·N·tokens).

CPU time of this process, ``--threads`` torch threads (1 by default, as the other benchmarks; the peak is
measured with the same count).

    python benchmarks/bench_mfu.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def matmul_peak(n: int, repeats: int, iters: int = 8) -> float:
    """Best FLOP/s of ``iters`` fp32 n x n products, over ``repeats`` rounds (CPU time)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(iters):
            torch.matmul(a, b)
        best = max(best, iters * 2 * n**3 / (time.process_time() - t))
    return best


def multiplying_params(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb or model.config.tie_word_embeddings)


def dpo_flops(model_path: str, steps: int, n_params: int) -> list[float]:
    """Achieved FLOP/s of each steady-state DPO step (6·N·real tokens / step CPU time)."""
    from tether.trainers.dpo import DPOConfig, train_dpo

    from bench_dpo import movie_rows

    marks: list[tuple[float, float]] = []  # (cpu time at the step's end, its real tokens)

    def cb(step, metrics):
        marks.append((time.process_time(), metrics["data/tokens"]))

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            model=model_path,
            output_dir=out,
            max_steps=steps,
            batch_size=8,
            learning_rate=1e-4,
            max_length=256,
            beta=0.1,
            eval_fraction=0.0,
            kl_prompts=0,
            progress=False,
            seed=0,
        )
        train_dpo(cfg, rows=movie_rows(256, seed=2), callback=cb)
    return [6 * n_params * tok / (t1 - t0) for (t0, _), (t1, tok) in zip(marks[1:-1], marks[2:])]


def grpo_flops(model_path: str, steps: int, n_params: int) -> list[float]:
    """Achieved FLOP/s of each steady-state GRPO step (10·N·real tokens / step CPU time; bench_online's settings)."""
    import tether.trainers.online as online
    import tether.trainers.rollout as rollout
    from tether.rewards import CallableSource
    from tether.trainers.grpo import GRPOConfig, train_grpo

    from bench_online import PROMPTS, vader_reward_fn

    starts: list[float] = []
    tokens: list[int] = []
    inner_rollout, inner_generate = online.collect_rollout, rollout.generate

    def timed(*a, **k):
        starts.append(time.process_time())
        return inner_rollout(*a, **k)

    def counted(*a, **k):
        smp = inner_generate(*a, **k)
        b = smp.batch
        tokens.append(int(b.attention_mask.sum()))  # real prompt + completion tokens
        return smp

    online.collect_rollout, rollout.generate = timed, counted
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = GRPOConfig(
                model=model_path,
                output_dir=out,
                max_steps=steps,
                batch_size=16,
                samples_per_prompt=4,
                max_new_tokens=32,
                learning_rate=1e-4,
                clip_eps=0.2,
                num_epochs=1,
                progress=False,
                sample_every=0,
                eval_every=0,
                eval_max_prompts=1,
                eval_samples=1,
                seed=0,
                beta=0.04,
                kl_estimator="k3",
                loss_aggregation="seq_mean_token_mean",
            )
            train_grpo(cfg, prompts=PROMPTS, reward=CallableSource(vader_reward_fn(), name="vader"))
    finally:
        online.collect_rollout, rollout.generate = inner_rollout, inner_generate
    return [10 * n_params * tokens[i] / (starts[i + 1] - starts[i]) for i in range(1, len(starts) - 1)]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="rounds of the peak loop, and of each step benchmark")
    p.add_argument("--n", type=int, default=1024, help="matrix size of the peak loop")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tether-bench"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tether.modeling import load_causal_lm

    from bench_dpo import make_llama20m

    path = make_llama20m(Path(args.cache) / "llama20m")
    n_params = multiplying_params(load_causal_lm(path))
    dpo, grpo, peaks = [], [], []
    for _ in range(args.repeats):  # interleaved: the machine may be shared
        peaks.append(matmul_peak(args.n, 3))
        dpo += dpo_flops(path, args.steps, n_params)
        grpo += grpo_flops(path, args.steps, n_params)
    peak = max(peaks)
    print(f"llama-20M ({n_params / 1e6:.1f}M multiplying parameters), CPU, {args.threads} thread(s)")
    print(
        f"| what | GFLOP/s (median) | share of peak |\n|---|---:|---:|\n| fp32 matmul peak ({args.n}³, best) | "
        f"{peak / 1e9:.1f} | 1.00 |"
    )
    for name, xs in (("DPO step (6·N·tokens)", dpo), ("GRPO step (10·N·tokens)", grpo)):
        m = statistics.median(xs)
        print(f"| {name} | {m / 1e9:.1f} | {m / peak:.2f} |")


if __name__ == "__main__":
    main()
