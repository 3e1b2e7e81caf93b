"""Silence the noise every Ray run printed that says nothing to a user, each filter matched precisely.

Installed in every Ray worker process (the `worker_process_setup_hook` of the job's runtime_env, see
`ray_setup.init_ray`) and in the driver (Train local mode runs the loops there):

- Ray Train V2's PlacementGroupCleaner actor polls the State API, which needs the dashboard; a local
  Ray started without one (or several Ray instances on one machine) made it log "Failed to query Ray
  Train Controller actor state" every few seconds and, at shutdown, print a thread traceback. Its only
  job is removing a placement group if the Train controller dies uncleanly; the run's own shutdown
  removes it otherwise.
- "The given NumPy array is not writable": the sample ids a worker reads from the object store are
  read-only, zero-copy views; our loops only index with them, never write.
"""

from __future__ import annotations

import logging
import threading
import warnings

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
READ_ONLY_NUMPY = "The given NumPy array is not writable"


def quiet_warnings() -> None:
    """Drop torch's read-only-array warning, only where our own modules convert object-store arrays."""
    warnings.filterwarnings("ignore", message=READ_ONLY_NUMPY, category=UserWarning, module=r"promptmm_dist\.")


def quiet_worker_process() -> None:
    """Ray `worker_process_setup_hook`: the two filters above, in a Ray worker process."""
    quiet_warnings()
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == PG_CLEANER_THREAD:
            return  # the cleaner's State API lookup failed; the run's shutdown removes the group
        previous(args)

    threading.excepthook = hook
