"""Exact full-ranking evaluation: every item is ranked for every evaluated user.

Protocol (DESIGN section 2, "Evaluation"): a user is evaluated on a split when they have at least one
item in it; their training items are masked to -inf (and their validation items too when the split is
"test"), the top max(ks) items are taken with `torch.topk`, and Recall/Precision/NDCG/Hit/legacy-NDCG
are accumulated as sums (see `metrics.py`) so chunks and actors combine exactly.

Ties: `torch.topk(sorted=True)` decides the order of equal scores. It is deterministic for a given
torch build and device, but torch does not specify which of two equal items comes first; scorers for
which that matters (popularity) emit tie-free scores themselves.

Cost: the per-split relevant lists and masks are precomputed once in a `RankingTask` (plain numpy
CSR arrays, picklable, cheap to ship to Ray actors and to reuse every epoch). Build an `EvalData` once
per dataset and pass it instead of the `InteractionData` to avoid rebuilding it each call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.errors import DataError
from promptmm_dist.eval.metrics import (
    COUNT_KEY,
    DEFAULT_KS,
    METRIC_NAMES,
    add_sums,
    batch_sums,
    finalize,
)
from promptmm_dist.eval.popularity import ScoreFn, popularity_scorer, random_scorer

EVAL_SPLITS: tuple[str, ...] = ("val", "test")


# --------------------------------------------------------------------------------------------------
# Precomputed per-split task
# --------------------------------------------------------------------------------------------------


def _take_rows(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of a CSR structure (indptr, indices), vectorised."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    total = int(new_indptr[-1])
    # position of every output element in `indices`: start of its row + offset within the row
    offsets = np.arange(total, dtype=np.int64) - np.repeat(new_indptr[:-1], lengths)
    return new_indptr, indices[np.repeat(starts, lengths) + offsets]


@dataclass(frozen=True, eq=False)
class RankingTask:
    """Everything needed to evaluate one split, for a (sub)set of users; immutable and picklable.

    Row r of both CSRs belongs to `users[r]`; `users` is sorted and holds only users with >= 1
    relevant item. `relevant`: the user's items in the split; `mask`: the items ranked out
    (train, plus val when the split is test).
    """

    split: str
    n_items: int
    users: np.ndarray  # int64 (n,)
    rel_indptr: np.ndarray  # int64 (n + 1,)
    rel_indices: np.ndarray  # int64, sorted within rows
    mask_indptr: np.ndarray  # int64 (n + 1,)
    mask_indices: np.ndarray  # int64

    @classmethod
    def from_data(cls, data: InteractionData, split: str) -> "RankingTask":
        if split not in EVAL_SPLITS:
            raise ValueError(f"cannot evaluate split {split!r}; expected one of {EVAL_SPLITS}")
        rel = data.csr(split)
        users = np.flatnonzero(np.diff(rel.indptr)).astype(np.int64)
        mask = data.train_csr
        if split == "test":
            mask = (mask + data.csr("val")).tocsr()
            mask.sum_duplicates()
            mask.sort_indices()
        rel_indptr, rel_indices = _take_rows(
            rel.indptr.astype(np.int64), rel.indices.astype(np.int64), users
        )
        mask_indptr, mask_indices = _take_rows(
            mask.indptr.astype(np.int64), mask.indices.astype(np.int64), users
        )
        return cls(split, int(data.n_items), users, rel_indptr, rel_indices, mask_indptr, mask_indices)

    def __len__(self) -> int:
        return len(self.users)

    def restrict(self, users: np.ndarray | Sequence[int]) -> "RankingTask":
        """The same task for the evaluated users that are also in `users` (an actor's share).

        Users in `users` without relevant items are ignored, as in the full evaluation, so disjoint
        shares partition the evaluated users and their sums add up to the whole.
        """
        rows = np.flatnonzero(np.isin(self.users, np.asarray(users, dtype=np.int64)))
        rel_indptr, rel_indices = _take_rows(self.rel_indptr, self.rel_indices, rows)
        mask_indptr, mask_indices = _take_rows(self.mask_indptr, self.mask_indices, rows)
        return RankingTask(
            self.split, self.n_items, self.users[rows], rel_indptr, rel_indices, mask_indptr, mask_indices
        )

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rel_indptr, rel_indices, mask_indptr, mask_indices) of rows [start, stop), re-based at 0."""
        r0, r1 = self.rel_indptr[start], self.rel_indptr[stop]
        m0, m1 = self.mask_indptr[start], self.mask_indptr[stop]
        return (
            self.rel_indptr[start : stop + 1] - r0,
            self.rel_indices[r0:r1],
            self.mask_indptr[start : stop + 1] - m0,
            self.mask_indices[m0:m1],
        )


@dataclass(frozen=True, eq=False)
class EvalData:
    """The `RankingTask` of each evaluation split of one dataset: build once, reuse every epoch."""

    n_users: int
    n_items: int
    tasks: Mapping[str, RankingTask]

    @classmethod
    def from_data(cls, data: InteractionData, splits: Sequence[str] = EVAL_SPLITS) -> "EvalData":
        return cls(int(data.n_users), int(data.n_items),
                   {s: RankingTask.from_data(data, s) for s in splits})

    def __getitem__(self, split: str) -> RankingTask:
        try:
            return self.tasks[split]
        except KeyError:
            raise KeyError(f"EvalData has no split {split!r} (has {sorted(self.tasks)})") from None

    def restrict(self, users: np.ndarray | Sequence[int]) -> "EvalData":
        """Every task restricted to `users` (what one evaluation actor holds)."""
        return EvalData(self.n_users, self.n_items, {s: t.restrict(users) for s, t in self.tasks.items()})


EvalSource = InteractionData | EvalData | RankingTask


def _task(data: EvalSource, split: str) -> RankingTask:
    if isinstance(data, RankingTask):
        if data.split != split:
            raise ValueError(f"RankingTask is for split {data.split!r}, not {split!r}")
        return data
    if isinstance(data, EvalData):
        return data[split]
    return RankingTask.from_data(data, split)


# --------------------------------------------------------------------------------------------------
# Scoring and ranking
# --------------------------------------------------------------------------------------------------


def _owned_scores(raw: torch.Tensor | np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """The scorer's output as a float tensor this function may overwrite (never the scorer's memory)."""
    scores = torch.as_tensor(raw)
    if tuple(scores.shape) != (n_users, n_items):
        raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(n_users, n_items)}")
    if scores.dtype in (torch.float32, torch.float64):
        scores = scores.detach().clone(memory_format=torch.contiguous_format)
    else:  # ints, half, bfloat16: rank in float32 (the conversion makes a fresh tensor)
        scores = scores.detach().to(torch.float32).contiguous()
    if torch.isnan(scores).any():
        raise ValueError("score_fn returned NaN scores (diverged model?); refusing to rank them")
    return scores


def full_ranking_sums(
    score_fn: ScoreFn,
    data: EvalSource,
    split: str,
    users: np.ndarray | Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> tuple[dict[str, float], int]:
    """Metric sums and user count for `split` (optionally only the evaluated users in `users`).

    `score_fn(user_ids)` gets a sorted int64 array and returns (len(user_ids), n_items) scores (torch
    tensor on any device, or numpy). Memory is bounded by `chunk_size` x n_items scores.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    task = _task(data, split)
    if users is not None:
        task = task.restrict(users)
    n_items = task.n_items
    k_list = min(max(ks), n_items)
    parts = []
    with torch.no_grad():
        for start in range(0, len(task), chunk_size):
            stop = min(start + chunk_size, len(task))
            batch_users = task.users[start:stop]
            rel_indptr, rel_indices, mask_indptr, mask_indices = task.rows(start, stop)
            scores = _owned_scores(score_fn(batch_users), len(batch_users), n_items)
            mask_rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(mask_indptr))
            if len(mask_rows):
                dev = scores.device
                scores[torch.from_numpy(mask_rows).to(dev), torch.from_numpy(mask_indices).to(dev)] = -torch.inf
            top = torch.topk(scores, k_list, dim=1, largest=True, sorted=True).indices
            parts.append(batch_sums(top.cpu().numpy(), rel_indptr, rel_indices, n_items, ks))
    return add_sums(parts, ks)


def evaluate(
    score_fn: ScoreFn,
    data: EvalSource,
    split: str,
    users: np.ndarray | Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Mean metrics over the evaluated users of `split` (keys "recall@20", ..., "n_users")."""
    return finalize(*full_ranking_sums(score_fn, data, split, users=users, ks=ks, chunk_size=chunk_size))


def evaluate_splits(
    score_fn: ScoreFn,
    data: EvalSource,
    splits: Sequence[str] = EVAL_SPLITS,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """{"val": {...}, "test": {...}} for the requested splits (the precomputation is shared)."""
    if isinstance(data, InteractionData):
        data = EvalData.from_data(data, splits)
    return {s: evaluate(score_fn, data, s, ks=ks, chunk_size=chunk_size) for s in splits}


def embedding_scorer(
    user_emb: torch.Tensor | np.ndarray, item_emb: torch.Tensor | np.ndarray
) -> ScoreFn:
    """score(u, i) = <user_emb[u], item_emb[i]>, for LightGCN/MF-style models (the served student).

    The tables are detached (evaluation never builds a graph) and stay on their device.
    """
    users_t = torch.as_tensor(user_emb).detach()
    items_t = torch.as_tensor(item_emb).detach()
    if users_t.ndim != 2 or items_t.ndim != 2 or users_t.shape[1] != items_t.shape[1]:
        raise ValueError(f"embedding shapes do not match: {tuple(users_t.shape)} vs {tuple(items_t.shape)}")
    items_t_t = items_t.t()

    def score(users: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.asarray(users, dtype=np.int64)).to(users_t.device)
        return users_t[idx] @ items_t_t

    return score


# --------------------------------------------------------------------------------------------------
# `promptmm evaluate`
# --------------------------------------------------------------------------------------------------

ScorerFactory = Callable[[InteractionData, argparse.Namespace], ScoreFn]

# name -> factory(data, args); adding a model to `promptmm evaluate` is one entry here.
SCORERS: dict[str, ScorerFactory] = {
    "popularity": lambda data, args: popularity_scorer(data),
    "random": lambda data, args: random_scorer(data.n_items, seed=int(getattr(args, "seed", 0) or 0)),
}


def resolve_scorer(model: str, data: InteractionData, args: argparse.Namespace) -> ScoreFn:
    """The score function for `--model` (a registry name; run folders/exports come later)."""
    factory = SCORERS.get(model)
    if factory is None and Path(model).exists():
        from promptmm_dist.serve.export import load_export

        export = load_export(model)
        user, item = export.user, export.item
        if user.shape[0] != data.n_users or item.shape[0] != data.n_items:
            raise DataError(model, None, f"export has {user.shape[0]} users x {item.shape[0]} items, "
                                         f"the data {data.n_users} x {data.n_items}")
        return embedding_scorer(user, item)
    if factory is None:
        raise DataError(model, None, f"unknown model (expected one of: {', '.join(sorted(SCORERS))})")
    return factory(data, args)


def format_table(results: Mapping[str, Mapping[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """Readable table: one block per split, a row per metric, a column per K."""
    lines = []
    for split, metrics in results.items():
        lines.append(f"{split} ({int(metrics.get(COUNT_KEY, 0))} users)")
        lines.append(f"  {'metric':<12}" + "".join(f"{'@' + str(k):>10}" for k in ks))
        for name in METRIC_NAMES:
            lines.append(f"  {name:<12}" + "".join(f"{metrics[f'{name}@{k}']:>10.4f}" for k in ks))
    return "\n".join(lines)


def data_source(model: str, args: argparse.Namespace) -> tuple[str, str]:
    """(path, format) to evaluate on: `--data` when given; else, for a run folder or export, the
    dataset its run was trained on (its config.yaml); else the synthetic dataset."""
    fmt = getattr(args, "format", "auto") or "auto"
    if getattr(args, "data", None):
        return str(args.data), fmt
    if model in SCORERS:
        return "synthetic", fmt
    from promptmm_dist.data.formats import is_synthetic
    from promptmm_dist.serve.export import load_export, run_data_source

    path, run_format, cfg_file = run_data_source(load_export(model))
    if not is_synthetic(path) and not Path(path).exists():
        raise DataError(cfg_file, "data.path", f"the run's dataset {path} is not found here; pass --data")
    print(f"evaluate: data {path} (from {cfg_file}; --data overrides)", file=sys.stderr)
    return path, run_format if fmt == "auto" else fmt


def evaluate_command(args: argparse.Namespace) -> int:
    """`promptmm evaluate`: full-ranking metrics of a baseline on val and/or test."""
    from promptmm_dist.data.formats import load_dataset  # deferred: keeps `--help` import-light

    model = str(args.model)
    if model not in SCORERS and not Path(model).exists():  # fail before the (possibly slow) data load
        raise DataError(model, None, f"unknown model (expected one of: {', '.join(sorted(SCORERS))}, "
                                     "or a run folder / student export)")
    data_path, data_format = data_source(model, args)
    data = load_dataset(data_path, data_format)
    splits = list(EVAL_SPLITS) if args.split == "both" else [args.split]
    score_fn = resolve_scorer(model, data, args)
    t0 = time.perf_counter()
    results = evaluate_splits(score_fn, data, splits)
    elapsed = time.perf_counter() - t0

    if getattr(args, "out", None):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        print(f"model {model} on {getattr(data, 'name', args.data)}: full ranking over "
              f"{data.n_items} items, train items masked (and val items on test) ({elapsed:.2f} s)")
        print(format_table(results))
    return 0
