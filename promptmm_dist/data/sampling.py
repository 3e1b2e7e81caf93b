"""Training samples: one list per training interaction, [positive, negative_1 .. negative_N].

Column 1 doubles as the BPR negative, so BPR, pairwise KD (margin of columns 0 and 1) and list-wise
KD all read one array. Negatives are drawn uniformly from items the user has no *training*
interaction with (checked, unlike the authors' code); validation/test items are unknown to training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class SampleBatch:
    """users (B,) int64 and items (B, 1 + N) int64; items[:, 0] positive, items[:, 1:] negatives."""

    users: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


class TrainSampler:
    """Draws epoch samples for a set of users from their training CSR rows (vectorised)."""

    def __init__(self, train_csr: sp.csr_matrix, users: np.ndarray | None = None) -> None:
        self.n_items = train_csr.shape[1]
        self.train_csr = train_csr
        coo = train_csr.tocoo()
        keep = np.ones(coo.nnz, dtype=bool) if users is None else np.isin(coo.row, users)
        self.pair_users = coo.row[keep].astype(np.int64)
        self.pair_items = coo.col[keep].astype(np.int64)
        # sorted keys of every training pair, for O(log n) membership tests of sampled negatives
        self._keys = np.sort(coo.row.astype(np.int64) * self.n_items + coo.col.astype(np.int64))

    @property
    def n_pairs(self) -> int:
        return len(self.pair_users)

    def is_train_pair(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, len(self._keys) - 1)
        return self._keys[pos] == keys if len(self._keys) else np.zeros(keys.shape, dtype=bool)

    def sample_negatives(self, users: np.ndarray, n_neg: int, rng: np.random.Generator) -> np.ndarray:
        """(len(users), n_neg) items drawn uniformly from each user's non-training items."""
        rep = np.repeat(users, n_neg)
        neg = rng.integers(0, self.n_items, size=rep.shape[0], dtype=np.int64)
        bad = self.is_train_pair(rep, neg)
        for _ in range(100):
            if not bad.any():
                break
            idx = np.flatnonzero(bad)
            neg[idx] = rng.integers(0, self.n_items, size=idx.shape[0], dtype=np.int64)
            bad[idx] = self.is_train_pair(rep[idx], neg[idx])
        if bad.any():
            raise ValueError("could not sample negatives: some user interacted with (almost) every item")
        return neg.reshape(len(users), n_neg)

    def epoch(self, n_neg: int, seed: int) -> SampleBatch:
        """Every training pair once, shuffled, each with n_neg fresh negatives."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.n_pairs)
        users = self.pair_users[order]
        pos = self.pair_items[order]
        negs = self.sample_negatives(users, max(n_neg, 1), rng)
        return SampleBatch(users=users, items=np.concatenate([pos[:, None], negs], axis=1))


def iter_batches(batch: SampleBatch, batch_size: int):
    """Consecutive mini-batches of an epoch's samples."""
    for start in range(0, len(batch), batch_size):
        yield SampleBatch(batch.users[start:start + batch_size], batch.items[start:start + batch_size])


def join_steps(parts: list[SampleBatch], n_steps: int) -> list[SampleBatch]:
    """Step t = slice t of every part (each part: one shard's shuffled epoch samples). A rank joining its
    shards this way, and W ranks together, see the same global batch at every step for any W."""
    splits = [np.array_split(np.arange(len(p)), n_steps) for p in parts]
    return [SampleBatch(np.concatenate([p.users[s[t]] for p, s in zip(parts, splits)]),
                        np.concatenate([p.items[s[t]] for p, s in zip(parts, splits)]).reshape(-1, parts[0].items.shape[1]))
            for t in range(n_steps)]
