"""Student epoch time three ways, in one process on the real Tiktok data:

- cached : teacher soft rankings computed once per cache version and epoch (what the Ray cache serves)
- online : the teacher forward recomputed at every optimiser step (what the authors' code does)
- no_kd  : plain BPR, no distillation

Prints the ratios online/cached (what the cache saves) and cached/no_kd (what KD still costs).
Usage: python bench/cache_bench.py [--epochs 3] [--teacher RUN_DIR]
"""

from __future__ import annotations

import argparse
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
from promptmm_dist.pipeline import load_teacher
from promptmm_dist.train.student_loop import fit_student
from promptmm_dist.train.teacher_loop import build_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per mode (after one warm-up)")
    ap.add_argument("--teacher", default=None, help="trained teacher run folder (default: untrained)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(require_real("tiktok"))
    cfg = Config()
    cfg.student.epochs = args.epochs + 1
    cfg.student.patience = 0
    teacher = load_teacher(data, cfg, Path(args.teacher)) if args.teacher else build_teacher(data, cfg)
    graph = GraphPropagator.from_train(data.train_csr)
    sampler = TrainSampler(data.train_csr)
    rows = []
    for mode in ("cached", "online", "no_kd"):
        torch.manual_seed(0)
        student = LightGCN(data.n_users, data.n_items, cfg.student.embed_dim, cfg.student.n_layers,
                           teacher_dim=cfg.teacher.embed_dim)
        kd = {"cached": lambda: InProcessTeacherKD(teacher, graph, sampler, cfg, student=student),
              "online": lambda: OnlineTeacherKD(teacher, graph, sampler, cfg, student=student),
              "no_kd": lambda: NoKD(sampler, cfg)}[mode]()
        t0 = time.perf_counter()
        res = fit_student(data, cfg, student, graph, kd, sampler.n_pairs, log=lambda m: None, stage=mode)
        timed = [r["train_s"] for r in res.history[1:]]
        rows.append({"mode": mode, "epoch_train_s": sum(timed) / len(timed), "epochs_timed": len(timed),
                     "steps_per_epoch": -(-sampler.n_pairs // cfg.student.batch_size),
                     "wall_s": time.perf_counter() - t0})
        print(f"{mode}: {rows[-1]['epoch_train_s']:.2f} s/epoch", flush=True)
    by = {r["mode"]: r["epoch_train_s"] for r in rows}
    ratios = {"online_over_cached": by["online"] / by["cached"], "cached_over_no_kd": by["cached"] / by["no_kd"]}
    table = markdown_table(rows, ["mode", "epoch_train_s", "steps_per_epoch", "epochs_timed"])
    table += (f"\n\nonline/cached = {ratios['online_over_cached']:.2f}x (what the cache saves); "
              f"cached/no-KD = {ratios['cached_over_no_kd']:.2f}x (what distillation still costs)")
    emit("cache_bench", {"rows": rows, "ratios": ratios, "threads": args.threads,
                         "dataset": "tiktok", "teacher": args.teacher or "untrained"}, table)


if __name__ == "__main__":
    main()
