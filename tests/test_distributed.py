"""The Ray pieces: shards, the soft-ranking cache, prompt rounds, and a whole distributed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.prepare import ensure_canonical
from promptmm_dist.data.shards import ShardState
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.distill.teacher_group import TeacherGroup
from promptmm_dist.distill.teacher_workers import TeacherWorker
from promptmm_dist.distributed import run_distributed
from promptmm_dist.pipeline import teacher_stage
from promptmm_dist.run_io import load_state
from promptmm_dist.train.steps import soft_ranking
from tests.helpers import teacher_ranks_alive, tiny_config, tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dataset, its canonical parquet and a trained teacher checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    data = tiny_data()
    folder = ensure_canonical(data, root / "data")
    cfg = tiny_config()
    cfg.teacher.epochs = 1
    teacher, _ = teacher_stage(data, cfg, root)
    return data, Path(folder) / "interactions.parquet", cfg, root / "teacher" / "teacher.pt", teacher


def _group(tiny, world_size: int, num_shards: int = 2) -> TeacherGroup:
    """The frozen teacher of `tiny` over `world_size` real TeacherRank actors (a gloo group)."""
    from promptmm_dist.partition.setup import dataset_spec

    data, parquet, cfg, ckpt, _ = tiny
    spec = dataset_spec(data, str(parquet.parent), parquet.parent)
    return TeacherGroup(spec, cfg.to_dict(), str(ckpt), num_shards, world_size, num_cpus=0, timeout_s=120.0,
                        max_restarts=0)


def _student_parts(data, world_size: int, num_shards: int, dim: int = 16) -> list[tuple]:
    """Random student tables cut the way student rank r holds them (its users' and items' rows)."""
    from promptmm_dist.partition.plan import PartitionPlan

    user = np.random.default_rng(0).normal(size=(data.n_users, dim)).astype(np.float32)
    item = np.random.default_rng(1).normal(size=(data.n_items, dim)).astype(np.float32)
    degree = np.asarray(data.train_csr.sum(axis=0)).ravel().astype(np.int64)
    plan = PartitionPlan.build(world_size, num_shards, data.n_users, degree)
    return [(user[plan.users_of(r)], item[plan.items_of(r)], None) for r in range(world_size)]


def test_shards_are_disjoint_and_cover_all_users(tiny):
    data, parquet, *_ = tiny
    shards = [ShardState(str(parquet), k, 3, data.n_users, data.n_items) for k in range(3)]
    users = [set(s.users().tolist()) for s in shards]
    assert all(not (a & b) for i, a in enumerate(users) for b in users[i + 1:])
    assert set().union(*users) == set(range(data.n_users))
    assert sum(s.info()["train_pairs"] for s in shards) == data.train_csr.nnz
    for s in shards:  # a shard's samples are its own users' training pairs
        batch = s.epoch_samples(4, seed=0, n_steps=3)
        assert (batch.users % 3 == s.shard).all()


def test_split_files_hold_exactly_each_shards_rows(tiny, tmp_path):
    """`split_by_shard` writes shard k's rows (user % N == k) to its own file, in the canonical order, so a
    shard actor and a rank read only their part and see what filtering the whole file gave; a second
    call reuses the files."""
    from promptmm_dist.data.shards import read_shard, split_by_shard
    from promptmm_dist.partition.rank_data import read_rank_rows

    data, parquet, *_ = tiny
    files = split_by_shard(str(parquet), 3, str(tmp_path / "s3"), data.manifest_sha256)
    assert [Path(f).name for f in files] == [f"shard-{k}-of-3.parquet" for k in range(3)]
    for k, f in enumerate(files):
        mine, whole = read_shard(Path(f), k, 3), read_shard(parquet, k, 3)
        for a, b in zip(mine, whole):
            np.testing.assert_array_equal(a, b)
        assert pq.ParquetFile(f).metadata.num_rows == len(whole[0])  # nothing of the other shards
    for rank in range(2):  # ranks over 3 shards: 0 -> {0, 2}, 1 -> {1}; other shards' files are never opened
        theirs = [f if k % 2 == rank else str(tmp_path / "absent.parquet") for k, f in enumerate(files)]
        got, want = read_rank_rows(parquet, 3, rank, 2, theirs), read_rank_rows(parquet, 3, rank, 2)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    stamp = Path(files[0]).stat().st_mtime_ns
    assert split_by_shard(str(parquet), 3, str(tmp_path / "s3"), data.manifest_sha256) == files
    assert Path(files[0]).stat().st_mtime_ns == stamp


def test_split_files_are_found_from_another_working_directory(tiny, tmp_path, monkeypatch):
    """A relative run folder (`promptmm run --out runs/demo`) still gives the ranks paths they can open:
    Ray Train workers run in their own working directory."""
    from promptmm_dist.data.shards import read_shard, split_by_shard

    data, parquet, *_ = tiny
    monkeypatch.chdir(tmp_path)
    files = split_by_shard(str(parquet), 2, "runs/demo/shards/2", data.manifest_sha256)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for k, f in enumerate(files):
        assert Path(f).is_absolute()
        np.testing.assert_array_equal(read_shard(Path(f), k, 2)[0], read_shard(parquet, k, 2)[0])


def test_shard_negatives_are_never_training_items(tiny):
    data, parquet, *_ = tiny
    dense = data.train_csr.toarray().astype(bool)
    for k in range(2):
        batch = ShardState(str(parquet), k, 2, data.n_users, data.n_items).epoch_samples(6, seed=k, n_steps=3)
        assert dense[batch.users, batch.items[:, 0]].all()
        assert not dense[batch.users[:, None], batch.items[:, 1:]].any()


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_logits_equal_a_direct_teacher_forward(tiny, ray_session, world_size):
    """A TeacherWorker ranks a shard's samples from the blocks of the partitioned teacher (W real
    TeacherRank actors; each shard's user rows from the rank that owns them, the item table gathered)
    as a direct forward of the whole teacher in one process would."""
    import ray

    data, parquet, cfg, ckpt, teacher = tiny
    n = 2
    group = _group(tiny, world_size, n)
    worker = ray.remote(num_cpus=0)(TeacherWorker).remote()
    try:
        blocks, status = group.version_tables(0, None, n)
        held = group.gather(status, "status")
        assert [s["rank"] for s in held] == list(range(world_size))
        # each rank holds its partition only (W = 2: a part of the users and of the items), together all
        assert sum(s["users"] for s in held) == data.n_users and sum(s["items"] for s in held) == data.n_items
        assert all(s["users"] < data.n_users and s["items"] < data.n_items for s in held) or world_size == 1
        samples = ShardState(str(parquet), 1, n, data.n_users, data.n_items).epoch_samples(5, seed=1, n_steps=3)
        cached = ray.get(worker.soft_ranking.remote(blocks[1], blocks[n], samples, 1, n))
        with pytest.raises(ray.exceptions.RayTaskError, match="other shards"):  # shard 0's block, shard 1's users
            ray.get(worker.soft_ranking.remote(blocks[0], blocks[n], samples, 0, n))
        teacher.eval()
        with torch.no_grad():
            direct = soft_ranking(teacher(GraphPropagator.from_train(data.train_csr)), samples.users, samples.items)
        for m in direct.modal_logits:  # float16 logits of float32 sums in another order
            np.testing.assert_allclose(cached.modal_logits[m].astype(np.float32),
                                       direct.modal_logits[m].astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(cached.margins, direct.margins, rtol=1e-4, atol=1e-5)
        assert cached.fused_logits.dtype == np.float16
        assert group.gather([r.forward_count.remote() for r in group.ranks], "forwards") == [1] * world_size

        # a prompt round (each rank stepping on its share, fed its partition's student rows) makes a new
        # cache version whose logits differ, and leaves every rank with the same prompt
        results = group.gather(group.prompt_round([ray.put(p) for p in _student_parts(data, world_size, n)], 0,
                                                  None), "round")
        assert [r["version"] for r in results] == [1] * world_size
        for other in results[1:]:
            for k, v in results[0]["state"].items():
                torch.testing.assert_close(other["state"][k], v, rtol=0, atol=0)
        assert results[0]["round_loss"] == pytest.approx(results[-1]["round_loss"])  # the global batch's
        with pytest.raises(ray.exceptions.RayTaskError, match="prompt version 1, asked for 0"):
            group.gather(group.version_tables(0, None, n)[1], "status")  # no longer served
        fresh_blocks, _ = group.version_tables(1, None, n)
        fresh = ray.get(worker.soft_ranking.remote(fresh_blocks[1], fresh_blocks[n], samples, 1, n))
        m = next(iter(direct.modal_logits))
        assert not np.array_equal(fresh.modal_logits[m], cached.modal_logits[m])
    finally:
        ray.kill(worker)
        group.close()


def test_two_teacher_ranks_make_the_same_prompt_round_as_one(tiny, ray_session):
    """A round's batch and its prompt-dropout masks are keyed by the pairs' and rows' ids, so 2 teacher
    ranks over 2 shards (each fed its partition's student rows) step the prompt exactly as 1 rank over
    1 shard does, dropout on."""
    import copy

    import ray

    data, parquet, cfg, ckpt, _ = tiny
    cfg = copy.deepcopy(cfg)
    assert cfg.prompt.prompt_dropout > 0
    cfg.prompt.round_steps = 3
    results = {}
    for w in (1, 2):
        group = _group((data, parquet, cfg, ckpt, None), w, num_shards=w)
        try:
            parts = [ray.put(p) for p in _student_parts(data, w, w)]
            results[w] = group.gather(group.prompt_round(parts, 5, None), "round")[0]
        finally:
            group.close()
    assert results[2]["round_loss"] == pytest.approx(results[1]["round_loss"], rel=1e-5)
    for k, v in results[1]["state"].items():
        torch.testing.assert_close(results[2]["state"][k], v, rtol=1e-5, atol=1e-6)


def test_cache_stores_int32_ids_and_reports_bytes_per_pair(tiny, ray_session):
    """Cached rankings keep ids as int32 (half of int64) and logits as float16; the producer's stats
    give the bytes per cached training pair; the ids read back widen to exactly the sampled int64 ids.
    Two TeacherWorkers split the shards while the teacher's forward runs once for the cache version;
    with the prompt frozen the teacher group is given back once that version's blocks exist, and the
    workers go on ranking from the blocks."""
    import ray

    from promptmm_dist.data.shards import make_shard_actors
    from promptmm_dist.distill.cache import CacheDirectory, RayCacheKD, SoftRankingCache
    from promptmm_dist.distill.local_kd import epoch_seed
    from promptmm_dist.train.steps import SoftRanking

    data, parquet, cfg, ckpt, _ = tiny
    n_neg = 4
    shards = make_shard_actors(parquet, 2, data.n_users, data.n_items, cpus=0)
    model = _group(tiny, 2)
    workers = [ray.remote(num_cpus=0)(TeacherWorker).remote() for _ in range(2)]
    directory = ray.remote(num_cpus=0, max_concurrency=16)(CacheDirectory).remote(60.0)
    cache = SoftRankingCache(shards, model, workers, directory, 2, 2, cfg.seed, n_neg, 0, 3, log=lambda m: None,
                             timeout_s=60.0).start()
    kd = RayCacheKD(directory, 0, [0], 0, cfg.seed)  # rank 0 of 2 reads shard 0: its ranking unshuffled
    other = RayCacheKD(directory, 1, [1], 0, cfg.seed)
    try:
        rankings = []
        for e in range(2):  # reading epoch 1 means epoch 0 was counted
            rankings.append(kd.epoch(e)[0])
            other.epoch(e)
        # one (partitioned) forward for the version, not one per worker
        assert [st["forwards"] for st in ray.get(cache._status[0])] == [1, 1]
        # no prompt round ahead: the group went after version 0's blocks; epoch 1 came from the blocks
        assert cache.stats.teacher_released_at == 0 and model.ranks == []
        assert teacher_ranks_alive() == []
        served = ray.get(cache.refs[1][1])  # shard 1's ranking, made by worker 1 from shard 1's block
        np.testing.assert_array_equal(served.users % 2, 1)
    finally:
        cache.stop()
        model.close()
        for a in [*workers, directory, *shards]:
            ray.kill(a)
    assert cache.error is None
    ranking = rankings[0]
    assert ranking.users.dtype == np.int32 and ranking.items.dtype == np.int32
    assert ranking.fused_logits.dtype == np.float16
    sampled = ShardState(str(parquet), 0, 2, data.n_users, data.n_items).epoch_samples(n_neg, epoch_seed(cfg.seed, 0), 3)
    np.testing.assert_array_equal(np.asarray(ranking.users, dtype=np.int64), sampled.users)
    np.testing.assert_array_equal(np.asarray(ranking.items, dtype=np.int64), sampled.items)
    # a row: user (4) + 1+N items (4 each) + fused and per-modality logits (2 each) + margin (4)
    modalities = len(ranking.modal_logits)
    assert ranking.bytes_per_pair() == 4 + 4 * (1 + n_neg) + 2 * (1 + n_neg) * (modalities + 1) + 4
    shard_pairs = ShardState(str(parquet), 1, 2, data.n_users, data.n_items).info()["train_pairs"]
    assert cache.stats.pairs_per_epoch[0] == len(ranking) + shard_pairs
    assert cache.stats.bytes_per_pair() == pytest.approx(ranking.bytes_per_pair(), abs=0.01)
    with pytest.raises(ValueError, match="do not fit int32"):
        SoftRanking(np.array([2**31], dtype=np.int64), np.zeros((1, 2), dtype=np.int64), {},
                    np.zeros((1, 2), np.float16), np.zeros(1, np.float32))


@pytest.mark.timeout(600)
def test_distributed_run_with_prompt_rounds(tiktok_path, tmp_path, ray_session):
    """A whole Ray run whose driver knows the data by its manifest only (no rows: the ranks, shards and
    the teacher ranks read the canonical files): prompt rounds make new cache versions, and the metrics
    the ranks report equal a direct evaluation of the exported student."""
    from promptmm_dist.data.formats import canonical_info
    from promptmm_dist.eval.evaluate import embedding_scorer, evaluate_splits

    data = subset_first_users(load_dataset(tiktok_path), 600)
    folder = ensure_canonical(data, tmp_path / "prepared")
    info = canonical_info(folder)
    assert info is not None and (info.n_users, info.n_items, info.manifest_sha256) == (
        data.n_users, data.n_items, data.manifest_sha256)
    assert canonical_info(folder, data.modalities[:1]) is None  # a modality subset is another dataset
    cfg = tiny_config(epochs=3)
    cfg.data.path = str(folder)
    cfg.teacher.epochs = 2
    cfg.prompt.refresh_epochs = 1
    cfg.prompt.round_steps = 2
    cfg.dist.num_workers = 0
    cfg.dist.num_shards = 2
    metrics = run_distributed(info, cfg, tmp_path / "run")
    tmp_path = tmp_path / "run"
    export = np.load(tmp_path / "student" / "export.npz")
    direct = evaluate_splits(embedding_scorer(export["user"], export["item"]), data)
    for split in ("val", "test"):
        for k in ("recall@20", "ndcg@20"):
            assert metrics["student"][split][k] == pytest.approx(direct[split][k], abs=1e-6), (split, k)
    assert not (tmp_path / "data").exists()  # the prepared folder itself was read, not a copy
    student = metrics["student"]
    assert len(student["prompt_rounds"]) == 2  # after epochs 0 and 1, not after the last
    assert student["cache"]["versions"] == 3
    assert student["cache"]["max_epochs_held"] <= 2
    assert student["cache"]["bytes_per_epoch"] > 0
    for stage in ("teacher", "student"):
        assert 0.0 <= metrics[stage]["test"]["recall@20"] <= 1.0
    assert (tmp_path / "student" / "student.pt").exists() and (tmp_path / "teacher" / "teacher.pt").exists()
    hist = [json.loads(line) for line in (tmp_path / "student" / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_train_workers_with_a_smaller_student_and_one_shard(tiktok_path, tmp_path, ray_session, capfd):
    """2 DDP ranks with d_S != d (the projector trains inside the DDP forward) and the default single
    shard (raised to one per rank, with a log line): the run finishes and the projector learned."""
    data = subset_first_users(load_dataset(tiktok_path), 300)
    cfg = tiny_config(epochs=2, embed_dim=8, lambda_emb=0.5)
    cfg.teacher.epochs = 1
    cfg.dist.num_workers = 2
    cfg.dist.num_shards = 1
    metrics = run_distributed(data, cfg, tmp_path)
    assert cfg.dist.num_shards == 2
    assert "using 2 shards instead of 1" in capfd.readouterr().err
    assert metrics["num_workers"] == 2
    assert 0.0 <= metrics["student"]["val"]["recall@20"] <= 1.0
    # where things ran: one node id per rank of each stage, per shard and per TeacherWorker (one node here)
    import ray

    here = ray.get_runtime_context().get_node_id()
    placement = metrics["placement"]
    assert placement["teacher"] == [here, here] and placement["student"] == [here, here], placement
    assert placement["shards"] == [here] * 2 and placement["teacher_workers"] == [here] * cfg.dist.num_teacher_workers
    assert placement["teacher_model"] == [here, here]  # the frozen teacher, partitioned like the students
    state = torch.load(tmp_path / "student" / "student.pt", weights_only=True)
    assert state["projector.weight"].shape == (16, 8)
    torch.manual_seed(cfg.seed)  # the projector's initial weights, drawn as the student was built
    from promptmm_dist.models.student import LightGCN

    fresh = LightGCN(data.n_users, data.n_items, 8, cfg.student.n_layers, teacher_dim=16)
    assert not torch.allclose(fresh.projector.weight, state["projector.weight"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_partitioned_train_workers_train_the_same_model_as_one(tiktok_path, tmp_path, ray_session):
    """The product path (`run_distributed`: shard actors, Ray Train, the soft-ranking cache with a prompt
    round): 2 ranks over 2 shards, each holding half the users, items and adjacency rows, against 1 rank
    over 1 shard, with the same seed and global batch size and dropout on. Every epoch's losses and
    validation metrics of both stages, and the exported student, agree within float tolerance: an
    epoch's batches, negatives, prompt-round batches and dropout masks do not depend on the sharding."""
    data = subset_first_users(load_dataset(tiktok_path), 300)
    runs = {}
    for workers in (1, 2):
        cfg = tiny_config(epochs=3)
        cfg.teacher.epochs = 2
        assert cfg.teacher.dropout > 0 and cfg.prompt.prompt_dropout > 0
        cfg.prompt.refresh_epochs, cfg.prompt.round_steps = 1, 2
        cfg.dist.num_workers, cfg.dist.num_shards = workers, workers
        out = tmp_path / f"w{workers}"
        runs[workers] = (run_distributed(data, cfg, out), out)
    (m1, out1), (m2, out2) = runs[1], runs[2]
    for stage in ("teacher", "student"):
        h1, h2 = ([json.loads(x) for x in (o / stage / "history.jsonl").read_text().splitlines()]
                  for o in (out1, out2))
        assert len(h1) == len(h2) > 0
        for a, b in zip(h1, h2):
            for k in a:
                if k.startswith("loss_"):
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (stage, a["epoch"], k)
            assert b["val"]["recall@20"] == pytest.approx(a["val"]["recall@20"], abs=1e-6), (stage, a["epoch"])
        assert m2[stage]["test"]["recall@20"] == pytest.approx(m1[stage]["test"]["recall@20"], abs=1e-6)
    for stage in ("teacher", "student"):  # checkpoints in row pieces, one per rank, assembled alike
        dense = torch.load(out2 / stage / f"{stage}.pt", weights_only=True)
        assert "user_emb.weight" not in dense and dense["__row_pieces__"]["n"] == 2
        assert all((out2 / stage / f"{name}.rows{r}.pt").exists() for r in range(2) for name in (stage, "resume"))
        s1, s2 = load_state(out1 / stage / f"{stage}.pt"), load_state(out2 / stage / f"{stage}.pt")
        assert set(s1) == set(s2)
        for k in ("user_emb.weight", "item_emb.weight"):
            assert torch.allclose(s1[k], s2[k], atol=1e-4), (stage, k)
    assert len(m2["student"]["prompt_rounds"]) == 2
