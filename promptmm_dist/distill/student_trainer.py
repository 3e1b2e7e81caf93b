"""Ray Train worker loop of the student stage: rank r reads its shards' cached soft rankings for
each epoch (zero-copy), trains the LightGCN student with BPR + KD under DDP, validates on its share
of users (exact all-reduce) and reports/checkpoints through ray.train.report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from promptmm_dist.config import config_from_dict
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.distill.cache import RayCacheKD, TrainingEnded
from promptmm_dist.models.student import MODELS
from promptmm_dist.run_io import save_checkpoint
from promptmm_dist.train.progress import worker_log
from promptmm_dist.train.student_loop import fit_student
from promptmm_dist.train.teacher_trainer import rank_shards
from promptmm_dist.train.world import World


def student_train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from promptmm_dist.ray_setup import make_reporter

    ctx = ray.train.get_context()
    world = World(ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    sc = cfg.student
    data = ray.get(config["data_ref"])
    graph = GraphPropagator(ray.get(config["adj_ref"]), data.n_users, data.n_items)
    torch.manual_seed(cfg.seed)
    student = MODELS["lightgcn"](data.n_users, data.n_items, embed_dim=sc.embed_dim, n_layers=sc.n_layers,
                                 teacher_dim=cfg.teacher.embed_dim)
    if config.get("init_ref") is not None:
        user, item = ray.get(config["init_ref"])
        student.init_from(torch.as_tensor(np.array(user)), torch.as_tensor(np.array(item)))
    module = (ray.train.torch.prepare_model(student, move_to_device=False,
                                            parallel_strategy_kwargs={"find_unused_parameters": True})
              if world.world_size > 1 else student)
    mine = rank_shards(config["num_shards"], world.rank, world.world_size)
    kd = RayCacheKD(config["directory"], world.rank, mine, cfg.prompt.refresh_epochs, cfg.seed,
                    projector=student.projector)

    def files(folder: Path) -> None:
        save_checkpoint(folder, "student", student.state_dict(), cfg,
                        {"manifest_sha256": data.manifest_sha256, "dataset": data.name})

    report = make_reporter(files, world.rank)
    try:
        result = fit_student(data, cfg, student, graph, kd, config["total_pairs"], world=world,
                             train_module=module, report=report, log=worker_log)
    except TrainingEnded:
        return  # tune stopped the trial: the best checkpoint so far is already reported
    # one last report carrying the selected (best validation) weights: Train keeps the latest
    # checkpoint, and in local mode `result.checkpoint` is the last report's
    report({"epoch": result.best_epoch, "final": 1, "val": result.best_val}, student)
