"""A finished run folder as the report reads it: metrics.json, config.yaml and each stage's
history.jsonl (teacher/, student/, lightgcn/ or mf/)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptmm_dist.errors import DataError

STAGE_ORDER = ("teacher", "student", "lightgcn", "mf")


@dataclass
class Stage:
    """One trained model of a run: its per-epoch rows and the metrics.json entry (meta)."""

    name: str
    history: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def best_epoch(self) -> int | None:
        be = self.meta.get("best_epoch")
        return int(be) if be is not None and int(be) >= 0 else None

    def val_curve(self, metric: str = "recall@20") -> tuple[list[int], list[float]]:
        rows = [r for r in self.history if metric in (r.get("val") or {})]
        return [int(r["epoch"]) for r in rows], [float(r["val"][metric]) for r in rows]

    def loss_terms(self) -> list[str]:
        keys: dict[str, None] = {}
        for r in self.history:
            keys.update({k: None for k in r if k.startswith("loss_")})
        return list(keys)

    def loss_curve(self, term: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.history if isinstance(r.get(term), (int, float))]
        return [int(r["epoch"]) for r in rows], [float(r[term]) for r in rows]


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    stages: list[Stage] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"invalid JSON: {e.msg}") from None


def read_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {n}", f"invalid JSON: {e.msg}") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise DataError(path, f"line {n}", "not an epoch record (no 'epoch' key)")
        rows.append(row)
    return rows


def stage_names(metrics: dict[str, Any]) -> list[str]:
    """Keys of metrics.json that are trained stages (an entry with val and test metrics)."""
    names = [k for k, v in metrics.items() if isinstance(v, dict) and "val" in v and "test" in v]
    return sorted(names, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))


def load_run(path: str | Path) -> Run:
    """Read a run folder; anything that is not one is a DataError naming the folder."""
    import yaml

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(folder, None, "not a run folder (no such directory)")
    if not (folder / "metrics.json").is_file():
        raise DataError(folder, None, "not a run folder (no metrics.json; was the run finished?)")
    metrics = _read_json(folder / "metrics.json")
    if not isinstance(metrics, dict):
        raise DataError(folder / "metrics.json", None, "expected a JSON object")
    config: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise DataError(folder / "config.yaml", None, f"invalid YAML: {str(e).splitlines()[0]}") from None
    stages = []
    for name in stage_names(metrics):  # a stage without history.jsonl still has its metrics row
        hist = folder / name / "history.jsonl"
        stages.append(Stage(name, read_history(hist) if hist.is_file() else [], metrics[name]))
    if not stages:
        raise DataError(folder / "metrics.json", None, "not a training run (no teacher/student/baseline "
                                                       "entry with val and test metrics)")
    return Run(folder, metrics, config if isinstance(config, dict) else {}, stages)
