"""The in-memory dataset every stage reads: interactions with a split label plus item features.

All readers (PromptMM json, MMRec .inter, canonical parquet, synthetic) produce an `InteractionData`;
nothing downstream knows which format the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}


@dataclass(eq=False)
class InteractionData:
    """Implicit-feedback interactions (user, item, split) and per-modality item features.

    `n_items` is the catalogue size (the feature row count); `n_users` is max user id + 1.
    Features are float32, row i = item i, keyed by modality name (file stem: image, audio, text, ...).
    """

    name: str
    n_users: int
    n_items: int
    users: np.ndarray  # int32, one entry per interaction
    items: np.ndarray  # int32
    splits: np.ndarray  # int8: 0 train, 1 val, 2 test
    features: dict[str, np.ndarray] = field(default_factory=dict)
    source_format: str = "unknown"
    manifest_sha256: str = ""  # hash identifying the dataset content (checkpoints record it)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    def split_pairs(self, split: str | int) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of one split."""
        code = SPLIT_NAMES[split] if isinstance(split, str) else split
        mask = self.splits == code
        return self.users[mask], self.items[mask]

    def csr(self, split: str | int) -> sp.csr_matrix:
        """User x item 0/1 matrix of one split (sorted indices, float32)."""
        u, i = self.split_pairs(split)
        m = sp.csr_matrix(
            (np.ones(len(u), dtype=np.float32), (u, i)), shape=(self.n_users, self.n_items)
        )
        m.sum_duplicates()
        m.data[:] = 1.0
        m.sort_indices()
        return m

    @cached_property
    def train_csr(self) -> sp.csr_matrix:
        return self.csr(TRAIN)

    def n_interactions(self, split: str | int) -> int:
        code = SPLIT_NAMES[split] if isinstance(split, str) else split
        return int((self.splits == code).sum())


@dataclass(frozen=True)
class DatasetInfo:
    """What the driver of a Ray run knows of a prepared dataset: its identity and sizes, no rows
    (ranks, shard actors and the teacher ranks read the canonical files themselves)."""

    name: str
    n_users: int
    n_items: int
    modalities: list[str]
    manifest_sha256: str
