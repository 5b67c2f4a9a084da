"""Tests of the optional vLLM backend (``make test-vllm``: they run in .venv-vllm, never in the main
suite, whose ``testpaths`` is tests/). The engine runs in this process (colocate mode)."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported

import importlib.util
from pathlib import Path

import pytest
import torch

# The main suite's fixtures and tolerances (tests/conftest.py), loaded under another module name.
_spec = importlib.util.spec_from_file_location(
    "tether_main_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
)
main_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(main_conftest)
assets_dir, stories_path, f32_tol = main_conftest.assets_dir, main_conftest.stories_path, main_conftest.f32_tol

SMALL = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
"""A random-init Llama with head size 64 (vLLM's CPU attention needs 32-512; stories260K has 8) over
stories260K's 512-token vocabulary, so the real tokenizer and text prompts work unchanged."""


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, stories_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.modeling import load_tokenizer

    d = tmp_path_factory.mktemp("small-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).float().save_pretrained(d)
    load_tokenizer(stories_path).save_pretrained(d)
    return str(d)
