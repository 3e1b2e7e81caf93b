"""`promptmm` command line. Each sub-command is a thin wrapper over a function in its stage's module;
errors in user input become one line on stderr and exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Callable, Sequence

from promptmm_dist.errors import ConfigError, DataError

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
}


def _add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="dataset folder (PromptMM json, MMRec .inter or prepared) or 'synthetic' (default)")
    p.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"],
                   help="input layout; detected automatically by default")


def _add_run_args(p: argparse.ArgumentParser, out_default: str) -> None:
    _add_data_arg(p)
    p.add_argument("--out", default=out_default, help="output folder (config, metrics, checkpoints)")
    p.add_argument("--config", default=None, help="YAML config file (over the dataset's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set student.tau=4 (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the metrics JSON object to stdout")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (0 = in the driver)")
    p.add_argument("--num-shards", type=int, default=None, help="InteractionShard actors")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptmm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    info = dsub.add_parser("info", help="counts, splits and modalities of a dataset")
    info.add_argument("path")
    info.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"])
    info.add_argument("--json", action="store_true")
    synth = dsub.add_parser("synth", help="generate a synthetic multimodal dataset (canonical layout)")
    synth.add_argument("out")
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=1000)
    synth.add_argument("--interactions", type=int, default=40000)
    synth.add_argument("--modalities", default="image:64,text:32",
                       help="name:dim list; the first is informative, the rest weakly informative")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--json", action="store_true")

    prep = sub.add_parser("prepare", help="validate a dataset and write the canonical layout")
    prep.add_argument("src")
    prep.add_argument("out")
    prep.add_argument("--format", default="auto", choices=["auto", "promptmm", "mmrec", "canonical"])
    prep.add_argument("--force", action="store_true", help="replace OUT if it exists")

    ev = sub.add_parser("evaluate", help="full-ranking evaluation of a model or baseline")
    _add_data_arg(ev)
    ev.add_argument("--model", default="popularity",
                    help="popularity | random | path to a student export / run folder")
    ev.add_argument("--split", default="test", choices=["val", "test", "both"])
    ev.add_argument("--out", default=None, help="folder for metrics.json")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--seed", type=int, default=0)

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
    tune.add_argument("--num-samples", type=int, default=8)
    tune.add_argument("--search-space", default=None, help="YAML search space (default: packaged)")
    tune.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    tune.add_argument("--max-concurrent", type=int, default=None)
    tune.add_argument("--resume", action="store_true")

    rec = sub.add_parser("recommend", help="top-K items for users from an exported student")
    rec.add_argument("--model", required=True, help="run folder or student export (.npz)")
    rec.add_argument("--users", required=True, help="comma-separated user ids")
    rec.add_argument("--k", type=int, default=20)
    rec.add_argument("--data", default=None, help="dataset, to mask the users' training items")
    rec.add_argument("--json", action="store_true")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    key = f"data {args.data_command}" if args.command == "data" else args.command
    try:
        return int(_handler(key)(args) or 0)
    except (DataError, ConfigError) as err:
        print(f"promptmm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
