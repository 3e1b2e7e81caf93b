"""Sweep outputs: trials.csv, best_config.yaml, summary.md, plots/*.png and metrics.json.

Selection is on validation only: the best trial has the highest validation recall@20 (ties: NDCG@20);
only its test metrics are reported (every trial's Train ranks evaluate its best-epoch weights at
its end, each on its own users; the driver reads them and holds no data). The base configuration's
trial, when the sweep ran it, is reported the same way for comparison.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any


from promptmm_dist.config import Config
from promptmm_dist.tune import space as S
from promptmm_dist.train.validation import CLOSING_FILE
from promptmm_dist.tune.trial import DONE, METRIC

PLOT_KEYS = ("student.tau", "prompt.soft_token_rate", "prompt.feat_soft_token_rate", "prompt.prompt_dropout")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    m = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", Path(str(result.path)).name)
    return m.group(1) if m else Path(str(result.path)).name


def collect_trials(out: Path, results, pool: list, base: Config, keys: list[str],
                   manifest: str | None) -> list[dict[str, Any]]:
    """One row per trial (hyper-parameters as dotted keys, best validation epoch, how it ended)."""
    rows = []
    for r in results:
        tid = _trial_id(r)
        done_path = out / "trials" / tid / DONE
        done = json.loads(done_path.read_text()) if done_path.exists() else None
        overrides = S.trial_overrides(r.config or {}, pool)
        df = r.metrics_dataframe
        epochs: list[dict] = []
        if df is not None and not df.empty and METRIC in df:
            recs = df.to_dict("records")
            epochs = [e for e in recs if not _true(e.get("final")) and _num(e.get(METRIC)) is not None]
        row: dict[str, Any] = {"trial_id": tid, **{k: overrides.get(k) for k in keys}}
        row["teacher"] = done["teacher"] if done else S.teacher_signature(
            S.apply_overrides(base.to_dict(), overrides), manifest)
        if epochs:
            best = max(epochs, key=lambda e: (e[METRIC], _num(e.get("val_ndcg@20")) or 0.0))
            row.update({"val_recall@20": float(best[METRIC]), "val_ndcg@20": _num(best.get("val_ndcg@20")),
                        "best_epoch": int(best.get("epoch", epochs.index(best)))})
        else:
            row.update({"val_recall@20": None, "val_ndcg@20": None, "best_epoch": None})
        row["epochs_run"] = len(epochs)
        epochs_max = S.apply_overrides(base.to_dict(), overrides).student.epochs
        if r.error is not None:
            reason = "error"
        elif done is None:
            reason = "killed"
        elif done.get("stopped_by_scheduler") and len(epochs) < epochs_max:
            reason = "asha"
        elif len(epochs) < epochs_max:
            reason = "patience"
        else:
            reason = ""
        row["stopped_early"] = reason in ("asha", "patience", "killed")
        row["stop_reason"] = reason
        row["wall_s"] = round(float(done["wall_s"]), 2) if done else _num((r.metrics or {}).get("time_total_s"))
        row["teacher_wait_s"] = round(float(done["teacher_wait_s"]), 2) if done else None
        row["teacher_trained_here"] = bool(done["teacher_trained_here"]) if done else None
        row["status"] = "ERROR" if r.error is not None else "TERMINATED"
        row["_checkpoint"] = (done or {}).get("checkpoint") or _last_checkpoint(epochs, df)
        row["_overrides"] = overrides
        row["_config"] = dict(r.config or {})
        rows.append(row)
    rows.sort(key=lambda x: x["trial_id"])
    return rows


def _true(v: Any) -> bool:
    return v is not None and v == v and bool(v)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _last_checkpoint(epochs: list[dict], df) -> str | None:
    if df is None or "checkpoint_path" not in df:
        return None
    paths = [p for p in df["checkpoint_path"].tolist() if isinstance(p, str)]
    return paths[-1] if paths else None


def select_best(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["val_recall@20"] is not None]
    return max(ok, key=lambda r: (r["val_recall@20"], r["val_ndcg@20"] or 0.0)) if ok else None


# ------------------------------------------------------------------------------------ evaluation

def trial_closing(folder: str | Path) -> dict | None:
    """The val + test metrics of a trial's selected (best validation) student, which its Train ranks
    computed at the end of the trial, each on its own users, into the last checkpoint; None when the
    trial never got there (killed, or failed)."""
    path = Path(folder) / CLOSING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate_row(row: dict, dest: Path | None) -> dict | None:
    """The selected trial's test metrics (read, never recomputed here: the driver holds no data)."""
    closing = trial_closing(row["_checkpoint"]) if row.get("_checkpoint") else None
    if closing is None:
        log(f"tune: trial {row['trial_id']} left no closing metrics (no finished checkpoint); cannot report its test metrics")
        return None
    if dest is not None:  # the selected student, ready to serve (export.npz: its ranks' tables)
        dest.mkdir(parents=True, exist_ok=True)
        for f in Path(row["_checkpoint"]).iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    return {"trial_id": row["trial_id"], "val": closing["val"], "test": closing["test"],
            "best_epoch": row["best_epoch"], "epochs_run": row["epochs_run"], "stop_reason": row["stop_reason"],
            "config": row["_overrides"], "teacher": row["teacher"]}


# --------------------------------------------------------------------------------------- outputs

def write_reports(out: Path, results, space: S.SearchSpace, pool: list, base: Config, manifest: str,
                  hub_stats: dict, point: dict | None, plan: dict, state: dict, wall_s: float) -> dict:
    import pandas as pd

    keys = list(dict.fromkeys(space.student_keys + space.teacher_keys))
    rows = collect_trials(out, results, pool, base, keys, manifest)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    pd.DataFrame(public).to_csv(out / "trials.csv", index=False)
    best = select_best(rows)
    metrics: dict[str, Any] = {"mode": "tune"}
    if best is None:
        log("tune: no trial reported a validation metric")
    else:
        best_cfg = S.apply_overrides(base.to_dict(), best["_overrides"])
        header = (f"# promptmm tune: best of {len(rows)} trials on validation recall@20 (trial {best['trial_id']}, "
                  f"val recall@20 {best['val_recall@20']:.4f}, ndcg@20 {best['val_ndcg@20'] or 0:.4f}, "
                  f"best epoch {best['best_epoch']})\n# searched: " + ", ".join(
                      f"{k}={_fmt(best['_overrides'].get(k))}" for k in keys) + "\n")
        (out / "best_config.yaml").write_text(header + best_cfg.to_yaml())
        metrics["best"] = _evaluate_row(best, out / "best" / "student")
        default_row = None
        if point is not None:
            default_row = next((r for r in rows if all(r["_config"].get(k) == v for k, v in point.items())), None)
        if default_row is not None:
            metrics["default"] = (metrics["best"] if default_row is best
                                  else _evaluate_row(default_row, None))
    teachers = teacher_summary(hub_stats, rows, out / "teachers")
    cache = _accumulate(out / "teachers" / "cache_runs.json", cache_summary(hub_stats))
    n_asha = sum(r["stop_reason"] == "asha" for r in rows)
    metrics["sweep"] = {
        "trials": len(rows), "num_samples": state["num_samples"], "scheduler": state["scheduler"],
        "searcher": space.options["searcher"], "metric": METRIC, "stopped_by_asha": n_asha,
        "stopped_by_patience": sum(r["stop_reason"] == "patience" for r in rows),
        "errors": sum(r["stop_reason"] == "error" for r in rows),
        "epochs_run": int(sum(r["epochs_run"] for r in rows)),
        "epochs_max": int(sum(S.apply_overrides(base.to_dict(), r["_overrides"]).student.epochs for r in rows)),
        "max_concurrent": plan["max_concurrent"], "train_workers_per_trial": plan["workers"],
        "cpus_per_worker": plan["cpus_per_worker"], "teacher_pool": len(pool), "search_space": space.source,
        "wall_s": round(wall_s, 1)}
    finished = sum(r["stop_reason"] != "killed" for r in rows)
    metrics["sweep"]["interrupted"] = finished < state["num_samples"]
    metrics["teachers"], metrics["cache"] = teachers, cache
    metrics["timings"] = {"total_s": round(wall_s, 1)}
    log(f"tune: {len(rows)} trials in {wall_s:.0f}s; ASHA stopped {n_asha} early, "
        f"{metrics['sweep']['epochs_run']}/{metrics['sweep']['epochs_max']} student epochs run")
    log(f"tune: teachers: {teachers['distinct']} distinct setting(s) for {teachers['trials']} trials; "
        f"{teachers['trained']} trained now ({teachers['trained_s']:.0f}s), {teachers['reused_from_disk']} reused "
        f"from disk; sharing avoided {teachers['trainings_avoided']} teacher trainings (~{teachers['saved_s']:.0f}s)")
    log(f"tune: soft rankings: {cache['epochs_served']} epoch requests served from {cache['epochs_computed']} "
        f"computed epochs ({cache['epochs_saved']} teacher passes avoided, ~{cache['saved_s']:.1f}s; "
        f"{cache['recomputed']} recomputed after being freed; at most {cache['max_held']} epochs held per teacher, "
        f"{cache['bytes_per_epoch'] / 2**20:.1f} MiB each)")
    if metrics["sweep"]["interrupted"]:
        log(f"tune: the sweep was interrupted ({finished}/{state['num_samples']} trials finished); outputs cover "
            f"the finished trials; continue it with --resume")
    plots = write_plots(out, rows, space, best)
    write_summary(out, rows, keys, metrics, plots)
    return metrics


def teacher_summary(hub_stats: dict, rows: list[dict], folder: Path) -> dict:
    """Teachers of the whole sweep (a resumed sweep included): how many were trained, how many trials
    used each, and the teacher trainings the sharing avoided (each trial would otherwise train one)."""
    path = folder / "teachers.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    now = hub_stats.get("teachers", {})
    trained_now = [s for s, t in now.items() if t.get("source") == "trained" and t.get("state") == "ready"]
    per_trial: dict[str, int] = {}
    for r in rows:
        per_trial[r["teacher"]] = per_trial.get(r["teacher"], 0) + 1
    train_s = {s: float(t.get("train_s", 0.0)) for s, t in known.items()}
    trained_total = len([s for s in per_trial if s in known])
    return {"distinct": len(per_trial), "trained": len(trained_now), "trained_total": trained_total,
            "reused_from_disk": len([s for s, t in now.items() if t.get("source") == "disk"]),
            "trials": len(rows), "trainings_avoided": len(rows) - trained_total,
            "trained_s": round(sum(train_s.get(s, 0.0) for s in trained_now), 1),
            "saved_s": round(sum((n - 1) * train_s.get(s, 0.0) for s, n in per_trial.items()), 1),
            "per_teacher": {s: {"trials": n, "train_s": round(train_s.get(s, 0.0), 1),
                                "trained_by": known.get(s, {}).get("trained_by"),
                                "val_recall@20": (known.get(s, {}).get("val") or {}).get("recall@20")}
                            for s, n in per_trial.items()}}


def cache_summary(hub_stats: dict) -> dict:
    caches = hub_stats.get("caches", [])
    computed = sum(c["epochs_computed"] for c in caches)
    served = sum(c["served"] for c in caches)
    compute_s = sum(c["compute_s"] for c in caches)
    per_epoch = compute_s / computed if computed else 0.0
    return {"caches": len(caches), "epochs_computed": computed, "epochs_served": served,
            "epochs_saved": served - computed, "recomputed": sum(c["recomputed"] for c in caches),
            "compute_s": round(compute_s, 2), "saved_s": round((served - computed) * per_epoch, 2),
            "teacher_loads": len(caches), "trials_served": sum(c["trials"] for c in caches),
            "max_held": max((c["max_held"] for c in caches), default=0),
            "bytes_per_epoch": max((c["bytes_per_epoch"] for c in caches), default=0)}


def _accumulate(path: Path, now: dict) -> dict:
    """Cache figures of the whole sweep: a resumed sweep adds this invocation's to the earlier ones."""
    from promptmm_dist.run_io import write_json

    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(now)
    write_json(path, runs)
    total = {k: sum(r.get(k, 0) for r in runs) for k in now if k not in ("max_held", "bytes_per_epoch")}
    total.update({k: max(r.get(k, 0) for r in runs) for k in ("max_held", "bytes_per_epoch")})
    total["invocations"] = len(runs)
    return total


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_plots(out: Path, rows: list[dict], space: S.SearchSpace, best: dict | None) -> list[str]:
    """Validation recall@20 against tau and each prompt rate (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    made = []
    for key in PLOT_KEYS:
        pts = [(r["_overrides"].get(key), r["val_recall@20"], r["stop_reason"], r is best) for r in rows
               if r["val_recall@20"] is not None and isinstance(r["_overrides"].get(key), (int, float))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for label, sel, marker in (("ran to the end / patience", lambda p: p[2] != "asha", "o"),
                                   ("stopped by ASHA", lambda p: p[2] == "asha", "x")):
            xs = [p[0] for p in pts if sel(p)]
            ys = [p[1] for p in pts if sel(p)]
            if xs:
                ax.scatter(xs, ys, marker=marker, label=label)
        for p in pts:
            if p[3]:
                ax.scatter([p[0]], [p[1]], s=160, facecolors="none", edgecolors="red", label="best")
        if space.is_log(key):
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel("best validation recall@20")
        ax.set_title(f"validation recall@20 vs {key.split('.')[-1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"val_recall_vs_{key.split('.')[-1]}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made.append(f"plots/{name}")
    return made


def write_summary(out: Path, rows: list[dict], keys: list[str], metrics: dict, plots: list[str]) -> None:
    sw = metrics["sweep"]
    lines = [f"# Tune sweep: {out.name}", "",
             f"{sw['trials']} trials ({sw['searcher']} search, {sw['scheduler']} scheduler on validation "
             f"recall@20 every epoch), {sw['max_concurrent']} at once x {sw['train_workers_per_trial']} Train "
             f"worker(s) x {sw['cpus_per_worker']} CPU; wall time {sw['wall_s']:.0f}s; ASHA stopped "
             f"{sw['stopped_by_asha']} trial(s) early; {sw['epochs_run']}/{sw['epochs_max']} student epochs run.", ""]
    for name in ("best", "default"):
        m = metrics.get(name)
        if m:
            lines.append(f"**{name}** (trial {m['trial_id']}, best epoch {m['best_epoch']}): "
                         f"val recall@20 {m['val']['recall@20']:.4f} ndcg@20 {m['val']['ndcg@20']:.4f}; "
                         f"**test** recall@20 {m['test']['recall@20']:.4f} ndcg@20 {m['test']['ndcg@20']:.4f}")
            lines.append("")
    t, c = metrics["teachers"], metrics["cache"]
    lines += [f"Teachers: {t['distinct']} distinct setting(s) for {t['trials']} trials, each trained once "
              f"({t['trainings_avoided']} trainings avoided, ~{t['saved_s']:.0f}s). Soft rankings: "
              f"{c['epochs_served']} epoch requests served from {c['epochs_computed']} computed epochs.", "",
              "Selection on validation only; test is evaluated once, for the selected trial (and the base configuration).",
              ""]
    short = [k.split(".")[-1] for k in keys]
    lines.append("| trial | " + " | ".join(short) + " | teacher | val R@20 | val N@20 | epochs | stopped | wall s |")
    lines.append("|" + "---|" * (len(keys) + 7))
    for r in sorted(rows, key=lambda r: -(r["val_recall@20"] or -1)):
        cells = [r["trial_id"]] + [_fmt(r.get(k)) for k in keys] + [
            str(r["teacher"])[:6], f"{r['val_recall@20']:.4f}" if r["val_recall@20"] is not None else "-",
            f"{r['val_ndcg@20']:.4f}" if r["val_ndcg@20"] is not None else "-", str(r["epochs_run"]),
            r["stop_reason"] or "no", f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", *[f"![{p}]({p})" for p in plots]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
