"""One demo run in its own process: ``python -m tether.demo.worker RUN_DIR/spec.json``.

Trains (DPO, PPO on the proxy RM, PPO-GT on the gold reward) from the SFT reference, evaluating
with ``task.evaluate_policy`` at step 0, every ``eval_every`` steps and at the end; writes
``eval.jsonl`` (one row per evaluation point) and, last, ``result.json`` (its presence marks the run
finished, so a resumed demo skips it). A run stopped by a signal (tether.preempt) writes a checkpoint
and exits 75; the rerun continues from it, keeping the evaluation rows up to its step (without a
checkpoint it starts over). Best-of-n runs in the pipeline (``pipeline.stage_best_of_n``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    import torch

    t0 = time.time()
    torch.set_num_threads(int(os.environ.get("TETHER_THREADS", "1")))
    from ..modeling import load_causal_lm, load_tokenizer
    from ..reference import FrozenReference
    from ..rewards import RewardModelSource, VaderSource
    from ..runs import latest_checkpoint_step, write_atomic
    from ..sweep.runner import read_points
    from .pipeline import DemoConfig, dpo_lr_for
    from .task import evaluate_policy, read_prompt_file

    blob = json.loads(Path(spec_path).read_text())
    spec, cfg, work = blob["spec"], DemoConfig(**blob["demo"]), Path(blob["work"])
    run_dir = Path(spec_path).parent
    ref_path = str(work / spec.get("reference", "sft") / "final")  # a weaker reference: "sft_weak"
    tok = load_tokenizer(ref_path)
    reference = FrozenReference(load_causal_lm(ref_path))
    gold, proxy = VaderSource(), RewardModelSource(str(work / spec.get("proxy", "rm") / "final"))
    gold.name, proxy.name = "gold", "proxy"
    eval_prompts = read_prompt_file(work / "eval_prompts.jsonl")
    train_prompts = read_prompt_file(work / "pref_prompts.jsonl")
    eval_file = run_dir / "eval.jsonl"
    resumed = latest_checkpoint_step(run_dir / "train")  # a run stopped by a signal continues from its checkpoint
    kept = [
        ln
        for ln in (eval_file.read_text().splitlines() if resumed and eval_file.exists() else [])
        if ln.strip() and json.loads(ln)["step"] <= resumed
    ]  # its curve up to the checkpoint
    write_atomic(eval_file, "".join(ln + "\n" for ln in kept))  # otherwise a rerun starts its curve again
    seed = int(spec.get("seed", cfg.seed))  # the training seed; every run is evaluated at cfg.seed's draw
    tags = {k: spec[k] for k in ("beta", "kl_target", "n") if k in spec}
    tags = {"seed": seed, **tags, "swept": list(tags), **({"beta_set": spec["beta"]} if "beta" in spec else {})}
    tags.update({k: spec[k] for k in ("group", "task", "reference", "proxy") if k in spec})

    def record(step: int, policy, extra: dict | None = None) -> dict:
        ev = evaluate_policy(
            policy,
            reference,
            tok,
            eval_prompts,
            gold=gold,
            proxy=proxy,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            samples_per_prompt=cfg.eval_samples,
        )
        row = {"method": spec["method"], "run": spec["run"], "step": step, **tags, **(extra or {}), **ev}
        with open(eval_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        return {
            "eval/kl": ev["kl"],
            "eval/kl_stderr": ev["kl_stderr"],
            "eval/reward/gold": ev["gold_reward"],
            "eval/reward/gold_stderr": ev["gold_stderr"],
            "eval/reward/proxy": ev["proxy_reward"],
            "eval/reward/proxy_stderr": ev["proxy_stderr"],
        }  # with their standard errors: the hacking monitor fires only on a fall beyond the noise

    def hook(step: int, policy, *, beta: float) -> dict:  # the eval_hook of train_dpo and train_online alike
        return record(step, policy, {"beta": beta})

    method = spec["method"]
    if method == "dpo":
        from ..trainers.dpo import DPOConfig, train_dpo

        dcfg = DPOConfig(
            model=ref_path,
            dataset=str(work / "prefs.jsonl"),
            output_dir=str(run_dir / "train"),
            seed=seed,
            beta=spec["beta"],
            loss_type="sigmoid",
            max_steps=cfg.dpo_steps,
            batch_size=cfg.batch_size,
            learning_rate=dpo_lr_for(cfg, spec["beta"]),
            eval_every=cfg.eval_every,
            kl_prompts=0,
            progress=False,
            max_length=96,
            overwrite=resumed is None,
        )  # no checkpoint: an unfinished run starts over
        train_dpo(dcfg, eval_hook=hook, resume=resumed is not None)
    elif method in ("ppo", "ppo_gt"):
        from ..rewards import RewardSet
        from ..trainers.ppo import PPOConfig, train_ppo

        # PPO-GT optimises the gold itself: the proxy is not logged as a second reward there (the evaluation
        # measures it), so the hacking monitor, which watches a gold fall while the optimised proxy rises, is
        # not set on a run that has no proxy to exploit
        optimised, logged = (proxy, [gold]) if method == "ppo" else (gold, [])
        fixed = spec.get("kl_target") is None  # the β ladder: a fixed β (0 = no penalty)
        pcfg = PPOConfig(
            model=ref_path,
            output_dir=str(run_dir / "train"),
            seed=seed,
            beta=spec["beta"] if fixed else spec.get("init_beta", 0.1),
            kl_target=None if fixed else spec["kl_target"],
            kl_horizon=cfg.ppo_kl_horizon or 2 * cfg.batch_size,
            max_steps=int(spec.get("steps", cfg.ppo_steps)),
            batch_size=cfg.batch_size,
            learning_rate=cfg.ppo_lr,
            max_new_tokens=cfg.max_new_tokens,
            eval_every=cfg.eval_every,
            progress=False,
            overwrite=resumed is None,
        )
        train_ppo(
            pcfg,
            prompts=[p.text for p in train_prompts],
            reward=RewardSet(optimised, logged),
            eval_hook=hook,
            resume=resumed is not None,
        )
    else:  # best-of-n runs in the pipeline (pipeline.stage_best_of_n: one draw for every n)
        raise ValueError(f"unknown demo method {method!r}")
    rows = read_points(run_dir)  # one row per step: a run resumed at its last step evaluates that step again
    write_atomic(eval_file, "".join(json.dumps(r) + "\n" for r in rows))  # a kill leaves the old file or the new
    result = {
        **{k: v for k, v in rows[-1].items() if k != "samples"},
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(time.process_time(), 1),
    }  # on a shared machine the CPU time is the steadier cost
    write_atomic(run_dir / "result.json", json.dumps(result))
    return 0


if __name__ == "__main__":
    from ..preempt import run_main

    sys.exit(run_main(main, sys.argv[1]))  # stopped by a signal: checkpoint written, exit 75
