"""The whole pipeline at scale, run as a user runs it: `promptmm run` on a synthetic canonical folder
with W Train workers, N shards and 2 TeacherWorkers, while a sampler records every process's peak RSS
and the object store's use (Ray's plasma store lives in /dev/shm here).

Steps are set through the product's own settings, nothing bench-only: one teacher epoch of
`--teacher-steps` steps (teacher.batch_size = train pairs / steps), two student epochs (two epochs of
soft rankings) of `--student-steps` / 2 steps each; the ranks validate every validation user after
each epoch and evaluate val + test at the end; the driver reads a prepared folder's manifest only.

    python bench/pipeline_scale.py                                   # 1M users / 100k items / 20M
    python bench/pipeline_scale.py --users 250000 --items 25000 --interactions 5000000
    python bench/scale.py --pipeline ...                             # the same, from scale.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import add_size_args, emit, ensure_data, markdown_table

REPO = Path(__file__).resolve().parents[1]


def status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Every `every` s: each process under `root` (its title, peak RSS) and /dev/shm's use."""

    def __init__(self, root: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.procs: dict[int, dict] = {}
        self.shm_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        from promptmm_dist.faults import cmdline, descendants

        base = shutil.disk_usage("/dev/shm").used if Path("/dev/shm").is_dir() else 0
        while not self._halt.is_set():
            for pid in [self.root, *descendants(self.root)]:
                hwm = status_kib(pid, "VmHWM")
                if hwm is None:
                    continue
                rec = self.procs.setdefault(pid, {"title": "", "peak_kib": 0})
                title = cmdline(pid)[:120]
                if title.startswith("ray::") and not title.startswith("ray::IDLE") or not rec["title"]:
                    rec["title"] = title or rec["title"]  # a worker takes its actor's title after it starts
                rec["peak_kib"] = max(rec["peak_kib"], hwm)
            if base or Path("/dev/shm").is_dir():
                self.shm_peak = max(self.shm_peak, shutil.disk_usage("/dev/shm").used - base)
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def role_of(title: str) -> str | None:
    """The product role of a process title (None: Ray's own processes, not ours)."""
    for cls, role in (("ShardState", "shard"), ("TeacherRank", "frozen teacher rank"), ("TeacherWorker", "teacher_worker"),
                      ("split_by_shard", "split task")):
        if title.startswith(f"ray::{cls}"):
            return role
    return None


def rank_pids(out: Path) -> dict[int, str]:
    """pid -> "teacher rank r" / "student rank r", from the progress files the ranks write."""
    from promptmm_dist.faults import read_progress

    got = {}
    for stage in ("teacher", "student"):
        for rank, rec in read_progress(out, stage).items():
            if rec.get("pid"):
                got[int(rec["pid"])] = f"{stage} rank {rank}"
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--teacher-workers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--student-steps", type=int, default=100, help="over the two student epochs")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: runs/scale-data/<sizes>)")
    p.add_argument("--out", default=None, help="run folder (default: runs/pipeline-scale/<sizes>, replaced)")
    p.add_argument("--save", default="pipeline_scale", help="NAME.json/.md under bench/results/")
    p.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)  # scale.py's flag, passed on
    args = p.parse_args(argv)

    sizes = f"u{args.users}-i{args.items}-n{args.interactions}-{args.modalities.replace(':', '').replace(',', '-')}-s{args.seed}"
    folder = Path(args.data_dir) if args.data_dir else REPO / "runs" / "scale-data" / sizes
    t0 = time.perf_counter()
    existed = (folder / "manifest.json").is_file()
    manifest = ensure_data(folder, args.users, args.items, args.interactions, args.modalities, args.seed)
    prepare_s = 0.0 if existed else time.perf_counter() - t0
    train_pairs = int(manifest.get("interactions", {}).get("train", 0)) or int(0.8 * args.interactions)
    out = Path(args.out) if args.out else REPO / "runs" / "pipeline-scale" / sizes
    shutil.rmtree(out, ignore_errors=True)
    t_batch = math.ceil(train_pairs / args.teacher_steps)
    s_batch = math.ceil(train_pairs / max(1, args.student_steps // 2))
    cmd = [sys.executable, "-m", "promptmm_dist", "run", "--data", str(folder), "--out", str(out), "--json",
           "--num-workers", str(args.workers), "--num-shards", str(args.shards),
           "--set", "teacher.epochs=1", "--set", f"teacher.batch_size={t_batch}",
           "--set", "student.epochs=2", "--set", f"student.batch_size={s_batch}",
           "--set", f"dist.num_teacher_workers={args.teacher_workers}"]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall_s = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        print(f"promptmm run failed (rc {proc.returncode})", file=sys.stderr)
        return proc.returncode
    metrics = json.loads(stdout.strip().splitlines()[-1])
    ranks = rank_pids(out)
    procs = []
    for pid, rec in sampler.procs.items():
        role = "driver" if pid == proc.pid else ranks.get(pid) or role_of(rec["title"])
        if role:
            procs.append({"process": role, "pid": pid, "peak_rss_mib": round(rec["peak_kib"] / 1024, 1)})
    procs.sort(key=lambda r: (r["process"], r["pid"]))
    cache = metrics["student"]["cache"]
    stages = {"prepare_s": round(prepare_s, 1), **{k: round(v, 1) for k, v in metrics["timings"].items()},
              "cache_tables_s": round(cache["tables_s"], 1), "cache_rank_s_per_epoch": round(cache["rank_s_per_epoch"], 1),
              "wall_s": round(wall_s, 1)}
    table = markdown_table(procs, ["process", "pid", "peak_rss_mib"])
    table += "\n\n" + markdown_table([stages], list(stages))
    table += (f"\n\n{manifest['n_users']:,} users, {manifest['n_items']:,} items, {train_pairs:,} training pairs; "
              f"{args.workers} Train workers, {args.shards} shards, {args.teacher_workers} TeacherWorkers; "
              f"{args.teacher_steps} teacher steps (batch {t_batch:,}), {args.student_steps} student steps over 2 epochs "
              f"(batch {s_batch:,}). Object store (/dev/shm) peak: {sampler.shm_peak / 2**20:,.0f} MiB. "
              f"Cached bytes per training pair: {cache['bytes_per_pair']}. Teacher test recall@20 "
              f"{metrics['teacher']['test']['recall@20']:.4f}, student {metrics['student']['test']['recall@20']:.4f} "
              f"(synthetic data: a scale check, not a quality claim).")
    emit(args.save, {"sizes": sizes, "command": cmd[2:], "processes": procs, "stages": stages,
                     "object_store_peak_mib": round(sampler.shm_peak / 2**20, 1), "bytes_per_pair": cache["bytes_per_pair"],
                     "driver_peak_rss_mib": next((r["peak_rss_mib"] for r in procs if r["process"] == "driver"), None),
                     "placement": metrics.get("placement"), "cpus": os.cpu_count()}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
