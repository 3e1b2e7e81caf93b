"""What every run writes next to its checkpoints: config, metrics, timings, per-epoch history."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from promptmm_dist.config import Config


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


def save_checkpoint(folder: Path, name: str, state: dict, cfg: Config, meta: dict) -> Path:
    """`<name>.pt` (state dict only: weights, no pickled objects) + config.yaml + meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, folder / f"{name}.pt")
    (folder / "config.yaml").write_text(cfg.to_yaml())
    write_json(folder / "meta.json", meta)
    return folder / f"{name}.pt"


def load_state(path: Path) -> dict:
    """Tensors only (`weights_only=True`): a checkpoint is never unpickled as arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
