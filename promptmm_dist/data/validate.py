"""Validation of raw interaction and feature data before anything downstream uses it.

Every hard failure raises `DataError(path, record, problem)`, a single line naming the file, the record
(JSON key, `line N` of a .inter file, `row N` of a feature or parquet file) and the problem, so a user can
fix the input without reading a traceback. Soft problems (cold users/items, a pair in two splits) are
`DataWarning`s: real benchmarks contain them (Tiktok has 10 users without training items).

The checks are vectorised (numpy): validating Tiktok's 68k interactions takes milliseconds; only the
error path walks Python objects to find the exact record to report.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from promptmm_dist.data.dataset import SPLIT_NAMES
from promptmm_dist.errors import DataError

# interaction index -> (file, record) for error messages; only called on the error path
Locator = Callable[[int], tuple[str, str]]

SPLIT_LABELS = {code: name for name, code in SPLIT_NAMES.items()}
MAX_ID = np.iinfo(np.int32).max - 1  # ids are stored as int32; n_users = max id + 1 must fit too
_DECIMAL = re.compile(r"[0-9]+")


class DataWarning(UserWarning):
    """Suspicious but usable data (cold users or items, a pair in more than one split)."""


# ----------------------------------------------------------------------------------------------
# PromptMM json: {"user": [items]}
# ----------------------------------------------------------------------------------------------

class JsonObject(list):
    """A JSON object kept as its (key, value) pairs (json object_pairs_hook), so that duplicate keys
    can be reported instead of silently keeping the last one."""


def check_json_object(path: Path, pairs: JsonObject | Any) -> list[tuple[str, Any]]:
    """Top level must be an object of decimal-int keys to lists; duplicate keys are an error
    (json.load would silently keep the last one and drop interactions)."""
    if not isinstance(pairs, JsonObject):
        raise DataError(path, None, f"top level must be an object {{\"user\": [items]}}, got {_json_type(pairs)}")
    seen: set[str] = set()
    for key, value in pairs:
        if not _DECIMAL.fullmatch(key):
            what = "negative user id" if re.fullmatch(r"-[0-9]+", key) else "user id is not a decimal integer"
            raise DataError(path, f"key {key!r}", what)
        if len(key) > 10 or int(key) > MAX_ID:
            raise DataError(path, f"key {key!r}", "user id is too large (ids must fit int32)")
        if key in seen:
            raise DataError(path, f"key {key!r}", "user listed twice")
        seen.add(key)
        if type(value) is not list:
            raise DataError(path, f"key {key!r}", f"value must be a list of item ids, got {_json_type(value)}")
    return pairs


def json_items_array(path: Path, pairs: list[tuple[str, list]]) -> np.ndarray:
    """Flatten the item lists to int64, rejecting strings, floats, booleans, nulls and nested values."""
    flat = [x for _, items in pairs for x in items]
    if not flat:
        return np.zeros(0, dtype=np.int64)
    if set(map(type, flat)) == {int}:
        arr = np.array(flat)
        if arr.dtype.kind == "i":
            return arr.astype(np.int64, copy=False)
    # error path: find the first offending value
    for key, items in pairs:
        for pos, x in enumerate(items):
            if type(x) is not int:
                raise DataError(path, f"key {key!r} position {pos}",
                                f"item id {_short(x)} is not an integer")
            if abs(x) > MAX_ID:
                raise DataError(path, f"key {key!r} position {pos}", f"item id {x} is out of range")
    raise AssertionError("unreachable: a non-integer item id was not located")  # pragma: no cover


def _json_type(value: Any) -> str:
    return {JsonObject: "an object", dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------------------------
# MMRec .inter
# ----------------------------------------------------------------------------------------------

INTER_COLUMNS = ("userID", "itemID", "x_label")


def check_inter_header(path: Path, header_line: str) -> list[str]:
    """The header must name userID, itemID and x_label (any order, extra columns allowed)."""
    cols = header_line.rstrip("\r\n").split("\t")
    missing = [c for c in INTER_COLUMNS if c not in cols]
    if missing:
        hint = " (the file must be tab-separated)" if len(cols) == 1 and "," in cols[0] else ""
        raise DataError(path, "line 1 (header)",
                        f"missing column(s) {', '.join(missing)}; found {', '.join(cols) or 'nothing'}{hint}")
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(path, "line 1 (header)", f"duplicate column(s) {', '.join(dup)}")
    return cols


def diagnose_inter(path: Path, fallback: str) -> DataError:
    """Slow line-by-line scan used only after the fast reader failed, to name the bad line."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        cols = check_inter_header(path, fh.readline())
        idx = {c: cols.index(c) for c in INTER_COLUMNS}
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(cols):
                return DataError(path, f"line {lineno}", f"expected {len(cols)} tab-separated fields, got {len(fields)}")
            for col in INTER_COLUMNS:
                problem = _id_problem(fields[idx[col]], col)
                if problem:
                    return DataError(path, f"line {lineno}", problem)
    return DataError(path, None, f"cannot parse: {fallback}")


def _id_problem(text: str, col: str) -> str | None:
    if _DECIMAL.fullmatch(text):
        if col == "x_label":
            return None if text in ("0", "1", "2") else _xlabel_problem(text)
        return f"{col} {text} is too large (ids must fit int32)" if len(text) > 10 or int(text) > MAX_ID else None
    if re.fullmatch(r"-[0-9]+", text):
        return f"{col} {text} is negative" if col != "x_label" else _xlabel_problem(text)
    return f"{col} {text!r} is not a non-negative integer" if col != "x_label" else _xlabel_problem(text)


def _xlabel_problem(text: str, column: str = "x_label") -> str:
    return f"{column} {text!r} must be 0 (train), 1 (val) or 2 (test)"


def check_split_codes(labels: np.ndarray, locate: Locator, column: str = "x_label") -> None:
    """Split labels must be 0 (train), 1 (val) or 2 (test)."""
    bad = np.flatnonzero((labels < 0) | (labels > 2))
    if len(bad):
        path, record = locate(int(bad[0]))
        raise DataError(path, record, _xlabel_problem(str(labels[bad[0]]), column))


# ----------------------------------------------------------------------------------------------
# interactions (any format, after parsing)
# ----------------------------------------------------------------------------------------------

def check_ids(users: np.ndarray, items: np.ndarray, n_items: int, locate: Locator,
              feature_file: str) -> None:
    """Ids must be non-negative, fit int32, and every item must have a feature row."""
    for name, arr in (("user", users), ("item", items)):
        if arr.dtype.kind not in "iu":
            raise DataError(locate(0)[0], None, f"{name} ids must be integers, got {arr.dtype}")
        neg = np.flatnonzero(arr < 0)
        if len(neg):
            path, record = locate(int(neg[0]))
            raise DataError(path, record, f"{name} id {arr[neg[0]]} is negative")
        big = np.flatnonzero(arr > MAX_ID)
        if len(big):
            path, record = locate(int(big[0]))
            raise DataError(path, record, f"{name} id {arr[big[0]]} is too large (ids must fit int32)")
    past = np.flatnonzero(items >= n_items)
    if len(past):
        path, record = locate(int(past[0]))
        raise DataError(path, record,
                        f"item id {items[past[0]]} has no feature row ({feature_file} has {n_items} rows)")


def canonical_order(users: np.ndarray, items: np.ndarray, splits: np.ndarray,
                    n_items: int) -> np.ndarray | None:
    """Permutation sorting interactions by (user, item, split), or None when already sorted
    (canonical files and the synthetic generator are written in this order, so loading them is cheap)."""
    if len(users) < 2:
        return None
    if int(users.max()) * n_items * 3 < np.iinfo(np.int64).max // 2:
        key = _pair_key(users, items, n_items) * 3 + splits.astype(np.int64)
        if bool(np.all(key[1:] >= key[:-1])):
            return None
        return np.argsort(key, kind="stable")
    return np.lexsort((splits, items, users))  # pragma: no cover - ids too large for one int64 key


def _pair_key(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return users.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)


def check_duplicates(users: np.ndarray, items: np.ndarray, splits: np.ndarray, order: np.ndarray | None,
                     n_items: int, locate: Locator) -> None:
    """No (user, item) pair twice within one split; `order` is the canonical sort permutation (None: sorted)."""
    u, i, s = _ordered(order, users, items, splits)
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (s[1:] == s[:-1])
    dup = np.flatnonzero(same)
    if len(dup):
        pos = (int(dup[0]), int(dup[0]) + 1)
        first, second = sorted(pos if order is None else (int(order[pos[0]]), int(order[pos[1]])))
        path, record = locate(second)
        first_path, first_record = locate(first)
        where = first_record if first_path == path else f"{first_path}: {first_record}"
        raise DataError(path, record, f"duplicate pair (user {u[dup[0]]}, item {i[dup[0]]}) in the "
                        f"{SPLIT_LABELS.get(int(s[dup[0]]), s[dup[0]])} split (first at {where})")


def check_train_present(splits: np.ndarray, path: Path | str) -> None:
    if not np.any(splits == SPLIT_NAMES["train"]):
        raise DataError(path, None, "no training interactions")


def warn_soft_problems(name: str, n_users: int, n_items: int, users: np.ndarray, items: np.ndarray,
                       splits: np.ndarray, order: np.ndarray | None = None) -> None:
    """Warn (do not fail) on cold users/items and on pairs present in two splits."""
    train = splits == SPLIT_NAMES["train"]
    cold_users = np.flatnonzero(np.bincount(users[train], minlength=n_users) == 0)
    seen_users = np.bincount(users, minlength=n_users) > 0
    cold_users = cold_users[seen_users[cold_users]]  # ids that never appear at all are just gaps
    if len(cold_users):
        warnings.warn(f"{name}: {len(cold_users)} user(s) have no training interaction "
                      f"(e.g. {_ids(cold_users)})", DataWarning, stacklevel=3)
    cold_items = np.flatnonzero(np.bincount(items[train], minlength=n_items) == 0)
    if len(cold_items):
        warnings.warn(f"{name}: {len(cold_items)} item(s) never appear in train (e.g. {_ids(cold_items)})",
                      DataWarning, stacklevel=3)
    n_multi = count_multi_split_pairs(users, items, order)
    if n_multi:
        warnings.warn(f"{name}: {n_multi} (user, item) pair(s) appear in more than one split",
                      DataWarning, stacklevel=3)


def count_multi_split_pairs(users: np.ndarray, items: np.ndarray, order: np.ndarray | None = None) -> int:
    """Pairs listed in two splits (within-split duplicates are already rejected)."""
    u, i = _ordered(order, users, items)
    return int(np.count_nonzero((u[1:] == u[:-1]) & (i[1:] == i[:-1])))


def _ordered(order: np.ndarray | None, *arrays: np.ndarray) -> list[np.ndarray]:
    return list(arrays) if order is None else [a[order] for a in arrays]


def _ids(ids: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(x)) for x in ids[:k])
    return shown + (", ..." if len(ids) > k else "")


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------

def _read_header_3_0(fh, version: tuple[int, int]) -> tuple[tuple[int, ...], np.dtype]:
    """Format 3.0 (utf-8 header, else laid out as 2.0): numpy has no public reader for it, so parse the
    header dict as a Python literal (never evaluated as code) and build the dtype with the public
    `descr_to_dtype`."""
    if version != (3, 0):
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    raw = fh.read(4)
    if len(raw) != 4:
        raise EOFError("header length is truncated")
    size = int.from_bytes(raw, "little")
    text = fh.read(size)
    if len(text) != size:
        raise EOFError("header is truncated")
    header = ast.literal_eval(text.decode("utf-8"))
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"header is not a dict with keys descr, fortran_order, shape: {_short(header)}")
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise ValueError(f"shape is not a tuple of non-negative ints: {shape!r}")
    return shape, np.lib.format.descr_to_dtype(header["descr"])


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the .npy header, without loading (and never unpickling) the array."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                shape, dtype = _read_header_3_0(fh, version)
    except Exception as err:  # any failure to parse an untrusted header (numpy raises several kinds)
        raise DataError(path, None, f"not a valid .npy file ({_one_line(err)})") from None
    if dtype.hasobject:
        raise DataError(path, None, "contains Python objects (pickle); refusing to unpickle a feature file")
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise DataError(path, None, f"feature dtype must be numeric (float16/32/64), got {dtype}")
    if len(shape) != 2:
        raise DataError(path, None, f"features must be a 2-D (items x dim) array, got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(path, None, f"feature array is empty, shape {tuple(shape)}")
    return tuple(shape), dtype


def check_same_rows(shapes: dict[str, tuple[Path, tuple[int, ...]]]) -> int:
    """All modality files describe the same catalogue: equal row counts. Returns n_items."""
    rows = {name: shape[0] for name, (_, shape) in shapes.items()}
    first = next(iter(shapes))
    for name, n in rows.items():
        if n != rows[first]:
            raise DataError(shapes[name][0], None,
                            f"has {n} rows but {shapes[first][0].name} has {rows[first]}; "
                            "all feature files need one row per item")
    return rows[first]


def load_features(path: Path, expected_shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Load with allow_pickle=False, reject NaN/Inf (first bad row reported), cast to float32.
    Returns (array, on-disk dtype name)."""
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(path, None, f"cannot load ({_one_line(err)})") from None
    if raw.shape != expected_shape:  # pragma: no cover - file changed between header read and load
        raise DataError(path, None, f"shape changed while reading: {raw.shape}")
    check_finite(path, raw)
    with np.errstate(over="ignore"):  # float64 beyond float32's range: reported just below
        arr = raw.astype(np.float32, copy=False)
    if arr is not raw:
        check_finite(path, arr, after_cast=True)
    return np.ascontiguousarray(arr), raw.dtype.name


def check_finite(path: Path | str, arr: np.ndarray, after_cast: bool = False) -> None:
    if arr.dtype.kind != "f" or bool(np.isfinite(arr).all()):
        return
    bad_rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    row = int(bad_rows[0])
    col = int(np.flatnonzero(~np.isfinite(arr[row]))[0])
    value = arr[row, col]
    if after_cast:
        problem = f"value in column {col} overflows float32"
    else:
        problem = f"{'NaN' if np.isnan(value) else 'Inf'} in column {col}"
    more = f" ({len(bad_rows)} bad rows in all)" if len(bad_rows) > 1 else ""
    raise DataError(path, f"row {row}", problem + more)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
