"""The partitioned frozen teacher of a student stage at scale: a `TeacherGroup` of W = 1 and W = 2
TeacherRank actors in the same run, 1 thread each, on a synthetic canonical folder.

For each W: setting up the ranks (each reads its share of the files and its rows of the checkpoint),
one cache version's blocks (one partitioned forward: `version_tables`), one prompt round (fed random
student rows cut per partition, as the student ranks hand theirs in), and every rank's peak RSS. The
point is the memory: no rank holds the whole graph or the whole teacher, so a rank's peak at W = 2
should be well under W = 1's.

    python bench/teacher_group.py                          # 1M users / 100k items / 20M interactions
    python bench/teacher_group.py --users 100000 --items 10000 --interactions 2000000
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from common import add_size_args, emit, markdown_table, synthetic_spec
from teacher_workers import make_checkpoint, peak_rss_mib

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.set_defaults(users=1_000_000, items=100_000, interactions=20_000_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--round-steps", type=int, default=2, help="prompt optimiser steps in the timed round")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: runs/scale-data/<sizes>)")
    p.add_argument("--save", default="teacher_group", help="NAME.json/.md under bench/results/")
    args = p.parse_args(argv)

    import ray

    from promptmm_dist.config import Config
    from promptmm_dist.distill.teacher_group import TeacherGroup

    sizes, folder, spec = synthetic_spec(args)
    cfg = Config()
    cfg.prompt.round_steps = args.round_steps
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    n, d = args.shards, cfg.teacher.embed_dim
    t0 = time.perf_counter()
    ckpt = str(folder / "bench_teacher.pt")
    if not Path(ckpt).exists():
        ckpt = ray.get(ray.remote(make_checkpoint).remote(spec, cfg.to_dict(), ckpt))
    print(f"checkpoint {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for w in (1, 2):
        t0 = time.perf_counter()
        group = TeacherGroup(spec, cfg.to_dict(), ckpt, n, w, num_cpus=0, timeout_s=3600.0, max_restarts=0)
        pids = group.ready()
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        blocks, status = group.version_tables(0, None, n)
        held = group.gather(status, "cache version 0's blocks")
        tables_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        parts = [ray.put((rng.normal(size=(h["users"], d)).astype(np.float32),
                          rng.normal(size=(h["items"], d)).astype(np.float32), None)) for h in held]
        t0 = time.perf_counter()
        res = group.gather(group.prompt_round(parts, 0, None), "the prompt round")[0]
        round_s = time.perf_counter() - t0
        rss = [peak_rss_mib(pid) for pid in pids]
        rows.append({"ranks": w, "setup_s": round(setup_s, 1), "version_blocks_s": round(tables_s, 1),
                     "prompt_round_s": round(round_s, 1), "round_loss": round(res["round_loss"], 4),
                     "rank_peak_rss_mib": max(rss), "per_rank_rss_mib": rss,
                     "users_per_rank": [h["users"] for h in held], "items_per_rank": [h["items"] for h in held]})
        print(rows[-1], flush=True)
        del blocks, parts
        group.close()
        time.sleep(2)
    ratio = rows[1]["rank_peak_rss_mib"] / rows[0]["rank_peak_rss_mib"]
    table = markdown_table(rows, ["ranks", "setup_s", "version_blocks_s", "prompt_round_s", "rank_peak_rss_mib",
                                  "per_rank_rss_mib", "users_per_rank", "items_per_rank"])
    table += (f"\n\n{spec['n_users']:,} users, {spec['n_items']:,} items, {n} shards, 1 thread per rank, "
              f"{args.round_steps} prompt steps per round: a teacher rank's peak RSS at W = 2 is **{ratio:.3f}x** "
              f"that at W = 1.")
    emit(args.save, {"sizes": sizes, "shards": n, "rows": rows, "w2_over_w1_rank_rss": ratio,
                     "cpus": os.cpu_count()}, table)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
