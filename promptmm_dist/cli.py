"""`promptmm` command line. Each sub-command is a thin wrapper over a function in its stage's module;
errors in user input become one line on stderr and exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from typing import Callable, Sequence

from promptmm_dist.errors import ConfigError, DataError, RunFailed

# sub-command -> "module:function"; imported lazily so `promptmm --help` stays fast and side-effect free
HANDLERS: dict[str, str] = {
    "data info": "promptmm_dist.data.info:info_command",
    "data synth": "promptmm_dist.data.synthetic:synth_command",
    "prepare": "promptmm_dist.data.prepare:prepare_command",
    "evaluate": "promptmm_dist.eval.evaluate:evaluate_command",
    "train-teacher": "promptmm_dist.pipeline:train_teacher_command",
    "distill": "promptmm_dist.pipeline:distill_command",
    "baseline": "promptmm_dist.pipeline:baseline_command",
    "run": "promptmm_dist.pipeline:run_command",
    "tune": "promptmm_dist.tune.sweep:tune_command",
    "recommend": "promptmm_dist.serve:recommend_command",
    "report": "promptmm_dist.report.command:report_command",
}


RECIPE_HELP = ("dataset recipe over the defaults: a packaged one (tiktok, lastfm2k, synthetic), a YAML file, "
               "or 'none'. Default: the dataset manifest's `recipe` (promptmm prepare --recipe), 'synthetic' "
               "for --data synthetic, else none. Never chosen from the folder's name")


def _add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="dataset folder (PromptMM json, MMRec .inter or prepared) or 'synthetic' (default)")
    p.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"],
                   help="input layout; detected automatically by default")


def _add_run_args(p: argparse.ArgumentParser, out_default: str) -> None:
    _add_data_arg(p)
    p.add_argument("--out", default=out_default, help="output folder (config, metrics, checkpoints)")
    p.add_argument("--recipe", default=None, metavar="NAME_OR_PATH", help=RECIPE_HELP)
    p.add_argument("--config", default=None, help="YAML config file (over the defaults and the recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set student.tau=4 (repeatable)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (>= 0) for initialisation, sampling and negatives (default: config seed, 2024)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON object to stdout")
    p.add_argument("--num-workers", type=int, default=None,
                   help="run on Ray with this many Train workers (DDP ranks), at most one per cluster CPU; "
                        "0 = Ray with the Train loop in the driver. Without --num-workers/--num-shards/"
                        "--address/RAY_ADDRESS: one process, no Ray")
    p.add_argument("--num-shards", type=int, default=None,
                   help="run on Ray with this many InteractionShard actors (>= 1; users split by user %% N)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, host:port or ray://host:port (default: RAY_ADDRESS, else no "
                        "cluster); checked with a 5 s connect first")
    p.add_argument("--restart", action="store_true",
                   help="start over: by default a rerun into the same --out reuses finished stages and "
                        "continues the running one from its last epoch")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="log params, per-epoch metrics and the export to MLflow (e.g. file:/tmp/mlruns; "
                        "needs the mlflow extra: pip install 'promptmm_dist[mlflow]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptmm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    info = dsub.add_parser("info", help="counts, splits and modalities of a dataset")
    info.add_argument("path", help="dataset folder (PromptMM json, MMRec .inter or prepared) or 'synthetic'")
    info.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"])
    info.add_argument("--json", action="store_true")
    synth = dsub.add_parser("synth", help="generate a synthetic multimodal dataset (canonical layout)")
    synth.add_argument("out", help="folder to write (canonical layout: interactions.parquet, features/)")
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=1000)
    synth.add_argument("--interactions", type=int, default=40000)
    synth.add_argument("--modalities", default="image:64,text:32",
                       help="name:dim list; the first is informative, the rest weakly informative")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0): same seed, same dataset")
    synth.add_argument("--json", action="store_true")

    prep = sub.add_parser("prepare", help="validate a dataset and write the canonical layout")
    prep.add_argument("src", help="dataset to read (PromptMM json, MMRec .inter or prepared folder)")
    prep.add_argument("out", help="folder to write atomically (validated canonical layout); see --force")
    prep.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"])
    prep.add_argument("--force", action="store_true", help="replace OUT if it exists")
    prep.add_argument("--recipe", default=None, metavar="NAME",
                      help="packaged recipe written into OUT's manifest.json, used by every run on OUT unless "
                           "--recipe overrides it (default: the source manifest's, if any; 'none' drops it)")

    ev = sub.add_parser("evaluate", help="full-ranking evaluation of a model or baseline")
    ev.add_argument("--data", default=None,
                    help="dataset folder or 'synthetic' (default: a run's own dataset, from its config.yaml; "
                         "'synthetic' for popularity/random)")
    ev.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"],
                    help="input layout; detected automatically by default")
    ev.add_argument("--model", default="popularity",
                    help="popularity | random | path to a student export / run folder")
    ev.add_argument("--split", default="test", choices=["val", "test", "both"],
                    help="held-out split to rank (train items masked; val items too on test); default test")
    ev.add_argument("--out", default=None, help="folder for metrics.json")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--seed", type=int, default=0, help="seed of the 'random' baseline (default 0)")

    for name, helptext, out in [
        ("train-teacher", "train the PromptMM teacher (+ prompt)", "runs/teacher"),
        ("distill", "distil a trained teacher into the LightGCN student", "runs/student"),
        ("run", "teacher, then student, then test evaluation at the selected epoch", "runs/run"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _add_run_args(p, out)
        if name == "distill":
            p.add_argument("--teacher", required=True, help="teacher run folder (from train-teacher)")
    base = sub.add_parser("baseline", help="train a baseline without distillation")
    _add_run_args(base, "runs/baseline")
    base.add_argument("--model", default="lightgcn", choices=["mf", "lightgcn"])

    tune = sub.add_parser("tune", help="Ray Tune sweep over prompt and KD hyper-parameters")
    _add_run_args(tune, "runs/tune")
    tune.add_argument("--num-samples", type=int, default=8,
                      help="trials to run: configurations drawn from the search space (default 8)")
    tune.add_argument("--search-space", default=None, help="YAML search space (default: packaged)")
    tune.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    tune.add_argument("--max-concurrent", type=int, default=None)
    tune.add_argument("--resume", action="store_true")

    rec = sub.add_parser("recommend", help="top-K items for listed users, or for every user into Parquet (Ray Data)")
    rec.add_argument("--model", required=True, help="run folder or student export (.npz)")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids (printed to stdout)")
    who.add_argument("--all", action="store_true", help="every user, with Ray Data, into --out")
    rec.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    rec.add_argument("--data", default=None,
                     help="dataset whose training items are masked (default: the run's own, from its config.yaml)")
    rec.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"],
                     help="layout of --data; detected automatically by default")
    rec.add_argument("--exclude-val", action="store_true", help="also mask the users' validation items")
    rec.add_argument("--out", default=None,
                     help="with --all: Parquet folder (user, rank, item, score; one file per user block)")
    rec.add_argument("--force", action="store_true", help="with --all: replace --out if it exists")
    rec.add_argument("--num-workers", type=int, default=None,
                     help="with --all: Ray Data scoring actors (default: the cluster's CPUs)")
    rec.add_argument("--block-size", type=int, default=None,
                     help="with --all: users per block (default 1024, fewer for large catalogues)")
    rec.add_argument("--address", default=None, help="with --all: Ray cluster address (default: RAY_ADDRESS or local)")
    rec.add_argument("--json", action="store_true",
                     help="print JSON: {user: [items]} with --users, the run's summary with --all")

    rep = sub.add_parser("report", help="training curves and a metrics table of several runs side by side")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run folders (from run/train-teacher/distill/baseline)")
    rep.add_argument("--out", default="runs/report", help="folder for report.png and report.md (default runs/report)")
    return parser


def _handler(key: str) -> Callable[[argparse.Namespace], int]:
    module, func = HANDLERS[key].split(":")
    return getattr(importlib.import_module(module), func)


def _one_line_warnings() -> None:
    """Data warnings (cold users, items never in train, ...) as `promptmm: warning: ...` lines."""
    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):  # noqa: ANN001
        if category.__name__ == "DataWarning":
            return f"promptmm: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def _recipe_into_overrides(args: argparse.Namespace) -> None:
    """`--recipe X` of a training command is `--set data.recipe=X` given last (so it beats a --set or
    --config recipe, and the manifest's): every path that builds a config from `args.set` (run, tune,
    jobs/*.py) applies it. Checked here so a bad name fails first, with the option's name."""
    recipe = getattr(args, "recipe", None)
    if recipe is None or args.command == "prepare" or not isinstance(getattr(args, "set", None), list):
        return
    from promptmm_dist.config import check_recipe

    args.set.append(f"data.recipe={json.dumps(check_recipe(recipe))}")  # JSON string = quoted YAML scalar


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    key = f"data {args.data_command}" if args.command == "data" else args.command
    try:
        _recipe_into_overrides(args)
        return int(_handler(key)(args) or 0)
    except (DataError, ConfigError) as err:
        print(f"promptmm: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"promptmm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("promptmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
