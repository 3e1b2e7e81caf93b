"""Run plots and summaries: every training command writes curves.png + summary.md into its run folder,
and `promptmm report RUN...` compares runs (figure + markdown table); bad input is one line, exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from promptmm_dist.cli import main
from tests.helpers import TINY_CLI, tiny_canonical

PNG = b"\x89PNG\r\n\x1a\n"
TINY = TINY_CLI


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return tiny_canonical(tmp_path_factory.mktemp("report") / "data")


@pytest.fixture(scope="module")
def two_runs(data_folder, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, tau in (("tau2", "2"), ("tau4", "4")):
        out = root / name
        assert main(["run", "--data", str(data_folder), "--out", str(out), *TINY, "--set", f"student.tau={tau}"]) == 0
        runs.append(out)
    return runs


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    raw = path.read_bytes()
    assert raw[:8] == PNG, f"{path} is not a PNG"
    img = mpimg.imread(path)
    return img.shape[1], img.shape[0]


def _table_rows(md: str, first_cell: str) -> list[list[str]]:
    """Rows of the markdown tables whose first cell is `first_cell` (or starts with it if it is '`')."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell or (first_cell == "`" and r[0].startswith("`"))]


@pytest.mark.timeout(300)
def test_run_folder_has_curves_and_a_summary_matching_metrics(two_runs):
    run = two_runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    w, h = _png_size(run / "curves.png")
    assert w > 800 and h > 200  # val recall + teacher losses + student losses side by side
    md = (run / "summary.md").read_text()
    for stage in ("teacher", "student"):
        m = metrics[stage]
        (row,) = _table_rows(md, stage)
        assert row[1] == str(m["best_epoch"]) and row[2] == str(m["epochs_run"])
        expected = [m[s][k] for s in ("val", "test") for k in ("recall@20", "ndcg@20")]
        assert [float(x) for x in row[3:7]] == pytest.approx(expected, abs=6e-5)
        hist = [json.loads(x) for x in (run / stage / "history.jsonl").read_text().splitlines()]
        assert m["val"]["recall@20"] == pytest.approx(hist[m["best_epoch"]]["val"]["recall@20"])
    # the config diff names the --set keys with their defaults, never the output folder
    from promptmm_dist.config import load_config

    defaults = load_config(data_path=load_config(run / "config.yaml").data.path)  # + the dataset's YAML
    diff = {r[0].strip("`"): r[1:] for r in _table_rows(md, "`")}
    assert diff["teacher.epochs"] == ["2", str(defaults.teacher.epochs)]
    assert diff["student.embed_dim"] == ["16", str(defaults.student.embed_dim)]
    assert "student.tau" not in diff and "out" not in diff  # --set student.tau=2 is the default
    assert "total_s" in md and "![training curves](curves.png)" in md


@pytest.mark.timeout(300)
def test_report_compares_two_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert printed.strip() == md.strip()
    w, _ = _png_size(out / "report.png")
    assert w > 800
    for run in two_runs:
        metrics = json.loads((run / "metrics.json").read_text())
        rows = {r[1]: r for r in _table_rows(md, run.name)}
        assert set(rows) == {"teacher", "student"}
        assert float(rows["student"][6]) == pytest.approx(metrics["student"]["test"]["recall@20"], abs=6e-5)
    (tau,) = [r for r in _table_rows(md, "`") if r[0] == "`student.tau`"]
    assert tau[1:] == ["2.000000", "4.000000"]


@pytest.mark.timeout(300)
def test_baseline_folder_gets_curves_of_its_model(data_folder, tmp_path):
    out = tmp_path / "mf"
    assert main(["baseline", "--model", "mf", "--data", str(data_folder), "--out", str(out), *TINY]) == 0
    _png_size(out / "curves.png")
    md = (out / "summary.md").read_text()
    (row,) = _table_rows(md, "mf")
    assert row[1] == str(json.loads((out / "metrics.json").read_text())["mf"]["best_epoch"])


@pytest.mark.timeout(60)
def test_curves_skip_epochs_without_validation(tmp_path):
    """eval_every > 1: rows without `val` draw only their losses; the selected epoch is still marked."""
    from promptmm_dist.report.command import write_run_report
    from promptmm_dist.report.runs import load_run

    val = {"recall@20": 0.1, "ndcg@20": 0.05}
    rows = [{"epoch": e, "loss_bpr": 0.7 - 0.1 * e, **({"val": {**val, "recall@20": 0.1 * e}} if e % 2 else {})}
            for e in range(5)]
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"val": val, "test": val, "best_epoch": 3, "epochs_run": 5, "train_seconds": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps({"student": meta, "timings": {"student_s": 1.5}}))
    png, md = write_run_report(tmp_path)
    _png_size(png)
    stage = load_run(tmp_path).stages[0]
    assert stage.val_curve() == ([1, 3], [0.1, pytest.approx(0.3)]) and stage.best_epoch == 3
    assert re.search(r"\| student \| 3 \| 5 \|", md.read_text())
    assert "student_s | 1.5" in md.read_text()


@pytest.mark.timeout(60)
def test_report_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    not_run = tmp_path / "empty"
    not_run.mkdir()
    half = tmp_path / "half"  # metrics.json of something else (an `evaluate` folder)
    half.mkdir()
    (half / "metrics.json").write_text(json.dumps({"val": {}, "test": {}}))
    broken = tmp_path / "broken"
    (broken / "teacher").mkdir(parents=True)
    (broken / "metrics.json").write_text(json.dumps({"teacher": {"val": {}, "test": {}}}))
    (broken / "teacher" / "history.jsonl").write_text('{"epoch": 0}\n{not json\n')
    for bad, words in [(tmp_path / "missing", "no such directory"), (not_run, "no metrics.json"),
                       (half, "not a training run"), (broken, "line 2")]:
        assert main(["report", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("promptmm: error:") and str(bad) in err[0], err
        assert words in err[0]
    assert not out.exists()
