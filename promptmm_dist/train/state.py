"""Resume state of a training loop, in one place for the teacher and the student loops.

After every epoch a loop hands a `LoopState` to its report hook: the latest weights, optimiser
state(s), the next epoch, early-stopping/smoothing state, history, the best weights so far and the
KD source's state (prompt, prompt optimiser, cache version) and the torch RNG state (dropout in the
teacher and the prompt; sampling uses explicit per-epoch seeds). Loading it back and continuing gives
the same run as never stopping. Every rank seeds torch alike and draws the same dropout shapes, so
rank 0's RNG state is every rank's.

Saved as one `resume.pt` (tensors and plain containers only, loaded with `weights_only=True`),
written atomically: a crash leaves the previous epoch's file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from promptmm_dist.train.world import World

RESUME_FILE = "resume.pt"


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

    def save(self, folder: Path) -> Path:
        """Atomic `folder/resume.pt`."""
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
        os.close(fd)
        try:
            torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)  # no deep copy
            os.replace(tmp, folder / RESUME_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return folder / RESUME_FILE

    @classmethod
    def load(cls, path: Path) -> "LoopState":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


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
        with ckpt.as_directory() as d:
            if (Path(d) / RESUME_FILE).exists():
                found.append(LoopState.load(Path(d) / RESUME_FILE))
    if fallback:
        path = Path(fallback)
        path = path / RESUME_FILE if path.is_dir() else path
        if path.exists():
            found.append(LoopState.load(path))
    return max(found, key=lambda s: s.next_epoch) if found else None


class Resumable:
    """The restore/snapshot half of a loop: the same code for teacher and student."""

    def __init__(self, stage: str, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 stopper, extra: object | None = None, rank: int = 0,
                 progress_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                 world: World | None = None) -> None:
        """`world`: a partitioned world makes snapshots whole (on rank 0) and restores each rank's rows."""
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
        self.model.load_state_dict(self.world.local_state_dict(state.model))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(self.world.local_optimizer_state(state.optimizers[name], self._param_names(opt)))
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
        best = self.world.local_state_dict(state.best) if state.best is not None else None
        return state.next_epoch, list(state.history), best, state.done

    def begin_epoch(self, epoch: int) -> None:
        mark_progress(self.progress_dir, self.rank, epoch)

    def snapshot(self, next_epoch: int, done: bool, history: list[dict], best: dict | None) -> LoopState:
        """The whole state (every rank calls it; with a partitioned world only rank 0's is complete)."""
        extra = self.extra.state_dict() if self.extra is not None and hasattr(self.extra, "state_dict") else {}
        w = self.world
        model = w.full_state_dict(self.model.state_dict())
        best_full = w.full_state_dict(best) if best is not None else None
        opts = {n: w.full_optimizer_state(o.state_dict(), self._param_names(o)) for n, o in self.optimizers.items()}
        return LoopState(self.stage, next_epoch, done, plain(history), self.stopper.state_dict(),
                         model, best_full, opts, extra, torch.get_rng_state())
