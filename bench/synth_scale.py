"""Benchmark the synthetic generator: the default small set and a large one (1M users by default).

Each size runs in its own `promptmm data synth --json` subprocess writing into a temporary folder, so the
peak RSS reported is the generator process's own. Prints one JSON object, then a markdown table.

    python bench/synth_scale.py                       # 1M users / 100k items / 20M interactions
    python bench/synth_scale.py --users 100000 --items 20000 --interactions 2000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import add_size_args, run_synth


def timed_synth(out: Path, users: int, items: int, interactions: int, modalities: str, seed: int) -> dict:
    """One generation in a fresh process; its JSON summary plus wall time and disk size."""
    t0 = time.perf_counter()
    summary = run_synth(out, users, items, interactions, modalities, seed)
    summary["process_wall_seconds"] = round(time.perf_counter() - t0, 3)
    summary["disk_mib"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1)
    return summary


def markdown(rows: dict[str, dict]) -> str:
    head = ("| set | users | items | interactions | generate s | write s | process wall s | peak RSS MiB "
            "| on disk MiB |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        n = sum(r["interactions"].values())
        lines.append(f"| {name} | {r['n_users']:,} | {r['n_items']:,} | {n:,} | {r['generate_seconds']} | "
                     f"{r['write_seconds']} | {r['process_wall_seconds']} | {r['peak_rss_mib']} | {r['disk_mib']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.add_argument("--skip-small", action="store_true", help="only the large set")
    args = p.parse_args(argv)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="promptmm-synth-bench-") as tmp:
        if not args.skip_small:
            rows["default"] = timed_synth(Path(tmp) / "small", 2000, 1000, 40000, "image:64,text:32", 0)
        rows["large"] = timed_synth(Path(tmp) / "large", args.users, args.items, args.interactions,
                                  args.modalities, args.seed)
    print(json.dumps(rows, indent=2))
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
