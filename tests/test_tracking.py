"""`--mlflow URI`: a run logged through Ray's MLflow integration and read back from a file store
(params = the flattened config, per-epoch metrics = history.jsonl, final metrics, the export);
without MLflow installed, --mlflow is one line and exit 2 before any training; sweeps: one MLflow
run per trial (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from promptmm_dist.cli import main
from tests.helpers import TINY_CLI, tiny_canonical

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[dev]')")

TINY = TINY_CLI


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return tiny_canonical(tmp_path_factory.mktemp("tracking") / "data")


def _client(store: Path):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"file:{store}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.timeout(300)
def test_run_logs_params_epochs_metrics_and_export(data_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    store, out = tmp_path / "mlruns", tmp_path / "run"
    assert main(["run", "--data", str(data_folder), "--out", str(out), *TINY, "--mlflow", f"file:{store}"]) == 0
    client = _client(store)
    exp = client.get_experiment_by_name("promptmm")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["promptmm.command"] == "run"
    config = _flat(yaml.safe_load((out / "config.yaml").read_text()))
    assert run.data.params == {k: str(v) for k, v in config.items()}
    metrics = json.loads((out / "metrics.json").read_text())
    rid = run.info.run_id
    for stage in ("teacher", "student"):
        hist = [json.loads(x) for x in (out / stage / "history.jsonl").read_text().splitlines()]
        for name, key in (("val_recall_at_20", ("val", "recall@20")), ("val_ndcg_at_20", ("val", "ndcg@20")),
                          ("loss_bpr", ("loss_bpr",))):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(rid, f"{stage}/{name}"))
            want = [(r["epoch"], r[key[0]][key[1]] if len(key) == 2 else r[key[0]]) for r in hist]
            assert logged == want, (stage, name)
        assert run.data.metrics[f"{stage}/test_recall_at_20"] == metrics[stage]["test"]["recall@20"]
        assert run.data.metrics[f"{stage}/best_epoch"] == metrics[stage]["best_epoch"]
    assert run.data.metrics["timings/total_s"] == metrics["timings"]["total_s"]
    got = Path(client.download_artifacts(rid, "student/export.npz", str(tmp_path / "dl")))
    with np.load(got) as a, np.load(out / "student" / "export.npz") as b:
        assert np.array_equal(a["user"], b["user"]) and np.array_equal(a["item"], b["item"])
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"curves.png", "summary.md", "metrics.json", "config.yaml"} <= names


@pytest.mark.timeout(60)
def test_mlflow_missing_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    import promptmm_dist.tracking  # noqa: F401  (Ray's integration module loads the real mlflow first)

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--mlflow", f"file:{tmp_path / 'mlruns'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("promptmm: error: --mlflow") and "[mlflow]" in err[0], err
    assert not out.exists()  # nothing trained, nothing written
    assert main(["tune", "--out", str(out), "--mlflow", "file:/x"]) == 2
    assert "not installed" in capsys.readouterr().err and not out.exists()


def test_metric_names_are_mlflow_legal():
    from promptmm_dist.tracking import epoch_metrics, metric_key

    assert metric_key("val_recall@20") == "val_recall_at_20"
    assert metric_key("legacy_ndcg@50") == "legacy_ndcg_at_50"
    row = {"epoch": 3, "best_epoch": 2, "loss_bpr": 0.5, "ok": True, "val": {"recall@20": 0.25, "n_users": 9}}
    assert epoch_metrics("student", row) == {"student/loss_bpr": 0.5, "student/val_recall_at_20": 0.25}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_logs_an_mlflow_run_per_trial(ray_session, data_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"sweep": {"searcher": "random", "teacher_pool": 0, "include_default": False},
                                     "student.tau": {"loguniform": [0.5, 8.0]}}))
    store, out = tmp_path / "mlruns", tmp_path / "sweep"
    assert main(["tune", "--data", str(data_folder), "--out", str(out), "--num-samples", "2", "--scheduler", "fifo",
                 "--search-space", str(space), "--seed", "7", *TINY, "--mlflow", f"file:{store}"]) == 0
    client = _client(store)
    runs = client.search_runs([client.get_experiment_by_name("promptmm").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.params["student.tau"] for r in runs}) == 2  # each trial its own run and params
    import csv

    with open(out / "trials.csv") as fh:
        trials = {float(r["student.tau"]): r for r in csv.DictReader(fh)}
    for r in runs:
        tau = float(r.data.params["student.tau"])
        assert tau in trials
        hist = client.get_metric_history(r.info.run_id, "val_recall_at_20")
        assert len(hist) == 2  # one point per epoch; the closing report is logged as selected_*
        best = max(h.value for h in hist)
        assert r.data.metrics["selected_val_recall_at_20"] == pytest.approx(best)
        assert best == pytest.approx(float(trials[tau]["val_recall@20"]))
