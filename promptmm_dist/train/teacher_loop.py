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
from promptmm_dist.train.steps import teacher_loss
from promptmm_dist.train.validation import Validator
from promptmm_dist.train.world import World

EpochSamples = Callable[[int], SampleBatch]
Report = Callable[[dict, LoopState], None]


def prepare_features(features: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """Per-modality feature scaling: raw scales differ by orders of magnitude (Tiktok image rows have
    norm ~33, Last.fm VGGish ~1,500, MiniLM text 1), which would let one modality dominate."""
    if how == "none":
        return features
    if how != "standardize":
        raise ValueError(f"unknown teacher.feature_norm {how!r} (standardize | none)")
    out = {}
    for m, x in features.items():
        mu, sd = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True)
        out[m] = ((x - mu) / np.where(sd > 1e-8, sd, 1.0)).astype(np.float32)
    return out


def build_teacher(data: InteractionData, cfg: Config, cache_folder=None) -> PromptMMTeacher:
    """Teacher + prompt module for a dataset (hard tokens cached per dataset and size)."""
    torch.manual_seed(cfg.seed)
    tokens = cached_hard_tokens(data.features, cfg.teacher.embed_dim, cache_folder, data.manifest_sha256)
    prompt = PromptModule(tokens, data.train_csr, dropout=cfg.prompt.prompt_dropout)
    features = prepare_features(data.features, cfg.teacher.feature_norm)
    if cfg.teacher.backbone not in TEACHERS:
        raise ConfigError(f"teacher.backbone {cfg.teacher.backbone!r}: unknown (known: {', '.join(TEACHERS)})")
    backbone = TEACHERS[cfg.teacher.backbone]
    return backbone(data.n_users, data.n_items, features, prompt, cfg.teacher, cfg.prompt, data.train_csr)


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
    """Same number of steps on every rank (DDP needs matching collective calls)."""
    idx = np.array_split(np.arange(len(samples)), n_steps)
    return [SampleBatch(samples.users[i], samples.items[i]) for i in idx]


def steps_per_epoch(total_pairs: int, batch_size: int) -> int:
    return max(1, math.ceil(total_pairs / batch_size))


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
    prompt_params = list(teacher.prompt.parameters())
    prompt_ids = {id(p) for p in prompt_params}
    other = [p for p in teacher.parameters() if id(p) not in prompt_ids]
    opt = torch.optim.Adam([{"params": other, "lr": tc.lr},
                            {"params": prompt_params, "lr": cfg.prompt.lr}])
    validator = Validator(data, world)
    stopper = EarlyStopper(patience=tc.patience)
    loop = Resumable("teacher", teacher, {"opt": opt}, stopper, rank=world.rank,
                     progress_dir=progress_dir, log=log)
    start, history, best_state, done = loop.restore(resume)
    n_steps = steps_per_epoch(total_pairs, tc.batch_size)
    t0 = time.perf_counter()
    for epoch in range(start, 0 if done else tc.epochs):
        loop.begin_epoch(epoch)
        te = time.perf_counter()
        teacher.train()
        sums: dict[str, float] = {}
        for batch in progress(split_steps(epoch_samples(epoch), n_steps), f"teacher epoch {epoch}", world):
            out = module(graph)
            users = torch.from_numpy(batch.users)
            items = torch.from_numpy(batch.items)
            loss, parts = teacher_loss(out, teacher.base_embeddings(), users, items, tc, cfg.prompt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / n_steps
        train_s = time.perf_counter() - te
        row = {"epoch": epoch, **{f"loss_{k}": v for k, v in sums.items()}, "train_s": train_s}
        if (epoch + 1) % tc.eval_every == 0 or epoch == tc.epochs - 1:
            teacher.eval()
            with torch.no_grad():
                out = teacher(graph)
            val = validator(out.user, out.item, "val")
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
