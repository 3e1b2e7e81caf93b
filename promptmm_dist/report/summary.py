"""Markdown for run folders: summary.md of one run, the comparison table of `promptmm report`."""

from __future__ import annotations

from typing import Any

from promptmm_dist.report.runs import Run

KEYS = ("recall@20", "ndcg@20")
IGNORED = {"out"}  # differs for every run by construction


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def defaults_for(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration the run would have had with no --config/--set: package defaults + the
    dataset's YAML (flattened)."""
    from promptmm_dist.config import load_config

    path = (config.get("data") or {}).get("path") or "synthetic"
    return flatten(load_config(data_path=str(path)).to_dict())


def config_diff(config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value, default) for every key that differs from the defaults."""
    if not config:
        return []
    base = defaults_for(config)
    flat = flatten(config)
    return [(k, v, base.get(k)) for k, v in flat.items() if k not in IGNORED and base.get(k, object()) != v]


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def metrics_rows(run: Run, label: str | None = None) -> list[list[str]]:
    rows = []
    for st in run.stages:
        m = st.meta
        cells = [] if label is None else [label]
        cells += [st.name, _f(st.best_epoch), _f(m.get("epochs_run"))]
        cells += [_f((m.get(split) or {}).get(k)) for split in ("val", "test") for k in KEYS]
        cells.append(_f(m.get("train_seconds"), 1))
        rows.append(cells)
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


METRIC_HEADER = ["stage", "selected epoch", "epochs run", "val recall@20", "val ndcg@20", "test recall@20",
                 "test ndcg@20", "train s"]


def run_summary(run: Run, figure: str | None = "curves.png") -> str:
    m = run.metrics
    data = (run.config.get("data") or {}).get("path", "?")
    ds = next((s.meta.get("dataset") for s in run.stages if s.meta.get("dataset")), None)
    lines = [f"# Run {run.name}", "",
             f"Dataset {ds or data} (`{data}`), seed {run.config.get('seed', '?')}, mode {m.get('mode', 'local')}"
             + (f", {m['num_workers']} Train worker(s), {m.get('num_shards')} shard(s)" if "num_workers" in m else "")
             + ".", "",
             "## Metrics", "",
             "Model selection on validation recall@20; test is reported at the selected epoch.", "",
             *table(METRIC_HEADER, metrics_rows(run)), ""]
    diff = config_diff(run.config)
    lines += ["## Configuration", ""]
    if diff:
        lines += ["Keys that differ from the defaults (package defaults + the dataset's YAML); the full "
                  "configuration is in `config.yaml`.", "",
                  *table(["key", "value", "default"], [[f"`{k}`", _f(v, 6), _f(d, 6)] for k, v, d in diff]), ""]
    else:
        lines += ["The defaults (package defaults + the dataset's YAML); see `config.yaml`.", ""]
    timings = {k: v for k, v in (m.get("timings") or {}).items() if isinstance(v, (int, float))}
    if timings:
        lines += ["## Timings", "", *table(["what", "seconds"], [[k, _f(float(v), 1)] for k, v in timings.items()]),
                  ""]
    params = m.get("params")
    if isinstance(params, dict) and params:
        lines += ["## Parameters", "", *table(["what", "count"], [[k, f"{int(v):,}"] for k, v in params.items()]), ""]
    if figure:
        lines += ["## Curves", "", f"![training curves]({figure})", ""]
    return "\n".join(lines)


def comparison(runs: list[Run], labels: list[str], figure: str | None) -> str:
    """One metrics table over all runs + the configuration keys on which the runs differ."""
    rows = [r for run, label in zip(runs, labels) for r in metrics_rows(run, label)]
    lines = [f"# {len(runs)} runs compared", "",
             "Model selection on validation recall@20; test is reported at the selected epoch.", "",
             *table(["run", *METRIC_HEADER], rows), ""]
    flats = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f} - IGNORED)
    differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    if differing:
        lines += ["## Configuration keys that differ", "",
                  *table(["key", *labels], [[f"`{k}`", *(_f(f.get(k), 6) for f in flats)] for k in differing]), ""]
    else:
        lines += ["The runs share one configuration.", ""]
    if figure:
        lines += [f"![validation curves]({figure})", ""]
    return "\n".join(lines)
