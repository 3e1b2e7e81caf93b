"""Resume without Ray: a local stage interrupted after epoch K and rerun into the same folder gives
exactly the uninterrupted run; finished stages are reused; --restart starts over; one run per --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptmm_dist import run_lock
from promptmm_dist.errors import ConfigError
from promptmm_dist.pipeline import student_stage, teacher_stage
from promptmm_dist.run_resume import StageRun
from promptmm_dist.train.selection import EarlyStopper
from promptmm_dist.train.teacher_checkpoint import load_teacher
from tests.helpers import tiny_config, tiny_data


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, at a chosen epoch."""


def _interrupt_after(monkeypatch, epoch: int) -> None:
    original = StageRun.report

    def report(self, row, state):
        original(self, row, state)
        if row["epoch"] == epoch:
            raise Interrupt

    monkeypatch.setattr(StageRun, "report", report)


def _cfg():
    cfg = tiny_config(epochs=4)
    cfg.teacher.epochs = 3
    cfg.prompt.refresh_epochs = 1  # prompt rounds: the prompt and its optimiser must resume too
    cfg.prompt.round_steps = 2
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted local run (teacher 3 epochs, student 4 with prompt rounds)."""
    root = tmp_path_factory.mktemp("ref")
    data, cfg = tiny_data(), _cfg()
    _, t_meta = teacher_stage(data, cfg, root)
    _, s_meta = student_stage(data, cfg, root, load_teacher(data, cfg, root))
    return data, cfg, root, t_meta, s_meta


def _same(a: dict, b: dict) -> None:
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
    for split in ("val", "test"):
        for k, v in a[split].items():
            assert b[split][k] == pytest.approx(v, abs=1e-6), (split, k)


def test_interrupted_local_run_resumes_to_the_same_result(reference, tmp_path, monkeypatch, capsys):
    data, cfg, ref_root, t_ref, s_ref = reference
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(Interrupt):
            teacher_stage(data, cfg, tmp_path)
    assert (tmp_path / "teacher" / "resume.pt").exists() and not (tmp_path / "teacher" / "meta.json").exists()
    capsys.readouterr()
    _, t_meta = teacher_stage(data, cfg, tmp_path)
    assert "resumed teacher from epoch 2" in capsys.readouterr().err
    _same(t_ref, t_meta)
    ref_w = torch.load(ref_root / "teacher" / "teacher.pt", weights_only=True)
    got_w = torch.load(tmp_path / "teacher" / "teacher.pt", weights_only=True)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)

    with monkeypatch.context() as m:  # the student, across a prompt round (prompt + its Adam state)
        _interrupt_after(m, 2)
        with pytest.raises(Interrupt):
            student_stage(data, cfg, tmp_path, load_teacher(data, cfg, tmp_path))
    capsys.readouterr()
    _, s_meta = student_stage(data, cfg, tmp_path, load_teacher(data, cfg, tmp_path))
    err = capsys.readouterr().err
    assert err.count("resumed student from epoch 3") == 1, err
    _same(s_ref, s_meta)
    assert [r["epoch"] for r in s_meta["prompt_rounds"]] == [r["epoch"] for r in s_ref["prompt_rounds"]]

    # a third run reuses both finished stages instead of training
    _, again = teacher_stage(data, cfg, tmp_path)
    assert "reusing the finished stage" in capsys.readouterr().err and again == t_meta


def test_changed_config_starts_the_stage_over(reference, tmp_path, monkeypatch, capsys):
    data, cfg, *_ = reference
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(Interrupt):
            teacher_stage(data, cfg, tmp_path)
    other = _cfg()
    other.teacher.lr = cfg.teacher.lr * 2  # affects the teacher: its partial epochs are not reused
    other.teacher.epochs = 1
    capsys.readouterr()
    teacher_stage(data, other, tmp_path)
    assert "resumed" not in capsys.readouterr().err


def test_early_stopper_state_round_trips():
    a = EarlyStopper(patience=2, smooth_window=3)
    for e, v in enumerate([0.1, 0.3, 0.2, 0.25]):
        a.update(e, {"recall@20": v})
    b = EarlyStopper(patience=2, smooth_window=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for e, v in [(4, 0.4), (5, 0.1), (6, 0.1)]:
        assert a.update(e, {"recall@20": v}) == b.update(e, {"recall@20": v})
        assert a.should_stop(e) == b.should_stop(e)
    assert a.state_dict() == b.state_dict()


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(
            {"pid": sleeper.pid, "start": run_lock._start_time(sleeper.pid)}))
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {sleeper.pid}"):
            run_lock.acquire(tmp_path)
        # the CLI says it in one line, exit status 2, before training anything
        proc = subprocess.run([sys.executable, "-m", "promptmm_dist", "run", "--out", str(tmp_path),
                               "--set", "teacher.epochs=1", "--set", "student.epochs=1"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another run" in lines[0], proc.stderr
        assert not (tmp_path / "teacher").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    run_lock.acquire(tmp_path)  # the owner died: its stale lock is taken over
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    run_lock.release(tmp_path)
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_restart_flag_clears_finished_stages(tmp_path):
    from promptmm_dist.run_resume import clear_run

    stage = tmp_path / "teacher"
    stage.mkdir()
    (stage / "stage.json").write_text("{}")
    (stage / "resume.pt").write_text("x")
    (tmp_path / "ray" / "teacher").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    clear_run(Path(tmp_path))
    assert not stage.exists() and not (tmp_path / "ray").exists() and (tmp_path / "config.yaml").exists()


def test_cli_rerun_reuses_stages_and_restart_starts_over(tmp_path, capsys):
    from promptmm_dist.cli import main

    args = ["run", "--out", str(tmp_path), "--json", "--set", "teacher.epochs=1", "--set", "student.epochs=1",
            "--set", "teacher.embed_dim=16", "--set", "student.embed_dim=16"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "teacher: reusing the finished stage" in captured.err
    assert "student: reusing the finished stage" in captured.err
    assert json.loads(captured.out)["student"]["test"] == first["student"]["test"]
    assert main(args + ["--restart"]) == 0
    captured = capsys.readouterr()
    assert "reusing" not in captured.err and "resumed" not in captured.err
    assert json.loads(captured.out)["student"]["test"] == first["student"]["test"]  # same seed, same run
