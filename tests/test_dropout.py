"""Dropout is off while training (unless ``keep_dropout``), on a real dropout model (tiny GPT-2).

Regression: DPO used to train with dropout on (``model.train()``), so at step 1, where π_θ = π_ref
and every margin is exactly 0, the loss was 0.6946 here instead of ln 2 = 0.6931, and the KL between
policy and reference was noisy and could be negative (TRL #506). GPT-2 matters here because its attention
dropout is functional (``dropout_p if self.training``), not only ``nn.Dropout`` modules."""

import json
import math

import pytest
import torch

from tether.distributed import Dist
from tether.trainers.dpo import DPOConfig, train_dpo

from conftest import dpo_log2_tol

PAIRS = [
    ("Once upon a time", " there was a happy cat.", " the cat was sad."),
    ("The little dog", " ran to the park and played.", " sat alone."),
    ("Lily wanted", " to share her toys with Tom.", " nothing at all."),
    ("One day, Ben", " found a shiny red ball.", " lost his hat."),
]


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory, stories_path):
    """A randomly initialised 2-layer GPT-2 with dropout 0.1 everywhere, with the stories260K tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2_dropout")
    tok = AutoTokenizer.from_pretrained(stories_path)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=512,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS * 4]  # 16 pairs
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def dpo_step1_loss(model, dataset, out, **kw) -> dict:
    cfg = DPOConfig(
        model=model,
        dataset=dataset,
        output_dir=str(out),
        max_steps=1,
        batch_size=4,
        max_length=32,
        reference="copy",
        eval_fraction=0.0,
        kl_prompts=0,
        progress=False,
        seed=0,
        **kw,
    )
    train_dpo(cfg)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    return first


def test_dpo_step1_loss_is_ln2_without_dropout(gpt2_path, pairs_file, tmp_path):
    """At step 1 π_θ = π_ref, so every implicit-reward margin is β·0 = 0 and the sigmoid DPO loss is
    -log σ(0) = ln 2 exactly (Rafailov et al. Eq. 7). With the model's dropout (keep_dropout) the
    policy's log-probs are those of a random sub-network, the margins are not 0, and the loss moves
    away from ln 2 (0.69458 measured, as before the fix; the dropout draw is seeded)."""
    off = dpo_step1_loss(gpt2_path, pairs_file, tmp_path / "off")
    assert off["loss"] == pytest.approx(math.log(2), abs=dpo_log2_tol(off, DPOConfig().beta))  # float32 rounding
    kept = dpo_step1_loss(gpt2_path, pairs_file, tmp_path / "kept", keep_dropout=True)["loss"]
    assert abs(kept - math.log(2)) > 1e-4


def _outputs_twice(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two forward passes on the same input, with gradients enabled (as in training)."""
    ids = torch.arange(1, 17).reshape(2, 8)
    device = next(model.parameters()).device
    a, b = (model(input_ids=ids.to(device)).logits for _ in range(2))
    return a.detach(), b.detach()


def _dropout_modules_training(model) -> list[str]:
    return [n for n, m in model.named_modules() if "Dropout" in type(m).__name__ and m.training]


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("keep_dropout", [False, True])
def test_sft_and_rm_setup_leave_dropout_off_unless_kept(gpt2_path, tmp_path, lora_r, keep_dropout):
    """The policy as SFT/DPO (``load_policy``) and the reward model (``load_reward_backbone``) hand it to
    their loops: no Dropout module in training mode and a deterministic forward pass (which also
    covers GPT-2's functional attention dropout and peft's LoRA dropout), unless keep_dropout."""
    from tether.trainers.reward_model import RMConfig, load_reward_backbone
    from tether.trainers.sft import SFTConfig
    from tether.training import load_policy

    lora = dict(lora_r=lora_r, lora_dropout=0.5, lora_target_modules=["c_attn"])
    common = dict(model=gpt2_path, output_dir=str(tmp_path), keep_dropout=keep_dropout, **lora)
    _, policy, _ = load_policy(SFTConfig(**common), Dist())
    _, rm = load_reward_backbone(RMConfig(**common), Dist())
    for model in (policy, rm):
        if lora_r:
            assert any("lora_dropout" in n for n, _ in model.named_modules())  # the LoRA dropout is there
        a, b = _outputs_twice(model)
        if keep_dropout:
            assert _dropout_modules_training(model)
            assert not torch.equal(a, b)
        else:
            assert _dropout_modules_training(model) == []
            assert torch.equal(a, b)
