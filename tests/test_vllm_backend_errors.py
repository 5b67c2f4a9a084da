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


@pytest.mark.parametrize("settings, field", [({"top_k": 5}, "top_k"), ({"top_p": 0.9}, "top_p"),
                                             ({"temperature": 0.0}, "temperature")])
def test_filters_refused(settings, field):
    with pytest.raises(UserError, match=field):
        vb.check_settings(settings)
    vb.check_settings({"temperature": 0.7, "top_k": 0, "top_p": 1.0})  # temperature alone is fine
