"""Batches, position ids, completion scoring and sampling on the real stories260K."""

import pytest
import torch

from tether.modeling import completion_logits, completion_logps, make_batch, position_ids
from tether.ops.logprobs import apply_sampling_filters
from tether.sampling import sample

from conftest import assert_close, f32_tol, logit_magnitude


def test_make_batch_layout():
    b = make_batch([[1, 5], [1]], [[7, 8, 9], [4]], pad_id=0)
    assert b.prompt_len == 2
    assert b.input_ids.tolist() == [[1, 5, 7, 8, 9], [0, 1, 4, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.mask.tolist() == [[True, True, True], [True, False, False]]
    # right padding repeats the last position: no real token attends to it, so it is harmless
    assert position_ids(b.attention_mask).tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        make_batch([[]], [[1]], pad_id=0)


def test_padded_scoring_equals_unpadded(stories):
    """Left padding with explicit position ids reproduces each row scored alone."""
    tok, model = stories
    prompts = [tok("Once upon a time")["input_ids"], tok("Tom")["input_ids"]]
    comps = [tok("Once upon a time there was")["input_ids"][len(prompts[0]) :], [263, 304, 341, 265, 284, 414, 435]]
    batch = make_batch(prompts, comps, pad_id=tok.pad_token_id)
    lp = completion_logps(model, batch)
    for i in range(2):
        full = torch.tensor([prompts[i] + comps[i]])
        with torch.no_grad():
            logits = model(full).logits[0, len(prompts[i]) - 1 : -1]  # (n, V)
        naive = logits.log_softmax(-1).gather(-1, torch.tensor(comps[i])[:, None])[:, 0]
        # fp32 sdpa over a padded vs unpadded row sums in a different order: a token's log-prob carries
        # a few float32 spacings of the dot products its logits come from (logit and logsumexp).
        tol = f32_tol(2 * logit_magnitude(model, full))
        assert_close(lp[i, : len(comps[i])], naive, abs=tol, what=f"row {i}")
        assert (lp[i, len(comps[i]) :] == 0).all()


def test_sampling_masks_after_eos_and_is_seeded(stories):
    tok, model = stories
    prompts = [tok("Once upon a time")["input_ids"]] * 6
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b1, no_eos1 = sample(
        model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=60, generator=g1
    )
    b2, _ = sample(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=60, generator=g2)
    assert torch.equal(b1.input_ids, b2.input_ids)
    comp = b1.completion_ids
    for i in range(len(prompts)):
        n = int(b1.mask[i].sum())
        assert b1.mask[i, :n].all() and not b1.mask[i, n:].any()
        eos_pos = (comp[i, :n] == tok.eos_token_id).nonzero()
        if no_eos1[i]:
            assert len(eos_pos) == 0 and n == 60
        else:  # the EOS counts and is the last counted token
            assert eos_pos.flatten().tolist() == [n - 1]


def test_sampled_distribution_is_the_scored_one(stories):
    """With top-k the scored log-probs use the same filtered distribution: every sampled token
    has finite log-prob and lies in the top-k set."""
    tok, model = stories
    prompts = [tok("The cat")["input_ids"]] * 4
    g = torch.Generator().manual_seed(0)
    b, _ = sample(
        model,
        prompts,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=12,
        generator=g,
        top_k=3,
        temperature=0.7,
    )
    lp = completion_logps(model, b, temperature=0.7, top_k=3)
    assert torch.isfinite(lp[b.mask]).all()
    raw = completion_logits(model, b)
    top3 = raw.topk(3, dim=-1).indices
    assert (top3 == b.completion_ids[..., None]).any(-1)[b.mask].all()


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_sampling_filters(logits, top_p=0.8)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = apply_sampling_filters(logits, top_p=0.81)
    assert torch.isfinite(out).tolist() == [[True, True, True, False]]
