"""`promptmm recommend`: top-K items for users from an exported student (two embedding tables),
the only thing serving needs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from promptmm_dist.errors import DataError


def load_export(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """user/item tables from `export.npz` (a run folder, its student/ folder, or the file itself)."""
    p = Path(path)
    for candidate in (p, p / "export.npz", p / "student" / "export.npz"):
        if candidate.is_file():
            try:
                with np.load(candidate, allow_pickle=False) as z:
                    return z["user"], z["item"]
            except (OSError, KeyError, ValueError) as err:
                raise DataError(candidate, None, f"not a student export ({err})") from None
    raise DataError(p, None, "no export.npz found (expected a run folder or a student export)")


def recommend(user_emb: np.ndarray, item_emb: np.ndarray, users: list[int], k: int,
              exclude: dict[int, np.ndarray] | None = None) -> dict[int, list[int]]:
    """Highest dot-product items per user, excluding the given (training) items."""
    scores = user_emb[users] @ item_emb.T
    for row, u in enumerate(users):
        if exclude and u in exclude:
            scores[row, exclude[u]] = -np.inf
    k = min(k, item_emb.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return {u: np.take_along_axis(top, order, axis=1)[row].tolist() for row, u in enumerate(users)}


def recommend_command(args: argparse.Namespace) -> int:
    user_emb, item_emb = load_export(args.model)
    try:
        users = [int(u) for u in args.users.split(",") if u.strip()]
    except ValueError:
        raise DataError("--users", None, f"expected comma-separated integer ids, got {args.users!r}") from None
    bad = [u for u in users if not 0 <= u < len(user_emb)]
    if bad:
        raise DataError("--users", f"user {bad[0]}", f"unknown user (the model has {len(user_emb)} users)")
    exclude = None
    if args.data:
        from promptmm_dist.data.formats import load_dataset

        csr = load_dataset(args.data).train_csr
        exclude = {u: csr.indices[csr.indptr[u]:csr.indptr[u + 1]] for u in users}
    recs = recommend(user_emb, item_emb, users, args.k, exclude)
    if args.json:
        print(json.dumps({str(u): items for u, items in recs.items()}))
    else:
        for u, items in recs.items():
            print(f"user {u}: {' '.join(map(str, items))}")
    return 0
