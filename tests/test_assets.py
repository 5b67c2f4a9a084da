"""The asset resolver and the llama2.c -> Hugging Face conversion behind its stories260K download.

Nothing can be downloaded here, so the download is tested by round trip: a fake hub serves a llama2.c
checkpoint written from the real HF stories260K (by this file's own export, llama2.c ``export.py``'s
``permute_reverse``) and a sentencepiece model rebuilt from its tokenizer.json; ``resolve`` converts them
back, and the result must equal the real folder. An independent llama2.c forward (rotary on
interleaved pairs, as llama2.c ``model.py``) checks that the exported checkpoint really means, in
llama2.c's convention, what the HF model means, so the round trip cannot pass with a permutation that
is wrong in both directions.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tether import assets, llama2c
from tether.assets import AssetError, resolve, resolve_model

HUB_REPO = "karpathy/tinyllamas"


# ---------------------------------------------------------------- llama2.c side, written independently


def permute_reverse(w, n_heads):
    """llama2.c export.py::permute_reverse: HF (halves) -> llama2.c (interleaved pairs) row order."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_to_llama2c_checkpoint(model) -> dict:
    """What llama2.c train.py saves, from an HF Llama: torch.compile prefix, tied output, model_args
    exactly as train.py builds them (no hidden_dim / norm_eps: llama2.c derives or defaults them)."""
    cfg, sd = model.config, model.state_dict()
    emb = sd["model.embed_tokens.weight"].clone()
    out = {"tok_embeddings.weight": emb, "norm.weight": sd["model.norm.weight"], "output.weight": emb}
    for i in range(cfg.num_hidden_layers):
        h, l = f"model.layers.{i}.", f"layers.{i}."
        out[l + "attention.wq.weight"] = permute_reverse(sd[h + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[l + "attention.wk.weight"] = permute_reverse(sd[h + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        out[l + "attention.wv.weight"] = sd[h + "self_attn.v_proj.weight"]
        out[l + "attention.wo.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[l + "feed_forward.w1.weight"] = sd[h + "mlp.gate_proj.weight"]
        out[l + "feed_forward.w2.weight"] = sd[h + "mlp.down_proj.weight"]
        out[l + "feed_forward.w3.weight"] = sd[h + "mlp.up_proj.weight"]
        out[l + "attention_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[l + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
    model_args = dict(
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size,
        multiple_of=4,
        max_seq_len=cfg.max_position_embeddings,
        dropout=0.0,
    )
    state = {"_orig_mod." + k: v.clone() if k != "output.weight" else emb for k, v in out.items()}
    return {
        "model": state,
        "model_args": model_args,
        "iter_num": 0,
        "best_val_loss": 1.0,
        "config": {"batch_size": 128},
    }


def llama2c_forward(sd, args, ids):
    """llama2.c model.py Transformer.forward for ids (B, T) -> logits (B, T, V), float32."""
    dim, n_heads, n_kv = args["dim"], args["n_heads"], args["n_kv_heads"]
    hd, eps = dim // n_heads, 1e-5
    B, T = ids.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs = torch.outer(torch.arange(T).float(), freqs)  # (T, hd/2)
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # rotate interleaved pairs (x0, x1), (x2, x3), ...
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, T, H, hd/2) each
        return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], -1).flatten(3)

    h = sd["tok_embeddings.weight"][ids]  # (B, T, dim)
    for i in range(args["n_layers"]):
        p = lambda name: sd[f"layers.{i}.{name}.weight"]  # noqa: E731
        x = rms(h, p("attention_norm"))
        q = rope((x @ p("attention.wq").T).view(B, T, n_heads, hd))
        k = rope((x @ p("attention.wk").T).view(B, T, n_kv, hd))
        v = (x @ p("attention.wv").T).view(B, T, n_kv, hd)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))  # llama2.c repeat_kv
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, T, dim) @ p("attention.wo").T
        x = rms(h, p("ffn_norm"))
        h = h + (F.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def sentencepiece_from_tokenizer_json(path: Path, out: Path) -> Path:
    """Rebuild a llama2.c-style sentencepiece BPE model (train_vocab settings: byte_fallback, identity
    normalisation) from a tokenizer.json converted from one: pieces in id order, bytes <0xNN> typed BYTE,
    normal pieces scored -(rank) as sentencepiece's BPE trainer scores them."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = json.loads(path.read_text())["model"]["vocab"]
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(vocab)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.split_digits = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = True
    m.normalizer_spec.escape_whitespaces = True
    rank = 0
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        p = m.pieces.add(piece=piece, score=0.0)
        if i == 0:
            p.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif i in (1, 2):
            p.type = pb.ModelProto.SentencePiece.CONTROL
        elif piece.startswith("<0x") and len(piece) == 6:
            p.type = pb.ModelProto.SentencePiece.BYTE
        else:
            p.type, p.score, rank = pb.ModelProto.SentencePiece.NORMAL, -float(rank), rank + 1
    out.write_bytes(m.SerializeToString())
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lines(assets_dir):
    return (assets_dir / "rt-polarity" / "rt-polarity.pos").read_text(encoding="latin-1").splitlines()


@pytest.fixture(scope="module")
def text_ids(stories, lines):
    """(2, 200) real tokenized text: two windows of rt-polarity reviews."""
    tok, _ = stories
    ids = tok(" ".join(lines[:80]))["input_ids"]
    assert len(ids) >= 400
    return torch.tensor([ids[:200], ids[200:400]])


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory, stories, stories_path):
    """The two files of hub repo karpathy/tinyllamas folder stories260K, rebuilt from the real HF folder."""
    pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("hub")
    torch.save(hf_to_llama2c_checkpoint(stories[1]), root / "stories260K.pt")
    sentencepiece_from_tokenizer_json(Path(stories_path) / "tokenizer.json", root / "tok512.model")
    return {"stories260K/stories260K.pt": root / "stories260K.pt", "stories260K/tok512.model": root / "tok512.model"}


def _fake_hub(hub_files, calls):
    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        assert repo_id == HUB_REPO and filename in hub_files, (repo_id, filename)
        return str(hub_files[filename])

    return hf_hub_download


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, hub_files):
    """resolve('stories260K') with no assets folder: fake hub download + conversion into the cache."""
    import huggingface_hub

    calls = []
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TETHER_ASSETS")
        mp.setenv("TETHER_CACHE", str(cache))
        mp.setattr(huggingface_hub, "hf_hub_download", _fake_hub(hub_files, calls))
        path = resolve("stories260K")
        assert sorted(f for _, f in calls) == sorted(hub_files)
        again = resolve_model("stories260K")  # cached now: no second download
    assert len(calls) == 2 and again == str(path)
    assert path == cache / "assets" / "stories260K"
    return path


# ---------------------------------------------------------------- conversion


def test_exported_checkpoint_means_the_same_in_llama2c(stories, text_ids, hub_files):
    """The test's llama2.c export, run by an independent llama2.c forward, reproduces the HF logits;
    the HF weights read as llama2.c weights without permute_reverse do not."""
    _, model = stories
    state, args = llama2c.load_llama2c_checkpoint(hub_files["stories260K/stories260K.pt"])
    args["n_kv_heads"] = args["n_kv_heads"] or args["n_heads"]
    with torch.no_grad():
        ref = model(text_ids).logits
        ours = llama2c_forward(state, args, text_ids)
        assert (ours - ref).abs().max() < 1e-4  # measured 3e-5: float32 rounding of
        # two attention implementations on logits of magnitude ~20
        wrong, hf = dict(state), model.state_dict()
        for i in range(args["n_layers"]):
            for w, proj in (("wq", "q_proj"), ("wk", "k_proj")):
                wrong[f"layers.{i}.attention.{w}.weight"] = hf[f"model.layers.{i}.self_attn.{proj}.weight"]
        assert (llama2c_forward(wrong, args, text_ids) - ref).abs().max() > 0.1


def test_download_converts_to_the_real_folder(downloaded, stories_path, stories, text_ids):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tether.modeling import load_causal_lm

    real = Path(stories_path)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "LICENSE-llama2c",
    ):
        assert (downloaded / name).is_file(), name
    assert not list(downloaded.parent.glob(".stories260K.tmp*"))  # temporary folder cleaned up

    ignore = {"transformers_version", "_name_or_path"}
    got = {k: v for k, v in AutoConfig.from_pretrained(downloaded).to_dict().items() if k not in ignore}
    want = {k: v for k, v in AutoConfig.from_pretrained(real).to_dict().items() if k not in ignore}
    assert got == want

    # permuting rows is exact: the weights are bit-identical to the real conversion
    got_w, want_w = load_file(downloaded / "model.safetensors"), load_file(real / "model.safetensors")
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        assert torch.equal(got_w[k], want_w[k]), k

    model = load_causal_lm(str(downloaded))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        diff = (model(text_ids).logits - stories[1](text_ids).logits).abs().max()
    assert diff < 1e-5


def test_sentencepiece_model_converts_to_the_real_tokenizer(downloaded, stories_path, hub_files, lines):
    """The rebuilt tok512.model tokenizes like the real tokenizer (checked with sentencepiece itself), and
    its conversion is the real tokenizer.json; bos is prepended, never eos; decode inverts encode."""
    import sentencepiece as spm

    from tether.modeling import load_tokenizer

    real = Path(stories_path)
    sp = spm.SentencePieceProcessor(model_file=str(hub_files["stories260K/tok512.model"]))
    tok, real_tok = load_tokenizer(str(downloaded)), load_tokenizer(str(real))
    # single spaces only: sentencepiece's remove_extra_whitespaces collapses runs of spaces, the HF conversion
    # (transformers LlamaConverter, real folder included) keeps them
    sample = [s.strip() for s in lines[:1000] + ["Once upon a time, Lily saw 3 cats. ÿ 日本"]]
    got, want = tok(sample)["input_ids"], real_tok(sample)["input_ids"]
    assert got == want
    assert got == [[1] + ids for ids in sp.encode(sample)]
    assert json.loads((downloaded / "tokenizer.json").read_text()) == json.loads((real / "tokenizer.json").read_text())
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 512)
    assert [tok.decode(ids, skip_special_tokens=True) for ids in got[:50]] == sample[:50]


def test_wrong_rotary_permutation_fails_the_round_trip(
    monkeypatch, tmp_path, hub_files, stories_path, stories, text_ids
):
    """Control for the round trip: without the permutation the converted model is far off."""
    from tether.modeling import load_causal_lm

    monkeypatch.setattr(llama2c, "permute_rotary", lambda w, n_heads: w)
    out = llama2c.convert_llama2c_checkpoint(
        hub_files["stories260K/stories260K.pt"], Path(stories_path) / "tokenizer.json", tmp_path / "m"
    )
    with torch.no_grad():
        diff = (load_causal_lm(str(out))(text_ids).logits - stories[1](text_ids).logits).abs().max()
    assert diff > 0.1


def test_tokenizer_json_is_copied(tmp_path, hub_files, stories_path):
    """An already converted tokenizer.json (no sentencepiece needed) is kept as is, with bos/eos known."""
    from transformers import AutoTokenizer

    real = Path(stories_path) / "tokenizer.json"
    out = llama2c.convert_llama2c_checkpoint(hub_files["stories260K/stories260K.pt"], real, tmp_path / "m")
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(real.read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("the movie")["input_ids"][0] == 1


def test_conversion_errors_name_the_problem(tmp_path, hub_files, stories_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(llama2c.Llama2cError, match=r"bad\.pt.*'model' and 'model_args'"):
        llama2c.convert_llama2c_checkpoint(bad, Path(stories_path) / "tokenizer.json", tmp_path / "m")

    ckpt = torch.load(hub_files["stories260K/stories260K.pt"], weights_only=True)
    ckpt["model_args"]["n_layers"] = 6
    torch.save(ckpt, bad)
    with pytest.raises(llama2c.Llama2cError, match=r"layers\.5\.attention\.wq\.weight.*n_layers=6"):
        llama2c.convert_llama2c_checkpoint(bad, Path(stories_path) / "tokenizer.json", tmp_path / "m")

    ckpt["model_args"]["n_layers"], ckpt["model_args"]["vocab_size"] = 5, 32000
    torch.save(ckpt, bad)
    with pytest.raises(llama2c.Llama2cError, match="vocab_size=32000 disagrees"):
        llama2c.convert_llama2c_checkpoint(bad, Path(stories_path) / "tokenizer.json", tmp_path / "m")

    with pytest.raises(llama2c.Llama2cError, match=r"tokenizer .*vocab\.txt"):
        llama2c.convert_llama2c_checkpoint(
            hub_files["stories260K/stories260K.pt"], tmp_path / "vocab.txt", tmp_path / "m"
        )
    assert not (tmp_path / "m" / "config.json").exists()


def test_permute_rotary_maps_pairs_to_halves():
    """Hand-derived: a head of dim 8 holds pairs (0,1) (2,3) (4,5) (6,7); HF wants the pairs' first members
    (0,2,4,6) as the first half and the second members (1,3,5,7) as the second half. (head_dim 4 would not
    tell the direction apart: that permutation is its own inverse.)"""
    w = torch.arange(16.0).view(16, 1)  # 2 heads x head_dim 8, dim 1
    assert llama2c.permute_rotary(w, 2).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(permute_reverse(llama2c.permute_rotary(w, 2), 2), w)


# ---------------------------------------------------------------- resolver


def _fake_asset(root: Path, name="rt-polarity", files=("rt-polarity.pos", "rt-polarity.neg")) -> Path:
    (root / name).mkdir(parents=True)
    for f in files:
        (root / name / f).write_text("x\n")
    return root / name


@pytest.fixture
def no_download(monkeypatch):
    def fail(dest):
        raise AssertionError("must not download")

    for name in assets.ASSETS:
        monkeypatch.setitem(assets._DOWNLOADERS, name, fail)


def test_lookup_order_explicit_then_env_then_cache(tmp_path, monkeypatch, no_download):
    explicit, env, cache = (_fake_asset(tmp_path / d) for d in ("explicit", "env", "cache/assets"))
    monkeypatch.setenv("TETHER_ASSETS", str(env.parent))
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    assert resolve("rt-polarity", explicit.parent) == explicit
    assert resolve("rt-polarity") == env
    monkeypatch.delenv("TETHER_ASSETS")
    assert resolve("rt-polarity") == cache
    assert resolve("rt-polarity", download=False) == cache


def test_missing_or_incomplete_folders_are_named(tmp_path, monkeypatch, no_download):
    incomplete = _fake_asset(tmp_path / "a", files=("rt-polarity.pos",))
    with pytest.raises(AssetError, match=f"{incomplete}.*missing or incomplete.*rt-polarity.neg"):
        resolve("rt-polarity", incomplete.parent)
    with pytest.raises(AssetError, match=f"{tmp_path / 'a' / 'hh-rlhf'}.*missing or incomplete"):
        resolve("hh-rlhf", tmp_path / "a")  # the assets folder exists, the asset does not
    with pytest.raises(AssetError, match=f"{tmp_path / 'nowhere'} does not exist"):
        resolve("rt-polarity", tmp_path / "nowhere")
    monkeypatch.setenv("TETHER_ASSETS", str(tmp_path / "also-nowhere"))
    with pytest.raises(AssetError, match="also-nowhere does not exist.*TETHER_ASSETS"):
        resolve("rt-polarity")
    with pytest.raises(AssetError, match="unknown asset 'stories15M'"):
        resolve("stories15M")
    monkeypatch.delenv("TETHER_ASSETS")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError, match="'rt-polarity' not found: pass --assets"):
        resolve("rt-polarity", download=False)


def test_offline_download_says_pass_assets(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, filename, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}/{filename}")

    monkeypatch.delenv("TETHER_ASSETS")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(AssetError, match=r"could not download asset 'stories260K' \(OSError: cannot reach.*--assets"):
        resolve("stories260K")
    with pytest.raises(AssetError, match="--assets"):
        resolve_model("stories260K")
    assert not (tmp_path / "assets" / "stories260K" / "config.json").exists()


def test_resolve_model(tmp_path, monkeypatch, stories_path, no_download):
    assert resolve_model("stories260K") == str(Path(stories_path))
    other = _fake_asset(tmp_path, "stories260K", assets.ASSETS["stories260K"])
    assert resolve_model("stories260K", tmp_path) == str(other)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub names pass through
    monkeypatch.chdir(tmp_path)  # an existing local folder named like an asset is a path, not a name
    assert resolve_model("stories260K") == "stories260K"


def test_missing_sentencepiece_says_what_to_install(tmp_path, monkeypatch, hub_files):
    import sys

    import huggingface_hub

    monkeypatch.delenv("TETHER_ASSETS")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hub(hub_files, []))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece -> ImportError
    with pytest.raises(AssetError, match=r"'stories260K'.*pip install 'tether\[download\]'.*--assets"):
        resolve("stories260K")
