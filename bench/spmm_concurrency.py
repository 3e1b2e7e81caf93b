"""What two ranks on one machine can gain on a graph hop: the ceiling for the student's W = 2 speedup.

The student step at 1M users is nearly all sparse products (one hop: 31M non-zeros x 64 columns). At
W = 2 each rank multiplies half the adjacency rows. If the kernel were compute-bound, two processes
each doing a half at the same time would take half the time of one doing it all; if memory bandwidth
is the limit, they slow each other down. This times, interleaved round by round on the same arrays, one thread on
all rows, one thread on half the rows alone, and two processes (one thread each) on the two halves at
once: `ceiling` = all-rows time / concurrent half time is the most W = 2 can gain on these products
on this machine, whatever the exchange costs.

    python bench/spmm_concurrency.py [--users 1000000 --items 100000 --interactions 20000000] [--cols 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from common import emit, markdown_table
from spmm_kernel import synthetic_adjacency

from promptmm_dist.data.graph import BlockedCsr
from promptmm_dist.partition.plan import balanced_owner


def _load(folder: str, rows: np.ndarray | None) -> tuple[BlockedCsr, torch.Tensor]:
    """The adjacency rows (copied into this process's memory, in column blocks as a hop multiplies
    them) and the input table."""
    f = Path(folder)
    indptr, indices, data = (np.load(f / f"{n}.npy") for n in ("indptr", "indices", "data"))
    n = len(indptr) - 1
    adj = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    if rows is not None:
        adj = adj[rows]
    adj.indptr, adj.indices = adj.indptr.astype(np.int32), adj.indices.astype(np.int32)
    x = torch.rand(n, int(np.load(f / "cols.npy")), generator=torch.Generator().manual_seed(0))
    return BlockedCsr(adj), x


def _worker(folder: str, rows: np.ndarray | None, conn) -> None:
    """Holds its rows and the input; on "go" multiplies once and answers the seconds it took."""
    torch.set_num_threads(1)
    adj, x = _load(folder, rows)
    adj.product(x)  # warm
    conn.send("ready")
    while conn.recv() == "go":
        t0 = time.perf_counter()
        adj.product(x)
        conn.send(time.perf_counter() - t0)


def run(folder: str, halves: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Per round, in turn: all rows in one process, half the rows alone, both halves at once (one
    thread per process, kept processes). Interleaving the three puts a noisy neighbour's slow spell
    into all of them alike, so their ratio holds where absolute times drift."""
    ctx = mp.get_context("spawn")
    parts = {"all": None, "h0": halves[0], "h1": halves[1]}
    conns, procs = {}, []
    for name, rows in parts.items():
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(folder, rows, theirs))
        proc.start()
        assert mine.recv() == "ready"  # one at a time: loading is memory-heavy
        conns[name] = mine
        procs.append(proc)
    times: dict[str, list[float]] = {"whole": [], "alone": [], "together": []}
    for _ in range(rounds):
        conns["all"].send("go")
        times["whole"].append(conns["all"].recv())
        conns["h0"].send("go")
        times["alone"].append(conns["h0"].recv())
        conns["h0"].send("go")
        conns["h1"].send("go")
        times["together"].append(max(conns["h0"].recv(), conns["h1"].recv()))
    for c in conns.values():
        c.send("stop")
    for proc in procs:
        proc.join()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    adj = synthetic_adjacency(args.users, args.items, args.interactions)

    with tempfile.TemporaryDirectory() as folder:
        for name in ("indptr", "indices", "data"):
            np.save(Path(folder) / f"{name}.npy", getattr(adj, name))
        np.save(Path(folder) / "cols.npy", np.array(args.cols))
        nnz = int(adj.nnz)
        users, items = args.users, args.items
        # halves as the ranks own them (`partition.plan`): users u % 2 == r, items balanced by degree
        item_owner = balanced_owner(np.diff(adj.indptr)[users:], 2)
        user_ids = np.arange(users)
        halves = [np.concatenate([user_ids[user_ids % 2 == r], users + np.flatnonzero(item_owner == r)])
                  for r in range(2)]
        del adj
        times = run(folder, halves, args.rounds)
    whole, alone, together = (statistics.median(times[k]) for k in ("whole", "alone", "together"))
    rows = [{"what": "1 process, all rows", "processes": 1, "s_per_product": whole},
            {"what": "1 process, half the rows (alone)", "processes": 1, "s_per_product": alone},
            {"what": "2 processes, a half each (together; slower one)", "processes": 2, "s_per_product": together}]
    payload = {"users": users, "items": items, "interactions": args.interactions, "nnz": nnz, "cols": args.cols,
               "threads_per_process": 1, "rounds": args.rounds, "rows": rows, "times_s": times,
               "ideal_speedup": whole / alone, "ceiling": whole / together,
               "concurrent_slowdown": together / alone}
    print(f"all rows {whole:.3f} s, half alone {alone:.3f} s, halves together {together:.3f} s: "
          f"W=2 ceiling {payload['ceiling']:.2f}x", flush=True)
    table = markdown_table(rows, ["what", "processes", "s_per_product"])
    table += (f"\n\nIdeal W = 2 speedup (half alone) {payload['ideal_speedup']:.2f}x; with both halves at once "
              f"{payload['ceiling']:.2f}x (each half takes {payload['concurrent_slowdown']:.2f}x its time alone).")
    emit("spmm_concurrency", payload,
         f"One graph hop's sparse product ({nnz:,} non-zeros x {args.cols} columns, synthetic "
         f"{users:,} users / {items:,} items / {args.interactions:,} interactions), one thread per process, "
         f"median of {args.rounds} rounds, the three interleaved in each round:\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
