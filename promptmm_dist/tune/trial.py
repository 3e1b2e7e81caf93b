"""What runs inside one Tune trial, and the scheduler that stops trials cleanly.

A trial resolves its config, gets its teacher from the hub (trained once per teacher-stage setting),
joins the shared version-0 soft-ranking cache of that teacher and launches its own student
`TorchTrainer`; per-epoch metrics reach Tune through `TuneReportCallback` (Train V2 has no
`Tuner(trainer)`; Train local mode cannot run inside a Tune trial, so trials use >= 1 Train worker).

Stopping: when ASHA stops a trial, Tune would kill the trial actor, and with it the Train controller
before it removes its worker placement group (placement groups outlive the actor that created them,
and Train's cleanup actor needs the dashboard's state API). On a small cluster the leaked CPUs
starve later trials. `GracefulASHA` therefore turns ASHA's STOP into a request: the trial's cache
directory ends training before the next epoch on every rank, the trainer returns normally and its
workers are released.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from promptmm_dist.tune import space as S
from promptmm_dist.tune.hub import NAMESPACE, TRAIN_START_ENV, SharedCacheProducer

METRIC = "val_recall@20"
DONE = "trial.json"  # written by a trial that returned (stopped by ASHA or not)


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable (`spec` comes through `tune.with_parameters`)."""
    import ray
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from promptmm_dist import ray_setup
    from promptmm_dist.actor_calls import bounded_get
    from promptmm_dist.distill.cache import CacheDirectory
    from promptmm_dist.distill.student_trainer import student_train_loop
    from promptmm_dist.distill.teacher_group import TeacherGroup
    from promptmm_dist.distill.teacher_workers import TeacherWorker
    from promptmm_dist.paths import hard_token_dir

    for k, v in {**ray_setup.TRAIN_ENV, **TRAIN_START_ENV}.items():
        os.environ.setdefault(k, v)
    t_start = time.perf_counter()
    trial = tune.get_context().get_trial_id()
    hub = ray.get_actor(spec["hub"], namespace=NAMESPACE)
    plan = spec["plan"]
    overrides = S.trial_overrides(config, spec["pool"])
    cfg = S.apply_overrides(spec["base"], overrides)
    cfg.dist.num_workers = plan["workers"]
    cfg.dist.storage_path = None
    cfg.student.eval_every = 1  # ASHA reads validation recall@20 every epoch
    sig = S.teacher_signature(cfg, spec["manifest"])
    out = Path(spec["folder"]) / "trials" / trial
    if out.exists():  # a trial rerun after an interrupted sweep starts from scratch
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    cfg_dict = cfg.to_dict()

    teacher = ray.get(hub.teacher.remote(sig, cfg_dict, trial))
    ckpt = str(Path(teacher["folder"]) / "teacher.pt")
    directory = ray.remote(num_cpus=0, max_concurrency=64)(CacheDirectory).remote(cfg.dist.actor_timeout_s)
    wait_s = cfg.dist.actor_timeout_s  # every wait on an actor below (the teacher wait above is training)
    shared_cache = bounded_get(hub.join.remote(trial, sig, S.cache_key(cfg, sig), cfg_dict, directory),
                               "the teacher hub (join)", wait_s)[0]
    opts = ray_setup.actor_options(cfg.dist)
    worker_cls = ray.remote(num_cpus=0, **opts)(TeacherWorker)
    n_ranks = max(cfg.dist.num_workers, 1)
    n_steps = S.student_steps(cfg, spec["total_pairs"])

    def make_teacher():
        group = TeacherGroup(spec["dataset"], cfg_dict, ckpt, len(spec["shards"]), n_ranks, num_cpus=0,
                             timeout_s=cfg.dist.actor_timeout_s, max_restarts=int(cfg.dist.max_failures), log=log)
        return group, [worker_cls.remote()]

    producer = SharedCacheProducer(
        shared_cache, trial, make_teacher,
        spec["shards"], None, [], directory, n_ranks, cfg.student.epochs, cfg.seed, cfg.student.neg_sample_num,
        cfg.prompt.refresh_epochs, n_steps, log=log, timeout_s=cfg.dist.actor_timeout_s).start()
    loop_config = {"cfg": cfg_dict, "dataset": spec["dataset"],
                   "total_pairs": spec["total_pairs"], "threads": ray_setup.torch_threads(plan["cpus_per_worker"]),
                   "token_cache": str(hard_token_dir()), "num_shards": len(spec["shards"]),
                   "directory": directory}
    if cfg.student.init_from_teacher:
        loop_config["init_blocks"] = bounded_get(shared_cache.version0_blocks.remote(),
                                                 "the shared soft-ranking cache (version 0's blocks)", wait_s)
    scaling, run_config = ray_setup.trainer_configs(cfg, f"student_{trial}", out, plan["cpus_per_worker"],
                                                    callbacks=[TuneReportCallback()])
    trainer = TorchTrainer(student_train_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config)
    t_fit = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        producer.stop()
        bounded_get(hub.leave.remote(trial), "the teacher hub (leave)", wait_s)
        if producer.model is not None:
            producer.model.close()
            for w in producer.workers:
                ray.kill(w)
        ray.kill(directory)
    if producer.error is not None:
        raise producer.error
    if result.error:
        raise result.error
    stopped = bounded_get(hub.stop_requested.remote(trial), "the teacher hub", wait_s)
    summary = {"trial_id": trial, "teacher": sig, "teacher_trained_here": teacher["trained_here"],
               "teacher_source": teacher["source"], "teacher_wait_s": t_fit - t_start,
               "student_s": time.perf_counter() - t_fit, "wall_s": time.perf_counter() - t_start,
               "stopped_by_scheduler": bool(stopped),
               "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
               "overrides": overrides,
               "cache": {"epochs_published": producer.stats.epochs_published, "versions": producer.stats.versions,
                         **producer.shared_stats}}
    (out / DONE).write_text(json.dumps(summary, indent=2, default=str))


class GracefulASHA(AsyncHyperBandScheduler):
    """ASHA whose STOP decisions end a trial through the hub (see module docstring), and which
    ignores the trainer's final summary report (it repeats the best epoch, not a new one).

    `protect`: trial configs that always train to the end (the base configuration: the baseline
    the sweep is compared against)."""

    def __init__(self, hub_name: str, protect: list[dict] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self._hub_name = hub_name
        self._protect = [dict(p) for p in (protect or [])]
        self._requested: dict[str, int] = {}
        self._last: dict[str, dict] = {}
        self.graceful_stops = 0

    def _protected(self, trial) -> bool:
        cfg = {k: v for k, v in trial.config.items()}
        return any(all(cfg.get(k) == v for k, v in p.items()) for p in self._protect)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("final"):
            return TrialScheduler.CONTINUE
        self._last[trial.trial_id] = result
        if trial.trial_id in self._requested:
            self._requested[trial.trial_id] += 1
            if self._requested[trial.trial_id] > 3:  # the trial ignores the request: let Tune stop it
                log(f"tune: trial {trial.trial_id} did not stop when asked; stopping it")
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP:
            return action
        if result.get(self._time_attr, 0) >= self._max_t or self._protected(trial):
            return TrialScheduler.CONTINUE  # ends by itself
        import ray

        self._requested[trial.trial_id] = 0
        self.graceful_stops += 1
        try:
            ray.get_actor(self._hub_name, namespace=NAMESPACE).request_stop.remote(trial.trial_id)
        except ValueError:  # no hub (cannot happen in a sweep): fall back to Tune's stop
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        last = self._last.pop(trial.trial_id, None)
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, last or result)
