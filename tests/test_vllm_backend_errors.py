"""The vLLM backend's refusals, in the main environment (where ``vllm`` is not installed).

The backend itself is tested in ``tests_vllm/`` under ``make test-vllm`` (its own environment)."""

import importlib.util

import pytest

from tether.backends import vllm as vb
from tether.errors import UserError

needs_no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")


@needs_no_vllm
def test_missing_vllm_is_one_line_user_error_naming_the_fix():
    with pytest.raises(UserError) as e:
        vb.require_vllm()
    msg = str(e.value)
    assert "\n" not in msg and "backend=vllm" in msg and "make test-vllm" in msg and "backend=builtin" in msg


def test_head_dim_8_model_refused_before_loading(stories):
    """stories260K: dim 64, 8 heads -> head size 8, outside vLLM's CPU range 32-512. Refused through
    the registry (the sampling group's backend: vllm), by check_model, before vllm is imported."""
    from tether.generation import make_backend

    with pytest.raises(UserError, match=r"head size 8,.* 32-512 only; use backend=builtin"):
        make_backend("vllm", stories[1])


def test_head_dim_from_config():
    class C:
        hidden_size, num_attention_heads, head_dim = 256, 4, None

    assert vb.head_dim(C()) == 64
    C.head_dim = 32
    assert vb.head_dim(C()) == 32
    vb.check_model(C())  # 32 is in range: no error
    C.head_dim = 16
    with pytest.raises(UserError, match="head size 16"):
        vb.check_model(C())
    vb.check_model(C(), device="cuda")  # the range is the CPU attention's


@pytest.mark.parametrize(
    "settings, field", [({"top_k": 5}, "top_k"), ({"top_p": 0.9}, "top_p"), ({"temperature": 0.0}, "temperature")]
)
def test_filters_refused(settings, field):
    with pytest.raises(UserError, match=field):
        vb.check_settings(settings)
    vb.check_settings({"temperature": 0.7, "top_k": 0, "top_p": 1.0})  # temperature alone is fine


# --------------------------------------------------------------------------------------------------
# GPU settings: vllm_gpu_memory_utilization, vllm_enable_sleep_mode


@pytest.mark.parametrize("util", [0.0, -0.1, 1.5])
def test_memory_fraction_outside_0_1_refused(util):
    with pytest.raises(UserError, match=r"vllm_gpu_memory_utilization=.* must lie in \(0, 1\]"):
        vb.check_gpu_options(util, False, cuda=True)
    vb.check_gpu_options(1.0, False, cuda=True)


def test_sleep_mode_needs_cuda_and_the_vllm_backend():
    from types import SimpleNamespace

    from tether.checks import check_vllm_options

    with pytest.raises(UserError, match="vllm_enable_sleep_mode needs a CUDA GPU"):
        vb.check_gpu_options(0.3, True, cuda=False)
    with pytest.raises(UserError, match="applies to backend vllm only"):
        check_vllm_options(
            SimpleNamespace(backend="builtin", vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.3)
        )
    check_vllm_options(
        SimpleNamespace(backend="builtin", vllm_enable_sleep_mode=False, vllm_gpu_memory_utilization=0.3)
    )


def test_sampling_group_settings_reach_the_backend(monkeypatch):
    """generation.backend_for hands the sampling group's GPU settings to the vllm backend's factory."""
    from types import SimpleNamespace

    from tether import generation

    seen = {}
    monkeypatch.setitem(generation._FACTORIES, "vllm", lambda model, **options: seen.update(options) or "backend")
    cfg = SimpleNamespace(backend="vllm", decoder="auto", vllm_gpu_memory_utilization=0.55, vllm_enable_sleep_mode=True)
    assert generation.backend_for(cfg, object()) == "backend"
    assert seen == {"gpu_memory_utilization": 0.55, "enable_sleep_mode": True}


class _FakeLLM:
    """Records what VLLMBackend asks of a ``vllm.LLM`` (the real one is tested under make test-vllm)."""

    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _FakeLLM.calls.append(("init", kwargs))

    def collective_rpc(self, name, kwargs=None):
        _FakeLLM.calls.append(("rpc", name))

    def reset_prefix_cache(self):
        pass

    def sleep(self, level):
        _FakeLLM.calls.append(("sleep", level))

    def wake_up(self):
        _FakeLLM.calls.append(("wake_up", None))

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        _FakeLLM.calls.append(("generate", len(prompts)))
        out = SimpleNamespace(
            token_ids=[3, 4], logprobs=[{3: SimpleNamespace(logprob=-1.0)}, {4: SimpleNamespace(logprob=-2.0)}]
        )
        return [SimpleNamespace(outputs=[out]) for _ in prompts]


def test_gpu_engine_takes_the_memory_fraction_and_sleeps_between_rollouts(stories, monkeypatch):
    """On a (pretended) CUDA machine the engine is built with the memory fraction and sleep mode and no CPU
    KV-cache size; each generate ends with sleep(level=1) and the next weight push or generate wakes it
    first (TRL's colocate sleep mode)."""
    import sys
    from types import ModuleType

    import torch

    from tether.groups import SamplingSettings

    fake = ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _FakeLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the backend sets it; restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeLLM.calls = []
    backend = vb.VLLMBackend(stories[1], gpu_memory_utilization=0.45, enable_sleep_mode=True)
    init = _FakeLLM.calls[0][1]
    assert init["gpu_memory_utilization"] == 0.45 and init["enable_sleep_mode"] is True
    assert "kv_cache_memory_bytes" not in init
    settings, ends = SamplingSettings(max_new_tokens=2), dict(pad_id=0, eos_id=None)
    backend.generate([[1, 2]], settings, torch.Generator().manual_seed(0), **ends)
    backend.update_weights(stories[1])
    backend.generate([[1, 2]], settings, torch.Generator().manual_seed(0), **ends)
    backend.generate([[1, 2]], settings, torch.Generator().manual_seed(0), **ends)
    names = [c[0] for c in _FakeLLM.calls[1:]]
    assert names == ["rpc", "generate", "sleep", "wake_up", "rpc", "generate", "sleep", "wake_up", "generate", "sleep"]
    assert ("sleep", 1) in _FakeLLM.calls
