"""The soft-ranking cache recovers: a teacher rank killed during a prompt round (b) or a shard actor
killed mid-run (d) costs a restart, not the run, and gives the uninterrupted run's metrics; a freed
epoch asked for again is recomputed identically; what cannot recover (a dead producer, an actor
whose restarts are used up, a timeout) ends the run within seconds with one line naming it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from promptmm_dist import faults
from promptmm_dist.actor_calls import ActorLost, ActorTimeout, bounded_get
from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.distill.cache import CacheDirectory, RayCacheKD, SoftRankingCache
from promptmm_dist.distributed import run_distributed
from tests.helpers import teacher_ranks_alive, tiny_config


def _cfg(max_failures: int = 3, timeout_s: float = 120.0):
    """Tiny real-subset run with two prompt rounds (after student epochs 1 and 3 of 6), local Train mode."""
    cfg = tiny_config(epochs=6)
    cfg.seed = 7
    cfg.teacher.epochs = 2
    cfg.teacher.lr = cfg.student.lr = 0.01  # metrics clearly above 0 after a few epochs
    cfg.prompt.refresh_epochs = 2
    cfg.prompt.round_steps = 25  # long enough (~1-3 s) to be caught in the middle
    cfg.dist.num_workers = 0
    cfg.dist.num_shards = 2
    cfg.dist.max_failures = max_failures
    cfg.dist.actor_timeout_s = timeout_s
    return cfg


@pytest.fixture(scope="module")
def subset(tiktok_path):
    return subset_first_users(load_dataset(tiktok_path), 300)


@pytest.fixture(scope="module")
def reference(subset, tmp_path_factory, ray_session):
    """The same seed's uninterrupted run (teacher and student); later runs reuse its teacher."""
    out = tmp_path_factory.mktemp("reference")
    metrics = run_distributed(subset, _cfg(), out)
    return out, metrics


def _student(subset, out: Path, teacher: Path, cfg) -> dict:
    return run_distributed(subset, cfg, out, stages=("student",), teacher_dir=teacher)["student"]


def _in_method(cls: str, method: str, nth: int = 1):
    """The pid of an actor of class `cls` of this session while it runs `method` for the `nth` time
    (its process title names the method it runs)."""
    role = {"TeacherRank": "teacher_model", "TeacherWorker": "teacher_worker", "ShardState": "shard"}[cls]
    seen = {"n": 0, "inside": False}

    def find() -> int | None:
        for pid in faults.actor_pids(role):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(f"ray::{cls}.{method}"):
                if not seen["inside"]:
                    seen["n"], seen["inside"] = seen["n"] + 1, True
                return pid if seen["n"] >= nth else None
        seen["inside"] = False
        return None
    return find


class _Killer(threading.Thread):
    """SIGKILL the pid `find()` first returns (polled every 20 ms); `killed`, `at` (monotonic)."""

    def __init__(self, find, delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.find, self.delay = find, delay
        self.killed: int | None = None
        self.at = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.done.is_set() and time.monotonic() < deadline:
            pid = self.find()
            if pid is not None:
                time.sleep(self.delay)
                self.killed, self.at = faults.kill_pid(pid), time.monotonic()
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def _kill(find, delay: float = 0.0) -> _Killer:
    k = _Killer(find, delay)
    k.start()
    return k


def _same_metrics(got: dict, want: dict, out: Path, ref_out: Path) -> None:
    """Selected epoch and val/test metrics to 1e-6, and in fact the very same student embeddings."""
    assert want["val"]["recall@20"] > 0 and want["test"]["recall@20"] > 0  # a comparison that can fail
    assert got["best_epoch"] == want["best_epoch"]
    # every epoch, not only the selected one (a fault after the best epoch must not hide): same losses
    # and validation metrics, epoch by epoch
    rows = [[{k: v for k, v in r.items() if k.startswith("loss_") or k == "val"}
             for r in map(json.loads, (o / "student" / "history.jsonl").read_text().splitlines())]
            for o in (out, ref_out)]
    assert len(rows[0]) == len(want_epochs := rows[1]) and rows[0] == want_epochs
    a, b = np.load(out / "student" / "export.npz"), np.load(ref_out / "student" / "export.npz")
    np.testing.assert_array_equal(a["user"], b["user"])
    np.testing.assert_array_equal(a["item"], b["item"])
    for split in ("val", "test"):
        assert got[split]["recall@20"] == pytest.approx(want[split]["recall@20"], abs=1e-6)
        assert got[split]["ndcg@20"] == pytest.approx(want[split]["ndcg@20"], abs=1e-6)


# ----------------------------------------------------------------------------- no Ray needed

@pytest.mark.timeout(60)
def test_a_freed_epoch_asked_again_is_requested_and_timeouts_are_one_line():
    d = CacheDirectory(timeout_s=0.2)
    d.publish(0, 0, {0: ["a"]}, ["items"])
    d.drop(0)  # freed: every rank had consumed it
    got: list = []
    t = threading.Thread(target=lambda: got.append(d.fetch(0, [0], timeout=5.0)))
    t.start()
    deadline = time.monotonic() + 5
    while d.wait_consumed(0, 1, 0.05)["wanted"] != [0] and time.monotonic() < deadline:
        pass
    assert d.wait_consumed(0, 1, 0.0)["wanted"] == [0]  # the producer sees the request
    d.publish(0, 0, {0: ["a2"]}, ["items"])  # ... and republishes
    t.join(5)
    assert got and got[0]["shards"] == [["a2"]] and d.wait_consumed(0, 1, 0.0)["wanted"] == []

    msg = d.fetch(3, [0])  # never published: bounded by the directory's timeout, one line
    assert isinstance(msg, str) and "\n" not in msg and "epoch 3" in msg and "dist.actor_timeout_s" in msg
    assert d.failure() == msg and d.fetch(0, [0]) == msg  # and every rank hears the same


# --------------------------------------------------------------------------------- with Ray

@pytest.mark.timeout(120)
def test_bounded_get_names_what_timed_out_or_died(ray_session):
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Slow:
        def nap(self, s: float) -> float:
            time.sleep(s)
            return s

    a = Slow.remote()
    t0 = time.monotonic()
    with pytest.raises(ActorTimeout, match=r"timed out after 0.5s waiting for the slow actor \(dist.actor_timeout_s\)"):
        bounded_get(a.nap.remote(30), "the slow actor", 0.5)
    assert time.monotonic() - t0 < 5
    ray.kill(a)
    with pytest.raises(ActorLost, match="the slow actor: the actor is gone"):
        bounded_get(a.nap.remote(0), "the slow actor", 30)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_freed_epoch_is_recomputed_identically(subset, reference, ray_session):
    """A rank that asks again for an epoch already freed (it restarted from a checkpoint) gets it
    recomputed with that epoch's cache version: the same rankings, also across a prompt round."""
    import ray

    from promptmm_dist import ray_setup
    from promptmm_dist.data.shards import make_shard_actors
    from promptmm_dist.distill.teacher_group import TeacherGroup
    from promptmm_dist.distill.teacher_workers import TeacherWorker
    from promptmm_dist.partition.setup import dataset_spec

    out, _ = reference
    cfg = _cfg()
    spec = dataset_spec(subset, str(out / "canon"), out / "canon_spec")
    parquet = Path(spec["dir"]) / "interactions.parquet"
    shards = make_shard_actors(parquet, 2, subset.n_users, subset.n_items, cpus=0, dist=cfg.dist)
    opts = ray_setup.actor_options(cfg.dist)
    model = TeacherGroup(spec, cfg.to_dict(), str(out / "teacher" / "teacher.pt"), 2, 1, num_cpus=0, timeout_s=60.0,
                         max_restarts=0)
    worker = ray.remote(num_cpus=0, **opts)(TeacherWorker).remote()
    directory = ray.remote(num_cpus=0, max_concurrency=16)(CacheDirectory).remote(60.0)
    cache = SoftRankingCache(shards, model, [worker], directory, 1, 6, cfg.seed, 4, 2, 5, log=lambda m: None,
                             timeout_s=60.0).start()
    kd = RayCacheKD(directory, 0, [0, 1], 2, cfg.seed)
    rng = np.random.default_rng(0)
    first = {}
    try:
        for e in range(6):
            first[e] = kd.epoch(e)[0]
            if e in (1, 3):  # rank 0 hands in its embeddings: a prompt round, a new version next epoch
                emb = (rng.normal(size=(subset.n_users, 16)).astype(np.float32),
                       rng.normal(size=(subset.n_items, 16)).astype(np.float32), None)
                ray.get(directory.put_student.remote(e, [ray.put(emb)]))
        assert ray.get(directory.held_epochs.remote()) == [4, 5]  # 0-3 were freed
        # no round after epoch 3: the group went once epoch 4's blocks existed; 4 and 5 came from them
        assert cache.stats.teacher_released_at == 4 and model.ranks == []
        for e in (0, 2):  # a version-0 and a version-1 epoch (the workers hold version 2), asked again
            again = kd.epoch(e)[0]
            np.testing.assert_array_equal(again.users, first[e].users)
            for m in first[e].modal_logits:
                np.testing.assert_array_equal(again.modal_logits[m], first[e].modal_logits[m])
            np.testing.assert_array_equal(again.fused_logits, first[e].fused_logits)
        assert cache.stats.recomputed == 2 and cache.stats.versions == 3
        assert model.ranks == [] and model.restarts == 0  # started anew for the old versions, given back again
    finally:
        cache.stop()
        model.close()
        for a in [worker, directory, *shards]:
            ray.kill(a)
    assert cache.error is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_b_teacher_rank_killed_during_prompt_round(subset, reference, tmp_path, ray_session):
    out, ref = reference
    # the second round: the restarted group must get version 1's prompt and its optimiser state back
    inj = _kill(_in_method("TeacherRank", "prompt_round", nth=2))
    got = _student(subset, tmp_path, out, _cfg())
    inj.stop()
    assert inj.killed is not None, "no teacher rank was caught in its second prompt round"
    assert len(got["prompt_rounds"]) == 2 and got["cache"]["versions"] == 3
    _same_metrics(got, ref["student"], tmp_path, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_d_shard_actor_killed_mid_run(subset, reference, tmp_path, ray_session):
    out, ref = reference
    old = set(faults.actor_pids("shard")) | set(faults.actor_pids("teacher_worker"))  # earlier tests'

    def find() -> int | None:
        """A shard of this run, once its student stage started (its TeacherWorker exists): the shards
        serve every epoch's samples after that, and the final evaluation."""
        if not set(faults.actor_pids("teacher_worker")) - old:
            return None
        return next(iter(sorted(set(faults.actor_pids("shard")) - old)), None)

    inj = _kill(find, delay=0.5)
    got = _student(subset, tmp_path, out, _cfg())
    inj.stop()
    assert inj.killed is not None
    _same_metrics(got, ref["student"], tmp_path, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dead_actor_or_producer_fails_the_run_in_seconds_with_one_line(subset, reference, tmp_path,
                                                                        ray_session, monkeypatch, capfd):
    out, _ = reference
    timeout_s = 120.0
    # an actor whose restarts are used up (none allowed): killed during the prompt round
    inj = _kill(_in_method("TeacherRank", "prompt_round"))
    with pytest.raises(ActorLost) as err:
        _student(subset, tmp_path / "dead_actor", out, _cfg(max_failures=0, timeout_s=timeout_s))
    lost_s = time.monotonic() - inj.at
    assert inj.killed is not None
    line = str(err.value)
    assert "\n" not in line and "TeacherRank" in line and "prompt round" in line, line
    assert lost_s < 30 < timeout_s  # within seconds, not after the configured timeout
    assert line in capfd.readouterr().err

    # the producer thread itself dies (an unexpected error in it)
    real = SoftRankingCache._publish

    def broken(self, epoch, version=None):
        if epoch == 2:
            raise RuntimeError("injected producer fault")
        return real(self, epoch, version)

    monkeypatch.setattr(SoftRankingCache, "_publish", broken)
    t0 = time.monotonic()
    with pytest.raises(ActorLost) as err:
        _student(subset, tmp_path / "dead_producer", out, _cfg(timeout_s=timeout_s))
    assert str(err.value) == "soft-ranking cache producer failed: RuntimeError: injected producer fault"
    assert time.monotonic() - t0 < timeout_s


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tune_shared_cache_lost_is_rebuilt(subset, reference, ray_session):
    """A Tune shared cache owns the refs it serves: when its process dies they are gone, the actor is
    restarted from the teacher file and a trial rank that cannot read an epoch gets it recomputed. It
    holds no teacher: a 2-rank teacher group makes version 0's blocks and is gone once they exist."""
    import os
    import signal

    import ray

    from promptmm_dist import ray_setup
    from promptmm_dist.data.prepare import ensure_canonical
    from promptmm_dist.data.shards import make_shard_actors
    from promptmm_dist.partition.setup import dataset_spec
    from promptmm_dist.tune.hub import SharedCacheProducer, SharedTeacherCache

    out, _ = reference
    cfg = _cfg()
    parquet = Path(ensure_canonical(subset, out / "canon")) / "interactions.parquet"
    shards = make_shard_actors(parquet, 2, subset.n_users, subset.n_items, cpus=0, dist=cfg.dist)
    spec = dataset_spec(subset, str(parquet.parent), out / "canon_spec")
    shared = ray.remote(num_cpus=0, max_concurrency=8, **ray_setup.actor_options(cfg.dist))(SharedTeacherCache).remote(
        spec, cfg.to_dict(), str(out / "teacher" / "teacher.pt"), shards, cfg.seed, 4, 5, 0, "k", 2)
    directory = ray.remote(num_cpus=0, max_concurrency=16)(CacheDirectory).remote(60.0)
    ray.get(shared.join.remote("t1", directory))
    assert ray.get(shared.get_stats.remote())["teacher_ranks"] == 2

    assert teacher_ranks_alive() == []  # the group is closed once version 0's blocks exist
    producer = SharedCacheProducer(shared, "t1", lambda: None, shards, None, [], directory, 1, 3, cfg.seed, 4, 0, 5,
                                   log=lambda m: None, timeout_s=60.0).start()
    kd = RayCacheKD(directory, 0, [0, 1], 0, cfg.seed)
    try:
        kd.epoch(0)
        deadline = time.monotonic() + 60
        while 1 not in ray.get(directory.held_epochs.remote()) and time.monotonic() < deadline:
            time.sleep(0.1)  # epoch 1 published: its refs belong to the shared cache actor
        refs, _ = ray.get(shared.epoch.remote(1, "probe"))
        want = [ray.get(refs[k][0]) for k in sorted(refs)]
        want_users = np.concatenate([w.users for w in want])
        old_pid = ray.get(shared.pid.remote())
        os.kill(old_pid, signal.SIGKILL)
        del refs, want
        assert ray.get(shared.pid.remote(), timeout=120) != old_pid  # restarted (teacher reloaded)
        got = kd.epoch(1)[0]  # OwnerDiedError -> asked again -> recomputed by the restarted actor
        np.testing.assert_array_equal(np.sort(got.users), np.sort(want_users))
        assert producer.stats.recomputed == 1
        assert ray.get(shared.get_stats.remote())["epochs_computed"] >= 1  # the restarted actor computed it
        assert teacher_ranks_alive() == []  # its new group made the blocks again and is gone too
    finally:
        producer.stop()
        for a in [shared, directory, *shards]:
            ray.kill(a)
    assert producer.error is None
