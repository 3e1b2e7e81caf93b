"""`promptmm run` (teacher -> student -> test evaluation) as a Ray job.

Submit from the repository root (dashboard / Jobs API of the target cluster on port 8265):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git", "runs", "**/__pycache__", "*.egg-info"]}' \
        -- python jobs/pipeline.py --data synthetic --out /tmp/promptmm-runs/run1 \
           --num-workers 1 --num-shards 2 --set teacher.epochs=2 --set student.epochs=2 --json

With token authentication (Ray >= 2.52; see cluster/README.md) export RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH=<token file> (or RAY_AUTH_TOKEN) before `ray job submit`. --data and --out must be
paths that the node running the job can reach (absolute paths on a shared filesystem), or `synthetic`.

All arguments are those of `promptmm run` (`promptmm run --help`). Under the job supervisor RAY_ADDRESS
names the cluster's GCS; it is passed on as --address (unless given) so the run joins this cluster instead
of starting a local Ray. Run directly (`python jobs/pipeline.py ...`) without RAY_ADDRESS it runs locally.
On real data pass the recipe explicitly (`--recipe tiktok`, or a YAML file the job's node can read) unless
the data was prepared with one (`promptmm prepare SRC OUT --recipe tiktok`); it is never taken from the
folder's name.

Tracking: `--mlflow URI` logs the run to MLflow (needs the `mlflow` extra on the cluster's image); a job
whose environment sets MLFLOW_TRACKING_URI (e.g. `--runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI":
"http://mlflow:5000"}}'`) gets it as --mlflow unless one is given. A `file:` store must be on a path the
job's node can write (a shared filesystem for a multi-host cluster).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MLFLOW_COMMANDS = ("run", "tune", "train-teacher", "distill", "baseline")  # those that take --mlflow


def _argv(command: str, args: list[str]) -> list[str]:
    address = os.environ.get("RAY_ADDRESS")
    has_address = any(a == "--address" or a.startswith("--address=") for a in args)
    if address and not has_address and not address.startswith(("http://", "https://")):
        args = [*args, "--address", address]
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    has_mlflow = any(a == "--mlflow" or a.startswith("--mlflow=") for a in args)
    if tracking and not has_mlflow and command in MLFLOW_COMMANDS:
        args = [*args, "--mlflow", tracking]
    return [command, *args]


def main(command: str = "run") -> int:
    try:
        from promptmm_dist.cli import main as cli_main
    except ImportError:  # a plain checkout without the package installed: use the uploaded source
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from promptmm_dist.cli import main as cli_main
    return cli_main(_argv(command, sys.argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main("run"))
