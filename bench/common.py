"""Shared bits of the benchmark scripts: locating real data, printing JSON + a markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
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


def add_size_args(p: argparse.ArgumentParser) -> None:
    """The synthetic scale set's sizes (default: 1M users, 100k items, 20M interactions, 2 modalities)."""
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--modalities", default="image:64,text:32")
    p.add_argument("--seed", type=int, default=0)


def run_synth(out: Path, users: int, items: int, interactions: int, modalities: str, seed: int) -> dict:
    """`promptmm data synth OUT --json` in its own process (its peak RSS is its own); its summary."""
    cmd = [sys.executable, "-m", "promptmm_dist", "data", "synth", str(out), "--users", str(users),
           "--items", str(items), "--interactions", str(interactions), "--modalities", modalities,
           "--seed", str(seed), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH_DIR.parent)
    if proc.returncode != 0:
        raise SystemExit(f"synth failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_data(folder: Path, users: int, items: int, interactions: int, modalities: str, seed: int) -> dict:
    """The synthetic canonical folder (generated in a subprocess when missing); its manifest."""
    from promptmm_dist.data.formats import read_manifest

    if not (folder / "manifest.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {users:,} users / {items:,} items / {interactions:,} interactions into {folder}",
              file=sys.stderr, flush=True)
        run_synth(folder, users, items, interactions, modalities, seed)
    return read_manifest(folder)


def synthetic_spec(args: argparse.Namespace) -> tuple[str, Path, dict]:
    """(sizes name, folder, dataset spec) of the synthetic set `add_size_args` describes, generated
    when missing (`args.data_dir`, else runs/scale-data/<sizes>); the spec is what ranks and teacher
    actors are given (`partition.setup.dataset_spec`: paths and sizes, no rows)."""
    sizes = (f"u{args.users}-i{args.items}-n{args.interactions}-"
             f"{args.modalities.replace(':', '').replace(',', '-')}-s{args.seed}")
    folder = Path(args.data_dir) if getattr(args, "data_dir", None) else BENCH_DIR.parent / "runs" / "scale-data" / sizes
    manifest = ensure_data(folder, args.users, args.items, args.interactions, args.modalities, args.seed)
    spec = {"dir": str(folder.resolve()), "n_users": manifest["n_users"], "n_items": manifest["n_items"],
            "modalities": list(manifest["modalities"]), "name": folder.name,
            "manifest_sha256": manifest.get("content_sha256", "")}
    return sizes, folder, spec
