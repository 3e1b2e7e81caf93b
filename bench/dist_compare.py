"""`promptmm run` on Tiktok with 1 and with 2 Ray Train workers (2 shards), same config and seed:
test recall@20 must agree within 5% (relative); wall times side by side.

    python bench/dist_compare.py [--set student.epochs=60 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import emit, markdown_table, require_real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/dist_compare")
    ap.add_argument("--set", action="append", default=[], help="config overrides for both runs")
    args = ap.parse_args()
    data = str(require_real("tiktok"))
    rows = []
    for workers in (1, 2):
        out = Path(args.out) / f"workers{workers}"
        cmd = [sys.executable, "-m", "promptmm_dist", "run", "--data", data, "--recipe", "tiktok", "--out", str(out),
               "--num-workers", str(workers), "--num-shards", "2", "--json"]
        for s in args.set:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run with {workers} workers failed:\n{proc.stderr[-3000:]}")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"num_workers": workers, "num_shards": 2,
                     "teacher_test_recall@20": m["teacher"]["test"]["recall@20"],
                     "student_test_recall@20": m["student"]["test"]["recall@20"],
                     "student_test_ndcg@20": m["student"]["test"]["ndcg@20"],
                     "student_best_epoch": m["student"]["best_epoch"],
                     "teacher_s": m["timings"]["teacher_s"], "student_s": m["timings"]["student_s"],
                     "wall_s": wall})
        print(f"workers={workers}: student test recall@20 {rows[-1]['student_test_recall@20']:.4f} "
              f"in {wall:.0f}s", flush=True)
    a, b = rows[0]["student_test_recall@20"], rows[1]["student_test_recall@20"]
    rel = abs(b - a) / a
    table = markdown_table(rows, list(rows[0]))
    table += f"\n\n2 workers vs 1: student test recall@20 differs by {rel * 100:.1f}% (relative)"
    emit("dist_compare", {"rows": rows, "relative_difference": rel, "overrides": args.set}, table)


if __name__ == "__main__":
    main()
