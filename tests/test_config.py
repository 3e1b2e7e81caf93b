"""Configs: dataclass defaults <- recipe (--recipe, else the dataset manifest's) <- --config file <- --set
overrides. A recipe is never chosen from the dataset folder's name (DESIGN 4)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from helpers import make_promptmm
from promptmm_dist import cli
from promptmm_dist.config import Config, config_from_dict, leaf_values, load_config, parse_override
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


# ------------------------------------------------------------------------------------------- recipes


def cli_run(monkeypatch, *argv: str) -> tuple[int, Config | None]:
    """(exit status, config) of `promptmm run ARGV`: the real parser, --recipe handling and
    pipeline.config_from_args, with the training itself replaced by a capture."""
    from promptmm_dist.pipeline import config_from_args

    built: list[Config] = []

    def capture(args: argparse.Namespace) -> int:
        built.append(config_from_args(args))
        return 0

    with monkeypatch.context() as m:
        m.setattr(cli, "_handler", lambda key: capture)
        rc = cli.main(["run", *argv])
    return rc, (built[0] if built else None)


def cli_config(monkeypatch, *argv: str) -> Config:
    rc, cfg = cli_run(monkeypatch, *argv)
    assert rc == 0 and cfg is not None
    return cfg


def comparable(cfg: Config) -> dict:
    """Every key but where the data and the output live."""
    return {k: v for k, v in leaf_values(cfg).items() if k not in ("data.path", "out")}


@pytest.fixture
def raw(tmp_path) -> Path:
    return make_promptmm(tmp_path / "raw")


def prepare(src: Path, out: Path, *flags: str) -> Path:
    assert cli.main(["prepare", str(src), str(out), *flags]) == 0
    return out


def test_recipe_follows_the_data_not_the_folder_name(raw, tmp_path, monkeypatch):
    with_recipe = prepare(raw, tmp_path / "copy-one", "--recipe", "lastfm2k")
    plain = prepare(raw, tmp_path / "other name")
    assert json.loads((with_recipe / "manifest.json").read_text())["recipe"] == "lastfm2k"
    assert json.loads((plain / "manifest.json").read_text())["recipe"] is None
    from_manifest = cli_config(monkeypatch, "--data", str(with_recipe))
    from_flag = cli_config(monkeypatch, "--data", str(plain), "--recipe", "lastfm2k")
    defaults = cli_config(monkeypatch, "--data", str(plain))
    assert comparable(from_manifest) == comparable(from_flag)
    assert from_manifest.data.recipe == from_flag.data.recipe == "lastfm2k"
    assert from_manifest.teacher.lr == 0.005 and from_manifest.student.epochs == 250  # lastfm2k.yaml
    assert comparable(defaults) != comparable(from_flag)
    assert defaults.data.recipe is None
    assert comparable(defaults) == comparable(Config())  # nothing but the dataclass defaults
    # a copy of the prepared folder anywhere keeps its recipe (it is in the manifest, not the name)
    assert comparable(load_config(data_path=str(prepare(with_recipe, tmp_path / "x" / "y")))) == \
        comparable(from_flag)


def test_a_folder_named_like_a_recipe_gets_the_defaults(raw, tmp_path, monkeypatch):
    prepared = prepare(raw, tmp_path / "p" / "tiktok")
    unprepared = make_promptmm(tmp_path / "r" / "lastfm2k")
    for folder in (prepared, unprepared):
        cfg = cli_config(monkeypatch, "--data", str(folder))
        assert cfg.data.recipe is None and comparable(cfg) == comparable(Config()), folder
        assert comparable(load_config(data_path=str(folder))) == comparable(Config())
    assert comparable(load_config(data_path=str(prepared), recipe="tiktok")) != comparable(Config())


def test_the_embedded_synthetic_dataset_keeps_its_recipe(monkeypatch):
    cfg = cli_config(monkeypatch)
    assert cfg.data.path == "synthetic" and cfg.data.recipe == "synthetic" and cfg.teacher.epochs == 20
    plain = cli_config(monkeypatch, "--recipe", "none")
    assert plain.data.recipe == "none" and comparable(plain) == {**comparable(Config()), "data.recipe": "none"}


@pytest.mark.parametrize("command", [["run"], ["tune"], ["baseline"], ["prepare", "SRC", "OUT"]])
def test_unknown_recipe_is_one_line_exit_2(command, raw, tmp_path, capsys):
    argv = [str(raw) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert cli.main([*argv, "--recipe", "tiktokk"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("promptmm: error: --recipe: unknown recipe 'tiktokk'")
    assert "known: lastfm2k, synthetic, tiktok" in err
    assert not (tmp_path / "out").exists()


def test_prepare_takes_names_only_and_a_bad_manifest_recipe_is_one_line(raw, tmp_path, capsys, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("student:\n  epochs: 3\n")
    assert cli.main(["prepare", str(raw), str(tmp_path / "out"), "--recipe", str(own)]) == 2
    assert "unknown recipe" in capsys.readouterr().err and not (tmp_path / "out").exists()
    data = prepare(raw, tmp_path / "d")
    manifest = data / "manifest.json"
    for bad, problem in (("nope", "unknown recipe 'nope'"), (3, "not a string")):
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "recipe": bad}))
        assert cli_run(monkeypatch, "--data", str(data)) == (2, None)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(manifest) in err and problem in err, err
        # --recipe wins over the manifest, so a bad manifest recipe is not even looked at
        assert load_config(data_path=str(data), recipe="tiktok").data.recipe == "tiktok"


def test_cli_recipe_beats_the_manifest(raw, tmp_path, monkeypatch):
    data = prepare(raw, tmp_path / "d", "--recipe", "lastfm2k")
    cfg = cli_config(monkeypatch, "--data", str(data), "--recipe", "tiktok")
    assert cfg.data.recipe == "tiktok" and comparable(cfg) == comparable(load_config(recipe="tiktok"))
    assert cfg.teacher.lr == Config().teacher.lr  # lastfm2k's 0.005 is not applied underneath
    none = cli_config(monkeypatch, "--data", str(data), "--recipe", "none")
    assert comparable(none) == {**comparable(Config()), "data.recipe": "none"}
    # a later prepare keeps the source's recipe unless told otherwise
    assert json.loads((prepare(data, tmp_path / "e") / "manifest.json").read_text())["recipe"] == "lastfm2k"
    dropped = prepare(data, tmp_path / "f", "--recipe", "none")
    assert json.loads((dropped / "manifest.json").read_text())["recipe"] is None


def test_recipe_layers_under_config_file_and_set(raw, tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  epochs: 7\n  tau: 3.0\n")
    cfg = cli_config(monkeypatch, "--data", str(raw), "--recipe", "lastfm2k", "--config", str(f),
                     "--set", "student.tau=4")
    assert cfg.student.lr == 0.005 and cfg.student.epochs == 7 and cfg.student.tau == 4.0


def test_recipe_file_is_recorded_and_a_saved_config_reloads_equal(raw, tmp_path, monkeypatch):
    own = tmp_path / "recipes" / "mine.yaml"
    own.parent.mkdir()
    own.write_text("student:\n  epochs: 3\n  lr: 0.02\n")
    cfg = cli_config(monkeypatch, "--data", str(raw), "--recipe", str(own))
    assert cfg.data.recipe == str(own.resolve()) and cfg.student.epochs == 3 and cfg.student.lr == 0.02
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert yaml.safe_load(saved.read_text())["data"]["recipe"] == str(own.resolve())
    assert load_config(saved) == cfg
    missing = tmp_path / "gone.yaml"
    with pytest.raises(ConfigError, match="recipe file .*gone.yaml not found"):
        load_config(recipe=str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(recipe=str(bad))
