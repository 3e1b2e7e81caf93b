"""Ray Train worker loop of the teacher stage: DDP over BPR mini-batches (full-graph forward on
each rank), samples from this rank's InteractionShard actors, validation selection, checkpoints
through ray.train.report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from promptmm_dist.config import config_from_dict
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch
from promptmm_dist.distill.local_kd import epoch_seed
from promptmm_dist.run_io import save_checkpoint
from promptmm_dist.train.progress import worker_log
from promptmm_dist.train.state import LoopState, latest_state
from promptmm_dist.train.teacher_loop import build_teacher, fit_teacher
from promptmm_dist.train.world import World


def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards a rank trains on: k % world_size == rank (every shard exactly once)."""
    return [k for k in range(num_shards) if k % world_size == rank]


def shard_epoch_samples(shards: list, mine: list[int], n_neg: int, seed: int, epoch: int) -> SampleBatch:
    import ray

    parts = ray.get([shards[k].epoch_samples.remote(n_neg, epoch_seed(seed, epoch, k)) for k in mine])
    if len(parts) == 1:
        return parts[0]
    order = np.random.default_rng(epoch_seed(seed, epoch, 20_000)).permutation(sum(len(p) for p in parts))
    return SampleBatch(np.concatenate([p.users for p in parts])[order],
                       np.concatenate([p.items for p in parts])[order])


def teacher_train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = World(ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    data = ray.get(config["data_ref"])
    graph = GraphPropagator(ray.get(config["adj_ref"]), data.n_users, data.n_items)
    teacher = build_teacher(data, cfg, cache_folder=config.get("token_cache"))
    module = ray.train.torch.prepare_model(teacher, move_to_device=False) if world.world_size > 1 else teacher
    shards = config["shards"]
    mine = rank_shards(len(shards), world.rank, world.world_size)

    def files(folder: Path, state: LoopState) -> None:
        save_checkpoint(folder, "teacher", state.best if state.best is not None else state.model, cfg,
                        {"manifest_sha256": data.manifest_sha256, "dataset": data.name})

    from promptmm_dist.ray_setup import make_reporter

    resume = latest_state(config.get("resume_from"))
    report = make_reporter(files, world.rank, config.get("resume_mirror"), initial=resume)
    result = fit_teacher(data, cfg, teacher, graph,
                         lambda e: shard_epoch_samples(shards, mine, 1, cfg.seed, e),
                         config["total_pairs"], world=world, train_module=module,
                         report=report, log=worker_log, resume=resume,
                         progress_dir=config.get("progress_dir"))
    # one last report (Tune reads it as the trial's summary); it carries the last epoch's checkpoint,
    # whose teacher.pt holds the selected (best validation) weights
    report({"epoch": result.best_epoch, "final": 1, "val": result.best_val})
