"""Rough edges a new user hit (issue 13, item 5): each is one `promptmm: error: ...` line, exit status 2,
and nothing written. Real CLI calls (`promptmm_dist.cli.main`, or a subprocess where Ray state matters);
no training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import yaml

from promptmm_dist.cli import build_parser, main
from promptmm_dist.config import RULES, Config, ConfigError, leaf_values, load_config
from promptmm_dist.paths import REPO_ROOT


def _fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line starting `promptmm: error:` holding needles."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("promptmm: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------ config ranges

@pytest.mark.parametrize("setting, needle", [
    ("student.epochs=-1", "'student.epochs' must be >= 1, got -1"),
    ("teacher.epochs=0", "'teacher.epochs' must be >= 1, got 0"),
    ("student.lr=-0.1", "'student.lr' must be > 0, got -0.1"),
    ("teacher.dropout=1", "'teacher.dropout' must be in [0, 1)"),
    ("student.norm=both", "'student.norm' must be one of sym, left"),
])
def test_out_of_range_setting_is_one_line_and_writes_nothing(tmp_path, capsys, setting, needle):
    out = tmp_path / "run"
    _fails(["run", "--set", setting, "--out", str(out)], capsys, needle)
    assert not out.exists()


def _bad_value(rule) -> object:
    if rule.choices is not None:
        return "bogus"
    if rule.high is not None:
        return rule.high if rule.high_open else rule.high + 1
    return rule.low if rule.low_open else rule.low - 1


def test_every_numeric_and_choice_key_has_a_rule_and_the_rule_bites():
    leaves = leaf_values(Config())
    numeric = {k for k, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric - set(RULES) == set(), "numeric config keys without a range in config.RULES"
    assert set(RULES) <= set(leaves)
    for key, rule in RULES.items():
        with pytest.raises(ConfigError, match=f"'{key}' must be"):
            load_config(overrides=[f"{key}={_bad_value(rule)}"])
        assert rule.allows(leaves[key]), f"the default of {key} breaks its own rule"


@pytest.mark.parametrize("recipe", ["synthetic", "tiktok", "lastfm2k"])
def test_shipped_recipes_pass_the_rules(recipe):
    assert load_config(recipe=recipe).data.recipe == recipe  # chosen explicitly, never by folder name


def test_non_finite_values_are_rejected():
    with pytest.raises(ConfigError, match="'student.tau' must be > 0, got nan"):
        load_config(overrides=["student.tau=.nan"])


# ------------------------------------------------------------------------- workers, shards, Ray mode

@pytest.mark.parametrize("flag, value, needle", [
    ("--num-shards", "0", "--num-shards must be >= 1, got 0"),
    ("--num-shards", "-2", "--num-shards must be >= 1, got -2"),
    ("--num-workers", "-1", "--num-workers must be >= 0, got -1"),
])
def test_bad_worker_and_shard_counts(tmp_path, capsys, flag, value, needle):
    out = tmp_path / "run"
    _fails(["train-teacher", flag, value, "--out", str(out)], capsys, needle)
    assert not out.exists()


def test_more_workers_than_cpus_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    from promptmm_dist.cluster_checks import local_cpus

    workers = local_cpus() + 6
    line = _fails(["run", "--num-workers", str(workers), "--out", str(out)], capsys,
                  f"--num-workers {workers}", "CPUs", "needs at least one")
    assert "or fewer" in line
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpus_asked_for_on_a_cluster_without_them_is_one_line(tmp_path, capsys):
    """dist.use_gpu gives each Train worker a GPU: on a cluster without GPUs Ray would wait forever."""
    out = tmp_path / "run"
    _fails(["run", "--num-workers", "1", "--set", "dist.use_gpu=true", "--out", str(out)], capsys,
           "dist.use_gpu=true with --num-workers 1", "0 GPUs")
    assert not out.exists()


def test_gpus_for_the_driver_loop_are_refused():
    from promptmm_dist.cluster_checks import check_gpus_fit

    with pytest.raises(ConfigError, match="needs --num-workers >= 1"):
        check_gpus_fit(0, 8)
    check_gpus_fit(2, 2)  # one GPU per worker fits


def test_explicit_num_workers_zero_means_ray_local_mode():
    from promptmm_dist.pipeline import config_from_args, uses_ray

    parser = build_parser()
    with_flag = config_from_args(parser.parse_args(["run", "--num-workers", "0"]))
    without = config_from_args(parser.parse_args(["run"]))
    assert uses_ray(with_flag) and with_flag.dist.num_workers == 0
    assert not uses_ray(without)


def test_a_ray_run_keeps_only_the_identity_of_a_source_it_had_to_load(tmp_path, ray_session):
    """A source that is not a prepared folder (here the embedded synthetic set) is loaded once to
    validate it; a Ray run then writes the canonical copy its ranks and actors read, and the driver keeps
    the dataset's identity and sizes only, not its rows, for the rest of the run."""
    from promptmm_dist.data.dataset import DatasetInfo
    from promptmm_dist.data.formats import read_manifest
    from promptmm_dist.pipeline import prepare_run

    _, data, out = prepare_run(build_parser().parse_args(["run", "--num-workers", "0", "--out", str(tmp_path / "r")]))
    assert type(data) is DatasetInfo and data.n_users > 0
    assert read_manifest(out / "data")["content_sha256"] == data.manifest_sha256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast_with_one_line(tmp_path):
    """A fresh process: an already-initialised Ray in this one would skip connecting altogether."""
    out = tmp_path / "run"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "promptmm_dist", "run", "--address", f"127.0.0.1:{port}",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO_ROOT)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"promptmm: error: --address 127.0.0.1:{port}: cannot reach the Ray cluster "
                     "(Connection refused; is the Ray head running there?)"], lines
    assert elapsed < 60
    assert not out.exists()


# ---------------------------------------------------------------------------------- YAML, evaluate

def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  tau: 2\n  epochs: [1, 2\nteacher: {}\n")
    out = tmp_path / "run"
    line = _fails(["run", "--config", str(bad), "--out", str(out)], capsys, f"{bad}:4:", "invalid YAML")
    assert "started at line 3" in line
    assert not out.exists()
    _fails(["run", "--set", "student.tau=[", "--out", str(out)], capsys, "--set student.tau=[", "invalid YAML")
    assert not out.exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run folder as `promptmm run` leaves it (config.yaml + student/export.npz) on a small dataset."""
    root = tmp_path_factory.mktemp("edges")
    data = root / "data"
    assert main(["data", "synth", str(data), "--users", "300", "--items", "150", "--interactions", "4000",
                 "--modalities", "image:8", "--json"]) == 0
    run = root / "run"
    (run / "student").mkdir(parents=True)
    cfg = Config()
    cfg.data.path = str(data)
    (run / "config.yaml").write_text(cfg.to_yaml())
    rng = np.random.default_rng(0)
    np.savez(run / "student" / "export.npz", user=rng.normal(size=(300, 8)).astype(np.float32),
             item=rng.normal(size=(150, 8)).astype(np.float32))
    return run, data


def test_evaluate_a_run_without_data_uses_the_runs_dataset(small_run, capsys):
    run, data = small_run
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--split", "both", "--json"]) == 0
    captured = capsys.readouterr()
    implicit = json.loads(captured.out)
    assert f"data {data}" in captured.err and "config.yaml" in captured.err
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--split", "both", "--json"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert implicit == explicit
    assert set(implicit) == {"val", "test"} and 0.0 <= implicit["test"]["recall@20"] <= 1.0


def test_evaluate_a_run_whose_dataset_is_gone_says_so(small_run, tmp_path, capsys):
    run, _ = small_run
    moved = tmp_path / "run"
    (moved / "student").mkdir(parents=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "nowhere")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    (moved / "student" / "export.npz").write_bytes((run / "student" / "export.npz").read_bytes())
    _fails(["evaluate", "--model", str(moved)], capsys, "data.path", "not found here; pass --data")


# ------------------------------------------------------------------------------- noise, help, docs

def test_epoch_lines_show_the_total():
    from promptmm_dist.train.progress import epoch_line

    row = {"epoch": 3, "loss_bpr": 0.5, "val": {"recall@20": 0.1, "ndcg@20": 0.05}, "best_epoch": 2, "epoch_s": 1.0}
    assert "teacher epoch  3/20 |" in epoch_line("teacher", row, 20)
    assert "epoch 3/9 |" in epoch_line("student", {**row, "epochs": 9})


def test_long_epochs_log_step_lines_when_stderr_is_not_a_terminal(capsys):
    """A Ray job's log or a bench's pipe gets `desc: step i/n (t s)` from rank 0 only, at most every
    `every_s`: with every_s 0 each step logs, with an hour none does."""
    from types import SimpleNamespace

    from promptmm_dist.train.progress import progress

    assert list(progress([10, 11, 12], "teacher epoch 4", every_s=0.0)) == [10, 11, 12]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"teacher epoch 4: step {i}/3" for i in (1, 2, 3)]
    assert list(progress([1, 2], "student epoch 0", SimpleNamespace(is_main=False), every_s=0.0)) == [1, 2]
    assert list(progress(range(5), "student epoch 0", every_s=3600.0)) == list(range(5))
    assert capsys.readouterr().err == ""


def test_read_only_numpy_warning_is_dropped_only_for_our_modules():
    """torch warns once per process (C++ TORCH_WARN_ONCE) with the caller's module: the filter is
    checked with the same message raised from our module and from another one."""
    from promptmm_dist.ray_quiet import quiet_warnings

    code = ("warnings.warn('The given NumPy array is not writable, and PyTorch does not support "
            "non-writable tensors.', UserWarning)")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_warnings()
        exec(code, {"__name__": "promptmm_dist.train.student_loop", "warnings": warnings})
        exec(code, {"__name__": "somebody_else", "warnings": warnings})
        exec("warnings.warn('something else', UserWarning)",
             {"__name__": "promptmm_dist.train.student_loop", "warnings": warnings})
    assert [str(w.message)[:26] for w in seen] == ["The given NumPy array is n", "something else"]


def test_placement_group_cleaner_thread_errors_are_silenced_others_are_not():
    from promptmm_dist.ray_quiet import PG_CLEANER_THREAD, quiet_worker_process

    before = threading.excepthook
    reached: list[str] = []  # what gets past the filter to the previous hook
    try:
        threading.excepthook = lambda args: reached.append(args.thread.name)
        quiet_worker_process()

        def boom() -> None:
            raise ConnectionError("Found multiple active Ray instances")

        for name in (PG_CLEANER_THREAD, "someone-else"):
            t = threading.Thread(target=boom, name=name)
            t.start()
            t.join()
    finally:
        threading.excepthook = before
    assert reached == ["someone-else"]


def _subparser(parser, *names):
    for name in names:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path, dest", [
    (("run",), "seed"), (("train-teacher",), "seed"), (("evaluate",), "seed"), (("evaluate",), "split"),
    (("tune",), "num_samples"), (("prepare",), "src"), (("prepare",), "out"), (("data", "synth"), "seed"),
])
def test_options_have_help(path, dest):
    parser = _subparser(build_parser(), *path)
    action = next(a for a in parser._actions if a.dest == dest)
    assert action.help and len(action.help) > 10, (path, dest)


def test_readme_documents_recommend_caches_and_ray_local_mode():
    text = (REPO_ROOT / "README.md").read_text()
    commands = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    assert "promptmm recommend" in commands
    assert "PROMPTMM_CACHE_DIR" in text and "~/.cache/promptmm_dist" in text
    assert "/tmp/ray" in text
    flat = " ".join(text.split())
    assert "`--num-workers 0` with the Train loops in the driver (Ray Train local mode)" in flat
