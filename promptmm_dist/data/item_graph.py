"""Frozen item-item graphs from modality features (LATTICE / FREEDOM): each modality's cosine kNN graph,
symmetrised, D^-1/2 A D^-1/2 normalised, averaged over modalities.

Lives below both its users: the one-process FREEDOM teacher builds the whole graph (`item_item_graph`);
a partitioned rank builds only its items' rows (`partition.item_graph`) from the same `knn_rows`, so both
pick the same neighbours.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64, so similarities are exact to float32; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_rows(xn: np.ndarray, rows: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """(len(rows), k') ids of the k' = min(k, n - 1) most cosine-similar other rows of the unit rows `xn`
    for each of `rows` (self excluded). Similarities are computed in float64 and rounded to float32, so
    the chunking or split of `rows` (which changes the BLAS blocking) cannot reorder near-equal values,
    and exact ties go to the lowest id. Chunked so memory is at most chunk x n (and about 128 MiB);
    compute is O(len(rows) n d), meant to run once per dataset (and split over ranks)."""
    n = len(xn)
    k = max(1, min(k, n - 1))
    chunk = max(1, min(chunk, (1 << 24) // max(n, 1)))
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), k), dtype=np.int64)
    for lo in range(0, len(rows), chunk):
        ids = rows[lo:lo + chunk]
        sim = (xn[ids] @ xn.T).astype(np.float32)
        sim[np.arange(len(ids)), ids] = -np.inf
        out[lo:lo + len(ids)] = top_k_lowest_id_on_ties(sim, k)
    return out


def top_k_lowest_id_on_ties(sim: np.ndarray, k: int) -> np.ndarray:
    """Column ids of each row's k largest values; among columns tied at the k-th value the lowest ids win
    (items with identical features tie exactly: this keeps the choice independent of how the rows were
    chunked or split over ranks)."""
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sim, top, axis=1).min(axis=1, keepdims=True)
    tied = np.flatnonzero((sim >= kth).sum(axis=1) > k)
    for r in tied:
        above = np.flatnonzero(sim[r] > kth[r, 0])
        top[r] = np.concatenate([above, np.flatnonzero(sim[r] == kth[r, 0])[: k - len(above)]])
    return top


def knn_graph(x: np.ndarray, k: int, chunk: int = 2048) -> sp.csr_matrix:
    """Symmetric 0/1 kNN graph of the rows of x by cosine similarity (self excluded): i ~ j when either
    is among the other's k nearest."""
    n = len(x)
    top = knn_rows(unit_rows(x), np.arange(n), k, chunk)
    r, c = np.repeat(np.arange(n), top.shape[1]), top.ravel()
    a = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n, n))
    return ((a + a.T) > 0).astype(np.float32).tocsr()


def sym_normalize(a: sp.csr_matrix) -> sp.csr_matrix:
    deg = np.asarray(a.sum(axis=1)).ravel()
    d = np.where(deg > 0, deg ** -0.5, 0.0).astype(np.float32)
    out = (sp.diags(d) @ a @ sp.diags(d)).tocsr().astype(np.float32)
    out.sort_indices()
    return out


def item_item_graph(features: dict[str, np.ndarray], k: int) -> sp.csr_matrix:
    """Mean over modalities of each modality's normalised kNN graph (no modality is special)."""
    graphs = [sym_normalize(knn_graph(np.asarray(x, dtype=np.float32), k)) for x in features.values()]
    return (sum(graphs[1:], graphs[0]) / len(graphs)).tocsr()
