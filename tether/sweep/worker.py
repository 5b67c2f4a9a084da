"""One sweep run in its own process: ``python -m tether.sweep.worker RUN_DIR/spec.json``.

Trains with the run's config (the method's train function in ``tether.registry``), its
``eval_hook`` replacing the built-in evaluation with the sweep's protocol (``evaluate_point``) at step
0, every ``eval.eval_every`` steps and at the end; or samples best-of-n from the reference. Writes
``eval.jsonl`` (one row per evaluation point) and, last, ``result.json``: its presence marks the run
finished, so the sweep never redoes it. An interrupted run (checkpoints in ``train/``) continues with
the trainer's resume; its evaluation rows are keyed by step, so a repeated step replaces the old row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class Evaluator:
    """The sweep's one evaluation protocol: ``engine.evaluate`` of a policy on the held-out prompts at
    ``engine.eval_seed(eval.seed)`` (the same samples' noise for every run and step), the exact
    sequence KL with its standard error, and the mean ± standard error of each reward on the same
    samples."""

    def __init__(self, ev: dict, *, reference, tokenizer, gold, proxy, others: dict, assets=None):
        from ..data.prompts import load_prompts
        from ..measure import encode_prompts

        prompts = load_prompts(ev["prompts"], tokenizer=tokenizer, prompt_field=ev["prompt_field"], assets=assets)
        self.prompts = prompts[: ev["max_prompts"]]
        self.texts = [p.text for p in self.prompts]
        self.ids = encode_prompts(tokenizer, self.texts)
        self.ev, self.reference, self.tok = ev, reference, tokenizer
        self.gold, self.proxy, self.others = gold, proxy, others

    def __call__(self, policy) -> dict:
        import torch

        from ..engine import evaluate, mean_stderr

        s = self.ev["samples_per_prompt"]
        res = evaluate(
            policy,
            self.reference,
            self.ids,
            tokenizer=self.tok,
            seed=self.ev["seed"],
            samples_per_prompt=s,
            max_new_tokens=self.ev["max_new_tokens"],
        )
        flat = [t for t in self.texts for _ in range(s)]  # the engine's order: prompt-major
        kl = torch.tensor(res["per_sequence"]["exact"])  # one exact sequence KL per sample, prompt-major
        m, se = mean_stderr(kl, per_prompt=s)  # over prompts, like the rewards (score)
        return self.score(flat, res["texts"], kl={"mean": m, "stderr": se})

    def score(self, prompts: list, completions: list, *, kl: dict) -> dict:
        """Rewards of the evaluation's completions (prompt-major, ``samples_per_prompt`` each). Standard
        errors are over prompts (``engine.mean_stderr(per_prompt=)``), as in the demo: one prompt's samples
        share it and are correlated, so counting them as independent would understate the error."""
        from ..engine import mean_stderr

        out = {"kl": kl["mean"], "kl_stderr": kl["stderr"]}
        scores = {}
        for key, src in (("gold", self.gold), ("proxy", self.proxy), *self.others.items()):
            if src is None:
                continue
            sc = src(prompts, completions).float()
            scores[key] = sc.tolist()
            m, se = mean_stderr(sc, per_prompt=self.ev["samples_per_prompt"])
            col = key if key in ("gold", "proxy") else f"reward_{key}"
            out[f"{col}_reward" if key in ("gold", "proxy") else col] = m
            out[f"{col}_stderr"] = se
        out["samples"] = [
            {"prompt": p, "completion": c, **{k: v[i] for k, v in scores.items()}}
            for i, (p, c) in enumerate(zip(prompts, completions))
        ][:8]
        return out


def main(spec_path: str) -> int:
    import torch

    torch.set_num_threads(int(os.environ.get("TETHER_THREADS", "1")))
    from ..assets import resolve_model
    from ..config import from_dict
    from ..modeling import load_causal_lm, load_tokenizer
    from ..reference import FrozenReference
    from ..registry import METHODS
    from ..rewards import build_reward
    from ..runs import latest_checkpoint_step, write_atomic
    from .spec import trainer_class

    blob = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec_path).parent
    method, ev, name = blob["method"], blob["eval"], blob["run"]
    cfg = from_dict(trainer_class(method), blob["config"], source=f"sweep run {name}")
    ref_path = getattr(cfg, "reference_model", None) or cfg.model
    ref_path = str(resolve_model(ref_path, cfg.assets))
    tok = load_tokenizer(str(resolve_model(cfg.model, cfg.assets)))
    reference = FrozenReference(load_causal_lm(ref_path))
    optimised = getattr(cfg, "reward", None)  # None: the method optimises no reward (DPO)
    proxy_spec = ev.get("proxy") or optimised
    gold = build_reward(ev["gold"], assets=cfg.assets) if ev.get("gold") else None
    proxy = build_reward(proxy_spec, assets=cfg.assets) if proxy_spec else None
    others = {k: build_reward(v, assets=cfg.assets) for k, v in (ev.get("rewards") or {}).items()}
    evaluator = Evaluator(
        ev, reference=reference, tokenizer=tok, gold=gold, proxy=proxy, others=others, assets=cfg.assets
    )
    eval_file = run_dir / "eval.jsonl"
    tags = {
        "method": blob["tag_method"],
        "run": name,
        "seed": getattr(cfg, "seed", 0),
        **blob["overrides"],
        "swept": list(blob["overrides"]),
    }
    if "beta" in blob["overrides"]:
        tags["beta_set"] = blob["overrides"]["beta"]  # the hook's beta is the controller's current value

    def write(row: dict) -> None:
        with open(eval_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def hook(step: int, policy, *, beta: float) -> dict:  # the eval_hook of train_dpo and train_online alike
        pt = evaluator(policy)
        write({**tags, "step": step, "beta": beta, **pt})
        out = {"eval/kl": pt["kl"], "eval/kl_stderr": pt["kl_stderr"]}
        for key in ("gold", "proxy"):
            if f"{key}_reward" in pt:
                out[f"eval/reward/{key}"] = pt[f"{key}_reward"]
                if pt.get(f"{key}_stderr") is not None:  # the hacking monitor's noise gate
                    out[f"eval/reward/{key}_stderr"] = pt[f"{key}_stderr"]
        return out

    train_dir = run_dir / "train"
    # a complete checkpoint: a step-N.tmp left by a kill is none (it would resume nothing, keeping old rows)
    resume = latest_checkpoint_step(train_dir) is not None
    common = {"output_dir": str(train_dir), "eval_every": ev["eval_every"], "progress": False, "overwrite": not resume}
    if blob.get("role") == "reference":
        write({**tags, "step": 0, **evaluator(reference.model)})
    elif METHODS[method].train is None:  # best-of-n: sampled from the reference, not trained
        from ..engine import eval_seed
        from ..groups import SamplingSettings
        from ..trainers.best_of_n import best_of_n

        s = ev["samples_per_prompt"]
        texts = [t for t in evaluator.texts for _ in range(s)]
        ids = [i for i in evaluator.ids for _ in range(s)]
        res = best_of_n(
            reference.model,
            tok,
            texts,
            prompt_ids=ids,
            n=cfg.n[0],
            reward=proxy,
            kl_samples=cfg.kl_samples,
            sampling=SamplingSettings(max_new_tokens=ev["max_new_tokens"]),
            seed=eval_seed(ev["seed"]),
        )
        pt = evaluator.score(texts, res["completions"], kl={"mean": res["kl"], "stderr": res["kl_stderr"]})
        write({**tags, "step": 0, "n": cfg.n[0], "kl_bound": res["kl_bound"], **pt})
    else:
        import dataclasses

        train = METHODS[method].load("train")
        if not cfg.save_every:
            common["save_every"] = ev["eval_every"]  # an interrupted run resumes from its last evaluation
        cfg = dataclasses.replace(cfg, **common)
        if not resume:
            eval_file.write_text("")
        train(cfg, resume=resume, eval_hook=hook, preflight=False)  # the sweep checked every run before starting
    rows = [json.loads(l) for l in eval_file.read_text().splitlines() if l.strip()]
    write_atomic(
        run_dir / "result.json", json.dumps({k: v for k, v in rows[-1].items() if k != "samples"})
    )  # whole or absent
    return 0


if __name__ == "__main__":
    from ..preempt import run_main

    sys.exit(run_main(main, sys.argv[1]))  # stopped by a signal: checkpoint written, exit 75
