"""Peak memory of GRPO steps at a real vocabulary: tether with ``chunked_head`` on and off against TRL's
GRPOTrainer, the same model, data and settings, each run in its own fresh process.

The model is a seeded Qwen2-shaped one with Qwen2's vocabulary (V = 151,936, untied head), a small trunk
(``--hidden`` D, ``--layers``), so the (micro-batch x length x vocabulary) logits, not the trunk, decide the
memory, as they do for a real 0.5B-7B model at long completions. One group of G = 8 completions a step,
``--max_new_tokens`` new tokens (the seeded model rarely stops early: the completions run to the limit), one
update per rollout, β = 0.04 with TRL's k3 estimator on both sides (so both load a reference model and score it
every step), temperature 1, fp32, gradient checkpointing off on both sides, one torch thread, CPU.

Figures per run: peak RSS (the process's high-water resident memory, ``ru_maxrss``) and Δ train (peak RSS minus
the RSS at the start of the first step: models, optimiser set-up and imports excluded, what training adds).

Usage::

    python benchmarks/bench_vocab_memory.py                       # tether on, tether off, TRL; D = 256, 128 tokens
    python benchmarks/bench_vocab_memory.py --runs tether-on trl --max_new_tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

RUNS = ("tether-on", "tether-off", "trl", "tether-on-exact")
PROMPT = "Once upon a time"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_model(path: str, args) -> None:
    """The seeded Qwen2-shaped model, saved with the stories260K tokenizer (ids past its 512 decode to short
    strings; the reward reads the completions' length, so every run scores alike)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    src = os.path.join(args.assets, "stories260K")
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), os.path.join(path, f))


def length_reward(completions, **kwargs):
    return [len(c) / 100.0 for c in completions]


def run_tether(args, path: str, out: str, chunked: bool, estimator: str) -> dict:
    import tether.trainers.online as online
    from tether.rewards import CallableSource
    from tether.trainers.grpo import GRPOConfig, train_grpo

    rss0: list[float] = []
    inner = online.collect_rollout

    def timed(*a, **k):
        rss0.append(rss_mb())
        return inner(*a, **k)

    online.collect_rollout = timed
    cfg = GRPOConfig(
        model=path,
        output_dir=out,
        max_steps=args.steps,
        batch_size=args.group,
        samples_per_prompt=args.group,
        max_new_tokens=args.max_new_tokens,
        learning_rate=1e-5,
        beta=0.04,
        kl_estimator=estimator,
        progress=False,
        sample_every=0,
        eval_every=0,
        eval_final=False,
        save_checkpoints=False,
        seed=0,
        chunked_head=chunked,
    )
    train_grpo(cfg, prompts=[PROMPT], reward=CallableSource(length_reward, name="length"))
    return {"rss_before": rss0[0]}


def run_trl(args, path: str, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rss0: list[float] = []

    class Mark(TrainerCallback):
        def on_step_begin(self, *a, **k):
            rss0.append(rss_mb())

    cfg = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=1e-5,
        beta=0.04,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
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
        gradient_checkpointing=False,  # TRL defaults to True: set as tether's
    )
    ds = Dataset.from_dict({"prompt": [PROMPT] * args.steps})
    trainer = GRPOTrainer(
        model=model, reward_funcs=length_reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Mark()]
    )
    trainer.train()
    return {"rss_before": rss0[0]}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as out:
        if args.child == "trl":
            res = run_trl(args, args.model_path, out)
        else:
            estimator = "exact" if args.child.endswith("exact") else "k3"
            res = run_tether(args, args.model_path, out, args.child.startswith("tether-on"), estimator)
    res.update(run=args.child, peak_mb=peak_mb())
    res["train_mb"] = res["peak_mb"] - res["rss_before"]
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS[:3]), choices=RUNS)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--assets", default=os.environ.get("TETHER_ASSETS"))
    p.add_argument("--child", default=None)
    p.add_argument("--model_path", default=None)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qwen2-shaped")
        make_model(path, args)
        for run in args.runs:
            cmd = [sys.executable, __file__, "--child", run, "--model_path", path]
            for k in ("vocab", "hidden", "layers", "group", "max_new_tokens", "steps", "assets"):
                cmd += [f"--{k}", str(getattr(args, k))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{run} failed")
            rows[run] = json.loads(line[-1][7:])
            print(json.dumps(rows[run]), flush=True)
    shape = f"V = {args.vocab}, D = {args.hidden}, {args.layers} layers, G = {args.group}"
    print(f"\n{shape}, {args.max_new_tokens} tokens")
    print("| run | peak RSS (MiB) | Δ train (MiB) |")
    print("|---|---:|---:|")
    for run, r in rows.items():
        print(f"| {run} | {r['peak_mb']:,.0f} | {r['train_mb']:,.0f} |")
    if "trl" in rows:
        for run, r in rows.items():
            if run != "trl":
                print(
                    f"{run} / trl: peak {r['peak_mb'] / rows['trl']['peak_mb']:.2f}x, "
                    f"Δ train {r['train_mb'] / rows['trl']['train_mb']:.2f}x"
                )


if __name__ == "__main__":
    main()
