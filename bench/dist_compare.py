"""`promptmm run` on Tiktok locally (one process, no Ray) and on Ray with 1 and 2 Train workers (2 shards),
same recipe and seeds: each Ray run's student test recall@20 against the local run's of the same seed,
and each mode's mean and sd over the seeds, wall times side by side. A finished run folder is reused.

    python bench/dist_compare.py [--modes local,1,2] [--seeds 2024,2025,2026] [--set student.epochs=60 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    # a finished folder is reused (no stage trains): the stage times are those its meta recorded
    reused = "teacher_s" not in m["timings"] or "student_s" not in m["timings"]
    teacher_s = m["timings"].get("teacher_s", m["teacher"].get("train_seconds", float("nan")))
    student_s = m["timings"].get("student_s", m["student"].get("train_seconds", float("nan")))
    if reused:
        wall = teacher_s + student_s
    return {"mode": mode, "seed": seed, "num_workers": "-" if mode == "local" else int(mode),
            "num_shards": "-" if mode == "local" else 2,
            "teacher_test_recall@20": m["teacher"]["test"]["recall@20"],
            "student_test_recall@20": m["student"]["test"]["recall@20"],
            "student_test_ndcg@20": m["student"]["test"]["ndcg@20"],
            "student_best_epoch": m["student"]["best_epoch"],
            "teacher_s": teacher_s, "student_s": student_s, "wall_s": wall, "reused": reused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/dist_compare")
    ap.add_argument("--modes", default="local,1,2", help="comma list: 'local' and/or numbers of Train workers")
    ap.add_argument("--seeds", default="2024", help="comma list of seeds (3 for a quality claim)")
    ap.add_argument("--set", action="append", default=[], help="config overrides for every run")
    ap.add_argument("--name", default="dist_compare", help="result file stem under bench/results/")
    args = ap.parse_args()
    data = str(require_real("tiktok"))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rows = []
    for seed in seeds:
        for mode in modes:
            rows.append(run_mode(mode, data, Path(args.out) / f"mode-{mode}-seed{seed}", args.set, seed))
            print(f"seed {seed} {mode}: student test recall@20 {rows[-1]['student_test_recall@20']:.4f} "
                  f"in {rows[-1]['wall_s']:.0f}s", flush=True)
    ref = modes[0]
    by = {(r["seed"], r["mode"]): r for r in rows}
    key = "student_test_recall@20"
    diffs = {f"{m} seed {s}": abs(by[s, m][key] - by[s, ref][key]) / by[s, ref][key]
             for s in seeds for m in modes[1:]}
    summary = []
    for m in modes:
        mine = [by[s, m] for s in seeds]
        summary.append({"mode": m, "seeds": len(mine),
                        **{f"{k}_mean": float(np.mean([r[k] for r in mine])) for k in ("teacher_test_recall@20", key)},
                        f"{key}_sd": float(np.std([r[key] for r in mine], ddof=1)) if len(mine) > 1 else 0.0,
                        "wall_s_mean": float(np.mean([r["wall_s"] for r in mine]))})
    table = markdown_table(rows, list(rows[0])) + "\n\n" + markdown_table(summary, list(summary[0]))
    for what, rel in diffs.items():
        table += f"\n\n{what} vs {ref}: student test recall@20 differs by {rel * 100:.1f}% (relative)"
    if len(seeds) > 1:
        means = {r["mode"]: r[f"{key}_mean"] for r in summary}
        for m in modes[1:]:
            table += (f"\n\nmean over {len(seeds)} seeds, {m} vs {ref}: "
                      f"{abs(means[m] - means[ref]) / means[ref] * 100:.1f}% (relative)")
    emit(args.name, {"rows": rows, "summary": summary, "relative_difference_vs_reference": diffs,
                     "reference": ref, "overrides": args.set, "seeds": seeds}, table)


if __name__ == "__main__":
    main()
