"""Training samples: one list per training interaction, [positive, negative_1 .. negative_N].

Column 1 doubles as the BPR negative, so BPR, pairwise KD (margin of columns 0 and 1) and list-wise
KD all read one array. Negatives are drawn uniformly from items the user has no *training*
interaction with (checked, unlike the authors' code); validation/test items are unknown to training.

Every random choice about a training pair (its step in the epoch, its negatives, whether a prompt
round's batch takes it) is a hash of (seed, global user id, item id): a pure function of the pair,
not of which process holds it or in what order. So an epoch's global batches are the same whether
the users are in 1 shard or N, on 1 rank or W (each shard or rank draws its own pairs' part), and
1 process trains the same model as W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_UNIT = 2.0 ** -53  # 53 high bits of a hash -> a float in [0, 1)
NEG_CHUNK = 1 << 18  # pairs whose negatives are drawn at once


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs pass for independent uniform draws
    (arithmetic wraps modulo 2^64, as intended)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def stream(seed: int, *tags: int) -> np.uint64:
    """A 64-bit stream key for (seed, tag, ...): one independent draw per pair and key."""
    key = mix64(np.uint64(int(seed) % 2**64))
    for t in tags:
        key = mix64(key ^ np.uint64(int(t) % 2**64))
    return np.uint64(key)


def uniform(h: np.ndarray) -> np.ndarray:
    """Hashes -> floats in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * _UNIT


@dataclass
class SampleBatch:
    """users (B,) int64 and items (B, 1 + N) int64; items[:, 0] positive, items[:, 1:] negatives.
    `step_ends`: the end row of each of the epoch's training steps (rows come in step order)."""

    users: np.ndarray
    items: np.ndarray
    step_ends: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    def steps(self) -> list["SampleBatch"]:
        """The epoch's training steps (one batch when no steps were drawn)."""
        if self.step_ends is None:
            return [self]
        starts = np.concatenate([[0], self.step_ends[:-1]])
        return [SampleBatch(self.users[a:b], self.items[a:b]) for a, b in zip(starts, self.step_ends)]


class TrainSampler:
    """Draws epoch samples for a set of users from their training CSR rows (vectorised)."""

    def __init__(self, train_csr: sp.csr_matrix, users: np.ndarray | None = None,
                 row_ids: np.ndarray | None = None) -> None:
        """`row_ids`: the global user id of each CSR row (default: the row itself), so draws keyed
        by user are the same wherever the user's rows are numbered."""
        self.n_items = train_csr.shape[1]
        self.train_csr = train_csr
        coo = train_csr.tocoo()
        keep = np.ones(coo.nnz, dtype=bool) if users is None else np.isin(coo.row, users)
        self.pair_users = coo.row[keep].astype(np.int64)
        self.pair_items = coo.col[keep].astype(np.int64)
        # sorted keys of every training pair, for O(log n) membership tests of sampled negatives
        self._keys = np.sort(coo.row.astype(np.int64) * self.n_items + coo.col.astype(np.int64))
        global_users = self.pair_users if row_ids is None else np.asarray(row_ids, dtype=np.int64)[self.pair_users]
        # each pair's identity, hashed once: every draw about the pair mixes it with a stream key
        self._pair_hash = mix64(global_users.astype(np.uint64) * np.uint64(self.n_items)
                                + self.pair_items.astype(np.uint64))

    @property
    def n_pairs(self) -> int:
        return len(self.pair_users)

    def is_train_pair(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, len(self._keys) - 1)
        return self._keys[pos] == keys if len(self._keys) else np.zeros(keys.shape, dtype=bool)

    def sample_negatives(self, pairs: np.ndarray, n_neg: int, key: np.uint64) -> np.ndarray:
        """(len(pairs), n_neg) items for the pairs at indices `pairs`, each drawn uniformly from the
        user's non-training items; negative j of a pair is a function of (key, the pair, j) only.
        Drawn `NEG_CHUNK` pairs at a time, so the temporaries stay small at any scale."""
        out = np.empty((len(pairs), n_neg), dtype=np.int64)
        n_items = np.uint64(self.n_items)

        def tags(attempt: int) -> np.ndarray:  # (n_neg,) keys of one attempt's columns
            return mix64(key ^ (np.arange(n_neg, dtype=np.uint64) + np.uint64(attempt * n_neg + 1)))

        first = tags(0)
        for lo in range(0, len(pairs), NEG_CHUNK):
            chunk = pairs[lo:lo + NEG_CHUNK]
            base, users = self._pair_hash[chunk][:, None], self.pair_users[chunk][:, None]
            neg = (mix64(base ^ first[None, :]) % n_items).astype(np.int64)
            bad = self.is_train_pair(np.broadcast_to(users, neg.shape), neg)
            for attempt in range(1, 101):
                if not bad.any():
                    break
                r, c = np.nonzero(bad)
                neg[r, c] = (mix64(base[r, 0] ^ tags(attempt)[c]) % n_items).astype(np.int64)
                bad[r, c] = self.is_train_pair(users[r, 0], neg[r, c])
            if bad.any():
                raise ValueError("could not sample negatives: some user interacted with (almost) every item")
            out[lo:lo + NEG_CHUNK] = neg
        return out

    def epoch(self, n_neg: int, seed: int, n_steps: int) -> SampleBatch:
        """Every training pair once, each with n_neg fresh negatives, in `n_steps` steps: a pair's
        step is drawn from (seed, the pair) alone, so the pairs of step t over all shards are the
        global batch of step t however the users are sharded (steps are ~equal in size, not exactly)."""
        n_steps = max(int(n_steps), 1)
        step = (mix64(self._pair_hash ^ stream(seed, 0)) % np.uint64(n_steps)).astype(np.int64)
        order = np.argsort(step, kind="stable")
        negs = self.sample_negatives(order, max(n_neg, 1), stream(seed, 1))
        return SampleBatch(users=self.pair_users[order],
                           items=np.concatenate([self.pair_items[order][:, None], negs], axis=1),
                           step_ends=np.cumsum(np.bincount(step, minlength=n_steps)))

    def round_batch(self, batch_fraction: float, n_neg: int, seed: int, step: int) -> SampleBatch:
        """Step `step` of a prompt round: each training pair with probability `batch_fraction` (the
        global batch size over all processes' pairs), keyed by (seed, step, the pair), with n_neg
        negatives each; the same global batch for any sharding."""
        take = np.flatnonzero(uniform(mix64(self._pair_hash ^ stream(seed, 2, step))) < batch_fraction)
        negs = self.sample_negatives(take, max(n_neg, 1), stream(seed, 3, step))
        return SampleBatch(self.pair_users[take], np.concatenate([self.pair_items[take][:, None], negs], axis=1))


def join_steps(parts: list[SampleBatch], n_steps: int) -> list[SampleBatch]:
    """Step t = step t of every part (each part: one shard's epoch samples, drawn in `n_steps` steps).
    A rank joining its shards this way, and W ranks together, see the same global batch at every step
    for any W and any number of shards."""
    steps = [p.steps() for p in parts]
    if any(len(s) != n_steps for s in steps):
        raise ValueError(f"join_steps: parts drawn in {sorted({len(s) for s in steps})} steps, not {n_steps}")
    width = parts[0].items.shape[1]
    return [SampleBatch(np.concatenate([s[t].users for s in steps]),
                        np.concatenate([s[t].items for s in steps]).reshape(-1, width))
            for t in range(n_steps)]
