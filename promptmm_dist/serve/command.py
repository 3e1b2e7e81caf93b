"""`promptmm recommend`: top-K items from an exported student (two embedding tables), the only thing
serving needs. `--users 1,2,3` prints them for a few users in this process; `--all --out DIR` scores
every user with Ray Data (promptmm_dist.serve.batch) into a Parquet folder.

Recommendations never include a user's training items: they are masked with `--data`, or by default
with the dataset the run was trained on (its config.yaml), after checking the model belongs to it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from promptmm_dist.errors import ConfigError, DataError
from promptmm_dist.serve.export import Export, check_matches, run_data_source
from promptmm_dist.serve.export import load_export
from promptmm_dist.serve.rank import default_block_size, exclusion_csr, top_k


def recommend(user_emb: np.ndarray, item_emb: np.ndarray, users: list[int], k: int,
              exclude: dict[int, np.ndarray] | None = None) -> dict[int, list[int]]:
    """Highest dot-product items per user, excluding the given (training) items."""
    scores = user_emb[users] @ item_emb.T
    for row, u in enumerate(users):
        if exclude and u in exclude:
            scores[row, exclude[u]] = -np.inf
    items, vals = top_k(scores, k)
    return {u: items[row][np.isfinite(vals[row])].tolist() for row, u in enumerate(users)}


def _dataset_for(export: Export, args: argparse.Namespace):
    """The dataset to mask with (--data, else the run's own), checked to be the model's."""
    from promptmm_dist.data.formats import is_synthetic, load_dataset

    if args.data:
        path, fmt = args.data, getattr(args, "format", "auto") or "auto"
    else:
        path, fmt, cfg_file = run_data_source(export)
        if not is_synthetic(path) and not Path(path).exists():
            raise DataError(cfg_file, "data.path", f"the run's dataset {path} is not found here; pass --data")
    data = load_dataset(path, fmt)
    check_matches(export, data, str(path))
    return data


def _parse_users(text: str, n_users: int) -> list[int]:
    try:
        users = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise DataError("--users", None, f"expected comma-separated integer ids, got {text!r}") from None
    if not users:
        raise DataError("--users", None, "no user ids given")
    bad = [u for u in users if not 0 <= u < n_users]
    if bad:
        raise DataError("--users", f"user {bad[0]}", f"unknown user (the model has {n_users} users)")
    return users


def _check_args(args: argparse.Namespace) -> None:
    """Everything decidable from the command line alone, before any file is read."""
    if args.k < 1:
        raise ConfigError(f"--k must be a positive number of items, got {args.k}")
    if args.all and not args.out:
        raise ConfigError("--all writes a Parquet folder: give it with --out DIR")
    if not args.all and args.out:
        raise ConfigError("--out is for --all (every user); --users prints to stdout")
    if args.num_workers is not None and args.num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.block_size is not None and args.block_size < 1:
        raise ConfigError(f"--block-size must be at least 1, got {args.block_size}")


def recommend_command(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.all and Path(args.out).exists() and not args.force:
        raise DataError(args.out, None, "already exists (pass --force to replace it)")
    export = load_export(args.model)
    if not args.all:
        users = _parse_users(args.users, len(export.user))
    data = _dataset_for(export, args)
    exclude = exclusion_csr(data, args.exclude_val)
    if args.all:
        return _recommend_all(export, exclude, args)
    recs = recommend(export.user, export.item, users, args.k,
                     {u: exclude.indices[exclude.indptr[u]:exclude.indptr[u + 1]] for u in users})
    if args.json:
        print(json.dumps({str(u): items for u, items in recs.items()}))
    else:
        for u, items in recs.items():
            print(f"user {u}: {' '.join(map(str, items))}")
    return 0


def _recommend_all(export: Export, exclude, args: argparse.Namespace) -> int:  # noqa: ANN001 (csr)
    import ray

    from promptmm_dist.config import DistConfig
    from promptmm_dist.ray_setup import init_ray
    from promptmm_dist.serve.batch import log, recommend_all

    started = not ray.is_initialized()
    init_ray(DistConfig(address=args.address))
    try:
        workers = args.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        block_size = args.block_size or default_block_size(len(export.item))
        info = {"model": str(export.path), "exclude_val": bool(args.exclude_val)}
        summary = recommend_all(export.user, export.item, exclude, args.k, Path(args.out), block_size,
                                min(workers, -(-len(export.user) // block_size)), args.force, info)
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps(summary))
    else:
        log(f"recommend: {summary['rows']} rows for {summary['users']} users in {summary['blocks']} blocks "
            f"({summary['seconds']:.1f} s) -> {args.out}")
    return 0
