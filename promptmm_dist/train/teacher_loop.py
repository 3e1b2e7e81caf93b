"""Teacher stage: train the PromptMM teacher + prompt with BPR, select on validation recall@20.

`fit_teacher` is the whole stage for one process of a (possibly 1-rank) process group; the Ray Train
worker loop calls it with DDP-wrapped parameters and Ray's report hook.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch
from promptmm_dist.models.prompt import PromptModule, cached_hard_tokens
from promptmm_dist.errors import ConfigError
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.models.teachers import TEACHERS
from promptmm_dist.train.progress import epoch_line, progress
from promptmm_dist.train.selection import EarlyStopper
from promptmm_dist.train.state import LoopState, Resumable
from promptmm_dist.train.steps import gather_item_side, id_tensor, optimizer_step, teacher_loss
from promptmm_dist.train.validation import Validator
from promptmm_dist.train.world import World

EpochSamples = Callable[[int], SampleBatch]
Report = Callable[[dict, LoopState], None]


def prepare_features(features: dict[str, np.ndarray], how: str,
                     stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Per-modality feature scaling: raw scales differ by orders of magnitude (Tiktok image rows have
    norm ~33, Last.fm VGGish ~1,500, MiniLM text 1), which would let one modality dominate.
    `stats`: per-modality column (mean, sd) over all items, for a process that holds only some rows."""
    if how == "none":
        return features
    if how != "standardize":
        raise ValueError(f"unknown teacher.feature_norm {how!r} (standardize | none)")
    out = {}
    for m, x in features.items():
        mu, sd = stats[m] if stats is not None else (x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True))
        out[m] = ((x - mu) / np.where(sd > 1e-8, sd, 1.0)).astype(np.float32)
    return out


def build_teacher(data: InteractionData, cfg: Config, cache_folder=None) -> PromptMMTeacher:
    """Teacher + prompt module for a whole dataset (hard tokens cached per dataset and size)."""
    tokens = cached_hard_tokens(data.features, cfg.teacher.embed_dim, cache_folder, data.manifest_sha256)
    teacher = assemble_teacher(cfg, data.n_users, data.n_items, prepare_features(data.features, cfg.teacher.feature_norm),
                               tokens, data.train_csr)
    World().init_tables(teacher, cfg.seed)  # rows drawn by id, as a partitioned rank draws its own
    return teacher


def assemble_teacher(cfg: Config, n_users: int, n_items: int, features: dict[str, np.ndarray],
                     item_tokens: np.ndarray, train_rows, items: np.ndarray | None = None,
                     users: np.ndarray | None = None,
                     item_hop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PromptMMTeacher:
    """The configured backbone over the rows a process holds: `n_users` users (`users`: which, default
    all) whose training rows are `train_rows` (columns: all items), `n_items` items (`items`: which,
    default all) with their (scaled) `features`; `item_tokens`: every item's hard tokens; `item_hop`:
    one hop over the item-item graph for those items (backbones that use one; None: built from
    `features`, which must then be every item's)."""
    torch.manual_seed(cfg.seed)
    prompt = PromptModule(item_tokens, train_rows, dropout=cfg.prompt.prompt_dropout, items=items, users=users)
    if cfg.teacher.backbone not in TEACHERS:
        raise ConfigError(f"teacher.backbone {cfg.teacher.backbone!r}: unknown (known: {', '.join(TEACHERS)})")
    backbone = TEACHERS[cfg.teacher.backbone]
    if backbone.uses_item_graph:
        return backbone(n_users, n_items, features, prompt, cfg.teacher, cfg.prompt, item_hop=item_hop)
    return backbone(n_users, n_items, features, prompt, cfg.teacher, cfg.prompt)


@dataclass
class StageResult:
    best_epoch: int
    best_val: dict[str, float]
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    state_dict: dict | None = None
    prompt_rounds: list[dict] = field(default_factory=list)


def split_steps(samples: SampleBatch, n_steps: int) -> list[SampleBatch]:
    """The epoch's steps: the ones the samples were drawn in, else `n_steps` even cuts. Same number of
    steps on every rank (collectives must match)."""
    if samples.step_ends is not None:
        steps = samples.steps()
        if len(steps) != n_steps:
            raise ValueError(f"samples drawn in {len(steps)} steps, trained in {n_steps}")
        return steps
    idx = np.array_split(np.arange(len(samples)), n_steps)
    return [SampleBatch(samples.users[i], samples.items[i]) for i in idx]


def steps_per_epoch(total_pairs: int, batch_size: int) -> int:
    return max(1, math.ceil(total_pairs / batch_size))


def teacher_optimizer(teacher: PromptMMTeacher, cfg: Config) -> torch.optim.Optimizer:
    """Adam with the prompt module in its own group (its own learning rate)."""
    prompt_params = list(teacher.prompt.parameters())
    prompt_ids = {id(p) for p in prompt_params}
    other = [p for p in teacher.parameters() if id(p) not in prompt_ids]
    return torch.optim.Adam([{"params": other, "lr": cfg.teacher.lr},
                             {"params": prompt_params, "lr": cfg.prompt.lr}])


def teacher_step(teacher: PromptMMTeacher, module: torch.nn.Module, graph: GraphPropagator, batch: SampleBatch,
                 opt: torch.optim.Optimizer, cfg: Config, world: World) -> tuple[dict[str, float], float]:
    """One optimiser step on this process's part of the global batch (the loop and bench/scale.py).
    Returns (loss parts weighted by this rank's share, the share); summed over ranks they are the
    global batch's loss parts. Every rank calls it at every step, an empty part included."""
    out, item_base = gather_item_side(module(graph), teacher.base_embeddings()[1], graph)
    users, items = id_tensor(batch.users, item_base.device), id_tensor(batch.items, item_base.device)
    view_rows = None
    if out.views and cfg.teacher.lambda_cl > 0 and world.world_size > 1:
        # InfoNCE is over the global batch's distinct users and positives: every rank takes the union
        # (its users' rows gathered from all ranks, items by the summed mask) and weighs it by its share
        pos = world.distinct_items(items[:, 0], item_base.shape[0])
        mine = torch.unique(users)
        view_rows = {v: (world.gather_batch_rows(u[mine]), i[pos]) for v, (u, i) in out.views.items()}
    loss, parts = teacher_loss(out, [teacher.base_embeddings()[0], item_base], users, items, cfg.teacher, cfg.prompt,
                               view_rows=view_rows)
    n = len(batch)
    return optimizer_step(loss, parts, n, teacher, opt, world)


def fit_teacher(data: InteractionData, cfg: Config, teacher: PromptMMTeacher, graph: GraphPropagator,
                epoch_samples: EpochSamples, total_pairs: int, world: World | None = None,
                train_module: torch.nn.Module | None = None, report: Report | None = None,
                log: Callable[[str], None] = print, resume: LoopState | None = None,
                progress_dir: str | None = None) -> StageResult:
    """Train until patience runs out; returns the best validation state (teacher + prompt).
    `report(row, state)` runs after every epoch with the state to resume from (`resume`)."""
    world = world or World()
    tc = cfg.teacher
    module = train_module or teacher  # DDP wrapper under Ray Train
    opt = teacher_optimizer(teacher, cfg)
    validator = Validator(data, world)
    stopper = EarlyStopper(patience=tc.patience)
    loop = Resumable("teacher", teacher, {"opt": opt}, stopper, rank=world.rank,
                     progress_dir=progress_dir, log=log, world=world)
    if resume is None:  # dropout keys come from torch's generator: every process starts it alike
        torch.manual_seed(cfg.seed)
    start, history, best_state, done = loop.restore(resume)
    n_steps = steps_per_epoch(total_pairs, tc.batch_size)
    t0 = time.perf_counter()
    for epoch in range(start, 0 if done else tc.epochs):
        loop.begin_epoch(epoch)
        te = time.perf_counter()
        teacher.train()
        sums: dict[str, float] = {}
        samples = epoch_samples(epoch)  # a rank's steps already split, or one batch to split here
        steps = samples if isinstance(samples, list) else split_steps(samples, n_steps)
        for batch in progress(steps, f"teacher epoch {epoch}", world):
            parts, _ = teacher_step(teacher, module, graph, batch, opt, cfg, world)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / n_steps
        sums = world.reduce_sums(sums)
        train_s = time.perf_counter() - te
        row = {"epoch": epoch, **{f"loss_{k}": v for k, v in sums.items()}, "train_s": train_s}
        if (epoch + 1) % tc.eval_every == 0 or epoch == tc.epochs - 1:
            teacher.eval()
            with torch.no_grad():
                out = teacher(graph)
                item = graph.gather_items(out.item)[0]
            val = validator(out.user, item, "val")
            row.update({"val": val, "epoch_s": time.perf_counter() - te})
            if stopper.update(epoch, val):
                best_state = copy.deepcopy(teacher.state_dict())
            row["best_epoch"] = stopper.best_epoch
            if world.is_main:
                log(epoch_line("teacher", row, tc.epochs))
            done = stopper.should_stop(epoch)
        history.append(row)
        if report is not None:
            report(row, loop.snapshot(epoch + 1, done, history, best_state))
        if done:
            break
    if best_state is not None:
        teacher.load_state_dict(best_state)
    teacher.eval()
    best_val = next((r["val"] for r in history if r["epoch"] == stopper.best_epoch and "val" in r), {})
    return StageResult(stopper.best_epoch, best_val, len(history), time.perf_counter() - t0, history, best_state)
