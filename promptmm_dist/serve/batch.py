"""`promptmm recommend --all`: top-K for every user with Ray Data, written as Parquet.

The users are cut into blocks; a Ray Data actor pool scores one block per call. The user and item
tables and the masked (training) items go into the object store once (`ray.put`) and reach every
actor as references, so no block carries a copy. The driver writes each block's rows as
`block-NNNNN.parquet` into a temporary folder beside `out`, renamed into place only when every block
is written: an error leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from promptmm_dist.errors import DataError
from promptmm_dist.serve.rank import COLUMNS, score_block, user_blocks

SUMMARY_FILE = "_recommend.json"  # '_' prefix: Parquet readers skip it when reading the folder


def log(msg: str) -> None:
    print(f"promptmm: {msg}", file=sys.stderr, flush=True)


class BlockScorer:
    """Ray Data actor: holds the shared tables (resolved once from the object store) and scores
    user blocks."""

    def __init__(self, refs: dict, k: int) -> None:
        import ray

        # zero-copy, read-only views of the object store's one copy per node
        tables = dict(zip(refs, ray.get(list(refs.values()))))
        self.user, self.item, self.k = tables["user"], tables["item"], k
        self.exclude = (tables["indptr"], tables["indices"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for block, start, stop in zip(batch["block"], batch["start"], batch["stop"]):
            rows = score_block(self.user, self.item, int(start), int(stop), self.k, self.exclude)
            rows["block"] = np.full(len(rows["user"]), block, dtype=np.int32)
            parts.append(rows)
        return {c: np.concatenate([p[c] for p in parts]) for c in (*COLUMNS, "block")}


def scored_dataset(user: np.ndarray, item: np.ndarray, exclude: sp.csr_matrix | None, k: int,
                   block_size: int, num_workers: int):
    """The lazy Ray Dataset of (user, rank, item, score, block) rows, one input row per user block."""
    import ray

    blocks = user_blocks(len(user), block_size)
    if exclude is None:
        exclude = sp.csr_matrix((len(user), len(item)), dtype=np.float32)
    refs = {"user": ray.put(user), "item": ray.put(item),
            "indptr": ray.put(np.asarray(exclude.indptr)), "indices": ray.put(np.asarray(exclude.indices))}
    total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    cpus = round(min(1.0, total_cpus / num_workers), 3)  # never ask for more CPUs than the cluster has
    items = [{"block": b, "start": s, "stop": e} for b, (s, e) in enumerate(blocks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(BlockScorer, batch_size=1, batch_format="numpy", num_cpus=cpus,
                          compute=ray.data.ActorPoolStrategy(size=num_workers),
                          fn_constructor_kwargs={"refs": refs, "k": k}), len(blocks)


def write_blocks(batches, folder: Path, n_blocks: int, progress: Callable[[str], None]) -> dict:
    """Write each yielded batch's rows per block; a block split over several batches gets parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: dict[int, int] = {}
    rows = 0
    for batch in batches:
        for b in np.unique(batch["block"]):
            sel = batch["block"] == b
            table = pa.table({c: batch[c][sel] for c in COLUMNS})
            n = parts.get(int(b), 0)
            name = f"block-{int(b):05d}.parquet" if n == 0 else f"block-{int(b):05d}-{n}.parquet"
            pq.write_table(table, folder / name)
            parts[int(b)] = n + 1
            rows += table.num_rows
            if n == 0:
                progress(f"recommend: block {len(parts)}/{n_blocks} written ({table.num_rows} rows)")
    return {"blocks": len(parts), "rows": rows}


def recommend_all(user: np.ndarray, item: np.ndarray, exclude: sp.csr_matrix | None, k: int, out: Path,
                  block_size: int, num_workers: int, force: bool = False, info: dict | None = None,
                  progress: Callable[[str], None] = log) -> dict:
    """Score every user on Ray (already initialised) and write `out/` atomically; returns a summary."""
    out = Path(out)
    if out.exists() and not force:
        raise DataError(out, None, "already exists (pass --force to replace it)")
    t0 = time.perf_counter()
    ds, n_blocks = scored_dataset(user, item, exclude, k, block_size, num_workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        written = write_blocks(ds.iter_batches(batch_size=None, batch_format="numpy"), tmp, n_blocks, progress)
        if written["blocks"] != n_blocks:
            raise RuntimeError(f"{written['blocks']} of {n_blocks} user blocks came back")
        summary = {**(info or {}), "k": k, "users": len(user), "items": len(item), "block_size": block_size,
                   "num_workers": num_workers, **written, "columns": list(COLUMNS),
                   "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` (with --force) is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
