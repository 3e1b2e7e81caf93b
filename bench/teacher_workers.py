"""One epoch's soft rankings with 1 and with 2 TeacherWorkers, in the same run, 1 thread each.

The pieces are the product's: InteractionShard actors on a synthetic canonical folder, one teacher rank
(a one-rank `TeacherGroup`) computing the cache version's embedding blocks once (`version_tables`, timed apart), and TeacherWorker
actors that rank the shards' epoch samples from those blocks (worker j takes shards j, j + W, ...).
Rounds alternate W = 1 and W = 2 on the same samples and blocks, so load from other processes hits
both alike; the ratio uses each W's median round. Also reported: the shards' sampling time (the
other half of producing an epoch), the cached bytes per training pair, and each actor's peak RSS.

    python bench/teacher_workers.py                        # 200k users / 20k items / 4M interactions
    python bench/teacher_workers.py --users 20000 --items 4000 --interactions 400000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import add_size_args, emit, markdown_table, synthetic_spec

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def make_checkpoint(spec: dict, cfg_dict: dict, path: str) -> str:
    """An (untrained) teacher checkpoint for the data: timing does not depend on the weights' values."""
    import torch

    from promptmm_dist.config import config_from_dict
    from promptmm_dist.distill.teacher_model import load_canonical
    from promptmm_dist.paths import hard_token_dir
    from promptmm_dist.train.teacher_loop import build_teacher

    cfg = config_from_dict(cfg_dict)
    teacher = build_teacher(load_canonical(spec), cfg, cache_folder=hard_token_dir())
    torch.save(teacher.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.set_defaults(users=200_000, items=20_000, interactions=4_000_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per W (after one warm-up round)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: runs/scale-data/<sizes>)")
    p.add_argument("--save", default="teacher_workers", help="NAME.json/.md under bench/results/")
    args = p.parse_args(argv)

    import ray

    from promptmm_dist.config import Config
    from promptmm_dist.data.shards import ShardState
    from promptmm_dist.distill.teacher_group import TeacherGroup
    from promptmm_dist.distill.teacher_workers import TeacherWorker

    sizes, folder, spec = synthetic_spec(args)
    cfg = Config()
    n_neg = cfg.student.neg_sample_num
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    n = args.shards
    t0 = time.perf_counter()
    ckpt = ray.get(ray.remote(make_checkpoint).remote(spec, cfg.to_dict(), str(folder / "bench_teacher.pt")))
    shard_cls = ray.remote(num_cpus=0)(ShardState)
    shards = [shard_cls.remote(str(folder / "interactions.parquet"), k, n, spec["n_users"], spec["n_items"])
              for k in range(n)]
    # one teacher rank (the ranking workers are what this measures), on one thread (0 CPUs reserved)
    model = TeacherGroup(spec, cfg.to_dict(), ckpt, n, 1, num_cpus=0, timeout_s=3600.0, max_restarts=0)
    ray.get([s.info.remote() for s in shards])
    model.ready()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blocks, status = model.version_tables(0, None, n)
    model.gather(status, "cache version 0's blocks")
    tables_s = time.perf_counter() - t0
    print(f"setup {setup_s:.1f}s, cache version 0's blocks {tables_s:.1f}s", flush=True)

    worker_cls = ray.remote(num_cpus=0)(TeacherWorker)
    pools = {w: [worker_cls.remote(threads=1) for _ in range(w)] for w in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    sample_s: list[float] = []
    pairs = nbytes = 0
    for r in range(args.rounds + 1):
        t0 = time.perf_counter()
        samples = [s.epoch_samples.remote(n_neg, 1000 * r, 64) for s in shards]
        ray.wait(samples, num_returns=n)
        if r > 0:
            sample_s.append(time.perf_counter() - t0)
        for w, pool in pools.items():
            t0 = time.perf_counter()
            refs = [pool[k % w].soft_ranking.remote(blocks[k], blocks[n], samples[k], k, n) for k in range(n)]
            ray.wait(refs, num_returns=n)
            dt = time.perf_counter() - t0
            if r > 0:  # round 0 warms the workers up (imports, first reads of the blocks)
                times[w].append(dt)
            if w == 1 and r == 1:
                got = ray.get(refs)
                pairs, nbytes = sum(len(g) for g in got), sum(g.nbytes() for g in got)
                del got
            del refs
        print(f"round {r}: " + ", ".join(f"W={w} {times[w][-1]:.2f}s" for w in times if times[w] and r > 0), flush=True)
        del samples
    rss = {"teacher_model": peak_rss_mib(model.pids()[0]),
           "teacher_workers": [peak_rss_mib(ray.get(a.pid.remote())) for w in (1, 2) for a in pools[w]],
           "shards": [peak_rss_mib(ray.get(s.pid.remote())) for s in shards]}
    med = {w: statistics.median(v) for w, v in times.items()}
    ratio = med[2] / med[1]
    rows = [{"teacher_workers": w, "rank_s_median": med[w], "rank_s_min": min(times[w]), "rounds": len(times[w])}
            for w in (1, 2)]
    table = markdown_table(rows, ["teacher_workers", "rank_s_median", "rank_s_min", "rounds"])
    table += (f"\n\n{spec['n_users']:,} users, {spec['n_items']:,} items, {pairs:,} training pairs in {n} shards, "
              f"{n_neg} negatives: 2 TeacherWorkers take **{ratio:.2f}x** the time of 1 (1 thread each). "
              f"Cache version 0's blocks (one teacher forward): {tables_s:.1f}s, once per version. "
              f"Shard sampling per epoch: {statistics.median(sample_s):.2f}s. "
              f"Cached bytes per training pair: {nbytes / max(pairs, 1):.1f}. "
              f"Peak RSS MiB: teacher rank {rss['teacher_model']}, TeacherWorkers {rss['teacher_workers']}, "
              f"shards {rss['shards']}.")
    emit(args.save, {"sizes": sizes, "shards": n, "n_neg": n_neg, "pairs": pairs, "bytes_per_pair": nbytes / max(pairs, 1),
                     "rank_s": times, "rank_s_median": med, "w2_over_w1": ratio, "tables_s": tables_s,
                     "setup_s": setup_s, "sample_s": sample_s, "peak_rss_mib": rss, "cpus": os.cpu_count()}, table)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
