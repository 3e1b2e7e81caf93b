"""InteractionShard actors: user-sharded training interactions (user % N == k) read from the
canonical Parquet, serving per-epoch samples (BPR triples + KD lists) and evaluation users.

The shard is the unit the teacher cache and the student ranks are keyed by: rank r of the student
trains on the shards assigned to it, so every user's samples live in exactly one place.

A shard is rebuilt from the Parquet by its constructor and every method is a pure function of its
arguments, so Ray may restart a lost shard actor and retry its calls (`ray_setup.actor_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from promptmm_dist.actor_calls import ActorInfo
from promptmm_dist.data.dataset import TEST, TRAIN, VAL, InteractionData
from promptmm_dist.data.sampling import SampleBatch, TrainSampler

if TYPE_CHECKING:
    from promptmm_dist.config import DistConfig


def split_by_shard(parquet: str, num_shards: int, folder: str, tag: str = "") -> list[str]:
    """Write each shard's rows (user % N == k) to its own Parquet file in `folder`, in one streaming pass
    over the canonical file, so each shard actor and rank then reads its own rows only. `tag` (the
    dataset's manifest hash) names what was split: a folder holding the same tag's files is reused. The
    files appear together or not at all (written into a temporary folder, then renamed). The paths
    returned are absolute: Train ranks and actors read them from other working directories."""
    import json
    import os
    import shutil
    import tempfile

    import pyarrow as pa

    out = Path(folder).resolve()
    names = [f"shard-{k}-of-{num_shards}.parquet" for k in range(num_shards)]
    marker = out / "split.json"
    want = {"source": str(Path(parquet).resolve()), "num_shards": num_shards, "tag": tag,
            "source_bytes": Path(parquet).stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == want and all((out / n).is_file() for n in names):
        return [str(out / n) for n in names]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        source = pq.ParquetFile(str(parquet))
        schema = source.schema_arrow
        writers = [pq.ParquetWriter(str(tmp / n), schema) for n in names]
        for batch in source.iter_batches(batch_size=1 << 20):
            table = pa.Table.from_batches([batch], schema=schema)
            shard_of = np.asarray(batch.column(batch.schema.get_field_index("user")).to_numpy()) % num_shards
            for k, w in enumerate(writers):
                w.write_table(table.filter(pa.array(shard_of == k)))
        for w in writers:
            w.close()
        (tmp / "split.json").write_text(json.dumps(want))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(out / n) for n in names]


def read_shard(parquet: Path, shard: int, num_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, splits) of the shard's users, read batch by batch so memory stays bounded.
    `parquet`: the shard's own file (`split_by_shard`) or the whole canonical file (filtered while read)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in pq.ParquetFile(str(parquet)).iter_batches(batch_size=1 << 20, columns=["user", "item", "split"]):
        users = batch.column(0).to_numpy()
        keep = (users % num_shards) == shard
        parts.append((users[keep], batch.column(1).to_numpy()[keep], batch.column(2).to_numpy()[keep]))
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int8)
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


class ShardState(ActorInfo):
    """A shard's interactions and samplers (plain object, wrapped as a Ray actor below)."""

    def __init__(self, parquet: str, shard: int, num_shards: int, n_users: int, n_items: int) -> None:
        self.shard, self.num_shards = shard, num_shards
        users, items, splits = read_shard(Path(parquet), shard, num_shards)
        self.n_users, self.n_items = n_users, n_items
        self.all_users = np.arange(shard, n_users, num_shards, dtype=np.int64)
        train = splits == TRAIN
        r = sp.csr_matrix((np.ones(int(train.sum()), np.float32), (users[train], items[train])),
                          shape=(n_users, n_items))
        r.sum_duplicates()
        self.train_csr = r
        self.sampler = TrainSampler(r)
        self.eval_pairs = {"val": (users[splits == VAL], items[splits == VAL]),
                           "test": (users[splits == TEST], items[splits == TEST])}
        self._local = InteractionData(f"shard{shard}", n_users, n_items, users, items, splits)
        self._eval = None

    def info(self) -> dict:
        return {"shard": self.shard, "users": len(self.all_users), "train_pairs": self.sampler.n_pairs,
                "val_users": int(len(np.unique(self.eval_pairs["val"][0]))),
                "test_users": int(len(np.unique(self.eval_pairs["test"][0])))}

    def users(self) -> np.ndarray:
        return self.all_users

    def epoch_samples(self, n_neg: int, seed: int, n_steps: int) -> SampleBatch:
        """Every training pair of the shard once, in the epoch's `n_steps` steps (each pair's step is
        the one it has in any sharding), with n_neg negatives never in the user's train."""
        return self.sampler.epoch(n_neg, seed, n_steps)

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.sampler.pair_users, self.sampler.pair_items

    def eval_users(self, split: str) -> np.ndarray:
        return np.unique(self.eval_pairs[split][0]).astype(np.int64)

    def evaluate_sums(self, embeddings: tuple[np.ndarray, np.ndarray], split: str) -> tuple[dict, int]:
        """Metric sums over this shard's users (masks from the shard's own interactions)."""
        from promptmm_dist.eval.evaluate import EvalData, embedding_scorer, full_ranking_sums

        if self._eval is None:
            self._eval = EvalData.from_data(self._local, ("val", "test"))
        user, item = embeddings
        scorer = embedding_scorer(np.array(user), np.array(item))  # writable copies of the shared arrays
        return full_ranking_sums(scorer, self._eval, split)


def make_shard_actors(parquet: Path, num_shards: int, n_users: int, n_items: int, cpus: float = 0.1,
                      dist: DistConfig | None = None):
    """One InteractionShard actor per shard (lightweight: a fraction of a CPU each), restarted from
    the Parquet when lost (`dist.max_failures` times; the default config's when not given)."""
    import ray

    from promptmm_dist.config import DistConfig
    from promptmm_dist.ray_setup import actor_options

    actor_cls = ray.remote(num_cpus=cpus, **actor_options(dist or DistConfig()))(ShardState)
    return [actor_cls.options(name=None).remote(str(parquet), k, num_shards, n_users, n_items)
            for k in range(num_shards)]
