"""The demo's β-ladder diagnostics: what each fixed-β PPO run cost the model away from its task, and
how noisy each KL estimator is along a completion.

Two measurements, both the library's own (no copy of their math here):

- **forgetting against β** (``forgetting_points``): for every finished run, ``tether forgetting``'s
  numbers (``tether.diagnostics.forgetting``, docs/theory.md §10): teacher-forced on text the demo
  never trained on, the change of the per-token NLL against the reference and the exact per-token
  KL[π_ref‖π_θ] and KL[π_θ‖π_ref]; and on the run's own training prompts the forward KL
  E_x[KL(π_ref‖π_θ)] (Shenfeld et al. 2025, "RL's Razor", arXiv:2509.04259), estimated from
  completions sampled from π_ref with the exact per-position KL summed over each;
- **KL noise** (``kl_noise``): ``tether kl --by_position``'s numbers (``engine.measure``): the exact
  per-token KL at each completion position and the standard error of the sequence KL of the first L
  tokens under k1, k2, k3 and the exact (Rao-Blackwellised, full-vocabulary) estimator.

``plot_forgetting`` and ``plot_kl_noise`` draw them; ``forgetting_spearman`` gives the one-number
reading (does forgetting rise as β falls?). Everything here runs on whatever torch thread count the
caller set: the demo calls it inside ``pipeline.one_thread()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError

FORGETTING_KEYS = (
    "nll_delta",
    "nll_delta_stderr",
    "nll_policy",
    "nll_reference",
    "kl_ref_to_policy",
    "kl_ref_to_policy_stderr",
    "kl_policy_to_ref",
    "kl_policy_to_ref_stderr",
)
"""The numbers ``forgetting_points`` takes from ``forgetting_on_texts`` (per token, on the texts)."""

NOISE_ESTIMATORS = ("k1", "k3", "exact")
"""The estimators ``plot_kl_noise`` draws (k2 is in the data too; it is biased for the KL)."""


def _prompt_texts(prompts: Sequence) -> list[str]:
    """Prompt strings from strings or objects with ``.text`` (the demo's ``task.Prompt``)."""
    return [p if isinstance(p, str) else p.text for p in prompts]


# --------------------------------------------------------------------------------------------------
# measurements


def off_distribution_texts(assets, *, max_texts: int = 128, seed: int = 0) -> tuple[str, list[str]]:
    """(source name, texts): a seeded selection of ``max_texts`` dialogues from the hh-rlhf asset (its
    harmless-base test split, chosen side; ``diagnostics.forgetting.read_texts``).

    Why hh-rlhf: the demo's reference is stories260K fine-tuned (SFT) on rt-polarity movie-review
    snippets and its PPO runs are prompted with prefixes of other snippets, so movie reviews are the
    demo's *own* distribution; Human/Assistant dialogue is text neither the SFT nor any run trained
    on, which is what a forgetting probe must score (``tether forgetting`` picks it for the same
    reason, ``diagnostics.forgetting.default_texts``). ``assets``: the assets folder (None: the
    ``TETHER_ASSETS`` default)."""
    from ..diagnostics.forgetting import read_texts

    source = "hh-rlhf"
    return source, read_texts(source, assets=None if assets is None else str(assets), max_texts=max_texts, seed=seed)


def forgetting_points(
    runs: Sequence[dict],
    reference_dir,
    *,
    texts: Sequence[str],
    prompts: Sequence,
    tokenizer=None,
    max_length: int = 64,
    batch_size: int = 8,
    max_prompts: int = 32,
    samples: int = 4,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> list[dict]:
    """``tether forgetting``'s numbers for every run of the β ladder, the reference loaded once.

    Args:
        runs: ``[{"run": name, "beta": β, "policy": folder}]``, ``policy`` a Hugging Face folder (the
            run's ``train/final``).
        reference_dir: the reference's folder (the demo's ``work/sft/final``).
        texts: off-distribution text (``off_distribution_texts``), each cut to ``max_length`` tokens
            and scored teacher-forced in batches of ``batch_size`` (``text_batches``).
        prompts: the runs' training prompts (strings, or objects with ``.text``); the first
            ``max_prompts`` (0 = all) are tokenized with ``measure.encode_prompts``.
        tokenizer: tokenizes texts and prompts (default: the reference's).
        samples, max_new_tokens, seed: completions sampled from π_ref per prompt for the forward KL,
            their length limit and the sampler's seed (the same samples for every run).
    Returns:
        One dict per run, in order: ``run``, ``beta``, and per token on the texts ``nll_delta`` (NLL_θ -
        NLL_ref, > 0: the policy predicts the text worse; nats/token), ``nll_policy``,
        ``nll_reference``, ``kl_ref_to_policy``, ``kl_policy_to_ref`` (exact per-token KLs), with
        ``*_stderr`` over texts; ``forward_kl_on_prompts`` (nats/completion) with its stderr over
        the sampled completions; ``forward_kl_next_token`` (exact, at the prompt); ``texts``,
        ``tokens`` scored. Each number is what ``tether forgetting --texts ... --prompts ...`` gives
        for that policy with the same settings (``--batch_size`` = ``batch_size``): the same calls.
    """
    from ..diagnostics.forgetting import forgetting_on_texts, forward_kl_on_prompts, text_batches
    from ..measure import encode_prompts
    from ..modeling import check_compatible, load_causal_lm, load_tokenizer

    for name, v in (("max_prompts", max_prompts),):
        if v < 0:
            raise UserError(f"{name} must be >= 0 (0 = all), got {v}")
    for name, v in (("samples", samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    for i, r in enumerate(runs):
        missing = [k for k in ("run", "beta", "policy") if k not in r]
        if missing:
            raise UserError(f"runs[{i}] lacks {missing}: give each run as {{'run', 'beta', 'policy'}}")
    texts_p = _prompt_texts(prompts)
    if max_prompts:
        texts_p = texts_p[:max_prompts]
    if not texts_p:
        raise UserError("forgetting_points needs the runs' training prompts for the forward KL; got none")
    ref_tok = load_tokenizer(str(reference_dir))
    tok = tokenizer if tokenizer is not None else ref_tok
    ref_model = load_causal_lm(str(reference_dir))
    batches = text_batches(tok, list(texts), max_length=max_length, batch_size=batch_size)
    prompt_ids = encode_prompts(tok, texts_p)
    rows = []
    for r in runs:
        policy = load_causal_lm(str(r["policy"]))
        check_compatible(policy, ref_model, load_tokenizer(str(r["policy"])), ref_tok)
        res = forgetting_on_texts(policy, ref_model, batches)
        fwd = forward_kl_on_prompts(
            policy,
            ref_model,
            prompt_ids,
            tokenizer=tok,
            samples_per_prompt=samples,
            max_new_tokens=max_new_tokens,
            batch_size=4 * batch_size,  # as tether forgetting: sampled rows per pass
            seed=seed,
        )
        rows.append(
            {
                "run": r["run"],
                "beta": float(r["beta"]),
                **{k: res[k] for k in FORGETTING_KEYS},
                "forward_kl_on_prompts": fwd["forward_kl_on_prompts"],
                "forward_kl_on_prompts_stderr": fwd["forward_kl_on_prompts_stderr"],
                "forward_kl_next_token": fwd["forward_kl_next_token"],
                "texts": res["texts"],
                "tokens": res["tokens"],
            }
        )
        del policy
    return rows


def kl_noise(
    policy_dir, reference_dir, prompts: Sequence, *, samples: int = 8, max_new_tokens: int = 24, seed: int = 0
) -> dict:
    """``tether kl --by_position`` on one policy: ``samples`` completions per prompt sampled from the
    policy (default sampling: τ = 1, no top-k/top-p; ``max_new_tokens``; seeded ``seed``) and scored
    against the frozen reference by every estimator on the same samples (``engine.measure``).

    ``prompts``: strings or objects with ``.text``, tokenized with ``measure.encode_prompts``.
    Returns the JSON-able part of ``measure``'s result (nats):

    - ``estimators``: {k1, k2, k3, exact: {mean, stderr}} of the sequence KL[π_θ‖π_ref];
    - ``by_position`` (T,): the exact per-token KL at completion position t, mean over the samples that
      reach t; ``by_position_n`` (T,): how many do;
    - ``by_prefix``: [{tokens: L, estimators: {name: {mean, stderr}}}] for the KL of each sample's
      first L tokens, L in ``engine.PREFIX_LENGTHS`` below ``max_new_tokens``. (L = ``max_new_tokens``
      is the whole sequence: ``estimators`` above.);
    - ``by_length``: the same per completion-length bucket;
    - ``token_mean`` (exact KL per completion token), ``response_len``, ``samples``, ``max_new_tokens``.

    Every stderr is over samples (sample std / √n), as ``tether kl`` reports it."""
    from ..engine import measure
    from ..groups import sampling_settings
    from ..measure import encode_prompts
    from ..modeling import check_compatible, load_causal_lm, load_tokenizer
    from ..reference import FrozenReference

    if samples < 1 or max_new_tokens < 1:
        raise UserError(f"samples and max_new_tokens must be >= 1, got {samples} and {max_new_tokens}")
    tok, ref_tok = load_tokenizer(str(policy_dir)), load_tokenizer(str(reference_dir))
    policy, ref_model = load_causal_lm(str(policy_dir)), load_causal_lm(str(reference_dir))
    check_compatible(policy, ref_model, tok, ref_tok)
    prompt_ids = encode_prompts(tok, _prompt_texts(prompts))
    if not prompt_ids:
        raise UserError("kl_noise needs prompts; got none")
    res = measure(
        policy,
        FrozenReference(ref_model),
        prompt_ids,
        tokenizer=tok,
        samples_per_prompt=samples,
        batch_size=64,  # tether kl's default
        seed=seed,
        sampling=sampling_settings(None, max_new_tokens=max_new_tokens),
        by_position=True,
    )
    keep = ("estimators", "by_position", "by_position_n", "by_prefix", "by_length", "token_mean", "response_len")
    return {**{k: res[k] for k in keep}, "samples": res["samples"], "max_new_tokens": max_new_tokens}


def prefix_stderr(result: dict, estimator: str) -> tuple[list[int], list[float]]:
    """(L values, stderr of the KL of the first L tokens) of one estimator from ``kl_noise``'s output:
    the ``by_prefix`` rows below ``max_new_tokens`` and the whole sequence at L = ``max_new_tokens``
    (no completion is longer, so its first max_new_tokens tokens are all of it)."""
    top = int(result["max_new_tokens"])
    pts = [(int(r["tokens"]), r["estimators"][estimator]["stderr"]) for r in result["by_prefix"] if r["tokens"] < top]
    pts.append((top, result["estimators"][estimator]["stderr"]))
    return [p[0] for p in pts], [p[1] for p in pts]


def forgetting_spearman(rows: Sequence[dict]) -> float:
    """Spearman rank correlation of β against ``nll_delta`` over ``forgetting_points`` rows
    (``diagnostics.hacking.spearman``; ties share ranks). Negative: the smaller β, the more the policy
    forgot. nan for fewer than 2 rows or a constant column."""
    from ..diagnostics.hacking import spearman

    x = torch.tensor([float(r["beta"]) for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["nll_delta"]) for r in rows], dtype=torch.float64)
    return spearman(x, y)


# --------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forgetting(rows: Sequence[dict], path, *, source: Optional[str] = "hh-rlhf") -> None:
    """One PNG, two panels against β (symlog x: β = 0 is on the ladder; linear below 0.01).

    Left: the NLL change on the off-distribution texts (nats/token, ±1 stderr over texts). Right: the
    forward KL E_x[KL(π_ref‖π_θ)] on the training prompts (nats/completion) and the exact
    KL[π_ref‖π_θ] on the texts (nats/token), ±1 stderr. ``source``: the texts' name for the labels."""
    plt = _plt()
    rows = sorted(rows, key=lambda r: float(r["beta"]))
    beta = [float(r["beta"]) for r in rows]
    where = f" ({source})" if source else ""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.errorbar(beta, [r["nll_delta"] for r in rows], yerr=[r["nll_delta_stderr"] for r in rows], marker="o", capsize=3)
    a.axhline(0.0, color="grey", lw=0.8, ls=":")
    a.set_title(f"forgetting: NLL change on off-distribution text{where}")
    a.set_ylabel("NLL(π_θ) − NLL(π_ref)  [nats/token]")
    c_fwd, c_txt = "#1f77b4", "#d62728"
    b.errorbar(
        beta,
        [r["kl_ref_to_policy"] for r in rows],
        yerr=[r["kl_ref_to_policy_stderr"] for r in rows],
        marker="s",
        capsize=3,
        color=c_txt,
        label=f"KL[π_ref‖π_θ] on off-distribution text{where} (left axis, nats/token)",
    )
    b.set_ylabel("KL[π_ref‖π_θ] on the texts  [nats/token]", color=c_txt)
    b2 = b.twinx()  # per completion and per token differ by the completion length: one axis each
    b2.errorbar(
        beta,
        [r["forward_kl_on_prompts"] for r in rows],
        yerr=[r["forward_kl_on_prompts_stderr"] for r in rows],
        marker="o",
        capsize=3,
        color=c_fwd,
        label="E_x KL(π_ref‖π_θ) on the training prompts (right axis, nats/completion)",
    )
    b2.set_ylabel("E_x KL(π_ref‖π_θ) on the prompts  [nats/completion]", color=c_fwd)
    b.set_title("forward KL to the reference")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = b2.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    right = max(beta) * 2 if beta and max(beta) > 0 else 1.0
    for ax in (a, b, b2):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, right)  # β >= 0: no negative half of the symlog axis
    for ax in (a, b):
        ax.set_xlabel("β (fixed KL coefficient; symlog axis, linear below 0.01)")
        ax.grid(alpha=0.3)
    for ax in (a, b, b2):
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)


def plot_kl_noise(results: dict, path) -> None:
    """One PNG from ``{run label: kl_noise output}``. Left: the exact per-token KL[π_θ‖π_ref] at each
    completion position (nats/token). Right: the standard error of the sequence-KL estimate of the
    first L tokens against L (``prefix_stderr``) for k1 (dashed), k3 (dotted) and exact (solid), one
    colour per run: the single-sample estimators' noise grows with L, the exact estimator's less."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"k1": "--", "k3": ":", "exact": "-"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, res) in enumerate(results.items()):
        c = colours[i % len(colours)]
        a.plot(range(len(res["by_position"])), res["by_position"], color=c, marker=".", label=label)
        for est in NOISE_ESTIMATORS:
            if est not in res["estimators"]:
                continue
            L, se = prefix_stderr(res, est)
            b.plot(L, se, color=c, ls=styles[est], marker="o", ms=3)
    a.set_title("exact per-token KL by completion position")
    a.set_xlabel("completion position t (0 = first token)")
    a.set_ylabel("KL[π_θ‖π_ref](s_t)  [nats/token]")
    b.set_title("noise of the sequence-KL estimate of the first L tokens")
    b.set_xlabel("L (tokens; the last point is the whole completion)")
    b.set_ylabel("standard error over samples  [nats]")
    from matplotlib.lines import Line2D

    a.legend(fontsize=7, title="run", title_fontsize=7)
    b.legend(
        [Line2D([], [], color="black", ls=styles[e]) for e in NOISE_ESTIMATORS],
        list(NOISE_ESTIMATORS),
        fontsize=7,
        title="estimator (colour: run)",
        title_fontsize=7,
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0.0)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
