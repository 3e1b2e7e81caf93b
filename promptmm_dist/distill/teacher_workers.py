"""TeacherWorker actors: turn a shard's epoch samples into soft rankings (the cache entries) from the
cache version's embedding blocks (`teacher_model.TeacherRank.version_tables`).

A worker holds no dataset and no teacher: each call gets the shard's user block and the item block as
object refs (zero-copy reads) and is a pure function of them, so `dist.num_teacher_workers` workers
split an epoch's shards between them without repeating the teacher's forward, and a restarted worker
(or a retried call) gives the same ranking.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from promptmm_dist.actor_calls import ActorInfo
from promptmm_dist.data.sampling import SampleBatch
from promptmm_dist.models.teacher import TeacherOutput
from promptmm_dist.train.steps import SoftRanking, soft_ranking


def block_output(users: dict, items: dict) -> TeacherOutput:
    """A TeacherOutput over a user block's rows and the whole item table (read-only arrays: no copy)."""
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    empty = torch.zeros(0)
    return TeacherOutput(t(users["user"]), t(items["item"]), {m: t(h) for m, h in users["modal"].items()},
                         {m: t(h) for m, h in items["modal"].items()}, empty, empty)


def rank_block(users: dict, items: dict, samples: SampleBatch, shard: int, num_shards: int) -> SoftRanking:
    """Soft ranking of shard `shard`'s samples from its user block (user u is row u // N)."""
    su = np.asarray(samples.users)
    if su.size and np.any(su % num_shards != shard):
        raise ValueError(f"shard {shard} of {num_shards}: samples hold users of other shards")
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        ranking = soft_ranking(block_output(users, items), su // num_shards, np.asarray(samples.items),
                               step_ends=samples.step_ends)
    ranking.users = SoftRanking.compact_ids(su, "users")
    return ranking


class TeacherWorker(ActorInfo):
    """Soft rankings from embedding blocks (plain object, wrapped as a Ray actor by the driver)."""

    def __init__(self, threads: int | None = None) -> None:
        """`threads`: torch intra-op threads; None = the CPUs Ray reserved for this actor (`num_cpus`,
        whole CPUs, at least one), so a worker given 4 CPUs computes its rankings on 4 threads."""
        from promptmm_dist.ray_setup import actor_threads

        self.threads = max(1, threads) if threads is not None else actor_threads()
        torch.set_num_threads(self.threads)

    def soft_ranking(self, users: dict, items: dict, samples: SampleBatch, shard: int, num_shards: int) -> SoftRanking:
        """Teacher logits for shard `shard`'s epoch samples (`users`: its user block, `items`: the item block)."""
        return rank_block(users, items, samples, shard, num_shards)
