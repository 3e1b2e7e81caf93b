"""Who owns what: rank r owns the users of its shards and a degree-balanced block of items.

Users: shard k holds the users u with u % N == k and rank r trains the shards k with k % W == r
(`rank_shards`), so a user's owner and its row on the owner are arithmetic: no table of U entries is
held anywhere. Items: the item side is small (DESIGN: "item-side state may be gathered"), so every rank
holds the (I,) owner map, built identically on every rank from the item degrees, so that each rank
gets about I / W items and about nnz / W of the item-side adjacency rows (`balanced_owner`).

Numbering seen by the models on rank r: users 0..U_r-1 (its own, shard by shard), items in the
*gathered* order: rank 0's items, then rank 1's, ..; so a gathered item table is a plain concatenation.
With W = 1 and one shard both numberings are the global ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards a rank trains on: k % world_size == rank (every shard exactly once)."""
    return [k for k in range(num_shards) if k % world_size == rank]


def shard_size(n_users: int, shard: int, num_shards: int) -> int:
    """Number of users u < n_users with u % num_shards == shard."""
    return max(0, (n_users - shard + num_shards - 1) // num_shards)


def balanced_owner(item_degree: np.ndarray, world_size: int) -> np.ndarray:
    """(I,) int32 owner rank of each item: greedy by descending degree, each item to the least-loaded
    rank that still has room (at most ceil(I / W) items), so both the adjacency rows (degree) and the
    embedding rows (count) are balanced. Deterministic: ties go by item id, then rank."""
    import heapq

    n = len(item_degree)
    degree = np.asarray(item_degree, dtype=np.int64)
    order = np.lexsort((np.arange(n), -degree))
    cap = -(-n // world_size)
    owner = np.empty(n, dtype=np.int32)
    heap = [(0, r) for r in range(world_size)]  # (load, rank)
    counts = [0] * world_size
    for i in order:
        load, r = heapq.heappop(heap)
        while counts[r] >= cap:  # full: drop it from the heap for good
            load, r = heapq.heappop(heap)
        owner[i] = r
        counts[r] += 1
        heapq.heappush(heap, (load + int(degree[i]), r))
    return owner


@dataclass
class PartitionPlan:
    """Ownership of users and items for W ranks over N user shards."""

    world_size: int
    num_shards: int
    n_users: int
    n_items: int
    item_owner: np.ndarray  # (I,) int32
    # derived in __post_init__
    item_counts: np.ndarray = field(init=False)  # (W,) items per rank
    item_offsets: np.ndarray = field(init=False)  # (W+1,) start of each rank's block in the gathered order
    item_pos: np.ndarray = field(init=False)  # (I,) global item id -> gathered position
    gathered_items: np.ndarray = field(init=False)  # (I,) gathered position -> global item id
    user_counts: np.ndarray = field(init=False)  # (W,) users per rank
    shard_offset: np.ndarray = field(init=False)  # (N,) first local row of each shard on its rank

    def __post_init__(self) -> None:
        if self.num_shards < self.world_size:
            raise ValueError(f"{self.num_shards} shards cannot cover {self.world_size} ranks")
        owner = np.asarray(self.item_owner, dtype=np.int32)
        self.item_owner = owner
        self.gathered_items = np.argsort(owner, kind="stable").astype(np.int64)  # by rank, then by id
        self.item_pos = np.empty(self.n_items, dtype=np.int64)
        self.item_pos[self.gathered_items] = np.arange(self.n_items)
        self.item_counts = np.bincount(owner, minlength=self.world_size).astype(np.int64)
        self.item_offsets = np.concatenate([[0], np.cumsum(self.item_counts)]).astype(np.int64)
        self.user_counts = np.zeros(self.world_size, dtype=np.int64)
        self.shard_offset = np.zeros(self.num_shards, dtype=np.int64)
        for r in range(self.world_size):
            at = 0
            for k in rank_shards(self.num_shards, r, self.world_size):
                self.shard_offset[k] = at
                at += shard_size(self.n_users, k, self.num_shards)
            self.user_counts[r] = at

    @classmethod
    def build(cls, world_size: int, num_shards: int, n_users: int, item_degree: np.ndarray) -> "PartitionPlan":
        return cls(world_size, num_shards, n_users, len(item_degree), balanced_owner(item_degree, world_size))

    # users -------------------------------------------------------------------------------------
    def user_owner(self, users: np.ndarray) -> np.ndarray:
        return (np.asarray(users, dtype=np.int64) % self.num_shards) % self.world_size

    def local_user(self, users: np.ndarray) -> np.ndarray:
        """Row of each user on its owner."""
        u = np.asarray(users, dtype=np.int64)
        return self.shard_offset[u % self.num_shards] + u // self.num_shards

    def users_of(self, rank: int) -> np.ndarray:
        """Global ids of a rank's users, in its local row order."""
        parts = [np.arange(k, self.n_users, self.num_shards, dtype=np.int64)
                 for k in rank_shards(self.num_shards, rank, self.world_size)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # items -------------------------------------------------------------------------------------
    def items_of(self, rank: int) -> np.ndarray:
        """Global ids of a rank's items, in its local row order (ascending)."""
        return self.gathered_items[self.item_offsets[rank]:self.item_offsets[rank + 1]]

    def local_item(self, items: np.ndarray) -> np.ndarray:
        """Row of each item on its owner."""
        items = np.asarray(items, dtype=np.int64)
        return self.item_pos[items] - self.item_offsets[self.item_owner[items]]

    # nodes (users then items on every rank) ----------------------------------------------------
    def node_counts(self) -> np.ndarray:
        return self.user_counts + self.item_counts

    def user_node(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, node row on the owner) of users."""
        return self.user_owner(users), self.local_user(users)

    def item_node(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, node row on the owner) of items: items follow the owner's users."""
        owner = self.item_owner[np.asarray(items, dtype=np.int64)].astype(np.int64)
        return owner, self.user_counts[owner] + self.local_item(items)

    def describe(self) -> str:
        return (f"{self.world_size} ranks: users {'/'.join(map(str, self.user_counts))}, "
                f"items {'/'.join(map(str, self.item_counts))}")
