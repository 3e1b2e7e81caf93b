"""Deterministic small subsets of a dataset, for fast end-to-end tests on real data."""

from __future__ import annotations

import numpy as np

from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.formats import from_arrays


def subset_first_users(data: InteractionData, n_users: int) -> InteractionData:
    """Users 0..n_users-1 (all their splits) and only the items they touch, re-indexed densely in id
    order (feature rows follow). Same input, same output: no randomness."""
    if n_users < 1:
        raise ValueError("n_users must be >= 1")
    keep = data.users < n_users
    touched = np.unique(data.items[keep])
    if len(touched) == 0:
        raise ValueError(f"the first {n_users} users have no interactions")
    new_id = np.full(data.n_items, -1, dtype=np.int64)
    new_id[touched] = np.arange(len(touched))
    features = {m: np.ascontiguousarray(f[touched]) for m, f in data.features.items()}
    return from_arrays(f"{data.name}-first{n_users}", data.users[keep], new_id[data.items[keep]],
                       data.splits[keep], features, data.source_format, validate=False)
