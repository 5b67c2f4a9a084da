"""Throughput and memory of tether's GRPO and RLOO against TRL's GRPOTrainer and RLOOTrainer.

Same everything: the real stories260K model on CPU (no vLLM), the same 12 story prompts, the same
reward (VADER compound sentiment of the completion, passed to TRL as a reward function), the same
group size, completions per step, max new tokens, temperature 1 (no top-k/top-p), learning rate,
β, clip ε, one update per generation batch, fp32, the same number of torch threads, and gradient
checkpointing the same on both sides: off by default (``--gradient_checkpointing`` turns it on for
both). TRL's GRPOConfig and RLOOConfig default to ``gradient_checkpointing=True``, which recomputes the
forward in the backward (slower, less activation memory); left at TRL's default it would make tether
look faster and heavier than it is next to TRL at equal settings.

Each configuration runs in its own fresh subprocess, so peak memory is that run's alone:

- samples/s: completions per second in steady state, timed from the start of the 2nd step to the
  start of the last one (setup, model loading, the first step and the final save/eval excluded);
  step starts are read from the loop itself (tether: the rollout function; TRL: ``on_step_begin``).
  ``cpu`` divides by the process's CPU time over the same interval (robust when the machine is
  shared: with one torch thread it is the work done), ``wall`` by elapsed time.
- peak RSS: the process's high-water resident memory (``ru_maxrss``); Δ train: peak RSS minus the
  RSS at the start of the 2nd step, after all imports, model loading and first-step lazy imports
  (TensorBoard for tether's logger), which differ between the libraries — the memory training adds.

Each configuration is run ``--repeats`` times, interleaved (the machine may be shared); the table
shows the median samples/s and the largest peak.

Usage::

    python benchmarks/bench_online.py                 # all four, prints the table
    python benchmarks/bench_online.py --steps 10 --max_new_tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

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
RUNS = ("tether-grpo", "trl-grpo", "tether-rloo", "trl-rloo")
ABLATIONS = ("tether-grpo-scoringpass", "tether-rloo-scoringpass", "tether-grpo-padded", "tether-rloo-padded")
"""Optional runs (``--runs``): tether as before ``score_from_update`` (a separate no-grad scoring pass of the
policy each step), and tether with ``shared_prompt: false`` (each completion scored as its own padded row,
the prompt computed once per completion, as TRL does), for before/after ratios measured in the same run."""
ABLATION_OVERRIDES = {"scoringpass": {"score_from_update": False}, "padded": {"shared_prompt": False}}


def hh_prompts(n: int, assets: str, tok, lo: int = 128, hi: int = 256) -> list[str]:
    """``n`` HH-RLHF dialogue prefixes (a chosen dialogue up to and including its last "Assistant:") whose
    token count under ``tok`` lies in [lo, hi]: the long-prompt workload, prompts of real dialogue length."""
    import gzip

    out = []
    with gzip.open(os.path.join(assets, "hh-rlhf", "harmless-base-test.jsonl.gz"), "rt") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            prefix = text[: text.rfind("Assistant:") + len("Assistant:")].strip()
            if lo <= len(tok(prefix, add_special_tokens=False)["input_ids"]) <= hi:
                out.append(prefix)
            if len(out) == n:
                break
    return out


class TrunkCounter:
    """Token positions the models' decoders compute in full-sequence passes (training forward, reference,
    scoring; calls with a KV cache — sampling — are not counted): a forward pre-hook on each decoder.
    ``active`` gates counting (the same rule for both libraries)."""

    def __init__(self):
        self.tokens = 0
        self.active = True

    def attach(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.get_decoder().register_forward_pre_hook(lambda m, a, k: self._hook(m, a, k), with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.active or any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            return
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")[..., 0]
        self.tokens += int(x.numel())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def vader_reward_fn():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader(completions, **kwargs):
        return [analyzer.polarity_scores(c)["compound"] for c in completions]

    return vader


def run_tether(method: str, args, model_path: str, out: str, **overrides) -> dict:
    import torch

    import tether.trainers.online as online
    from tether.rewards import CallableSource

    starts: list[float] = []
    inner = online.collect_rollout

    rss0: list[float] = []

    counter = TrunkCounter()
    counts: list[int] = []

    def timed(*a, **k):  # step start = rollout start
        starts.append((time.perf_counter(), time.process_time()))
        counts.append(counter.tokens)
        rss0.append(rss_mb())
        return inner(*a, **k)

    online.collect_rollout = timed
    setup = online.setup

    def setup_counted(*a, **k):  # the policy's decoder and the reference's
        sess = setup(*a, **k)
        counter.attach(sess.policy)
        ref = getattr(sess.reference, "model", None)
        if isinstance(ref, torch.nn.Module) and ref is not sess.policy:
            counter.attach(ref)
        return sess

    online.setup = setup_counted
    common = dict(
        model=model_path,
        output_dir=out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        samples_per_prompt=args.group,
        max_new_tokens=args.max_new_tokens,
        learning_rate=args.lr,
        clip_eps=0.2,
        num_epochs=1,
        progress=False,
        sample_every=0,
        eval_every=0,
        eval_max_prompts=1,
        eval_samples=1,
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,
        **overrides,
    )
    if method == "grpo":
        from tether.trainers.grpo import GRPOConfig, train_grpo

        cfg, train = (
            GRPOConfig(**common, beta=args.beta_grpo, kl_estimator="k3", loss_aggregation="seq_mean_token_mean"),
            train_grpo,
        )
    else:
        from tether.trainers.rloo import RLOOConfig, train_rloo

        cfg, train = RLOOConfig(**common, beta=args.beta_rloo, kl_estimator="k1"), train_rloo
    train(cfg, prompts=args.prompt_texts, reward=CallableSource(vader_reward_fn(), name="vader"))
    return {"starts": starts, "rss_before": rss0[1], "trunk_tokens_per_step": per_step(counts)}


def run_trl(method: str, args, model_path: str, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(model_path)  # pad = eos (stories260K has none), left padding
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    n = args.steps * args.batch_size // args.group
    ds = Dataset.from_dict({"prompt": [args.prompt_texts[i % len(args.prompt_texts)] for i in range(n)]})
    starts: list[float] = []
    rss0: list[float] = []
    counts: list[int] = []
    counter = TrunkCounter()

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            starts.append((time.perf_counter(), time.process_time()))
            rss0.append(rss_mb())
            counts.append(counter.tokens)

    common = dict(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        epsilon=0.2,
        num_iterations=1,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_dropout=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # TRL defaults to True: set as tether's
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(**common, beta=args.beta_grpo, loss_type="grpo", scale_rewards="group")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=vader_reward_fn(),
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[Timer()],
        )
        _count_trl(trainer, counter)
    else:
        from trl import RLOOConfig, RLOOTrainer

        cfg = RLOOConfig(**common, beta=args.beta_rloo)
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=vader_reward_fn(),
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[Timer()],
        )
        _count_trl(trainer, counter)
    trainer.train()
    return {"starts": starts, "rss_before": rss0[1], "trunk_tokens_per_step": per_step(counts)}


def per_step(counts: list) -> float:
    """Tokens per step over the timed steps (from the start of the 2nd step to the start of the last)."""
    return (counts[-1] - counts[1]) / max(len(counts) - 2, 1)


def _count_trl(trainer, counter: TrunkCounter) -> None:
    for m in (trainer.model, getattr(trainer, "ref_model", None)):
        if m is not None:
            counter.attach(m)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tether.assets import resolve_model

    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "assets")
    if args.assets is None and not os.environ.get("TETHER_ASSETS") and os.path.isdir(shared):
        args.assets = shared  # the layout of this project's CI (tests/conftest.py does the same)
    if args.model == "llama-20M":
        if args.assets:
            os.environ.setdefault("TETHER_ASSETS", args.assets)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from pathlib import Path

        from bench_dpo import make_llama20m  # the DPO benchmark's seeded random ~20M Llama (no such model in assets)

        model_path = make_llama20m(Path(args.cache) / "llama20m")
    else:
        model_path = resolve_model("stories260K", args.assets)
    if args.workload == "hh-long":
        from tether.modeling import load_tokenizer

        args.prompt_texts = hh_prompts(
            args.n_prompts, args.assets or os.environ["TETHER_ASSETS"], load_tokenizer(model_path)
        )
    else:
        args.prompt_texts = PROMPTS
    lib, method, *ablation = args.run.split("-")
    with tempfile.TemporaryDirectory() as out:
        if lib == "tether":
            res = run_tether(method, args, model_path, out, **(ABLATION_OVERRIDES[ablation[0]] if ablation else {}))
        else:
            res = run_trl(method, args, model_path, out)
    s = res["starts"]
    if len(s) < 4:
        raise RuntimeError(f"{args.run}: only {len(s)} steps timed; raise --steps")
    wall = (s[-1][0] - s[1][0]) / (len(s) - 2)
    cpu = (s[-1][1] - s[1][1]) / (len(s) - 2)
    print(
        "RESULT "
        + json.dumps(
            {
                "run": args.run,
                "samples_per_s": args.batch_size / cpu,
                "wall_samples_per_s": args.batch_size / wall,
                "cpu_s_per_step": cpu,
                "peak_rss_mb": peak_mb(),
                "delta_mb": peak_mb() - res["rss_before"],
                "trunk_tokens_per_step": res["trunk_tokens_per_step"],
            }
        )
    )


def table(rows: dict) -> str:
    lines = [
        f"{'run':<24} {'samples/s cpu':>14} {'samples/s wall':>15} {'cpu s/step':>11} {'peak RSS MB':>12} "
        f"{'Δ train MB':>11} {'trunk tok/step':>15}"
    ]
    for r in RUNS + ABLATIONS:
        if r in rows:
            x = rows[r]
            lines.append(
                f"{r:<24} {x['samples_per_s']:>14.1f} {x['wall_samples_per_s']:>15.1f} {x['cpu_s_per_step']:>11.3f} "
                f"{x['peak_rss_mb']:>12.0f} {x['delta_mb']:>11.1f} {x.get('trunk_tokens_per_step', 0):>15.0f}"
            )
    lines.append("")
    for m in ("grpo", "rloo"):
        a, b = rows.get(f"tether-{m}"), rows.get(f"trl-{m}")
        if a and b:
            lines.append(
                f"{m}: tether/TRL samples/s (cpu) = {a['samples_per_s'] / b['samples_per_s']:.2f}x, "
                f"(wall) = {a['wall_samples_per_s'] / b['wall_samples_per_s']:.2f}x, "
                f"peak RSS = {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, Δ train = "
                f"{a['delta_mb'] / max(b['delta_mb'], 1e-9):.2f}x"
            )
        c = rows.get(f"tether-{m}-scoringpass")
        if a and c:
            lines.append(
                f"{m}: score_from_update bought {a['samples_per_s'] / c['samples_per_s']:.2f}x samples/s (cpu) "
                f"over a separate scoring pass"
            )
        d = rows.get(f"tether-{m}-padded")
        if a and d:
            lines.append(
                f"{m}: the shared prompt bought {a['samples_per_s'] / d['samples_per_s']:.2f}x samples/s (cpu) over "
                f"the padded layout (trunk positions per step {a['trunk_tokens_per_step']:.0f} vs "
                f"{d['trunk_tokens_per_step']:.0f})"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run", choices=RUNS + ABLATIONS, help=argparse.SUPPRESS
    )  # internal: one configuration in this process
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS + ABLATIONS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=16, help="completions per step (prompts x group)")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta_grpo", type=float, default=0.04)
    p.add_argument("--beta_rloo", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median samples/s)")
    p.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="both libraries recompute activations in the backward (TRL's GRPO/RLOO default; tether's is off)",
    )
    p.add_argument("--assets", default=None)
    p.add_argument(
        "--workload",
        choices=("short", "hh-long"),
        default="short",
        help="short: 12 story openings of 2-5 tokens; hh-long: HH-RLHF dialogue prefixes of 128-256 tokens",
    )
    p.add_argument("--n_prompts", type=int, default=12, help="hh-long: how many dialogue prefixes")
    p.add_argument(
        "--model",
        choices=("stories260K", "llama-20M"),
        default="stories260K",
        help="llama-20M: bench_dpo's seeded random ~20M-parameter Llama (stories260K's tokenizer), built once",
    )
    p.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "tether-bench"),
        help="where the llama-20M weights are written",
    )
    args = p.parse_args()
    if args.run:
        child(args)
        return
    results: dict = {}
    passthrough = [
        f"--{k}" if v is True else f"--{k}={v}"
        for k, v in vars(args).items()
        if k not in ("run", "runs", "repeats") and v is not None and v is not False
    ]
    for rep in range(args.repeats):
        for r in args.runs.split(","):
            proc = subprocess.run([sys.executable, __file__, "--run", r, *passthrough], capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                print(f"{r} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(found[-1][len("RESULT ") :])
            results.setdefault(r, []).append(res)
            print(
                f"repeat {rep + 1}: {r} {res['samples_per_s']:.1f} samples/s (cpu), {res['wall_samples_per_s']:.1f} "
                "(wall)",
                file=sys.stderr,
            )
    rows = {}
    for r, rs in results.items():
        rs = sorted(rs, key=lambda x: x["samples_per_s"])
        med = rs[len(rs) // 2]
        rows[r] = {**med, "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "delta_mb": max(x["delta_mb"] for x in rs)}
    print(
        f"{args.model} on CPU, {args.threads} thread(s); {args.batch_size} completions/step = "
        f"{args.batch_size // args.group} prompts x {args.group}; prompts {args.workload}; "
        f"max_new_tokens={args.max_new_tokens}; {args.steps} "
        "steps; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} (both); median of {args.repeats}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
