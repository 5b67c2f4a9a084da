"""``tether bon``: best-of-n sampling from the reference, with its KL bound and a KL estimate.

For each n: mean reward of the best of n samples (selecting reward and gold rewards), the
analytic bound log n - (n-1)/n on KL[π_bon‖π_ref] (an upper bound), and an estimate of the actual
KL from the sampled rewards (tether.ops.best_of_n). Writes ``results.json`` and ``samples.jsonl``
(the kept completion per prompt and n) to output_dir.

Example::

    tether bon --model runs/sft/final --prompts prompts.txt --n 1,2,4,8,16 --reward runs/rm/final --gold vader
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..assets import resolve_model
from ..checks import check_reward_spec, preflight_sampling
from ..config import parse_config, save_config
from ..data.prompts import load_prompts, prompt_options
from ..errors import UserError
from ..groups import SamplingConfig, sampling_settings
from ..modeling import load_causal_lm, load_tokenizer
from ..runs import seed_everything
from ..trainers.best_of_n import best_of_n_curve, check_bon_sizes


@dataclass
class BoNConfig(SamplingConfig):
    """Config of ``tether bon`` (plus the sampling group: how the reference is sampled)."""

    model: str = "stories260K"
    """The reference policy to sample from: a Hugging Face folder (e.g. tether sft's final/), hub name or asset name."""
    prompts: str = ""
    """Prompts: a text file (one per line), .jsonl/.json/.parquet with a 'prompt' column (a string or a list of
    messages; other columns reach reward functions), a saved datasets folder or a hub name."""
    prompt_field: str = "prompt"
    """Column holding the prompt in table rows."""
    columns: Optional[dict] = None
    """Rename prompt-data columns first: a YAML map {question: prompt} or 'question=prompt'."""
    chat_template: Optional[str] = None
    """Jinja chat template (string or file) for conversational prompts when the tokenizer has none."""
    limit: Optional[int] = None
    """Use only the first N prompts."""
    n: list = field(default_factory=lambda: [1, 2, 4, 8])
    """Values of n (comma-separated); one set of max(n) samples per prompt serves all of them."""
    reward: str = "vader"
    """Selecting reward: vader, a reward-model folder (tether rm's final/), or module:function; NAME=spec renames it."""
    gold: list = field(default_factory=list)
    """Rewards evaluated on the kept completions (comma-separated specs), e.g. vader when selecting with a learned
    proxy."""
    kl_samples: int = 0
    """Reference samples per prompt for the KL estimate (default max(n)); more gives a better estimate."""
    batch_size: int = 64
    """Sequences per sampling batch."""
    seed: int = 0
    """Sampling seed."""
    assets: Optional[str] = None
    """Assets folder (for short names such as stories260K)."""
    output_dir: str = "runs/bon"
    """Where results.json and samples.jsonl go."""
    progress: bool = True
    """Show a progress bar."""


def format_table(results: list[dict]) -> str:
    gold_keys = [k for k in results[0] if k.startswith("reward/") and not k.endswith("_ref")]
    head = ["n", "KL bound", "KL estimate", *gold_keys]
    rows = [head]
    for r in results:
        rows.append(
            [
                str(r["n"]),
                f"{r['kl_bound']:.4f}",
                f"{r['kl_estimate']:.4f} ± {r['kl_estimate_stderr']:.4f}",
                *[f"{r[k]:.4f}" for k in gold_keys],
            ]
        )
    rows.append(["ref", "0", "0", *[f"{results[0][k + '_ref']:.4f}" for k in gold_keys]])
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines) + "\n(KL in nats per sequence; the bound log n - (n-1)/n is an upper bound on the true KL)"


def check_bon_config(cfg: BoNConfig) -> list[int]:
    """The whole input before any weights load; returns the values of n."""
    ns = check_bon_sizes(cfg.n, cfg.kl_samples)
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"limit={cfg.limit} must be >= 1 (or null for all prompts); set --limit")
    check_reward_spec(cfg.reward, assets=cfg.assets)
    for spec in cfg.gold:
        check_reward_spec(spec, field="gold", assets=cfg.assets)
    preflight_sampling(
        cfg,
        model=cfg.model,
        model_field="model",
        prompts_path=cfg.prompts,
        batch_size=cfg.batch_size,
        assets=cfg.assets,
    )
    return ns


def main(argv=None) -> int:
    cfg, _ = parse_config(BoNConfig, argv, prog="tether bon", description=__doc__.split("\n\n")[0])
    ns = check_bon_config(cfg)
    if cfg.backend != "builtin":  # best_of_n_curve samples through engine.generate_batches with the built-in sampler
        raise UserError(
            f"backend={cfg.backend!r}: tether bon samples with the built-in sampler only for now; set --backend builtin"
        )
    seed_everything(cfg.seed)
    path = resolve_model(cfg.model, cfg.assets)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    prompts = load_prompts(cfg.prompts, tokenizer=tok, **prompt_options(cfg))
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    results = best_of_n_curve(
        model,
        tok,
        prompts,
        ns=ns,
        reward=cfg.reward,
        gold=list(cfg.gold),
        kl_samples=cfg.kl_samples,
        sampling=sampling_settings(cfg),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=cfg.progress,
        decoder=cfg.decoder,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    summary = [{k: v for k, v in r.items() if k not in ("prompts", "completions")} for r in results]
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    with open(out / "samples.jsonl", "w") as f:
        for r in results:
            for p, c in zip(r["prompts"], r["completions"]):
                f.write(json.dumps({"n": r["n"], "prompt": p, "completion": c}) + "\n")
    print(format_table(results))
    return 0
