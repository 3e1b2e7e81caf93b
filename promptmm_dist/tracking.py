"""MLflow tracking (`--mlflow URI`) through Ray's MLflow integration (`ray.air.integrations.mlflow`).

A training command logs one MLflow run once its run folder is complete (`setup_mlflow` on the driver,
for the local and the Ray paths alike): the flattened config as params, every epoch of every stage's
history.jsonl (step = epoch, names prefixed by the stage), the final metrics and timings, and the
exported student, curves.png, summary.md, metrics.json as artifacts. A sweep logs one MLflow run per
trial with `MLflowLoggerCallback` on the Tune driver. MLflow is an optional extra; a `file:` store
works offline.

MLflow metric names may not contain '@': `recall@20` is logged as `recall_at_20`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.air.integrations.mlflow import MLflowLoggerCallback

from promptmm_dist.errors import ConfigError

INSTALL_HINT = "pip install 'promptmm_dist[mlflow]' (or pip install mlflow-skinny)"
DEFAULT_EXPERIMENT = "promptmm"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def require_mlflow(uri: str) -> None:
    """Fail before any training when --mlflow cannot work (one line, exit 2)."""
    if not uri or not uri.strip():
        raise ConfigError("--mlflow: give a tracking URI, e.g. file:/tmp/mlruns or http://host:5000")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"--mlflow {uri}: MLflow is not installed; {INSTALL_HINT}") from None
    if urlparse(uri).scheme in ("", "file"):
        # MLflow >= 3.7 refuses the file store unless this is set; the user asked for one explicitly
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def metric_key(name: str) -> str:
    """An MLflow-legal metric name: `val_recall@20` -> `val_recall_at_20`."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name.replace("@", "_at_"))


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def epoch_metrics(stage: str, row: dict[str, Any]) -> dict[str, float]:
    """One history.jsonl row as `<stage>/<name>` metrics (losses, seconds, validation metrics)."""
    out = {f"{stage}/{metric_key(k)}": float(v) for k, v in row.items()
           if _numeric(v) and k not in ("epoch", "best_epoch")}
    out.update({f"{stage}/val_{metric_key(k)}": float(v) for k, v in (row.get("val") or {}).items()
                if _numeric(v) and k != "n_users"})
    return out


def final_metrics(metrics: dict[str, Any], stages: list[str]) -> dict[str, float]:
    """Selected-epoch val/test metrics per stage, timings and parameter counts."""
    out: dict[str, float] = {}
    for st in stages:
        m = metrics[st]
        for split, prefix in (("val", "selected_val"), ("test", "test")):
            out.update({f"{st}/{prefix}_{metric_key(k)}": float(v) for k, v in (m.get(split) or {}).items()
                        if _numeric(v) and k != "n_users"})
        out.update({f"{st}/{k}": float(m[k]) for k in ("best_epoch", "epochs_run", "train_seconds")
                    if _numeric(m.get(k))})
    for section in ("timings", "params"):
        out.update({f"{section}/{metric_key(k)}": float(v) for k, v in (metrics.get(section) or {}).items()
                    if _numeric(v)})
    return out


def log_run(out: str | Path, metrics: dict[str, Any], uri: str, command: str) -> str:
    """Log a finished run folder as one MLflow run; returns the MLflow run id."""
    from ray.air.integrations.mlflow import setup_mlflow

    from promptmm_dist.report.runs import load_run
    from promptmm_dist.report.summary import flatten

    require_mlflow(uri)
    run = load_run(out)
    mlflow = setup_mlflow(flatten(run.config), tracking_uri=uri, experiment_name=experiment_name(),
                          run_name=run.name, create_experiment_if_not_exists=True,
                          tags={"promptmm.command": command, "promptmm.run_folder": str(run.path.resolve()),
                                "promptmm.mode": str(metrics.get("mode", "local"))})
    run_id = mlflow.active_run().info.run_id
    status = "FAILED"
    try:
        for st in run.stages:
            for row in st.history:
                mlflow.log_metrics(epoch_metrics(st.name, row), step=int(row["epoch"]))
        mlflow.log_metrics(final_metrics(metrics, [s.name for s in run.stages]))
        for st in run.stages:
            export = run.path / st.name / "export.npz"
            if export.is_file():
                mlflow.log_artifact(str(export), artifact_path=st.name)
        for name in ("metrics.json", "config.yaml", "summary.md", "curves.png"):
            if (run.path / name).is_file():
                mlflow.log_artifact(str(run.path / name))
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
    log(f"mlflow: logged run {run_id} (experiment {experiment_name()!r}) to {uri}")
    return run_id


class TrialMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflowLoggerCallback (one MLflow run per Tune trial, params = the trial's searched keys)
    with MLflow-legal metric names; a trial's closing report (the selected epoch, `final`) is logged
    as `selected_*` instead of as one more epoch. Step = Tune's training_iteration (epoch + 1)."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        from promptmm_dist.report.summary import flatten

        final = bool(result.get("final"))
        renamed = {}
        for k, v in flatten(result).items():
            if k.startswith("config."):  # the trial's params, logged as such
                continue
            key = metric_key(k)
            if final and (key.startswith("val_") or key == "epoch"):
                key = f"selected_{key}"
            renamed[key] = v
        super().log_trial_result(iteration, trial, renamed)


def tune_callbacks(uri: str | None, sweep_folder: Path) -> list:
    """[MLflowLoggerCallback] for `promptmm tune --mlflow URI`, [] without --mlflow."""
    if not uri:
        return []
    require_mlflow(uri)
    return [TrialMLflowCallback(tracking_uri=uri, experiment_name=experiment_name(),
                                tags={"promptmm.command": "tune", "promptmm.sweep": str(sweep_folder)})]
