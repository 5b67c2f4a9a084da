"""``tether demo``: the reward–KL frontier on a real tiny model, end to end, offline.

Stages (each leaves a marker under ``OUT/work`` so an interrupted demo resumes where it stopped, and a
finished run is never redone):

1. SFT the starting model (stories260K) on movie-review snippets -> the reference π_ref.
2. Prompts: 2–8-token prefixes of disjoint snippet sets (preference prompts, held-out eval prompts).
3. Preference pairs: ``samples_per_prompt`` reference samples per prompt ranked by the gold reward.
4. Proxy reward model trained on those pairs (``tether rm``'s trainer).
5. The sweep: the reference's evaluation point; best-of-n for several n, all from one draw of
   reference samples (``stage_best_of_n``); then, in parallel worker processes, DPO at several β, PPO
   against the proxy RM at several adaptive KL targets (each starting at ``initial_betas``), PPO
   against the gold reward (PPO-GT). Every run is evaluated with the same protocol
   (``task.evaluate_policy``: same held-out prompts, ``eval_samples`` samples each, same sampling
   seed) every ``eval_every`` steps.
6. The report (``report.write_report``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

METHODS = ("dpo", "ppo", "ppo_gt", "best_of_n", "ladder", "small_proxy", "weak_reference")
"""dpo, ppo (the proxy, adaptive KL targets), ppo_gt (the gold, adaptive), best_of_n: the frontier. ladder: PPO
against the proxy at fixed β, β = 0 included (reward hacking, the β table, forgetting and KL noise). small_proxy:
the same ladder against a proxy learned from fewer pairs (the second task). weak_reference: PPO-GT from a weaker
SFT reference (the reference's ceiling)."""


@dataclass
class DemoConfig:
    """Settings of the demo. ``--quick`` and ``--full`` fill these from ``PRESETS``."""

    output_dir: str = "outputs/demo"
    """Where the report and every run go."""
    assets: Optional[str] = None
    """Assets folder (default: $TETHER_ASSETS, else download)."""
    model: str = "stories260K"
    """Starting model: any Hugging Face causal LM folder or hub name (the SFT makes the reference from it)."""
    seed: int = 0
    """Seed of data splits, sampling and training."""
    methods: list = field(default_factory=lambda: list(METHODS))
    """Which parts to run: dpo, ppo, ppo_gt, best_of_n (the frontier), ladder, small_proxy, weak_reference."""
    dpo_betas: list = field(default_factory=lambda: [0.05, 0.2, 1.0])
    """DPO β values (DPO paper: 0.05, 0.1, 1, 5)."""
    ppo_kl_targets: list = field(default_factory=lambda: [3.0, 8.0])
    """PPO (proxy reward) adaptive KL targets, nats per completion (DPO paper: 3, 6, 9, 12)."""
    ppo_gt_kl_targets: list = field(default_factory=lambda: [6.0])
    """PPO-GT (gold reward) adaptive KL targets (from the SFT reference, and from the weak one)."""
    ppo_seeds: list = field(default_factory=lambda: [0, 1])
    """Training seeds of every PPO-on-proxy KL target (PPO against a learned proxy varies between runs; the
    report draws the spread). Every run is evaluated at ``seed``'s draw."""
    ppo_seeds_at: Optional[list] = field(default_factory=lambda: [8.0])
    """The KL targets run at every seed of ``ppo_seeds``; the others at ``seed`` only. None: every target. The
    quick preset seeds only its larger target, where the runs differ most (its 10-minute budget)."""
    ladder_betas: list = field(default_factory=lambda: [0.0, 0.01, 0.05, 0.3, 2.0])
    """The β ladder: PPO against the proxy at these fixed β (0: no penalty), one per row of the practitioners'
    rule of thumb (0–0.01 near-unconstrained, 0.02–0.1 standard, 0.2–0.5 conservative, > 1 barely moves)."""
    ladder_steps: int = 120
    """PPO steps of every ladder run (the unpenalised run's gold peaks and falls within them)."""
    hack_seeds: list = field(default_factory=lambda: [1])
    """Further training seeds of the ladder's smallest β (the hacking run), beside ``seed``."""
    small_proxy_fraction: float = 0.25
    """The second task's proxy: a reward model trained on the pairs of this fraction of the preference prompts
    (Gao et al. 2022: a proxy learned from fewer labels is overoptimised sooner)."""
    small_proxy_betas: list = field(default_factory=lambda: [0.05, 0.3, 2.0])
    """The ladder's β values for the second task (its β = 0 run would only repeat the first task's: without a
    penalty every learned proxy is exploited)."""
    weak_sft_steps: int = 10
    """SFT steps of the weak reference (the reference's ceiling: the same PPO-GT runs from it)."""
    diagnostics: bool = True
    """Forgetting (off-distribution NLL, forward KL) and KL noise (per position, standard error by length) of
    the ladder's final policies."""
    bon_ns: list = field(default_factory=lambda: [2, 4, 8, 16])
    """Best-of-n sample counts (selection by the proxy reward model)."""
    n_sft: int = 4000
    """Snippets for SFT."""
    sft_steps: int = 150
    """SFT optimiser steps."""
    n_pref_prompts: int = 300
    """Prompts whose reference samples become preference pairs."""
    samples_per_prompt: int = 4
    """Reference samples per preference prompt (4 -> up to 6 pairs, as in the DPO paper)."""
    rm_steps: int = 120
    """Reward-model optimiser steps."""
    n_eval_prompts: int = 256
    """Held-out prompts per evaluation point."""
    eval_samples: int = 2
    """Samples per held-out prompt at every evaluation point (best-of-n: selections per prompt). The
    standard errors are over prompts (a prompt's samples are correlated), so for the same number of rows
    more prompts shrink them more than more samples do; more samples average out the sampling noise
    within each prompt."""
    max_new_tokens: int = 24
    """Completion length for every sample (preference data, training, evaluation)."""
    dpo_steps: int = 60
    """DPO optimiser steps per run."""
    ppo_steps: int = 80
    """PPO optimiser steps per run."""
    eval_every: int = 20
    """Evaluate every N optimiser steps (and at steps 0 and the end)."""
    batch_size: int = 32
    """Examples (DPO pairs, PPO rollouts) per optimiser step."""
    dpo_lr: float = 5e-4
    """DPO learning rate (for β ≤ 1; see ``dpo_lr_over_beta``)."""
    dpo_lr_over_beta: bool = False
    """Divide the learning rate by β where β > 1 (``dpo_lr_for``). Adam's step moves the sequence log-ratios by
    about the same amount whatever β is, and the loss sees β times that move: at β = 5 and the full preset's
    1.5e-4 the training loss rose from ln 2 to 1-3 within ten steps and ended at 1.05 (a failed run), while
    β ≤ 1 trained smoothly."""
    ppo_init_beta: Optional[float] = None
    """PPO's starting β (both PPO kinds). None: per run, β₀ = sqrt(Var/(2·target)), Var the within-prompt
    variance of the optimised reward among the reference's evaluation samples (``control.initial_beta_for_kl``;
    where the tilted optimum's KL would be the target at small KL), so the controller starts near its
    β instead of spending the run climbing to it."""
    ppo_lr: float = 1.5e-4
    """PPO learning rate (at 3e-4 the policy drifted ~4 nats from the reference within 20 steps whatever
    β was: a target of 3 was out of reach)."""
    ppo_kl_horizon: int = 320
    """The adaptive controller's horizon in episodes (docs/theory.md §4: a saturated step moves β by the
    factor 1 ± 0.2·batch_size/horizon). 320 at batch 32: at most 2% a step, e^1.6 over 80 steps. A run
    started at ``ppo_init_beta``'s β₀ needs only that much; at 10% a step (horizon 64) β fell ~10x while
    the policy had not yet moved and the KL then overshot its target and came back (zigzag). 0: 2 x
    batch_size."""
    workers: int = 0
    """Parallel run processes (0 = one per 2 cores... at least 1, at most the number of runs)."""

    def runs(self) -> list[dict]:
        """Every trained run's spec: method, run (its folder name), the swept value, and where it differs from
        the frontier's runs: seed, steps, fixed beta, proxy ("rm_small"), reference ("sft_weak"), group."""
        m, specs = self.methods, []

        def seeded(name: str, seed: int) -> str:
            return name if seed == self.seed else f"{name}-seed{seed}"

        if "dpo" in m:
            specs += [{"method": "dpo", "run": f"dpo-beta{b:g}", "beta": float(b)} for b in self.dpo_betas]
        if "ppo" in m:
            specs += [
                {"method": "ppo", "run": seeded(f"ppo-kl{t:g}", s), "kl_target": float(t), "seed": int(s)}
                for t in self.ppo_kl_targets
                for s in (
                    (self.ppo_seeds or [self.seed])
                    if self.ppo_seeds_at is None or float(t) in map(float, self.ppo_seeds_at)
                    else [self.seed]
                )
            ]
        if "ppo_gt" in m:
            specs += [
                {"method": "ppo_gt", "run": f"ppo_gt-kl{t:g}", "kl_target": float(t)} for t in self.ppo_gt_kl_targets
            ]
        if "best_of_n" in m:
            specs += [{"method": "best_of_n", "run": f"bon-n{n}", "n": int(n)} for n in self.bon_ns]
        ladder = {"method": "ppo", "steps": self.ladder_steps}
        if "ladder" in m:
            for b in self.ladder_betas:
                seeds = [self.seed] + ([int(s) for s in self.hack_seeds] if b == min(self.ladder_betas) else [])
                specs += [
                    {**ladder, "run": seeded(f"ladder-beta{b:g}", s), "beta": float(b), "seed": s, "group": "ladder"}
                    for s in dict.fromkeys(seeds)
                ]
        if "small_proxy" in m:
            specs += [
                {
                    **ladder,
                    "run": f"ladder_small-beta{b:g}",
                    "beta": float(b),
                    "proxy": "rm_small",
                    "group": "ladder_small",
                }
                for b in self.small_proxy_betas
            ]
        if "weak_reference" in m:
            specs += [
                {
                    "method": "ppo_gt",
                    "run": f"ppo_gt-kl{t:g}-weakref",
                    "kl_target": float(t),
                    "reference": "sft_weak",
                    "group": "weak_reference",
                }
                for t in self.ppo_gt_kl_targets
            ]
        return specs


PRESETS = {
    "quick": {},
    "full": {
        "dpo_betas": [0.05, 0.1, 0.5, 1.0, 5.0],
        "ppo_kl_targets": [3.0, 6.0, 9.0, 12.0],
        "ppo_gt_kl_targets": [3.0, 6.0, 9.0],
        "bon_ns": [2, 4, 8, 16, 32, 64],
        "n_sft": 8000,
        "sft_steps": 400,
        "n_pref_prompts": 1000,
        "rm_steps": 300,
        "dpo_steps": 200,
        "dpo_lr": 1.5e-4,  # at 5e-4 for 200 steps, β = 0.5, 1 and 5 all ended near 12 nats and β = 5's loss above ln 2
        "dpo_lr_over_beta": True,
        "ppo_steps": 120,
        "eval_every": 20,
        "max_new_tokens": 32,
        "ppo_kl_horizon": 480,
        "ppo_seeds": [0, 1, 2],
        "ppo_seeds_at": None,
        "hack_seeds": [1, 2],
        "ladder_steps": 160,
    },
    # A miniature for the test suite: every stage runs, a few steps each.
    "tiny": {
        "dpo_betas": [0.1, 1.0],
        "ppo_kl_targets": [4.0],
        "ppo_gt_kl_targets": [4.0],
        "bon_ns": [2, 4],
        "n_sft": 200,
        "sft_steps": 4,
        "n_pref_prompts": 24,
        "rm_steps": 4,
        "n_eval_prompts": 8,
        "dpo_steps": 4,
        "ppo_steps": 2,
        "eval_every": 2,
        "max_new_tokens": 8,
        "batch_size": 8,
        "ppo_seeds": [0],
        "ppo_seeds_at": None,
        "ladder_betas": [0.0, 1.0],
        "ladder_steps": 2,
        "hack_seeds": [],
        "small_proxy_betas": [0.1],
        "small_proxy_fraction": 1.0,  # 24 prompts' pairs: a quarter is less than one batch
        "weak_sft_steps": 2,
        "ppo_init_beta": 0.1,  # 8 prompts x 2 samples of a 2-step SFT can all score 0: no spread to start from
    },
}


class Paths:
    def __init__(self, out: Path):
        self.out = out
        self.work = out / "work"
        self.sft = self.work / "sft"
        self.rm = self.work / "rm"
        self.runs = self.work / "runs"

    @property
    def reference(self) -> Path:
        return self.sft / "final"

    def model(self, name: str) -> Path:
        """A stage's final model by its folder name: "sft", "sft_weak", "rm", "rm_small"."""
        return self.work / name / "final"

    @property
    def proxy(self) -> Path:
        return self.rm / "final"


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside: the stages train and sample a 260K-parameter model, where a second
    intra-op thread only adds synchronisation (measured on 2 busy cores: best-of-n's 1024 samples took
    3.4 s of CPU on one thread, 122 s on two; 15 SFT steps 8.9 s and 36 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _done(marker: Path) -> bool:
    return marker.exists()


def _mark(marker: Path, data: dict) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, marker)


def stage_sft(cfg: DemoConfig, paths: Paths, splits: dict, *, name: str = "sft", steps: Optional[int] = None) -> None:
    """SFT of the starting model on the snippets -> ``work/<name>/final``: the reference ("sft", ``sft_steps``)
    or the weak reference ("sft_weak", ``weak_sft_steps``: the same data and schedule, far fewer steps)."""
    marker = paths.work / f"{name}.done"
    if _done(marker):
        return
    from ..trainers.sft import SFTConfig, train_sft

    (paths.work / name).mkdir(parents=True, exist_ok=True)
    data = paths.work / "sft_snippets.txt"
    data.write_text("\n".join(splits["sft"]) + "\n")
    steps = cfg.sft_steps if steps is None else steps
    scfg = SFTConfig(
        model=cfg.model,
        assets=cfg.assets,
        dataset=str(data),
        output_dir=str(paths.work / name),
        seed=cfg.seed,
        max_steps=steps,
        batch_size=cfg.batch_size,
        learning_rate=3e-3,
        warmup_steps=min(10, max(steps // 2, 1)),
        lr_schedule="cosine",
        max_length=48,
        completion_only_loss=False,
        eval_examples=min(200, len(splits["sft"]) // 10),
        eval_every=0,
        save_every=0,
        overwrite=True,
    )  # no marker: an unfinished stage starts over
    out = train_sft(scfg)
    _mark(marker, {k: v for k, v in out.summary(("loss",)).items() if isinstance(v, (int, float, str))})


def stage_prompts(cfg: DemoConfig, paths: Paths, splits: dict):
    from ..modeling import load_tokenizer
    from .task import make_prompts, read_prompt_file, write_prompts

    pref_file, eval_file = paths.work / "pref_prompts.jsonl", paths.work / "eval_prompts.jsonl"
    if not (pref_file.exists() and eval_file.exists()):
        tok = load_tokenizer(str(paths.reference))
        write_prompts(pref_file, make_prompts(tok, splits["pref"], seed=cfg.seed + 1))
        write_prompts(eval_file, make_prompts(tok, splits["eval"], seed=cfg.seed + 2))
    return read_prompt_file(pref_file), read_prompt_file(eval_file)


def stage_prefs(cfg: DemoConfig, paths: Paths, pref_prompts) -> list[dict]:
    prefs = paths.work / "prefs.jsonl"
    if not prefs.exists():
        from ..modeling import load_causal_lm, load_tokenizer
        from ..rewards import VaderSource
        from .task import preference_pairs

        tok, ref = load_tokenizer(str(paths.reference)), load_causal_lm(str(paths.reference))
        rows = preference_pairs(
            ref,
            tok,
            pref_prompts,
            VaderSource(),
            samples_per_prompt=cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed + 3,
        )
        tmp = prefs.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, prefs)
    return [json.loads(l) for l in prefs.read_text().splitlines() if l.strip()]


def stage_rm(cfg: DemoConfig, paths: Paths, *, name: str = "rm", prompt_fraction: float = 1.0) -> dict:
    """The proxy reward model on the preference pairs -> ``work/<name>/final``. ``prompt_fraction`` < 1 (the
    second task's "rm_small"): only the pairs of the first fraction of the preference prompts, the same steps."""
    marker = paths.work / f"{name}.done"
    if not _done(marker):
        from ..trainers.reward_model import RMConfig, train_reward_model

        data = paths.work / "prefs.jsonl"
        if prompt_fraction < 1.0:
            rows = [json.loads(ln) for ln in data.read_text().splitlines() if ln.strip()]
            prompts = list(dict.fromkeys(r["prompt"] for r in rows))
            keep = set(prompts[: max(1, round(prompt_fraction * len(prompts)))])
            data = paths.work / f"prefs_{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt"] in keep))
        rcfg = RMConfig(
            model=str(paths.reference),
            dataset=str(data),
            output_dir=str(paths.work / name),
            seed=cfg.seed,
            max_steps=cfg.rm_steps,
            batch_size=cfg.batch_size,
            learning_rate=1e-3,
            eval_fraction=0.1,
            max_length=64,
            eval_every=0,
            save_every=0,
            overwrite=True,
        )
        out = train_reward_model(rcfg)
        pairs = sum(1 for ln in data.read_text().splitlines() if ln.strip())
        summary = {k: v for k, v in out.summary(("loss", "rm/accuracy")).items() if isinstance(v, (int, float, str))}
        _mark(marker, {**summary, "pairs": pairs})
    return json.loads(marker.read_text())


def stage_best_of_n(cfg: DemoConfig, paths: Paths, specs: list[dict], eval_prompts) -> None:
    """The best-of-n runs, all from one draw of max(bon_ns) reference samples per evaluation row
    (``task.best_of_n_points``): each writes ``runs/bon-n<n>/eval.jsonl`` and ``result.json`` as a
    worker would. Skipped when every one has its result.json."""
    todo = [s for s in specs if s["method"] == "best_of_n" and not (paths.runs / s["run"] / "result.json").exists()]
    if not todo:
        return
    from ..modeling import load_causal_lm, load_tokenizer
    from ..rewards import RewardModelSource, VaderSource
    from ..runs import write_atomic
    from .task import best_of_n_points

    t0, c0 = time.time(), time.process_time()
    gold, proxy = VaderSource(), RewardModelSource(str(paths.proxy))
    gold.name, proxy.name = "gold", "proxy"
    points = best_of_n_points(
        load_causal_lm(str(paths.reference)),
        load_tokenizer(str(paths.reference)),
        eval_prompts,
        [s["n"] for s in todo],
        gold=gold,
        proxy=proxy,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        samples_per_prompt=cfg.eval_samples,
    )
    for spec in todo:
        run_dir = paths.runs / spec["run"]
        run_dir.mkdir(parents=True, exist_ok=True)
        row = {
            "method": "best_of_n",
            "run": spec["run"],
            "step": 0,
            "seed": cfg.seed,
            "n": spec["n"],
            "swept": ["n"],
            **points[spec["n"]],
        }
        write_atomic(run_dir / "eval.jsonl", json.dumps(row) + "\n")
        result = {k: v for k, v in row.items() if k != "samples"}
        write_atomic(
            run_dir / "result.json",
            json.dumps({**result, "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}),
        )  # whole or absent: a kill never leaves a half result taken for a finished run


def run_all(cfg: DemoConfig, specs: list[dict], paths: Paths, *, workers: int) -> None:
    """Each trained run in its own process (``python -m tether.demo.worker``), through the sweep's process
    pool (``tether.sweep.runner.launch_all``); finished runs (result.json) are skipped."""
    from ..sweep.runner import launch_all

    jobs = []
    for spec in specs:
        if spec["method"] == "best_of_n":  # stage_best_of_n
            continue
        run_dir = paths.runs / spec["run"]
        if (run_dir / "result.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_file = run_dir / "spec.json"
        spec_file.write_text(json.dumps({"spec": spec, "demo": asdict(cfg), "work": str(paths.work)}))
        jobs.append((spec["run"], spec_file))
    launch_all(jobs, module="tether.demo.worker", workers=workers, desc="demo sweep")


def reference_row(cfg: DemoConfig, paths: Paths, eval_prompts, reference: str = "sft") -> dict:
    """The reference's evaluation point (KL = 0), and beside it ``reward_spread.json``: the within-prompt
    variance of the gold and proxy rewards among its evaluation samples (``initial_betas`` uses it).
    ``reference="sft_weak"``: the weak reference's (``reference_eval_sft_weak.json``,
    ``reward_spread_sft_weak.json``)."""
    tail = "" if reference == "sft" else f"_{reference}"
    marker, spread = paths.work / f"reference_eval{tail}.json", paths.work / f"reward_spread{tail}.json"
    if not (marker.exists() and spread.exists()):
        from ..modeling import load_causal_lm, load_tokenizer
        from ..reference import FrozenReference
        from ..rewards import RewardModelSource, VaderSource
        from .task import evaluate_policy, within_prompt_variance

        where = str(paths.model(reference))
        tok, ref = load_tokenizer(where), load_causal_lm(where)
        ev = evaluate_policy(
            ref,
            FrozenReference(load_causal_lm(where)),
            tok,
            eval_prompts,
            gold=VaderSource(),
            proxy=RewardModelSource(str(paths.proxy)),
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            samples_per_prompt=cfg.eval_samples,
            return_scores=True,
        )
        scores = ev.pop("scores")
        _mark(
            spread,
            {
                "samples_per_prompt": cfg.eval_samples,
                **{name: within_prompt_variance(v, cfg.eval_samples) for name, v in scores.items()},
            },
        )
        run = "reference" if reference == "sft" else f"reference-{reference}"
        _mark(marker, {"method": "reference", "run": run, "reference": reference, "seed": cfg.seed, "step": 0, **ev})
    return json.loads(marker.read_text())


def initial_betas(cfg: DemoConfig, specs: list[dict], spreads: dict[str, dict]) -> list[dict]:
    """Each adaptive PPO run's starting β (``init_beta`` in its spec): ``cfg.ppo_init_beta`` if set, else
    ``control.initial_beta_for_kl`` of its KL target and the within-prompt variance, under its reference
    (``spreads[reference]``), of the reward it optimises (the proxy for PPO, the gold reward for PPO-GT).
    The ladder's runs have a fixed β."""
    from ..control import initial_beta_for_kl

    out = []
    for spec in specs:
        if spec["method"] in ("ppo", "ppo_gt") and spec.get("kl_target") is not None:
            var = spreads[spec.get("reference", "sft")]["proxy" if spec["method"] == "ppo" else "gold"]
            beta = cfg.ppo_init_beta if cfg.ppo_init_beta is not None else initial_beta_for_kl(var, spec["kl_target"])
            spec = {**spec, "init_beta": beta}
        out.append(spec)
    return out


def stage_diagnostics(cfg: DemoConfig, paths: Paths, specs: list[dict], eval_prompts) -> dict:
    """Part 5 of the report, on the final policies of the ladder's seed-``seed`` runs (``tether.demo.diagnose``):
    forgetting (off-distribution NLL change and KL on text the demo never trained on, and the forward KL on the
    evaluation prompts) against β, and the KL's noise (exact per-position KL; the standard error of k1, k3 and
    exact by completion length) for the smallest β and a penalised one. Saved to ``work/diagnostics.json`` (a
    resumed demo reuses it)."""
    marker = paths.work / "diagnostics.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from .diagnose import forgetting_points, kl_noise, off_distribution_texts

    ladder = sorted(
        (s for s in specs if s.get("group") == "ladder" and s.get("seed", cfg.seed) == cfg.seed),
        key=lambda s: s["beta"],
    )
    if not ladder:
        return {}
    ref = str(paths.reference)
    runs = [
        {"run": s["run"], "beta": s["beta"], "policy": str(paths.runs / s["run"] / "train" / "final")} for s in ladder
    ]
    source, texts = off_distribution_texts(cfg.assets, seed=cfg.seed)
    points = forgetting_points(
        runs, ref, texts=texts, prompts=eval_prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed
    )
    penalised = [r for r in runs if r["beta"] > 0]
    chosen = [runs[0]] + ([penalised[len(penalised) // 2]] if penalised else [])  # β = 0 and a mid-ladder β
    noise = {
        f"β = {r['beta']:g}": kl_noise(r["policy"], ref, eval_prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        for r in chosen
    }
    out = {"texts_source": source, "texts": len(texts), "forgetting": points, "kl_noise": noise}
    _mark(marker, out)
    return out


def dpo_lr_for(cfg: DemoConfig, beta: float) -> float:
    """A DPO run's learning rate: ``dpo_lr``, divided by β where β > 1 and ``dpo_lr_over_beta`` is set."""
    return cfg.dpo_lr / beta if cfg.dpo_lr_over_beta and beta > 1 else cfg.dpo_lr


def run_cost(spec: dict, cfg: DemoConfig) -> float:
    """A run's relative cost (PPO steps; a DPO step ≈ 0.3 of one): the sweep starts the longest first, so
    the last runs running are short ones and the processes finish together."""
    if spec["method"] == "dpo":
        return 0.3 * cfg.dpo_steps
    return float(spec.get("steps", cfg.ppo_steps))


def first_hacking_step(run_dir: Path) -> Optional[int]:
    """The first step at which the run's own metrics (``train/metrics.jsonl``) hold ``eval/hacking`` = 1: the
    trainer's monitor fired there (diagnostics/hacking.py). None: it never fired, or the run logs no monitor."""
    f = run_dir / "train" / "metrics.jsonl"
    if not f.exists():
        return None
    for ln in f.read_text().splitlines():
        if '"eval/hacking"' in ln:
            r = json.loads(ln)
            if r.get("eval/hacking") == 1.0:
                return int(r["step"])
    return None


DPO_UNSTABLE_LOSS = math.log(2)
"""A DPO run whose training loss ends above ln 2 (the loss of a policy equal to its reference) is a failed run:
it ended worse than where it started. The report lists it and leaves it off the frontier."""


def final_train_loss(run_dir: Path, *, tail: float = 0.1) -> Optional[float]:
    """Mean training loss over the last ``tail`` of the logged steps (at least 5): one batch's loss is noisy."""
    f = run_dir / "train" / "history.jsonl"
    if not f.exists():
        return None
    losses = [r["loss"] for r in map(json.loads, f.read_text().splitlines()) if r.get("loss") is not None]
    if not losses:
        return None
    k = max(5, math.ceil(tail * len(losses)))
    return sum(losses[-k:]) / len(losses[-k:])


def collect(paths: Paths, specs: list[dict], ref_row: dict) -> tuple[list[dict], list[dict], dict]:
    """Every evaluation row, each run's final row and its samples. A run's rows carry its spec's ``group``
    ("frontier" unless the spec names another), and its final row ``hacking_step`` (``first_hacking_step``)
    and, for DPO, ``final_loss`` and ``unstable`` (``final_train_loss`` > ln 2)."""
    rows = [dict(ref_row, group="frontier")]  # rows keep their samples (the side-by-side tables); the CSVs drop them
    finals = [{k: v for k, v in ref_row.items() if k != "samples"} | {"group": "frontier"}]
    samples = {"reference": ref_row.get("samples", [])}
    for spec in specs:
        run_dir = paths.runs / spec["run"]
        group = spec.get("group", "frontier")
        pts = [
            json.loads(ln) | {"group": group} for ln in (run_dir / "eval.jsonl").read_text().splitlines() if ln.strip()
        ]
        rows += pts
        final = {k: v for k, v in pts[-1].items() if k != "samples"}
        if spec["method"] in ("ppo", "ppo_gt"):
            final["hacking_step"] = first_hacking_step(run_dir)
        if spec["method"] == "dpo":
            final["final_loss"] = final_train_loss(run_dir)
            loss = final["final_loss"]
            final["unstable"] = loss is not None and not loss <= DPO_UNSTABLE_LOSS  # NaN: failed too
        finals.append(final)
        samples[spec["run"]] = pts[-1].get("samples", [])
    return rows, finals, samples


def default_workers(n_runs: int) -> int:
    cores = os.cpu_count() or 1
    return max(1, min(n_runs, cores))


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) the whole demo; returns the path of report.html."""
    from .report import write_report
    from .task import read_snippets, split_snippets

    t0 = time.time()
    paths = Paths(Path(cfg.output_dir))
    paths.work.mkdir(parents=True, exist_ok=True)
    (paths.work / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    pos, neg = read_snippets(cfg.assets)
    n_pref = cfg.n_pref_prompts
    splits = split_snippets(pos, neg, n_sft=cfg.n_sft, n_pref=n_pref, n_eval=cfg.n_eval_prompts, seed=cfg.seed)
    times: dict[str, float] = {}  # stage -> seconds in this invocation (a resumed, skipped stage takes ~0)
    weak = "weak_reference" in cfg.methods and bool(cfg.ppo_gt_kl_targets)
    small = "small_proxy" in cfg.methods and bool(cfg.small_proxy_betas)

    last = t0

    def lap(stage: str) -> None:
        nonlocal last
        times[stage], last = round(time.time() - last, 1), time.time()
        log.info("%s took %.1f s", stage, times[stage])

    with one_thread():  # the stages of this process; each worker process runs on one thread too
        log.info("[1/7] SFT -> reference%s", " (and the weak reference)" if weak else "")
        stage_sft(cfg, paths, splits)
        if weak:
            stage_sft(cfg, paths, splits, name="sft_weak", steps=cfg.weak_sft_steps)
        lap("SFT")
        log.info("[2/7] prompts")
        pref_prompts, eval_prompts = stage_prompts(cfg, paths, splits)
        lap("prompts")
        log.info("[3/7] preference pairs")
        pairs = stage_prefs(cfg, paths, pref_prompts)
        lap("preference pairs")
        log.info("[4/7] proxy reward model (%d pairs)%s", len(pairs), " and the small proxy" if small else "")
        rm = stage_rm(cfg, paths)
        rm_small = stage_rm(cfg, paths, name="rm_small", prompt_fraction=cfg.small_proxy_fraction) if small else None
        lap("reward model")
        specs = cfg.runs()
        workers = cfg.workers or default_workers(len(specs))
        log.info("[5/7] sweep: %d runs, %d in parallel", len(specs), workers)
        ref_row = reference_row(cfg, paths, eval_prompts)
        weak_row = reference_row(cfg, paths, eval_prompts, reference="sft_weak") if weak else None
        lap("reference evaluation")
        stage_best_of_n(cfg, paths, specs, eval_prompts)
        lap("best-of-n")
    spreads = {"sft": json.loads((paths.work / "reward_spread.json").read_text())}
    if weak:
        spreads["sft_weak"] = json.loads((paths.work / "reward_spread_sft_weak.json").read_text())
    specs = initial_betas(cfg, specs, spreads)
    run_all(cfg, sorted(specs, key=lambda s: -run_cost(s, cfg)), paths, workers=workers)
    lap("sweep")
    diagnostics = None
    if cfg.diagnostics and "ladder" in cfg.methods:
        log.info("[6/7] forgetting and KL noise of the ladder's policies")
        with one_thread():
            diagnostics = stage_diagnostics(cfg, paths, specs, eval_prompts)
        lap("diagnostics")
    log.info("[7/7] report")
    rows, finals, samples = collect(paths, specs, ref_row)
    meta = {
        "model": cfg.model,
        "preference pairs": len(pairs),
        "proxy RM held-out accuracy": rm.get("eval/rm/accuracy"),
        **(
            {
                "small proxy": f"{rm_small.get('pairs')} pairs (the first {cfg.small_proxy_fraction:g} of the "
                f"preference prompts), held-out accuracy {rm_small.get('eval/rm/accuracy')}",
                "small proxy fraction": cfg.small_proxy_fraction,
            }
            if rm_small
            else {}
        ),
        **({"weak reference SFT steps": cfg.weak_sft_steps} if weak else {}),
        "eval prompts": len(eval_prompts),
        "eval samples per prompt": cfg.eval_samples,
        "max new tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "runs": len(specs),
        "wall time (s)": round(time.time() - t0, 1),
        "stage times (s)": ", ".join(f"{k} {v:g}" for k, v in times.items()),
    }
    return write_report(
        Path(cfg.output_dir),
        rows,
        finals,
        samples,
        meta=meta,
        weak_reference=weak_row,
        diagnostics=diagnostics,
        ladder_steps=cfg.ladder_steps,
    )
