"""Rerunning a command into the same --out resumes it: which stages are finished (reused), which
one continues from its latest epoch, and `--restart` clearing both.

A stage is reusable only when what it was trained from is the same: the config sections that affect
it (`stage_fingerprint`), the dataset's manifest hash and, for the student, the teacher checkpoint's
bytes. The fingerprint is written to `<out>/<stage>/stage.json` when the stage starts, so a partial
stage (its `resume.pt`, or Ray Train's run snapshot under `<out>/ray/<stage>`) is only continued
under the same settings; otherwise it is cleared and the stage starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from promptmm_dist.config import Config
from promptmm_dist.run_io import write_json
from promptmm_dist.train.row_pieces import PIECES_KEY, piece_path
from promptmm_dist.train.state import RESUME_FILE, LoopState

STAGE_FILE = "stage.json"
# config sections each stage's result depends on (dist: the sample order and DDP world size)
STAGE_SECTIONS = {"teacher": ("teacher", "prompt"), "student": ("teacher", "prompt", "student")}


def state_sha256(state: dict) -> str:
    """Hash of a state dict's tensors (the teacher a student is distilled from)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """Hash of a checkpoint's files (its .pt and its row pieces), streamed: the Ray driver identifies
    the teacher a student is distilled from without loading its tables."""
    path = Path(path)
    mark = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(PIECES_KEY)
    files = [path] + ([piece_path(path.parent, path.stem, r) for r in range(mark["n"])] if mark else [])
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def stage_fingerprint(cfg: Config, stage: str, manifest: str | None, teacher_state: dict | None = None,
                      teacher_sha256: str | None = None) -> dict:
    d = cfg.to_dict()
    fp = {"seed": d["seed"], "data": {k: v for k, v in d["data"].items() if k != "path"},
          "manifest_sha256": manifest,
          "dist": {"num_workers": d["dist"]["num_workers"], "num_shards": d["dist"]["num_shards"],
                   "ray": _uses_ray(cfg)}}
    for section in STAGE_SECTIONS.get(stage, ("teacher", "prompt", "student")):
        fp[section] = d[section]
    if teacher_state is not None:
        fp["teacher_sha256"] = state_sha256(teacher_state)
    if teacher_sha256 is not None:
        fp["teacher_sha256"] = teacher_sha256
    return json.loads(json.dumps(fp, default=str))


def _uses_ray(cfg: Config) -> bool:
    from promptmm_dist.pipeline import uses_ray

    return uses_ray(cfg)


def _saved(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


def stage_finished(folder: Path, fingerprint: dict, weights: str) -> bool:
    """The stage's final files exist and were made from the same inputs."""
    return (_saved(folder) == fingerprint and (folder / "meta.json").exists()
            and (folder / weights).exists() and (folder / "done").exists())


def begin_stage(folder: Path, fingerprint: dict, ray_storage: Path | None = None) -> Path | None:
    """Before a stage trains: keep its partial state when the inputs match (returns the resume.pt
    to continue from, or None), else clear it (and its Ray run snapshot) and record the inputs."""
    if _saved(folder) == fingerprint and not (folder / "done").exists():
        resume = folder / RESUME_FILE
        return resume if resume.exists() else None
    clear_stage(folder, ray_storage)
    write_json(folder / STAGE_FILE, fingerprint)
    return None


def finish_stage(folder: Path) -> None:
    """Mark the stage finished (after its meta.json and weights are written)."""
    (folder / "done").write_text("")


def clear_stage(folder: Path, ray_storage: Path | None = None) -> None:
    """Forget a stage: its folder (weights, resume state, progress) and its Ray Train run folder."""
    for path in (folder, ray_storage, folder.parent / "progress" / folder.name):
        if path is not None and path.exists():
            shutil.rmtree(path)


class StageRun:
    """One stage of a run in `folder`: reuse it when finished, else continue or start it. The local
    mode saves `resume.pt` into the folder after every epoch (`report`); Ray mode keeps its resume
    state in Train's checkpoints under `ray_storage` and reads this folder's only on a local-mode rerun."""

    def __init__(self, folder: Path, fingerprint: dict, weights: str, ray_storage: Path | None = None) -> None:
        self.folder, self.fingerprint, self.weights, self.ray_storage = folder, fingerprint, weights, ray_storage
        self.finished = stage_finished(folder, fingerprint, weights)
        self.resume_path = None if self.finished else begin_stage(folder, fingerprint, ray_storage)

    @property
    def progress_dir(self) -> str:
        return str(self.folder.parent / "progress" / self.folder.name)

    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    def report(self, row: dict, state: LoopState) -> None:
        state.save(self.folder)

    def loop_kwargs(self) -> dict:
        """report/resume/progress_dir for fit_teacher / fit_student in this process."""
        resume = LoopState.load(self.resume_path) if self.resume_path is not None else None
        return {"report": self.report, "resume": resume, "progress_dir": self.progress_dir}

    def finish(self) -> None:
        finish_stage(self.folder)

    def restart(self) -> None:
        """Drop the partial state and start the stage over."""
        clear_stage(self.folder, self.ray_storage)
        write_json(self.folder / STAGE_FILE, self.fingerprint)
        self.resume_path = None


def clear_run(out: Path) -> None:
    """`--restart`: every stage folder of the run (those with a stage.json), the Ray Train storage
    and the progress records; config, metrics and the lock stay."""
    for sub in out.iterdir() if out.is_dir() else []:
        if sub.is_dir() and (sub / STAGE_FILE).exists():
            shutil.rmtree(sub)
    for sub in (out / "ray", out / "progress"):
        if sub.exists():
            shutil.rmtree(sub)


# ------------------------------------------------------------------------------------ Ray mode

def ray_storage(cfg: Config, out: Path, stage: str) -> Path:
    """Ray Train's folder of a stage (RunConfig storage_path / name, as in ray_setup.trainer_configs)."""
    return Path(cfg.dist.storage_path or (out / "ray")).resolve() / stage


def _load_any(path: Path) -> LoopState | None:
    try:
        return LoopState.load(path)
    except Exception:  # noqa: BLE001 - a checkpoint being uploaded when the driver died: skip it
        return None


def latest_resume(stage: StageRun) -> tuple[LoopState | None, Path | None]:
    """The furthest resume state of a Ray stage: rank 0's mirror in the stage folder and every
    checkpoint Train kept in storage (Train restores its own latest one on rerun; the driver needs to
    know which epoch that is to start the KD cache there)."""
    if stage.resume_path is None and not (stage.folder / STAGE_FILE).exists():
        return None, None
    candidates = [stage.folder / RESUME_FILE]
    if stage.ray_storage is not None and stage.ray_storage.is_dir():
        candidates += sorted(stage.ray_storage.glob(f"checkpoint_*/{RESUME_FILE}"))
    best: tuple[LoopState | None, Path | None] = (None, None)
    for path in candidates:
        state = _load_any(path) if path.exists() else None
        if state is not None and state.complete() and (best[0] is None or state.next_epoch > best[0].next_epoch):
            best = (state, path)
    return best


def ray_loop_config(stage: StageRun, path: Path | None) -> dict:
    """What a Train loop needs to resume and to report progress (see train.state.latest_state)."""
    return {"resume_from": str(path) if path is not None else None, "resume_mirror": str(stage.folder),
            "progress_dir": stage.progress_dir}


def save_prompt(folder: Path, prompt) -> None:
    """Each cache version's prompt (a PromptState), so a rerun's TeacherWorkers can continue it."""
    target = folder / "prompts"
    target.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target, suffix=".pt.tmp")
    os.close(fd)
    torch.save({"version": prompt.version, "state": prompt.state, "optimizer": prompt.optimizer}, tmp)
    os.replace(tmp, target / f"v{prompt.version}.pt")


def load_prompt(folder: Path, version: int):
    """The PromptState of `version` (None for version 0: the teacher checkpoint's prompt); raises
    FileNotFoundError when a later version was not saved."""
    from promptmm_dist.distill.teacher_model import PromptState

    if version == 0:
        return None
    got = torch.load(folder / "prompts" / f"v{version}.pt", map_location="cpu", weights_only=True)
    return PromptState(int(got["version"]), got["state"], got["optimizer"])
