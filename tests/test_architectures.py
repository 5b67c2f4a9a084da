"""Any architecture: LoRA's default targets, gradient checkpointing, epochs, report_to, and rank-0
printing, on tiny random-init GPT-2, Llama and Qwen2 models.

The three models share stories260K's tokenizer (vocabulary 512) and are built with dropout on
everywhere it exists (GPT-2's modules, Llama's and Qwen2's functional attention dropout), so a test
that expects dropout off can fail."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tether.errors import UserError
from tether.modeling import load_causal_lm
from tether.training import (
    TrainConfig,
    adapt_model,
    is_checkpointed,
    lora_targets,
    set_train_mode,
    with_epochs,
)

from conftest import dpo_log2_tol

ROOT = Path(__file__).resolve().parents[1]

PAIRS = [
    ("Once upon a time", " there was a happy cat.", " the cat was sad."),
    ("The little dog", " ran to the park and played.", " sat alone."),
    ("Lily wanted", " to share her toys with Tom.", " nothing at all."),
    ("One day, Ben", " found a shiny red ball.", " lost his hat."),
]

# The module-name suffixes LoRA must adapt with all-linear: every Linear/Conv1D but the LM head.
LINEAR = {
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "qwen2": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
}
N_LAYERS = 2


def _config(arch: str, tok):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        return GPT2Config(
            n_positions=128,
            n_embd=32,
            n_layer=N_LAYERS,
            n_head=2,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            **ids,
        )
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.1,
        **ids,
    )
    return LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories_path):
    """arch -> folder of a random-init 2-layer model of that architecture, with stories260K's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for arch in LINEAR:
        path = tmp_path_factory.mktemp(f"tiny_{arch}")
        AutoTokenizer.from_pretrained(stories_path).save_pretrained(path)
        # transformers 5 picks the tokenizer class from the folder's model type (Qwen2's adds
        # <|endoftext|> as token 512), so the model is sized for the tokenizer as it reloads there.
        (path / "config.json").write_text(json.dumps({"model_type": arch}))
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_config(arch, tok)).save_pretrained(path)
        out[arch] = str(path)
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    out.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS * 4))
    return str(out)  # 16 pairs


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _dpo_cfg(model, dataset, out, **kw):
    from tether.trainers.dpo import DPOConfig

    base = dict(
        model=model,
        dataset=dataset,
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        max_length=32,
        eval_fraction=0.0,
        kl_prompts=0,
        progress=False,
        learning_rate=1e-2,
        report_to="none",
    )
    return DPOConfig(**{**base, **kw})


# ---------------------------------------------------------------- LoRA on any architecture


def test_lora_targets_reads_all_linear_in_any_spelling():
    assert TrainConfig().lora_target_modules == ["all-linear"]
    assert lora_targets(["all-linear"]) == "all-linear" and lora_targets("ALL-LINEAR") == "all-linear"
    assert lora_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("arch", list(LINEAR))
def test_lora_default_adapts_every_linear_layer_but_the_head(tiny, arch):
    model = adapt_model(load_causal_lm(tiny[arch]), TrainConfig(lora_r=4))
    adapted = {name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    expected = {
        f"base_model.model.{'transformer.h' if arch == 'gpt2' else 'model.layers'}.{i}.{s}"
        for i in range(N_LAYERS)
        for s in LINEAR[arch]
    }
    assert adapted == expected  # the head (lm_head) is not adapted, nor anything else
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("arch", list(LINEAR))
def test_lora_dpo_with_no_target_module_flag(tiny, pairs_file, tmp_path, arch):
    """LoRA DPO for 2 steps with lora_target_modules left at its default; final/ (merged) loads with
    AutoModelForCausalLM and differs from the start only in the adapted layers' weights."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    from tether.trainers.dpo import train_dpo

    train_dpo(_dpo_cfg(tiny[arch], pairs_file, out, lora_r=4, lora_alpha=8))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # π_θ = π_ref at step 1 (B = 0, no dropout)
    start = AutoModelForCausalLM.from_pretrained(tiny[arch]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert set(final) == set(start)  # merged: a plain model, no lora_* tensors
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert changed and all(any(f".{s}." in k for s in LINEAR[arch]) for k in changed), sorted(changed)


# ---------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(model, ids):
    """Token-mean NLL of ``ids`` (B, L): (logits, every trainable parameter's gradient, bytes of the
    distinct storages autograd keeps for the backward pass — inside a checkpointed layer, none)."""
    model.zero_grad(set_to_none=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, sum(saved.values())


def _count_calls(monkeypatch, module) -> list:
    """Calls of ``module``'s forward, recomputations included (forward hooks are not run when
    torch.utils.checkpoint recomputes, so the class's forward is wrapped instead)."""
    calls, cls = [], type(module)
    inner = cls.forward

    def forward(self, *args, **kwargs):
        if self is module:
            calls.append(1)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_recomputes_and_changes_no_gradient(tiny, monkeypatch, arch, lora_r):
    """With gradient_checkpointing the layers' insides run twice per forward + backward (the
    recomputation: layer 0's MLP runs twice, once without; autograd keeps under half the bytes), the forward equals the
    eval-mode one (dropout really off, although the model is in train mode) and every gradient equals
    the one without checkpointing. Recomputation repeats the same float32 operations in the same
    order on CPU, so the results are equal up to at most a few ulps: tolerance 1e-6 relative."""
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 12))
    runs = {}
    for gc in (False, True):
        torch.manual_seed(0)  # the same LoRA init in both
        model = adapt_model(load_causal_lm(tiny[arch]), TrainConfig(lora_r=lora_r, gradient_checkpointing=gc))
        set_train_mode(model, keep_dropout=False)
        assert is_checkpointed(model) == gc and model.training == gc
        layer = model.get_base_model() if lora_r else model
        layer = layer.transformer.h[0] if arch == "gpt2" else layer.model.layers[0]
        calls = _count_calls(monkeypatch, layer.mlp)
        runs[gc] = (*_loss_and_grads(model, ids), len(calls))
    (logits0, grads0, saved0, calls0), (logits1, grads1, saved1, calls1) = runs[False], runs[True]
    assert (calls0, calls1) == (1, 2)
    assert saved1 < 0.5 * saved0, (saved1, saved0)  # the layers' activations (and weights) are not kept
    torch.testing.assert_close(logits1, logits0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-6 * grads0[name].abs().max().item())


def test_dpo_with_gradient_checkpointing_starts_at_ln2(tiny, pairs_file, tmp_path):
    """A DPO run on the dropout-0.1 GPT-2 with gradient_checkpointing: the policy trains in train
    mode (checkpointing needs it), yet step 1's loss is ln 2 exactly as in eval mode, because every
    dropout probability was set to 0 (with dropout on it would not be: tests/test_dropout.py)."""
    from tether.trainers.dpo import train_dpo

    cfg = _dpo_cfg(tiny["gpt2"], pairs_file, tmp_path / "gc", gradient_checkpointing=True, reference="copy")
    train_dpo(cfg)
    row = _metrics(tmp_path / "gc")[0]
    # dpo_log2_tol: float32 rounding of the sequence log-prob sums the loss is computed from (conftest).
    assert row["loss"] == pytest.approx(math.log(2), abs=dpo_log2_tol(row, cfg.beta))


# ---------------------------------------------------------------- epochs


def test_with_epochs_derives_max_steps_by_hand():
    cfg = TrainConfig(max_steps=100, batch_size=4)
    assert with_epochs(cfg, 10, per_step=4) is cfg  # epochs unset: max_steps stands
    assert with_epochs(TrainConfig(epochs=2, max_steps=100), 10, per_step=4).max_steps == 5  # 20 examples / 4
    assert with_epochs(TrainConfig(epochs=1), 10, per_step=4).max_steps == 3  # 2.5 -> 3: the last step wraps
    assert with_epochs(TrainConfig(epochs=0.1), 30, per_step=3).max_steps == 1  # 0.1 x 30 / 3 = 1 despite rounding
    assert with_epochs(TrainConfig(epochs=0.01), 10, per_step=4).max_steps == 1  # at least one step
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(UserError, match="epochs"):
            with_epochs(TrainConfig(epochs=bad), 10, per_step=4)


def test_dpo_epochs_sets_the_number_of_steps(tiny, pairs_file, tmp_path):
    """16 pairs, batch 4, 1.5 epochs -> 6 steps (max_steps=100 is replaced)."""
    from tether.trainers.dpo import train_dpo

    train_dpo(_dpo_cfg(tiny["llama"], pairs_file, tmp_path / "ep", epochs=1.5, max_steps=100, log_every=1))
    assert [r["step"] for r in _metrics(tmp_path / "ep")] == [1, 2, 3, 4, 5, 6]


def test_grpo_epochs_count_prompts(tiny, tmp_path):
    """Online: an epoch is a pass over the prompts. 6 prompts, batch 4 = 2 prompts x 2 samples per
    step, 1 epoch -> 3 steps."""
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.online import train_online

    cfg = GRPOConfig(
        model=tiny["qwen2"],
        output_dir=str(tmp_path / "grpo"),
        epochs=1,
        max_steps=100,
        batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=4,
        progress=False,
        report_to="none",
        sample_every=0,
    )
    prompts = [p for p, _, _ in PAIRS] + ["A bird", "The sun"]
    result = train_online(cfg, prompts=prompts, reward=lambda completions: [float(len(c)) for c in completions])
    assert [h["step"] for h in result["history"]] == [1, 2, 3]


def test_sft_and_rm_with_lora_checkpointing_and_epochs(tiny, pairs_file, tmp_path):
    """The two other trainers with every new field at once: SFT (Llama) on 10 texts, batch 4,
    2 epochs -> 5 steps; a reward model (GPT-2; LoRA on all linear layers, the fresh score head
    trained whole) on 16 pairs, batch 8, 1 epoch -> 2 steps; both checkpointed, both final/ load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tether.trainers.reward_model import RMConfig, train_reward_model
    from tether.trainers.sft import SFTConfig, train_sft

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c, _ in (PAIRS * 3)[:10]))  # 10 texts
    common = dict(lora_r=4, gradient_checkpointing=True, progress=False, report_to="none", learning_rate=1e-2)
    sft = train_sft(
        SFTConfig(
            model=tiny["llama"],
            dataset=str(texts),
            eval_dataset=str(texts),
            output_dir=str(tmp_path / "sft"),
            epochs=2,
            batch_size=4,
            max_length=32,
            **common,
        )
    )
    assert [r["step"] for r in _metrics(tmp_path / "sft")] == [1, 2, 3, 4, 5] and math.isfinite(sft["eval/loss"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    train_reward_model(
        RMConfig(
            model=tiny["gpt2"],
            dataset=pairs_file,
            eval_fraction=0.0,
            output_dir=str(tmp_path / "rm"),
            epochs=1,
            batch_size=8,
            max_length=32,
            **common,
        )
    )
    assert [r["step"] for r in _metrics(tmp_path / "rm")] == [1, 2]
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")


# ---------------------------------------------------------------- report_to


def test_report_to_parsing():
    from tether.trackers import parse_report_to

    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" TensorBoard , wandb,wandb") == ["tensorboard", "wandb"]
    assert parse_report_to("none") == [] and parse_report_to(["trackio"]) == ["trackio"]
    assert parse_report_to(str(["wandb", "tensorboard"])) == [
        "wandb",
        "tensorboard",
    ]  # TRL's YAML list, as the str field reads it
    for bad in ("mlflow", "none,wandb"):
        with pytest.raises(UserError, match="report_to"):
            parse_report_to(bad)


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_report_to_missing_package_is_a_one_line_error(monkeypatch, tmp_path, name):
    from tether.runs import RunDir

    monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError, installed or not
    with pytest.raises(UserError, match=rf"report_to={name} needs the {name} package.*pip install 'tether\[{name}\]'"):
        RunDir(tmp_path, report_to=f"tensorboard,{name}")


def test_report_to_tensorboard_none_and_a_mirrored_tracker(monkeypatch, tmp_path):
    """tensorboard writes tb/; none writes only metrics.jsonl; wandb (a stand-in module here) gets
    every logged scalar with its step, and is finished on close."""
    from tether.runs import RunDir

    logged, finished = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(
        log=lambda row, step: logged.append((step, row)), finish=lambda: finished.append(kw["name"])
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for report_to in ("tensorboard", "none", "wandb"):
        run = RunDir(tmp_path / report_to, report_to=report_to)
        run.log(1, {"loss": 0.5, "note": "text"})
        run.log(2, {"loss": 0.25})
        run.close()
        assert [r["step"] for r in _metrics(tmp_path / report_to)] == [1, 2]
        assert (tmp_path / report_to / "tb").exists() == (report_to == "tensorboard")
    assert logged == [(1, {"loss": 0.5}), (2, {"loss": 0.25})] and finished == ["wandb"]


# ---------------------------------------------------------------- rank 0 prints


def test_other_ranks_print_nothing(tiny, pairs_file, tmp_path):
    """A whole run in a process with RANK=1 (WORLD_SIZE=1, so no process group is needed) prints
    nothing on stdout (unquietened, it prints the JSON summary there) and nothing on stderr (no log
    lines, warnings or progress bar); RANK unset (this process) is not quietened. ~10 s."""
    from tether.distributed import quiet_other_ranks

    assert quiet_other_ranks() is False
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "tether",
        "dpo",
        "--model",
        tiny["llama"],
        "--dataset",
        pairs_file,
        "--max_steps",
        "1",
        "--batch_size",
        "4",
        "--max_length",
        "32",
        "--eval_fraction",
        "0",
        "--kl_prompts",
        "0",
        "--output_dir",
        str(tmp_path / "run"),
        "--report_to",
        "none",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr.strip() == "", proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_print_each_line_once(tiny, pairs_file, tmp_path):
    """``torchrun --nproc_per_node 2 -m tether dpo``: the final JSON summary appears once on stdout,
    and every log line on stderr once (rank 1 is silent). Slow: two processes import torch (~30 s)."""
    flags = [
        "--model",
        tiny["gpt2"],
        "--dataset",
        pairs_file,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--max_length",
        "32",
        "--eval_fraction",
        "0.25",
        "--kl_prompts",
        "0",
        "--progress",
        "true",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp_path / "two"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tether",
        "dpo",
        *flags,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one JSON object: a second copy would not parse
    assert summary["final"].endswith("final")
    logs = [ln for ln in proc.stderr.splitlines() if ln.startswith(("INFO ", "WARNING "))]
    assert logs, proc.stderr[-2000:]
    assert len(logs) == len(set(logs)), [ln for ln in logs if logs.count(ln) > 1]
