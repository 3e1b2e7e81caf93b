"""Configs: dataclass defaults <- dataset YAML <- --config file <- --set overrides."""

from __future__ import annotations

import pytest

from promptmm_dist.config import Config, config_from_dict, load_config, parse_override
from promptmm_dist.errors import ConfigError


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  tau: 3.0\n  epochs: 7\nseed: 5\n")
    cfg = load_config(f, ["student.tau=4", "dist.num_workers=2", "student.init_from_teacher=true"],
                      data_path="synthetic")
    assert cfg.student.tau == 4.0 and cfg.student.epochs == 7 and cfg.seed == 5
    assert cfg.dist.num_workers == 2 and cfg.student.init_from_teacher is True
    assert cfg.teacher.epochs == 20  # from the packaged synthetic.yaml, not the dataclass default
    assert Config().teacher.epochs != 20


def test_round_trip_through_dict():
    cfg = load_config(None, ["prompt.refresh_epochs=3"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", ["student.nope=1", "nosection.x=1", "student=3", "student.tau=abc", "noequals"])
def test_bad_overrides_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as err:
        load_config(None, [bad])
    assert "\n" not in str(err.value)


def test_parse_override_builds_nested_mapping():
    assert parse_override("a.b.c=1.5") == {"a": {"b": {"c": 1.5}}}


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
