"""Preference data: formats, sources, bad rows, tokenisation (as TRL), truncation, batching."""

import gzip
import json
import random

import pytest

from tether.data.preference import (
    PreferenceDataError,
    StepBatches,
    check_row,
    check_rows,
    collate_pairs,
    epoch_batches,
    implicit_prompt,
    load_preference_rows,
    pack_pairs,
    pair_width,
    read_raw_rows,
    sentiment_pairs,
    split_holdout,
    tokenize_pairs,
    truncate_pair,
)

HH = {
    "chosen": (
        "\n\nHuman: Can you help me?\n\nAssistant: Sure, what is it?"
        "\n\nHuman: A pen prank.\n\nAssistant: Sure, draw a smile."
    ),
    "rejected": (
        "\n\nHuman: Can you help me?\n\nAssistant: Sure, what is it?"
        "\n\nHuman: A pen prank.\n\nAssistant: Sure, stab them."
    ),
}
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(stories):
    return stories[0]


# ---------------------------------------------------------------- formats


def test_implicit_prompt_ends_at_the_last_assistant_turn():
    # Both answers start with "Sure, ": the common prefix runs past the marker, the prompt must not.
    p, c, r = implicit_prompt(HH["chosen"], HH["rejected"])
    assert p.endswith("\n\nHuman: A pen prank.\n\nAssistant:")
    assert (c, r) == (" Sure, draw a smile.", " Sure, stab them.")
    assert p + c == HH["chosen"] and p + r == HH["rejected"]


def test_implicit_prompt_without_marker_matches_trl():
    from trl.data_utils import extract_prompt

    ex = {"chosen": "The sky is blue today.", "rejected": "The sky is green today."}
    got = dict(zip(("prompt", "chosen", "rejected"), implicit_prompt(ex["chosen"], ex["rejected"])))
    assert got == extract_prompt(ex) == {"prompt": "The sky is", "chosen": " blue today.", "rejected": " green today."}


def test_explicit_rows_pass_through():
    row = {"prompt": "Once", "chosen": " upon a time", "rejected": " more", "extra": 1}
    assert check_row(row, 0) == {"prompt": "Once", "chosen": " upon a time", "rejected": " more"}


def test_conversational_rows_use_the_chat_template(tok):
    import copy

    t = copy.deepcopy(tok)
    user = [{"role": "user", "content": "Hi"}]
    implicit = {
        "chosen": user + [{"role": "assistant", "content": "Hello!"}],
        "rejected": user + [{"role": "assistant", "content": "Go away."}],
    }
    explicit = {"prompt": user, "chosen": implicit["chosen"][1:], "rejected": implicit["rejected"][1:]}
    for row in (implicit, explicit):
        out = check_row(row, 3, tokenizer=t, chat_template=TEMPLATE)
        assert out == {
            "prompt": "<|user|>Hi\n<|assistant|>",
            "chosen": "Hello!\n",
            "rejected": "Go away.\n",
            "templated": True,
        }


def test_conversational_rows_without_template_fail_clearly(tok):
    import copy

    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(PreferenceDataError, match="row 0: conversational data.*--chat_template"):
        check_row(row, 0, tokenizer=copy.deepcopy(tok))


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, "row 2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "row 2: field 'rejected' must be a string"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "row 2: field 'prompt' must be a string"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "row 2: field 'chosen' is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 2: 'chosen' and 'rejected' are identical"),
        (
            {"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: y"},
            "row 2: field 'chosen' is empty",
        ),
        ([1, 2], "row 2: expected an object"),
    ],
)
def test_bad_rows_name_the_row_and_field(row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(PreferenceDataError, match=message + ".*--skip_bad_rows"):
        check_rows([good, good, row, good])
    rows, skipped = check_rows([good, good, row, good], skip_bad_rows=True)
    assert len(rows) == 3 and sum(skipped.values()) == 1


def test_real_hh_rows_have_four_empty_chosen(assets_dir):
    with pytest.raises(PreferenceDataError, match="row 86: field 'chosen' is empty"):
        load_preference_rows("hh-rlhf", assets=str(assets_dir))
    rows = load_preference_rows("hh-rlhf", assets=str(assets_dir), skip_bad_rows=True)
    assert len(rows) == 2312 - 4
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in rows)


# ---------------------------------------------------------------- sources


def test_every_local_source_format_reads_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "e.parquet.gz", "wb") as f:
        f.write((tmp_path / "d.parquet").read_bytes())
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "f"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "g"))
    for name in ("a.json", "b.json", "c.jsonl.gz", "d.parquet", "e.parquet.gz", "f", "g"):
        assert load_preference_rows(str(tmp_path / name)) == rows, name
    assert load_preference_rows(rows) == rows
    assert load_preference_rows(datasets.Dataset.from_list(rows)) == rows
    with pytest.raises(PreferenceDataError, match="splits \\['train'\\], not 'test'"):
        read_raw_rows(str(tmp_path / "g"), split="test")


def test_missing_local_path_and_unreachable_hub_name_fail_clearly(tmp_path):
    with pytest.raises(PreferenceDataError, match="does not exist"):
        read_raw_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(PreferenceDataError, match="could not load dataset .* from the hub"):
        read_raw_rows("tether-test-nobody/no-such-dataset")


# ---------------------------------------------------------------- tokenisation and truncation


def test_tokenisation_matches_trl(tok):
    """TRL tokenises prompt and prompt + completion + EOS text, and splits at their common prefix."""
    rows = [check_row(HH, 0), {"prompt": "Once upon a time", "chosen": " there was a dog.", "rejected": " it rained."}]
    pairs, report = tokenize_pairs(rows, tok)
    for row, pair in zip(rows, pairs):
        p = tok(row["prompt"])["input_ids"]
        assert pair["prompt_ids"] == p and p[0] == tok.bos_token_id
        for side in ("chosen", "rejected"):
            full = tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"]
            assert pair["prompt_ids"] + pair[f"{side}_ids"] == full
    assert report.prompt_truncated == report.completion_truncated == 0


def test_truncation_hand_example():
    # BOS=1; prompt 1..10 (10 tokens), completions 20 and 5 tokens; max_length 16, prompt floor 8.
    p, c, r = [1] + list(range(100, 109)), list(range(200, 220)), list(range(300, 305))
    p2, c2, r2, pc, cc = truncate_pair(p, c, r, max_length=16, bos_id=1)
    assert p2 == [1] + list(range(102, 109))  # left-cut to 8 tokens = max_length // 2, BOS kept
    assert c2 == list(range(200, 208)) and r2 == r  # right-cut to the 8 tokens left
    assert pc and cc
    # Short completions let the prompt keep more than the floor.
    p3, c3, r3, pc3, cc3 = truncate_pair(p, c[:3], r[:2], max_length=12, bos_id=1)
    assert p3 == [1] + list(range(101, 109)) and c3 == c[:3] and pc3 and not cc3


def test_truncation_never_drops_completion_starts():
    rng = random.Random(0)
    for _ in range(500):
        p = [1] + [rng.randrange(3, 99) for _ in range(rng.randrange(0, 60))]
        c = [rng.randrange(3, 99) for _ in range(rng.randrange(1, 60))]
        r = [rng.randrange(3, 99) for _ in range(rng.randrange(1, 60))]
        L = rng.randrange(8, 80)
        mp = rng.choice([None, rng.randrange(2, 8)])
        p2, c2, r2, pc, cc = truncate_pair(p, c, r, max_length=L, max_prompt_length=mp, bos_id=1)
        assert len(p2) + max(len(c2), len(r2)) <= L
        assert (
            c2 == c[: len(c2)] and r2 == r[: len(r2)] and len(c2) >= 1 and len(r2) >= 1
        )  # completions keep their start
        assert p2[0] == 1 and p2[1:] == p[len(p) - len(p2) + 1 :]  # prompt keeps BOS and its end
        assert pc == (len(p2) < len(p)) and cc == (len(c2) < len(c) or len(r2) < len(r))


def test_truncation_counts_on_real_hh(tok, assets_dir):
    rows = load_preference_rows("hh-rlhf", assets=str(assets_dir), skip_bad_rows=True, limit=300)
    pairs, report = tokenize_pairs(rows, tok, max_length=128)
    assert report.pairs == len(rows) and report.prompt_truncated > 100 and report.completion_truncated > 100
    assert len(pairs) == len(rows) - report.dropped_identical
    assert all(pair_width(p) <= 128 for p in pairs)
    assert all(p["prompt_ids"][0] == tok.bos_token_id for p in pairs)


# ---------------------------------------------------------------- splitting, ordering, collating


def test_holdout_split_is_a_seeded_partition():
    tr, ho = split_holdout(100, 0.1, seed=3)
    assert len(ho) == 10 and sorted(tr + ho) == list(range(100))
    assert split_holdout(100, 0.1, seed=3) == (tr, ho) and split_holdout(100, 0.1, seed=4) != (tr, ho)


def test_step_batches_are_a_function_of_seed_and_step():
    widths = [random.Random(i).randrange(5, 100) for i in range(103)]
    a = StepBatches(widths, 8, seed=1)
    b = StepBatches(widths, 8, seed=1)
    steps = [a(s) for s in range(40)]
    assert [b(s) for s in reversed(range(40))] == steps[::-1]  # no hidden state: any order, any instance
    for e in range(3):  # each epoch: 12 disjoint full batches
        epoch = steps[12 * e : 12 * e + 12]
        flat = [i for batch in epoch for i in batch]
        assert len(flat) == len(set(flat)) == 96
    assert StepBatches(widths, 8, seed=2)(0) != steps[0]


def test_group_by_length_cuts_padding():
    widths = [random.Random(i).randrange(5, 200) for i in range(512)]

    def waste(batches):
        return sum(max(widths[i] for i in b) * len(b) - sum(widths[i] for i in b) for b in batches)

    plain = epoch_batches(widths, 8, seed=0, epoch=0, group_by_length=False)
    grouped = epoch_batches(widths, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(map(sorted, plain)) != sorted(map(sorted, grouped))
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert waste(grouped) < 0.1 * waste(plain)


def test_collate_puts_chosen_then_rejected_after_the_same_prompt():
    pairs = [
        {"prompt_ids": [1, 5], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [4, 4, 4, 2]},
    ]
    b = collate_pairs(pairs, pad_id=0)
    assert b.prompt_len == 2 and b.input_ids.shape == (4, 6)
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 2, 0], [0, 1, 6, 2, 0, 0], [1, 5, 9, 2, 0, 0], [0, 1, 4, 4, 4, 2]]
    assert b.mask.sum(-1).tolist() == [3, 2, 2, 4]


def test_pack_pairs_hand_example():
    """Sequences (prompt + completion): c0 = [1,5|7,8,2] (5), c1 = [1|6,2] (3), r0 = [1,5|9,2] (4),
    r1 = [1|4,4,4,2] (5). Width 5; first-fit decreasing (ties by index): c0 -> row 0, r1 -> row 1,
    r0 -> row 2, c1 -> row 3 (no row has room for 3 more)."""
    pairs = [
        {"prompt_ids": [1, 5], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [4, 4, 4, 2]},
    ]
    b = pack_pairs(pairs, pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 2], [1, 4, 4, 4, 2], [1, 5, 9, 2, 0], [1, 6, 2, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert b.seq.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # chosen 0, chosen 1, rejected 0, rejected 1
    assert b.src.tolist() == [1, 2, 3, 15, 16, 11, 12, 5, 6, 7, 8]  # r*W + position predicting each token
    assert b.targets.tolist() == [7, 8, 2, 6, 2, 9, 2, 4, 4, 4, 2]
    assert b.lengths.tolist() == [3, 2, 2, 4]
    flat = b.input_ids.reshape(-1)
    assert (flat[b.src + 1] == b.targets).all()  # the next token after each predicting position is its target


def test_packing_fills_rows_on_real_pairs(tok, assets_dir):
    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    pairs, _ = tokenize_pairs(sentiment_pairs(pos, neg, n=64, seed=0), tok)
    for start in range(0, 64, 16):
        chunk = pairs[start : start + 16]
        real = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in chunk)
        packed, padded = pack_pairs(chunk, pad_id=0), collate_pairs(chunk, pad_id=0)
        assert packed.input_ids.shape[1] <= padded.input_ids.shape[1]
        assert real / packed.input_ids.numel() > 0.75 > real / padded.input_ids.numel()


def test_sentiment_pairs_from_movie_reviews(assets_dir):
    pos = (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(errors="replace").splitlines()
    neg = (assets_dir / "rt-polarity" / "rt-polarity.neg").read_text(errors="replace").splitlines()
    rows = sentiment_pairs(pos, neg, n=50, seed=0)
    assert len(rows) == 50 and rows == sentiment_pairs(pos, neg, n=50, seed=0)
    pos_lines = {" ".join(line.split()) for line in pos}  # the builder normalises whitespace
    for r in rows:
        assert 2 <= len(r["prompt"].split()) <= 4
        assert r["prompt"] + r["chosen"] in pos_lines
    assert check_rows(rows)[0] == rows


def test_pack_pairs_with_shared_prompts_hand_example():
    """The pairs of test_pack_pairs_hand_example with shared prompts: each pair is one segment
    [prompt, chosen, rejected]; pair 0 = [1,5 | 7,8,2 | 9,2] (7), pair 1 = [1 | 6,2 | 4,4,4,2] (7). Width 7,
    one segment per row. A completion's positions continue from its prompt length; the first token of
    each completion is predicted by the last prompt token, the others by their own predecessor."""
    pairs = [
        {"prompt_ids": [1, 5], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": [4, 4, 4, 2]},
    ]
    b = pack_pairs(pairs, pad_id=0, share_prompts=True)
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 2, 9, 2], [1, 6, 2, 4, 4, 4, 2]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 4]]
    assert b.segment.tolist() == [[0] * 7, [1] * 7]
    assert b.branch.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 2]]
    assert b.seq.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert b.src.tolist() == [1, 2, 3, 7, 8, 1, 5, 7, 10, 11, 12]
    assert b.targets.tolist() == [7, 8, 2, 6, 2, 9, 2, 4, 4, 4, 2]
    assert b.lengths.tolist() == [3, 2, 2, 4]
    assert int((b.segment >= 0).sum()) == 14  # P + R_c + R_r: 7 + 7 positions instead of 17


def test_prefix_tree_mask_hand_example():
    """Row [p p c c c r r] (prompt 2, chosen 3, rejected 2) and a padding tail of one token: a chosen token
    sees the prompt and the chosen tokens up to itself; a rejected token the prompt and the rejected
    tokens up to itself, never the chosen ones; the padding token only itself."""
    import torch

    from tether.ops.attention import prefix_tree_mask

    segment = torch.tensor([[0, 0, 0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0]])
    m = prefix_tree_mask(segment, branch)[0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]


def test_shared_prompts_group_equal_prompts_and_pay_only_for_long_ones():
    """Sequences with equal prompts share one segment (here four completions of one prompt); ``auto``
    shares where the planned slots (rows x width) drop by SHARED_PROMPT_MIN_SAVING or more."""
    from tether.data.preference import pack_sequences, share_prompts_pays

    long_p, short_p = list(range(3, 43)), [1, 5]
    seqs = [(long_p, [7, 2]), (long_p, [8, 8, 2]), (short_p, [9, 2]), (long_p, [6, 2]), (long_p, [4, 2])]
    b = pack_sequences(seqs, pad_id=0, share_prompts=True)
    assert b.input_ids.shape == (2, 40 + 2 + 3 + 2 + 2)  # one 49-token segment; the 4-token one in a second row
    assert b.branch[0, 40:].tolist() == [1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert b.position_ids[0, 40:].tolist() == [40, 41, 40, 41, 42, 40, 41, 40, 41]
    assert b.input_ids[1, :4].tolist() == [1, 5, 9, 2] and b.segment[1].tolist() == [1] * 4 + [-1] * 45
    assert share_prompts_pays(seqs, "auto") and share_prompts_pays(seqs, "on") and not share_prompts_pays(seqs, "off")
    short = [([1, 5], list(range(3, 30))), ([1, 5], list(range(3, 28))), ([1, 6], [4, 2])]
    assert not share_prompts_pays(short, "auto")  # 2 shared prompt tokens out of 58: wider rows, no saving
