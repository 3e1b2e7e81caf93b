"""`promptmm recommend --all` (top-K for every user with Ray Data, into Parquet) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git", "runs", "**/__pycache__", "*.egg-info"]}' \
        -- python jobs/recommend.py --model /shared/runs/tiktok --all --k 20 \
           --out /shared/recs/tiktok.parquet --num-workers 4 --exclude-val

All arguments are those of `promptmm recommend` (`promptmm recommend --help`); --address defaults to
the job's RAY_ADDRESS exactly as in jobs/pipeline.py, so the scoring actors run on that cluster. The
driver (on the job's node) reads --model and the run's dataset (or --data) and writes --out: give
paths that node can reach. The tables travel to the actors through the object store, so worker nodes
need no access to them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import main  # noqa: E402  (jobs/pipeline.py: import fallback + RAY_ADDRESS -> --address)

if __name__ == "__main__":
    raise SystemExit(main("recommend"))
