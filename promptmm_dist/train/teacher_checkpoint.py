"""Rebuilding a trained teacher from its checkpoint folder.

Used by the local pipeline, the Ray pipeline's TeacherWorkers, Tune trials and the benchmarks, so it
lives below all of them. A teacher is always rebuilt with the settings it was *trained* with (read
from the checkpoint's config.yaml), never with the current run's: settings that do not change tensor
shapes (fusion weight, prompt rates, normalisation) would otherwise load silently and differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from promptmm_dist.config import Config, load_config
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.errors import DataError
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.paths import hard_token_dir
from promptmm_dist.run_io import load_state
from promptmm_dist.train.teacher_loop import build_teacher


def teacher_folder(folder: Path) -> Path:
    """A run folder's `teacher/` subfolder, or the folder itself when it is the checkpoint folder."""
    folder = Path(folder)
    return folder / "teacher" if (folder / "teacher").is_dir() else folder


def adopt_teacher_settings(cfg: Config, folder: Path, manifest_sha256: str | None = None) -> Path:
    """Overwrite `cfg`'s teacher-defining settings with the checkpoint's; return the checkpoint folder.

    Checks the checkpoint was trained on this dataset when both manifest hashes are known."""
    ckpt = teacher_folder(folder)
    meta_path = ckpt / "meta.json"
    if not meta_path.exists():
        raise DataError(ckpt, None, "not a teacher checkpoint folder (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("manifest_sha256") and manifest_sha256 and meta["manifest_sha256"] != manifest_sha256:
        raise DataError(ckpt, "meta.json", "teacher was trained on a different dataset (manifest hash differs)")
    saved = load_config(ckpt / "config.yaml", data_path=cfg.data.path)
    cfg.teacher = saved.teacher
    cfg.prompt.soft_token_rate = saved.prompt.soft_token_rate
    cfg.prompt.feat_soft_token_rate = saved.prompt.feat_soft_token_rate
    return ckpt


def load_teacher(data: InteractionData, cfg: Config, folder: Path) -> PromptMMTeacher:
    """The trained teacher (eval mode) of a run folder, with the settings it was trained with."""
    ckpt = adopt_teacher_settings(cfg, folder, data.manifest_sha256)
    teacher = build_teacher(data, cfg, cache_folder=hard_token_dir())
    teacher.load_state_dict(load_state(ckpt / "teacher.pt"))
    teacher.eval()
    return teacher
