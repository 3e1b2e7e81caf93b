"""Top-K ranking metrics on a batch of users, returned as SUMS over users.

Why sums: distributed evaluation splits users across actors (and every actor chunks its users to bound
memory). Each part returns per-metric sums plus the number of users it evaluated; the driver adds the
parts and divides once in `finalize`. Averages of averages would weight parts wrongly; sums do not
(the only difference from a single-process run is float64 summation order, ~1e-16 relative).

Definitions, for one user with relevant set R (|R| >= 1) and top-K list hits h_1..h_K (h_j = 1 when the
j-th ranked item is in R), discount d_j = 1 / log2(j + 1):

- recall@K    = sum_j h_j / |R|
- precision@K = sum_j h_j / K
- hit@K       = 1 if any h_j else 0
- ndcg@K      = sum_j h_j d_j / IDCG, IDCG = sum_{j <= min(|R|, K)} d_j          (standard)
- legacy_ndcg@K: the authors' variant (NGCF/MMSSL/PromptMM `ndcg_at_k`): the ideal list is the hit
  vector of the top-max(K) list sorted so hits come first, i.e. IDCG = sum_{j <= min(H, K)} d_j with
  H = number of hits in the whole top-max(ks) list; 0 when H = 0. It over-states NDCG (a single hit at
  rank 1 scores 1.0 whatever |R| is) and is reported only to compare with published tables.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20, 40, 50)
METRIC_NAMES: tuple[str, ...] = ("recall", "precision", "ndcg", "hit", "legacy_ndcg")
COUNT_KEY = "n_users"


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """All `name@K` keys, metric-major ("recall@10", "recall@20", ..., "legacy_ndcg@50")."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def hits_from_topk(
    topk: np.ndarray, rel_indptr: np.ndarray, rel_indices: np.ndarray, n_items: int
) -> np.ndarray:
    """Boolean (B, K) matrix: is topk[b, j] in user b's relevant set?

    The relevant sets are a CSR (row b = batch user b, indices sorted within each row). Each (row, item)
    pair is encoded as one int64 key `row * n_items + item`; CSR order makes the relevant keys globally
    sorted, so membership is one vectorised `searchsorted` instead of a per-user Python set.
    """
    topk = np.asarray(topk, dtype=np.int64)
    b = topk.shape[0]
    if b == 0 or topk.shape[1] == 0 or len(rel_indices) == 0:
        return np.zeros(topk.shape, dtype=bool)
    counts = np.diff(np.asarray(rel_indptr, dtype=np.int64))
    if len(counts) != b:
        raise ValueError(f"relevant CSR has {len(counts)} rows but topk has {b}")
    rows = np.repeat(np.arange(b, dtype=np.int64), counts)
    rel_keys = rows * n_items + np.asarray(rel_indices, dtype=np.int64)
    if len(rel_keys) > 1 and np.any(rel_keys[1:] < rel_keys[:-1]):
        rel_keys = np.sort(rel_keys)
    keys = np.arange(b, dtype=np.int64)[:, None] * n_items + topk
    pos = np.searchsorted(rel_keys, keys)
    pos = np.minimum(pos, len(rel_keys) - 1)
    return rel_keys[pos] == keys


def empty_sums(ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Zero sums for every metric key (the identity for `add_sums`)."""
    return {key: 0.0 for key in metric_keys(ks)}


def sums_from_hits(
    hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> tuple[dict[str, float], int]:
    """Per-metric sums over the batch users and the user count, from the (B, K_list) hit matrix.

    `hits` columns are ranks 1..K_list of each user's top list (K_list = max(ks), or fewer when the
    catalogue is smaller; missing ranks count as misses). `n_relevant` is |R| per user, every entry >= 1
    (callers skip users without relevant items).
    """
    hits = np.asarray(hits, dtype=bool)
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    b = hits.shape[0]
    if len(n_rel) != b:
        raise ValueError(f"n_relevant has {len(n_rel)} entries but hits has {b} rows")
    if b and n_rel.min() < 1:
        raise ValueError("every evaluated user needs at least one relevant item")
    ks = tuple(int(k) for k in ks)
    kmax = max(ks)
    if hits.shape[1] < kmax:  # catalogue smaller than K: pad with misses
        hits = np.concatenate([hits, np.zeros((b, kmax - hits.shape[1]), dtype=bool)], axis=1)
    hits = hits[:, :kmax]
    h = hits.astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))
    cum_hits = np.cumsum(h, axis=1)  # (B, kmax): hits within top-j
    cum_dcg = np.cumsum(h * discount, axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])  # ideal[n] = DCG of n hits at the top
    n_hits_list = cum_hits[:, -1]  # hits in the whole top-kmax list (legacy ideal)

    sums: dict[str, float] = {}
    for k in ks:
        hk = cum_hits[:, k - 1]
        dcg = cum_dcg[:, k - 1]
        idcg = ideal[np.minimum(n_rel, k).astype(np.int64)]
        legacy_idcg = ideal[np.minimum(n_hits_list, k).astype(np.int64)]
        legacy = np.divide(dcg, legacy_idcg, out=np.zeros(b), where=legacy_idcg > 0)
        sums[f"recall@{k}"] = float(np.sum(hk / n_rel)) if b else 0.0
        sums[f"precision@{k}"] = float(np.sum(hk) / k)
        sums[f"ndcg@{k}"] = float(np.sum(dcg / idcg)) if b else 0.0
        sums[f"hit@{k}"] = float(np.sum(hk > 0))
        sums[f"legacy_ndcg@{k}"] = float(np.sum(legacy))
    return {key: sums[key] for key in metric_keys(ks)}, b


def batch_sums(
    topk: np.ndarray,
    rel_indptr: np.ndarray,
    rel_indices: np.ndarray,
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[dict[str, float], int]:
    """Metric sums for a batch from top-K item indices (B, K) and the batch's relevant-item CSR."""
    hits = hits_from_topk(topk, rel_indptr, rel_indices, n_items)
    return sums_from_hits(hits, np.diff(np.asarray(rel_indptr, dtype=np.int64)), ks)


def add_sums(
    parts: Iterable[tuple[Mapping[str, float], int]], ks: Sequence[int] = DEFAULT_KS
) -> tuple[dict[str, float], int]:
    """Add (sums, count) parts from chunks or actors. Parts must share their keys; `ks` only shapes
    the zero result when there are no parts."""
    total: dict[str, float] | None = None
    count = 0
    for sums, n in parts:
        if total is None:
            total = dict(sums)
        else:
            if set(sums) != set(total):
                raise ValueError("cannot add metric sums computed with different ks")
            for key, value in sums.items():
                total[key] += value
        count += int(n)
    return (total if total is not None else empty_sums(ks)), count


def finalize(sums: Mapping[str, float], count: int) -> dict[str, float]:
    """Mean over users for every `name@K` key, plus `n_users` (the count, so reports show coverage).

    With no users every metric is 0.0 (nothing to rank), not NaN, so JSON output stays valid.
    """
    out: dict[str, float] = {key: (float(v) / count if count else 0.0) for key, v in sums.items()}
    out[COUNT_KEY] = int(count)
    return out
