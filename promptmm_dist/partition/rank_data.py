"""What one rank reads and builds: its users' interactions (from the canonical Parquet, filtered while
streaming), its items' feature rows (memory-mapped `features/<m>.npy`, only those rows read), the item
degrees (an (I,) all-reduce: the item side is small), and its rows of the graph operators.

Nothing here holds a table of all users or all interactions: a rank keeps its users' rows; the item-side
rows of the adjacency (which users touched my items) arrive once, at setup, from the ranks that own
those users (one all-to-all of nnz / W triples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from promptmm_dist.data.dataset import TRAIN, InteractionData
from promptmm_dist.partition.exchange import exchange_lists
from promptmm_dist.partition.graph import PartitionedGraph
from promptmm_dist.partition.operator import HALO_CHUNK_ROWS, PartitionedSpMM
from promptmm_dist.partition.plan import PartitionPlan
from promptmm_dist.train.world import World

FEATURES_DIR = "features"


def read_rank_rows(parquet: Path, num_shards: int, rank: int, world_size: int,
                   shard_files: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, splits) of the users whose shard this rank trains, streamed batch by batch, in the
    canonical file's (user, item, split) order. `shard_files` (`data.shards.split_by_shard`): read only
    this rank's shards' files instead of filtering the whole file."""
    sources = [Path(shard_files[k]) for k in range(num_shards) if k % world_size == rank] if shard_files else [parquet]
    parts = []
    for source in sources:
        for batch in pq.ParquetFile(str(source)).iter_batches(batch_size=1 << 20, columns=["user", "item", "split"]):
            users = batch.column(0).to_numpy().astype(np.int64)
            keep = (users % num_shards) % world_size == rank
            parts.append((users[keep], batch.column(1).to_numpy()[keep].astype(np.int64),
                          batch.column(2).to_numpy()[keep].astype(np.int8)))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8)
    users, items, splits = (np.concatenate([p[j] for p in parts]) for j in range(3))
    if len(sources) > 1:  # shard by shard: back to the canonical order
        order = np.lexsort((splits, items, users))
        users, items, splits = users[order], items[order], splits[order]
    return users, items, splits


@dataclass
class RankData:
    """One rank's share of the dataset, in its own numbering (see partition.plan)."""

    plan: PartitionPlan
    world: World
    users: np.ndarray  # global ids of the rank's users, in local row order
    items: np.ndarray  # global ids of the rank's items, in local row order
    local: InteractionData  # the rank's users' interactions: users as local rows, items as gathered positions
    features: dict[str, np.ndarray]  # the rank's item rows, raw float32
    user_degree: np.ndarray  # (U_r,) training degree of the rank's users
    item_degree: np.ndarray  # (I,) training degree of every item
    train_users: np.ndarray  # training pairs of the rank's users: local user rows
    train_items: np.ndarray  # ... and global item ids
    folder: Path

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def feature_file(self, modality: str) -> Path:
        return self.folder / FEATURES_DIR / f"{modality}.npy"

    def all_features(self) -> dict[str, np.ndarray]:
        """Memory-mapped whole feature tables (item side: read for one-off item statistics only)."""
        return {m: np.load(self.feature_file(m), mmap_mode="r", allow_pickle=False) for m in self.features}

    def local_ids(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global (users, items) of this rank's samples -> (local user rows, gathered item positions)."""
        return self.plan.local_user(users), self.plan.item_pos[np.asarray(items, dtype=np.int64)]

    def graph(self, norm: str = "sym", mode: str = "cover", chunk_rows: int = HALO_CHUNK_ROWS) -> PartitionedGraph:
        """This rank's rows of the normalised adjacency and of the user <- item mean (collective);
        `chunk_rows`: rows per piece of a hop's exchange (`partition.operator.HALO_CHUNK_ROWS`)."""
        return PartitionedGraph(self._node_operator(norm, mode, chunk_rows), self._mean_operator(mode, chunk_rows),
                                self.plan, self.world.rank, self.world.world_size)

    def _node_operator(self, norm: str, mode: str, chunk_rows: int = HALO_CHUNK_ROWS) -> PartitionedSpMM:
        plan, r, w = self.plan, self.world.rank, self.world.world_size
        du = self.user_degree[self.train_users].astype(np.float64)
        di = self.item_degree[self.train_items].astype(np.float64)
        if norm == "sym":
            user_val = item_val = (1.0 / np.sqrt(du * di)).astype(np.float32)
        elif norm == "left":
            user_val, item_val = (1.0 / du).astype(np.float32), (1.0 / di).astype(np.float32)
        else:
            raise ValueError(f"unknown adjacency normalisation {norm!r} (use 'sym' or 'left')")
        del du, di
        # item-side rows: (my item row, the user's node row on its owner, value) from every rank, sent as
        # 32-bit rows (every rank sends the same dtype); the arrays go as soon as they are sent
        i_owner, i_node = plan.item_node(self.train_items)
        order = np.argsort(i_owner, kind="stable")
        bounds = np.searchsorted(i_owner[order], np.arange(w + 1))
        i_local = plan.local_item(self.train_items)
        index = np.int32 if int(plan.node_counts().max()) < 2**31 else np.int64
        send_int = [torch.from_numpy(np.stack([i_local[order[bounds[s]:bounds[s + 1]]],
                                               self.train_users[order[bounds[s]:bounds[s + 1]]]], axis=1).astype(index))
                    for s in range(w)]
        send_val = [torch.from_numpy(item_val[order[bounds[s]:bounds[s + 1]]]) for s in range(w)]
        del order, i_local, item_val
        got_int = exchange_lists(send_int, w)
        del send_int
        got_val = exchange_lists(send_val, w)
        del send_val
        # one preallocated array per field (no list of parts beside its concatenation)
        u_r, n_own = int(plan.user_counts[r]), len(self.train_users)
        n = n_own + sum(int(g.shape[0]) for g in got_val)
        rows, owners = np.empty(n, index), np.empty(n, np.int32)
        cols, vals = np.empty(n, index), np.empty(n, np.float32)
        rows[:n_own], owners[:n_own], cols[:n_own], vals[:n_own] = self.train_users, i_owner, i_node, user_val
        del i_owner, i_node, user_val
        at = n_own
        for s in range(w):
            pairs = got_int[s].numpy().reshape(-1, 2)
            end = at + len(pairs)
            rows[at:end] = u_r + pairs[:, 0]
            owners[at:end] = s
            cols[at:end] = pairs[:, 1]
            vals[at:end] = got_val[s].numpy()
            got_int[s] = got_val[s] = None
            at = end
        n_nodes = u_r + int(plan.item_counts[r])
        return PartitionedSpMM(rows, owners, cols, vals, n_nodes, [int(c) for c in plan.node_counts()], r, w, mode,
                               chunk_rows)

    def _mean_operator(self, mode: str, chunk_rows: int = HALO_CHUNK_ROWS) -> PartitionedSpMM:
        """D_u^-1 R over the rank's users: each user row averages its training items' rows."""
        plan = self.plan
        val = (1.0 / self.user_degree[self.train_users]).astype(np.float32)
        return PartitionedSpMM(self.train_users, plan.item_owner[self.train_items], plan.local_item(self.train_items),
                               val, self.n_users, [int(c) for c in plan.item_counts], self.world.rank,
                               self.world.world_size, mode, chunk_rows)


def load_rank_data(folder: str | Path, n_users: int, n_items: int, modalities: list[str], num_shards: int,
                   world: World, name: str = "", manifest_sha256: str = "",
                   shard_files: list[str] | None = None) -> RankData:
    """Read this rank's share of a canonical dataset folder (collective: every rank calls it)."""
    folder = Path(folder)
    users, items, splits = read_rank_rows(folder / "interactions.parquet", num_shards, world.rank, world.world_size,
                                          shard_files)
    train = splits == TRAIN
    pairs = np.unique(users[train] * n_items + items[train])  # one row per training pair
    t_users, t_items = pairs // n_items, pairs % n_items
    degree = torch.from_numpy(np.bincount(t_items, minlength=n_items).astype(np.int64))
    degree = world.all_reduce_sum(degree).numpy()
    plan = PartitionPlan.build(world.world_size, num_shards, n_users, degree)
    own_users = plan.users_of(world.rank)
    own_items = plan.items_of(world.rank)
    local_u = plan.local_user(t_users)
    user_degree = np.bincount(local_u, minlength=len(own_users))
    features = {m: np.ascontiguousarray(np.load(folder / FEATURES_DIR / f"{m}.npy", mmap_mode="r",
                                                allow_pickle=False)[own_items], dtype=np.float32)
                for m in modalities}
    local = InteractionData(f"{name}[rank {world.rank}]", len(own_users), n_items, plan.local_user(users),
                            plan.item_pos[items], splits, manifest_sha256=manifest_sha256)
    return RankData(plan, world, own_users, own_items, local, features, user_degree, degree, local_u, t_items, folder)
