"""Dataclass configs: *what* to train (data, teacher, student, prompt, KD) kept apart from *how* it is
distributed (DistConfig). Defaults are documented here and work on any dataset. A dataset-specific
recipe (a packaged YAML under `promptmm_dist/configs/` or the user's own YAML file) is applied only when
asked for: `--recipe NAME_OR_PATH`, a `data.recipe` key in --config/--set, or the `recipe` key of a
prepared dataset's manifest.json; never because of a folder's name (DESIGN 4). Then the --config file
and `--set section.key=value` overrides apply over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptmm_dist.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class PromptConfig:
    """Soft prompt module (DESIGN 2): hard tokens from PCA of item features, Linear soft prompts."""

    soft_token_rate: float = 0.1  # lambda_s: ID prompt, E^0 = E + lambda_s * norm(P)
    feat_soft_token_rate: float = 0.1  # lambda_f: feature prompt, X~ = X + lambda_f * norm(P_i (P_i^T X))
    feat_prompt_scale: str = "unit"  # "unit": the paper's unit-norm prompt rows (on standardised features of
    # row norm ~sqrt(D) they move each row by lambda_f / sqrt(D), ~1%); "row": scaled by each feature row's
    # norm, so lambda_f is the fraction each row moves whatever the features' scale
    prompt_dropout: float = 0.1
    lambda_p: float = 0.01  # prompt BPR term in the teacher loss
    lr: float = 1e-3  # prompt learning rate (teacher stage and prompt rounds)
    refresh_epochs: int = 0  # student stage: a prompt round every N epochs; 0 freezes the prompt
    round_steps: int = 20  # optimiser steps per prompt round


@dataclass
class TeacherConfig:
    """PromptMM teacher: per-modality encoders + graph propagation + fusion, trained with BPR."""

    embed_dim: int = 64
    n_layers: int = 2  # LightGCN layers for ID embeddings
    modal_layers: int = 1  # propagation layers for modality embeddings
    dropout: float = 0.2  # encoder dropout (off when producing KD targets: eval mode)
    lambda_c: float = 1.0  # fusion weight of the modality embeddings
    lambda_m: float = 0.1  # weight of the per-modality BPR terms
    weight_decay: float = 1e-4  # L2 on the batch embeddings
    lr: float = 1e-3
    batch_size: int = 2048
    epochs: int = 60
    patience: int = 10  # epochs without validation improvement before stopping
    eval_every: int = 1
    norm: str = "sym"  # adjacency normalisation: sym = D^-1/2 A D^-1/2, left = D^-1 A (authors')
    feature_norm: str = "standardize"  # per-column z-score of X^m (raw scales differ 300x across datasets) | none
    backbone: str = "promptmm"  # teacher design (models/teachers.py registry): promptmm | freedom | contrastive
    knn_k: int = 10  # freedom: neighbours per item in each modality's frozen item-item kNN graph
    item_layers: int = 1  # freedom: propagation layers over the item-item graph
    lambda_cl: float = 0.05  # contrastive: weight of the InfoNCE alignment of the ID and modality views
    cl_tau: float = 0.2  # contrastive: InfoNCE temperature


@dataclass
class StudentConfig:
    """LightGCN student and the distillation losses (DESIGN 2)."""

    embed_dim: int = 64  # d_S; a training-only projector maps it to the teacher size when they differ
    n_layers: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 2048
    epochs: int = 100
    patience: int = 15
    eval_every: int = 1
    tau: float = 2.0  # KD temperature
    lambda_pair: float = 0.5
    lambda_list: float = 0.5
    lambda_emb: float = 0.1
    emb_alpha: float = 2.0  # exponent of the scaled cosine error
    emb_kd_items: str = "batch"  # items the embedding KD averages over per step: "batch" (the global
    # batch's distinct positives and negatives, the paper's) or "all" (every item, every step)
    neg_sample_num: int = 10  # negatives per list (never a training item of the user)
    list_users_per_batch: int = 1024  # users with a KD list per optimiser step
    list_modal_weight: float = 1.0  # total weight of the per-modality teacher lists (split evenly)
    list_fused_weight: float = 0.0  # weight of the fused teacher's list (an extra "modality")
    list_kd: str = "reweighted"  # reweighted (modality-aware, DESIGN) | dkd (constant alpha/beta)
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    init_from_teacher: bool = False  # explicit, reported option
    norm: str = "sym"
    smooth_window: int = 1  # model selection on a moving average of validation recall@20 (1 = raw)


@dataclass
class DataConfig:
    path: str = "synthetic"  # a dataset folder (any supported layout) or "synthetic"
    format: str = "auto"
    modalities: list[str] | None = None  # None = every modality found
    # the recipe applied (a packaged name or a YAML file's absolute path; "none" = explicitly none, None =
    # none asked for); set by load_config, so config.yaml records where the non-default values came from
    recipe: str | None = None


@dataclass
class DistConfig:
    """How the run is distributed. Nothing here changes the math."""

    num_workers: int = 0  # Ray Train workers; 0 = run the loop in the driver (Train local mode)
    num_shards: int = 1  # InteractionShard actors (users assigned by user % num_shards)
    num_teacher_workers: int = 1  # TeacherWorker actors producing the KD cache
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local single-node Ray
    # run on Ray even with 0 workers and 1 shard (Train loops in the driver); any of --num-workers,
    # --num-shards, --address given on the command line sets it, so `--num-workers 0` means Ray local mode
    use_ray: bool = False
    # CPUs per Train worker; None = what each node offers divided by the ranks placed on it (less the
    # small shard/teacher actors), so a rank on a 16-core node trains on 16 threads
    cpus_per_worker: float | None = None
    use_gpu: bool = False
    storage_path: str | None = None  # Ray Train storage; default: <out>/ray
    max_failures: int = 3  # Ray Train worker-group restarts per stage (FailureConfig) before the run fails;
    # also the restarts of each shard / TeacherWorker / Tune shared-cache actor (rebuilt from files)
    actor_timeout_s: float = 300.0  # longest any single wait on a Ray actor or the KD cache may last (a
    # rank's fetch of an epoch, a teacher or shard call); when hit, the run fails with one line naming
    # what was waited for. Waits on training itself (the producer waiting for ranks to finish an epoch)
    # are not bounded by it: Ray Train's own failure handling ends those
    placement: str = "SPREAD"  # Train ranks over nodes (ScalingConfig placement_strategy): SPREAD puts them on
    # different nodes where there are several (each then uses its node's CPUs), PACK fills a node first
    exchange: str = "cover"  # per-hop row exchange of partitioned propagation (partition.operator):
    # "cover" (pull the rows a block reads or receive pushed partial sums, whichever sends fewer rows),
    # "needed" (pull only), "all" (every row: the all-gather cost model, for comparison)


@dataclass
class Config:
    seed: int = 2024
    out: str = "runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------ allowed values
# One row per key: checked after every layer (dataset YAML, --config, --set, CLI flags) is applied,
# so a bad value stops the command with one line before anything is written or trained.


@dataclass(frozen=True)
class Rule:
    """Allowed values of one config key: a numeric range (bounds inclusive unless `*_open`) or choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None allowed too (it means "automatic")

    def describe(self) -> str:
        if self.optional:
            return Rule(self.low, self.high, self.low_open, self.high_open, self.choices).describe() + " or null (auto)"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


POSITIVE = Rule(low=0, low_open=True)  # learning rates, temperatures, CPU shares
NON_NEGATIVE = Rule(low=0)  # loss weights, L2, prompt rates, layer counts, patience (0 = off)
AT_LEAST_ONE = Rule(low=1)  # epochs, batch sizes, dimensions, counts
PROBABILITY = Rule(low=0, high=1, high_open=True)  # dropout rates
NORMS = Rule(choices=("sym", "left"))

RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE,
    "data.format": Rule(choices=("auto", "promptmm", "mmrec", "canonical")),
    "prompt.soft_token_rate": NON_NEGATIVE, "prompt.feat_soft_token_rate": NON_NEGATIVE,
    "prompt.feat_prompt_scale": Rule(choices=("unit", "row")),
    "student.emb_kd_items": Rule(choices=("batch", "all")),
    "prompt.prompt_dropout": PROBABILITY, "prompt.lambda_p": NON_NEGATIVE, "prompt.lr": POSITIVE,
    "prompt.refresh_epochs": NON_NEGATIVE, "prompt.round_steps": AT_LEAST_ONE,
    "teacher.embed_dim": AT_LEAST_ONE, "teacher.n_layers": NON_NEGATIVE, "teacher.modal_layers": NON_NEGATIVE,
    "teacher.dropout": PROBABILITY, "teacher.lambda_c": NON_NEGATIVE, "teacher.lambda_m": NON_NEGATIVE,
    "teacher.weight_decay": NON_NEGATIVE, "teacher.lr": POSITIVE, "teacher.batch_size": AT_LEAST_ONE,
    "teacher.epochs": AT_LEAST_ONE, "teacher.patience": NON_NEGATIVE, "teacher.eval_every": AT_LEAST_ONE,
    "teacher.norm": NORMS, "teacher.feature_norm": Rule(choices=("standardize", "none")),
    "teacher.knn_k": AT_LEAST_ONE, "teacher.item_layers": NON_NEGATIVE, "teacher.lambda_cl": NON_NEGATIVE,
    "teacher.cl_tau": POSITIVE,
    # the names of models/teachers.TEACHERS (config sits below the models, so they are listed here;
    # tests/test_teacher_backbones.py checks the two lists agree)
    "teacher.backbone": Rule(choices=("promptmm", "freedom", "contrastive")),
    "student.embed_dim": AT_LEAST_ONE, "student.n_layers": NON_NEGATIVE, "student.lr": POSITIVE,
    "student.weight_decay": NON_NEGATIVE, "student.batch_size": AT_LEAST_ONE, "student.epochs": AT_LEAST_ONE,
    "student.patience": NON_NEGATIVE, "student.eval_every": AT_LEAST_ONE, "student.tau": POSITIVE,
    "student.lambda_pair": NON_NEGATIVE, "student.lambda_list": NON_NEGATIVE, "student.lambda_emb": NON_NEGATIVE,
    "student.emb_alpha": POSITIVE, "student.neg_sample_num": AT_LEAST_ONE,
    "student.list_users_per_batch": AT_LEAST_ONE, "student.list_modal_weight": NON_NEGATIVE,
    "student.list_fused_weight": NON_NEGATIVE, "student.list_kd": Rule(choices=("reweighted", "dkd")),
    "student.dkd_alpha": NON_NEGATIVE, "student.dkd_beta": NON_NEGATIVE, "student.norm": NORMS,
    "student.smooth_window": AT_LEAST_ONE,
    "dist.num_workers": NON_NEGATIVE, "dist.num_shards": AT_LEAST_ONE, "dist.num_teacher_workers": AT_LEAST_ONE,
    "dist.cpus_per_worker": Rule(low=0, low_open=True, optional=True), "dist.max_failures": NON_NEGATIVE, "dist.actor_timeout_s": POSITIVE,
    "dist.exchange": Rule(choices=("cover", "needed", "all")),
    "dist.placement": Rule(choices=("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")),
}


def leaf_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"student.epochs": 100, ...}`: every non-section key of a config, dotted."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaf_values(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def validate(cfg: Config, labels: dict[str, str] | None = None) -> Config:
    """Raise ConfigError (one line) on the first key whose value `RULES` does not allow; `labels`
    names keys the user set another way (`{"dist.num_shards": "--num-shards"}`)."""
    for key, value in leaf_values(cfg).items():
        rule = RULES.get(key)
        if rule is not None and not rule.allows(value):
            name = (labels or {}).get(key) or f"config key {key!r}"
            raise ConfigError(f"{name} must be {rule.describe()}, got {value!r}")
    return cfg


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the type of the default it replaces."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(current, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
        if isinstance(current, int):
            if not number.is_integer():
                raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
            return int(number)
        return number
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + key!r} is a section; give a mapping")
            _apply(current, value, prefix + key + ".")
        else:
            setattr(obj, key, _coerce(value, current, prefix + key))


def parse_override(item: str) -> dict[str, Any]:
    """`student.tau=4` -> {"student": {"tau": 4}} (values parsed as YAML scalars)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(f"--set {item}", e, one_line=True)) from None
    tree: dict[str, Any] = {}
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return tree


RECIPE_NONE = "none"  # `--recipe none`: plain defaults, even where the dataset's manifest names a recipe


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in `promptmm_dist/configs/` (tiktok, lastfm2k, synthetic)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _is_recipe_path(recipe: str) -> bool:
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe or "\\" in recipe


def check_recipe(recipe: str, source: str = "--recipe", names_only: bool = False) -> str:
    """The canonical form of a recipe request: a packaged name as is, a YAML file as its absolute path,
    "none" as is. Raises a one-line ConfigError naming `source` on an unknown name or a missing file."""
    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"{source}: recipe must be a name or a YAML file path, got {recipe!r}")
    known = packaged_recipes()
    if recipe == RECIPE_NONE or recipe in known:
        return recipe
    if not names_only and _is_recipe_path(recipe):
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise ConfigError(f"{source}: recipe file {recipe} not found")
        return str(path.resolve())
    what = "" if names_only else ", none or a path to a YAML file"
    raise ConfigError(f"{source}: unknown recipe {recipe!r} (known: {', '.join(known)}{what})")


def recipe_values(recipe: str, source: str = "--recipe") -> tuple[str, dict[str, Any]]:
    """(recorded name, config layer) of a recipe request; `{}` for "none"."""
    name = check_recipe(recipe, source)
    if name == RECIPE_NONE:
        return name, {}
    path = CONFIG_DIR / f"{name}.yaml" if name in packaged_recipes() else Path(name)
    try:
        layer = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(path, e)) from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: a recipe must hold a mapping at the top level")
    if "recipe" in (layer.get("data") or {}):
        raise ConfigError(f"{path}: a recipe must not set data.recipe")
    return name, layer


def _requested_recipe(layers: list[dict[str, Any]]) -> str | None:
    """The last non-null `data.recipe` among the layers (--set beats the config file)."""
    for layer in reversed(layers):
        data = layer.get("data")
        if isinstance(data, dict) and data.get("recipe") is not None:
            return data["recipe"]
    return None


def _layer_data_path(layers: list[dict[str, Any]]) -> str | None:
    for layer in reversed(layers):
        data = layer.get("data")
        if isinstance(data, dict) and data.get("path") is not None:
            return str(data["path"])
    return None


def _manifest_recipe(data_path: str) -> tuple[str | None, str]:
    """(recipe, where) asked for by a prepared dataset's manifest.json; (None, "") when there is none."""
    from promptmm_dist.data.formats import manifest_recipe  # data sits above config: import late

    return manifest_recipe(data_path)


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    data_path: str | None = None,
    base: dict[str, Any] | None = None,
    recipe: str | None = None,
) -> Config:
    """Defaults <- recipe <- config file <- base dict <- --set overrides.

    The recipe is the first of: `recipe` (--recipe), the last `data.recipe` in --set / base / the config
    file, the dataset manifest's `recipe`, and "synthetic" for the embedded synthetic dataset (the
    package's own data). `cfg.data.recipe` records the one applied."""
    cfg = Config()
    if data_path is not None:
        cfg.data.path = data_path
    layers: list[dict[str, Any]] = []
    if config_file is not None:
        p = Path(config_file)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            layers.append(yaml.safe_load(p.read_text()) or {})
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error_line(p, e)) from None
    if base:
        layers.append(base)
    for item in overrides or []:
        layers.append(parse_override(item))
    for layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError("a config file must hold a mapping at the top level")
    path = data_path if data_path is not None else (_layer_data_path(layers) or cfg.data.path)
    source = "--recipe"
    if recipe is None:
        recipe, source = _requested_recipe(layers), "config key 'data.recipe'"
    if recipe is None:
        recipe, source = _manifest_recipe(path)
        if recipe is not None:
            check_recipe(recipe, source, names_only=True)  # a manifest travels: a name, never a path
    if recipe is None and path == "synthetic":
        recipe, source = "synthetic", "synthetic"
    applied: str | None = None
    if recipe is not None:
        applied, values = recipe_values(recipe, source)
        layers.insert(0, values)
    for layer in layers:
        _apply(cfg, layer)
    if data_path is not None:
        cfg.data.path = data_path
    cfg.data.recipe = applied
    return validate(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return validate(cfg)


def yaml_error_line(path: object, err: yaml.YAMLError, one_line: bool = False) -> str:
    """`FILE:LINE:COLUMN: invalid YAML: <problem>` (1-based, as editors count) from a PyYAML error;
    `one_line` (a --set value): `SOURCE column C: ...`."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        where = str(path)
    else:
        where = f"{path} column {mark.column + 1}" if one_line else f"{path}:{mark.line + 1}:{mark.column + 1}"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and cmark is not None and not one_line:
        context += f" started at line {cmark.line + 1}"
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
