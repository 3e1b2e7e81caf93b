"""Checkpoints in row pieces: no rank gathers a whole table to save, and none reads one to resume.

With a partitioned world each rank writes its own rows of every sharded table (weights, best weights,
optimiser moments) into `<stem>.rows<r>.pt` with their global ids; rank 0 writes the dense rest into
`<stem>.pt` with a marker (`PIECES_KEY`: how many pieces, the tag they carry, which table each row key
is). A reader takes the rows it owns from every piece (memory-mapped, so only those rows are read): a
checkpoint written by W ranks resumes on any number of ranks, and `read_rows(..., want=None)` makes
the whole table for a one-process reader (serving, the local mode, tests). A piece whose tag differs
from its marker's belongs to another save (a crash between the writes): the set is incomplete.

Plain tensors and containers only (`weights_only=True` loads), written atomically.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

PIECES_KEY = "__row_pieces__"


def piece_path(folder: Path, stem: str, rank: int) -> Path:
    return Path(folder) / f"{stem}.rows{rank}.pt"


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt.tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def marker(n_pieces: int, tag: int, kinds: dict[str, str]) -> dict:
    """What `<stem>.pt` records about its pieces."""
    return {"n": int(n_pieces), "tag": int(tag), "kinds": dict(kinds)}


def write_piece(folder: Path, stem: str, rank: int, tag: int, ids: dict[str, np.ndarray],
                totals: dict[str, int], rows: dict[str, torch.Tensor]) -> Path:
    """This rank's rows (`rows[key]`: the rows of `ids[kind of key]`, in that order)."""
    payload = {"tag": int(tag), "totals": {k: int(v) for k, v in totals.items()},
               "ids": {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in ids.items()},
               "rows": {k: v.detach().cpu().contiguous() for k, v in rows.items()}}
    path = piece_path(folder, stem, rank)
    atomic_save(payload, path)
    return path


def _load_piece(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def pieces_complete(folder: Path, stem: str, mark: dict) -> bool:
    """Every piece named by `mark` exists and carries its tag."""
    for r in range(mark["n"]):
        path = piece_path(folder, stem, r)
        try:
            if int(_load_piece(path)["tag"]) != mark["tag"]:
                return False
        except (OSError, RuntimeError, KeyError, EOFError):
            return False
    return True


def read_rows(folder: Path, stem: str, mark: dict, want: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Every row key's rows for the global ids `want[kind]` (in that order), taken from the pieces;
    `want=None`: whole tables in global id order. Raises ValueError when the set is incomplete."""
    kinds = mark["kinds"]
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    asked: dict[str, int] = {}  # kind -> rows asked for
    pos_of: dict[str, np.ndarray] = {}  # kind -> position in the answer of each global id (-1: not asked)
    for r in range(mark["n"]):
        path = piece_path(folder, stem, r)
        piece = _load_piece(path)
        if int(piece["tag"]) != mark["tag"]:
            raise ValueError(f"{path}: row piece from another save (tag {piece['tag']}, expected {mark['tag']})")
        for kind, total in piece["totals"].items():
            if kind not in pos_of:
                ids = np.arange(total) if want is None else np.asarray(want[kind], dtype=np.int64)
                pos = np.full(total, -1, dtype=np.int64)
                pos[ids] = np.arange(len(ids))
                pos_of[kind], asked[kind], filled[kind] = pos, len(ids), 0
        for kind in piece["ids"]:
            sel = pos_of[kind][piece["ids"][kind].numpy()]
            hit = np.flatnonzero(sel >= 0)
            filled[kind] += len(hit)
            dst, src = torch.from_numpy(sel[hit]), torch.from_numpy(hit)
            for key, rows in piece["rows"].items():
                if kinds[key] != kind:
                    continue
                if key not in out:
                    out[key] = torch.empty((asked[kind],) + tuple(rows.shape[1:]), dtype=rows.dtype)
                out[key][dst] = rows[src]
        del piece
    for kind, n in asked.items():
        if filled[kind] != n:
            raise ValueError(f"{folder}/{stem}: the row pieces hold {filled[kind]} of the {n} {kind} rows asked for")
    return out


@dataclass
class RowPiece:
    """One rank's rows of a state's sharded tables, and what the marker in `<stem>.pt` says of them."""

    rank: int
    n: int  # pieces in the set (the world size that wrote it)
    tag: int  # the same on every piece of one save (the epoch)
    ids: dict[str, np.ndarray]  # kind -> global ids of the rows, in order
    totals: dict[str, int]  # kind -> rows of the whole table
    kinds: dict[str, str]  # row key -> kind
    rows: dict[str, torch.Tensor]

    def marker(self) -> dict:
        return marker(self.n, self.tag, self.kinds)

    def write(self, folder: Path, stem: str) -> Path:
        return write_piece(folder, stem, self.rank, self.tag, self.ids, self.totals, self.rows)

    def select(self, prefix: str) -> "RowPiece":
        """The keys under `prefix` ("best/"), with the prefix taken off."""
        keys = [k for k in self.rows if k.startswith(prefix)]
        return replace(self, kinds={k[len(prefix):]: self.kinds[k] for k in keys},
                       rows={k[len(prefix):]: self.rows[k] for k in keys})
