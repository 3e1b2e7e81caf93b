"""Teacher sharing across Tune trials.

`TeacherHub` (one per sweep, created and owned by the sweep driver, found by name) trains each
distinct teacher once (trials with the same teacher-stage signature wait for the first) and owns one
`SharedTeacherCache` per (teacher, negatives, student batch size) that produces the version-0 soft rankings of every epoch
once and serves the same object-store refs to every trial. Both are owned by the driver, so a trial
that ends (or is stopped by ASHA) never takes a shared teacher or cache down with it. A shared cache
holds no teacher: version 0's embeddings are made once by a partitioned teacher group (W ranks, as
many as a trial's, each with a 1/W share of the graph and the teacher) that is closed as soon as its
blocks exist; the cache then ranks each shard's samples from its user block and the item block.

Trial side, `SharedCacheProducer` is the trial's `SoftRankingCache`: it publishes the shared
version-0 epochs in the trial's own `CacheDirectory` (student ranks read them zero-copy, unchanged
code path) and, after the trial's first prompt round, produces its private versions with its own
teacher group and TeacherWorker, exactly like a `promptmm distill` run.

All these actors take 0 logical CPUs: they compute on demand while a trial that holds CPUs waits.

Losing a shared cache costs time, not the sweep: the actor owns the refs it serves, so when its
process dies they are gone (OwnerDiedError) but Ray restarts it (`ray_setup.actor_options`: a new
teacher group makes the blocks again from the checkpoint file) and every epoch is a pure function of (seed, epoch,
shard), so a trial rank that cannot read an epoch asks its directory again and the trial's
producer fetches it anew from the restarted actor, which recomputes it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from promptmm_dist.config import config_from_dict
from promptmm_dist.distill.cache import SoftRankingCache
from promptmm_dist.distill.local_kd import epoch_seed
from promptmm_dist.run_io import write_json
from promptmm_dist.tune import space as S

NAMESPACE = "promptmm_tune"
READY = "READY.json"  # written when a teacher folder is complete (resume reuses it)
# Worker processes start slowly on a loaded machine; Train's default 60 s start timeout only causes retries.
TRAIN_START_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


class SharedTeacherCache:
    """Version-0 soft rankings of one teacher, computed once per epoch and shared by its trials.

    An epoch is kept while a live trial still needs it (a leased epoch, or one at or after a live
    trial's position) and, beyond that, while the epochs kept stay under `keep_bytes` (for trials
    that start later); otherwise it is freed (the actor drops its refs; trials still reading hold
    theirs) and recomputed if asked for again (deterministic: same seed, same samples).
    """

    def __init__(self, spec: dict, cfg_dict: dict, checkpoint: str, shards: list, seed: int, n_neg: int,
                 n_steps: int, keep_bytes: int, name: str, world_size: int = 1) -> None:
        """`spec`: the dataset spec (`partition.setup.dataset_spec`): the teacher ranks read its files;
        `world_size`: ranks of the teacher group that makes version 0's blocks (the trials' ranks)."""
        import torch

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        self.spec, self.cfg_dict, self.checkpoint, self.world_size = spec, cfg_dict, checkpoint, max(1, world_size)
        dist = config_from_dict(cfg_dict).dist
        self.timeout_s, self.max_restarts = float(dist.actor_timeout_s), int(dist.max_failures)
        self.shards, self.seed, self.n_neg, self.keep_bytes, self.name = shards, seed, n_neg, keep_bytes, name
        self.n_steps = n_steps
        self._lock = threading.Lock()  # bookkeeping
        self._compute = threading.Lock()  # the blocks and the rankings made from them
        self._blocks = self._version0_blocks()
        self._epochs: dict[int, dict] = {}  # epoch -> {"refs", "bytes", "ready": Event, "leases": set}
        self._trials: dict[str, dict] = {}  # trial -> {"pos": next epoch needed, "directory", "seen"}
        self.stats = {"epochs_computed": 0, "recomputed": 0, "served": 0, "served_shared": 0,
                      "compute_s": 0.0, "bytes_per_epoch": 0, "max_held": 0, "freed": 0,
                      "trials": 0, "load_s": time.perf_counter() - t0, "teacher_ranks": self.world_size}
        self._computed: set[int] = set()

    def _version0_blocks(self) -> list:
        """Version 0's N + 1 embedding blocks (each shard's user rows, then the item table), made by a
        partitioned teacher group (`TeacherGroup`) that lives for this one forward: no process holds the
        whole teacher, and this actor owns the blocks (they die with it, and a restart makes them again)."""
        from promptmm_dist.actor_calls import ActorLost
        from promptmm_dist.distill.teacher_group import TeacherGroup

        group = TeacherGroup(self.spec, self.cfg_dict, self.checkpoint, len(self.shards), self.world_size, num_cpus=0,
                             timeout_s=self.timeout_s, max_restarts=self.max_restarts, log=log)
        try:
            while True:
                blocks, status = group.version_tables(0, None, len(self.shards))
                try:
                    group.gather(status, f"the shared cache {self.name}'s teacher group (version 0)")
                    return blocks
                except ActorLost as err:
                    group.restart(str(err))
        finally:
            group.close()

    # -- trials
    def join(self, trial: str, directory) -> int:
        with self._lock:
            self._trials[trial] = {"pos": 0, "directory": directory, "seen": time.monotonic()}
            self.stats["trials"] += 1
        return len(self._trials)

    def leave(self, trial: str) -> None:
        with self._lock:
            self._trials.pop(trial, None)
            for e in self._epochs.values():
                e["leases"].discard(trial)
        self._evict()

    def version0_blocks(self) -> list:
        """Version 0's N + 1 embedding-block refs (`TeacherRank.version_tables`), for `init_from_teacher`."""
        with self._compute:
            return list(self._blocks)

    # -- epochs
    def epoch(self, epoch: int, trial: str) -> tuple[dict[int, list], list]:
        """({shard: [ref]}, [items ref]) of version-0 `epoch`, computing it if nobody has yet."""
        with self._lock:
            entry = self._epochs.get(epoch)
            mine = entry is None
            if mine:
                entry = {"refs": None, "bytes": 0, "ready": threading.Event(), "leases": set(), "error": None}
                self._epochs[epoch] = entry
            entry["leases"].add(trial)
            if trial in self._trials:
                self._trials[trial]["seen"] = time.monotonic()
        if mine:
            try:
                self._produce(epoch, entry)
            except BaseException as err:
                entry["error"] = repr(err)
                with self._lock:
                    self._epochs.pop(epoch, None)
                raise
            finally:
                entry["ready"].set()
        else:
            entry["ready"].wait()
            if entry["error"]:
                raise RuntimeError(f"shared soft-ranking cache: epoch {epoch} failed: {entry['error']}")
        with self._lock:
            self.stats["served"] += 1
            self.stats["served_shared"] += 0 if mine else 1
            self.stats["max_held"] = max(self.stats["max_held"], len(self._epochs))
        return {k: [r] for k, r in enumerate(entry["refs"])}, [self._blocks[-1]]

    def _produce(self, epoch: int, entry: dict) -> None:
        import ray

        t0 = time.perf_counter()
        samples = ray.get([s.epoch_samples.remote(self.n_neg, epoch_seed(self.seed, epoch), self.n_steps)
                           for s in self.shards])
        with self._compute:
            rankings = self._rank(samples)
        entry["refs"] = [ray.put(r) for r in rankings]  # this actor owns them
        entry["bytes"] = int(sum(r.nbytes() for r in rankings))
        with self._lock:
            self.stats["epochs_computed"] += 1
            self.stats["recomputed"] += int(epoch in self._computed)
            self._computed.add(epoch)
            self.stats["compute_s"] += time.perf_counter() - t0
            self.stats["bytes_per_epoch"] = max(self.stats["bytes_per_epoch"], entry["bytes"])

    def _rank(self, samples: list) -> list:
        """Each shard's soft ranking from its user block and the item block (zero-copy reads, one shard's
        rows at a time, as a TeacherWorker ranks); blocks whose copy was lost are made again first."""
        from ray.exceptions import ObjectLostError

        try:
            return self._rank_from_blocks(samples)
        except ObjectLostError:
            log(f"shared soft-ranking cache {self.name}: version 0's blocks were lost; making them again")
            self._blocks = self._version0_blocks()
            return self._rank_from_blocks(samples)

    def _rank_from_blocks(self, samples: list) -> list:
        import ray

        from promptmm_dist.distill.teacher_workers import rank_block

        n = len(self.shards)
        items = ray.get(self._blocks[n], timeout=self.timeout_s)
        return [rank_block(ray.get(self._blocks[k], timeout=self.timeout_s), items, s, k, n)
                for k, s in enumerate(samples)]

    def release(self, epoch: int, trial: str) -> None:
        """`trial`'s ranks consumed `epoch` (it moves past it)."""
        with self._lock:
            e = self._epochs.get(epoch)
            if e is not None:
                e["leases"].discard(trial)
            t = self._trials.get(trial)
            if t is not None:
                t["pos"] = max(t["pos"], epoch + 1)
                t["seen"] = time.monotonic()
        self._evict()

    def _evict(self) -> None:
        self._drop_dead_trials()
        with self._lock:
            positions = [t["pos"] for t in self._trials.values()]
            free = [e for e, v in self._epochs.items() if v["refs"] is not None and not v["leases"]]
            held = sum(v["bytes"] for v in self._epochs.values())
            for e in sorted(free):  # oldest first
                needed = any(p <= e for p in positions)
                if needed or held <= self.keep_bytes:
                    continue
                held -= self._epochs.pop(e)["bytes"]
                self.stats["freed"] += 1

    def _drop_dead_trials(self) -> None:
        """A trial killed without `leave` must not pin epochs forever: its directory actor (owned by
        the trial) dies with it."""
        import ray

        with self._lock:
            stale = [(t, v["directory"]) for t, v in self._trials.items() if time.monotonic() - v["seen"] > 120]
        for t, directory in stale:
            try:
                ray.get(directory.held_epochs.remote(), timeout=10)
                with self._lock:
                    if t in self._trials:
                        self._trials[t]["seen"] = time.monotonic()
            except Exception:  # RayActorError: the trial is gone
                self.leave(t)

    def get_stats(self) -> dict:
        with self._lock:
            return {**self.stats, "held": len(self._epochs), "name": self.name}

    def pid(self) -> int:
        """This actor's process id (fault-injection tests)."""
        import os

        return os.getpid()


class TeacherHub:
    """Trains each distinct teacher once and hands out the shared caches (see module docstring)."""

    def __init__(self, info, shared: dict, folder: str, plan: dict) -> None:
        """`info`: the dataset's identity and sizes (`DatasetInfo`: no rows); `shared`: {"shards",
        "dataset" (its spec: the files every rank reads), "total_pairs"}."""
        import os

        for k, v in TRAIN_START_ENV.items():
            os.environ.setdefault(k, v)

        self.data = info
        self.shared = shared
        self.folder = Path(folder)
        self.plan = plan
        self._lock = threading.Lock()
        self._teachers: dict[str, dict] = {}
        self._caches: dict[str, dict] = {}
        self._trials: dict[str, dict] = {}
        self._retired: list[dict] = []  # stats of caches shut down (idle)
        self._save_lock = threading.Lock()

    def info(self) -> dict:
        return {"plan": self.plan}

    # ---------------------------------------------------------------------------------- teachers
    def teacher(self, sig: str, cfg_dict: dict, trial: str) -> dict:
        """Block until teacher `sig` exists; the first caller trains it (Ray Train, the sweep's
        worker settings), later ones wait for it. A teacher folder with READY.json is reused."""
        t0 = time.perf_counter()
        with self._lock:
            rec = self._teachers.get(sig)
            if rec is None or rec["state"] == "failed":
                ready = self.folder / sig / READY
                if ready.exists():
                    rec = {**json.loads(ready.read_text()), "state": "ready", "source": "disk",
                           "event": threading.Event(), "trials": set()}
                    rec["event"].set()
                    mine = False
                else:
                    rec = {"state": "training", "source": "trained", "event": threading.Event(),
                           "trials": set(), "trained_by": trial}
                    mine = True
                self._teachers[sig] = rec
            else:
                mine = False
            rec["trials"].add(trial)
        if mine:
            try:
                rec.update(self._train(sig, cfg_dict, trial))
                rec["state"] = "ready"
            except BaseException as err:
                rec["state"], rec["error"] = "failed", f"{type(err).__name__}: {err}"
                raise
            finally:
                rec["event"].set()
                self._save()
        else:
            rec["event"].wait()
            if rec["state"] != "ready":
                raise RuntimeError(f"teacher {sig} failed in trial {rec.get('trained_by')}: {rec.get('error')}")
        return {"sig": sig, "folder": rec["folder"], "trained_here": mine, "wait_s": time.perf_counter() - t0,
                "source": rec["source"], "train_s": rec.get("train_s", 0.0)}

    def _train(self, sig: str, cfg_dict: dict, trial: str) -> dict:
        from promptmm_dist.distributed import DistributedRun

        cfg = config_from_dict(cfg_dict)
        cfg.dist.storage_path = None  # Train storage inside the teacher's folder
        out = self.folder / sig
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        log(f"tune: training teacher {sig} (first needed by trial {trial})")
        t0 = time.perf_counter()
        shared = {"shards": self.shared["shards"], "dataset": self.shared["dataset"]}
        run = DistributedRun(self.data, cfg, out, shared=shared)
        run.cpus = self.plan["cpus_per_worker"]
        folder, meta = run.train_teacher()
        train_s = time.perf_counter() - t0
        info = {"sig": sig, "folder": str(folder), "train_s": train_s, "trained_by": trial,
                "val": meta.get("val", {}), "test": meta.get("test", {}), "epochs_run": meta.get("epochs_run")}
        write_json(out / READY, info)
        log(f"tune: teacher {sig} ready in {train_s:.1f}s (val recall@20 {info['val'].get('recall@20', float('nan')):.4f})")
        return info

    # ------------------------------------------------------------------------------------ caches
    def join(self, trial: str, sig: str, key: str, cfg_dict: dict, directory) -> list:
        """Register a trial and return [its shared version-0 cache] (created on first use)."""
        import ray

        from promptmm_dist.config import config_from_dict as cfd

        with self._lock:
            rec = self._teachers[sig]
            c = self._caches.get(key)
            if c is None:
                cfg = cfd(cfg_dict)
                from promptmm_dist.ray_setup import actor_options

                actor = ray.remote(num_cpus=0, max_concurrency=32, **actor_options(cfg.dist))(SharedTeacherCache)
                handle = actor.remote(self.shared["dataset"], cfg_dict, str(Path(rec["folder"]) / "teacher.pt"),
                                      self.shared["shards"], cfg.seed, cfg.student.neg_sample_num,
                                      S.student_steps(cfg, self.shared["total_pairs"]),
                                      int(self.plan["cache_keep_mb"] * 2**20), key, max(1, int(self.plan["workers"])))
                c = {"handle": handle, "sig": sig, "live": set(), "used": time.monotonic(), "trials": 0}
                self._caches[key] = c
            c["live"].add(trial)
            c["trials"] += 1
            c["used"] = time.monotonic()
            stop = bool(self._trials.get(trial, {}).get("stop"))
            self._trials[trial] = {"sig": sig, "key": key, "directory": directory, "stop": stop,
                                   "joined": time.time()}
        ray.get(c["handle"].join.remote(trial, directory))
        if stop:
            directory.request_end.remote()
        return [c["handle"]]

    def leave(self, trial: str) -> None:
        import ray

        with self._lock:
            t = self._trials.get(trial)
            c = self._caches.get(t["key"]) if t else None
            if c is not None:
                c["live"].discard(trial)
                c["used"] = time.monotonic()
        if c is not None:
            ray.get(c["handle"].leave.remote(trial))
        self._retire_idle()

    def _retire_idle(self) -> None:
        """Keep at most `max_idle_caches` caches without live trials (each is a process owning its
        teacher's version-0 blocks and the epochs it keeps); the least recently used go first (their
        stats are kept)."""
        import ray

        with self._lock:
            idle = sorted((c["used"], k) for k, c in self._caches.items() if not c["live"])
            drop = [k for _, k in idle[: max(0, len(idle) - int(self.plan.get("max_idle_caches", 2)))]]
            victims = [(k, self._caches.pop(k)) for k in drop]
        for k, c in victims:
            try:
                self._retired.append(ray.get(c["handle"].get_stats.remote(), timeout=30))
            except Exception:
                pass
            ray.kill(c["handle"])

    # ----------------------------------------------------------------------------- early stopping
    def request_stop(self, trial: str) -> bool:
        """The scheduler stopped `trial`: end its training cleanly before its next epoch."""
        with self._lock:
            t = self._trials.setdefault(trial, {"directory": None, "stop": False})
            t["stop"] = True
            directory = t.get("directory")
        if directory is not None:
            directory.request_end.remote()
        return directory is not None

    def stop_requested(self, trial: str) -> bool:
        with self._lock:
            return bool(self._trials.get(trial, {}).get("stop"))

    # -------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        import ray

        with self._lock:
            caches = [c["handle"] for c in self._caches.values()]
            teachers = {sig: {k: v for k, v in rec.items() if k not in ("event",)} | {"trials": sorted(rec["trials"])}
                        for sig, rec in self._teachers.items()}
        live = []
        for h in caches:
            try:
                live.append(ray.get(h.get_stats.remote(), timeout=30))
            except Exception:
                pass
        return {"teachers": teachers, "caches": live + list(self._retired)}

    def _save(self) -> None:
        """teachers.json: every teacher of the sweep (earlier runs of a resumed sweep included)."""
        with self._save_lock:
            path = self.folder / "teachers.json"
            rows = json.loads(path.read_text()) if path.exists() else {}
            with self._lock:
                for sig, rec in self._teachers.items():
                    if rec.get("source") == "trained":
                        rows[sig] = {k: v for k, v in rec.items() if k not in ("event", "trials")} | {
                            "trials": sorted(rec["trials"])}
            write_json(path, rows)

    def shutdown(self) -> None:
        import ray

        with self._lock:
            caches = list(self._caches.values())
            self._caches.clear()
        for c in caches:
            try:
                self._retired.append(ray.get(c["handle"].get_stats.remote(), timeout=30))
            except Exception:
                pass
            ray.kill(c["handle"])


class SharedCacheProducer(SoftRankingCache):
    """A trial's cache producer: shared version-0 epochs, private versions after a prompt round."""

    def __init__(self, shared_cache, trial: str, make_teacher, *args: Any, **kw: Any) -> None:
        """`make_teacher()`: (a TeacherGroup, [TeacherWorkers]) for the trial's private versions."""
        super().__init__(*args, **kw)
        self.shared, self.trial = shared_cache, trial
        self._shared_epochs: set[int] = set()
        self._shared_items: Any = None
        self._left = False
        self.shared_stats = {"epochs_shared": 0, "fetch_s": 0.0}
        if self.refresh > 0 and self.model is None:
            # private teacher for this trial's prompt rounds; it loads while version 0 is served
            self.model, self.workers = make_teacher()

    def _items_ref(self, version: int | None = None):
        v = self.version if version is None else version
        if v == 0:
            return self._shared_items
        return super()._items_ref(v)

    def _publish(self, epoch: int, version: int | None = None) -> None:
        v = self.version if version is None else version
        if v > 0:
            return super()._publish(epoch, v)
        t0 = time.perf_counter()
        shard_refs, items = self._call(self.shared.epoch.remote(epoch, self.trial),
                                       f"the shared soft-ranking cache (epoch {epoch})")
        self._shared_items = items[0]
        self.refs[epoch] = [shard_refs[k][0] for k in sorted(shard_refs)]
        self.epoch_version[epoch] = 0
        self._call(self.directory.publish.remote(epoch, 0, shard_refs, items, [self._prompt_ref(0)]),
                   "the cache directory")
        self._shared_epochs.add(epoch)
        dt = time.perf_counter() - t0
        self.stats.produce_s += dt
        self.shared_stats["fetch_s"] += dt
        self.shared_stats["epochs_shared"] += 1
        self.stats.epochs_published += 1
        self.stats.max_epochs_held = max(self.stats.max_epochs_held, len(self.refs))

    def _drop(self, epoch: int) -> None:
        super()._drop(epoch)
        if epoch in self._shared_epochs:
            self._shared_epochs.discard(epoch)
            self.shared.release.remote(epoch, self.trial)  # also after leaving: a recomputed epoch's lease

    def _prompt_round(self, epoch: int) -> bool:
        ok = super()._prompt_round(epoch)
        if ok and not self._left:
            self._leave()  # private versions from now on: stop pinning shared epochs
        return ok

    def _leave(self) -> None:
        if not self._left:
            self._left = True
            self.shared.leave.remote(self.trial)

    def stop(self) -> None:
        super().stop()
        self._leave()
