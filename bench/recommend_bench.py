"""Batch top-K for every Tiktok user: Ray Data with 1 and 2 scoring actors (`promptmm recommend --all`)
against a single-process numpy loop over the same user blocks, and a check that the tables are identical.

- numpy_loop : serve.rank.numpy_loop in this process (1 BLAS thread), compute only
- numpy+write: the same, plus writing the rows as one Parquet file
- ray_data_W : serve.batch.recommend_all with W actors (1 CPU, 1 BLAS thread each), end to end: object
               store puts, actor start-up, scoring, rows back to the driver, one Parquet file per block,
               atomic rename. One untimed warm-up run first (Ray's worker processes start once).

users/s = users / median wall seconds over --repeats runs. `--tiles 1,10` also runs the user table
stacked 10 times (93,080 users, each copy masked like the original) to show where Ray's fixed start-up
cost is paid back. Every Ray output is compared with the numpy
loop's rows (user, rank, item, score) for exact equality.
Usage: python bench/recommend_bench.py --model RUN_DIR [--k 20] [--repeats 3] [--tiles 1,10]
       (without --model: random float32 tables of Tiktok's shapes, --dim wide)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one BLAS thread per process: the loop and each actor use one core

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from common import emit, markdown_table, require_real  # noqa: E402
from promptmm_dist.data.formats import load_dataset  # noqa: E402
from promptmm_dist.serve.batch import recommend_all  # noqa: E402
from promptmm_dist.serve.export import check_matches, load_export  # noqa: E402
from promptmm_dist.serve.rank import COLUMNS, default_block_size, exclusion_csr, numpy_loop  # noqa: E402


def trained_as(export) -> str:  # noqa: ANN001 (serve.export.Export)
    """'teacher N + student M epochs' from the run's config.yaml, to say which model was scored."""
    import yaml

    for folder in export.run_folders():
        cfg = folder / "config.yaml"
        if cfg.is_file():
            c = yaml.safe_load(cfg.read_text()) or {}
            return f"promptmm run, teacher {c['teacher']['epochs']} + student {c['student']['epochs']} epochs"
    return str(export.path)


def timed(fn, repeats: int) -> tuple[float, object]:
    walls, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), result


def same_rows(folder: Path, ref: dict[str, np.ndarray]) -> bool:
    df = pd.read_parquet(folder).sort_values(["user", "rank"], kind="stable")
    return all(np.array_equal(df[c].to_numpy(), ref[c]) for c in COLUMNS)


def bench_scale(user: np.ndarray, item: np.ndarray, exclude, k: int, block: int, repeats: int, tile: int,
                workers_list: list[int]) -> list[dict]:  # noqa: ANN001 (csr)
    """The numpy loop, then Ray Data with each worker count, on one user table."""
    n, rows = len(user), []
    scale = {"tile": tile, "users": n}
    sec, ref = timed(lambda: numpy_loop(user, item, k, exclude, block), repeats)
    rows.append({**scale, "mode": "numpy_loop (1 process)", "workers": 1, "seconds": sec, "users_per_s": n / sec,
                 "identical": "reference"})

    def loop_and_write() -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        res = numpy_loop(user, item, k, exclude, block)
        with tempfile.TemporaryDirectory() as d:
            pq.write_table(pa.table(res), Path(d) / "recs.parquet")

    sec, _ = timed(loop_and_write, repeats)
    rows.append({**scale, "mode": "numpy_loop + Parquet write", "workers": 1, "seconds": sec,
                 "users_per_s": n / sec, "identical": "-"})
    with tempfile.TemporaryDirectory() as tmp:
        def ray_run(workers: int) -> Path:
            out = Path(tmp) / f"recs-{workers}-{time.perf_counter_ns()}"
            recommend_all(user, item, exclude, k, out, block, workers, progress=lambda m: None)
            return out

        ray_run(1)  # warm-up: Ray starts its worker processes once
        for workers in workers_list:
            sec, out = timed(lambda: ray_run(workers), repeats)
            rows.append({**scale, "mode": f"ray_data ({workers} actor{'s' if workers > 1 else ''})",
                         "workers": workers, "seconds": sec, "users_per_s": n / sec,
                         "identical": same_rows(out, ref)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="trained run folder (default: random tables)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dim", type=int, default=64, help="embedding size of the random tables")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tiles", default="1", help="user-table copies to score, e.g. 1,10")
    args = ap.parse_args()

    import ray

    from promptmm_dist.ray_setup import LOCAL_SYSTEM_CONFIG

    path = require_real("tiktok")
    data = load_dataset(path)
    if args.model:
        export = load_export(args.model)
        check_matches(export, data, str(path))
        user, item, model = export.user, export.item, f"trained student ({trained_as(export)})"
    else:
        rng = np.random.default_rng(0)
        user = rng.normal(size=(data.n_users, args.dim)).astype(np.float32)
        item = rng.normal(size=(data.n_items, args.dim)).astype(np.float32)
        model = f"random float32 tables ({args.dim}-d)"
    base_exclude = exclusion_csr(data, exclude_val=False)
    block = default_block_size(data.n_items)
    tiles = [int(t) for t in args.tiles.split(",")]
    rows, load_start = [], round(os.getloadavg()[0], 2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for tile in tiles:
            users = np.tile(user, (tile, 1))
            exclude = sp.vstack([base_exclude] * tile, format="csr")
            rows += bench_scale(users, item, exclude, args.k, block, args.repeats, tile,
                                [int(w) for w in args.workers.split(",")])
    finally:
        ray.shutdown()
    n = data.n_users

    payload = {"dataset": "tiktok", "users": n, "items": data.n_items, "k": args.k, "model": model,
               "dim": int(user.shape[1]), "block_size": block, "tiles": tiles, "repeats": args.repeats,
               "cpus": os.cpu_count(), "load_avg_1m_at_start": load_start, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "rows": rows}
    header = (f"Top-{args.k} for all {n} Tiktok users ({data.n_items} items, training items masked), "
              f"{model}, blocks of {block} users (tile N: the user table stacked N times); median of {args.repeats} runs on "
              f"{os.cpu_count()} CPUs (shared machine, 1-min load {load_start} at the start, {payload['load_avg_1m_at_end']} at the end); "
              "one BLAS thread per process. `identical`: every (user, rank, item, score) row equals the numpy loop's.")
    emit("recommend_bench", payload,
         header + "\n\n" + markdown_table(rows, ["tile", "users", "mode", "workers", "seconds", "users_per_s", "identical"]))


if __name__ == "__main__":
    main()
