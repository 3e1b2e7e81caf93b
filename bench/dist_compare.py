"""`promptmm run` on Tiktok locally (one process, no Ray) and on Ray with 1 and 2 Train workers (2 shards),
same recipe and seed: each Ray run's student test recall@20 against the local run's, wall times side by side.

    python bench/dist_compare.py [--modes local,1,2] [--set student.epochs=60 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import emit, markdown_table, require_real


def run_mode(mode: str, data: str, out: Path, overrides: list[str], seed: int) -> dict:
    """One `promptmm run`; mode 'local' is the single-process path, a number is that many Ray Train workers."""
    cmd = [sys.executable, "-m", "promptmm_dist", "run", "--data", data, "--recipe", "tiktok", "--out", str(out),
           "--seed", str(seed), "--json"]
    if mode != "local":
        cmd += ["--num-workers", mode, "--num-shards", "2"]
    for s in overrides:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run {mode} failed:\n{proc.stderr[-3000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": mode, "num_workers": "-" if mode == "local" else int(mode),
            "num_shards": "-" if mode == "local" else 2,
            "teacher_test_recall@20": m["teacher"]["test"]["recall@20"],
            "student_test_recall@20": m["student"]["test"]["recall@20"],
            "student_test_ndcg@20": m["student"]["test"]["ndcg@20"],
            "student_best_epoch": m["student"]["best_epoch"],
            "teacher_s": m["timings"]["teacher_s"], "student_s": m["timings"]["student_s"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/dist_compare")
    ap.add_argument("--modes", default="local,1,2", help="comma list: 'local' and/or numbers of Train workers")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--set", action="append", default=[], help="config overrides for every run")
    ap.add_argument("--name", default="dist_compare", help="result file stem under bench/results/")
    args = ap.parse_args()
    data = str(require_real("tiktok"))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    for mode in modes:
        rows.append(run_mode(mode, data, Path(args.out) / f"mode-{mode}", args.set, args.seed))
        print(f"{mode}: student test recall@20 {rows[-1]['student_test_recall@20']:.4f} "
              f"in {rows[-1]['wall_s']:.0f}s", flush=True)
    ref = rows[0]
    diffs = {r["mode"]: abs(r["student_test_recall@20"] - ref["student_test_recall@20"]) / ref["student_test_recall@20"]
             for r in rows[1:]}
    table = markdown_table(rows, list(rows[0]))
    for mode, rel in diffs.items():
        table += f"\n\n{mode} vs {ref['mode']}: student test recall@20 differs by {rel * 100:.1f}% (relative)"
    emit(args.name, {"rows": rows, "relative_difference_vs_first": diffs, "reference": ref["mode"],
                          "overrides": args.set, "seed": args.seed}, table)


if __name__ == "__main__":
    main()
