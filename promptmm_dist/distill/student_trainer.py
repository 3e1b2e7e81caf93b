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
from promptmm_dist.train.state import LoopState, latest_state
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
    # the projector (d_S != d) runs inside the student's forward; it only goes unused (and DDP must
    # look for unused parameters, which otherwise makes every rank warn) when embedding KD is off
    unused = any(True for _ in student.projector.parameters()) and sc.lambda_emb == 0
    module = (ray.train.torch.prepare_model(student, move_to_device=False,
                                            parallel_strategy_kwargs={"find_unused_parameters": unused})
              if world.world_size > 1 else student)
    mine = rank_shards(config["num_shards"], world.rank, world.world_size)
    kd = RayCacheKD(config["directory"], world.rank, mine, cfg.prompt.refresh_epochs, cfg.seed,
                    projector=student.projector)

    def files(folder: Path, state: LoopState) -> None:
        save_checkpoint(folder, "student", state.best if state.best is not None else state.model, cfg,
                        {"manifest_sha256": data.manifest_sha256, "dataset": data.name})

    resume = latest_state(config.get("resume_from"))
    report = make_reporter(files, world.rank, config.get("resume_mirror"), initial=resume)
    try:
        result = fit_student(data, cfg, student, graph, kd, config["total_pairs"], world=world,
                             train_module=module, report=report, log=worker_log,
                             resume=resume,
                             progress_dir=config.get("progress_dir"), kd_state=CacheVersion(kd))
    except TrainingEnded:
        return  # tune stopped the trial: the last epoch's checkpoint is already reported
    # one last report (Tune reads it as the trial's summary); it carries the last epoch's checkpoint,
    # whose student.pt holds the selected (best validation) weights
    report({"epoch": result.best_epoch, "final": 1, "val": result.best_val})


class CacheVersion:
    """The Ray student's KD state: only the cache version it last trained on (the prompt itself lives
    in the TeacherWorkers; the driver saves each round's prompt, see distributed.py)."""

    def __init__(self, kd: RayCacheKD) -> None:
        self.kd = kd

    def state_dict(self) -> dict:
        return {"cache_version": int(self.kd.version)}

    def load_state_dict(self, state: dict) -> None:
        pass  # the cache tells a rank its version with every epoch it serves
