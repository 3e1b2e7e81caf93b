"""Training-curve figures: one run (curves.png) and several runs side by side (report.png)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from promptmm_dist.report.runs import Run, Stage

METRIC = "recall@20"
MAIN_LOSS = "loss_bpr"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed, safe in workers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write the PNG atomically (a crash never leaves half an image), then close the figure."""
    plt = pyplot()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _mark_selected(ax: Any, stage: Stage, color: Any, label: str | None = None) -> None:
    be = stage.best_epoch
    if be is None:
        return
    xs, ys = stage.val_curve(METRIC)
    if be in xs:
        ax.scatter([be], [ys[xs.index(be)]], s=90, marker="*", color=color, zorder=5, edgecolors="black",
                   linewidths=0.5, label=label)


def draw_run(run: Run, path: Path) -> Path:
    """Validation recall@20 of every stage (selected epoch starred) + each stage's loss terms."""
    plt = pyplot()
    n = 1 + len(run.stages)
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 3.5), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, st in enumerate(run.stages):
        c = colors[i % len(colors)]
        xs, ys = st.val_curve(METRIC)
        ax.plot(xs, ys, marker="o", ms=3, color=c, label=st.name)
        _mark_selected(ax, st, c, f"{st.name} selected (epoch {st.best_epoch})" if st.best_epoch is not None else None)
    ax.set_title(f"validation {METRIC}")
    _epoch_axis(ax)
    ax.set_ylabel(METRIC)
    ax.legend(fontsize=7)
    for j, st in enumerate(run.stages, 1):
        ax = axes[0][j]
        for term in st.loss_terms():
            xs, ys = st.loss_curve(term)
            ax.plot(xs, ys, marker=".", label=term.removeprefix("loss_"))
        if st.best_epoch is not None:
            ax.axvline(st.best_epoch, color="grey", ls="--", lw=1, label=f"selected epoch {st.best_epoch}")
        ax.set_title(f"{st.name} training loss terms")
        _epoch_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_comparison(runs: list[Run], labels: list[str], path: Path) -> Path:
    """A column per stage name: validation recall@20 (top) and the BPR loss (bottom), a curve per run."""
    plt = pyplot()
    names: list[str] = []
    for r in runs:
        names += [s.name for s in r.stages if s.name not in names]
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 6.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, name in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        for i, (run, label) in enumerate(zip(runs, labels)):
            st = next((s for s in run.stages if s.name == name), None)
            if st is None:
                continue
            c = colors[i % len(colors)]
            xs, ys = st.val_curve(METRIC)
            top.plot(xs, ys, marker="o", ms=3, color=c, label=label)
            _mark_selected(top, st, c)
            term = MAIN_LOSS if MAIN_LOSS in st.loss_terms() else next(iter(st.loss_terms()), None)
            if term:
                xs, ys = st.loss_curve(term)
                bottom.plot(xs, ys, marker=".", color=c, label=f"{label} ({term.removeprefix('loss_')})")
        top.set_title(f"{name}: validation {METRIC} (* = selected epoch)", fontsize=9)
        bottom.set_title(f"{name}: training loss", fontsize=9)
        for ax in (top, bottom):
            _epoch_axis(ax)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
