"""Resume state of a training loop, in one place for the teacher and the student loops.

After every epoch a loop hands a `LoopState` to its report hook: the latest weights, optimiser
state(s), the next epoch, early-stopping/smoothing state, history, the best weights so far and the
KD source's state (prompt, prompt optimiser, cache version) and the torch RNG state (dropout in the
teacher and the prompt; sampling uses explicit per-epoch seeds). Loading it back and continuing gives
the same run as never stopping. Every rank seeds torch alike and draws the same dropout shapes, so
rank 0's RNG state is every rank's.

Saved as `resume.pt` (tensors and plain containers only, loaded with `weights_only=True`), written
atomically: a crash leaves the previous epoch's file whole. With a partitioned world the sharded
tables' rows (weights, best weights, their optimiser moments) are not in it: each rank writes its own
`resume.rows<r>.pt` (train.row_pieces), and a resuming rank reads its rows from the pieces, so no rank
ever holds a whole table and the state resumes on any number of ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from promptmm_dist.train.row_pieces import RowPiece, atomic_save, pieces_complete, read_rows
from promptmm_dist.train.world import ROW_TABLES, World

RESUME_FILE = "resume.pt"
RESUME_STEM = "resume"


@dataclass
class LoopState:
    """Everything a loop needs to continue exactly where it stopped."""

    stage: str
    next_epoch: int
    done: bool  # early stopping fired: nothing is left to run
    history: list[dict]
    stopper: dict
    model: dict
    best: dict | None
    optimizers: dict[str, dict]
    extra: dict = field(default_factory=dict)  # the KD source's state (student)
    rng: torch.Tensor | None = None  # torch.get_rng_state() after the epoch
    pieces: dict | None = None  # the row pieces' marker (partitioned); None: the tables are in here
    # this rank's rows of the sharded tables (keys "model/<p>", "best/<p>", "opt/<o>/<i>/<k>"); not
    # saved in resume.pt: written as this rank's piece
    rows: RowPiece | None = None
    source: Path | None = None  # the folder it was loaded from (where its pieces are)
    holder: World | None = None  # the partitioned world that resumed from it (whose rows `own_rows` reads)

    def own_rows(self) -> RowPiece | None:
        """This rank's piece: the snapshot's, or (a resumed state saved again) read back from the
        pieces it was loaded from, only when asked (a rerun with no epoch left to run)."""
        if self.rows is None and self.pieces is not None and self.holder is not None:
            w = self.holder
            rows = read_rows(self.source, RESUME_STEM, self.pieces, w.rows)
            self.rows = RowPiece(w.rank, w.world_size, self.next_epoch, w.rows, w.totals, self.pieces["kinds"], rows)
        return self.rows

    def save(self, folder: Path) -> Path:
        """Atomic `folder/resume.pt` (rank 0) and this rank's row piece."""
        folder = Path(folder)
        piece = self.own_rows()
        if piece is not None:
            piece.write(folder, RESUME_STEM)
        if piece is None or piece.rank == 0:
            atomic_save({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rows", "source", "holder")},
                        folder / RESUME_FILE)  # no deep copy
        return folder / RESUME_FILE

    @classmethod
    def load(cls, path: Path) -> "LoopState":
        state = cls(**torch.load(path, map_location="cpu", weights_only=True))
        state.source = Path(path).parent
        return state

    def complete(self) -> bool:
        """Its row pieces (if any) are all there and from the same save."""
        return self.pieces is None or (self.source is not None and pieces_complete(self.source, RESUME_STEM, self.pieces))

    def weights(self) -> tuple[dict, RowPiece | None]:
        """The weights a stage's checkpoint holds (the best so far, else the latest): the dense part
        and, partitioned, this rank's piece of the tables."""
        prefix = "best/" if self.best is not None else "model/"
        dense = self.best if self.best is not None else self.model
        piece = self.own_rows()
        return dense, (piece.select(prefix) if piece is not None else None)


def plain(rows: list[dict]) -> list[dict]:
    """History rows as JSON types only (numpy scalars would not load with weights_only)."""
    return json.loads(json.dumps(rows, default=float))


def mark_progress(folder: str | Path | None, rank: int, epoch: int) -> None:
    """`<folder>/rank<r>.json` = {"pid", "epoch"} at the start of each epoch (fault injection and
    monitoring read it; see promptmm_dist.faults)."""
    if folder is None:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch}))
    os.replace(tmp, folder / f"rank{rank}.json")


def latest_state(fallback: str | Path | None = None) -> LoopState | None:
    """The state to resume from: the further of Ray Train's checkpoint of this run (a restarted
    worker group, or a rerun into the same storage) and `fallback` (a resume.pt path, or a folder
    holding one, that the driver found; absent paths are ignored)."""
    found: list[LoopState] = []
    try:
        import ray.train

        ckpt = ray.train.get_checkpoint()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker (the local single-process mode)
        ckpt = None
    if ckpt is not None:
        # the ranks' pieces merged into one folder: read in place on a shared filesystem, else
        # downloaded once (the rows are read after this function returns)
        d = Path(ckpt.path) if Path(ckpt.path).is_dir() else Path(ckpt.to_directory())
        if (d / RESUME_FILE).exists():
            found.append(LoopState.load(d / RESUME_FILE))
    if fallback:
        path = Path(fallback)
        path = path / RESUME_FILE if path.is_dir() else path
        if path.exists():
            found.append(LoopState.load(path))
    found = [s for s in found if s.complete()]  # a mirror caught between two ranks' writes is skipped
    return max(found, key=lambda s: s.next_epoch) if found else None


class Resumable:
    """The restore/snapshot half of a loop: the same code for teacher and student."""

    def __init__(self, stage: str, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 stopper, extra: object | None = None, rank: int = 0,
                 progress_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                 world: World | None = None) -> None:
        """`world`: with a partitioned world each rank snapshots and restores only its rows."""
        self.stage, self.model, self.optimizers, self.stopper = stage, model, optimizers, stopper
        self.extra, self.rank, self.progress_dir, self.log = extra, rank, progress_dir, log
        self.world = world or World(rank)

    def _param_names(self, opt: torch.optim.Optimizer) -> dict[int, str]:
        """Optimizer state index -> parameter name (Adam numbers parameters in param-group order)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {i: names.get(id(p), "") for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}

    def restore(self, state: LoopState | None) -> tuple[int, list[dict], dict | None, bool]:
        """Load `state` into the loop's objects; (first epoch to run, history, best weights, done)."""
        if state is None:
            return 0, [], None, False
        if state.stage != self.stage:
            raise ValueError(f"resume state is for stage {state.stage!r}, not {self.stage!r}")
        model, best, opts = self._held_rows(state)
        self.model.load_state_dict(model)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(opts[name])
        self.stopper.load_state_dict(state.stopper)
        if self.extra is not None and hasattr(self.extra, "load_state_dict") and state.extra:
            self.extra.load_state_dict(state.extra)
        if state.rng is not None:
            torch.set_rng_state(state.rng)
        if self.rank == 0:
            line = f"resumed {self.stage} from epoch {state.next_epoch}"
            if self.log is not None:
                self.log(line)
            if self.progress_dir is not None:  # also kept beside the progress records (monitoring, tests)
                Path(self.progress_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(self.progress_dir) / "events.log", "a") as fh:
                    fh.write(line + "\n")
        return state.next_epoch, list(state.history), best, state.done

    def _held_rows(self, state: LoopState) -> tuple[dict, dict | None, dict[str, dict]]:
        """(weights, best weights, optimiser states) with the rows this process holds: read from the
        state's row pieces, or taken out of whole tables."""
        w = self.world
        if state.pieces is None:
            opts = {n: w.local_optimizer_state(state.optimizers[n], self._param_names(o))
                    for n, o in self.optimizers.items()}
            best = w.local_state_dict(state.best) if state.best is not None else None
            return w.local_state_dict(state.model), best, opts
        model, best = dict(state.model), dict(state.best) if state.best is not None else None
        opts = {n: {"state": {i: dict(e) for i, e in o["state"].items()}, "param_groups": o["param_groups"]}
                for n, o in state.optimizers.items()}
        want = w.rows if w.partitioned else None
        if w.partitioned:
            state.holder = w
        for key, rows in read_rows(state.source, RESUME_STEM, state.pieces, want).items():
            part, rest = key.split("/", 1)
            if part == "model":
                model[rest] = rows
            elif part == "best":
                best[rest] = rows
            else:
                opt, idx, name = rest.rsplit("/", 2)
                opts[opt]["state"][int(idx)][name] = rows
        return model, best, opts

    def begin_epoch(self, epoch: int) -> None:
        mark_progress(self.progress_dir, self.rank, epoch)

    def snapshot(self, next_epoch: int, done: bool, history: list[dict], best: dict | None) -> LoopState:
        """This epoch's state. Partitioned, the sharded tables' rows go into this rank's row piece
        (copied: the loop keeps training, the reporter may save the state again at the end)."""
        extra = self.extra.state_dict() if self.extra is not None and hasattr(self.extra, "state_dict") else {}
        w = self.world
        if not w.partitioned:
            opts = {n: o.state_dict() for n, o in self.optimizers.items()}
            return LoopState(self.stage, next_epoch, done, plain(history), self.stopper.state_dict(),
                             self.model.state_dict(), best, opts, extra, torch.get_rng_state())
        rows: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}

        def copy(v):
            return v.detach().cpu().clone() if torch.is_tensor(v) else v

        def split(prefix: str, state: dict, kind_of: Callable[[str], str | None]) -> dict:
            dense = {}
            for k, v in state.items():
                kind = kind_of(k)
                if kind is not None and torch.is_tensor(v) and v.dim() == 2:
                    rows[prefix + str(k)], kinds[prefix + str(k)] = copy(v), kind
                else:
                    dense[k] = copy(v)
            return dense

        model = split("model/", self.model.state_dict(), ROW_TABLES.get)
        best_dense = split("best/", best, ROW_TABLES.get) if best is not None else None
        opts = {}
        for n, o in self.optimizers.items():
            sd, names = o.state_dict(), self._param_names(o)
            opts[n] = {"state": {i: split(f"opt/{n}/{i}/", e, lambda _k, i=i: ROW_TABLES.get(names.get(i, "")))
                                 for i, e in sd["state"].items()},
                       "param_groups": sd["param_groups"]}
        piece = RowPiece(w.rank, w.world_size, next_epoch, w.rows, w.totals, kinds, rows)
        return LoopState(self.stage, next_epoch, done, plain(history), self.stopper.state_dict(),
                         model, best_dense, opts, extra, torch.get_rng_state(), pieces=piece.marker(), rows=piece)
