"""Shared bits of the benchmark scripts: locating real data, printing JSON + a markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from promptmm_dist.paths import real_dataset

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def require_real(name: str) -> Path:
    path = real_dataset(name)
    if not path.exists():
        sys.exit(f"real dataset not found at {path} (set PROMPTMM_DATA_DIR)")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, payload: dict, table: str) -> None:
    """Print JSON and the table; keep both under bench/results/ for the record."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(table + "\n")
    print(json.dumps(payload, default=float))
    print(table)
