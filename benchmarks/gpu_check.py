"""GPU check: SFT -> DPO -> GRPO -> PPO on one device in bf16, every logged metric finite, the KL 0 at
step 0, and tokens/s beside TRL's for DPO and GRPO on the same model and settings.

``make gpu-check`` runs it on CUDA (one H100: a few minutes); ``--device cpu --tiny`` runs the same
pipeline end to end on a ~0.2M-parameter model in seconds (tests/test_gpu_check.py).

- Model: a seeded, randomly initialised Llama built from a config (no download): ~100M parameters
  (hidden 768, 14 layers, 12 heads; ``--tiny``: hidden 64, 2 layers), with stories260K's tokenizer
  (512 tokens) from ``$TETHER_ASSETS/stories260K`` (or ``--tokenizer DIR``).
- Data: written by this script (seeded): short sentences for SFT, preference pairs for DPO, prompts
  and a rule-based reward (how many of the completion's characters are vowels) for GRPO and PPO.
  Each stage starts from the previous stage's final model.
- Precision: ``--precision autocast`` (default): float32 weights, bf16 autocast
  (``TrainConfig.autocast``); ``bf16``: bfloat16 weights; ``fp32``.
- Checks (the script exits 1 if one fails): every number in every stage's metrics.jsonl is finite;
  at step 0 the KL to the reference is 0 within the bound derived below. The policy and its reference
  hold the same weights then, so their logits differ at most by the rounding of one bf16 product
  (where two passes take different kernels): |δ_v| <= 2^-7·z_max for each logit (one bf16 spacing at
  the largest logit z_max, measured on the prompts). KL[softmax(z)‖softmax(z + δ)] is the Bregman
  divergence of log-sum-exp, at most Var_p(δ)/2 <= (max δ - min δ)²/8 (Popoviciu), so per token
  KL <= (2·2^-7·z_max)²/8, and a sequence KL over T tokens at most T times that.
- Speed: tokens/s of tether's and TRL's DPO and GRPO (same model file, data, batch, lengths, learning
  rate, β, precision; no vLLM), steady state from the 2nd step to the last. DPO: real tokens of the
  step's pairs (the same for both); GRPO: prompt + completion tokens sampled (each side's own count).
  TRL is skipped with one line if ``trl`` is not importable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the cat dog sun tree girl boy ran saw big little happy sad park ball home day night red blue "
    "jumped played found a an and was is to with in on"
).split()


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)
    return dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12)


def make_model(out: Path, tokenizer_dir: str, tiny: bool) -> tuple[str, int]:
    """A seeded random Llama with the tokenizer's vocabulary, saved to ``out``. Returns (path, parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    s = sizes(tiny)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=s["num_attention_heads"],
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **s,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), sum(p.numel() for p in model.parameters())


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_data(d: Path, n_prompts: int, max_length: int) -> dict:
    rng = random.Random(0)
    n_sent = max(1, max_length // 24)  # about 12 tokens a sentence: every text fits in max_length
    (d / "sft.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(sentence(rng, 8) for _ in range(n_sent))}) + "\n" for _ in range(256))
    )
    pairs = [
        {"prompt": sentence(rng, 4)[:-1], "chosen": " " + sentence(rng, 10), "rejected": " " + sentence(rng, 10)}
        for _ in range(256)
    ]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prompts = [sentence(rng, 4)[:-1] for _ in range(n_prompts)]
    return {"sft": str(d / "sft.jsonl"), "pairs": pairs, "pairs_file": str(d / "pairs.jsonl"), "prompts": prompts}


def vowel_reward(completions, **kwargs):
    """Share of the completion's characters that are vowels (a rule any library can call)."""
    return [sum(ch in "aeiou" for ch in c.lower()) / max(len(c), 1) for c in completions]


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def nonfinite(rows: list[dict]) -> list[str]:
    bad = []
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                bad.append(f"step {row.get('step')}: {k}={v}")
    return bad


def kl_bound(model_path: str, prompts: list, tokens: int, device: str) -> float:
    """Sequence-KL bound at step 0 (module docstring): T·(2·2^-7·z_max)²/8, z_max the largest |logit| on the
    prompts under the starting weights."""
    import torch

    from tether.modeling import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(model_path), load_causal_lm(model_path, device=device)
    with torch.no_grad():
        z = max(
            float(model(input_ids=torch.tensor([tok(p)["input_ids"]], device=device)).logits.abs().max())
            for p in prompts[:16]
        )
    return tokens * (2 * 2**-7 * z) ** 2 / 8


def steady_rate(stamps: list[float], per_step: list[float]) -> float:
    """Tokens/s from the end of step 1 to the end of the last step (step 1 holds warm-up and compilation);
    ``stamps[i]`` is the end of step i + 1 and ``per_step[i]`` its tokens."""
    if len(stamps) < 3:
        return float("nan")
    return sum(per_step[1:]) / (stamps[-1] - stamps[0])


# --------------------------------------------------------------------------------------------------
# tether


def run_tether(stage: str, a, model: str, data: dict, out: str) -> tuple[str, list[dict], float]:
    """One tether stage; returns (final model folder, metrics rows, tokens/s)."""
    from tether.rewards import CallableSource

    prec = {"autocast": {"autocast": True}, "bf16": {"dtype": "bfloat16"}, "fp32": {}}[a.precision]
    common = dict(
        model=model,
        output_dir=out,
        seed=0,
        progress=False,
        report_to="none",
        learning_rate=a.lr,
        max_steps=a.steps,
        **prec,
    )
    if stage == "sft":
        from tether.trainers.sft import SFTConfig, train_sft

        res = train_sft(SFTConfig(**common, dataset=data["sft"], batch_size=a.batch, max_length=a.max_length))
        return res["final"], read_metrics(out), float("nan")
    if stage == "dpo":
        from tether.trainers.dpo import DPOConfig, train_dpo

        stamps, toks = [], []

        def cb(step, m):
            stamps.append(time.perf_counter())
            toks.append(m["data/tokens"])

        def kl_at_start(step, policy, beta):
            """kl/ref at step 0 (DPO measures it only at evaluations): the policy against a reference loaded
            from the same folder, as DPO's own is, computed in the same precision."""
            if step:
                return {}
            from tether.engine import evaluate
            from tether.modeling import load_causal_lm, load_tokenizer
            from tether.reference import FrozenReference

            dev = next(policy.parameters()).device
            ref = FrozenReference(load_causal_lm(model, device=dev, **prec))
            tok = load_tokenizer(model)
            ids = [tok(r["prompt"])["input_ids"] for r in data["pairs"][:8]]
            res = evaluate(policy, ref, ids, tokenizer=tok, seed=0, max_new_tokens=a.new_tokens)
            return {"kl/ref": res["estimators"]["exact"]["mean"]}

        res = train_dpo(
            DPOConfig(
                **common,
                batch_size=a.batch,
                max_length=a.max_length,
                beta=0.1,
                eval_every=a.steps,
                kl_prompts=8,
                kl_max_new_tokens=a.new_tokens,
            ),
            rows=data["pairs"],
            callback=cb,
            eval_hook=kl_at_start,
        )
        return res["final"], read_metrics(out), steady_rate(stamps, toks)
    import tether.trainers.online as online

    stamps, toks = [], []
    inner = online.collect_rollout

    def timed(*args, **kw):  # a step starts with its rollout; the rollout's tokens are the step's
        stamps.append(time.perf_counter())
        ro = inner(*args, **kw)
        toks.append(float(ro.batch.attention_mask.sum()))
        return ro

    online.collect_rollout = timed
    try:
        kw = dict(
            common,
            batch_size=a.batch,
            samples_per_prompt=a.group,
            max_new_tokens=a.new_tokens,
            eval_every=a.steps,
            eval_max_prompts=8,
            eval_samples=1,
            sample_every=0,
            kl_estimator="k3" if stage == "grpo" else "k1",
        )
        reward = CallableSource(vowel_reward, name="vowels")
        if stage == "grpo":
            from tether.trainers.grpo import GRPOConfig, train_grpo

            res = train_grpo(GRPOConfig(**kw, beta=0.04), prompts=data["prompts"], reward=reward)
        else:
            from tether.trainers.ppo import PPOConfig, train_ppo

            res = train_ppo(PPOConfig(**kw, beta=0.05), prompts=data["prompts"], reward=reward)
    finally:
        online.collect_rollout = inner
    # from the start of step 2 to the start of the last step (the last one ends with the final evaluation and save)
    rate = sum(toks[1:-1]) / (stamps[-1] - stamps[1]) if len(stamps) >= 3 else float("nan")
    return res["final"], read_metrics(out), rate


# --------------------------------------------------------------------------------------------------
# TRL, same model and settings


def run_trl(stage: str, a, model: str, data: dict, out: str, device: str) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(model)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    stamps: list[float] = []
    toks: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kw):
            stamps.append(time.perf_counter())

    common = dict(
        output_dir=out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=a.precision == "autocast",
        gradient_checkpointing=False,
    )
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        from tether.data.preference import pair_tokens, tokenize_pairs

        per_pair = [pair_tokens(p) for p in tokenize_pairs(data["pairs"], tok)[0]]
        cfg = DPOConfig(**common, beta=0.1, max_length=a.max_length, loss_type=["sigmoid"])
        trainer = DPOTrainer(
            model=policy,
            args=cfg,
            train_dataset=Dataset.from_list(data["pairs"]),
            processing_class=tok,
            callbacks=[Stamp()],
        )
        trainer.remove_callback(PrinterCallback)  # keep this script's output readable
        mean = sum(per_pair) / len(per_pair)  # per-step tokens: TRL draws its own order; the mean pair is what counts
        trainer.train()
        return steady_rate(stamps, [mean * a.batch] * len(stamps))
    from trl import GRPOConfig, GRPOTrainer

    class Count(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                toks.append(float(logs["num_tokens"]))

    n = a.steps * a.batch // a.group
    ds = Dataset.from_dict({"prompt": [data["prompts"][i % len(data["prompts"])] for i in range(n)]})
    cfg = GRPOConfig(
        **common,
        num_generations=a.group,
        max_completion_length=a.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.04,
        epsilon=0.2,
        num_iterations=1,
        use_vllm=False,
        loss_type="grpo",
        scale_rewards="group",
        disable_dropout=True,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=vowel_reward,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Stamp(), Count()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    per_step = [toks[0]] + [b - c for c, b in zip(toks, toks[1:])] if toks else [float("nan")] * len(stamps)
    return steady_rate(stamps, per_step[: len(stamps)])


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a ~0.2M-parameter model and a few steps (CPU smoke run)")
    p.add_argument("--precision", default="autocast", choices=("autocast", "bf16", "fp32"))
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per stage (default 8; --tiny 3)")
    p.add_argument(
        "--batch", type=int, default=None, help="examples (online: completions) per step (default 32; --tiny 4)"
    )
    p.add_argument("--group", type=int, default=4, help="GRPO/PPO completions per prompt")
    p.add_argument("--new_tokens", type=int, default=None, help="completion tokens (default 64; --tiny 8)")
    p.add_argument("--max_length", type=int, default=None, help="SFT/DPO sequence length (default 128; --tiny 48)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--no_trl", action="store_true", help="skip the TRL runs")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default $TETHER_ASSETS/stories260K)")
    p.add_argument("--workdir", default=None, help="where models, data and runs go (default: a temporary folder)")
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.tiny else 8)
    a.batch = a.batch or (4 if a.tiny else 32)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 64)
    a.max_length = a.max_length or (48 if a.tiny else 128)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False); use --device cpu --tiny for the CPU "
            "run"
        )
        return 2
    if a.device == "cpu" and not a.tiny:
        print("gpu-check: --device cpu runs the --tiny model only (a 100M model on CPU takes hours); add --tiny")
        return 2
    tok_dir = a.tokenizer or os.path.join(os.environ.get("TETHER_ASSETS", ""), "stories260K")
    if not os.path.isdir(tok_dir):
        print(
            f"gpu-check: no tokenizer folder at {tok_dir!r}: set TETHER_ASSETS to the assets folder (it holds "
            "stories260K) or pass --tokenizer DIR"
        )
        return 2
    card = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tether-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, n_params = make_model(work / "init", tok_dir, a.tiny)
    data = write_data(work, max(a.batch // a.group, 1) * a.steps, a.max_length)
    print(
        f"gpu-check on {card}: Llama {n_params / 1e6:.1f}M parameters (seeded, random), precision {a.precision}, "
        f"{a.steps} steps per stage, batch {a.batch}, {a.new_tokens} new tokens, torch {torch.__version__}"
    )
    failures: list[str] = []
    speed: dict = {}
    for stage in ("sft", "dpo", "grpo", "ppo"):
        out = str(work / stage)
        t0 = time.perf_counter()
        tokens = a.new_tokens
        bound = (
            kl_bound(
                model, data["prompts"] if stage != "dpo" else [r["prompt"] for r in data["pairs"]], tokens, a.device
            )
            if stage != "sft"
            else None
        )
        final, rows, rate = run_tether(stage, a, model, data, out)
        bad = nonfinite(rows)
        if not rows:
            bad = ["no metrics logged"]
        failures += [f"{stage}: {b}" for b in bad]
        kl0 = None
        if stage != "sft":
            key = "kl/ref" if stage == "dpo" else "eval/kl"
            first = [r for r in rows if key in r]
            if not first:
                failures.append(f"{stage}: no {key} logged")
            else:
                kl0 = first[0][key]
                if first[0].get("step") != 0 or not abs(kl0) <= bound:
                    failures.append(f"{stage}: {key} at step {first[0].get('step')} = {kl0:.3g}, bound {bound:.3g}")
        speed[stage] = rate
        note = "" if kl0 is None else f", KL at step 0 = {kl0:.3g} (bound {bound:.2g})"
        print(
            f"  {stage}: {len(rows)} metric rows, all finite: {not bad}{note}, {time.perf_counter() - t0:.0f} s"
            + (f", {rate:,.0f} tokens/s" if rate == rate else "")
        )
        model = final
    if a.no_trl:
        print("TRL: skipped (--no_trl)")
    else:
        try:
            import trl
        except ImportError as e:
            print(f"TRL: skipped, trl is not importable here ({e})")
        else:
            init = str(work / "init")
            for stage in ("dpo", "grpo"):
                try:
                    rate = run_trl(stage, a, init, data, str(work / f"trl-{stage}"), a.device)
                except Exception as e:  # a TRL version mismatch is reported, not fatal: tether's checks stand
                    print(f"  TRL {stage}: failed ({type(e).__name__}: {str(e)[:200]})")
                    continue
                print(
                    f"  {stage} tokens/s: tether {speed[stage]:,.0f}, TRL {trl.__version__} {rate:,.0f} "
                    f"({speed[stage] / rate:.2f}x)"
                )
    total = time.perf_counter() - t_start
    if failures:
        print("gpu-check FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"gpu-check passed on {card} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
