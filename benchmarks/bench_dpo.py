"""tether dpo versus TRL's DPOTrainer: same model, data and hyperparameters.

Two parts:

1. Loss agreement. For ``sigmoid``, ``ipo`` (TRL length-normalises: tether ``ipo_length_normalize``)
   and ``robust`` (ε = 0.1), both trainers run the first steps from the same weights, on the same
   pairs in the same order (tether ``shuffle=False, group_by_length=False``; TRL
   ``train_sampling_strategy="sequential"``), with the same AdamW, constant learning rate and
   clipping; the per-step losses must agree to 1e-4.
2. Throughput. Each configuration trains in a fresh subprocess (peak RSS is per process), runs
   alternate between systems, and the median of the repeats is reported. Steps/s and tokens/s are
   steady-state (steps 2 .. N-1: no warm-up, no final save); tokens are real (non-padding) prompt +
   completion tokens of both sequences of every pair; "setup s" is the time from the start of the
   trainer call to its first step (loading, tokenising, and the reference log-prob cache for
   tether / TRL's precompute).

Models: the real stories260K, and a randomly initialised Llama of ~20M parameters (same tokenizer)
so that compute, not Python, dominates. Data (``--workload``): ``movie``, preference pairs built from the
rt-polarity movie-review snippets (prompt = first 2-4 words of a positive snippet; chosen = its
continuation; rejected = a negative snippet's continuation: prompts of 2-5 tokens); ``hh``, real
HH-RLHF dialogue pairs (the shared asset: prompts of hundreds of tokens, two responses), keeping the
pairs whose prompt + longer response fit ``max_length`` (512) so neither trainer truncates anything.
Per step, each side's tokens: ``tokens`` are the real tokens of both sequences of every pair (2P + R_c +
R_r, how TRL lays a pair out); ``computed`` the token positions the policy's forward computed (P + R_c +
R_r per pair with tether's shared prompt); ``slots`` those plus padding.

    python benchmarks/bench_dpo.py [--repeats 3] [--threads 1] [--quick] [--workload movie|hh|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Shared setup
# ----------------------------------------------------------------------------------------------------


def assets_dir() -> Path:
    for cand in (os.environ.get("TETHER_ASSETS"), ROOT.parent / "shared" / "assets"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit("set TETHER_ASSETS to a folder laid out like shared/assets")


def movie_rows(n: int, seed: int = 0) -> list[dict]:
    from tether.data.preference import sentiment_pairs

    a = assets_dir() / "rt-polarity"
    pos = (a / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (a / "rt-polarity.neg").read_text(errors="replace").splitlines()
    return sentiment_pairs(pos, neg, n=n, seed=seed)


def make_llama20m(out: Path) -> str:
    """A randomly initialised (seeded) Llama with ~20M parameters and stories260K's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.modeling import load_tokenizer

    if (out / "model.safetensors").exists():
        return str(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=448,
        intermediate_size=1216,
        num_hidden_layers=8,
        num_attention_heads=7,
        num_key_value_heads=7,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    load_tokenizer(str(assets_dir() / "stories260K")).save_pretrained(out)
    return str(out)


def hh_rows(n: int, max_length: int = 512) -> list[dict]:
    """The first ``n`` HH-RLHF pairs (the harmless-base test split of the shared asset) whose prompt and
    longer response fit ``max_length`` tokens of stories260K's tokenizer, so no trainer truncates."""
    from tether.data.preference import load_preference_rows, pair_width, tokenize_pairs
    from tether.modeling import load_tokenizer

    tok = load_tokenizer(str(assets_dir() / "stories260K"))
    rows = load_preference_rows("hh-rlhf", assets=str(assets_dir()), skip_bad_rows=True)
    pairs = tokenize_pairs(rows, tok)[0]
    keep = [rows[p["row"]] for p in pairs if pair_width(p) <= max_length]
    return keep[:n]


WORKLOADS = {"movie": (movie_rows, 256), "hh": (lambda n, seed=0: hh_rows(n), 512)}
"""workload -> (rows(n, seed), max_length)."""


def pair_tokens_of(rows: list[dict], tok) -> list[int]:
    """Real tokens per pair as both trainers see them (prompt twice + both completions + EOS)."""
    from tether.data.preference import pair_tokens, tokenize_pairs

    return [pair_tokens(p) for p in tokenize_pairs(rows, tok)[0]]


# ----------------------------------------------------------------------------------------------------
# One run of each system (called in-process for the loss check, in a subprocess for timing)
# ----------------------------------------------------------------------------------------------------


LOSSES = {  # tether config -> TRL config for the same loss
    "sigmoid": ({"loss_type": "sigmoid"}, {"loss_type": ["sigmoid"]}),
    "ipo": ({"loss_type": "ipo", "ipo_length_normalize": True}, {"loss_type": ["ipo"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
}


def run_tether(spec: dict) -> dict:
    from tether.trainers.dpo import DPOConfig, train_dpo

    rows = json.loads(Path(spec["rows"]).read_text())
    stamps: list[float] = []
    first: list[float] = []  # when the first step started
    cpu: list[float] = []
    tokens: list[float] = []
    computed: list[float] = []
    padded: list[float] = []
    losses: list[float] = []

    def cb(step, metrics):
        now = time.perf_counter()
        if not stamps:  # the step's own duration, measured inside the step (excludes logging)
            first.append(now - metrics["data/tokens"] / metrics["perf/tokens_per_s"])
        stamps.append(now)
        cpu.append(time.process_time())
        tokens.append(metrics["data/tokens"])
        done = metrics.get("data/tokens_computed", metrics["data/tokens"])  # positions the forward computed
        computed.append(done)
        padded.append(done / (1.0 - metrics["data/padding_frac"]))
        losses.append(metrics["loss"])

    tether_loss, _ = LOSSES[spec["loss"]]
    cfg = DPOConfig(
        model=spec["model"],
        output_dir=spec["out"],
        max_steps=spec["steps"],
        batch_size=spec["batch"],
        learning_rate=spec["lr"],
        max_length=spec["max_length"],
        beta=0.1,
        eval_fraction=0.0,
        kl_prompts=0,
        progress=False,
        seed=0,
        max_grad_norm=1.0,
        **tether_loss,
        **spec.get("tether", {}),
    )
    t0 = time.perf_counter()
    train_dpo(cfg, rows=rows, callback=cb)
    return {
        "losses": losses,
        "stamps": stamps,
        "cpu": cpu,
        "tokens": tokens,
        "computed": computed,
        "padded": padded,
        "start": t0,
        "first": first[0],
    }


def run_trl(spec: dict) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from tether.modeling import load_tokenizer

    datasets.disable_progress_bars()
    rows = json.loads(Path(spec["rows"]).read_text())
    tok = load_tokenizer(spec["model"])  # pad = eos, padding side left (TRL requires both)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    _, trl_loss = LOSSES[spec["loss"]]
    args = TRLConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        max_length=spec["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        **trl_loss,
        **spec.get("trl", {}),
    )
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []
    tokens: list[float] = []
    padded: list[float] = []

    first: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not first:
                first.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Stamp()]
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for results
    inner = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):  # observe, do not change
        out = inner(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        losses.append(float((out[0] if return_outputs else out).detach()))
        tokens.append(float(inputs["attention_mask"].sum()))
        padded.append(float(inputs["attention_mask"].numel()))
        return out

    trainer.compute_loss = spy
    trainer.train()
    return {
        "losses": losses,
        "stamps": stamps,
        "cpu": cpu,
        "tokens": tokens,
        "computed": tokens,  # TRL computes every real token: 2P + R_c + R_r per pair
        "padded": padded,
        "start": t0,
        "first": first[0],
        "token_ids": [trainer.train_dataset[i] for i in range(2)],
    }


class PeakRSS:
    """Peak resident memory above the level at start, sampled every 2 ms from /proc/self/statm
    (ru_maxrss is a lifetime high-water mark, which imports alone can set)."""

    def __init__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak / 2**20, (self.peak - self.base) / 2**20


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers.models.llama.modeling_llama  # noqa: F401  (import first: dRSS is what training adds)

    if spec["system"].startswith("tether"):
        import torch.utils.tensorboard  # noqa: F401

        import tether.trainers.dpo  # noqa: F401
    else:
        import trl.trainer.dpo_trainer  # noqa: F401
    mem = PeakRSS()
    res = (run_tether if spec["system"].startswith("tether") else run_trl)(spec)
    peak_mb, delta_mb = mem.stop()
    st, cpu, tk = res["stamps"], res["cpu"], res["tokens"]
    n = len(st)
    steady = slice(1, n - 1)  # steps 2 .. N-1: stamps[i] - stamps[i-1] is step i+1's duration
    dt, dcpu = st[n - 2] - st[0], cpu[n - 2] - cpu[0]
    return {
        "system": spec["system"],
        "steps_per_s": (n - 2) / dt,
        "tokens_per_s": sum(tk[steady]) / dt,
        "cpu_tokens_per_s": sum(tk[steady]) / dcpu,
        "padding_frac": 1 - sum(res["computed"][steady]) / sum(res["padded"][steady]),
        "tokens_per_step": sum(tk[steady]) / (n - 2),
        "computed_per_step": sum(res["computed"][steady]) / (n - 2),
        "slots_per_step": sum(res["padded"][steady]) / (n - 2),
        "setup_s": res["first"] - res["start"],
        "total_s": st[-1] - res["start"],
        "peak_rss_mb": peak_mb,
        "delta_rss_mb": delta_mb,
        "losses": res["losses"],
    }


# ----------------------------------------------------------------------------------------------------
# The two parts
# ----------------------------------------------------------------------------------------------------


def loss_check(model: str, work: Path, steps: int, threads: int) -> list[tuple]:
    """Per-step loss of tether vs TRL for each loss, from identical weights and data order."""
    import torch

    from tether.modeling import load_tokenizer

    torch.set_num_threads(threads)
    rows = movie_rows(64, seed=1)
    data = work / "check_rows.json"
    data.write_text(json.dumps(rows))
    tok = load_tokenizer(model)
    out = []
    for loss in LOSSES:
        common = dict(model=model, rows=str(data), steps=steps, batch=8, lr=1e-4, max_length=256, loss=loss)
        t = run_tether(
            {
                **common,
                "out": str(work / f"check_tether_{loss}"),
                "tether": {"shuffle": False, "group_by_length": False, "reference": "copy"},
            }
        )
        r = run_trl(
            {**common, "out": str(work / f"check_trl_{loss}"), "trl": {"gradient_checkpointing": False, "bf16": False}}
        )
        same_ids = all(
            r["token_ids"][i]["prompt_ids"] + r["token_ids"][i]["chosen_ids"]
            == tok(rows[i]["prompt"] + rows[i]["chosen"] + tok.eos_token)["input_ids"]
            for i in range(2)
        )
        diffs = [abs(a - b) for a, b in zip(t["losses"], r["losses"])]
        out.append((loss, t["losses"], r["losses"], max(diffs), same_ids))
    return out


ONCE = ("tether (live ref)", "trl defaults")
SYSTEMS = {
    "tether": {"tether": {}},
    "tether (shared prompt off)": {"tether": {"shared_prompt": "false"}},
    "tether (shared prompt on)": {"tether": {"shared_prompt": "true"}},
    "tether (no bucketing)": {"tether": {"group_by_length": False}},
    "tether (live ref)": {"tether": {"reference": "copy"}},
    # TRL's pairs in TRL's order (sequential, no bucketing): each step scores exactly TRL's step's pairs
    "tether (trl order)": {"tether": {"shuffle": False, "group_by_length": False}},
    "tether (trl order; shared off)": {
        "tether": {"shuffle": False, "group_by_length": False, "shared_prompt": "false"}
    },
    "trl best": {"trl": {"gradient_checkpointing": False, "bf16": False}},
    "trl best + precompute": {
        "trl": {"gradient_checkpointing": False, "bf16": False, "precompute_ref_log_probs": True}
    },
    "trl defaults": {"trl": {}},
}


def throughput(
    model_name: str,
    model: str,
    work: Path,
    *,
    systems: list[str],
    repeats: int,
    steps: int,
    batch: int,
    n_rows: int,
    threads: int,
    workload: str = "movie",
) -> dict[str, list[dict]]:
    make_rows, max_length = WORKLOADS[workload]
    rows = make_rows(n_rows, seed=2)
    data = work / f"rows_{model_name.replace('/', '_')}.json"
    data.write_text(json.dumps(rows))
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(repeats):
        order = systems if rep % 2 == 0 else systems[::-1]  # alternate, so drift in machine load cancels
        for name in order:
            if name in ONCE and rep > 0:
                continue  # ablations and TRL's slow defaults: reference points, run once
            spec = {
                "system": "tether" if name.startswith("tether") else "trl",
                "model": model,
                "rows": str(data),
                "steps": steps,
                "batch": batch,
                "lr": 1e-4,
                "max_length": max_length,
                "loss": "sigmoid",
                "threads": threads,
                "out": str(work / f"run_{model_name.replace('/', '_')}_{len(results[name])}_{name.replace(' ', '_')}"),
                **SYSTEMS[name],
            }
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "TQDM_DISABLE": "1",
                "PYTHONPATH": str(ROOT),
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(f"  {model_name} / {name}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(res)
            print(
                f"  {model_name:20s} {name:26s} rep {rep}: {res['tokens_per_s']:7.0f} tok/s  "
                f"{res['cpu_tokens_per_s']:7.0f} tok/cpu-s  {res['steps_per_s']:6.2f} step/s  pad "
                f"{res['padding_frac']:.2f}  computed/step {res['computed_per_step']:6.0f} of "
                f"{res['tokens_per_step']:6.0f}  "
                f"setup {res['setup_s']:5.1f}s  peak {res['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    return results


def ref_pass(
    model_name: str, model: str, work: Path, *, n_rows: int, repeats: int, threads: int, batch_size: int = 64
) -> str:
    """The precomputed reference pass alone, padded vs packed like training (``PrecomputedReference.build``
    with ``packed=False/True``), on the rows ``setup_reference`` builds (chosen and rejected sequences of
    ``n_rows`` pairs, sorted by length), alternating in one process; CPU time, median of ``repeats``."""
    import torch

    from tether.data.preference import tokenize_pairs
    from tether.modeling import load_causal_lm, load_tokenizer
    from tether.reference import FrozenReference, PrecomputedReference

    torch.set_num_threads(threads)
    tok, lm = load_tokenizer(model), load_causal_lm(model)
    pairs = tokenize_pairs(movie_rows(n_rows, seed=2), tok)[0]
    rows = [(2 * i, p["prompt_ids"], p["chosen_ids"]) for i, p in enumerate(pairs)]
    rows += [(2 * i + 1, p["prompt_ids"], p["rejected_ids"]) for i, p in enumerate(pairs)]
    rows.sort(key=lambda r: (len(r[1]) + len(r[2]), r[0]))
    ref = FrozenReference(lm)
    times: dict[bool, list[float]] = {False: [], True: []}
    worst = 0.0
    for rep in range(repeats + 1):  # the first round warms up
        built = {}
        for packed in (False, True) if rep % 2 == 0 else (True, False):
            t = time.process_time()
            built[packed] = PrecomputedReference.build(
                ref,
                lm,
                rows,
                pad_id=tok.pad_token_id,
                batch_size=batch_size,
                cache_dir=work / f"refpass_{model_name}_{rep}_{packed}",
                packed=packed,
            )
            if rep:
                times[packed].append(time.process_time() - t)
        worst = max(
            worst, max(float((built[False].table[k] - built[True].table[k]).abs().max()) for k in built[False].table)
        )
    a, b = statistics.median(times[False]), statistics.median(times[True])
    tokens = sum(len(r[1]) + len(r[2]) for r in rows)
    return (
        f"{model_name:20s} reference pass over {len(rows)} sequences ({tokens} tokens): padded {a:.2f} cpu-s, "
        f"packed {b:.2f} cpu-s = {a / b:.2f}x faster; max |Δ log-prob| {worst:.1e}"
    )


def table(all_results: dict[str, dict[str, list[dict]]]) -> str:
    keys = (
        "steps_per_s",
        "tokens_per_s",
        "cpu_tokens_per_s",
        "padding_frac",
        "setup_s",
        "total_s",
        "peak_rss_mb",
        "delta_rss_mb",
        "tokens_per_step",
        "computed_per_step",
    )
    head = (
        f"{'model':20s} {'system':26s} {'steps/s':>7s} {'tokens/s':>8s} {'x':>5s} {'tok/cpu-s':>9s} {'x':>5s} "
        f"{'pad %':>5s} {'tok/step':>8s} {'computed':>8s} {'setup s':>7s} {'e2e s':>6s} {'x':>5s} "
        f"{'peak RSS':>8s} {'dRSS MB':>7s} {'x':>5s} {'runs':>4s}"
    )
    lines = [head, "-" * len(head)]
    for model_name, results in all_results.items():
        med = {
            name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys} for name, rs in results.items() if rs
        }
        base = med.get("trl best")

        def ratio(m, k, inverse=False):
            if not base or base[k] <= 0 or m[k] <= 0:
                return "-"
            return f"{(base[k] / m[k]) if inverse else (m[k] / base[k]):.2f}"

        for name, m in med.items():
            lines.append(
                f"{model_name:20s} {name:26s} {m['steps_per_s']:7.2f} {m['tokens_per_s']:8.0f} "
                f"{ratio(m, 'tokens_per_s'):>5s} "
                f"{m['cpu_tokens_per_s']:9.0f} {ratio(m, 'cpu_tokens_per_s'):>5s} {100 * m['padding_frac']:5.1f} "
                f"{m['tokens_per_step']:8.0f} {m['computed_per_step']:8.0f} "
                f"{m['setup_s']:7.1f} {m['total_s']:6.1f} {ratio(m, 'total_s', inverse=True):>5s} "
                f"{m['peak_rss_mb']:8.0f} {m['delta_rss_mb']:7.0f} {ratio(m, 'delta_rss_mb'):>5s} "
                f"{len(results[name]):4d}"
            )
    lines += [
        "x = ratio to 'trl best' (TRL DPOTrainer, no gradient checkpointing, fp32). tokens/s: wall clock, steady "
        "state;",
        "tok/cpu-s: tokens per second of process CPU time (robust to other load on a shared machine); pad %: padding",
        "share of the token slots each step computes; tok/step: real tokens of the step's pairs (2P + R_c + R_r, the",
        "tokens/s numerator on both sides); computed: token positions the policy's forward computed (P + R_c + R_r",
        "per pair with the shared prompt); setup s: trainer start to first step (incl. reference cache);",
        "e2e s: trainer start to last step (x = speed-up, TRL time / this time); peak RSS (MB): whole process;",
        "dRSS: peak resident memory above the level before the trainer started (sampled every 2 ms).",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per main system (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the machine may be shared)")
    p.add_argument("--quick", action="store_true", help="fewer steps and no 20M model")
    p.add_argument("--check_steps", type=int, default=5, help="steps compared in the loss check")
    p.add_argument("--workload", choices=("movie", "hh", "both"), default="both", help="pairs to time (see above)")
    p.add_argument("--models", default="stories260K,llama-20M", help="comma list: stories260K, llama-20M")
    p.add_argument("--systems", default=None, help="comma list of SYSTEMS names (default: all on stories260K)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (default 12 quick / 32; 20M: 6)")
    p.add_argument("--skip_check", action="store_true", help="no loss agreement check, no reference-pass timing")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import logging

    logging.basicConfig(level=logging.WARNING)
    stories = str(assets_dir() / "stories260K")
    models = args.models.split(",")
    if args.quick:
        models = [m for m in models if m != "llama-20M"]
    workloads = ("movie", "hh") if args.workload == "both" else (args.workload,)
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs; torch threads per run: {args.threads}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        work = Path(tmp)
        if not args.skip_check:
            print("== per-step loss, tether vs TRL DPOTrainer (same weights, data order, optimiser) ==", flush=True)
            for loss, t, r, worst, same_ids in loss_check(stories, work, args.check_steps, args.threads):
                ok &= worst <= 1e-4 and same_ids
                print(f"{loss:8s} max |Δloss| over {len(t)} steps = {worst:.2e}  (same token ids: {same_ids})")
                print(f"         tether {[round(x, 6) for x in t]}\n         trl    {[round(x, 6) for x in r]}")
            print("loss agreement:", "PASS (<= 1e-4)" if ok else "FAIL", flush=True)

        print("\n== throughput (median over alternating runs) ==", flush=True)
        results = {}
        big = make_llama20m(work / "llama20m") if "llama-20M" in models else None
        for workload in workloads:
            if "stories260K" in models:
                results[f"stories260K/{workload}"] = throughput(
                    f"stories260K/{workload}",
                    stories,
                    work,
                    systems=args.systems.split(",") if args.systems else list(SYSTEMS),
                    repeats=args.repeats,
                    steps=args.steps or (12 if args.quick else 32),
                    batch=16,
                    n_rows=1024,
                    threads=args.threads,
                    workload=workload,
                )
            if big:
                results[f"llama-20M/{workload}"] = throughput(
                    f"llama-20M/{workload}",
                    big,
                    work,
                    systems=args.systems.split(",")
                    if args.systems
                    else ["tether", "trl best", "trl best + precompute"],
                    repeats=args.repeats,
                    steps=args.steps or 6,
                    batch=8,
                    n_rows=256,
                    threads=args.threads,
                    workload=workload,
                )
        if not args.skip_check:
            print("\n== precomputed reference pass: padded vs packed like training (CPU time, alternating) ==")
            print(ref_pass("stories260K", stories, work, n_rows=1024, repeats=args.repeats, threads=args.threads))
            if big:
                print(ref_pass("llama-20M", big, work, n_rows=256, repeats=args.repeats, threads=args.threads))
        print(f"\nload average at end: {os.getloadavg()}")
        print(table(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
