"""Fault tolerance of the Train stages on a small real subset (Tiktok, first 400 users), each
compared with the same seed's uninterrupted run:
(a) SIGKILL of one of 2 student Ray Train workers mid-epoch: Train restarts the group from the latest
    epoch checkpoint and the run ends with the same selected epoch and metrics;
(c) SIGKILL of the driver during the student stage, then the same command again: the teacher is
    reused, the student continues from its last epoch, same metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.prepare import ensure_canonical
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.faults import epoch_reached, kill_when, progress_dir
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow
N_USERS = 400
SETS = ["teacher.epochs=3", "student.epochs=4", "teacher.embed_dim=16", "student.embed_dim=16",
        "teacher.batch_size=512", "student.batch_size=512", "student.neg_sample_num=4",
        "prompt.refresh_epochs=2", "prompt.round_steps=2", "teacher.lr=0.01", "student.lr=0.02"]


def _cfg(num_workers: int, num_shards: int):
    cfg = tiny_config(epochs=4)
    cfg.teacher.epochs = 3
    cfg.prompt.refresh_epochs = 2  # a prompt round after epoch 1: the resumed epochs use version 1
    cfg.prompt.round_steps = 2
    cfg.teacher.lr, cfg.student.lr = 0.01, 0.02  # a few epochs that learn something measurable
    cfg.dist.num_workers, cfg.dist.num_shards = num_workers, num_shards
    return cfg


def _same(ref: dict, got: dict) -> None:
    assert ref["val"]["recall@20"] > 0 and ref["test"]["recall@20"] > 0  # a comparison that can fail
    assert got["best_epoch"] == ref["best_epoch"]
    for split in ("val", "test"):
        assert got[split]["recall@20"] == pytest.approx(ref[split]["recall@20"], abs=1e-6), split


def _same_history(ref_out: Path, out: Path, stage: str = "student") -> None:
    """Every epoch's validation recall@20 and training losses (not only the selected epoch, which
    may predate the fault; the losses tell apart runs that recall@20 on few users cannot)."""
    def curve(folder: Path) -> list[tuple[int, list[float]]]:
        rows = [json.loads(line) for line in (folder / stage / "history.jsonl").read_text().splitlines()]
        return [(r["epoch"], [r["val"]["recall@20"]] + [r[k] for k in sorted(r) if k.startswith("loss_")])
                for r in rows if "val" in r]

    ref, got = curve(ref_out), curve(out)
    assert [e for e, _ in got] == [e for e, _ in ref]
    for (e, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), e


@pytest.fixture(scope="module")
def subset(tiktok_path):
    return subset_first_users(load_dataset(tiktok_path), N_USERS)


@pytest.fixture(scope="module")
def reference_2_workers(subset, tmp_path_factory, ray_session):
    """The uninterrupted run with 2 Train workers and 2 shards (shared by the tests that kill one)."""
    from promptmm_dist.distributed import run_distributed

    out = tmp_path_factory.mktemp("ref2")
    t0 = time.perf_counter()
    metrics = run_distributed(subset, _cfg(2, 2), out)
    return metrics, time.perf_counter() - t0, out


@pytest.mark.timeout(900)
def test_a_student_worker_killed_mid_epoch(subset, reference_2_workers, tmp_path, ray_session):
    from promptmm_dist.distributed import run_distributed

    ref, ref_s, ref_out = reference_2_workers
    injector = kill_when(epoch_reached(tmp_path, "student", 2, rank=1), "train_worker", timeout=600,
                         delay=0.2, out=tmp_path, stage="student", rank=1)
    t0 = time.perf_counter()
    metrics = run_distributed(subset, _cfg(2, 2), tmp_path)
    wall = time.perf_counter() - t0
    injector.cancel()
    assert injector.error is None, injector.error
    assert injector.killed is not None, "the student worker was never killed"
    events = (progress_dir(tmp_path, "student") / "events.log").read_text()
    resumed = [int(k) for k in re.findall(r"resumed student from epoch (\d+)", events)]
    assert resumed and 1 <= resumed[0] <= 2, events
    _same(ref["student"], metrics["student"])
    _same(ref["teacher"], metrics["teacher"])
    _same_history(ref_out, tmp_path)
    print(f"\nfault (a): killed pid {injector.killed}, resumed student from epoch {resumed[0]}; "
          f"wall {wall:.1f}s vs uninterrupted {ref_s:.1f}s (lost {wall - ref_s:+.1f}s)")


def _cli(data_dir: Path, out: Path) -> list[str]:
    args = [sys.executable, "-m", "promptmm_dist", "run", "--data", str(data_dir), "--out", str(out),
            "--num-workers", "0", "--num-shards", "2", "--json"]
    for s in SETS:
        args += ["--set", s]
    return args


def _run(args: list[str], log: Path) -> subprocess.Popen:
    """A driver in its own process group (so whatever it started can be cleaned up by group id)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> dict | None:
    """Wait for the driver; its metrics (the --json line), None when it printed none."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes this driver left behind, if any
        except ProcessLookupError:
            pass
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


@pytest.mark.timeout(1200)
def test_c_driver_killed_during_student_then_rerun(subset, tmp_path):
    data_dir = ensure_canonical(subset, tmp_path / "data")
    t0 = time.perf_counter()
    ref_proc = _run(_cli(data_dir, tmp_path / "ref"), tmp_path / "ref.log")
    ref = _finish(ref_proc, 500)
    ref_s = time.perf_counter() - t0
    assert ref_proc.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]

    out = tmp_path / "run"
    t0 = time.perf_counter()
    first = _run(_cli(data_dir, out), tmp_path / "first.log")
    injector = kill_when(epoch_reached(out, "student", 3), "driver", timeout=500, delay=0.02, pid=first.pid)
    _finish(first, 500)
    assert injector.error is None and injector.killed == first.pid, injector.error
    assert first.returncode == -signal.SIGKILL
    assert (out / "teacher" / "done").exists() and not (out / "student" / "done").exists()

    second = _run(_cli(data_dir, out), tmp_path / "second.log")
    got = _finish(second, 500)
    wall = time.perf_counter() - t0
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log[-3000:]
    assert "teacher: reusing the finished stage" in log
    resumed = [int(k) for k in re.findall(r"resumed student from epoch (\d+)", log)]
    assert len(resumed) == 1 and 2 <= resumed[0] <= 3, log[-3000:]
    _same(ref["student"], got["student"])
    _same(ref["teacher"], got["teacher"])
    _same_history(tmp_path / "ref", out)
    print(f"\nfault (c): driver killed in student epoch 3, rerun resumed from epoch {resumed[0]}; "
          f"wall {wall:.1f}s (both runs) vs uninterrupted {ref_s:.1f}s (lost {wall - ref_s:+.1f}s)")
