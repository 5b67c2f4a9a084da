"""Typed configs: YAML + command-line overrides, docstrings as help, clear errors."""

from dataclasses import dataclass, field
from typing import Optional, Union

import pytest

from tether.config import field_docs, load_config, parse_config, save_config


@dataclass
class Toy:
    lr: float = 0.1
    """Learning rate."""
    steps: int = 3
    """How many steps."""
    name: str = "x"
    flag: bool = False
    target: Optional[float] = None
    """Optional target."""
    values: list = field(default_factory=list)


def test_yaml_then_cli_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nsteps: 7\nvalues: [1, 2]\n")
    cfg, _ = parse_config(Toy, ["--config", str(cfg_file), "--steps", "9", "--flag", "true", "--target", "2.5"])
    assert (cfg.lr, cfg.steps, cfg.flag, cfg.target, cfg.values) == (0.5, 9, True, 2.5, [1, 2])
    cfg, _ = parse_config(Toy, ["--values", "3,4", "--target", "none"])
    assert cfg.values == [3, 4] and cfg.target is None


def test_round_trip_and_docs(tmp_path):
    cfg = Toy(lr=0.2, values=[1])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Toy, tmp_path / "c.yaml") == cfg
    assert field_docs(Toy) == {"lr": "Learning rate.", "steps": "How many steps.", "target": "Optional target."}


def test_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rat: 3\n")
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--config", str(bad)])
    assert "learning_rat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--steps", "2.5"])
    assert "'steps'" in capsys.readouterr().err


@dataclass
class WithUnion:
    horizon: Optional[Union[int, str]] = "auto"
    both: Union[int, float] = 1


def test_union_fields_take_the_first_member_that_reads_the_value(tmp_path):
    """int | str: '500' -> 500, 'ziegler' -> 'ziegler'; 'none' -> None (Optional); YAML the same."""
    assert parse_config(WithUnion, [])[0].horizon == "auto"
    assert parse_config(WithUnion, ["--horizon", "500"])[0].horizon == 500
    assert parse_config(WithUnion, ["--horizon", "ziegler"])[0].horizon == "ziegler"
    assert parse_config(WithUnion, ["--horizon", "none"])[0].horizon is None
    assert parse_config(WithUnion, ["--both", "2.5"])[0].both == 2.5
    f = tmp_path / "c.yaml"
    f.write_text("horizon: 64\n")
    assert load_config(WithUnion, f).horizon == 64
    f.write_text("horizon: ziegler\n")
    assert load_config(WithUnion, f).horizon == "ziegler"
    save_config(WithUnion(horizon=77), f)
    assert load_config(WithUnion, f).horizon == 77


def test_union_field_errors_name_the_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(WithUnion, ["--both", "many"])
    assert "'both'" in capsys.readouterr().err
