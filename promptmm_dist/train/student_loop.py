"""Student stage: LightGCN trained with BPR + the three KD terms against cached teacher soft
rankings, selected on validation recall@20. With no KD source it is the plain LightGCN/MF baseline.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Protocol

import torch

from promptmm_dist.config import Config
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch
from promptmm_dist.models.student import LightGCN
from promptmm_dist.train.progress import epoch_line, progress
from promptmm_dist.train.selection import EarlyStopper
from promptmm_dist.train.state import LoopState, Resumable
from promptmm_dist.train.steps import SoftRanking, id_tensor, optimizer_step, student_loss
from promptmm_dist.train.teacher_loop import StageResult, steps_per_epoch
from promptmm_dist.train.validation import Validator
from promptmm_dist.train.world import World


class TrainingEnded(Exception):
    """Raised by a KD source on every rank at the same epoch when training must end early (a Tune
    scheduler stopped the trial): the stage then ends as early stopping does, with the best weights."""


class KDSource(Protocol):
    """Where a rank's epoch samples (and the teacher's view of them) come from."""

    def epoch(self, epoch: int) -> tuple[SoftRanking, dict[str, torch.Tensor] | None, bool]:
        """(samples with teacher logits, teacher item modality embeddings, has_teacher)."""

    def after_epoch(self, epoch: int, user_emb: torch.Tensor, item_emb: torch.Tensor) -> dict | None:
        """Hook for prompt rounds; returns a round summary when one ran."""


def emb_kd_items(items: torch.Tensor, n_items: int, scope: str, world: World) -> torch.Tensor:
    """The items the embedding KD averages over this step: every item ("all": the whole item table
    follows the teacher every step, not only the items a batch happens to draw) or the global batch's
    distinct positives and negatives ("batch")."""
    if scope == "all":
        return torch.arange(n_items, device=items.device)
    return world.distinct_items(items[:, :2], n_items)


def student_step(student: LightGCN, module: torch.nn.Module, graph: GraphPropagator,
                 part: SoftRanking | SampleBatch, opt: torch.optim.Optimizer, sc, world: World,
                 has_teacher: bool = False, teacher_items: dict[str, torch.Tensor] | None = None,
                 project: bool = False) -> tuple[dict[str, float], float]:
    """One optimiser step on this process's part of the global batch (the loop and bench/scale.py).
    `part`: a SoftRanking with the teacher's logits (`has_teacher`), or plain samples (BPR only).
    Returns (loss parts weighted by this rank's share, the share), as `teacher_step` does."""
    outs = module(graph, project=project)
    items = id_tensor(part.items, outs[0].device)
    # item-side tables whole (one exchange when partitioned): the batch indexes items by id
    whole = graph.gather_items(outs[1], *(outs[2:3] if project else []), student.base_embeddings()[1])
    loss, parts = student_loss(
        outs[0], whole[0], [student.base_embeddings()[0], whole[-1]], whole[1] if project else None,
        id_tensor(part.users, outs[0].device), items, sc,
        teacher=part if has_teacher else None, teacher_items=teacher_items,
        # embedding KD averages over the global batch's distinct items: not a per-row mean, so every
        # rank computes it over the union (weighted by its share, the ranks' parts add up to it once)
        emb_items=(emb_kd_items(items, whole[0].shape[0], sc.emb_kd_items, world)
                   if has_teacher and teacher_items and sc.lambda_emb > 0 else None))
    n = len(part)
    return optimizer_step(loss, parts, n, student, opt, world)


def train_epoch(student: LightGCN, module: torch.nn.Module, graph: GraphPropagator, kd: KDSource,
                epoch: int, opt: torch.optim.Optimizer, sc, n_steps: int, world: World | None = None,
                stage: str = "student") -> tuple[dict[str, float], float]:
    """One pass over this rank's epoch samples; (mean loss parts, seconds spent waiting for KD data)."""
    world = world or World()
    te = time.perf_counter()
    ranking, teacher_items, has_teacher = kd.epoch(epoch)
    wait_s = time.perf_counter() - te
    student.train()
    project = has_teacher and bool(teacher_items) and sc.lambda_emb > 0
    sums: dict[str, float] = {}
    for lo, hi in progress(ranking.step_bounds(n_steps), f"{stage} epoch {epoch}", world):
        parts, _ = student_step(student, module, graph, ranking.slice(lo, hi), opt, sc, world,
                                has_teacher, teacher_items, project)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v / n_steps
    sums = world.reduce_sums(sums)
    return sums, wait_s


def fit_student(data: InteractionData, cfg: Config, student: LightGCN, graph: GraphPropagator,
                kd: KDSource, total_pairs: int, world: World | None = None,
                train_module: torch.nn.Module | None = None,
                report: Callable[[dict, LoopState], None] | None = None,
                log: Callable[[str], None] = print, stage: str = "student",
                resume: LoopState | None = None, progress_dir: str | None = None,
                kd_state: object | None = None) -> StageResult:
    """`report(row, state)` runs after every epoch with the state to resume from (`resume`);
    `kd_state` (default: `kd`) saves/loads the KD source's state (prompt, cache version)."""
    world = world or World()
    sc = cfg.student
    module = train_module or student
    opt = torch.optim.Adam(module.parameters(), lr=sc.lr)
    validator = Validator(data, world)
    stopper = EarlyStopper(patience=sc.patience, smooth_window=sc.smooth_window)
    loop = Resumable(stage, student, {"opt": opt}, stopper, extra=kd if kd_state is None else kd_state,
                     rank=world.rank, progress_dir=progress_dir, log=log, world=world)
    if resume is None:  # every process starts torch's generator alike (resumes restore its state)
        torch.manual_seed(cfg.seed)
    start, history, best_state, done = loop.restore(resume)
    n_steps = steps_per_epoch(total_pairs, sc.batch_size)
    t0 = time.perf_counter()
    for epoch in range(start, 0 if done else sc.epochs):
        loop.begin_epoch(epoch)
        te = time.perf_counter()
        try:
            sums, wait_s = train_epoch(student, module, graph, kd, epoch, opt, sc, n_steps, world, stage)
        except TrainingEnded:
            if world.is_main:
                log(f"{stage}: training ended before epoch {epoch} (the scheduler stopped the run)")
            break
        row = {"epoch": epoch, **{f"loss_{k}": v for k, v in sums.items()},
               "train_s": time.perf_counter() - te, "kd_wait_s": wait_s}
        student.eval()
        with torch.no_grad():
            user_emb, item_emb = student(graph)
        if (epoch + 1) % sc.eval_every == 0 or epoch == sc.epochs - 1:
            val = validator(user_emb, graph.gather_items(item_emb)[0], "val")
            row["val"] = val
            if stopper.update(epoch, val):
                best_state = copy.deepcopy(student.state_dict())
            row["best_epoch"] = stopper.best_epoch
            done = stopper.should_stop(epoch)
        summary = kd.after_epoch(epoch, user_emb, item_emb)
        if summary is not None:
            summary = {**summary, "epoch": epoch, "val_recall@20_before": row.get("val", {}).get("recall@20")}
            row["prompt_round"] = summary
            if world.is_main and "round_loss" in summary:
                log(f"prompt round after epoch {epoch}: loss {summary['round_loss']:.4f}, "
                    f"cache version {summary.get('cache_version')}")
        row["epoch_s"] = time.perf_counter() - te
        history.append(row)
        if world.is_main and "val" in row:
            log(epoch_line(stage, row, sc.epochs))
        if report is not None:
            report(row, loop.snapshot(epoch + 1, done, history, best_state))
        if done:
            break
    # each prompt round's effect: validation recall@20 at the epoch after the round
    by_epoch = {r["epoch"]: r for r in history}
    rounds = [r["prompt_round"] for r in history if r.get("prompt_round")]
    for r in rounds:
        nxt = by_epoch.get(r["epoch"] + 1, {}).get("val", {})
        r["val_recall@20_after"] = nxt.get("recall@20")
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    best_val = by_epoch.get(stopper.best_epoch, {}).get("val", {})
    return StageResult(stopper.best_epoch, best_val, len(history), time.perf_counter() - t0, history, best_state,
                       rounds)
