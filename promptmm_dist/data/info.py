"""`promptmm data info`: what is in a dataset, before spending compute on it.

Reports counts per split, cold users/items, density and the modalities with their dims and on-disk
dtypes (float16 or float64 files are cast to float32 on load; prepared data remembers the source dtype).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from promptmm_dist.data import formats as F
from promptmm_dist.data.dataset import SPLIT_NAMES
from promptmm_dist.data.validate import DataWarning, count_multi_split_pairs


def dataset_info(path: str | Path, format: str = "auto") -> dict[str, Any]:
    """Summary dict of a dataset (the JSON that `data info --json` prints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the summary itself reports cold users/items
        src = F.load_source(path, format)
    d = src.data
    train = d.splits == SPLIT_NAMES["train"]
    per_split = {name: d.n_interactions(code) for name, code in SPLIT_NAMES.items()}
    total = int(len(d.users))
    return {
        "name": d.name,
        "path": str(src.path) if src.path is not None else str(path),
        "format": d.source_format,
        "source_format": src.origin_format,
        "n_users": d.n_users,
        "n_items": d.n_items,
        "interactions": {**per_split, "total": total},
        "users_with_interactions": {name: int(np.count_nonzero(np.bincount(d.users[d.splits == code],
                                                                           minlength=d.n_users)))
                                    for name, code in SPLIT_NAMES.items()},
        "users_without_train": int(np.count_nonzero(np.bincount(d.users[train], minlength=d.n_users) == 0)),
        "items_never_in_train": int(np.count_nonzero(np.bincount(d.items[train], minlength=d.n_items) == 0)),
        "pairs_in_several_splits": count_multi_split_pairs(d.users, d.items),
        "density": total / (d.n_users * d.n_items) if d.n_users and d.n_items else 0.0,
        "modalities": {m: {"dim": int(f.shape[1]), "dtype_on_disk": src.feature_dtypes.get(m, "float32"),
                           "source_dtype": src.source_dtypes.get(m, "float32")}
                       for m, f in d.features.items()},
        "manifest_sha256": d.manifest_sha256,
    }


def format_table(info: dict[str, Any]) -> str:
    """Human-readable two-column table."""
    inter = info["interactions"]
    fmt = info["format"] if info["format"] == info["source_format"] else \
        f"{info['format']} (prepared from {info['source_format']})"
    rows = [
        ("dataset", f"{info['name']}  [{fmt}]  {info['path']}"),
        ("users", f"{info['n_users']:,}  ({info['users_without_train']:,} without a training interaction)"),
        ("items", f"{info['n_items']:,}  ({info['items_never_in_train']:,} never in train)"),
        ("interactions", f"{inter['total']:,}  train {inter['train']:,} / val {inter['val']:,} / "
                         f"test {inter['test']:,}"),
        ("density", f"{100 * info['density']:.3f}%"),
    ]
    if info["pairs_in_several_splits"]:
        rows.append(("overlap", f"{info['pairs_in_several_splits']:,} (user, item) pairs in several splits"))
    for i, (m, v) in enumerate(info["modalities"].items()):
        dtype = v["dtype_on_disk"] if v["dtype_on_disk"] == v["source_dtype"] else \
            f"{v['dtype_on_disk']} (source {v['source_dtype']})"
        rows.append(("modalities" if i == 0 else "", f"{m:<14} {v['dim']:>5}  {dtype}"))
    rows.append(("content sha256", info["manifest_sha256"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def info_command(args: argparse.Namespace) -> int:
    """`promptmm data info PATH [--json] [--format F]`."""
    info = dataset_info(args.path, args.format)
    print(json.dumps(info) if args.json else format_table(info))
    return 0
