"""Results report (issue: the method, measured on real data). Test metrics at the validation-selected
epoch for the baselines, the teacher, the PromptMM student and its ablations, under one protocol.

    python bench/results_report.py --dataset tiktok --seeds 3 --jobs 2
    python bench/results_report.py --dataset lastfm2k --seeds 3 --rows lightgcn,teacher,student
    python bench/results_report.py --dataset lastfm2k --rows teacher,student,no_emb_kd --teacher-seeds 3 \
        --ablation-seeds 3 --set teacher.backbone=contrastive --name results_lastfm2k_contrastive

Each row runs the local (in-process) pipeline with the dataset's recipe (`--recipe`, by default the
packaged one named like --dataset) plus the row's overrides. The teacher is trained once (seed 0)
and shared by every student row; `--teacher-seeds 3` adds seeds 1 and 2 to the teacher row only;
with `--paired-teachers` student seed s distils teacher seed s instead, so a student row's sd also
holds the teacher's seed-to-seed spread. A row whose folder under --out already holds a finished run with
the same config is read back, not retrained, so an interrupted report resumes (and rows can be run
in separate invocations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import emit, markdown_table, require_real

# row name -> (model, config overrides); students use the shared teacher
ROWS: dict[str, tuple[str, list[str]]] = {
    "mf": ("mf", []),
    "lightgcn": ("lightgcn", []),
    "student": ("student", []),
    "no_pair_kd": ("student", ["student.lambda_pair=0"]),
    "no_list_kd": ("student", ["student.lambda_list=0"]),
    "no_emb_kd": ("student", ["student.lambda_emb=0"]),
    "frozen_prompt": ("student", ["prompt.refresh_epochs=0"]),
    "dkd_list_kd": ("student", ["student.list_kd=dkd"]),
}
HEADLINE = ("lightgcn", "student")


def _config(data_path: str, overrides: list[str], seed: int):
    from promptmm_dist.config import load_config

    cfg = load_config(None, overrides, data_path=data_path)
    cfg.seed = seed
    return cfg


def row_config(name: str, data_path: str, seed: int, extra: tuple[str, ...] = ()):
    overrides = [] if name == "teacher" else ROWS[name][1]
    return _config(data_path, [*extra, *overrides], seed)


# settings a no-KD baseline row never reads: changing them does not invalidate its finished run
KD_ONLY = ("tau", "lambda_pair", "lambda_list", "lambda_emb", "emb_alpha", "emb_kd_items", "neg_sample_num",
           "list_users_per_batch", "list_modal_weight", "list_fused_weight", "list_kd", "dkd_alpha",
           "dkd_beta", "init_from_teacher")


def _relevant(name: str, cfg: dict) -> dict:
    """The part of a config that determines a row's result."""
    keep = {k: v for k, v in cfg.items() if k not in ("out", "dist")}
    if name != "teacher" and ROWS[name][0] != "student":  # baselines: no teacher, no prompt, no KD
        keep = {k: v for k, v in keep.items() if k not in ("teacher", "prompt")}
        keep["student"] = {k: v for k, v in keep["student"].items() if k not in KD_ONLY}
    if name == "teacher":
        keep.pop("student", None)
    return keep


def distils(name: str) -> bool:
    """Whether a row trains a student from the teacher (the teacher row and baselines do not)."""
    return ROWS.get(name, ("",))[0] == "student"


def row_folder(out: str, name: str, seed: int, teacher_seed: int = 0) -> Path:
    """A row's run folder; a student distilled from another teacher seed than 0 gets its own."""
    suffix = f"_teacher{teacher_seed}" if teacher_seed and name != "teacher" else ""
    return Path(out) / f"{name}_seed{seed}{suffix}"


def finished_row(name: str, data_path: str, seed: int, out: str, extra: tuple[str, ...] = (),
                 teacher_seed: int = 0) -> dict | None:
    """The result of an earlier run of this row, if its folder holds one with the same config
    (so an interrupted report resumes where it stopped)."""
    import json

    import yaml

    stage = "teacher" if name == "teacher" else ROWS[name][0]  # the stage's folder: teacher, student, lightgcn, mf
    folder = row_folder(out, name, seed, teacher_seed) / stage
    if not (folder / "meta.json").exists() or not (folder / "config.yaml").exists():
        return None
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    wanted = row_config(name, data_path, seed, extra).to_dict()
    if _relevant(name, saved) != _relevant(name, wanted):
        return None
    meta = json.loads((folder / "meta.json").read_text())
    return {**row_result(name, seed, meta, meta["train_seconds"]), "reused": True}


def row_result(name: str, seed: int, meta: dict, train_s: float) -> dict:
    """A report row from a stage's meta.json (teacher or student/baseline)."""
    test, val = meta["test"], meta["val"]
    params = meta["teacher_params"] if name == "teacher" else meta["student_total"]
    inference = params if name == "teacher" else meta["student_inference"]
    return {"row": name, "seed": seed, "recall@20": test["recall@20"], "ndcg@20": test["ndcg@20"],
            "precision@20": test["precision@20"], "legacy_ndcg@20": test["legacy_ndcg@20"],
            "val_recall@20": val["recall@20"], "best_epoch": meta["best_epoch"], "params": params,
            "inference_params": inference, "train_s": train_s}


def run_row(name: str, data_path: str, seed: int, out: str, teacher_dir: str | None, threads: int,
            extra: tuple[str, ...] = (), teacher_seed: int = 0) -> dict:
    import torch

    from promptmm_dist.data.formats import load_dataset
    from promptmm_dist.pipeline import student_stage, teacher_stage
    from promptmm_dist.train.teacher_checkpoint import load_teacher

    done = finished_row(name, data_path, seed, out, extra, teacher_seed)
    if done is not None:
        return done
    torch.set_num_threads(threads)
    data = load_dataset(data_path)
    t0 = time.perf_counter()
    folder = row_folder(out, name, seed, teacher_seed)
    cfg = row_config(name, data_path, seed, extra)
    if name == "teacher":
        _, meta = teacher_stage(data, cfg, folder)
    else:
        model = ROWS[name][0]
        teacher = load_teacher(data, cfg, Path(teacher_dir)) if model == "student" else None
        _, meta = student_stage(data, cfg, folder, teacher, model="lightgcn" if model == "student" else model)
    return row_result(name, seed, meta, time.perf_counter() - t0)


def teacher_row(folder: Path) -> dict:
    """The teacher row of an existing run (its meta.json)."""
    import json

    meta = json.loads((folder / "teacher" / "meta.json").read_text())
    return row_result("teacher", -1, meta, meta["train_seconds"])


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == name]
        rec = [r["recall@20"] for r in rs]
        row = {"row": name, "seeds": len(rs)}
        for key in ("recall@20", "ndcg@20", "precision@20", "legacy_ndcg@20", "val_recall@20", "train_s"):
            row[key] = statistics.mean(r[key] for r in rs)
        row["recall@20_sd"] = statistics.stdev(rec) if len(rec) > 1 else 0.0
        row["per_seed"] = ", ".join(f"{v:.4f}" for v in rec)
        row["best_epochs"] = ", ".join(str(r["best_epoch"]) for r in rs)
        row["params"], row["inference_params"] = rs[0]["params"], rs[0]["inference_params"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="tiktok")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the headline rows (lightgcn, student)")
    ap.add_argument("--teacher-seeds", type=int, default=1,
                    help="seeds for the teacher row (every student row distils seed 0's teacher)")
    ap.add_argument("--ablation-seeds", type=int, default=1, help="seeds for the other rows (ablations, mf)")
    ap.add_argument("--rows", default="mf,lightgcn,teacher,student,no_pair_kd,no_list_kd,no_emb_kd,"
                                      "frozen_prompt,dkd_list_kd")
    ap.add_argument("--paired-teachers", action="store_true",
                    help="student seed s distils teacher seed s (needs --teacher-seeds >= the student seeds)")
    ap.add_argument("--out", default="runs/report")
    ap.add_argument("--jobs", type=int, default=2, help="rows trained in parallel (1 torch thread each)")
    ap.add_argument("--set", action="append", default=[], help="config override for every row")
    ap.add_argument("--recipe", default=None, help="recipe for every row (default: the packaged one named "
                                                   "like --dataset; 'none' for the plain defaults)")
    ap.add_argument("--name", default=None, help="result file stem under bench/results/ (default results_<dataset>)")
    ap.add_argument("--teacher", default=None, help="reuse this trained teacher run folder (its config must "
                                                    "match the recipe) instead of training one")
    args = ap.parse_args()
    data_path = str(require_real(args.dataset))
    out = Path(args.out) / args.dataset
    names = args.rows.split(",")
    extra = (f"data.recipe={args.recipe or args.dataset}", *args.set)  # the recipe is chosen explicitly
    t0 = time.perf_counter()
    results: list[dict] = []
    threads = 1 if args.jobs > 1 else 2
    if args.teacher:
        results.append(teacher_row(Path(args.teacher)))
    elif "teacher" in names or any(distils(n) for n in names):
        results.append(run_row("teacher", data_path, 0, str(out), None, 2, extra))
    if results:
        print(f"teacher: test recall@20 {results[-1]['recall@20']:.4f}", flush=True)
    jobs = [(n, s) for n in names if n != "teacher"
            for s in range(args.seeds if n in HEADLINE else args.ablation_seeds)]
    paired = args.paired_teachers and not args.teacher
    if paired and any(distils(n) and s >= args.teacher_seeds for n, s in jobs):
        ap.error("--paired-teachers: every student seed needs a teacher seed (raise --teacher-seeds)")
    teacher_jobs = [("teacher", s) for s in range(1, args.teacher_seeds)
                    if not args.teacher and ("teacher" in names or (paired and any(distils(n) for n, _ in jobs)))]

    def report(r: dict) -> None:
        results.append(r)
        print(f"{r['row']} seed {r['seed']}: test recall@20 {r['recall@20']:.4f} "
              f"(val {r['val_recall@20']:.4f}, {r['train_s']:.0f}s)", flush=True)

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # paired students need their teacher first; otherwise the teacher seeds run beside the rows
        waves = [teacher_jobs, jobs] if paired else [teacher_jobs + jobs]
        for wave in waves:
            futures = []
            for n, s in wave:
                t = s if paired and distils(n) else 0  # the teacher seed this row distils
                tdir = args.teacher or str(out / f"teacher_seed{t}")
                futures.append(pool.submit(run_row, n, data_path, s, str(out), tdir, threads, extra, t))
            for f in futures:
                report(f.result())
    rows = summarise(results)
    by = {r["row"]: r for r in rows}
    gain = None
    if "lightgcn" in by and "student" in by:
        gain = by["student"]["recall@20"] / by["lightgcn"]["recall@20"] - 1
    cols = ["row", "seeds", "recall@20", "recall@20_sd", "per_seed", "ndcg@20", "precision@20", "legacy_ndcg@20",
            "val_recall@20", "best_epochs", "params", "inference_params", "train_s"]
    table = f"### {args.dataset}: test metrics at the validation-selected epoch\n\n" + markdown_table(rows, cols)
    if gain is not None:
        table += f"\n\nstudent vs LightGCN (mean of {args.seeds} seeds): {gain * 100:+.1f}% recall@20"
    reused = sum(1 for r in results if r.get("reused"))
    table += (f"\n\ntraining time summed over all runs {sum(r['train_s'] for r in results):.0f}s; this invocation "
              f"{time.perf_counter() - t0:.0f}s wall ({reused} of {len(results)} runs read back from earlier invocations)")
    if paired:
        table += "\n\nstudent seed s distils teacher seed s (--paired-teachers)"
    if args.set:
        table += f"\n\noverrides for every row: {' '.join(args.set)}"
    emit(args.name or f"results_{args.dataset}", {"dataset": args.dataset, "rows": rows, "runs": results, "overrides": args.set,
                                     "student_gain_over_lightgcn": gain, "paired_teachers": paired}, table)


if __name__ == "__main__":
    main()
