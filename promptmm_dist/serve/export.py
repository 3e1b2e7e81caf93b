"""Reading a student export (two embedding tables) and checking it against a dataset, so that a
damaged file or a model from another dataset ends in one line instead of a traceback."""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.errors import DataError

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive (empty archives start PK\x05\x06)
NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Export:
    """The user/item tables of an exported student and the file they came from."""

    user: np.ndarray
    item: np.ndarray
    path: Path

    def run_folders(self) -> list[Path]:
        """The export's folder, and the run folder above it when the export sits in a stage folder
        (`RUN/student/export.npz`, or any `RUN/<stage>/export.npz` next to its meta.json)."""
        folder = self.path.parent
        in_stage = folder.name == "student" or (folder / "meta.json").exists()
        return [folder, folder.parent] if in_stage else [folder]


def find_export(path: str | Path) -> Path:
    p = Path(path)
    for candidate in (p, p / "export.npz", p / "student" / "export.npz"):
        if candidate.is_file():
            return candidate
    if not p.exists():
        raise DataError(p, None, "not found (expected a run folder or a student export.npz)")
    raise DataError(p, None, "no export.npz found (expected a run folder or a student export)")


def load_export(path: str | Path) -> Export:
    """Tables from `export.npz` (a run folder, its student/ folder, or the file itself); never unpickles."""
    npz = find_export(path)
    with open(npz, "rb") as fh:
        head = fh.read(8)
    if head.startswith(NPY_MAGIC):
        raise DataError(npz, None, "a single NumPy .npy array, not a student export (.npz with 'user' and 'item')")
    if not head.startswith(ZIP_MAGIC):
        kind = "an empty file" if not head else "not a NumPy .npz archive"
        raise DataError(npz, None, f"{kind} (a student export is a zip of 'user' and 'item' tables)")
    try:
        with np.load(npz, allow_pickle=False) as z:
            missing = [key for key in ("user", "item") if key not in z.files]
            if missing:
                raise DataError(npz, None, f"no {missing[0]!r} table in the archive (has {', '.join(z.files) or 'nothing'})")
            user, item = z["user"], z["item"]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise DataError(npz, None, f"truncated or corrupt .npz archive ({err})") from None
    _check_tables(npz, user, item)
    return Export(user, item, npz)


def _check_tables(npz: Path, user: np.ndarray, item: np.ndarray) -> None:
    for name, table in (("user", user), ("item", item)):
        if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
            raise DataError(npz, name, f"expected a 2-D float table, got shape {table.shape} dtype {table.dtype}")
        if not np.isfinite(table).all():
            raise DataError(npz, name, "table holds NaN or infinite values")
    if user.shape[1] != item.shape[1]:
        raise DataError(npz, None, f"user ({user.shape[1]}) and item ({item.shape[1]}) embedding sizes differ")


def run_data_source(export: Export) -> tuple[str, str, Path]:
    """(data.path, data.format, config file) the run that wrote this export was trained on."""
    for folder in export.run_folders():
        cfg_file = folder / "config.yaml"
        if cfg_file.is_file():
            try:
                data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}
            except (yaml.YAMLError, AttributeError):
                raise DataError(cfg_file, None, "not a run config (invalid YAML); pass --data") from None
            if isinstance(data, dict) and data.get("path"):
                return str(data["path"]), str(data.get("format") or "auto"), cfg_file
    raise DataError(export.path, None, "no run folder (config.yaml) beside this export names its dataset; "
                                       "pass --data DATASET so the users' training items are masked")


def run_manifest(export: Export) -> tuple[str, Path] | None:
    """The dataset hash recorded in the stage's meta.json, when there is one."""
    meta = export.path.parent / "meta.json"
    if not meta.is_file():
        return None
    try:
        sha = json.loads(meta.read_text()).get("manifest_sha256")
    except (json.JSONDecodeError, AttributeError):
        return None
    return (str(sha), meta) if sha else None


def check_matches(export: Export, data: InteractionData, data_path: str) -> None:
    """The model must come from this dataset: same table sizes and, when recorded, the same hash."""
    n_users, n_items = len(export.user), len(export.item)
    if (n_users, n_items) != (data.n_users, data.n_items):
        raise DataError(export.path, None, f"model has {n_users} users x {n_items} items but {data_path} has "
                                           f"{data.n_users} x {data.n_items}: a model from another dataset")
    recorded = run_manifest(export)
    if recorded and data.manifest_sha256 and recorded[0] != data.manifest_sha256:
        raise DataError(recorded[1], "manifest_sha256", f"the model was trained on another dataset than "
                                                        f"{data_path} (content hash differs)")
