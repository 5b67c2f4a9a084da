"""Large prompt files are read on demand: line offsets over the memory-mapped file, each prompt parsed
and tokenised when a step draws it (``data.text.LineRows``, ``data.prompts.PromptTable``,
``measure.EncodedPrompts``). What they return must equal what the eager readers return, errors included;
what they hold must not grow with the rows beyond the offsets. (Start-up time and peak memory on 10^6
rows: benchmarks/large_data.py, docs/data.md.)"""

from __future__ import annotations

import json

import pytest

from tether import measure
from tether.data.prompts import PromptTable, load_prompts, prompt_texts
from tether.data.text import LineRows, read_rows
from tether.errors import UserError
from tether.measure import EncodedPrompts, encode_prompts, prompt_ids


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_line_rows_equal_read_rows(tmp_path):
    """Blank lines, surrounding spaces, a line of Unicode spaces, non-ASCII text, a missing final newline."""
    txt = _write(tmp_path / "p.txt", "  Once upon\n\n \u3000 \nLa niña\t\nlast line")
    rows = [{"prompt": "a"}, {"prompt": "b", "x": 1}, {"prompt": [{"role": "user", "content": "é"}]}]
    jl = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n   \n" + json.dumps(rows[2]))
    for spec in (txt, jl):
        lazy = LineRows.open(spec)
        assert lazy is not None and list(lazy) == read_rows(spec)
        assert lazy[-1] == read_rows(spec)[-1] and lazy[1:] == read_rows(spec)[1:]
    # what the offsets cannot reproduce falls back to the eager reader: str.splitlines()'s other breaks
    assert LineRows.open(_write(tmp_path / "cr.txt", "a\rb\n")) is None
    assert LineRows.open(_write(tmp_path / "ls.txt", "a\u2028b\n")) is None
    assert LineRows.open(_write(tmp_path / "p.json", "[]")) is None


def test_prompt_table_equals_load_prompts_and_its_errors(tmp_path):
    good = _write(tmp_path / "good.jsonl", "".join(json.dumps({"q": f"p{i}", "k": i}) + "\n" for i in range(5)))
    eager, lazy = load_prompts(good, prompt_field="q"), load_prompts(good, prompt_field="q", lazy=True)
    assert isinstance(lazy, PromptTable) and list(lazy) == eager and lazy[1:3] == eager[1:3]
    assert list(prompt_texts(lazy)) == [p.text for p in eager]
    bad_json = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    no_field = _write(tmp_path / "nofield.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')
    bad_type = _write(tmp_path / "badtype.jsonl", '{"prompt": 3}\n')
    for spec, kw in (
        (bad_json, {}),
        (no_field, {}),
        (bad_type, {}),
        (no_field, {"columns": "typo=prompt"}),  # the mapping typo is reported before the row error
        (good, {"columns": "typo=prompt", "prompt_field": "q"}),
    ):
        with pytest.raises(UserError) as e_eager:
            load_prompts(spec, **kw)
        with pytest.raises(UserError) as e_lazy:
            load_prompts(spec, lazy=True, **kw)
        assert str(e_lazy.value) == str(e_eager.value)


def test_large_prompt_file_is_tokenised_only_where_steps_draw(tmp_path, stories, monkeypatch):
    """10^4 rows, above a lowered eager limit: the table holds 16 bytes of offsets a row, and only the
    prompts asked for are tokenised (the same ids as encode_prompts); a length error names the row."""
    tok, _ = stories
    n = 10_000
    spec = _write(tmp_path / "big.jsonl", "".join(json.dumps({"prompt": f"The dog {i} ran"}) + "\n" for i in range(n)))
    table = load_prompts(spec, lazy=True)
    assert len(table) == n and table.rows.starts.nbytes + table.rows.ends.nbytes == 16 * n
    texts = prompt_texts(table)
    assert isinstance(prompt_ids(tok, texts), list)  # under the limit: tokenised at start-up, as always
    monkeypatch.setattr(measure, "EAGER_ENCODE_PROMPTS", 1000)
    ids = prompt_ids(tok, texts)
    assert isinstance(ids, EncodedPrompts) and ids.encoded == 0
    used = [7, 4242, 9999, 7]
    got = [ids[i] for i in used]
    assert ids.encoded == 3  # row 7 once: cached
    assert got == encode_prompts(tok, [texts[i] for i in used])
    short = EncodedPrompts(tok, texts, max_prompt_length=2)
    with pytest.raises(UserError, match="prompt 4242 has"):
        short[4242]


def _pairs_file(path, n: int, *, bad: bool = False):
    rows = []
    for i in range(n):
        rows.append({"q": f"Story {i % 7}:", "good": f" the dog {i} ran home happy", "bad": f" the cat {i} sat"})
    rows[3]["bad"] = rows[3]["good"]  # identical: a bad row (skipped with skip_bad_rows)
    if not bad:
        rows.pop(3)
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("max_length", [None, 6])  # 6: truncation, and pairs identical after it (dropped)
def test_large_preference_file_gives_the_same_pairs(tmp_path, stories, stories_path, monkeypatch, max_length):
    """dpo's data above a lowered EAGER_PAIRS (read in chunks of 16 rows into a PairStore) equals the
    in-memory path pair for pair: train, held-out (first eval_pairs), counts, skipped rows."""
    from tether.data import preference
    from tether.trainers.dpo import DPOConfig, load_pairs

    tok, _ = stories
    spec = _pairs_file(tmp_path / "pairs.jsonl", 300, bad=True)
    cfg = DPOConfig(
        model=stories_path, dataset=spec, output_dir=str(tmp_path / "run"), columns="q=prompt,good=chosen,bad=rejected",
        skip_bad_rows=True, eval_fraction=0.2, eval_pairs=20, max_length=max_length,
        max_prompt_length=3 if max_length else None,
    )  # fmt: skip
    eager = load_pairs(cfg, tok)
    monkeypatch.setattr(preference, "EAGER_PAIRS", 50)
    real = preference.load_large_pairs
    monkeypatch.setattr("tether.trainers.dpo.load_large_pairs", lambda *a, **kw: real(*a, chunk=16, **kw))
    large = load_pairs(cfg, tok)
    assert isinstance(large[0], preference.PairStore)
    assert list(large[0]) == eager[0] and large[1] == eager[1] and large[2] == eager[2]
    assert large[2]["skipped_rows"] == 1 and large[2]["eval_pairs"] == 20
    assert (large[0] + large[1])[len(eager[0])] == eager[1][0]
    # without skip_bad_rows, the same error
    strict = DPOConfig(**{**cfg.__dict__, "skip_bad_rows": False})
    monkeypatch.setattr(preference, "EAGER_PAIRS", 10**9)
    with pytest.raises(UserError) as e_eager:
        load_pairs(strict, tok)
    monkeypatch.setattr(preference, "EAGER_PAIRS", 50)
    with pytest.raises(UserError) as e_large:
        load_pairs(strict, tok)
    assert str(e_large.value) == str(e_eager.value) and "row 3" in str(e_large.value)


def test_grpo_on_a_prompt_file_tokenised_on_demand_trains_the_same(tmp_path, stories_path, monkeypatch):
    """Two GRPO steps from a 300-line prompts file: prompts tokenised at start-up, then with a lowered
    EAGER_ENCODE_PROMPTS as the steps draw them. Same prompts, same ids, same arithmetic: the metrics
    are equal exactly."""
    from tether.trainers.grpo import GRPOConfig, train_grpo

    spec = _write(tmp_path / "prompts.txt", "".join(f"The dog {i} ran\n" for i in range(300)))

    def run(name):
        cfg = GRPOConfig(
            model=stories_path, prompts=spec, output_dir=str(tmp_path / name), batch_size=4, samples_per_prompt=2,
            max_new_tokens=4, max_steps=2, progress=False, sample_every=0, eval_max_prompts=2, eval_samples=1,
            reward="vader", seed=0, report_to="none", save_checkpoints=False,
        )  # fmt: skip
        return train_grpo(cfg).history

    eager = run("eager")
    monkeypatch.setattr(measure, "EAGER_ENCODE_PROMPTS", 10)
    encoded = []
    real = EncodedPrompts.__getitem__
    monkeypatch.setattr(EncodedPrompts, "__getitem__", lambda self, i: encoded.append(i) or real(self, i))
    lazy = run("lazy")
    assert lazy == eager
    assert 0 < len(set(encoded)) <= 2 * 2  # two steps of two prompts each
