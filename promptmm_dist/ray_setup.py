"""Everything about *how* a run is distributed, built in one place: Ray start-up, resource split,
ScalingConfig/RunConfig, and the report hook the worker loops call."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from promptmm_dist import ray_quiet
from promptmm_dist.cluster_checks import check_gpus_fit, check_reachable, local_cpus
from promptmm_dist.cluster_checks import check_workers_fit as check_workers_fit_cpus
from promptmm_dist.config import Config, DistConfig
from promptmm_dist.run_io import write_history, write_json

if TYPE_CHECKING:
    import torch

    from promptmm_dist.train.state import LoopState

SHARD_CPUS = 0.1  # InteractionShard actors mostly hold memory and sample
# the stage's frozen teacher (all its ranks together: a forward per cache version, prompt rounds) and
# its light ranking workers
TEACHER_MODEL_CPUS = 0.15
TEACHER_WORKER_CPUS = 0.1
STAGING_PREFIX = "promptmm-ckpt-"  # make_reporter's per-report checkpoint folders (system temp dir)
# Ray starts its workers at nice 15: beside any other busy process on the machine the Train workers
# and teacher actors then get a few percent of a core (a 0.1 s actor call took 290 s here). The
# local Ray we start runs the job itself, so its workers keep the driver's priority.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
# Faster small fits (~20 s -> ~9 s of overhead here); users can override either variable.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray(dist: DistConfig) -> None:
    """Connect to `--address`/RAY_ADDRESS when given (no num_cpus then); else start a local Ray."""
    import ray

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = dist.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("PROMPTMM_DATA_DIR", "PROMPTMM_CACHE_DIR")
                                if k in os.environ},
                   # by module path: workers import it (no pickled function through the GCS)
                   "worker_process_setup_hook": "promptmm_dist.ray_quiet.quiet_worker_process"}
    ray_quiet.quiet_warnings()  # the driver too: Train local mode runs the loops here
    if address:
        check_reachable(address, "--address" if dist.address else "RAY_ADDRESS")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        check_workers_fit_cpus(dist.num_workers, local_cpus())  # before a slow start; rechecked after
        if dist.use_gpu:
            import torch

            check_gpus_fit(dist.num_workers, torch.cuda.device_count())
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 _system_config=LOCAL_SYSTEM_CONFIG)


def check_workers_fit(dist: DistConfig) -> None:
    """One line (ConfigError) when the connected cluster has fewer CPUs (or, with `use_gpu`, GPUs) than
    Train workers asked for."""
    import ray

    resources = ray.cluster_resources()
    check_workers_fit_cpus(dist.num_workers, float(resources.get("CPU", 0.0)))
    if dist.use_gpu:
        check_gpus_fit(dist.num_workers, float(resources.get("GPU", 0.0)))


def actor_options(dist: DistConfig) -> dict:
    """Ray options of the run's rebuildable actors (shards, TeacherWorkers, Tune shared caches): a
    lost one is restarted up to `dist.max_failures` times (its constructor rebuilds it from files)
    and the calls it was running are retried on the new one (every such call is idempotent)."""
    n = int(dist.max_failures)
    return {"max_restarts": n, "max_task_retries": n}


def near(node_ids: list, j: int) -> dict:
    """Actor options placing the j-th of a set of actors on the node of `node_ids[j]` when Ray can
    (soft node affinity: elsewhere when that node is full or gone); none when the node is unknown."""
    if not node_ids or node_ids[j % len(node_ids)] is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_ids[j % len(node_ids)], soft=True)}


def shards_cover_workers(dist: DistConfig, log: Callable[[str], None]) -> None:
    """Every rank trains on whole shards, so there must be at least as many shards as ranks: raise
    `num_shards` to `num_workers` (saying so) rather than leave a rank without data."""
    if dist.num_shards < dist.num_workers:
        log(f"ray: {dist.num_workers} train workers need at least as many shards; "
            f"using {dist.num_workers} shards instead of {dist.num_shards}")
        dist.num_shards = dist.num_workers


MIN_WORKER_CPUS = 0.1  # the floor of a Train worker's share on an over-full cluster (it still starts)
# Ray's hybrid scheduling keeps a small actor on the caller's node while that node is under half used:
# the shard and teacher actors land on the driver's node when it has at least this many times their CPUs
LOCAL_AUX_FACTOR = 2.0


def requested_cpus(dist: DistConfig) -> float | None:
    """`dist.cpus_per_worker` when the user set one; None (unset or 0) means "what the nodes offer"."""
    value = dist.cpus_per_worker
    return float(value) if value is not None and value > 0 else None


def _floor(x: float, step: float = 0.01) -> float:
    """Round down (never up: a share rounded up may no longer fit its node), to Ray-friendly steps."""
    return math.floor(x / step + 1e-6) * step


def auto_cpus_per_worker(node_cpus: list[float], workers: int, aux_cpus: float,
                         driver_node: int | None = None, available: float | None = None) -> float:
    """The largest per-worker share x such that `workers` bundles of x CPUs fit the nodes (each node
    holds floor(cpus / x) of them): what a node offers divided by the ranks Ray places there.

    The shard/teacher actors (`aux_cpus` in all) are taken from the driver's node when it can hold
    them (Ray keeps small actors local), else from every node (they may land anywhere). `available`:
    the cluster's currently free CPUs, an upper bound on workers * x + aux (other jobs' holdings).
    Pure arithmetic, so the placement rule is unit-tested without a cluster."""
    workers = max(workers, 1)
    usable = [max(float(c), 0.0) for c in node_cpus]
    if driver_node is not None and usable[driver_node] >= LOCAL_AUX_FACTOR * aux_cpus:
        usable[driver_node] -= aux_cpus
    else:
        usable = [max(c - aux_cpus, 0.0) for c in usable]
    fits = lambda x: sum(int(c / x + 1e-9) for c in usable) >= workers  # noqa: E731
    candidates = sorted({_floor(c / m) for c in usable for m in range(1, workers + 1) if c > 0}, reverse=True)
    best = next((x for x in candidates if x > 0 and fits(x)), None)
    if best is None:  # the nodes cannot hold the workers whole: share what there is (as before)
        best = max(sum(usable), MIN_WORKER_CPUS * workers) / workers
    if available is not None:
        best = min(best, max(available - aux_cpus, MIN_WORKER_CPUS * workers) / workers)
    return round(max(_floor(best), MIN_WORKER_CPUS), 3)


def cluster_cpu_view() -> tuple[list[float], int | None, float]:
    """(CPUs of every alive node, index of the driver's node in that list or None, free CPUs now)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    me = ray.get_runtime_context().get_node_id()
    driver = next((k for k, n in enumerate(nodes) if n.get("NodeID") == me), None)
    available = float(ray.available_resources().get("CPU", 0.0))
    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes], driver, available


def cpus_per_worker(dist: DistConfig, n_aux_cpus: float) -> float:
    """CPUs per Train worker so workers + shard/teacher actors fit the cluster (never deadlock).

    Unset (`dist.cpus_per_worker` None or 0): each worker gets what its node offers divided by the
    ranks placed there (`auto_cpus_per_worker`); with `num_workers` 0 the loop runs in the driver and
    gets the driver node's CPUs. Set: that value, lowered to the cluster's fair share if needed."""
    import ray

    want = requested_cpus(dist)
    workers = max(dist.num_workers, 1)
    if want is None:
        nodes, driver, available = cluster_cpu_view()
        if dist.num_workers == 0 and driver is not None:
            nodes = [nodes[driver]]
            driver = 0
        return auto_cpus_per_worker(nodes, workers, n_aux_cpus, driver, available)
    total = float(ray.cluster_resources().get("CPU", 1.0))
    free = max(total - n_aux_cpus, MIN_WORKER_CPUS * workers)
    return round(min(want, _floor(free / workers, 0.001)), 3)


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a process holding `cpus` CPUs: the whole CPUs it reserved, at least one."""
    return max(1, int(math.floor(cpus + 1e-9)))


def actor_threads(default: float = 1.0) -> int:
    """Threads for the calling Ray actor/task: the CPUs Ray reserved for it (`num_cpus`), at least one;
    `default` CPUs outside Ray (a plain object in a test or a local loop)."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus is not None:
                return torch_threads(cpus)
    except Exception:  # noqa: BLE001 - not in a Ray worker (the driver): fall back to `default`
        pass
    return torch_threads(default)


def rank_device(use_gpu: bool) -> "torch.device":
    """A Train rank's device: the GPU Ray Train assigned it when the run asked for GPUs (ScalingConfig
    use_gpu; Train then sets up NCCL as the default group), else the CPU."""
    import torch

    if not use_gpu:
        return torch.device("cpu")
    from ray.train.torch import get_device

    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


PLACEMENT_FILE = "placement.json"  # in a stage's checkpoint: the node id of each rank, in rank order


def rank_nodes(world) -> list[str | None]:
    """Every rank's Ray node id in rank order (collective; CPU group). Rank 0 writes it into the stage's
    checkpoint, so the driver learns where the ranks ran whatever the filesystem."""
    import torch.distributed as dist

    from promptmm_dist.actor_calls import current_node_id
    from promptmm_dist.train.world import control_group

    mine = current_node_id()
    if world.world_size == 1:
        return [mine]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, mine, group=control_group())
    return out


def trainer_configs(cfg: Config, name: str, out: Path, cpus: float, callbacks: list | None = None):
    """ScalingConfig + RunConfig for a stage (Train V2; storage always explicit). `callbacks`: Train
    callbacks, e.g. Tune's TuneReportCallback when a Tune trial launches the trainer."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    storage = Path(cfg.dist.storage_path or (out / "ray")).resolve()
    scaling = ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                            resources_per_worker={"CPU": cpus}, placement_strategy=cfg.dist.placement)
    run = RunConfig(name=name, storage_path=str(storage),
                    checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks,
                    # a lost worker restarts the group from the latest (every-epoch) checkpoint
                    failure_config=FailureConfig(max_failures=cfg.dist.max_failures))
    return scaling, run


def flat_metrics(row: dict) -> dict:
    """Per-epoch row -> flat scalars for ray.train.report (val metrics as `val_recall@20`)."""
    flat = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    for k, v in (row.get("val") or {}).items():
        flat[f"val_{k}"] = v
    return flat


def quiet_train_reports() -> None:
    """Ray Train V2 logs every report's full metrics dict at INFO from a logger named after its source
    file; the epoch line we print already says it in one line."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray without Train V2's module layout: keep its logging as it is
        pass


def make_reporter(files: Callable[[Path, "LoopState"], None], rank: int,
                  mirror: str | None = None, initial: "LoopState | None" = None) -> Callable[[dict, object], None]:
    """Report every epoch from every rank (Train requires equal counts) with a checkpoint: rank 0's
    alone, or every rank's when the state is in row pieces (Train merges the ranks' files into one
    checkpoint folder): `files(folder, state)` writes the best weights so far (what the driver takes
    at the end) and the reporter adds the resume state (`resume.pt` and the rank's row piece, the
    latest epoch, read back by `ray.train.get_checkpoint()` after a worker-group restart or a rerun)
    and, on rank 0, the history.
    A final row (`final`) without a state reuses the last epoch's (`initial`: the state resumed
    from, for a rerun that has no epoch left to run). `mirror`: a folder where rank 0 (and each rank its piece)
    also keeps the latest resume.pt (the run folder: Train local mode keeps no checkpoint across a
    driver restart, and the driver reads the epoch to restart the KD cache at from it).

    Distributed workers upload the staging folder to storage and Train deletes it. Train local mode
    keeps the checkpoint where it is, so there a staging folder is only removed once a newer one has
    been reported, and the driver removes the last one (`release_staged_checkpoint`).
    """
    import shutil

    import ray.train

    quiet_train_reports()
    previous: list[str] = []
    last: list = [initial]

    def report(row: dict, state=None) -> None:
        metrics = flat_metrics(row)
        state = state if state is not None else last[0]
        last[0] = state
        if state is not None and (rank == 0 or state.pieces is not None):
            folder = tempfile.mkdtemp(prefix=STAGING_PREFIX)
            files(Path(folder), state)
            state.save(Path(folder))
            if rank == 0:
                write_json(Path(folder) / "epoch.json", metrics)
                write_history(Path(folder) / "history.jsonl", state.history)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             delete_local_checkpoint_after_upload=True)
            if mirror:
                state.save(Path(mirror))
            for old in previous:
                shutil.rmtree(old, ignore_errors=True)
            previous[:] = [folder]
        else:
            ray.train.report(metrics)

    return report


def release_staged_checkpoint(path: str | Path) -> None:
    """Remove a local-mode checkpoint left in its `make_reporter` staging folder, once the driver
    has copied it into the run folder (distributed runs' checkpoints live under storage_path)."""
    import shutil

    path = Path(path)
    if path.name.startswith(STAGING_PREFIX) and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)
