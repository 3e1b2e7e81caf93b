"""A rank's rows of the frozen item-item kNN graph (FREEDOM teacher), built without any rank repeating
another's work, as an operator over the item rows the ranks own.

Per modality: rank r finds the k nearest items of *its* items only (against every item: the item side
is small, and every rank reads the whole unit-normalised feature table once, like the hard tokens);
each edge i -> j is also sent to j's owner as j -> i (symmetrisation); a row's degree is its distinct
neighbours, and the (I,) degree vector is all-reduced for the column side of D^-1/2 A D^-1/2. The
modalities' normalised rows are averaged. The same `data.item_graph.knn_rows` picks the neighbours as in
one process, so W ranks build the rows of the same matrix (tested in tests/test_partition.py).
"""

from __future__ import annotations

import numpy as np
import torch

from promptmm_dist.data.item_graph import knn_rows, unit_rows
from promptmm_dist.partition.exchange import exchange_lists
from promptmm_dist.partition.operator import HALO_CHUNK_ROWS, PartitionedSpMM
from promptmm_dist.partition.plan import PartitionPlan
from promptmm_dist.train.world import World


def symmetric_rows(plan: PartitionPlan, my_items: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local row, global column) of the symmetrised 0/1 graph's nonzeros in this rank's item rows, from
    its items' directed kNN lists `top` (collective: the reversed edges go to their rows' owners)."""
    w = plan.world_size
    src = np.repeat(np.asarray(my_items, dtype=np.int64), top.shape[1])
    dst = top.ravel()
    owner = plan.item_owner[dst]
    reversed_edges = [torch.from_numpy(np.stack([dst[owner == s], src[owner == s]], axis=1)) for s in range(w)]
    got = exchange_lists(reversed_edges, w)
    got_pairs = np.concatenate([g.numpy().reshape(-1, 2) for g in got])  # one list per rank, w >= 1
    rows = np.concatenate([plan.local_item(src), plan.local_item(got_pairs[:, 0])])
    cols = np.concatenate([dst, got_pairs[:, 1]])
    key = np.unique(rows * np.int64(plan.n_items) + cols)  # an edge found from both ends counts once
    return key // plan.n_items, key % plan.n_items


def item_knn_operator(plan: PartitionPlan, world: World, my_items: np.ndarray, all_features: dict[str, np.ndarray],
                      k: int, mode: str = "cover", chunk_rows: int = HALO_CHUNK_ROWS) -> PartitionedSpMM:
    """One hop over the mean of the modalities' normalised kNN graphs, for this rank's item rows
    (`my_items`, local row order); `all_features`: every item's (prepared) rows, by global id."""
    n, n_mine = plan.n_items, len(my_items)
    parts_rows, parts_cols, parts_vals = [], [], []
    for x in all_features.values():
        rows, cols = symmetric_rows(plan, my_items, knn_rows(unit_rows(x), my_items, k))
        degree = torch.zeros(n, dtype=torch.float64)
        degree[torch.from_numpy(np.asarray(my_items, dtype=np.int64))] = torch.from_numpy(
            np.bincount(rows, minlength=n_mine).astype(np.float64))
        d = world.all_reduce_sum(degree).numpy()
        inv_sqrt = np.where(d > 0, d ** -0.5, 0.0).astype(np.float32)
        parts_rows.append(rows)
        parts_cols.append(cols)
        parts_vals.append(inv_sqrt[my_items[rows]] * inv_sqrt[cols] / len(all_features))
    rows, cols, vals = np.concatenate(parts_rows), np.concatenate(parts_cols), np.concatenate(parts_vals)
    return PartitionedSpMM(rows, plan.item_owner[cols], plan.local_item(cols), vals.astype(np.float32), n_mine,
                           [int(c) for c in plan.item_counts], world.rank, world.world_size, mode, chunk_rows)
