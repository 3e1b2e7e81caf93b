"""The distributed pipeline on Ray (DESIGN 3): shards -> teacher (Ray Train) -> soft-ranking cache
(TeacherWorker actors, object store) -> student (Ray Train DDP) with prompt rounds -> evaluation
split across the shard actors.

`--num-workers 0` runs the Train loops in the driver (Train local mode) with everything else the
same, which is what most tests use.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from promptmm_dist.actor_calls import bounded_get
from promptmm_dist.config import Config
from promptmm_dist.data.dataset import DatasetInfo, InteractionData
from promptmm_dist.data.shards import ShardState, split_by_shard
from promptmm_dist.distill.cache import CacheDirectory, SoftRankingCache
from promptmm_dist.distill.teacher_group import TeacherGroup
from promptmm_dist.distill.teacher_workers import TeacherWorker
from promptmm_dist.partition.setup import dataset_spec
from promptmm_dist.paths import hard_token_dir
from promptmm_dist.run_io import write_json
from promptmm_dist.train.teacher_loop import steps_per_epoch
from promptmm_dist.train.validation import CLOSING_FILE
from promptmm_dist import ray_setup
from promptmm_dist.run_resume import (StageRun, checkpoint_sha256, latest_resume, load_prompt, ray_loop_config,
                                      ray_storage, save_prompt, stage_fingerprint)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def canonical_parquet(data: InteractionData | DatasetInfo, cfg: Config, out: Path) -> Path:
    """The Parquet the shard actors read (the canonical folder's; see partition.setup)."""
    return Path(dataset_spec(data, cfg.data.path, out)["dir"]) / "interactions.parquet"


class DistributedRun:
    """Holds the Ray handles of one run; stages are methods so `run` and `tune` can reuse them."""

    def __init__(self, data: InteractionData | DatasetInfo, cfg: Config, out: Path, shared: dict | None = None) -> None:
        """`shared` (used by `tune`): {"shards", "dataset"} made once by the sweep driver;
        the run then creates none of them and `close()` leaves the shards alone."""
        import ray

        ray_setup.init_ray(cfg.dist)
        self.data, self.cfg, self.out = data, cfg, out
        t0 = time.perf_counter()
        self._owns_shards = shared is None
        # the ranks and shards read the canonical files themselves; the driver passes paths and sizes
        self.dataset = dataset_spec(data, cfg.data.path, out) if shared is None else dict(shared["dataset"])
        # from here on the run knows the data by its identity and sizes only
        self.data = DatasetInfo(data.name, data.n_users, data.n_items, list(data.modalities), data.manifest_sha256)
        if shared is None:
            ray_setup.shards_cover_workers(cfg.dist, log)
            n = cfg.dist.num_shards
            parquet = Path(self.dataset["dir"]) / "interactions.parquet"
            # one streaming pass (a task, not the driver) writes each shard's rows to its own file; the
            # shard actors and the ranks then read their own files only
            files = bounded_get(ray.remote(num_cpus=ray_setup.SHARD_CPUS)(split_by_shard).remote(
                str(parquet.resolve()), n, str((out / "shards" / f"{n}").resolve()), data.manifest_sha256),
                "the interactions split by shard", cfg.dist.actor_timeout_s)
            self.dataset["shard_files"] = files
            shard_cls = ray.remote(num_cpus=ray_setup.SHARD_CPUS, **ray_setup.actor_options(cfg.dist))(ShardState)
            self.shards = [shard_cls.remote(files[k], k, n, data.n_users, data.n_items) for k in range(n)]
        else:
            self.shards = list(shared["shards"])
        self.shard_info = bounded_get([s.info.remote() for s in self.shards], "the shard actors (loading)",
                                      cfg.dist.actor_timeout_s)
        self.total_pairs = sum(i["train_pairs"] for i in self.shard_info)
        # where things ran (metrics.json "placement"): node ids of the shards, the TeacherWorkers, the ranks
        self.placement: dict[str, list] = {"teacher": [], "student": [], "teacher_workers": [],
                                           "shards": bounded_get([s.node_id.remote() for s in self.shards],
                                                                 "the shard actors (node ids)", cfg.dist.actor_timeout_s)}
        aux = (ray_setup.SHARD_CPUS * len(self.shards) + ray_setup.TEACHER_MODEL_CPUS
               + ray_setup.TEACHER_WORKER_CPUS * cfg.dist.num_teacher_workers)
        self.cpus = ray_setup.cpus_per_worker(cfg.dist, aux)
        self.timings: dict[str, float] = {"setup_s": time.perf_counter() - t0}
        log(f"ray: {len(self.shards)} shards ({', '.join(str(i['train_pairs']) for i in self.shard_info)} "
            f"train pairs), {cfg.dist.num_workers} train workers x {self.cpus} CPU")

    def _loop_config(self) -> dict:
        return {"cfg": self.cfg.to_dict(), "dataset": self.dataset,
                "total_pairs": self.total_pairs, "threads": ray_setup.torch_threads(self.cpus),
                "token_cache": str(hard_token_dir()), "num_shards": len(self.shards)}

    def _fit(self, loop, name: str, config: dict):
        from ray.train.torch import TorchTrainer

        scaling, run = ray_setup.trainer_configs(self.cfg, name, self.out, self.cpus)
        trainer = TorchTrainer(loop, train_loop_config=config, scaling_config=scaling, run_config=run)
        result = trainer.fit()
        if result.error:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"{name}: no checkpoint was reported")
        return result

    def train_teacher(self) -> tuple[Path, dict]:
        from promptmm_dist.train.teacher_trainer import teacher_train_loop

        t0 = time.perf_counter()
        folder = self.out / "teacher"
        stage = self._stage("teacher", stage_fingerprint(self.cfg, "teacher", self.data.manifest_sha256))
        if stage.finished:  # a rerun into the same --out: same inputs, so the same teacher
            log(f"teacher: reusing the finished stage in {folder}")
            self.placement["teacher"] = _rank_placement(folder)
            return folder, stage.meta()
        config = {**self._loop_config(), "shards": self.shards,
                  **ray_loop_config(stage, latest_resume(stage)[1])}
        result = self._fit(teacher_train_loop, "teacher", config)
        _take_checkpoint(result, folder)
        self.placement["teacher"] = _rank_placement(folder)
        closing = _closing(folder)  # the ranks evaluated the selected teacher, each on its own users
        hist = _history(folder)
        meta = {"val": closing["val"], "test": closing["test"], "best_epoch": _best_epoch(hist), "epochs_run": len(hist),
                "train_seconds": time.perf_counter() - t0, "teacher_params": closing["params"],
                "dataset": self.data.name, "manifest_sha256": self.data.manifest_sha256}
        write_json(folder / "meta.json", meta)
        stage.finish()
        self.timings["teacher_s"] = time.perf_counter() - t0
        return folder, meta

    def _cache_start(self, stage: StageRun):
        """(first epoch, its cache version's PromptState, resume.pt path) for a student stage that
        continues; (0, None, None) when it starts. Epoch K's cache version is the number of prompt
        rounds before it; a round the driver did not live to save means starting the stage over."""
        state, path = latest_resume(stage)
        if state is None:
            return 0, None, None
        epochs, every = self.cfg.student.epochs, self.cfg.prompt.refresh_epochs
        first = epochs if state.done else state.next_epoch
        if first >= epochs:
            return first, None, path  # only the closing report is left: nothing to produce
        version = sum(1 for e in range(first) if every > 0 and (e + 1) % every == 0 and e + 1 < epochs)
        try:
            return first, load_prompt(stage.folder, version), path
        except FileNotFoundError:
            log(f"student: prompt of cache version {version} was not saved; starting the stage over")
            stage.restart()
            return 0, None, None

    def _stage(self, name: str, fingerprint: dict) -> StageRun:
        """Reuse, continue or (re)start a stage of this run folder (see run_resume)."""
        return StageRun(self.out / name, fingerprint, f"{name}.pt", ray_storage(self.cfg, self.out, name))

    def distill(self, teacher_folder: Path) -> dict:
        import ray
        from promptmm_dist.distill.student_trainer import student_train_loop

        from promptmm_dist.train.teacher_checkpoint import adopt_teacher_settings

        t0 = time.perf_counter()
        cfg = self.cfg
        # the TeacherWorkers rebuild the teacher with the settings it was trained with
        teacher_folder = adopt_teacher_settings(cfg, teacher_folder, self.data.manifest_sha256)
        ckpt = str((teacher_folder / "teacher.pt").resolve())
        stage = self._stage("student", stage_fingerprint(cfg, "student", self.data.manifest_sha256,
                                                          teacher_sha256=checkpoint_sha256(Path(ckpt))))
        if stage.finished:  # a rerun into the same --out: same inputs and teacher, so the same student
            log(f"student: reusing the finished stage in {stage.folder}")
            self.placement["student"] = _rank_placement(stage.folder)
            return stage.meta()
        first_epoch, prompt, resume_path = self._cache_start(stage)
        timeout = cfg.dist.actor_timeout_s
        opts = ray_setup.actor_options(cfg.dist)
        n_ranks = max(cfg.dist.num_workers, 1)
        # the frozen teacher, partitioned like the students (rank r of each holds the same rows); its
        # ranks read the canonical files themselves (the driver ships no rows); the workers hold
        # nothing but the blocks of the call they serve
        model = TeacherGroup(self.dataset, cfg.to_dict(), ckpt, len(self.shards), n_ranks,
                             num_cpus=ray_setup.TEACHER_MODEL_CPUS / n_ranks, timeout_s=timeout,
                             max_restarts=int(cfg.dist.max_failures), near_nodes=self.placement["shards"], log=log)
        worker_cls = ray.remote(num_cpus=ray_setup.TEACHER_WORKER_CPUS, **opts)(TeacherWorker)
        workers = [worker_cls.options(**ray_setup.near(self.placement["shards"], j)).remote()
                   for j in range(cfg.dist.num_teacher_workers)]
        directory = ray.remote(num_cpus=0, max_concurrency=64)(CacheDirectory).remote(timeout)
        try:
            self.placement["teacher_workers"] = bounded_get([w.node_id.remote() for w in workers],
                                                            "the TeacherWorkers (node ids)", timeout)
            self.placement["teacher_model"] = model.node_ids()
            cache = SoftRankingCache(self.shards, model, workers, directory, n_ranks, cfg.student.epochs, cfg.seed,
                                     cfg.student.neg_sample_num, cfg.prompt.refresh_epochs,
                                     steps_per_epoch(self.total_pairs, cfg.student.batch_size), log=log,
                                     timeout_s=timeout, first_epoch=first_epoch, prompt=prompt,
                                     on_round=lambda p: save_prompt(stage.folder, p)).start()
            self.cache = cache  # fault-injection benchmarks read its stats
            config = {**self._loop_config(), "directory": directory,
                      **ray_loop_config(stage, resume_path)}
            if cfg.student.init_from_teacher:  # version 0's blocks: each rank reads its shards' and the items'
                config["init_blocks"] = cache.tables_of(0)
            try:
                result = self._fit(student_train_loop, "student", config)
            except Exception:
                cache.stop()
                if cache.error is not None:  # the cause (what died), not the symptom Train saw; the CLI prints it
                    raise cache.error from None
                raise
            cache.stop()
            if cache.error is not None:
                raise cache.error
            folder = self.out / "student"
            _take_checkpoint(result, folder)  # with the ranks' closing metrics and export.npz
            self.placement["student"] = _rank_placement(folder)
            closing = _closing(folder)
            hist = _history(folder)
            rounds = _round_effects(cache.stats.rounds, hist)
            st = cache.stats
            meta = {"val": closing["val"], "test": closing["test"], "best_epoch": _best_epoch(hist),
                    "epochs_run": len(hist), "train_seconds": time.perf_counter() - t0,
                    "student_total": closing["params"]["total"],
                    "student_inference": closing["params"]["inference"],
                    "prompt_rounds": rounds,
                    "cache": {"versions": st.versions, "epochs_published": st.epochs_published,
                              "bytes_per_epoch": int(np.mean(st.bytes_per_epoch)) if st.bytes_per_epoch else 0,
                              "bytes_per_pair": st.bytes_per_pair(),
                              "max_epochs_held": st.max_epochs_held, "produce_s": st.produce_s,
                              "tables_s": st.tables_s,
                              "rank_s_per_epoch": float(np.mean(st.rank_s)) if st.rank_s else 0.0,
                              "recomputed": st.recomputed,
                              "teacher_released_at_epoch": st.teacher_released_at,
                              "student_wait_s": float(sum(r.get("kd_wait_s", 0.0) for r in hist))},
                    "dataset": self.data.name, "manifest_sha256": self.data.manifest_sha256}
            write_json(folder / "meta.json", meta)
            stage.finish()
            prompt = f"prompt refreshed {st.versions - 1} time(s)" if st.versions > 1 else "prompt frozen"
            log(f"KD cache: teacher rankings for {st.epochs_published} epochs, "
                f"{meta['cache']['bytes_per_epoch'] / 2**20:.1f} MiB each, at most {st.max_epochs_held} in memory "
                f"at once; computed in {st.produce_s:.1f}s while the students trained, who waited "
                f"{meta['cache']['student_wait_s']:.1f}s for them; {prompt}")
            self.timings["student_s"] = time.perf_counter() - t0
            return meta
        finally:  # also when the stage fails: a caller holding the traceback must not keep them alive
            model.close()
            for actor in (*workers, directory):
                ray.kill(actor)

    def close(self) -> None:
        import ray

        if not self._owns_shards:
            return
        for s in self.shards:
            ray.kill(s)


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _take_checkpoint(result, folder: Path) -> None:
    """Copy the run's final checkpoint into the run folder (and drop a local-mode staging copy)."""
    with result.checkpoint.as_directory() as d:
        _copy_tree(Path(d), folder)
    ray_setup.release_staged_checkpoint(result.checkpoint.path)


def _rank_placement(folder: Path) -> list:
    """Node id of each rank of a stage, in rank order (rank 0 writes it into the checkpoint)."""
    path = folder / ray_setup.PLACEMENT_FILE
    return json.loads(path.read_text())["ranks"] if path.exists() else []


def _closing(folder: Path) -> dict:
    """A stage's closing metrics, which its ranks wrote into the final checkpoint."""
    path = folder / CLOSING_FILE
    if not path.exists():
        raise RuntimeError(f"{path}: the stage's ranks wrote no closing metrics (did training end early?)")
    return json.loads(path.read_text())


def _history(folder: Path) -> list[dict]:
    """Per-epoch rows, written by rank 0 into the final checkpoint."""
    path = folder / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _best_epoch(hist: list[dict]) -> int:
    return int(hist[-1].get("best_epoch", -1)) if hist else -1


def _round_effects(rounds: list[dict], hist: list[dict]) -> list[dict]:
    by_epoch = {int(r.get("epoch", -1)): r.get("val", {}) for r in hist}
    for r in rounds:
        r["val_recall@20_before"] = by_epoch.get(r["epoch"], {}).get("recall@20")
        r["val_recall@20_after"] = by_epoch.get(r["epoch"] + 1, {}).get("recall@20")
    return rounds


def run_distributed(data: InteractionData | DatasetInfo, cfg: Config, out: Path, stages=("teacher", "student"),
                    teacher_dir: Path | None = None) -> dict:
    """`promptmm run/train-teacher/distill` on Ray; returns the metrics.json content."""
    t0 = time.perf_counter()
    run = DistributedRun(data, cfg, out)
    metrics: dict = {"mode": "ray", "num_workers": cfg.dist.num_workers, "num_shards": cfg.dist.num_shards}
    try:
        if "teacher" in stages:
            teacher_dir, metrics["teacher"] = run.train_teacher()
        if "student" in stages:
            assert teacher_dir is not None
            tdir = teacher_dir / "teacher" if (teacher_dir / "teacher").is_dir() else teacher_dir
            metrics["student"] = run.distill(tdir)
    finally:
        run.close()
    if "teacher" in metrics and "student" in metrics:
        metrics["params"] = {"teacher_total": metrics["teacher"]["teacher_params"],
                             "student_total": metrics["student"]["student_total"],
                             "student_inference": metrics["student"]["student_inference"]}
    metrics["placement"] = run.placement
    metrics["timings"] = {**run.timings, "total_s": time.perf_counter() - t0}
    return metrics
