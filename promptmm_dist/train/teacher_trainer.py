"""Ray Train worker loop of the teacher stage: partitioned execution (each rank holds its users',
items' and adjacency rows; see promptmm_dist.partition), samples from this rank's InteractionShard
actors, validation selection, checkpoints through ray.train.report."""

from __future__ import annotations

from pathlib import Path

import torch

from promptmm_dist.config import config_from_dict
from promptmm_dist.data.sampling import SampleBatch, join_steps
from promptmm_dist.distill.local_kd import epoch_seed
from promptmm_dist.partition.plan import rank_shards
from promptmm_dist.partition.rank_data import RankData
from promptmm_dist.run_io import save_checkpoint
from promptmm_dist.train.progress import worker_log
from promptmm_dist.train.state import LoopState, latest_state
from promptmm_dist.train.teacher_loop import fit_teacher, steps_per_epoch
from promptmm_dist.train.validation import CLOSING_FILE, Validator, closing_metrics

__all__ = ["rank_shards", "shard_epoch_steps", "teacher_train_loop"]


def shard_epoch_steps(shards: list, mine: list[int], n_neg: int, seed: int, epoch: int, n_steps: int,
                      rd: RankData | None = None) -> list[SampleBatch]:
    """This rank's step batches: step t joins step t of each of its shards' epoch samples, so the global
    batch of step t (all ranks together) is the same set of samples for any number of ranks and shards.
    With `rd`, ids are turned into the rank's numbering (local user rows, gathered item positions)."""
    import ray

    parts = ray.get([shards[k].epoch_samples.remote(n_neg, epoch_seed(seed, epoch), n_steps) for k in mine])
    steps = join_steps(parts, n_steps)
    return steps if rd is None else [SampleBatch(*rd.local_ids(b.users, b.items)) for b in steps]


def teacher_train_loop(config: dict) -> None:
    import ray.train

    from promptmm_dist.partition.setup import build_rank_teacher, setup_rank
    from promptmm_dist.ray_setup import PLACEMENT_FILE, make_reporter, rank_device, rank_nodes
    from promptmm_dist.run_io import write_json

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    spec = config["dataset"]
    rd, world, graph = setup_rank(spec, config["num_shards"], rank, size, cfg.teacher.norm, cfg.dist.exchange,
                                  device=rank_device(cfg.dist.use_gpu))
    teacher = build_rank_teacher(rd, cfg, config.get("token_cache"))
    shards = config["shards"]
    mine = rank_shards(len(shards), rank, size)
    n_steps = steps_per_epoch(config["total_pairs"], cfg.teacher.batch_size)
    if world.is_main:
        worker_log(f"teacher: partitioned over {rd.plan.describe()}")

    nodes = rank_nodes(world)  # where each rank runs (metrics.json "placement")

    closing: dict = {}  # the selected teacher's metrics, once training ended

    def files(folder: Path, state: LoopState) -> None:
        """Every rank: its piece of teacher.pt (the selected weights); rank 0 also the rest."""
        weights, piece = state.weights()
        save_checkpoint(folder, "teacher", weights, cfg,
                        {"manifest_sha256": spec["manifest_sha256"], "dataset": spec["name"]}, piece=piece)
        if world.is_main:
            write_json(folder / PLACEMENT_FILE, {"ranks": nodes})
            if closing:
                write_json(folder / CLOSING_FILE, closing)

    resume = latest_state(config.get("resume_from"))
    report = make_reporter(files, rank, config.get("resume_mirror"), initial=resume)
    result = fit_teacher(rd.local, cfg, teacher, graph,
                         lambda e: shard_epoch_steps(shards, mine, 1, cfg.seed, e, n_steps, rd),
                         config["total_pairs"], world=world, report=report, log=worker_log, resume=resume,
                         progress_dir=config.get("progress_dir"))
    with torch.no_grad():  # `fit_teacher` left the selected weights loaded, in eval mode
        out = teacher(graph)
        closing.update(closing_metrics(Validator(rd.local, world), out.user, graph.gather_items(out.item)[0]))
    closing["params"] = world.global_numel(teacher)
    # one last report (Tune reads it as the trial's summary); it carries the last epoch's checkpoint,
    # whose teacher.pt holds the selected (best validation) weights
    report({"epoch": result.best_epoch, "final": 1, "val": result.best_val})
