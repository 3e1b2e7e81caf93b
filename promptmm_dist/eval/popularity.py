"""Reference scorers that need no training: item popularity and seeded random.

They anchor every results table (a model that does not beat popularity has learnt nothing) and check
the evaluator end to end (random Recall@20 is about 20 / n_items).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from promptmm_dist.data.dataset import InteractionData

ScoreFn = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]


def item_popularity(data: InteractionData) -> np.ndarray:
    """Training interaction count per item (int64, length n_items; cold items count 0)."""
    _, items = data.split_pairs("train")
    return np.bincount(items.astype(np.int64), minlength=data.n_items).astype(np.int64)


def popularity_scorer(data: InteractionData) -> ScoreFn:
    """Score every item by its training popularity, the same list for every user.

    Items with equal counts are ordered by item id (lower first): the scores are ranks of the stable
    order (count desc, id asc), distinct integers, so the top-K never depends on how `torch.topk`
    happens to break ties. Ranks are exact in float32 up to 2**24 items, float64 beyond.
    The returned tensor is a broadcast view (no per-user copy); the evaluator copies before masking.
    """
    counts = item_popularity(data)
    n = data.n_items
    order = np.lexsort((np.arange(n), -counts))  # primary: count desc; ties: id asc
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, 0, -1, dtype=np.float64)
    dtype = torch.float32 if n <= 2**24 else torch.float64
    row = torch.from_numpy(ranks).to(dtype)

    def score(users: np.ndarray) -> torch.Tensor:
        return row.unsqueeze(0).expand(len(users), n)

    return score


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic): a cheap, well-mixed hash."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def random_scorer(n_items: int, seed: int = 0) -> ScoreFn:
    """Uniform random scores in [0, 1) that depend only on (seed, user, item).

    A counter-based hash instead of a stateful generator: the score of (user, item) is the same however
    users are chunked or split across actors, so distributed and local evaluation agree exactly.
    53-bit float64 scores make ties practically impossible.
    """
    items = np.arange(n_items, dtype=np.uint64)[None, :]
    seed_key = _splitmix64(np.asarray([seed], dtype=np.int64).astype(np.uint64))

    def score(users: np.ndarray) -> torch.Tensor:
        u = np.asarray(users, dtype=np.int64).astype(np.uint64)[:, None]
        base = _splitmix64(seed_key ^ u)
        bits = _splitmix64(base + items * _GOLDEN)
        return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    return score
