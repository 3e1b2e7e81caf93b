"""Student epoch time three ways, in one process on the real Tiktok data:

- cached    : the epoch's soft rankings are ready before the epoch starts (what the Ray cache serves:
              TeacherWorkers produce epoch e+1 while the students train epoch e); the time to produce
              them is measured apart (`produce_s`, off the students' critical path in the Ray pipeline)
- in_process: the same soft rankings computed at the start of the epoch in the training process
              (the local single-process mode)
- online    : the teacher forward recomputed at every optimiser step (what the authors' code does)
- no_kd     : plain BPR, no distillation

The modes are interleaved epoch by epoch (cached, online, no_kd, cached, ...) so that load from other
processes on a shared machine hits all three alike. Prints the ratios online/cached (what the cache
saves) and cached/no_kd (what distillation still costs), using the median epoch of each mode.
Usage: python bench/cache_bench.py [--rounds 3] [--teacher RUN_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import emit, markdown_table, require_real
from promptmm_dist.config import Config
from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.local_kd import InProcessTeacherKD, NoKD, OnlineTeacherKD
from promptmm_dist.models.student import LightGCN
from promptmm_dist.train.teacher_checkpoint import load_teacher
from promptmm_dist.train.student_loop import train_epoch
from promptmm_dist.train.teacher_loop import build_teacher, steps_per_epoch

MODES = ("cached", "in_process", "online", "no_kd")


class Prefetched:
    """A KD source whose epoch is produced before the epoch is trained (the cache's contract)."""

    def __init__(self, kd: InProcessTeacherKD) -> None:
        self.kd, self._ready = kd, {}

    def prepare(self, epoch: int) -> None:
        self._ready[epoch] = self.kd.epoch(epoch)

    def epoch(self, epoch: int):
        return self._ready.pop(epoch)

    def after_epoch(self, epoch, user_emb, item_emb):
        return self.kd.after_epoch(epoch, user_emb, item_emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per mode (after one warm-up round)")
    ap.add_argument("--teacher", default=None, help="trained teacher run folder (default: untrained)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(require_real("tiktok"))
    cfg = Config()
    teacher = load_teacher(data, cfg, Path(args.teacher)) if args.teacher else build_teacher(data, cfg)
    graph = GraphPropagator.from_train(data.train_csr)
    sampler = TrainSampler(data.train_csr)
    n_steps = steps_per_epoch(sampler.n_pairs, cfg.student.batch_size)
    setups = {}
    for mode in MODES:
        torch.manual_seed(0)
        student = LightGCN(data.n_users, data.n_items, cfg.student.embed_dim, cfg.student.n_layers,
                           teacher_dim=cfg.teacher.embed_dim)
        kd = {"cached": lambda: Prefetched(InProcessTeacherKD(teacher, graph, sampler, cfg, student=student)),
              "in_process": lambda: InProcessTeacherKD(teacher, graph, sampler, cfg, student=student),
              "online": lambda: OnlineTeacherKD(teacher, graph, sampler, cfg, student=student),
              "no_kd": lambda: NoKD(sampler, cfg)}[mode]()
        setups[mode] = (student, kd, torch.optim.Adam(student.parameters(), lr=cfg.student.lr))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    produce: list[float] = []
    for epoch in range(args.rounds + 1):
        for mode in MODES:
            student, kd, opt = setups[mode]
            if isinstance(kd, Prefetched):
                t0 = time.perf_counter()
                kd.prepare(epoch)
                if epoch > 0:
                    produce.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_epoch(student, student, graph, kd, epoch, opt, cfg.student, n_steps, stage=mode)
            if epoch > 0:  # round 0 warms up (teacher forward of the cached mode, allocator)
                times[mode].append(time.perf_counter() - t0)
        print(f"round {epoch}: " + ", ".join(f"{m} {times[m][-1]:.1f}s" for m in MODES if times[m]), flush=True)
    rows = [{"mode": m, "epoch_s_median": statistics.median(times[m]), "epoch_s_min": min(times[m]),
             "epochs_timed": len(times[m]), "steps_per_epoch": n_steps} for m in MODES]
    by = {r["mode"]: r["epoch_s_median"] for r in rows}
    ratios = {"online_over_cached": by["online"] / by["cached"], "cached_over_no_kd": by["cached"] / by["no_kd"],
              "online_over_in_process": by["online"] / by["in_process"],
              "in_process_over_no_kd": by["in_process"] / by["no_kd"]}
    table = markdown_table(rows, ["mode", "epoch_s_median", "epoch_s_min", "steps_per_epoch", "epochs_timed"])
    table += (f"\n\nonline/cached = {ratios['online_over_cached']:.2f}x (what the cache saves); "
              f"cached/no-KD = {ratios['cached_over_no_kd']:.2f}x (what distillation still costs)"
              f"\n\nin-process (soft rankings computed in the training process): online/in_process = "
              f"{ratios['online_over_in_process']:.2f}x, in_process/no-KD = {ratios['in_process_over_no_kd']:.2f}x; "
              f"producing one epoch's soft rankings took {statistics.median(produce):.2f}s (median)")
    emit("cache_bench", {"rows": rows, "ratios": ratios, "threads": args.threads, "times": times,
                         "produce_s": produce,
                         "dataset": "tiktok", "teacher": args.teacher or "untrained"}, table)


if __name__ == "__main__":
    main()
