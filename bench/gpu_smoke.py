"""A short Tiktok run with the Train ranks on GPUs (NCCL between them), for machines that have them:
`promptmm run --num-workers G --set dist.use_gpu=true` with short epoch caps, timings per stage, and
optionally the same run on CPU ranks beside it. On a machine without G GPUs it stops with one line.

    python bench/gpu_smoke.py --gpus 1 [--gpus-too 2] [--epochs 3] [--cpu-too]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import emit, markdown_table, require_real


def run(data: str, out: Path, workers: int, gpu: bool, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "promptmm_dist", "run", "--data", data, "--recipe", "tiktok", "--out", str(out),
           "--num-workers", str(workers), "--num-shards", str(max(2, workers)), "--restart", "--json",
           "--set", f"dist.use_gpu={'true' if gpu else 'false'}",
           "--set", f"teacher.epochs={epochs}", "--set", f"student.epochs={epochs}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"gpu_smoke: {'GPU' if gpu else 'CPU'} run with {workers} workers failed: "
                 f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"device": "cuda" if gpu else "cpu", "workers": workers, "epochs": epochs,
            "teacher_s": m["timings"]["teacher_s"], "student_s": m["timings"]["student_s"], "wall_s": wall,
            "teacher_test_recall@20": m["teacher"]["test"]["recall@20"],
            "student_test_recall@20": m["student"]["test"]["recall@20"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpus", type=int, default=1, help="Train workers, one GPU each (1 or 2)")
    ap.add_argument("--gpus-too", type=int, default=None, help="also run with this many GPU workers")
    ap.add_argument("--epochs", type=int, default=3, help="epoch cap of both stages")
    ap.add_argument("--cpu-too", action="store_true", help="also run the same with CPU ranks")
    ap.add_argument("--out", default="runs/gpu_smoke")
    args = ap.parse_args()
    import torch

    counts = [args.gpus] + ([args.gpus_too] if args.gpus_too else [])
    have = torch.cuda.device_count()
    if max(counts) > have:
        sys.exit(f"gpu_smoke: asked for {max(counts)} GPU(s), this machine has {have}")
    data = str(require_real("tiktok"))
    rows = [run(data, Path(args.out) / f"gpu{g}", g, True, args.epochs) for g in counts]
    if args.cpu_too:
        rows.append(run(data, Path(args.out) / f"cpu{args.gpus}", args.gpus, False, args.epochs))
    for r in rows:
        print(f"{r['device']} x{r['workers']}: teacher {r['teacher_s']:.1f}s student {r['student_s']:.1f}s", flush=True)
    names = [torch.cuda.get_device_name(i) for i in range(have)]
    emit("gpu_smoke", {"rows": rows, "gpus": names}, markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
