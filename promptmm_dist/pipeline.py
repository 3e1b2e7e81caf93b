"""Stages wired together: teacher -> student (distillation) -> test at the validation-selected epoch.

`local` functions run everything in this process; `promptmm_dist.distributed` runs the same loops on
Ray (shard actors, teacher workers, Ray Train). The CLI picks one from the config's `dist` section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptmm_dist.config import Config, load_config, validate
from promptmm_dist.data.dataset import DatasetInfo, InteractionData
from promptmm_dist.data.formats import canonical_info, load_dataset
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.local_kd import InProcessTeacherKD, NoKD, epoch_seed
from promptmm_dist.eval.evaluate import EvalData, embedding_scorer, evaluate_splits
from promptmm_dist.models.student import MODELS, LightGCN
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.paths import hard_token_dir
from promptmm_dist.run_io import load_state, save_checkpoint, write_history, write_json
from promptmm_dist.train.student_loop import fit_student
from promptmm_dist.train.teacher_checkpoint import load_teacher
from promptmm_dist.train.world import World
from promptmm_dist.train.teacher_loop import StageResult, build_teacher, fit_teacher, steps_per_epoch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def final_metrics(data: InteractionData, user: torch.Tensor, item: torch.Tensor) -> dict[str, dict]:
    return evaluate_splits(embedding_scorer(user, item), EvalData.from_data(data), ("val", "test"))


# ----------------------------------------------------------------------------------------- stages

def teacher_stage(data: InteractionData, cfg: Config, out: Path) -> tuple[PromptMMTeacher, dict]:
    """Train the teacher + prompt locally, save the best (validation) checkpoint, return metrics."""
    from promptmm_dist.run_resume import StageRun, stage_fingerprint

    stage = StageRun(out / "teacher", stage_fingerprint(cfg, "teacher", data.manifest_sha256), "teacher.pt")
    if stage.finished:  # a rerun into the same --out: same inputs, so the same teacher
        log(f"teacher: reusing the finished stage in {stage.folder}")
        return load_teacher(data, cfg, stage.folder), stage.meta()
    graph = GraphPropagator.from_train(data.train_csr, cfg.teacher.norm)
    teacher = build_teacher(data, cfg, cache_folder=hard_token_dir())
    sampler = TrainSampler(data.train_csr)
    n_steps = steps_per_epoch(sampler.n_pairs, cfg.teacher.batch_size)
    result = fit_teacher(data, cfg, teacher, graph,
                         lambda e: sampler.epoch(1, epoch_seed(cfg.seed, e), n_steps), sampler.n_pairs, log=log,
                         **stage.loop_kwargs())
    with torch.no_grad():
        o = teacher(graph)
    metrics = final_metrics(data, o.user, o.item)
    meta = stage_meta(data, result, metrics, teacher_params=count_params(teacher))
    save_checkpoint(out / "teacher", "teacher", teacher.state_dict(), cfg, meta)
    write_history(out / "teacher" / "history.jsonl", result.history)
    stage.finish()
    return teacher, meta


def student_stage(data: InteractionData, cfg: Config, out: Path, teacher: PromptMMTeacher | None,
                  model: str = "lightgcn") -> tuple[LightGCN, dict]:
    """Distil (teacher given) or train a no-KD baseline (teacher None); save best checkpoint + export."""
    sc = cfg.student
    graph = GraphPropagator.from_train(data.train_csr, sc.norm)
    torch.manual_seed(cfg.seed)
    teacher_dim = cfg.teacher.embed_dim if teacher is not None else None
    student = MODELS[model](data.n_users, data.n_items, embed_dim=sc.embed_dim, n_layers=sc.n_layers,
                            teacher_dim=teacher_dim)
    World().init_tables(student, cfg.seed)  # rows drawn by id, as the partitioned ranks draw theirs
    name = "student" if teacher is not None else model
    from promptmm_dist.run_resume import StageRun, stage_fingerprint

    fingerprint = stage_fingerprint(cfg, "student", data.manifest_sha256,
                                    teacher.state_dict() if teacher is not None else None)
    stage = StageRun(out / name, {**fingerprint, "model": model}, f"{name}.pt")
    if stage.finished:  # a rerun into the same --out: same inputs and teacher, so the same student
        log(f"{name}: reusing the finished stage in {stage.folder}")
        student.load_state_dict(load_state(stage.folder / f"{name}.pt"))
        student.eval()
        return student, stage.meta()
    sampler = TrainSampler(data.train_csr)
    if teacher is not None:
        t_graph = GraphPropagator.from_train(data.train_csr, cfg.teacher.norm)
        kd = InProcessTeacherKD(teacher, t_graph, sampler, cfg, student=student)
        if sc.init_from_teacher:
            o = kd.teacher_output()
            student.init_from(o.user, o.item)
            log("student initialised from teacher embeddings (init_from_teacher=true)")
    else:
        kd = NoKD(sampler, cfg)
    result = fit_student(data, cfg, student, graph, kd, sampler.n_pairs, log=log, stage=name,
                         **stage.loop_kwargs())
    with torch.no_grad():
        user, item = student(graph)
    metrics = final_metrics(data, user, item)
    meta = stage_meta(data, result, metrics, student_total=count_params(student),
                      student_inference=student.inference_parameters())
    meta["prompt_rounds"] = result.prompt_rounds
    folder = out / name
    save_checkpoint(folder, name, student.state_dict(), cfg, meta)
    np.savez(folder / "export.npz", user=user.numpy(), item=item.numpy())
    write_history(folder / "history.jsonl", result.history)
    stage.finish()
    return student, meta


def stage_meta(data: InteractionData, result: StageResult, metrics: dict, **extra: Any) -> dict:
    return {"val": metrics["val"], "test": metrics["test"], "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "train_seconds": result.seconds,
            "dataset": data.name, "manifest_sha256": data.manifest_sha256, **extra}


# -------------------------------------------------------------------------------------- commands

def config_from_args(args: argparse.Namespace) -> Config:
    if getattr(args, "mlflow", None) is not None:  # fail before training when tracking cannot work
        from promptmm_dist.tracking import require_mlflow
        require_mlflow(args.mlflow)
    cfg = load_config(args.config, args.set, data_path=args.data)
    cfg.data.format = args.format
    cfg.out = args.out
    if args.seed is not None:
        cfg.seed = args.seed
    labels = {"seed": "--seed"} if args.seed is not None else {}
    for attr, key in (("num_workers", "num_workers"), ("num_shards", "num_shards"), ("address", "address")):
        if getattr(args, attr, None) is not None:
            setattr(cfg.dist, key, getattr(args, attr))
            cfg.dist.use_ray = True  # an explicit distribution flag (even --num-workers 0) means Ray
            labels[f"dist.{key}"] = "--" + attr.replace("_", "-")
    cfg = validate(cfg, labels)
    from promptmm_dist.ray_setup import shards_cover_workers
    shards_cover_workers(cfg.dist, log)  # before config.yaml is written, so it records what runs
    return cfg


def prepare_run(args: argparse.Namespace) -> tuple[Config, "InteractionData | DatasetInfo", Path]:
    cfg = config_from_args(args)
    ray_run = uses_ray(cfg) and getattr(args, "command", None) != "baseline"  # baseline always runs in-process
    # a Ray run's driver reads a prepared folder's manifest only: the ranks and actors read the rows
    data = canonical_info(cfg.data.path, cfg.data.modalities) if ray_run and cfg.data.format in ("auto", "canonical") else None
    if data is None:
        data = load_dataset(cfg.data.path, cfg.data.format, cfg.data.modalities)
    if ray_run:
        # reach the cluster and check the workers fit it before anything is written
        from promptmm_dist import ray_setup
        ray_setup.init_ray(cfg.dist)
        ray_setup.check_workers_fit(cfg.dist)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from promptmm_dist.run_lock import acquire
    from promptmm_dist.run_resume import clear_run

    acquire(out)  # one run per --out: a second one stops here with one line
    if getattr(args, "restart", False):
        clear_run(out)  # --restart: forget finished stages and partial epochs
    (out / "config.yaml").write_text(cfg.to_yaml())
    if ray_run and isinstance(data, InteractionData):
        # another layout (or synthetic data) was loaded to validate it: write the canonical copy the
        # ranks and actors read now, and keep only its identity, so the driver holds no rows for the run
        from promptmm_dist.partition.setup import canonical_folder

        canonical_folder(data, cfg.data.path, out)
        data = DatasetInfo(data.name, data.n_users, data.n_items, list(data.modalities), data.manifest_sha256)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    return cfg, data, out


def uses_ray(cfg: Config) -> bool:
    """Distributed path when asked for workers/shards/Ray (`dist.use_ray`, set by any explicit
    --num-workers/--num-shards/--address, so `--num-workers 0` is Ray Train local mode) or a cluster;
    the in-process path otherwise."""
    import os
    return bool(cfg.dist.use_ray or cfg.dist.num_workers or cfg.dist.num_shards > 1 or cfg.dist.address
                or os.environ.get("RAY_ADDRESS"))


def finish(out: Path, metrics: dict, args: argparse.Namespace) -> int:
    write_json(out / "metrics.json", metrics)
    if metrics.get("mode") != "tune":  # a sweep writes its own summary.md and plots
        from promptmm_dist.report.command import write_run_report
        write_run_report(out)
    if getattr(args, "mlflow", None) and metrics.get("mode") != "tune":  # sweeps: one MLflow run per trial
        from promptmm_dist.tracking import log_run
        log_run(out, metrics, args.mlflow, getattr(args, "command", "run"))
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        summary = {k: v for k, v in metrics.items() if isinstance(v, dict) and "test" in v}
        for name, m in summary.items():
            log(f"{name}: test recall@20 {m['test']['recall@20']:.4f} ndcg@20 {m['test']['ndcg@20']:.4f} "
                f"(val {m['val']['recall@20']:.4f}, best epoch {m.get('best_epoch')})")
        log(f"metrics: {out / 'metrics.json'}")
        if metrics.get("mode") != "tune":
            log(f"curves: {out / 'curves.png'}, summary: {out / 'summary.md'}")
    return 0


def train_teacher_command(args: argparse.Namespace) -> int:
    cfg, data, out = prepare_run(args)
    t0 = time.perf_counter()
    if uses_ray(cfg):
        from promptmm_dist.distributed import run_distributed
        metrics = run_distributed(data, cfg, out, stages=("teacher",))
    else:
        _, meta = teacher_stage(data, cfg, out)
        metrics = {"teacher": meta, "timings": {"teacher_s": time.perf_counter() - t0}}
    return finish(out, metrics, args)


def distill_command(args: argparse.Namespace) -> int:
    cfg, data, out = prepare_run(args)
    t0 = time.perf_counter()
    if uses_ray(cfg):
        from promptmm_dist.distributed import run_distributed
        metrics = run_distributed(data, cfg, out, stages=("student",), teacher_dir=Path(args.teacher))
    else:
        teacher = load_teacher(data, cfg, Path(args.teacher))
        _, meta = student_stage(data, cfg, out, teacher)
        metrics = {"student": meta, "timings": {"student_s": time.perf_counter() - t0}}
    return finish(out, metrics, args)


def baseline_command(args: argparse.Namespace) -> int:
    cfg, data, out = prepare_run(args)
    t0 = time.perf_counter()
    _, meta = student_stage(data, cfg, out, None, model=args.model)
    metrics = {args.model: meta, "val": meta["val"], "test": meta["test"],
               "timings": {f"{args.model}_s": time.perf_counter() - t0}}
    return finish(out, metrics, args)


def run_command(args: argparse.Namespace) -> int:
    cfg, data, out = prepare_run(args)
    if uses_ray(cfg):
        from promptmm_dist.distributed import run_distributed
        metrics = run_distributed(data, cfg, out, stages=("teacher", "student"))
        return finish(out, metrics, args)
    t0 = time.perf_counter()
    teacher, t_meta = teacher_stage(data, cfg, out)
    t1 = time.perf_counter()
    _, s_meta = student_stage(data, cfg, out, teacher)
    t2 = time.perf_counter()
    metrics = {
        "teacher": t_meta, "student": s_meta,
        "params": {"teacher_total": t_meta["teacher_params"], "student_total": s_meta["student_total"],
                   "student_inference": s_meta["student_inference"]},
        "timings": {"teacher_s": t1 - t0, "student_s": t2 - t1, "total_s": t2 - t0},
        "mode": "local",
    }
    return finish(out, metrics, args)
