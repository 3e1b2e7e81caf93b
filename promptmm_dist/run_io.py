"""What every run writes next to its checkpoints: config, metrics, timings, per-epoch history."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from promptmm_dist.config import Config
from promptmm_dist.train.row_pieces import PIECES_KEY, RowPiece, atomic_save, read_rows

if TYPE_CHECKING:
    from promptmm_dist.train.world import World


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (a crash never leaves half a metrics.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=float)
        fh.write("\n")
    os.replace(tmp, path)


def write_history(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in history:
            fh.write(json.dumps(row, default=float) + "\n")


def save_checkpoint(folder: Path, name: str, state: dict, cfg: Config, meta: dict,
                    piece: RowPiece | None = None) -> Path:
    """`<name>.pt` (state dict only: weights, no pickled objects) + config.yaml + meta.json.
    With `piece` (a partitioned rank's rows of the sharded tables) every rank writes its piece and
    rank 0 the dense rest with the pieces' marker (train.row_pieces): no rank holds a whole table."""
    folder.mkdir(parents=True, exist_ok=True)
    if piece is not None:
        piece.write(folder, name)
        if piece.rank != 0:
            return folder / f"{name}.pt"
        state = {**state, PIECES_KEY: piece.marker()}
    atomic_save(state, folder / f"{name}.pt")
    (folder / "config.yaml").write_text(cfg.to_yaml())
    write_json(folder / "meta.json", meta)
    return folder / f"{name}.pt"


def load_state(path: Path) -> dict:
    """The whole state dict (row pieces assembled); tensors only (`weights_only=True`): a checkpoint
    is never unpickled as arbitrary objects."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    mark = state.pop(PIECES_KEY, None)
    if mark is not None:
        state.update(read_rows(path.parent, path.stem, mark))
    return state


def load_rows_of(path: Path, world: "World") -> dict:
    """The state dict with only `world`'s rows of its sharded tables: read from the row pieces, or
    memory-mapped out of a whole checkpoint (only those rows are read either way)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    mark = state.pop(PIECES_KEY, None)
    if mark is None:
        return world.local_state_dict(state)
    state.update(read_rows(path.parent, path.stem, mark, world.rows))
    return state
