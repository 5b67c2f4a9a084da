"""The public names a TRL user reaches for are importable from ``tether`` itself, loaded lazily."""

import importlib
import subprocess
import sys

import pytest


def test_every_export_is_the_object_of_its_module():
    import tether

    for name, module in tether._EXPORTS.items():
        assert getattr(tether, name) is getattr(importlib.import_module(module), name), name
    assert set(tether.__all__) == set(tether._EXPORTS) and set(tether.__all__) <= set(dir(tether))
    with pytest.raises(AttributeError, match="NoSuchThing"):
        tether.NoSuchThing  # noqa: B018


def test_a_trl_style_script_imports_from_tether():
    from tether import GRPOConfig, UserError, train_grpo

    assert GRPOConfig(beta=0.02).beta == 0.02 and callable(train_grpo) and issubclass(UserError, ValueError)


def test_import_tether_loads_no_trainer():
    code = "import sys, tether; print(any(m.startswith('tether.trainers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
