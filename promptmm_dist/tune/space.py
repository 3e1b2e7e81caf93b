"""Search spaces for `promptmm tune`: YAML keys are dotted config keys, validated against the config
dataclasses; values are distributions. Also: which keys change the teacher stage (and so need their
own teacher), the teacher pool, and how a trial's sampled values become a full `Config`.

YAML layout::

    sweep:                       # optional sweep options (below); everything else is a config key
      teacher_pool: 4
    student.tau: {loguniform: [0.5, 8]}
    prompt.refresh_epochs: {choice: [0, 5, 10]}
    student.lambda_emb: 0.1      # a plain value fixes the key for every trial

Distributions: uniform/loguniform [lo, hi], quniform/qloguniform [lo, hi, q], randint [lo, hi)
(upper bound excluded), choice [v1, v2, ...].
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from promptmm_dist.config import Config, config_from_dict
from promptmm_dist.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "choice")
LOG_DISTRIBUTIONS = ("loguniform", "qloguniform")

# The prompt is trained with the teacher, so these prompt keys change the teacher stage.
TEACHER_PROMPT_KEYS = ("prompt.soft_token_rate", "prompt.feat_soft_token_rate", "prompt.prompt_dropout",
                       "prompt.lambda_p", "prompt.lr")
# Keys a sweep may not vary: where data and outputs live, and how the run is distributed.
NOT_SEARCHABLE = ("out", "data.path", "data.format", "dist.")

SWEEP_OPTIONS: dict[str, Any] = {
    "teacher_pool": 0,  # >0: teacher-stage keys take one of N pre-drawn settings (each teacher trained once)
    "include_default": True,  # first trial = the base configuration (and teacher variant 0 = its teacher)
    "searcher": "optuna",  # optuna (TPE through Ray Tune) | random (Ray's BasicVariantGenerator)
    "grace_period": 0,  # ASHA: epochs before the first cut (0 = about student.epochs / 8, at least 1)
    "reduction_factor": 3,  # ASHA
    "cache_keep_mb": 256,  # per teacher: consumed version-0 epochs kept for trials that start later
}

DEFAULT_SPACE = "search_space.yaml"


def is_teacher_key(key: str) -> bool:
    """Keys whose value changes the trained teacher (the teacher stage)."""
    return key.startswith("teacher.") or key in TEACHER_PROMPT_KEYS or key in ("seed", "data.modalities")


def _field_default(key: str) -> Any:
    """The default value of a dotted config key; ConfigError naming the key when it is unknown."""
    node: Any = Config()
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r} in the search space ({where} has: {', '.join(names)})")
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"search-space key {key!r} is a config section; name a key inside it")
    return node


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"search-space key {key!r}: expected a number, got {v!r}")
    return float(v)


def _check_spec(key: str, spec: Any, default: Any, source: str) -> Any:
    """Validate one entry; returns the normalised spec ({dist: args} or a constant)."""
    if not isinstance(spec, dict):
        return spec  # a constant
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{source}: {key}: expected one of {', '.join(DISTRIBUTIONS)} "
                          f"(e.g. {{loguniform: [0.5, 8]}}), got {spec!r}")
    dist, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{source}: {key}: {dist} needs a list, got {args!r}")
    if dist == "choice":
        return {dist: list(args)}
    need = 3 if dist.startswith("q") else 2
    if len(args) != need:
        raise ConfigError(f"{source}: {key}: {dist} takes {need} numbers, got {args!r}")
    nums = [_number(key, a) for a in args]
    if not nums[0] < nums[1]:
        raise ConfigError(f"{source}: {key}: {dist} needs low < high, got {args!r}")
    if dist in LOG_DISTRIBUTIONS and nums[0] <= 0:
        raise ConfigError(f"{source}: {key}: {dist} needs a positive lower bound, got {args!r}")
    if isinstance(default, bool) or not isinstance(default, (int, float)) and default is not None:
        raise ConfigError(f"{source}: {key}: a numeric distribution for a non-numeric key")
    if isinstance(default, int) and dist not in ("randint",) and not dist.startswith("q"):
        raise ConfigError(f"{source}: {key} is an integer key: use randint, choice or a q-distribution")
    return {dist: [int(a) if dist == "randint" else float(a) for a in args]}


@dataclasses.dataclass
class SearchSpace:
    """A validated search space: `params` (dotted key -> spec) and sweep `options`."""

    params: dict[str, Any]
    options: dict[str, Any]
    source: str = DEFAULT_SPACE

    @property
    def teacher_keys(self) -> list[str]:
        return [k for k, v in self.params.items() if isinstance(v, dict) and is_teacher_key(k)]

    @property
    def student_keys(self) -> list[str]:
        return [k for k, v in self.params.items() if isinstance(v, dict) and not is_teacher_key(k)]

    @property
    def constants(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if not isinstance(v, dict)}

    def is_log(self, key: str) -> bool:
        spec = self.params.get(key)
        return isinstance(spec, dict) and next(iter(spec)) in LOG_DISTRIBUTIONS

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": dict(self.options), **copy.deepcopy(self.params)}


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read and validate a search-space YAML (the packaged default when `path` is None)."""
    if path is None:
        text = resources.files("promptmm_dist.tune").joinpath(DEFAULT_SPACE).read_text()
        source = DEFAULT_SPACE
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: search-space file not found")
        text, source = p.read_text(), str(p)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    return parse_space(raw, source)


def parse_space(raw: Any, source: str = "search space") -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a search space must be a mapping of dotted config keys")
    options = dict(SWEEP_OPTIONS)
    given = raw.get("sweep") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: 'sweep' must be a mapping of sweep options")
    for k, v in given.items():
        if k not in SWEEP_OPTIONS:
            raise ConfigError(f"{source}: unknown sweep option {k!r} (known: {', '.join(SWEEP_OPTIONS)})")
        options[k] = v
    if options["searcher"] not in ("optuna", "random"):
        raise ConfigError(f"{source}: sweep.searcher must be optuna or random, got {options['searcher']!r}")
    for k in ("teacher_pool", "grace_period"):
        if not isinstance(options[k], int) or isinstance(options[k], bool) or options[k] < 0:
            raise ConfigError(f"{source}: sweep.{k} must be an integer >= 0, got {options[k]!r}")
    if _number("sweep.reduction_factor", options["reduction_factor"]) <= 1:
        raise ConfigError(f"{source}: sweep.reduction_factor must be > 1")
    if _number("sweep.cache_keep_mb", options["cache_keep_mb"]) < 0:
        raise ConfigError(f"{source}: sweep.cache_keep_mb must be >= 0")
    params: dict[str, Any] = {}
    for key, spec in raw.items():
        if key == "sweep":
            continue
        key = str(key)
        if key == "out" or any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_SEARCHABLE):
            raise ConfigError(f"{source}: {key!r} cannot be searched (data location, outputs and dist.* "
                              f"are fixed for a sweep)")
        default = _field_default(key)
        params[key] = _check_spec(key, spec, default, source)
        _check_values(key, params[key], source)
    if not any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: the search space has no distribution to sample")
    return SearchSpace(params, options, source)


def _check_values(key: str, spec: Any, source: str) -> None:
    """Every value a spec can produce must be accepted by the config (type coercion)."""
    values = spec["choice"] if isinstance(spec, dict) and "choice" in spec else (
        [] if isinstance(spec, dict) else [spec])
    for v in values:
        try:
            apply_overrides(Config().to_dict(), {key: v})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


# ------------------------------------------------------------------------------- configs and hashes

def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"student.tau": 2} -> {"student": {"tau": 2}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(base: dict[str, Any], flat: dict[str, Any]) -> Config:
    """A Config from a base config dict and dotted overrides (values coerced like `--set`)."""
    return config_from_dict(_merge(base, nest(_plain(flat))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def get_key(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def teacher_signature(cfg: Config, dataset_sha: str | None) -> str:
    """Hash of everything the teacher stage depends on; equal hashes share one teacher."""
    d = cfg.to_dict()
    payload = {"teacher": d["teacher"], "prompt": {k.split(".")[1]: get_key(cfg, k) for k in TEACHER_PROMPT_KEYS},
               "seed": cfg.seed, "modalities": cfg.data.modalities, "dataset": dataset_sha or cfg.data.path,
               "num_shards": cfg.dist.num_shards, "num_workers": max(1, cfg.dist.num_workers)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def student_steps(cfg: Config, total_pairs: int) -> int:
    """The student's training steps per epoch: how an epoch's samples are drawn (a cache is shared by
    trials whose draws are the same)."""
    from promptmm_dist.train.teacher_loop import steps_per_epoch

    return steps_per_epoch(total_pairs, cfg.student.batch_size)


def cache_key(cfg: Config, signature: str) -> str:
    """Version-0 soft rankings are a function of the teacher, the seed, N negatives and the student's
    batch size (which step each sample is drawn in)."""
    return f"{signature}-neg{cfg.student.neg_sample_num}-batch{cfg.student.batch_size}"


# --------------------------------------------------------------------------------- sampling

def sample_value(spec: Any, rng: np.random.Generator) -> Any:
    """Draw from a spec with numpy (used for the teacher pool; Tune samples everything else)."""
    if not isinstance(spec, dict):
        return spec
    dist, a = next(iter(spec.items()))
    if dist == "choice":
        return _plain(a[int(rng.integers(len(a)))])
    if dist == "randint":
        return int(rng.integers(a[0], a[1]))
    lo, hi = a[0], a[1]
    x = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if dist in LOG_DISTRIBUTIONS else float(rng.uniform(lo, hi))
    if dist.startswith("q"):
        x = round(round(x / a[2]) * a[2], 12)
    return x


def teacher_pool(space: SearchSpace, base: Config, seed: int) -> list[dict[str, Any]]:
    """N teacher-stage settings drawn once per sweep (variant 0 = the base config's when
    `include_default`); trials pick one, so at most N teachers are trained."""
    n, keys = int(space.options["teacher_pool"]), space.teacher_keys
    if n <= 0 or not keys:
        return []
    rng = np.random.default_rng([seed, 7919])
    pool: list[dict[str, Any]] = []
    if space.options["include_default"]:
        pool.append({k: _plain(get_key(base, k)) for k in keys})
    while len(pool) < n:
        pool.append({k: sample_value(space.params[k], rng) for k in keys})
    return pool


def tune_domain(spec: Any):
    from ray import tune

    if not isinstance(spec, dict):
        return spec
    dist, a = next(iter(spec.items()))
    if dist == "choice":
        return tune.choice(a)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
            "qloguniform": tune.qloguniform, "randint": tune.randint}[dist](*a)


def param_space(space: SearchSpace, pool: list[dict[str, Any]]) -> dict[str, Any]:
    """The Tune param_space: dotted keys, with teacher-stage keys folded into `teacher_variant`
    when a pool is used. Constants are not part of it (they go into the base config)."""
    from ray import tune

    keys = space.student_keys + ([] if pool else space.teacher_keys)
    out: dict[str, Any] = {k: tune_domain(space.params[k]) for k in keys}
    if pool:
        out["teacher_variant"] = tune.choice(list(range(len(pool))))
    return out


def default_point(space: SearchSpace, pool: list[dict[str, Any]], base: Config) -> dict[str, Any] | None:
    """The base configuration as a point of the space (None when it lies outside it)."""
    keys = space.student_keys + ([] if pool else space.teacher_keys)
    point: dict[str, Any] = {}
    for k in keys:
        v = _plain(get_key(base, k))
        if not _inside(space.params[k], v):
            return None
        point[k] = v
    if pool:
        if pool[0] != {k: _plain(get_key(base, k)) for k in space.teacher_keys}:
            return None
        point["teacher_variant"] = 0
    return point


def _inside(spec: dict, v: Any) -> bool:
    dist, a = next(iter(spec.items()))
    if dist == "choice":
        return v in a
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return a[0] <= v < a[1] if dist == "randint" else a[0] <= v <= a[1]


def trial_overrides(config: dict[str, Any], pool: list[dict[str, Any]]) -> dict[str, Any]:
    """A trial's sampled values as dotted config keys (teacher variant expanded)."""
    flat = {k: v for k, v in _plain(dict(config)).items() if k != "teacher_variant"}
    if "teacher_variant" in config and pool:
        flat.update(pool[int(config["teacher_variant"])])
    return flat
