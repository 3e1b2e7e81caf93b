"""Ray Train worker loop of the student stage: partitioned execution (each rank holds its users',
items' and adjacency rows), rank r reads its shards' cached soft rankings for each epoch (zero-copy),
trains the LightGCN student with BPR + KD, validates on its users (exact sums all-reduced) and
reports/checkpoints through ray.train.report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from promptmm_dist.config import config_from_dict
from promptmm_dist.distill.cache import RayCacheKD
from promptmm_dist.distill.teacher_model import rows_from_blocks
from promptmm_dist.models.student import MODELS
from promptmm_dist.partition.plan import rank_shards
from promptmm_dist.partition.rank_data import RankData
from promptmm_dist.partition.world import PartitionedWorld
from promptmm_dist.run_io import save_checkpoint
from promptmm_dist.train.progress import worker_log
from promptmm_dist.train.state import LoopState, latest_state
from promptmm_dist.train.steps import SoftRanking
from promptmm_dist.train.student_loop import fit_student
from promptmm_dist.train.teacher_loop import steps_per_epoch
from promptmm_dist.train.validation import CLOSING_FILE, Validator, closing_metrics


class RankKD:
    """The cache as a partitioned rank needs it: sample ids in the rank's numbering, the teacher's item
    tables in the gathered item order; at a prompt round the rank hands in its own rows (the teacher
    rank of the same partition reads them: no whole table anywhere)."""

    def __init__(self, kd: RayCacheKD, rd: RankData, world: PartitionedWorld) -> None:
        self.kd, self.rd, self.world = kd, rd, world
        self._items_from: object = None
        self._items: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int) -> tuple[SoftRanking, dict[str, torch.Tensor] | None, bool]:
        ranking, items, has_teacher = self.kd.epoch(epoch)
        users, ids = self.rd.local_ids(ranking.users, ranking.items)
        ranking = dataclasses.replace(ranking, users=users, items=ids)  # step_ends kept
        if items is not self._items_from:  # a new cache version: reorder its item tables once
            order = torch.from_numpy(self.rd.plan.gathered_items)
            self._items = {m: h[order].to(self.world.device) for m, h in items.items()} if items else items
            self._items_from = items
        return ranking, self._items, has_teacher

    def after_epoch(self, epoch: int, user_emb: torch.Tensor, item_emb: torch.Tensor) -> dict | None:
        return self.kd.after_epoch(epoch, user_emb, item_emb)


def student_train_loop(config: dict) -> None:
    import ray
    import ray.train

    from promptmm_dist.partition.setup import setup_rank
    from promptmm_dist.ray_setup import PLACEMENT_FILE, make_reporter, rank_device, rank_nodes
    from promptmm_dist.run_io import write_json

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    sc = cfg.student
    spec = config["dataset"]
    rd, world, graph = setup_rank(spec, config["num_shards"], rank, size, sc.norm, cfg.dist.exchange,
                                  device=rank_device(cfg.dist.use_gpu))
    torch.manual_seed(cfg.seed)
    student = MODELS["lightgcn"](rd.n_users, rd.n_items, embed_dim=sc.embed_dim, n_layers=sc.n_layers,
                                 teacher_dim=cfg.teacher.embed_dim)
    world.init_tables(student, cfg.seed)
    mine = rank_shards(config["num_shards"], rank, size)
    if config.get("init_blocks") is not None:  # the teacher's version-0 blocks: this rank's shards and the items
        blocks = config["init_blocks"]
        user_blocks = dict(zip(mine, ray.get([blocks[k] for k in mine])))
        user, item = rows_from_blocks(user_blocks, ray.get(blocks[-1]), rd.users, rd.items)
        student.init_from(torch.from_numpy(user), torch.from_numpy(item))
    student.to(world.device)
    cache = RayCacheKD(config["directory"], rank, mine, cfg.prompt.refresh_epochs, cfg.seed,
                       projector=student.projector, n_steps=steps_per_epoch(config["total_pairs"], sc.batch_size))
    kd = RankKD(cache, rd, world)

    nodes = rank_nodes(world)  # where each rank runs (metrics.json "placement")

    closing: dict = {}  # the selected student's metrics and serving tables, once training ended

    def files(folder: Path, state: LoopState) -> None:
        """Every rank: its piece of student.pt (the selected weights); rank 0 also the rest."""
        weights, piece = state.weights()
        save_checkpoint(folder, "student", weights, cfg,
                        {"manifest_sha256": spec["manifest_sha256"], "dataset": spec["name"]}, piece=piece)
        if not world.is_main:
            return
        write_json(folder / PLACEMENT_FILE, {"ranks": nodes})
        if closing:
            user, item = closing["export"]
            np.savez(folder / "export.npz", user=user.numpy(), item=item.numpy())
            write_json(folder / CLOSING_FILE, closing["metrics"])

    resume = latest_state(config.get("resume_from"))
    report = make_reporter(files, rank, config.get("resume_mirror"), initial=resume)
    # a trial that Tune's scheduler stops ends here too, with its best weights so far: its closing
    # metrics are the ranks' as well (the sweep's driver evaluates nothing itself)
    result = fit_student(rd.local, cfg, student, graph, kd, config["total_pairs"], world=world,
                         report=report, log=worker_log, resume=resume,
                         progress_dir=config.get("progress_dir"), kd_state=CacheVersion(cache))
    with torch.no_grad():  # `fit_student` left the selected weights loaded, in eval mode
        user, item = student(graph)
        metrics = closing_metrics(Validator(rd.local, world), user, graph.gather_items(item)[0])
        export = (world.full_table(user, "user"), world.full_table(item, "item"))  # whole on rank 0 only
    metrics["params"] = {"total": world.global_numel(student),
                         "inference": world.global_numel(student, ("user_emb.weight", "item_emb.weight"))}
    closing.update(metrics=metrics, export=export)
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
