"""Reward model: the Bradley–Terry loss (hand values), scoring at the last token (equal to plain
transformers), RewardModelSource, and an end-to-end run on movie-review preference pairs."""

import json
import math

import pytest
import torch

from tether.distributed import Dist
from tether.ops.reward_model import bradley_terry_loss
from tether.rewards import RewardModelSource, build_reward, sequence_scores
from tether.runs import save_final
from tether.trainers.reward_model import RMConfig, load_reward_backbone, train_reward_model

from conftest import assert_close, f32_tol

# ------------------------------------------------------------------------------------------ BT loss


def test_bt_loss_hand_values():
    """-log σ(g): g = 0 -> log 2; g = ln 3 -> log(1 + 1/3) = log(4/3); g = -ln 3 -> log 4."""
    c = torch.tensor([0.0, math.log(3.0), 0.0])
    r = torch.tensor([0.0, 0.0, math.log(3.0)])
    loss, stats = bradley_terry_loss(c, r)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3) + math.log(4)) / 3, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-7)


def test_bt_loss_margin_and_gradient():
    """Llama 2 Eq. 2: a margin m shifts the logit, -log σ(g - m); with g = m = ln 3 the loss is log 2.
    d/ds_w of -log σ(s_w - s_l) = -σ(-(s_w - s_l)) = -1/(1 + 3) at g = ln 3; the mean divides by B = 2."""
    c = torch.tensor([math.log(3.0), math.log(3.0)], requires_grad=True)
    r = torch.zeros(2)
    loss, _ = bradley_terry_loss(c, r, margin=math.log(3.0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss, _ = bradley_terry_loss(c, r)
    loss.backward()
    assert c.grad.tolist() == pytest.approx([-0.25 / 2, -0.25 / 2], abs=1e-7)
    per_pair_margin = torch.tensor([0.0, math.log(3.0)])
    loss, _ = bradley_terry_loss(c.detach(), r, margin=per_pair_margin)
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, abs=1e-6)


def test_bt_loss_is_finite_for_huge_gaps_and_checks_shapes():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.zeros(2))
    assert loss.item() == pytest.approx(100.0, abs=1e-4)  # (200 + ~0) / 2; naive log(sigmoid) gives inf
    with pytest.raises(ValueError, match="must both be \\(B,\\)"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# ------------------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny_rm(stories_path, tmp_path_factory):
    """A reward model made by tether rm's loader from stories260K (untrained, with a visible head)."""
    tok, model = load_reward_backbone(RMConfig(model=stories_path, seed=0), Dist())
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("rm")
    return str(save_final(model.eval(), out, tokenizer=tok))


TEXTS = ["the movie was great .", "a dull film", "once upon a time there was a very long and boring story"]


def test_scores_equal_plain_transformers(tiny_rm):
    """final/ loads with AutoModelForSequenceClassification and gives the same scores, batched
    (right padding, pad_token_id in the config) and one text at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    assert hf.config.pad_token_id == tok.pad_token_id is not None
    assert tok.padding_side == "right"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        batched = hf(**enc).logits[:, 0]
        single = torch.stack([hf(**tok(t, return_tensors="pt")).logits[0, 0] for t in TEXTS])
        ours = sequence_scores(hf, enc["input_ids"], enc["attention_mask"])
    assert batched.std() > 0.1  # the texts get visibly different scores
    # A batch of 3 padded rows, batches of 2 and one row alone run attention and matmuls over other
    # shapes: a score carries a few float32 spacings of the dot products it is accumulated from.
    with torch.no_grad():
        hidden = hf(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
    tol = f32_tol((hidden.abs() @ hf.score.weight.abs().t()).max())
    assert_close(ours, batched, abs=tol, what="batched")
    assert_close(ours, single, abs=tol, what="one row at a time")
    src = RewardModelSource(tiny_rm, batch_size=2)
    assert_close(src([""] * 3, TEXTS), single, abs=tol, what="RewardModelSource")


def test_left_padding_scores_the_same(tiny_rm):
    """Position ids from the attention mask make left-padded rows score like unpadded ones."""
    src = RewardModelSource(tiny_rm)
    tok = src.tokenizer
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        left = sequence_scores(src.model, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(left, src([""] * 3, TEXTS), atol=1e-5, rtol=1e-5)


def test_reward_model_source_joins_prompt_and_completion(tiny_rm):
    src = build_reward(f"proxy={tiny_rm}")
    assert isinstance(src, RewardModelSource) and src.name == "proxy"
    a = src(["the movie", "a dull"], [" was great .", " film"])
    b = src(["", ""], ["the movie was great .", "a dull film"])
    assert a.dtype == torch.float32 and a.shape == (2,)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_accumulation_gives_the_full_batch_step(stories_path, tmp_path, assets_dir):
    """batch 8 in one micro-batch == batch 8 as 4 micro-batches of 2 (loss weighted by m / batch)."""
    runs = {}
    for accum in (1, 4):
        cfg = RMConfig(
            model=stories_path,
            assets=str(assets_dir),
            dataset="rt-polarity",
            limit=48,
            eval_fraction=0.0,
            output_dir=str(tmp_path / f"a{accum}"),
            batch_size=8,
            grad_accum=accum,
            max_steps=2,
            max_length=24,
            learning_rate=1e-3,
            progress=False,
        )
        train_reward_model(cfg)
        runs[accum] = [json.loads(x) for x in (tmp_path / f"a{accum}" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[1], runs[4]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["opt/grad_norm"] == pytest.approx(b["opt/grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_reward_model_learns_movie_review_sentiment(stories_path, tmp_path, assets_dir):
    """Definition of done: on pairs (positive snippet chosen over negative snippet) the held-out
    accuracy is well above chance. 213 held-out pairs: chance is 0.50 ± 0.034, so > 0.60 is ~3σ;
    this config reached 0.68 when written."""
    cfg = RMConfig(
        model=stories_path,
        assets=str(assets_dir),
        dataset="rt-polarity",
        eval_fraction=0.04,
        output_dir=str(tmp_path / "rm"),
        batch_size=32,
        max_steps=120,
        max_length=56,
        learning_rate=3e-4,
        progress=False,
        seed=0,
    )
    result = train_reward_model(cfg)
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rm/accuracy", "rm/margin", "opt/lr", "opt/grad_norm"} <= set(rows[0])
    assert rows[-1]["eval/rm/accuracy"] == result["eval/rm/accuracy"]
    assert result["eval/rm/accuracy"] > 0.60
    assert result["eval/loss"] < math.log(2)  # better than the untrained (constant) model
    src = RewardModelSource(result["final"])
    pos = src([""] * 2, ["a moving , beautiful and funny film .", "one of the best films of the year ."])
    assert torch.isfinite(pos).all()


def test_rm_command_on_jsonl_pairs(tmp_path, stories_path):
    """Same data formats as DPO: explicit prompt rows; final/ is a reward source."""
    from tether.cli import main

    rows = [{"prompt": f"review {i}:", "chosen": " great , moving", "rejected": " dull , boring"} for i in range(10)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "rm",
                "--model",
                stories_path,
                "--dataset",
                str(tmp_path / "p.jsonl"),
                "--output_dir",
                str(tmp_path / "rm"),
                "--eval_fraction",
                "0.2",
                "--batch_size",
                "4",
                "--max_steps",
                "2",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    last = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"loss", "rm/accuracy", "eval/loss", "eval/rm/accuracy"} <= set(last)
    assert build_reward(str(tmp_path / "rm"))(["review 1:"], [" great"]).shape == (
        1,
    )  # a run folder resolves to final/
