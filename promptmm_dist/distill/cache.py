"""The teacher soft-ranking cache in the Ray object store.

Driver side, `SoftRankingCache` runs a producer thread. Per cache version it asks the teacher group
(`teacher_group.TeacherGroup`: the frozen teacher partitioned over W ranks) once for the teacher's
final embeddings as blocks (each shard's user rows, the item table); for each
epoch it asks every shard for its samples and a TeacherWorker for their soft ranking from the shard's
user block and the item block (workers take shards in turn). Once no prompt round is left (with a
frozen prompt: right after version 0) the teacher group is closed: the blocks outlive it. The driver *owns* those refs (it created them),
publishes them in a small `CacheDirectory` actor that student ranks query, stays at most one epoch
ahead of the students (two epochs held), frees an epoch once every rank consumed it, and runs a
prompt round (new cache version) when the students hand in their embeddings at a refresh epoch.

Recovery: an epoch is a pure function of (seed, epoch, shard, cache version, teacher checkpoint),
so nothing is lost for good when something dies. The producer keeps every version's prompt
(`PromptState`, small) and passes it with each call, so a TeacherWorker or shard actor that Ray
restarts (rebuilt from its files) and a call Ray retries on it give the same result; a rank that
asks for an epoch already freed (it restarted from a checkpoint) or whose refs were lost gets it
recomputed; a teacher rank that dies takes its group down, which starts again (`TeacherGroup.restart`)
and makes the call again (blocks already made stay: the driver owns them). What cannot recover (an actor's restarts used up, the producer thread failing, a wait
over `dist.actor_timeout_s`) ends the run within seconds with one line naming it: the directory
records the failure, every rank's next fetch raises `CacheFailed` (an error, not a clean end: Ray
Train then tears the whole worker group down, so no rank is left waiting in a collective; its
restarts fail again at their first fetch) and the driver raises the recorded line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from promptmm_dist.actor_calls import (DEFAULT_TIMEOUT_S, ActorLost, ActorTimeout, bounded_get, bounded_wait,
                                       one_line)
from promptmm_dist.distill.local_kd import epoch_seed
from promptmm_dist.distill.teacher_model import PromptState
from promptmm_dist.errors import RunFailed
from promptmm_dist.train.steps import SoftRanking, join_by_step
from promptmm_dist.train.student_loop import TrainingEnded

POLL_S = 1.0  # the producer's directory polls (it also serves recompute requests between them)
MAX_ASKS = 4  # a rank re-asks for an epoch whose refs were lost at most this often


class CacheFailed(RunFailed):
    """The cache cannot serve the run any more (recorded in the directory, whose line the driver
    raises). Raised, not returned: one rank returning while another trains would leave that one
    blocked in a DDP collective."""


class CacheDirectory:
    """Where published epochs are looked up (refs wrapped in lists so Ray passes them as refs)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._epochs: dict[int, dict] = {}
        self._consumed: dict[int, dict[int, int]] = {}
        self._pairs: dict[int, dict[int, int]] = {}  # epoch -> {rank: training pairs read}
        self._students: dict[int, list] = {}
        self._stopped = False
        self._end_requested = False  # tune: the scheduler stopped this trial early
        self._fetched: set[int] = set()
        self._ended: set[int] = set()
        self._published: set[int] = set()
        self._wanted: set[int] = set()  # freed or lost epochs a rank asked for again
        self._gen = 0
        self._failure: str | None = None

    def settings(self) -> dict:
        return {"timeout_s": self.timeout_s}

    def publish(self, epoch: int, version: int, shard_refs: dict[int, list], items_ref: list,
                prompt_ref: list | None = None) -> None:
        with self._cond:
            self._gen += 1
            self._epochs[epoch] = {"version": version, "shards": shard_refs, "items": items_ref,
                                   "prompt": prompt_ref or [None], "gen": self._gen}
            self._published.add(epoch)
            self._wanted.discard(epoch)
            self._cond.notify_all()

    def fetch(self, epoch: int, shards: list[int], timeout: float | None = None):
        """Block until `epoch` is published. Returns {"version", "shards": [[ref] per shard], "items":
        [ref], "prompt": [ref], "gen"}; None when training must end before `epoch` (see
        `request_end`); a one-line message when the cache failed or the wait timed out. An epoch
        published before but freed since is asked for again (the producer recomputes it)."""
        timeout = self.timeout_s if timeout is None else timeout
        with self._cond:
            if epoch in self._published and epoch not in self._epochs:
                self._wanted.add(epoch)
                self._cond.notify_all()
            ok = self._cond.wait_for(lambda: epoch in self._epochs or self._stopped or self._failure is not None
                                     or epoch in self._ended
                                     or (self._end_requested and epoch not in self._fetched), timeout)
            if self._end_requested and epoch not in self._fetched:
                self._ended.add(epoch)  # decided once per epoch, so every rank sees the same answer
            if epoch in self._ended:
                return None
            if self._failure is not None:
                return self._failure
            if not ok or epoch not in self._epochs:
                what = "stopped" if self._stopped else f"timed out after {timeout:g}s (dist.actor_timeout_s)"
                self._failure = f"soft-ranking cache: epoch {epoch} was never published ({what})"
                self._cond.notify_all()
                return self._failure
            self._fetched.add(epoch)
            e = self._epochs[epoch]
            return {"version": e["version"], "shards": [e["shards"][k] for k in shards], "items": e["items"],
                    "prompt": e["prompt"], "gen": e["gen"]}

    def invalidate(self, epoch: int, gen: int) -> None:
        """A rank could not read `epoch`'s refs (their owner or objects were lost): recompute it."""
        with self._cond:
            if epoch in self._epochs and self._epochs[epoch]["gen"] == gen:
                del self._epochs[epoch]
                self._wanted.add(epoch)
                self._cond.notify_all()

    def request_end(self) -> None:
        """End training cleanly before the next epoch no rank has fetched yet (a Tune scheduler
        stopped the trial: the trainer then returns normally and Ray Train releases its workers)."""
        with self._cond:
            self._end_requested = True
            self._cond.notify_all()

    def consumed(self, epoch: int, rank: int, nbytes: int, pairs: int = 0) -> None:
        with self._cond:
            self._consumed.setdefault(epoch, {})[rank] = nbytes
            self._pairs.setdefault(epoch, {})[rank] = pairs
            self._cond.notify_all()

    def _news(self) -> bool:
        return bool(self._wanted) or self._stopped or self._failure is not None

    def wait_consumed(self, epoch: int, n_ranks: int, timeout: float) -> dict:
        """Wait up to `timeout` for every rank to fetch `epoch`, waking early for recompute requests
        or a failure: {"consumed": {rank: bytes} or None, "pairs": {rank: pairs} or None, "wanted": [...],
        "failure": str or None}."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._consumed.get(epoch, {})) >= n_ranks or self._news(), timeout)
            got = self._consumed.get(epoch, {})
            done = len(got) >= n_ranks
            return {"consumed": dict(got) if done else None,
                    "pairs": dict(self._pairs.get(epoch, {})) if done else None,
                    "wanted": sorted(self._wanted), "failure": self._failure}

    def drop(self, epoch: int) -> None:
        with self._cond:
            self._epochs.pop(epoch, None)

    def put_student(self, epoch: int, wrapped_ref: list, rank: int = 0) -> None:
        """Student rank `rank`'s rows at refresh epoch `epoch` (each rank hands in its own)."""
        with self._cond:
            self._students.setdefault(epoch, {})[rank] = wrapped_ref
            self._cond.notify_all()

    def wait_student(self, epoch: int, n_ranks: int, timeout: float) -> dict:
        """Like `wait_consumed`, for the ranks' embeddings at a refresh epoch: {"student": [[ref] per
        rank] once all `n_ranks` handed theirs in, else None, ...}."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._students.get(epoch, {})) >= n_ranks or self._news(), timeout)
            got = self._students.get(epoch, {})
            parts = None
            if len(got) >= n_ranks:
                parts = [got[r] for r in sorted(got)]
                del self._students[epoch]
            return {"student": parts, "wanted": sorted(self._wanted), "failure": self._failure}

    def fail(self, message: str) -> None:
        """Record the first failure; every waiting and later fetch returns it."""
        with self._cond:
            if self._failure is None:
                self._failure = message
            self._cond.notify_all()

    def failure(self) -> str | None:
        with self._cond:
            return self._failure

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
    produce_s: float = 0.0  # time the driver's producer spent waiting for the teacher actors
    tables_s: float = 0.0  # of which: the versions' embedding blocks (one teacher forward each)
    rank_s: list[float] = field(default_factory=list)  # per epoch: samples + soft rankings, blocks at hand
    bytes_per_epoch: list[int] = field(default_factory=list)
    pairs_per_epoch: list[int] = field(default_factory=list)  # training pairs the ranks read, per epoch
    max_epochs_held: int = 0
    rounds: list[dict] = field(default_factory=list)
    recomputed: int = 0  # epochs produced again on a rank's request (freed or lost)
    teacher_released_at: int | None = None  # epoch after whose blocks no round was left: the group went

    def bytes_per_pair(self) -> float:
        """Object-store bytes per cached training pair (ids int32, logits float16), over the epochs
        whose pair counts the ranks reported; 0.0 before any."""
        counted = [(b, n) for b, n in zip(self.bytes_per_epoch, self.pairs_per_epoch) if n > 0]
        pairs = sum(n for _, n in counted)
        return round(sum(b for b, _ in counted) / pairs, 2) if pairs else 0.0


class SoftRankingCache:
    """Driver-side producer of cache epochs (runs in a background thread while `fit()` blocks).

    `model`: the `TeacherGroup` (blocks per version, prompt rounds; as many ranks as the students);
    `teacher_workers`: the TeacherWorker actors that rank the shards' samples from the blocks.
    `first_epoch`/`prompt`: a resumed run starts producing at `first_epoch` with the prompt state of
    its cache version (recorded in the student checkpoint; None = the teacher checkpoint's, version 0).
    `on_round(PromptState)`: called with each new version's prompt (e.g. to save it beside the run).
    """

    def __init__(self, shards: list, model, teacher_workers: list, directory, n_ranks: int, epochs: int,
                 seed: int, n_neg: int, refresh_epochs: int, n_steps: int, log=print,
                 timeout_s: float = DEFAULT_TIMEOUT_S, first_epoch: int = 0, prompt: PromptState | None = None,
                 on_round=None) -> None:
        self.shards, self.model, self.workers, self.directory = shards, model, teacher_workers, directory
        self.n_ranks, self.epochs, self.seed, self.n_neg, self.n_steps = n_ranks, epochs, seed, n_neg, n_steps
        self.refresh = refresh_epochs
        self.log = log
        self.timeout_s = timeout_s
        self.first_epoch = first_epoch
        self.on_round = on_round
        start = prompt or PromptState(0, None)
        self.version = start.version
        self.prompts: dict[int, PromptState] = {start.version: start}  # every version's prompt (small)
        self._prompt_refs: dict[int, object] = {}
        self.epoch_version: dict[int, int] = {}
        self._position = first_epoch  # the epoch the producer loop is on (rounds ahead are counted from it)
        self.refs: dict[int, list] = {}  # epoch -> the driver-owned refs of that epoch
        self.tables: dict[int, list] = {}  # cache version -> its N + 1 embedding-block refs
        self._status: dict[int, list] = {}  # cache version -> the teacher ranks' small status refs
        self._tables_lock = threading.Lock()  # the producer thread and the driver (`tables_of`) ask
        self.stats = CacheStats(versions=self.version + 1)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soft-ranking-cache", daemon=True)

    def start(self) -> "SoftRankingCache":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop producing; a failure recorded by a rank (or a lost directory) becomes `self.error`."""
        self._stop.set()
        try:
            failure = self._call(self.directory.failure.remote(), "the cache directory")
            self._call(self.directory.stop.remote(), "the cache directory")
        except (ActorLost, ActorTimeout) as err:
            failure = str(err)
        self._thread.join(timeout=self.timeout_s)
        if self.error is None and failure:
            self.error = ActorLost(failure)
        self.refs.clear()
        self.tables.clear()
        self._status.clear()

    # ------------------------------------------------------------------------------ helpers
    def _call(self, refs, what: str):
        return bounded_get(refs, what, self.timeout_s)

    def _prompt_ref(self, version: int):
        """One object-store copy of a version's prompt, passed with every call of that version."""
        import ray

        if version not in self.prompts:
            raise ActorLost(f"soft-ranking cache: cache version {version} was never produced by this run")
        if version not in self._prompt_refs:
            self._prompt_refs[version] = ray.put(self.prompts[version])
        return self._prompt_refs[version]

    def _tables(self, version: int) -> list:
        """Cache `version`'s embedding blocks: one partitioned teacher forward, N + 1 objects (see
        `TeacherRank.version_tables`); this version's and the newest other are kept."""
        with self._tables_lock:
            return self._tables_locked(version)

    def tables_of(self, version: int) -> list:
        """Cache `version`'s N + 1 block refs (driver-owned; e.g. version 0's for `init_from_teacher`)."""
        return list(self._tables(version))

    def _tables_locked(self, version: int) -> list:
        if version not in self.tables:
            self.model.ensure_started()  # given back once no round was left: an old version asked again
            blocks, status = self.model.version_tables(version, self._prompt_ref(version), len(self.shards))
            self.tables[version], self._status[version] = blocks, status
            for old in [x for x in sorted(self.tables) if x != version][:-1]:
                del self.tables[old]
                self._status.pop(old, None)
        return self.tables[version]

    def _made_tables(self, version: int) -> list:
        """Cache `version`'s blocks once the teacher ranks made them; a rank that died on the way
        starts the group again and the version is asked for again (`ActorLost` once restarts are
        used up). Only the ranks' small status values are read here, never a block."""
        while True:
            tables = self._tables(version)
            try:
                self.model.gather(self._status[version], f"cache version {version}'s embeddings (the teacher group)")
                return tables
            except ActorLost as err:
                with self._tables_lock:
                    self.tables.pop(version, None)
                    self._status.pop(version, None)
                self.model.restart(str(err))

    def _round_ahead(self) -> bool:
        """Whether a prompt round is still to come (at or after the producer loop's epoch)."""
        return self.refresh > 0 and any((e + 1) % self.refresh == 0 and e + 1 < self.epochs
                                        for e in range(self._position, self.epochs))

    def _release_idle_teacher(self, epoch: int) -> None:
        """Close the teacher group once its blocks exist and no prompt round is left: with a frozen
        prompt that is right after version 0, so the W ranks (each a 1/W share of the graph and of the
        teacher) do not sit beside the students for the whole stage. The blocks stay (the driver owns
        them); a version asked for again starts the group anew (`_tables_locked`)."""
        if self.model is None or self._round_ahead() or not self.model.ranks:
            return
        self.model.close()
        if self.stats.teacher_released_at is None:
            self.stats.teacher_released_at = epoch
            self.log(f"soft-ranking cache: no prompt round left after epoch {epoch}'s blocks; "
                     "the teacher group is given back")

    def _items_ref(self, version: int | None = None):
        """The item block of a version (the ranks' embedding-KD tables)."""
        return self._tables(self.version if version is None else version)[-1]

    def _version_for(self, epoch: int) -> int:
        """The cache version epoch `epoch` is produced with (rounds after every `refresh` epochs)."""
        if epoch in self.epoch_version:
            return self.epoch_version[epoch]
        return epoch // self.refresh if self.refresh > 0 else 0

    def _culprit(self, samples: list, refs: list, epoch: int, version: int) -> str:
        """Name what broke an epoch: the teacher group (its blocks failed), a shard actor (its samples
        failed) or a TeacherWorker."""
        import ray

        try:
            self.model.gather(self._status.get(version, []), "the teacher group")
        except Exception as err:  # noqa: BLE001
            return f"epoch {epoch}: the teacher group failed on cache version {version}'s embeddings ({one_line(err)})"
        for k, r in enumerate(refs):
            try:
                ray.get(r, timeout=self.timeout_s)
            except Exception as err:  # noqa: BLE001 - reported as one line
                try:
                    ray.get(samples[k], timeout=self.timeout_s)
                except Exception as inner:  # noqa: BLE001
                    return f"epoch {epoch}: shard actor {k} failed ({one_line(inner)})"
                return (f"epoch {epoch}: TeacherWorker {k % len(self.workers)} failed on shard {k} "
                        f"({one_line(err)})")
        return f"epoch {epoch}: failed"

    def _publish(self, epoch: int, version: int | None = None) -> None:
        v = self.version if version is None else version
        t0 = time.perf_counter()
        prompt = self._prompt_ref(v)
        # a new version's one forward (instant once made), timed apart from the epoch's ranking work
        tables = self._made_tables(v)
        self.stats.tables_s += time.perf_counter() - t0
        self._release_idle_teacher(epoch)
        t1 = time.perf_counter()
        n = len(self.shards)
        samples = [s.epoch_samples.remote(self.n_neg, epoch_seed(self.seed, epoch), self.n_steps) for s in self.shards]
        refs = [self.workers[k % len(self.workers)].soft_ranking.remote(tables[k], tables[n], samples[k], k, n)
                for k in range(n)]
        self.refs[epoch] = refs
        self.epoch_version[epoch] = v
        self._call(self.directory.publish.remote(epoch, v, {k: [r] for k, r in enumerate(refs)},
                                                 [tables[n]], [prompt]), "the cache directory")
        bounded_wait(refs, f"the soft rankings of epoch {epoch} (TeacherWorker and shard actors)", self.timeout_s)
        try:
            self._call(refs, f"the soft rankings of epoch {epoch}")
        except Exception:  # noqa: BLE001 - a value holds an error: say which actor
            raise ActorLost(self._culprit(samples, refs, epoch, v)) from None
        self.stats.rank_s.append(time.perf_counter() - t1)
        self.stats.produce_s += time.perf_counter() - t0
        self.stats.epochs_published += 1
        self.stats.max_epochs_held = max(self.stats.max_epochs_held, len(self.refs))

    def _news(self, got: dict, current: int) -> None:
        """Act on a directory poll: a recorded failure ends the producer; freed or lost epochs that a
        rank asked for again are recomputed (same seed, same cache version: the same rankings)."""
        if got.get("failure"):
            raise ActorLost(got["failure"])
        for e in got.get("wanted", []):
            for old in [x for x in self.refs if x < e and x < current - 1]:
                self._drop(old)  # recomputed epochs behind the one asked for are done with
            v = self._version_for(e)
            self._publish(e, v)
            self.stats.recomputed += 1
            self.log(f"soft-ranking cache: recomputed epoch {e} (cache version {v}) for a rank that asked again")

    def _wait_started(self, epoch: int) -> bool:
        """Block until every rank has fetched `epoch` (so all are done with the epoch before it).
        Not bounded by a timeout: what is waited for is training itself, and when Ray Train gives
        up, `fit()` returns and the driver stops this thread; each directory call is bounded."""
        while not self._stop.is_set():
            got = self._call(self.directory.wait_consumed.remote(epoch, self.n_ranks, POLL_S), "the cache directory")
            self._news(got, epoch)
            if got["consumed"] is not None:
                self.stats.bytes_per_epoch.append(int(sum(got["consumed"].values())))
                self.stats.pairs_per_epoch.append(int(sum((got.get("pairs") or {}).values())))
                return True
        return False

    def _drop(self, epoch: int) -> None:
        """Free a finished epoch: the directory forgets it and the driver drops its refs."""
        if epoch in self.refs:
            self._call(self.directory.drop.remote(epoch), "the cache directory")
            del self.refs[epoch]

    def _prompt_round(self, epoch: int) -> bool:
        from ray.exceptions import ObjectLostError

        while not self._stop.is_set():
            got = self._call(self.directory.wait_student.remote(epoch, self.n_ranks, POLL_S), "the cache directory")
            self._news(got, epoch)
            if got["student"] is None:
                continue
            students = [part[0] for part in got["student"]]
            while True:
                self.model.ensure_started()
                try:
                    res = self.model.gather(self.model.prompt_round(
                        students, epoch_seed(self.seed + 1, epoch), self._prompt_ref(self.version)),
                        f"the prompt round after epoch {epoch} (the teacher group)")[0]
                    break
                except ActorLost as err:  # a teacher rank died in the round: a new group runs it again
                    self.model.restart(str(err))
                except ObjectLostError:  # a student rank (their owner) died after handing them in: it will again
                    res = None  # the other teacher ranks may wait in the round's collectives: a new group
                    self.model.restart(f"the student rows of epoch {epoch} were lost")
                    break
            if res is None:
                self.log(f"soft-ranking cache: student embeddings of epoch {epoch} were lost; waiting for them again")
                continue
            new = PromptState(res["version"], res["state"], res.get("optimizer"))
            self.prompts[new.version] = new
            if self.on_round is not None:
                self.on_round(new)
            self.version = new.version
            self.stats.versions = self.version + 1
            summary = {"epoch": epoch, "cache_version": self.version, "round_loss": res["round_loss"],
                       "round_s": res["round_s"]}
            self.stats.rounds.append(summary)
            self.log(f"prompt round after epoch {epoch}: loss {res['round_loss']:.4f}, "
                     f"new cache version {self.version} ({res['round_s']:.1f}s)")
            return True
        return False

    def _run(self) -> None:
        import ray

        try:
            for epoch in range(self.first_epoch, self.epochs):
                if self._stop.is_set():
                    return
                # students are on epoch-1 once they all fetched it: epoch-2 is finished, so at most
                # two epochs (the one being trained and the one prefetched) are ever held
                if epoch > self.first_epoch and not self._wait_started(epoch - 1):
                    return
                for old in [e for e in self.refs if e <= epoch - 2]:
                    self._drop(old)
                self._position = epoch
                self._publish(epoch)
                if self.refresh > 0 and (epoch + 1) % self.refresh == 0 and epoch + 1 < self.epochs:
                    # the next epoch must see the new prompt: it is produced after the round
                    if not self._prompt_round(epoch):
                        return
            while not self._stop.is_set():  # all produced: keep serving ranks that ask again
                self._wait_started(self.epochs)
        except BaseException as err:  # the directory tells every rank; the driver raises it after fit()
            self.error = err if isinstance(err, (ActorLost, ActorTimeout)) else ActorLost(one_line(err))
            line = str(self.error)
            if not line.startswith("soft-ranking cache"):
                line = f"soft-ranking cache producer failed: {line}"
                self.error = type(self.error)(line)
            self.log(line)
            try:
                ray.get(self.directory.fail.remote(line), timeout=min(self.timeout_s, 30))
            except Exception:  # noqa: BLE001 - the directory is gone too: ranks see that themselves
                pass


class RayCacheKD:
    """Student-rank side of the cache: zero-copy reads of this rank's shards for each epoch."""

    def __init__(self, directory, rank: int, shards: list[int], refresh_epochs: int, seed: int,
                 projector: torch.nn.Module | None = None, timeout_s: float | None = None,
                 n_steps: int | None = None) -> None:
        """`n_steps`: the epoch's global training steps; given, a rank with several shards joins their
        rankings step by step (`join_by_step`: the same global batches for any number of ranks), else
        it concatenates and shuffles them."""
        self.directory, self.rank, self.shards, self.n_steps = directory, rank, shards, n_steps
        self.refresh, self.seed, self.projector = refresh_epochs, seed, projector
        self.timeout_s = timeout_s
        self.version = -1
        self._items: dict[str, torch.Tensor] | None = None
        self._prompt: list = [None]

    def _timeout(self) -> float:
        if self.timeout_s is None:
            self.timeout_s = float(self._get(self.directory.settings.remote(), "the cache directory",
                                             DEFAULT_TIMEOUT_S)["timeout_s"])
        return self.timeout_s

    def _fail(self, message: str) -> CacheFailed:
        """Record `message` for the driver and every rank; the error to raise here."""
        try:
            self.directory.fail.remote(message)
        except Exception:  # noqa: BLE001 - the directory is gone: the message still ends this rank
            pass
        return CacheFailed(message)

    def _get(self, refs, what: str, timeout: float):
        try:
            return bounded_get(refs, what, timeout)
        except (ActorLost, ActorTimeout) as err:
            raise self._fail(f"soft-ranking cache, rank {self.rank}: {err}") from None

    def epoch(self, epoch: int):
        import ray
        from ray.exceptions import GetTimeoutError, ObjectLostError, RayError

        timeout = self._timeout()
        for _ in range(MAX_ASKS):
            # the directory answers within `timeout` itself; the margin covers the call
            got = self._get(self.directory.fetch.remote(epoch, self.shards, timeout), "the cache directory",
                            timeout + 30)
            if got is None:
                raise TrainingEnded(epoch)
            if isinstance(got, str):
                raise CacheFailed(got)
            try:
                parts: list[SoftRanking] = ray.get([r[0] for r in got["shards"]], timeout=timeout)
                if got["version"] != self.version or self._items is None:
                    items = ray.get(got["items"][0], timeout=timeout)  # the version's item block
                    self._items = {m: torch.from_numpy(np.array(h)) for m, h in items["modal"].items()}
                    self.version = got["version"]
            except ObjectLostError:  # their owner died (a Tune shared cache) or they were lost: ask again
                self._get(self.directory.invalidate.remote(epoch, got["gen"]), "the cache directory", timeout)
                continue
            except GetTimeoutError:
                raise self._fail(f"soft-ranking cache, rank {self.rank}: timed out after {timeout:g}s waiting "
                                 f"for the soft rankings of epoch {epoch} (dist.actor_timeout_s)") from None
            except RayError as err:
                raise self._fail(f"soft-ranking cache, rank {self.rank}: epoch {epoch}: {one_line(err)}") from None
            self._prompt = got["prompt"]
            if len(parts) == 1:
                ranking = parts[0]
            elif self.n_steps:
                ranking = join_by_step(parts, self.n_steps)
            else:
                ranking = concat_rankings(parts, epoch_seed(self.seed, epoch, 10_000 + self.rank))
            self.directory.consumed.remote(epoch, self.rank, sum(p.nbytes() for p in parts),
                                           sum(len(p) for p in parts))
            return ranking, self._items, True
        raise self._fail(f"soft-ranking cache, rank {self.rank}: epoch {epoch} was lost {MAX_ASKS} times")

    def prompt_state(self) -> PromptState | None:
        """The prompt of the cache version this rank last read (for the student checkpoint: a resumed
        run's producer starts from it). None before the first epoch."""
        if self._prompt[0] is None:
            return None
        return self._get(self._prompt[0], "the prompt state", self._timeout())

    def after_epoch(self, epoch: int, user_emb: torch.Tensor, item_emb: torch.Tensor):
        import ray

        if self.refresh <= 0 or (epoch + 1) % self.refresh != 0:
            return None
        # every rank hands in its own rows, for the teacher rank of the same partition
        proj = None
        if isinstance(self.projector, torch.nn.Linear):
            proj = {"weight": self.projector.weight.detach().cpu().numpy().copy()}
        ref = ray.put((user_emb.detach().cpu().numpy(), item_emb.detach().cpu().numpy(), proj))
        self._get(self.directory.put_student.remote(epoch, [ref], self.rank), "the cache directory", self._timeout())
        return {"requested": True}


def concat_rankings(parts: list[SoftRanking], seed: int) -> SoftRanking:
    """Several shards on one rank: concatenate and shuffle so batches mix shards."""
    order = np.random.default_rng(seed).permutation(sum(len(p) for p in parts))
    cat = lambda xs: np.concatenate(xs)[order]  # noqa: E731
    return SoftRanking(cat([p.users for p in parts]), cat([p.items for p in parts]),
                       {m: cat([p.modal_logits[m] for p in parts]) for m in parts[0].modal_logits},
                       cat([p.fused_logits for p in parts]), cat([p.margins for p in parts]))
