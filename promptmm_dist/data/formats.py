"""Readers for every supported dataset layout, all producing one validated `InteractionData`.

Layouts (detected automatically, `format=` overrides):

- ``promptmm``: train.json / val.json / test.json (``{"user": [items]}``) + ``<modality>_feat.npy``
- ``mmrec``: one ``<name>.inter`` TSV with ``userID itemID x_label`` columns + ``<modality>_feat.npy``
- ``canonical``: what `promptmm prepare` writes: interactions.parquet + features/<modality>.npy + manifest.json
- the literal path ``"synthetic"``: the package's default synthetic dataset, generated in memory

Interactions come out sorted by (user, item, split), so the same content read from any layout gives equal
arrays and the same `manifest_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from promptmm_dist.data import validate as V
from promptmm_dist.data.dataset import SPLIT_NAMES, DatasetInfo, InteractionData
from promptmm_dist.errors import DataError

FORMATS = ("promptmm", "mmrec", "canonical")
SPLIT_FILES = ("train", "val", "test")
FEATURE_SUFFIX = "_feat.npy"
# conventional modality order (PromptMM's image, text, then audio); other names follow alphabetically
PREFERRED_ORDER = ("image", "text", "audio")
MANIFEST = "manifest.json"
INTERACTIONS_FILE = "interactions.parquet"
FEATURES_DIR = "features"
VERIFY_SHA_MAX_BYTES = 512 << 20  # hash-check prepared files on load when they are this small
_MODALITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class LoadedSource:
    """A loaded dataset plus what only the on-disk files know (for `data info` and `prepare`)."""

    data: InteractionData
    path: Path | None
    feature_dtypes: dict[str, str] = field(default_factory=dict)  # dtype of each modality file on disk
    source_dtypes: dict[str, str] = field(default_factory=dict)  # dtype in the original raw source
    origin_format: str = ""  # layout the data was first read from (differs from data.source_format
    #                          only for prepared data)


def load_dataset(path: str | Path = "synthetic", format: str = "auto",
                 modalities: Sequence[str] | None = None) -> InteractionData:
    """Load and validate a dataset from any supported layout (or the default synthetic one)."""
    return load_source(path, format, modalities).data


def load_source(path: str | Path = "synthetic", format: str = "auto",
                modalities: Sequence[str] | None = None) -> LoadedSource:
    """Like `load_dataset`, also returning on-disk dtypes and the origin format."""
    if is_synthetic(path) and format in ("auto", "synthetic"):
        return _load_synthetic(modalities)
    if format not in ("auto", *FORMATS):
        raise DataError(path, None, f"unknown format {format!r}; expected auto, {', '.join(FORMATS)}")
    try:
        fmt, root, inter_file = detect_format(Path(path), format)
        if fmt == "canonical":
            return _read_canonical(root, modalities)
        return _read_raw(root, fmt, inter_file, modalities)
    except OSError as err:  # unreadable file or folder: still one line, not a traceback
        raise DataError(err.filename or path, None, f"cannot read: {err.strerror or err}") from None


def is_synthetic(path: str | Path) -> bool:
    """The string "synthetic" names the built-in dataset; a folder of that name is "./synthetic"."""
    if isinstance(path, str):
        return path == "synthetic"
    return str(path) == "synthetic" and not path.exists()


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------

def detect_format(path: Path, format: str = "auto") -> tuple[str, Path, Path | None]:
    """(format, dataset folder, .inter file or None). A .inter file or manifest.json path is accepted too."""
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.is_file():
        return _detect_from_file(path, format)
    names = {p.name for p in path.iterdir()}
    if not names:
        raise DataError(path, None, "empty directory; expected train/val/test.json or a .inter file, "
                        "plus <modality>_feat.npy files (or a folder written by `promptmm prepare`)")
    inters = sorted(n for n in names if n.endswith(".inter"))
    if format == "auto":
        if MANIFEST in names:
            format = "canonical"
        elif any(f"{s}.json" in names for s in SPLIT_FILES):
            format = "promptmm"  # preferred when both json and .inter are present (as in the real data)
        elif inters:
            format = "mmrec"
        else:
            raise DataError(path, None, "no interaction file (train.json/val.json/test.json, <name>.inter "
                            "or a prepared manifest.json)")
    if format == "mmrec":
        if not inters:
            raise DataError(path, None, "no .inter file (MMRec layout)")
        if len(inters) > 1:
            raise DataError(path, None, f"several .inter files ({', '.join(inters)}); pass the file's path")
        return "mmrec", path, path / inters[0]
    if format == "canonical" and MANIFEST not in names:
        raise DataError(path / MANIFEST, None, "missing (not a folder written by `promptmm prepare`)")
    return format, path, None


def _detect_from_file(path: Path, format: str) -> tuple[str, Path, Path | None]:
    if path.suffix == ".inter" and format in ("auto", "mmrec"):
        return "mmrec", path.parent, path
    if path.name == MANIFEST and format in ("auto", "canonical"):
        return "canonical", path.parent, None
    raise DataError(path, None, "expected a dataset directory (or a .inter file / manifest.json)")


# ----------------------------------------------------------------------------------------------
# raw layouts: PromptMM json and MMRec .inter, with <modality>_feat.npy
# ----------------------------------------------------------------------------------------------

def _read_raw(root: Path, fmt: str, inter_file: Path | None,
              modalities: Sequence[str] | None) -> LoadedSource:
    files = _select_modalities(root, _raw_feature_files(root), modalities)
    shapes = {name: (p, V.read_npy_header(p)[0]) for name, p in files.items()}
    n_items = V.check_same_rows(shapes)
    if fmt == "promptmm":
        users, items, splits, locate = _read_promptmm_splits(root)
    else:
        assert inter_file is not None
        users, items, splits, locate = _read_inter(inter_file)
    first_file = next(iter(files.values())).name
    V.check_ids(users, items, n_items, locate, first_file)
    features, dtypes = _load_features(files, shapes)
    data = from_arrays(root.resolve().name, users, items, splits, features, fmt, locate=locate, path=root)
    return LoadedSource(data, root, dtypes, dict(dtypes), fmt)


def _raw_feature_files(root: Path) -> dict[str, Path]:
    found = {p.name[: -len(FEATURE_SUFFIX)]: p for p in root.glob(f"*{FEATURE_SUFFIX}") if p.is_file()}
    found = {name: p for name, p in found.items() if name}
    if not found:
        raise DataError(root, None, f"no feature file (<modality>{FEATURE_SUFFIX}, e.g. image{FEATURE_SUFFIX})")
    return {name: found[name] for name in order_modalities(found)}


def order_modalities(names: Sequence[str] | dict) -> list[str]:
    """image, text, audio first (PromptMM's convention), then the rest alphabetically."""
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _select_modalities(root: Path, available: dict[str, Path],
                       wanted: Sequence[str] | None) -> dict[str, Path]:
    if wanted is None:
        return available
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise DataError(root, None, "at least one modality must be selected")
    missing = [m for m in wanted if m not in available]
    if missing:
        raise DataError(root, None, f"modality {', '.join(repr(m) for m in missing)} not found "
                        f"(available: {', '.join(available)})")
    return {m: available[m] for m in wanted}


def _load_features(files: dict[str, Path], shapes: dict[str, tuple[Path, tuple[int, ...]]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    features, dtypes = {}, {}
    for name, p in files.items():
        features[name], dtypes[name] = V.load_features(p, shapes[name][1])
    return features, dtypes


def _read_promptmm_splits(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, V.Locator]:
    parsed = []
    for split in SPLIT_FILES:
        p = root / f"{split}.json"
        if not p.is_file():
            raise DataError(p, None, "missing split file (the PromptMM layout needs train.json, val.json "
                            "and test.json)")
        pairs = V.check_json_object(p, _parse_json(p))
        parsed.append((p, pairs, V.json_items_array(p, pairs)))
    users = np.concatenate([_json_users(pairs) for _, pairs, _ in parsed])
    items = np.concatenate([it for _, _, it in parsed])
    splits = np.concatenate([np.full(len(it), SPLIT_NAMES[s], np.int8) for s, (_, _, it) in zip(SPLIT_FILES, parsed)])
    return users, items, splits, _json_locator([(p, pairs) for p, pairs, _ in parsed])


def _parse_json(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"byte {err.start}", "not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=V.JsonObject)
    except json.JSONDecodeError as err:
        hint = " (truncated file?)" if err.pos >= len(text.rstrip()) else ""
        raise DataError(path, f"line {err.lineno} col {err.colno}", f"invalid JSON: {err.msg}{hint}") from None
    except RecursionError:
        raise DataError(path, None, "invalid JSON: nested too deeply") from None


def _json_users(pairs: list[tuple[str, list]]) -> np.ndarray:
    keys = np.array([int(k) for k, _ in pairs], dtype=np.int64)
    return np.repeat(keys, [len(v) for _, v in pairs])


def _json_locator(files: list[tuple[Path, list[tuple[str, list]]]]) -> V.Locator:
    """Global interaction index -> (file, 'key "u" position p')."""
    offsets = [np.concatenate([[0], np.cumsum([len(v) for _, v in pairs])]) for _, pairs in files]
    starts = np.cumsum([0] + [int(o[-1]) for o in offsets])

    def locate(index: int) -> tuple[str, str]:
        f = int(np.searchsorted(starts, index, side="right") - 1)
        local = index - int(starts[f])
        k = int(np.searchsorted(offsets[f], local, side="right") - 1)
        path, pairs = files[f]
        return str(path), f"key {pairs[k][0]!r} position {local - int(offsets[f][k])}"

    return locate


def _read_inter(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, V.Locator]:
    """MMRec TSV via pyarrow's multi-threaded CSV reader; a slow scan names the line only on failure."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        header = fh.readline()
    if not header.strip():
        raise DataError(path, "line 1", "empty header; expected tab-separated columns userID itemID x_label")
    V.check_inter_header(path, header)
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.int64() for c in V.INTER_COLUMNS},
                include_columns=list(V.INTER_COLUMNS), null_values=[], strings_can_be_null=False),
        )
    except (pa.ArrowException, UnicodeDecodeError) as err:
        raise V.diagnose_inter(path, str(err)) from None
    cols = [table.column(c).to_numpy() for c in V.INTER_COLUMNS]
    locate = _inter_locator(path)
    V.check_split_codes(cols[2], locate)
    return cols[0], cols[1], cols[2].astype(np.int8), locate


def _inter_locator(path: Path) -> V.Locator:
    def locate(row: int) -> tuple[str, str]:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            fh.readline()
            seen = -1
            for lineno, line in enumerate(fh, start=2):
                if line.strip("\r\n"):
                    seen += 1
                    if seen == row:
                        return str(path), f"line {lineno}"
        return str(path), f"row {row}"  # pragma: no cover

    return locate


# ----------------------------------------------------------------------------------------------
# canonical (prepared) layout
# ----------------------------------------------------------------------------------------------

def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json of a prepared folder, with the keys the reader relies on checked."""
    path = root / MANIFEST
    obj = _parse_json(path)
    if not isinstance(obj, V.JsonObject):
        raise DataError(path, None, "top level must be an object")
    manifest = _plain(obj)
    for key, kind in (("n_users", int), ("n_items", int), ("modalities", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise DataError(path, f"key {key!r}", f"missing or not {'an integer' if kind is int else 'an object'}")
    if not manifest["modalities"]:
        raise DataError(path, "key 'modalities'", "no modality listed")
    for name, entry in manifest["modalities"].items():
        if not isinstance(entry, dict) or not _MODALITY_NAME.fullmatch(name):
            raise DataError(path, f"modality {name!r}", "bad entry (expected a name and an object)")
    for rel, digest in manifest["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(digest, str):
            raise DataError(path, f"file {rel!r}", "bad entry (expected a relative path and a sha256)")
    if manifest.get("recipe") is not None and not isinstance(manifest["recipe"], str):
        raise DataError(path, "key 'recipe'", "not a string (a packaged recipe name, or null)")
    return manifest


def manifest_recipe(path: str | Path) -> tuple[str | None, str]:
    """(recipe, "<manifest>: key 'recipe'") that a prepared dataset's manifest.json asks for, or (None, "")
    when `path` is not a prepared folder (or its manifest file) or names no recipe. Read before the
    dataset itself, to build the config, so only this key is checked here."""
    if is_synthetic(path):
        return None, ""
    p = Path(path)
    file = p if p.name == MANIFEST and p.is_file() else p / MANIFEST
    if not file.is_file():
        return None, ""
    obj = _plain(_parse_json(file))
    recipe = obj.get("recipe") if isinstance(obj, dict) else None
    where = f"{file}: key 'recipe'"
    if recipe is not None and not isinstance(recipe, str):
        raise DataError(file, "key 'recipe'", "not a string (a packaged recipe name, or null)")
    return recipe, where


def canonical_info(path: str | Path, modalities: Sequence[str] | None = None) -> DatasetInfo | None:
    """A prepared folder's identity and sizes from its manifest (files checked as `load_dataset` checks
    them: present, recorded sizes, sha256 when small), without reading its rows; None when `path` is not
    a prepared folder or `modalities` selects a subset (that is a different dataset: load it)."""
    if is_synthetic(path) or not Path(path).is_dir() or not (Path(path) / MANIFEST).is_file():
        return None
    root = Path(path)
    manifest = read_manifest(root)
    if modalities is not None and list(dict.fromkeys(modalities)) != list(manifest["modalities"]):
        return None
    if not manifest.get("content_sha256"):
        return None
    _verify_files(root, manifest)
    for m in manifest["modalities"]:
        if not (root / FEATURES_DIR / f"{m}.npy").is_file():
            raise DataError(root / FEATURES_DIR / f"{m}.npy", None, f"missing (modality {m!r} is listed in {MANIFEST})")
    return DatasetInfo(str(manifest.get("name", root.name)), int(manifest["n_users"]), int(manifest["n_items"]),
                       list(manifest["modalities"]), str(manifest["content_sha256"]))


def _plain(obj: Any) -> Any:
    if isinstance(obj, V.JsonObject):
        return {k: _plain(v) for k, v in obj}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded size; sha256 is re-checked when the data is small."""
    listed = manifest["files"]
    sizes = manifest.get("sizes", {})
    total = 0
    for rel in listed:
        p = root / rel
        if not p.is_file():
            raise DataError(p, None, f"missing (listed in {MANIFEST})")
        size = p.stat().st_size
        total += size
        if rel in sizes and sizes[rel] != size:
            raise DataError(p, None, f"size {size} differs from {sizes[rel]} in {MANIFEST} (file changed?)")
    if total <= VERIFY_SHA_MAX_BYTES:
        for rel, digest in listed.items():
            if file_sha256(root / rel) != digest:
                raise DataError(root / rel, None, f"sha256 differs from {MANIFEST} (file changed since prepare)")


def _read_canonical(root: Path, modalities: Sequence[str] | None) -> LoadedSource:
    manifest = read_manifest(root)
    _verify_files(root, manifest)
    available = {m: root / FEATURES_DIR / f"{m}.npy" for m in manifest["modalities"]}
    for m, p in available.items():
        if not p.is_file():
            raise DataError(p, None, f"missing (modality {m!r} is listed in {MANIFEST})")
    files = _select_modalities(root, available, modalities)
    shapes = {name: (p, V.read_npy_header(p)[0]) for name, p in files.items()}
    n_items = V.check_same_rows(shapes)
    users, items, splits, locate = _read_parquet(root / INTERACTIONS_FILE)
    V.check_ids(users, items, n_items, locate, f"{FEATURES_DIR}/{next(iter(files))}.npy")
    features, dtypes = _load_features(files, shapes)
    data = from_arrays(str(manifest.get("name", root.name)), users, items, splits, features, "canonical",
                       locate=locate, path=root)
    if (data.n_users, data.n_items) != (manifest["n_users"], manifest["n_items"]):
        raise DataError(root / MANIFEST, None, f"says {manifest['n_users']} users x {manifest['n_items']} "
                        f"items but the files hold {data.n_users} x {data.n_items}")
    source = {m: str(manifest["modalities"][m].get("source_dtype", dtypes[m])) for m in files}
    return LoadedSource(data, root, dtypes, source, str(manifest.get("source_format", "canonical")))


def _read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, V.Locator]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["user", "item", "split"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise DataError(path, None, f"cannot read interactions ({V._one_line(err)})") from None
    cols = []
    for name in ("user", "item", "split"):
        col = table.column(name)
        if col.null_count or not pa.types.is_integer(col.type):
            raise DataError(path, f"column {name!r}", f"must be non-null integers, got {col.type}")
        cols.append(col.to_numpy())

    def locate(row: int) -> tuple[str, str]:
        return str(path), f"row {row}"

    V.check_split_codes(cols[2], locate, column="split")
    return cols[0], cols[1], cols[2].astype(np.int8), locate


# ----------------------------------------------------------------------------------------------
# common: arrays -> validated, canonically ordered InteractionData
# ----------------------------------------------------------------------------------------------

def from_arrays(name: str, users: np.ndarray, items: np.ndarray, splits: np.ndarray,
                features: dict[str, np.ndarray], source_format: str, *,
                locate: V.Locator | None = None, path: Path | str | None = None,
                validate: bool = True) -> InteractionData:
    """Validate (ids, duplicates, train present; warn on cold users/items), sort by (user, item, split),
    and hash the content. Readers, the synthetic generator and subsetting all end here."""
    where = str(path if path is not None else name)
    if locate is None:
        def locate(i: int) -> tuple[str, str]:
            return where, f"interaction {i}"
    if not features:
        raise DataError(where, None, "no modality features")
    n_items = int(next(iter(features.values())).shape[0])
    users, items, splits = np.asarray(users), np.asarray(items), np.asarray(splits)
    if validate:
        V.check_ids(users, items, n_items, locate, f"{next(iter(features))} features")
        V.check_split_codes(splits, locate, column="split")
        V.check_train_present(splits, where)
    order = V.canonical_order(users, items, splits, n_items)
    if validate:
        V.check_duplicates(users, items, splits, order, n_items, locate)
    users, items, splits = (_take(users, order, np.int32), _take(items, order, np.int32),
                            _take(splits, order, np.int8))
    n_users = int(users.max()) + 1 if len(users) else 0
    if validate:
        V.warn_soft_problems(name, n_users, n_items, users, items, splits)
    data = InteractionData(name=name, n_users=n_users, n_items=n_items, users=users, items=items,
                           splits=splits, features=dict(features), source_format=source_format)
    data.manifest_sha256 = content_sha256(data)
    return data


def _take(arr: np.ndarray, order: np.ndarray | None, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(arr if order is None else arr[order], dtype=dtype)


def content_parts(data: InteractionData) -> dict[str, str]:
    """sha256 of each content part in canonical byte form (little-endian int32/int8, float32 rows)."""
    parts = {"interactions": _sha(data.users.astype("<i4", copy=False), data.items.astype("<i4", copy=False),
                                  data.splits.astype("i1", copy=False))}
    for name, feat in data.features.items():
        parts[f"features/{name}"] = _sha(np.ascontiguousarray(feat, dtype="<f4"), shape=feat.shape)
    return parts


def content_sha256(data: InteractionData) -> str:
    """Stable identity of the dataset content: independent of the layout it was read from."""
    header = {"n_users": data.n_users, "n_items": data.n_items, "parts": content_parts(data)}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _sha(*arrays: np.ndarray, shape: tuple[int, ...] | None = None) -> str:
    h = hashlib.sha256()
    if shape is not None:
        h.update(repr(tuple(shape)).encode())
    for arr in arrays:
        h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------

def _load_synthetic(modalities: Sequence[str] | None) -> LoadedSource:
    from promptmm_dist.data.synthetic import default_synthetic

    data = default_synthetic()
    if modalities is not None:
        files = _select_modalities(Path("synthetic"), {m: Path(m) for m in data.features}, modalities)
        data = from_arrays(data.name, data.users, data.items, data.splits,
                           {m: data.features[m] for m in files}, data.source_format, validate=False)
    dtypes = {m: "float32" for m in data.features}
    return LoadedSource(data, None, dtypes, dict(dtypes), "synthetic")
