"""Small datasets and configs shared by tests (importable from test modules only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from promptmm_dist.config import Config
from promptmm_dist.data.synthetic import generate_synthetic


def tiny_data(seed: int = 0, modalities: dict[str, int] | None = None):
    return generate_synthetic(300, 150, 4000, modalities or {"image": 16, "text": 8}, seed=seed)


# `--set` flags of a tiny CLI run (2 epochs per stage, 16-d), for tests that go through `promptmm run`
TINY_CLI = ["--set", "teacher.epochs=2", "--set", "student.epochs=2", "--set", "teacher.embed_dim=16",
            "--set", "student.embed_dim=16", "--set", "teacher.batch_size=1024", "--set", "student.batch_size=1024",
            "--set", "student.neg_sample_num=4"]


def tiny_canonical(folder: Path) -> Path:
    """`tiny_data()` written in the canonical layout at `folder` (a dataset a CLI run can read)."""
    from promptmm_dist.data.prepare import ensure_canonical

    return ensure_canonical(tiny_data(), folder)


def tiny_config(**student) -> Config:
    cfg = Config()
    cfg.teacher.embed_dim = 16
    cfg.teacher.epochs = 3
    cfg.teacher.batch_size = 512
    cfg.student.embed_dim = 16
    cfg.student.epochs = 3
    cfg.student.batch_size = 512
    cfg.student.neg_sample_num = 4
    for k, v in student.items():
        setattr(cfg.student, k, v)
    return cfg


# A tiny valid PromptMM-layout dataset for the data-layer tests: 4 users, 8 items, all in train.
TRAIN = {"0": [0, 1, 2], "1": [2, 3, 4], "2": [4, 5, 6], "3": [6, 7, 0]}
VAL = {"0": [3], "1": [5]}
TEST = {"0": [4], "2": [7], "3": [1]}


def make_promptmm(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, obj in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (root / f"{name}.json").write_text(json.dumps(obj))
    rng = np.random.default_rng(0)
    np.save(root / "image_feat.npy", rng.standard_normal((8, 4)).astype(np.float32))
    np.save(root / "audio_feat.npy", rng.standard_normal((8, 3)).astype(np.float16))
    return root


def inter_lines() -> list[str]:
    lines = ["userID\titemID\trating\tx_label"]
    for label, split in enumerate((TRAIN, VAL, TEST)):
        lines += [f"{u}\t{i}\t1\t{label}" for u, items in split.items() for i in items]
    return lines


def teacher_ranks_alive(settle_s: float = 30.0) -> list[int]:
    """Pids of live TeacherRank processes of this session, after giving killed ones up to `settle_s`
    to exit (a closed group's processes take a moment to go)."""
    import time

    from promptmm_dist import faults

    deadline = time.monotonic() + settle_s
    while faults.actor_pids("teacher_model") and time.monotonic() < deadline:
        time.sleep(0.2)
    return faults.actor_pids("teacher_model")
