"""Entry points: `write_run_report` (called by every training command once metrics.json is written)
and `promptmm report RUN [RUN ...]`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from promptmm_dist.report.figures import draw_comparison, draw_run
from promptmm_dist.report.runs import Run, load_run
from promptmm_dist.report.summary import comparison, run_summary


def write_text(path: Path, text: str) -> None:
    """Atomic text write (never half a summary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_run_report(out: str | Path) -> tuple[Path, Path]:
    """curves.png + summary.md in a finished run folder."""
    run = load_run(out)
    png = draw_run(run, run.path / "curves.png")
    md = run.path / "summary.md"
    write_text(md, run_summary(run, png.name))
    return png, md


def labels_for(runs: list[Run], given: list[str]) -> list[str]:
    """Folder names, or the paths as given when two runs share a folder name."""
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(g) for g in given]


def report_command(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]  # every input is checked before anything is written
    labels = labels_for(runs, args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = draw_comparison(runs, labels, out / "report.png")
    text = comparison(runs, labels, png.name)
    write_text(out / "report.md", text)
    print(text)
    print(f"report: {out / 'report.md'}, {png}", file=sys.stderr)
    return 0
