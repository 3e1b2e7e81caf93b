"""Progress bars for long steps and the one-line-per-epoch log."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, world=None, every_s: float = 60.0, **kw) -> Iterable[T]:
    """A tqdm bar on rank 0 when stderr is a terminal. Otherwise (a Ray job's log, a bench's pipe) rank 0
    writes a `desc: step i/n (t s)` line at most every `every_s` seconds, so an epoch of minutes-long
    steps at scale is not silent until its epoch line; other ranks iterate quietly."""
    if world is not None and not world.is_main:
        return items
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, leave=False, **kw)
    return _step_lines(items, desc, every_s)


def _step_lines(items: Iterable[T], desc: str, every_s: float) -> Iterator[T]:
    total = f"/{len(items)}" if hasattr(items, "__len__") else ""
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            worker_log(f"{desc}: step {i}{total} ({now - start:.0f}s)")
            last = now


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
