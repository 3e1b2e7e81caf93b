"""`promptmm tune`: a Ray Tune sweep over the prompt and distillation hyper-parameters.

Driver side: load the data once, start the shared pieces (shard actors, the graph and data in the
object store, the `TeacherHub`), run the Tuner (searcher: Optuna TPE or random; scheduler: ASHA on
validation recall@20 every epoch, or FIFO), then select the best trial on validation, re-evaluate its
checkpoint on test and write trials.csv, best_config.yaml, summary.md, plots and metrics.json.

Resources (never a deadlock, whatever the cluster): a trial's driver takes 0.01 CPU (it only waits);
each trial's Train workers take `cpus_per_worker` each; concurrency K and the CPUs per worker are
derived so that K trials' workers fit the cluster at once; every shared actor (hub, shard actors,
caches, cache directories, prompt-round teachers) takes 0 CPUs. Teachers are trained by the hub on
behalf of a waiting trial, with that trial's share of the CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from promptmm_dist import ray_setup
from promptmm_dist.config import Config
from promptmm_dist.errors import ConfigError
from promptmm_dist.tune import space as S
from promptmm_dist.tune.hub import NAMESPACE, TeacherHub
from promptmm_dist.tune.trial import METRIC, GracefulASHA, run_trial

TRIAL_CPU = 0.01  # a trial's own actor: it only launches the trainer and waits (Tune needs > 0)
STATE = "sweep.json"
EXPERIMENT = "tune"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hub_name(out: Path) -> str:
    return "promptmm-tune-hub-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- resources

def plan_resources(cfg: Config, total_cpus: float, total_gpus: float, num_samples: int,
                   max_concurrent: int | None) -> dict[str, Any]:
    """Trials run at once (K) and CPUs per Train worker so that K trials fit the cluster together:
    K * (TRIAL_CPU + workers * cpus_per_worker) <= total CPUs."""
    workers = max(1, cfg.dist.num_workers)
    want = max(ray_setup.requested_cpus(cfg.dist) or 1.0, 0.01)  # unset: a CPU each, trials side by side
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError("--max-concurrent must be >= 1")
    k = max_concurrent or max(1, int(math.floor(total_cpus / (workers * want) + 1e-9)))
    if cfg.dist.use_gpu:
        k = min(k, max(1, int(total_gpus // workers)))
    k = max(1, min(k, num_samples))
    cpus = math.floor((total_cpus - k * TRIAL_CPU) / (k * workers) * 100) / 100
    cpus = min(want, cpus)
    if cpus < 0.01:
        raise ConfigError(f"{k} concurrent trials x {workers} Train workers do not fit in {total_cpus:g} CPUs; "
                          f"lower --max-concurrent or --num-workers")
    return {"max_concurrent": k, "workers": workers, "cpus_per_worker": cpus, "trial_cpu": TRIAL_CPU,
            "total_cpus": total_cpus}


# -------------------------------------------------------------------------------------- command

def tune_command(args: argparse.Namespace) -> int:
    import ray

    from promptmm_dist import ray_setup
    from promptmm_dist.pipeline import config_from_args, finish

    if args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    cfg = config_from_args(args)
    out = Path(cfg.out).resolve()
    state_path, tune_dir = out / STATE, out / EXPERIMENT
    space, state = _space_and_state(args, cfg, out, state_path, tune_dir)
    started = not ray.is_initialized()
    ray_setup.init_ray(cfg.dist)
    import contextlib

    # --json: stdout carries the metrics object only (Tune's progress tables go to stderr)
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            metrics = _sweep(args, cfg, out, space, state)
    finally:
        if started:
            ray.shutdown()
    rc = finish(out, metrics, args)
    return 130 if metrics.get("sweep", {}).get("interrupted") else rc


def _space_and_state(args, cfg: Config, out: Path, state_path: Path, tune_dir: Path):
    """Validate everything that can be checked before Ray starts (bad input: one line, exit 2)."""
    resuming = bool(args.resume) and state_path.exists()
    if resuming:
        state = json.loads(state_path.read_text())
        space = S.parse_space(state["space"], str(state_path))
        if args.search_space:
            log(f"tune: --resume uses the sweep's saved search space ({state_path}), not {args.search_space}")
        return space, state
    if tune_dir.exists() and any(tune_dir.glob("experiment_state*.json")):
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --out")
    if args.resume:
        log(f"tune: nothing to resume in {out}; starting a new sweep")
    space = S.load_space(args.search_space)
    return space, None


def _sweep(args, cfg: Config, out: Path, space: S.SearchSpace, state: dict | None) -> dict:
    import ray
    from ray import tune

    from promptmm_dist.data.dataset import DatasetInfo
    from promptmm_dist.data.formats import canonical_info, load_dataset
    from promptmm_dist.data.shards import make_shard_actors
    from promptmm_dist.partition.setup import dataset_spec

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        base = S.apply_overrides(cfg.to_dict(), space.constants)
        pool = S.teacher_pool(space, base, base.seed)
        num_samples = int(args.num_samples)
        scheduler_name = args.scheduler
        state = {"version": 1, "base": base.to_dict(), "space": space.to_dict(), "pool": pool,
                 "num_samples": num_samples, "scheduler": scheduler_name,
                 "searcher": space.options["searcher"], "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    else:
        base = S.apply_overrides(state["base"], {})
        pool, num_samples, scheduler_name = state["pool"], int(state["num_samples"]), state["scheduler"]
    base.out = str(out)
    (out / "config.yaml").write_text(base.to_yaml())
    # a prepared folder is known by its manifest alone; another source is prepared once (then dropped)
    data = (canonical_info(base.data.path, base.data.modalities) if base.data.format in ("auto", "canonical")
            else None) or load_dataset(base.data.path, base.data.format, base.data.modalities)

    resources = ray.cluster_resources()
    plan = plan_resources(base, float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0)),
                          num_samples, state.get("plan", {}).get("max_concurrent") or args.max_concurrent)
    plan["cache_keep_mb"] = float(space.options["cache_keep_mb"])
    plan["max_idle_caches"] = max(2, len(pool))  # a pool's teachers stay loaded between their trials
    state["plan"] = plan
    from promptmm_dist.run_io import write_json
    write_json(out / STATE, state)
    if cfg.dist.num_workers < 1:
        log("tune: trials run Ray Train with 1 worker (Train local mode cannot run inside a Tune trial)")
    log(f"tune: {num_samples} trials, at most {plan['max_concurrent']} at once, each {plan['workers']} Train "
        f"worker(s) x {plan['cpus_per_worker']} CPU (+{TRIAL_CPU} for the trial) on {plan['total_cpus']:g} CPUs; "
        f"search space {space.source}: {', '.join(space.student_keys + space.teacher_keys)}"
        + (f"; teacher-stage keys from a pool of {len(pool)} settings" if pool else ""))

    # shared once by every trial: the shard actors and the hub. The driver keeps the data's identity
    # and sizes only: shards, ranks and teacher ranks read the canonical files themselves
    dataset = dataset_spec(data, base.data.path, out)
    data = DatasetInfo(data.name, data.n_users, data.n_items, list(data.modalities), data.manifest_sha256)
    parquet = Path(dataset["dir"]) / "interactions.parquet"
    shards = make_shard_actors(parquet, base.dist.num_shards, data.n_users, data.n_items, cpus=0)
    info = ray.get([s.info.remote() for s in shards])
    name = hub_name(out)
    total_pairs = int(sum(i["train_pairs"] for i in info))
    hub = ray.remote(num_cpus=0, max_concurrency=64)(TeacherHub).options(
        name=name, namespace=NAMESPACE).remote(data, {"shards": shards, "dataset": dataset, "total_pairs": total_pairs},
                                               str(out / "teachers"), plan)
    ray.get(hub.info.remote())
    spec = {"hub": name, "plan": plan, "pool": pool, "base": base.to_dict(), "manifest": data.manifest_sha256,
            "folder": str(out), "shards": shards, "dataset": dataset, "total_pairs": total_pairs}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"CPU": TRIAL_CPU})
    point = S.default_point(space, pool, base) if space.options["include_default"] else None
    try:
        results = _run_tuner(args, trainable, space, pool, base, point, num_samples, scheduler_name, plan, out, name)
        hub_stats = ray.get(hub.stats.remote())
        ray.get(hub.shutdown.remote())
        from promptmm_dist.tune import report

        metrics = report.write_reports(out, results, space, pool, base, data.manifest_sha256, hub_stats,
                                       point, plan, state, time.perf_counter() - t0)
    finally:
        ray.kill(hub)
        for s in shards:
            ray.kill(s)
    return metrics


def _run_tuner(args, trainable, space: S.SearchSpace, pool, base: Config, point, num_samples: int,
               scheduler_name: str, plan: dict, out: Path, hub: str):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    path = out / EXPERIMENT
    verbose = 0 if getattr(args, "json", False) else 1
    if args.resume and tune.Tuner.can_restore(str(path)):
        log(f"tune: resuming {path} (finished trials are kept; unfinished and errored ones rerun)")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    epochs = base.student.epochs
    if scheduler_name == "asha":
        grace = int(space.options["grace_period"]) or max(1, epochs // 8)
        scheduler = GracefulASHA(hub, protect=[point] if point else None, time_attr="training_iteration",
                                 max_t=epochs, grace_period=min(grace, epochs),
                                 reduction_factor=float(space.options["reduction_factor"]))
    else:
        scheduler = FIFOScheduler()
    search = _searcher(space.options["searcher"], point, base.seed, plan["max_concurrent"])
    from ray.tune.search import Searcher

    kind_is_searcher = isinstance(search, Searcher)
    tuner = tune.Tuner(
        trainable, param_space=S.param_space(space, pool),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=plan["max_concurrent"] if kind_is_searcher else None),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=_tracking_callbacks(args, out)))
    return tuner.fit()


def _tracking_callbacks(args, out: Path) -> list:
    """`--mlflow URI`: Ray's MLflowLoggerCallback, one MLflow run per trial (promptmm_dist.tracking)."""
    if not getattr(args, "mlflow", None):
        return []
    from promptmm_dist.tracking import tune_callbacks

    return tune_callbacks(args.mlflow, out)


def _searcher(kind: str, point: dict | None, seed: int, max_concurrent: int):
    """Optuna's TPE (a Searcher: Tune wraps it in a ConcurrencyLimiter for max_concurrent_trials) or
    Ray's random BasicVariantGenerator (which takes the limit itself)."""
    points = [point] if point else None
    if kind == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            return OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=seed))
        except ImportError:
            log("tune: optuna is not installed; using random search (pip install optuna for TPE)")
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=seed, max_concurrent=max_concurrent)
