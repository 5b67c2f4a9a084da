"""Convert a karpathy/llama2.c PyTorch checkpoint (``.pt`` from its ``train.py``) to a Hugging Face
Llama folder (``config.json``, ``model.safetensors``, tokenizer files).

Used by :func:`tether.assets.resolve` to build ``stories260K`` from the hub repo ``karpathy/tinyllamas``.

The one non-obvious step is the rotary layout. llama2.c rotates *interleaved* pairs of each head's
query/key features, ``(x0, x1), (x2, x3), ...`` (``model.py::apply_rotary_emb`` views the last axis as
``(-1, 2)``); Hugging Face Llama rotates the two *halves*, ``(x_i, x_{i + d/2})``
(``rotate_half``). Reordering the output rows of ``wq`` and ``wk`` within each head, even features
first then odd ones, makes the two forwards identical: this is ``permute`` in transformers'
``convert_llama_weights_to_hf.py`` and the inverse of ``permute_reverse`` in llama2.c's ``export.py``.
``wv``, ``wo`` and the MLP are untouched (attention scores ``q.k`` are invariant to permuting q and k
features the same way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError

ROPE_THETA = 10000.0  # llama2.c model.py::precompute_freqs_cis default; not stored in the checkpoint
_PREFIX = "_orig_mod."  # torch.compile wraps the module; train.py saves the wrapper's state dict

LLAMA2C_LICENSE = """MIT License

Copyright (c) 2023 Andrej

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


class Llama2cError(UserError):
    pass


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c -> HF row order of a query/key projection.

    w: (n_heads * head_dim, dim), rows of head h at ``h * head_dim + 2 * i + {0, 1}`` (interleaved
    pairs). Returns the same shape with rows of head h at ``h * head_dim + {i, i + head_dim // 2}``
    (halves), as in transformers ``convert_llama_weights_to_hf.py::permute``.
    """
    rows, dim = w.shape
    head_dim = rows // n_heads
    # (n_heads, head_dim/2 pairs, 2 members, dim) -> (n_heads, 2, head_dim/2, dim): members become halves
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def load_llama2c_checkpoint(ckpt_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict without the torch.compile prefix, model_args) of a llama2.c ``train.py`` checkpoint."""
    # weights_only: the file comes from the network; llama2.c checkpoints hold only tensors and plain types
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise Llama2cError(
            f"{ckpt_path} is not a llama2.c train.py checkpoint: expected a dict with 'model' and 'model_args', "
            f"found {found}"
        )
    state = {k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in ckpt["model"].items()}
    return state, dict(ckpt["model_args"])


def llama2c_to_hf_state_dict(state: dict[str, torch.Tensor], args: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Rename (and permute) llama2.c weights to ``LlamaForCausalLM`` names; returns (hf_state, LlamaConfig kwargs).

    Sizes are read from the tensors (``hidden_dim`` may be None in ``model_args``) and checked against
    ``model_args``.
    """
    n_layers, n_heads = int(args["n_layers"]), int(args["n_heads"])
    n_kv_heads = int(args.get("n_kv_heads") or n_heads)
    needed = ["tok_embeddings.weight", "norm.weight"]
    for i in range(n_layers):
        needed += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        needed += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        needed += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise Llama2cError(
            f"llama2.c checkpoint lacks {missing[:4]}{' ...' if len(missing) > 4 else ''} "
            f"(model_args n_layers={n_layers})"
        )
    vocab_size, dim = state["tok_embeddings.weight"].shape
    hidden_dim = state["layers.0.feed_forward.w1.weight"].shape[0]
    for key, got in (("dim", dim), ("vocab_size", vocab_size), ("hidden_dim", hidden_dim)):
        if args.get(key) is not None and int(args[key]) != got:
            raise Llama2cError(f"model_args {key}={args[key]} disagrees with the weights ({got})")
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise Llama2cError(
            f"model_args dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: need dim divisible "
            "by n_heads, an even head_dim and n_heads divisible by n_kv_heads"
        )
    output = state.get("output.weight", state["tok_embeddings.weight"])
    tied = torch.equal(output, state["tok_embeddings.weight"])  # llama2.c ties them (shared Parameter)

    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = output
    for i in range(n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        hf[dst + "self_attn.q_proj.weight"] = permute_rotary(state[src + "attention.wq.weight"], n_heads)
        hf[dst + "self_attn.k_proj.weight"] = permute_rotary(state[src + "attention.wk.weight"], n_kv_heads)
        hf[dst + "self_attn.v_proj.weight"] = state[src + "attention.wv.weight"]
        hf[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
        hf[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        hf[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
        hf[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        hf[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
    config = dict(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=dim // n_heads,
        hidden_act="silu",
        max_position_embeddings=int(args.get("max_seq_len") or 2048),
        rms_norm_eps=float(args.get("norm_eps") or 1e-5),
        rope_theta=ROPE_THETA,
        tie_word_embeddings=tied,
        # llama2.c's sentencepiece ids: unk 0, bos 1, eos 2, no pad
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return {k: v.to(torch.float32).contiguous() for k, v in hf.items()}, config


def _tokenizer(tokenizer_path: Path):
    """A fast LlamaTokenizer from a sentencepiece ``.model``, a ``tokenizer.json`` or a tokenizer folder."""
    from transformers import AutoTokenizer, LlamaTokenizerFast

    if tokenizer_path.is_dir():
        return AutoTokenizer.from_pretrained(str(tokenizer_path))
    if tokenizer_path.suffix == ".json":
        return LlamaTokenizerFast(tokenizer_file=str(tokenizer_path))
    if tokenizer_path.suffix != ".model":
        raise Llama2cError(f"tokenizer {tokenizer_path}: expected a sentencepiece .model, a tokenizer.json or a folder")
    try:
        import sentencepiece  # noqa: F401  (transformers needs it, plus protobuf, to read the .model)
    except ImportError as e:
        raise ImportError(
            f"reading the sentencepiece tokenizer {tokenizer_path} needs `pip install 'tether[download]'` "
            "(sentencepiece, protobuf)"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        # from_pretrained finds the sentencepiece file under its canonical name and converts it to a fast
        # tokenizer; llama2.c prepends bos (sentencepiece id 1) to every sequence and never eos
        shutil.copyfile(tokenizer_path, Path(tmp) / "tokenizer.model")
        return LlamaTokenizerFast.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False)


def convert_llama2c_checkpoint(
    ckpt_path: str | os.PathLike, tokenizer_path: str | os.PathLike, dest_dir: str | os.PathLike
) -> Path:
    """Write a Hugging Face Llama folder at ``dest_dir`` from a llama2.c checkpoint and its tokenizer.

    ckpt_path: ``.pt`` saved by llama2.c ``train.py`` (``{"model": state_dict, "model_args": {...}}``).
    tokenizer_path: the sentencepiece ``tok*.model`` it was trained with (needs the ``download`` extra),
    or an already converted ``tokenizer.json`` / tokenizer folder.
    The folder is written in a temporary sibling and moved in file by file, ``config.json`` last, so an
    interrupted conversion never leaves a folder that looks complete.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_path, dest = Path(tokenizer_path), Path(dest_dir)
    state, args = load_llama2c_checkpoint(ckpt_path)
    hf_state, config_kwargs = llama2c_to_hf_state_dict(state, args)
    tokenizer = _tokenizer(tokenizer_path)
    if len(tokenizer) != config_kwargs["vocab_size"]:
        raise Llama2cError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the checkpoint "
            f"{ckpt_path} has vocab_size {config_kwargs['vocab_size']}"
        )

    config = LlamaConfig(**config_kwargs)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    # a tied lm_head is the embedding itself, so it has no entry of its own
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise Llama2cError(f"conversion bug: HF Llama weights missing {missing}, unexpected {unexpected}")

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "LICENSE-llama2c").write_text(LLAMA2C_LICENSE)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            os.replace(Path(tmp) / name, dest / name)
    return dest
