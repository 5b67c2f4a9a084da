"""tether sft: data formats, tokenisation targets, packing, deterministic data order, the loss
(equal to cross-entropy; accumulation-invariant), and an end-to-end run on the movie reviews with
a pinned loss trajectory and exact resume."""

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from tether.data.text import (
    TextExample,
    Tokenized,
    batch_indices,
    collate,
    load_text_examples,
    pack,
    prepare_sft,
    tokenize_example,
)
from tether.trainers.sft import SFTConfig, token_nll, train_sft

from conftest import assert_close, measured_tol

# ------------------------------------------------------------------------------------------ data


def test_every_file_format(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    (tmp_path / "b.jsonl").write_text('{"text": "plain"}\n{"prompt": "Q:", "completion": " A"}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    (tmp_path / "d.json").write_text(json.dumps({"text": ["col1", "col2"]}))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "f.parquet")
    got = load_text_examples(
        ",".join(str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.json", "d.json", "e.jsonl.gz", "f.parquet"))
    )
    assert got == [
        TextExample("", "first line"),
        TextExample("", "second line"),
        TextExample("", "plain"),
        TextExample("Q:", " A"),
        TextExample("p", "c"),
        TextExample("", "col1"),
        TextExample("", "col2"),
        TextExample("", "zipped"),
        TextExample("", "parquet row"),
    ]


def test_datasets_folders_and_field_mapping(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"q": ["hi"], "a": [" there"]})}).save_to_disk(str(tmp_path / "saved"))
    got = load_text_examples(str(tmp_path / "saved"), prompt_field="q", completion_field="a")
    assert got == [TextExample("hi", " there")]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "dir" / "2.jsonl").write_text('{"text": "two"}\n')
    assert [e.completion for e in load_text_examples(str(tmp_path / "dir"))] == ["one", "two"]


def test_bad_data_errors_name_the_fix(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="row 0: row has fields \\['body'\\].*--text_field"):
        load_text_examples(str(tmp_path / "x.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="dataset is empty"):
        load_text_examples("")


def test_rt_polarity_files_and_short_name(assets_dir):
    pos, neg = assets_dir / "rt-polarity" / "rt-polarity.pos", assets_dir / "rt-polarity" / "rt-polarity.neg"
    one = load_text_examples(str(pos))
    both = load_text_examples(f"{pos},{neg}")
    assert len(one) == 5331 and len(both) == 10662
    assert both == load_text_examples("rt-polarity", assets=str(assets_dir))
    assert all(e.prompt == "" for e in both[:100])


# ------------------------------------------------------------------------------------------ tokens


def test_targets_completion_only_and_plain(stories):
    tok, _ = stories
    ex = TextExample("the movie", " was great .")
    p = tok("the movie")["input_ids"]
    c = tok(" was great .", add_special_tokens=False)["input_ids"]
    t = tokenize_example(tok, ex, completion_only_loss=True)
    assert t.ids == p + c + [tok.eos_token_id]
    assert t.targets == [False] * len(p) + [True] * (len(c) + 1)
    t_all = tokenize_example(tok, ex, completion_only_loss=False)
    assert t_all.targets == [False] + [True] * (len(t_all.ids) - 1)
    plain = tokenize_example(tok, TextExample("", "the movie was great ."), append_eos=False)
    assert plain.ids == tok("the movie was great .")["input_ids"]  # BOS + text, one tokenisation
    assert plain.targets == [False] + [True] * (len(plain.ids) - 1)


def test_packing_keeps_every_token_in_full_blocks():
    items = [Tokenized(list(range(k * 10, k * 10 + n)), [False] + [True] * (n - 1)) for k, n in enumerate([3, 5, 4, 6])]
    blocks = pack(items, 5)
    assert [len(b.ids) for b in blocks] == [5, 5, 5, 3]
    assert [i for b in blocks for i in b.ids] == [i for t in items for i in t.ids]
    assert all(b.targets[0] is False for b in blocks)  # nothing in the block predicts its first token
    assert blocks[0].targets == [False, True, True, False, True]  # the second example's BOS stays a non-target


def test_prepare_drops_examples_without_targets(stories):
    tok, _ = stories
    long_prompt = TextExample("a " * 50, " end")
    kept = prepare_sft(tok, [long_prompt, TextExample("", "short text")], max_length=8, packing=False)
    assert len(kept) == 1 and len(kept[0].ids) <= 8


def test_batch_order_is_a_function_of_seed_and_step():
    n, bs = 10, 4
    seen = [i for s in range(5) for i in batch_indices(s, bs, n, seed=3)]  # 20 = two full epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(3, bs, n, seed=3) == seen[12:16]
    assert batch_indices(0, bs, n, seed=4) != batch_indices(0, bs, n, seed=3)


# ------------------------------------------------------------------------------------------ loss


def test_token_nll_equals_cross_entropy(stories):
    """Slow reference: F.cross_entropy over shifted logits with non-targets ignored."""
    tok, model = stories
    items = [
        tokenize_example(tok, TextExample("the movie", " was great .")),
        tokenize_example(tok, TextExample("", "once upon a time")),
    ]
    b = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        nll, n = token_nll(model, b)
        logits = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).logits  # right padding: positions agree
    labels = b["input_ids"][:, 1:].masked_fill(~b["targets"][:, 1:], -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    assert int(n) == sum(sum(t.targets) for t in items)
    assert nll.item() == pytest.approx(ref.item(), rel=1e-5)


def _cfg(tmp_path, name, assets_dir, **kw):
    base = dict(
        model=str(assets_dir / "stories260K"),
        assets=str(assets_dir),
        output_dir=str(tmp_path / name),
        dataset=str(assets_dir / "rt-polarity" / "rt-polarity.pos"),
        eval_examples=16,
        batch_size=8,
        max_length=32,
        learning_rate=1e-3,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_accumulation_and_packing_runs(tmp_path, assets_dir):
    """batch 8 = 4 micro-batches of 2 (global token normaliser); packing runs on full blocks."""
    a = _rows_of(train_sft(_cfg(tmp_path, "a1", assets_dir, max_steps=2)))
    b = _rows_of(train_sft(_cfg(tmp_path, "a4", assets_dir, max_steps=2, grad_accum=4)))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["opt/grad_norm"] == pytest.approx(y["opt/grad_norm"], rel=1e-4)
    packed = train_sft(_cfg(tmp_path, "packed", assets_dir, max_steps=2, packing=True))
    assert packed["eval/loss"] > 0


def _rows_of(result):
    from pathlib import Path

    return _rows(Path(result["final"]).parent)


# Losses of the first 3 steps of the config in test_sft_end_to_end (torch 2.13 CPU, fp32).
PINNED = [4.4224, 3.9067, 3.9467]


@pytest.mark.slow
def test_sft_end_to_end_pinned_and_resume(tmp_path, assets_dir):
    from transformers import AutoModelForCausalLM

    both = f"{assets_dir / 'rt-polarity' / 'rt-polarity.pos'},{assets_dir / 'rt-polarity' / 'rt-polarity.neg'}"
    full = train_sft(_cfg(tmp_path, "full", assets_dir, dataset=both, max_steps=6, eval_every=3))
    rows = _rows(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "opt/lr", "opt/grad_norm"} <= set(rows[0]) and "eval/loss" in rows[2] and "eval/loss" in rows[5]
    # Trajectory pinned to 1e-3 relative: fp32 matmul order may differ across CPUs / BLAS builds.
    assert [r["loss"] for r in rows[:3]] == pytest.approx(PINNED, rel=1e-3)
    assert rows[5]["eval/loss"] < rows[2]["eval/loss"]
    # Interrupted after step 3, resumed to step 6: the same trajectory and the same weights.
    train_sft(_cfg(tmp_path, "part", assets_dir, dataset=both, max_steps=3))
    train_sft(_cfg(tmp_path, "part", assets_dir, dataset=both, max_steps=6, eval_every=3), resume=True)
    resumed = _rows(tmp_path / "part")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    m1 = AutoModelForCausalLM.from_pretrained(full["final"])
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "part" / "final"))
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), k


def test_sft_command_and_resume_flag(tmp_path, stories_path):
    from tether.cli import main

    (tmp_path / "d.txt").write_text("".join(f"review number {i} was fine .\n" for i in range(12)))
    args = [
        "sft",
        "--model",
        stories_path,
        "--dataset",
        str(tmp_path / "d.txt"),
        "--output_dir",
        str(tmp_path / "run"),
        "--eval_examples",
        "4",
        "--batch_size",
        "4",
        "--max_length",
        "16",
        "--progress",
        "false",
    ]
    assert main(args + ["--max_steps", "1"]) == 0
    assert main(args + ["--max_steps", "2", "--resume"]) == 0
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, stories_path):
    """torchrun with 2 CPU processes (gloo): each process takes half of the global batch and divides
    its NLL sum by the global token count, so the trajectory equals the 1-process one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "d.txt").write_text(
        "".join(f"review {i} was {'fine' if i % 2 else 'a long and dull mess'} .\n" for i in range(40))
    )
    flags = [
        "--model",
        stories_path,
        "--dataset",
        str(tmp_path / "d.txt"),
        "--eval_examples",
        "6",
        "--batch_size",
        "4",
        "--max_length",
        "16",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--progress",
        "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tether",
        "sft",
        *flags,
        "--output_dir",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tether.cli import main

    assert main(["sft", *flags, "--output_dir", str(tmp_path / "one")]) == 0
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    # Two half-batch gradients all-reduced against one batch, over three Adam steps: worst deviation of
    # the loss 6.5e-6 and of the held-out loss 3.1e-6 over the kernel settings (AVX2; ~3e-7 native and
    # SSE4.2: tests/tolerance_report.py).
    for a, b in zip(one, two):
        assert_close(b["loss"], a["loss"], abs=measured_tol(6.48e-6), what=f"loss, step {a['step']}")
        assert b["opt/grad_norm"] == pytest.approx(a["opt/grad_norm"], rel=1e-4)
    assert_close(two[-1]["eval/loss"], one[-1]["eval/loss"], abs=measured_tol(3.09e-6), what="eval/loss")
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 100 * measured_tol(6.48e-6)  # the runs moved
