"""Chat data everywhere, rewards that get the dataset row, column mapping, DatasetDict test splits
(tether/data/chat.py, prompts.py, text.py; rewards.py; the SFT, GRPO and DPO trainers).

The stories260K tokenizer has no chat template, so every test installs ``TEMPLATE`` (written here):
``<s>`` then ``role: content</s>`` per message, and ``assistant: `` as the generation prompt. On it
the assistant tokens can be listed by hand from the tokenizer's pieces, which is what the SFT
target tests compare against. Models are the real stories260K; runs are 2 steps (seconds).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tether.data.chat import assistant_spans, render_prompt
from tether.data.prompts import Prompt, load_prompts
from tether.data.text import column_map, rename_columns, row_to_example, tokenize_example
from tether.errors import UserError
from tether.measure import encode_prompts
from tether.rewards import CHAT_PROMPTS, CallableSource, RewardSet, reward_columns

import reward_fns

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

DIALOGUE = [
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time."},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "The end."},
]


@pytest.fixture()
def tok(stories_path):
    from tether.modeling import load_tokenizer

    return load_tokenizer(stories_path)  # a fresh one: tests install a template on it


def _save(tmp_path, name, splits: dict):
    import datasets

    path = tmp_path / name
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


# --------------------------------------------------------------------------------------------------
# SFT targets


def test_messages_targets_are_exactly_the_assistant_tokens(tok):
    """Rendered: '<s>user: Tell me a story.</s>assistant: Once upon a time.</s>user: More?</s>assistant:
    The end.</s>'. The trained tokens are each assistant turn's content and the template's '</s>'
    after it (the model must learn to end its turn), and nothing of the user turns or the
    'assistant: ' generation prompts: listed here from the tokenizer's pieces."""
    ex = row_to_example({"messages": DIALOGUE}, where="row 0", tokenizer=tok, chat_template=TEMPLATE)
    assert ex.completion == (
        "<s>user: Tell me a story.</s>assistant: Once upon a time.</s>user: More?</s>assistant: The end.</s>"
    )
    assert [ex.completion[a:b] for a, b in ex.spans] == ["Once upon a time.</s>", "The end.</s>"]
    t = tokenize_example(tok, ex)
    pieces = tok.convert_ids_to_tokens(t.ids)
    assert t.ids == tok(ex.completion, add_special_tokens=False)["input_ids"]  # BOS comes from the template, once
    assert pieces.count("<s>") == 1
    runs, cur = [], []
    for p, m in zip(pieces, t.targets):
        if m:
            cur.append(p)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert runs == [["▁Once", "▁upon", "▁a", "▁time", ".", "</s>"], ["▁The", "▁e", "nd", ".", "</s>"]]
    # every token outside those runs is a prompt token: no target
    assert sum(t.targets) == 11

    everything = row_to_example({"messages": DIALOGUE}, where="r", tokenizer=tok, assistant_only_loss=False)
    t_all = tokenize_example(tok, everything)
    assert t_all.ids == t.ids and t_all.targets == [False] + [True] * (len(t.ids) - 1)


def test_conversational_prompt_completion_trains_the_completion_only(tok):
    row = {"prompt": DIALOGUE[:1], "completion": DIALOGUE[1:2]}
    ex = row_to_example(row, where="r", tokenizer=tok, chat_template=TEMPLATE)
    t = tokenize_example(tok, ex)
    trained = [p for p, m in zip(tok.convert_ids_to_tokens(t.ids), t.targets) if m]
    assert trained == ["▁Once", "▁upon", "▁a", "▁time", ".", "</s>"]
    # the prompt part is the rendered prompt with its generation prompt: what the sampler continues
    assert ex.completion.startswith(render_prompt(tok, DIALOGUE[:1]).rstrip())
    whole = tokenize_example(tok, row_to_example(row, where="r", tokenizer=tok, completion_only_loss=False))
    assert sum(whole.targets) == len(whole.ids) - 1


def test_conversational_rows_without_a_template_name_the_flag(stories_path):
    from tether.modeling import load_tokenizer

    with pytest.raises(UserError, match="--chat_template"):
        row_to_example({"messages": DIALOGUE}, where="data.jsonl row 3", tokenizer=load_tokenizer(stories_path))
    with pytest.raises(UserError, match="row 3.*'messages' must be a list"):
        row_to_example({"messages": "hi"}, where="data.jsonl row 3")


def test_assistant_spans_skip_system_and_user_turns(tok):
    tok.chat_template = TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}] + DIALOGUE[:2]
    text, spans = assistant_spans(tok, msgs)
    assert [text[a:b] for a, b in spans] == ["Once upon a time.</s>"]


def test_generation_blocks_mark_the_assistant_tokens(tok):
    """A template that renders earlier assistant turns differently (upper-cased here, as templates
    that drop earlier reasoning do) has prefixes that are not prefixes of the whole text: the prefix
    method refuses it, and with {% generation %} blocks the targets are exactly the tokens of
    transformers' own assistant mask."""
    turn = "{{ m['content'] | upper if not loop.last else m['content'] }}"
    plain = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant: ' }}"
        + turn
        + "{{ eos_token }}{% else %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(UserError, match="not a prefix.*generation"):
        row_to_example({"messages": DIALOGUE}, where="r", tokenizer=tok, chat_template=plain)
    marked = plain.replace(
        "{{ 'assistant: ' }}" + turn + "{{ eos_token }}",
        "{{ 'assistant: ' }}{% generation %}" + turn + "{{ eos_token }}{% endgeneration %}",
    )
    ex = row_to_example({"messages": DIALOGUE}, where="r", tokenizer=tok, chat_template=marked)
    # a span starts at its first token's offset, which for '▁ONCE' includes the space before it
    assert [ex.completion[a:b].lstrip() for a, b in ex.spans] == ["ONCE UPON A TIME.</s>", "The end.</s>"]
    t = tokenize_example(tok, ex)
    mask = tok.apply_chat_template(DIALOGUE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert t.ids == list(mask["input_ids"]) and t.targets == [bool(m) for m in mask["assistant_masks"]]
    assert sum(t.targets) > 0


# --------------------------------------------------------------------------------------------------
# Column mapping


def test_column_map_reads_yaml_cli_and_field_flags():
    want = {"question": "prompt", "response_j": "chosen"}
    assert column_map({"question": "prompt", "response_j": "chosen"}) == want
    assert column_map("question=prompt,response_j=chosen") == want
    assert column_map("{question: prompt, response_j: chosen}") == want
    assert column_map(None, prompt="question", chosen="response_j", rejected="rejected") == want
    with pytest.raises(UserError, match="columns: 'question' is not SOURCE=TARGET"):
        column_map("question")
    with pytest.raises(UserError, match=r"data.jsonl: column\(s\) \['quesiton'\]"):
        rename_columns([{"question": "q"}], {"quesiton": "prompt"}, where="data.jsonl")


# --------------------------------------------------------------------------------------------------
# Prompts and rewards


def test_prompts_keep_their_columns_and_render_conversations(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"question": "Say cat.", "ground_truth": "cat"}\n'
        '{"question": [{"role": "user", "content": "Say dog."}], "ground_truth": "dog", "id": 7}\n'
    )
    rows = load_prompts(str(path), tokenizer=tok, chat_template=TEMPLATE, prompt_field="question")
    assert rows[0] == Prompt("Say cat.", "Say cat.", {"ground_truth": "cat"})
    assert rows[1].text == "<s>user: Say dog.</s>assistant: " and rows[1].conversational
    assert rows[1].columns == {"ground_truth": "dog", "id": 7}
    ids = encode_prompts(tok, [rows[1].text])[0]  # the template's BOS, not a second one from the tokenizer
    assert ids == tok(rows[1].text, add_special_tokens=False)["input_ids"] and ids.count(tok.bos_token_id) == 1
    cols = reward_columns(rows, completion_ids=[[5, 6], [7]])
    assert cols == {
        "ground_truth": ["cat", "dog"],
        "id": [None, 7],
        CHAT_PROMPTS: ["Say cat.", rows[1].prompt],
        "completion_ids": [[5, 6], [7]],
    }
    with pytest.raises(UserError, match="no 'prompt' field.*--prompt_field"):
        load_prompts(str(path), tokenizer=tok, chat_template=TEMPLATE)


def test_reward_functions_get_what_their_signature_names():
    """TRL's convention: fn(prompts, completions, **columns); older fn(completions) and
    fn(completions, prompts) keep working; conversational rows pass messages both ways."""
    prompts, comps = ["a", "b"], ["x", "yy"]
    cols = {
        "ground_truth": ["x", "z"],
        CHAT_PROMPTS: [[{"role": "user", "content": "a"}], "b"],
        "completion_ids": [[1], [2, 3]],
    }
    seen = {}

    def trl(prompts, completions, ground_truth, **kwargs):
        seen.update(prompts=prompts, completions=completions, gt=ground_truth, kw=sorted(kwargs))
        return [
            float(c == g) if isinstance(c, str) else float(c[0]["content"] == g)
            for c, g in zip(completions, ground_truth)
        ]

    assert CallableSource(trl)(prompts, comps, **cols).tolist() == [1.0, 0.0]
    assert seen == {
        "prompts": [[{"role": "user", "content": "a"}], "b"],
        "completions": [[{"role": "assistant", "content": "x"}], "yy"],
        "gt": ["x", "z"],
        "kw": ["completion_ids"],
    }
    assert CallableSource(lambda cs: [len(c) for c in cs])(prompts, comps, **cols).tolist() == [1.0, 2.0]
    assert CallableSource(lambda completions, prompts: [len(p) for p in prompts])(["a", "bb"], comps).tolist() == [
        1.0,
        2.0,
    ]
    with pytest.raises(UserError, match=r"needs \['answer'\].*columns: \['ground_truth'\]"):
        CallableSource(lambda completions, answer: [0.0] * 2)(prompts, comps, **cols)
    # a RewardSet passes the columns on (and the logged source too)
    rs = RewardSet(CallableSource(trl, name="gt"), [CallableSource(lambda completions: [0.0, 0.0], name="zero")])
    scores, metrics = rs(prompts, comps, **cols)
    assert scores.tolist() == [1.0, 0.0] and metrics["reward/zero"].tolist() == [0.0, 0.0]


def test_grpo_on_conversational_prompts_with_a_ground_truth_reward(stories_path, tmp_path):
    """2 GRPO steps from a datasets folder of conversational prompts: the reward function (TRL's
    signature) receives the messages, assistant-message completions, completion ids, and a
    ground_truth list aligned with the prompts (it asserts the pairing itself); evaluation prompts
    come from the folder's test split."""
    from tether.trainers.grpo import GRPOConfig, train_grpo

    words = ["cat", "dog", "sun", "tree", "ball", "bird", "fish", "cake"]
    row = lambda w: {"prompt": [{"role": "user", "content": f"Say {w}."}], "ground_truth": w}  # noqa: E731
    data = _save(tmp_path, "prompts", {"train": [row(w) for w in words], "test": [row("moon"), row("star")]})
    cfg = GRPOConfig(
        model=stories_path,
        output_dir=str(tmp_path / "grpo"),
        prompts=data,
        chat_template=TEMPLATE,
        reward="reward_fns:ground_truth_match",
        batch_size=8,
        samples_per_prompt=4,
        max_steps=2,
        max_new_tokens=6,
        eval_samples=1,
        progress=False,
        sample_every=0,
        seed=0,
    )
    reward_fns.CALLS.clear()
    out = train_grpo(cfg)
    train_calls, eval_calls = reward_fns.CALLS[:2], reward_fns.CALLS[2:]
    for c in train_calls:
        assert len(c["ground_truth"]) == 8 and set(c["ground_truth"]) <= set(words)
        assert all(c["ground_truth"][i] == c["ground_truth"][i - i % 4] for i in range(8))  # a group shares its row
        assert all(isinstance(p, list) and p[0]["role"] == "user" for p in c["prompts"])
        assert all(len(m) == 1 and m[0]["role"] == "assistant" for m in c["completions"])
        assert [len(ids) for ids in c["completion_ids"]] == [len(x) for x in c["completion_ids"]] and all(
            1 <= len(ids) <= 6 for ids in c["completion_ids"]
        )
    assert {g for c in eval_calls for g in c["ground_truth"]} == {"moon", "star"}  # the test split
    assert math.isfinite(out["metrics"]["reward/score"]) and "eval/reward/ground_truth_match" in out["metrics"]


# --------------------------------------------------------------------------------------------------
# SFT and DPO from datasets folders


def test_sft_on_messages_uses_the_test_split_for_eval(stories_path, tmp_path, tok):
    from tether.trainers.sft import SFTConfig, load_sft_data, train_sft

    conv = lambda a: {"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": a}]}  # noqa: E731
    train = [conv(s) for s in ["Tom ran.", "Lily sang.", "The dog sat.", "A cat slept.", "Ben ate.", "Mia hid."]]
    data = _save(tmp_path, "chat", {"train": train, "test": [conv("The sun set."), conv("It was fun.")]})
    cfg = SFTConfig(
        model=stories_path,
        output_dir=str(tmp_path / "sft"),
        dataset=data,
        chat_template=TEMPLATE,
        batch_size=2,
        max_steps=2,
        eval_examples=4,
        progress=False,
    )
    items, evals = load_sft_data(cfg, tok)
    assert (len(items), len(evals)) == (6, 2)  # nothing held out of train: the test split is the eval set
    trained = [tok.decode([i for i, m in zip(e.ids, e.targets) if m]) for e in evals]
    assert trained == ["The sun set.</s>", "It was fun.</s>"]
    out = train_sft(cfg)
    assert math.isfinite(out["eval/loss"])


def test_dpo_from_a_datasets_folder_with_mapped_columns(stories_path, tmp_path, tok):
    """Stack Exchange paired format (question / response_j / response_k) mapped by --*_field flags
    or a columns map gives the same pairs; the folder's test split is the held-out set; the first
    step's loss is ln 2 (policy = reference)."""
    from tether.trainers.dpo import DPOConfig, load_pairs, train_dpo

    def se(q, j, k):
        return {"question": q, "response_j": j, "response_k": k, "qid": 1}

    train = [
        se("The dog", " ran to the park.", " sat and cried."),
        se("Lily was", " very happy.", " very sad."),
        se("The sun", " was warm and bright.", " was gone."),
        se("Tom had", " a nice toy.", " a bad day."),
    ]
    data = _save(tmp_path, "se", {"train": train, "test": [se("A cat", " played.", " hissed.")]})
    base = dict(model=stories_path, dataset=data, batch_size=2, max_steps=2, progress=False, kl_prompts=0)
    by_flags = DPOConfig(
        output_dir=str(tmp_path / "a"),
        prompt_field="question",
        chosen_field="response_j",
        rejected_field="response_k",
        **base,
    )
    by_map = DPOConfig(
        output_dir=str(tmp_path / "b"), columns="question=prompt,response_j=chosen,response_k=rejected", **base
    )
    pairs_a, held_a, info = load_pairs(by_flags, tok)
    pairs_b, held_b, _ = load_pairs(by_map, tok)
    assert pairs_a == pairs_b and held_a == held_b
    assert (info["train_pairs"], info["eval_pairs"]) == (4, 1)
    assert tok.decode(held_a[0]["chosen_ids"]) == "played.</s>"
    out = train_dpo(dataclasses.replace(by_flags, max_steps=1))
    # step 1: policy = reference, so every log-ratio is 0 up to float32 rounding of two forward
    # layouts (cached padded reference vs packed policy: ~1e-6 per sequence), and the loss is ln 2
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(UserError, match="quesiton"):
        load_pairs(DPOConfig(output_dir=str(tmp_path / "c"), prompt_field="quesiton", **base), tok)


# --------------------------------------------------------------------------------------------------
# The commands: --chat_template FILE, --prompt_field, datasets folders


def test_commands_take_chat_prompts_from_a_datasets_folder(stories_path, tmp_path):
    """tether grpo / bon / kl read conversational prompts from a datasets folder with a mapped prompt
    column and a --chat_template file, through their input checks; the reward sees ground_truth."""
    import json

    from tether.cli import main

    tpl = tmp_path / "chat.jinja"
    tpl.write_text(TEMPLATE)
    rows = [
        {"question": [{"role": "user", "content": f"Say {w}."}], "ground_truth": w}
        for w in ["cat", "dog", "sun", "owl"]
    ]
    data = _save(tmp_path, "q", {"train": rows})
    common = ["--prompts", data, "--prompt_field", "question", "--chat_template", str(tpl), "--max_new_tokens", "4"]
    reward_fns.CALLS.clear()
    assert (
        main(
            [
                "grpo",
                "--model",
                stories_path,
                *common,
                "--reward",
                "reward_fns:ground_truth_match",
                "--batch_size",
                "4",
                "--samples_per_prompt",
                "2",
                "--max_steps",
                "1",
                "--eval_samples",
                "1",
                "--progress",
                "false",
                "--output_dir",
                str(tmp_path / "grpo"),
            ]
        )
        == 0
    )
    assert reward_fns.CALLS and all(len(c["ground_truth"]) == len(c["prompts"]) for c in reward_fns.CALLS)
    assert (
        main(
            [
                "bon",
                "--model",
                stories_path,
                *common,
                "--n",
                "1,2",
                "--reward",
                "reward_fns:ground_truth_match",
                "--output_dir",
                str(tmp_path / "bon"),
                "--progress",
                "false",
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "bon" / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "<s>user: Say cat.</s>assistant: "
    assert main(["kl", "--policy", stories_path, "--reference", stories_path, *common, "--samples", "2"]) == 0


def test_reward_model_data_maps_columns_and_uses_the_test_split(stories_path, tmp_path, tok):
    from tether.trainers.reward_model import RMConfig, load_rm_data

    rows = [{"question": f"Q{i}", "response_j": f" good {i}", "response_k": f" bad {i}"} for i in range(5)]
    data = _save(tmp_path, "se", {"train": rows, "validation": rows[:2]})
    cfg = RMConfig(
        model=stories_path,
        dataset=data,
        columns={"question": "prompt", "response_j": "chosen", "response_k": "rejected"},
    )
    train, evals = load_rm_data(cfg, tok)
    assert (len(train), len(evals)) == (5, 2)
    assert tok.decode(evals[1]["prompt_ids"], skip_special_tokens=True) == "Q1"


# --------------------------------------------------------------------------------------------------
# The same three runs on tiny random-init GPT-2 and Qwen2 models (stories260K above is a Llama)


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def tiny_model(request, tmp_path_factory, stories_path):
    """Folder of a random-init 2-layer model of the architecture, with stories260K's tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(stories_path)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if request.param == "gpt2":
        cfg = GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids)
    else:
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_chat_sft_grpo_and_mapped_dpo_on_other_architectures(tiny_model, tmp_path):
    from tether.trainers.dpo import DPOConfig, train_dpo
    from tether.trainers.grpo import GRPOConfig, train_grpo
    from tether.trainers.sft import SFTConfig, train_sft

    conv = [
        {"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": a}]}
        for a in ["Tom ran.", "Lily sang.", "The dog sat.", "Ben ate."]
    ]
    sft = train_sft(
        SFTConfig(
            model=tiny_model,
            output_dir=str(tmp_path / "sft"),
            chat_template=TEMPLATE,
            dataset=_save(tmp_path, "chat", {"train": conv, "test": conv[:1]}),
            batch_size=2,
            max_steps=2,
            max_length=64,
            progress=False,
        )
    )  # within the tiny model's 128 positions
    assert math.isfinite(sft["eval/loss"])

    words = ["cat", "dog", "sun", "owl"]
    prompts = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "ground_truth": w} for w in words]
    reward_fns.CALLS.clear()
    train_grpo(
        GRPOConfig(
            model=tiny_model,
            output_dir=str(tmp_path / "grpo"),
            prompts=_save(tmp_path, "p", {"train": prompts}),
            chat_template=TEMPLATE,
            reward="reward_fns:ground_truth_match",
            batch_size=4,
            samples_per_prompt=2,
            max_steps=1,
            max_new_tokens=4,
            eval_samples=1,
            progress=False,
            sample_every=0,
        )
    )
    assert reward_fns.CALLS[0]["ground_truth"][0] == reward_fns.CALLS[0]["ground_truth"][1]  # one group, one row

    pairs = [
        {"question": q, "response_j": j, "response_k": k}
        for q, j, k in [
            ("The dog", " ran.", " sat."),
            ("Lily was", " happy.", " sad."),
            ("Tom had", " a toy.", " a cold."),
        ]
    ]
    out = train_dpo(
        DPOConfig(
            model=tiny_model,
            output_dir=str(tmp_path / "dpo"),
            dataset=_save(tmp_path, "se", {"train": pairs}),
            columns={"question": "prompt", "response_j": "chosen", "response_k": "rejected"},
            eval_fraction=0.0,
            batch_size=2,
            max_steps=1,
            kl_prompts=0,
            max_length=64,
            progress=False,
        )
    )
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference (float32 rounding)
