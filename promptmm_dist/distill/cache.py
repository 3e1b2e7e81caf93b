"""The teacher soft-ranking cache in the Ray object store.

Driver side, `SoftRankingCache` runs a producer thread: for each epoch it asks every shard for its
samples and a TeacherWorker for their soft ranking. The driver *owns* those refs (it created them),
publishes them in a small `CacheDirectory` actor that student ranks query, stays at most one epoch
ahead of the students (two epochs held), frees an epoch once every rank consumed it, and runs a
prompt round (new cache version) when the students hand in their embeddings at a refresh epoch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from promptmm_dist.distill.local_kd import epoch_seed
from promptmm_dist.train.steps import SoftRanking


class TrainingEnded(Exception):
    """Raised on every rank at the same epoch when the directory was asked to end training early."""


class CacheDirectory:
    """Where published epochs are looked up (refs wrapped in lists so Ray passes them as refs)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._epochs: dict[int, dict] = {}
        self._consumed: dict[int, dict[int, int]] = {}
        self._students: dict[int, list] = {}
        self._stopped = False
        self._end_requested = False  # tune: the scheduler stopped this trial early
        self._fetched: set[int] = set()
        self._ended: set[int] = set()

    def publish(self, epoch: int, version: int, shard_refs: dict[int, list], items_ref: list) -> None:
        with self._cond:
            self._epochs[epoch] = {"version": version, "shards": shard_refs, "items": items_ref}
            self._cond.notify_all()

    def fetch(self, epoch: int, shards: list[int], timeout: float = 3600.0):
        """Block until `epoch` is published; (version, [[ref] per shard], [items ref]), or None when
        training must end before `epoch` (see `request_end`)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: epoch in self._epochs or self._stopped or epoch in self._ended
                                     or (self._end_requested and epoch not in self._fetched), timeout)
            if self._end_requested and epoch not in self._fetched:
                self._ended.add(epoch)  # decided once per epoch, so every rank sees the same answer
            if epoch in self._ended:
                return None
            if not ok or epoch not in self._epochs:
                raise TimeoutError(f"soft-ranking cache: epoch {epoch} was never published")
            self._fetched.add(epoch)
            e = self._epochs[epoch]
            return e["version"], [e["shards"][k] for k in shards], e["items"]

    def request_end(self) -> None:
        """End training cleanly before the next epoch no rank has fetched yet (a Tune scheduler
        stopped the trial: the trainer then returns normally and Ray Train releases its workers)."""
        with self._cond:
            self._end_requested = True
            self._cond.notify_all()

    def consumed(self, epoch: int, rank: int, nbytes: int) -> None:
        with self._cond:
            self._consumed.setdefault(epoch, {})[rank] = nbytes
            self._cond.notify_all()

    def wait_consumed(self, epoch: int, n_ranks: int, timeout: float) -> dict[int, int] | None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._consumed.get(epoch, {})) >= n_ranks or self._stopped, timeout)
            got = self._consumed.get(epoch, {})
            return dict(got) if len(got) >= n_ranks else None

    def drop(self, epoch: int) -> None:
        with self._cond:
            self._epochs.pop(epoch, None)

    def put_student(self, epoch: int, wrapped_ref: list) -> None:
        with self._cond:
            self._students[epoch] = wrapped_ref
            self._cond.notify_all()

    def wait_student(self, epoch: int, timeout: float) -> list | None:
        with self._cond:
            self._cond.wait_for(lambda: epoch in self._students or self._stopped, timeout)
            return self._students.pop(epoch, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def held_epochs(self) -> list[int]:
        with self._cond:
            return sorted(self._epochs)


@dataclass
class CacheStats:
    epochs_published: int = 0
    versions: int = 1
    produce_s: float = 0.0  # time the driver's producer spent waiting for teacher workers
    bytes_per_epoch: list[int] = field(default_factory=list)
    max_epochs_held: int = 0
    rounds: list[dict] = field(default_factory=list)


class SoftRankingCache:
    """Driver-side producer of cache epochs (runs in a background thread while `fit()` blocks)."""

    def __init__(self, shards: list, teacher_workers: list, directory, n_ranks: int, epochs: int,
                 seed: int, n_neg: int, refresh_epochs: int, log=print) -> None:
        self.shards, self.workers, self.directory = shards, teacher_workers, directory
        self.n_ranks, self.epochs, self.seed, self.n_neg = n_ranks, epochs, seed, n_neg
        self.refresh = refresh_epochs
        self.log = log
        self.version = 0
        self.refs: dict[int, list] = {}  # epoch -> the driver-owned refs of that epoch
        self.items_refs: dict[int, object] = {}
        self.stats = CacheStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soft-ranking-cache", daemon=True)

    def start(self) -> "SoftRankingCache":
        self._thread.start()
        return self

    def stop(self) -> None:
        import ray

        self._stop.set()
        ray.get(self.directory.stop.remote())
        self._thread.join(timeout=60)
        self.refs.clear()
        self.items_refs.clear()

    def _items_ref(self):
        if self.version not in self.items_refs:
            self.items_refs = {self.version: self.workers[0].item_modal_embeddings.remote(self.version)}
        return self.items_refs[self.version]

    def _publish(self, epoch: int) -> None:
        import ray

        t0 = time.perf_counter()
        samples = [s.epoch_samples.remote(self.n_neg, epoch_seed(self.seed, epoch, k)) for k, s in enumerate(self.shards)]
        refs = [self.workers[k % len(self.workers)].soft_ranking.remote(self.version, samples[k])
                for k in range(len(self.shards))]
        self.refs[epoch] = refs
        ray.get(self.directory.publish.remote(epoch, self.version, {k: [r] for k, r in enumerate(refs)},
                                              [self._items_ref()]))
        ray.wait(refs, num_returns=len(refs))
        self.stats.produce_s += time.perf_counter() - t0
        self.stats.epochs_published += 1
        self.stats.max_epochs_held = max(self.stats.max_epochs_held, len(self.refs))

    def _wait_started(self, epoch: int) -> bool:
        """Block until every rank has fetched `epoch` (so all are done with the epoch before it)."""
        import ray

        while not self._stop.is_set():
            got = ray.get(self.directory.wait_consumed.remote(epoch, self.n_ranks, 1.0))
            if got is not None:
                self.stats.bytes_per_epoch.append(int(sum(got.values())))
                return True
        return False

    def _drop(self, epoch: int) -> None:
        """Free a finished epoch: the directory forgets it and the driver drops its refs."""
        import ray

        if epoch in self.refs:
            ray.get(self.directory.drop.remote(epoch))
            del self.refs[epoch]

    def _prompt_round(self, epoch: int) -> bool:
        import ray

        wrapped = None
        while wrapped is None and not self._stop.is_set():
            wrapped = ray.get(self.directory.wait_student.remote(epoch, 1.0))
        if wrapped is None:
            return False
        res = ray.get(self.workers[0].prompt_round.remote(wrapped[0], epoch_seed(self.seed + 1, epoch)))
        ray.get([w.load_prompt.remote(res["state"], res["version"]) for w in self.workers[1:]])
        self.version = res["version"]
        self.stats.versions = self.version + 1
        summary = {"epoch": epoch, "cache_version": self.version, "round_loss": res["round_loss"],
                   "round_s": res["round_s"]}
        self.stats.rounds.append(summary)
        self.log(f"prompt round after epoch {epoch}: loss {res['round_loss']:.4f}, "
                 f"new cache version {self.version} ({res['round_s']:.1f}s)")
        return True

    def _run(self) -> None:
        try:
            for epoch in range(self.epochs):
                if self._stop.is_set():
                    return
                # students are on epoch-1 once they all fetched it: epoch-2 is finished, so at most
                # two epochs (the one being trained and the one prefetched) are ever held
                if epoch >= 1 and not self._wait_started(epoch - 1):
                    return
                self._drop(epoch - 2)
                self._publish(epoch)
                if self.refresh > 0 and (epoch + 1) % self.refresh == 0 and epoch + 1 < self.epochs:
                    # the next epoch must see the new prompt: it is produced after the round
                    if not self._prompt_round(epoch):
                        return
        except BaseException as err:  # surfaced by the driver after fit()
            self.error = err
            self.log(f"soft-ranking cache producer failed: {err!r}")


class RayCacheKD:
    """Student-rank side of the cache: zero-copy reads of this rank's shards for each epoch."""

    def __init__(self, directory, rank: int, shards: list[int], refresh_epochs: int, seed: int,
                 projector: torch.nn.Module | None = None) -> None:
        self.directory, self.rank, self.shards = directory, rank, shards
        self.refresh, self.seed, self.projector = refresh_epochs, seed, projector
        self.version = -1
        self._items: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int):
        import ray

        got = ray.get(self.directory.fetch.remote(epoch, self.shards))
        if got is None:
            raise TrainingEnded(epoch)
        version, shard_refs, items_ref = got
        parts: list[SoftRanking] = ray.get([r[0] for r in shard_refs])
        ranking = parts[0] if len(parts) == 1 else concat_rankings(parts, epoch_seed(self.seed, epoch, 10_000 + self.rank))
        if version != self.version or self._items is None:
            self._items = {m: torch.from_numpy(np.array(h)) for m, h in ray.get(items_ref[0]).items()}
            self.version = version
        self.directory.consumed.remote(epoch, self.rank, sum(p.nbytes() for p in parts))
        return ranking, self._items, True

    def after_epoch(self, epoch: int, user_emb: torch.Tensor, item_emb: torch.Tensor):
        import ray

        if self.refresh <= 0 or (epoch + 1) % self.refresh != 0:
            return None
        if self.rank == 0:
            proj = None
            if isinstance(self.projector, torch.nn.Linear):
                proj = {"weight": self.projector.weight.detach().numpy().copy()}
            ref = ray.put((user_emb.detach().numpy(), item_emb.detach().numpy(), proj))
            ray.get(self.directory.put_student.remote(epoch, [ref]))
        return {"requested": True}


def concat_rankings(parts: list[SoftRanking], seed: int) -> SoftRanking:
    """Several shards on one rank: concatenate and shuffle so batches mix shards."""
    order = np.random.default_rng(seed).permutation(sum(len(p) for p in parts))
    cat = lambda xs: np.concatenate(xs)[order]  # noqa: E731
    return SoftRanking(cat([p.users for p in parts]), cat([p.items for p in parts]),
                       {m: cat([p.modal_logits[m] for p in parts]) for m in parts[0].modal_logits},
                       cat([p.fused_logits for p in parts]), cat([p.margins for p in parts]))
