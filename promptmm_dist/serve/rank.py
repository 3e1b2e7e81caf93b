"""Top-K scoring of a block of users against the item table, the one piece of math shared by
`recommend --users`, the Ray Data batch path and the single-process reference loop."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

COLUMNS = ("user", "rank", "item", "score")


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k highest scores (items, scores), best first; equal scores keep the lower item id
    first inside the top K, so identical inputs always give identical tables."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def score_block(user_emb: np.ndarray, item_emb: np.ndarray, start: int, stop: int, k: int,
                exclude: sp.csr_matrix | tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Rows (user, rank, item, score) for users [start, stop): dot-product top-K with the `exclude`
    items (a users x items CSR, or its (indptr, indices)) masked. rank is 1-based. A user with fewer
    than K unmasked items gets fewer rows."""
    scores = user_emb[start:stop] @ item_emb.T
    if exclude is not None:
        indptr, indices = (exclude.indptr, exclude.indices) if sp.issparse(exclude) else exclude
        counts = np.diff(indptr[start:stop + 1])
        rows = np.repeat(np.arange(stop - start), counts)
        scores[rows, indices[indptr[start]:indptr[stop]]] = -np.inf
    items, vals = top_k(scores, k)
    kk = items.shape[1]
    keep = np.isfinite(vals).ravel()
    return {
        "user": np.repeat(np.arange(start, stop, dtype=np.int32), kk)[keep],
        "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), stop - start)[keep],
        "item": items.ravel().astype(np.int32)[keep],
        "score": vals.ravel().astype(np.float32)[keep],
    }


def user_blocks(n_users: int, block_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_size, n_users)) for s in range(0, n_users, block_size)]


def default_block_size(n_items: int) -> int:
    """Users per block: 1024, fewer when the item table is large (a block's score matrix <= 64 MiB)."""
    return max(1, min(1024, (16 << 20) // max(n_items, 1)))


def exclusion_csr(data, exclude_val: bool) -> sp.csr_matrix:  # noqa: ANN001 (InteractionData)
    """Items never to recommend: each user's training items, plus validation items when asked."""
    if not exclude_val:
        return data.train_csr
    from promptmm_dist.data.dataset import VAL

    both = (data.train_csr + data.csr(VAL)).tocsr()
    both.sort_indices()
    return both


def numpy_loop(user_emb: np.ndarray, item_emb: np.ndarray, k: int, exclude: sp.csr_matrix | None,
               block_size: int) -> dict[str, np.ndarray]:
    """Every user in one process, block after block: the reference the Ray Data path must equal."""
    parts = [score_block(user_emb, item_emb, s, e, k, exclude) for s, e in user_blocks(len(user_emb), block_size)]
    return {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}
