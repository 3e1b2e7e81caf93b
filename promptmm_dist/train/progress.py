"""Progress bars for long steps and the one-line-per-epoch log."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, world=None, **kw) -> Iterable[T]:
    """A tqdm bar on rank 0 when stderr is a terminal; plain iteration otherwise."""
    show = (world is None or world.is_main) and sys.stderr.isatty()
    return tqdm(items, desc=desc, leave=False, disable=not show, **kw)


def epoch_line(stage: str, row: dict, total: int | None = None) -> str:
    """`teacher epoch  3/60 | bpr 0.4123 ... | val recall@20 0.0712 ndcg@20 0.0301 (best 2) | 1.9s`.

    Epochs count from 0 as in history.jsonl and metrics.json (`best_epoch`), so the last of 60 is 59/60;
    `total` (the configured epochs) may also come in the row as `epochs`."""
    losses = " ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss_"))
    val = row.get("val") or {}
    metrics = f"val recall@20 {val.get('recall@20', float('nan')):.4f} ndcg@20 {val.get('ndcg@20', float('nan')):.4f}"
    best = f" (best {row['best_epoch']})" if "best_epoch" in row else ""
    secs = row.get("epoch_s", row.get("train_s", 0.0))
    total = total if total is not None else row.get("epochs")
    of = f"/{total}" if total is not None else ""
    width = len(str(total)) if total is not None else 3
    return f"{stage} epoch {row['epoch']:{width}d}{of} | {losses} | {metrics}{best} | {secs:.1f}s"


def worker_log(msg: str) -> None:
    """A log line from a Ray Train worker loop. Written to stderr directly, not with print: Train V2
    patches print in its workers to both log and echo the message, which showed every line twice."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
