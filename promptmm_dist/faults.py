"""Fault injection for tests and benchmarks: SIGKILL one process of a run, by role, when a condition
holds (a stage reached epoch K, a log line appeared).

Roles: "train_worker" (a Ray Train worker of a stage, by world rank), "teacher_model" (a TeacherRank
actor of the frozen teacher group), "teacher_worker" (a TeacherWorker actor), "shard" (an InteractionShard/ShardState actor) and "driver" (a pid you started).

Pids come from the run itself, never from a broad process-name match across the machine:
- Train workers write `<out>/progress/<stage>/rank<r>.json` ({"pid", "epoch"}) at the start of every
  epoch (`promptmm_dist.train.state.mark_progress`), which gives both the trigger and the pid by rank.
- Actors: the processes titled `ray::<Class>` among the descendants of the process that started this
  Ray session (`root_pid`, default: this process; reads /proc, Linux only), or
  `ray.util.state.list_actors` on request (`state_api=True`, needs the dashboard).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

ACTOR_CLASSES = {"teacher_model": ("TeacherRank",), "teacher_worker": ("TeacherWorker",),
                 "shard": ("InteractionShard", "ShardState")}
ROLES = ("train_worker", "teacher_model", "teacher_worker", "shard", "driver")


def progress_dir(out: str | Path, stage: str) -> Path:
    return Path(out) / "progress" / stage


def read_progress(out: str | Path, stage: str) -> dict[int, dict]:
    """rank -> {"pid", "epoch"} as last written by that rank (missing or half-written files skipped)."""
    got: dict[int, dict] = {}
    folder = progress_dir(out, stage)
    if not folder.is_dir():
        return got
    for f in folder.glob("rank*.json"):
        try:
            got[int(f.stem[4:])] = json.loads(f.read_text())
        except (ValueError, OSError):
            continue
    return got


def epoch_reached(out: str | Path, stage: str, epoch: int, rank: int | None = None) -> Callable[[], bool]:
    """Condition: `rank` (any rank when None) of `stage` has started epoch >= `epoch`."""
    def cond() -> bool:
        prog = read_progress(out, stage)
        ranks = [rank] if rank is not None else list(prog)
        return any(r in prog and int(prog[r].get("epoch", -1)) >= epoch for r in ranks)
    return cond


def log_contains(path: str | Path, text: str) -> Callable[[], bool]:
    """Condition: the log file at `path` contains `text`."""
    def cond() -> bool:
        try:
            return text in Path(path).read_text(errors="replace")
        except OSError:
            return False
    return cond


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(root: int) -> list[int]:
    """Pids of every process below `root` (/proc walk)."""
    kids, out, todo = _children(), [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


_descendants = descendants  # the earlier private name (bench/faults.py)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def actor_pids(role: str, root_pid: int | None = None, state_api: bool = False) -> list[int]:
    """Pids of the live actors of `role` ("teacher_worker" or "shard") in this run's Ray session:
    the processes titled `ray::<Class>` among the descendants of `root_pid` (the process that started
    the local Ray; default this one). `state_api=True` asks `ray.util.state.list_actors` instead (a
    cluster with a dashboard; not the default: on a shared machine a local Ray without one resolves
    to whichever dashboard listens on the default port, i.e. possibly another session's actors)."""
    classes = ACTOR_CLASSES[role]
    if state_api:
        import ray
        from ray.util.state import list_actors

        return sorted(a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                                 filters=[("state", "=", "ALIVE")], detail=True,
                                                 raise_on_missing_output=False)
                      if a.class_name in classes and a.pid)
    root = root_pid or os.getpid()
    return sorted(p for p in descendants(root)
                  if any(cmdline(p).startswith(f"ray::{c}") for c in classes))


def train_worker_pid(out: str | Path, stage: str, rank: int) -> int | None:
    rec = read_progress(out, stage).get(rank)
    return int(rec["pid"]) if rec and rec.get("pid") else None


def kill_pid(pid: int) -> int:
    """SIGKILL `pid` (no clean-up runs: that is the point)."""
    os.kill(pid, signal.SIGKILL)
    return pid


def kill(role: str, *, out: str | Path | None = None, stage: str | None = None, rank: int = 0,
         pid: int | None = None, root_pid: int | None = None, state_api: bool = False) -> int:
    """SIGKILL one process of the run; returns its pid. train_worker needs out+stage (+rank); driver
    needs pid; actor roles take the first live one (lowest pid)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} ({', '.join(ROLES)})")
    if role == "driver":
        if pid is None:
            raise ValueError("role 'driver' needs pid")
        return kill_pid(pid)
    if role == "train_worker":
        if out is None or stage is None:
            raise ValueError("role 'train_worker' needs out and stage")
        found = train_worker_pid(out, stage, rank)
        if found is None:
            raise RuntimeError(f"no progress record for {stage} rank {rank} under {progress_dir(out, stage)}")
        return kill_pid(found)
    pids = actor_pids(role, root_pid, state_api)
    if not pids:
        raise RuntimeError(f"no live {role} actor found")
    return kill_pid(pids[0])


class FaultInjector(threading.Thread):
    """Background thread: polls `condition` and, the first time it holds, SIGKILLs the target.
    `killed` holds the pid (None if the condition never held before `timeout`), `error` any failure,
    `at` the monotonic time of the kill."""

    def __init__(self, condition: Callable[[], bool], role: str, timeout: float = 300.0,
                 delay: float = 0.0, poll: float = 0.05, **target) -> None:
        super().__init__(name=f"fault-{role}", daemon=True)
        self.condition, self.role, self.timeout, self.delay, self.poll = condition, role, timeout, delay, poll
        self.target = target
        self.killed: int | None = None
        self.error: BaseException | None = None
        self.at: float | None = None
        self._cancel = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._cancel.is_set() and time.monotonic() < deadline:
                if self.condition():
                    if self.delay:
                        time.sleep(self.delay)
                    self.killed = kill(self.role, **self.target)
                    self.at = time.monotonic()
                    return
                time.sleep(self.poll)
        except BaseException as err:  # reported to the test through .error
            self.error = err

    def cancel(self) -> None:
        self._cancel.set()


def kill_when(condition: Callable[[], bool], role: str, timeout: float = 300.0, delay: float = 0.0,
              **target) -> FaultInjector:
    """Start a FaultInjector; e.g. `kill_when(epoch_reached(out, "student", 2, rank=1), "train_worker",
    out=out, stage="student", rank=1)`."""
    inj = FaultInjector(condition, role, timeout=timeout, delay=delay, **target)
    inj.start()
    return inj
