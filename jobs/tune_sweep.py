"""`promptmm tune` (Ray Tune sweep over prompt / KD hyper-parameters) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git", "runs", "**/__pycache__", "*.egg-info"]}' \
        -- python jobs/tune_sweep.py --data synthetic --out /tmp/promptmm-runs/tune1 \
           --num-samples 8 --scheduler asha --num-workers 1 --json

All arguments are those of `promptmm tune` (`promptmm tune --help`); --address defaults to the job's
RAY_ADDRESS and --mlflow to its MLFLOW_TRACKING_URI (one MLflow run per trial) exactly as in
jobs/pipeline.py. Tune's trial folders and results go under --out, which must be
on storage the job's node can write (a shared filesystem for a multi-host cluster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import main  # noqa: E402  (jobs/pipeline.py: import fallback + RAY_ADDRESS -> --address)

if __name__ == "__main__":
    raise SystemExit(main("tune"))
