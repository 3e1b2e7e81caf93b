"""The CPU sparse-product kernel one graph hop runs: scipy's CSR loop against torch's MKL CSR kernel on
a view of the same int32 arrays (`data.graph.cpu_product`), and that kernel over column blocks of
the matrix (`data.graph.BlockedCsr`, what a hop runs), on one thread.

Graphs: the real Tiktok normalised adjacency and a synthetic bipartite graph of the scale benchmark's
size (1M users, 100k items, 20M interactions; item popularity Zipf-like). Columns: 64 (the student's
hop) and 192 (the teacher's fused ID + 2-modality hop). Rounds alternate the kernels, so load from
other processes hits both alike; the ratio is the median of each.

    python bench/spmm_kernel.py [--rounds 5] [--users 1000000 --items 100000 --interactions 20000000]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import scipy.sparse as sp
import torch

from common import emit, markdown_table, require_real
from promptmm_dist.data.graph import BlockedCsr, cpu_product, normalized_adjacency


def synthetic_adjacency(users: int, items: int, interactions: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, interactions)
    i = (rng.zipf(1.2, interactions) - 1) % items
    r = sp.csr_matrix((np.ones(interactions, np.float32), (u, i)), shape=(users, items))
    r.data[:] = 1.0  # duplicates summed: one edge per pair
    return normalized_adjacency(r)


def tiktok_adjacency() -> sp.csr_matrix:
    from promptmm_dist.data.formats import load_dataset

    data = load_dataset(str(require_real("tiktok")))
    return normalized_adjacency(data.train_csr)


def time_kernels(adj: sp.csr_matrix, cols: int, rounds: int) -> dict:
    x = torch.rand(adj.shape[1], cols, generator=torch.Generator().manual_seed(0))
    blocked = BlockedCsr(adj)
    kernels = {"scipy": lambda: torch.from_numpy(adj @ x.numpy()), "torch_mkl": lambda: cpu_product(adj, x),
               "blocked": lambda: blocked.product(x)}
    ref = kernels["scipy"]()
    err = max(float((kernels[k]() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) for k in ("torch_mkl", "blocked"))
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(rounds):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"cols": cols, "nnz": int(adj.nnz), "rows": int(adj.shape[0]), "scipy_s": med["scipy"],
            "torch_mkl_s": med["torch_mkl"], "speedup": med["scipy"] / med["torch_mkl"],
            "column_blocks": len(blocked.blocks), "blocked_s": med["blocked"],
            "blocked_speedup": med["torch_mkl"] / med["blocked"], "max_rel_diff": err}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--no-tiktok", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    graphs = {} if args.no_tiktok else {"tiktok": tiktok_adjacency}
    graphs[f"synthetic {args.users:,}u/{args.items:,}i/{args.interactions:,}"] = (
        lambda: synthetic_adjacency(args.users, args.items, args.interactions))
    rows = []
    for name, make in graphs.items():
        adj = make()
        for cols in (64, 192):
            r = time_kernels(adj, cols, args.rounds)
            rows.append({"graph": name, **r})
            print(f"{name} x {cols}: scipy {r['scipy_s']:.3f} s, torch/MKL {r['torch_mkl_s']:.3f} s "
                  f"({r['speedup']:.2f}x), column blocks {r['blocked_s']:.3f} s ({r['blocked_speedup']:.2f}x MKL)", flush=True)
        del adj
    payload = {"threads": 1, "rounds": args.rounds, "rows": rows,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    table = markdown_table(rows, ["graph", "rows", "nnz", "cols", "scipy_s", "torch_mkl_s", "speedup",
                                  "column_blocks", "blocked_s", "blocked_speedup", "max_rel_diff"])
    emit("spmm_kernel", payload, "One hop's sparse product, 1 thread, median of rounds (same run):\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
