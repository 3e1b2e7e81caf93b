"""Malformed inputs, built as a new user would make them: every one must end in exit status 2 and one
stderr line naming the file and the record, with no traceback and nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from promptmm_dist.data.formats import load_dataset
from promptmm_dist.errors import DataError

from tests.helpers import TEST, TRAIN, VAL, inter_lines, make_promptmm  # noqa: F401


def make_mmrec(root: Path, lines: list[str] | None = None) -> Path:
    make_promptmm(root)
    for name in ("train", "val", "test"):
        (root / f"{name}.json").unlink()
    (root / "toy.inter").write_text("\n".join(lines or inter_lines()) + "\n")
    return root


def write_json(root: Path, name: str, text: str) -> None:
    (root / name).write_text(text)


def _set_line(root: Path, lineno: int, text: str) -> None:
    lines = inter_lines()
    lines[lineno - 1] = text
    make_mmrec(root, lines)


def _feature_row(root: Path, name: str, row: int, value: float) -> None:
    arr = np.load(root / name)
    arr[row, 1] = value
    np.save(root / name, arr)


def _corrupt_npy_header(path: Path, major: int) -> None:
    """A .npy file whose magic is valid but whose header dict is garbage (format `major`.0)."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (8, 4), " + b"\x00garbage" + b"\n"
    size = len(header).to_bytes(2 if major == 1 else 4, "little")
    path.write_bytes(b"\x93NUMPY" + bytes([major, 0]) + size + header + b"\x00" * 128)


# case id -> (builder(src), [substrings the error line must contain])
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "truncated_json": (lambda r: (make_promptmm(r), write_json(r, "train.json", json.dumps(TRAIN)[:-7])),
                       ["train.json", "line 1 col", "invalid JSON"]),
    "empty_json_file": (lambda r: (make_promptmm(r), write_json(r, "val.json", "")), ["val.json", "line 1 col 1"]),
    "string_item_id": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"0": [0, "abc"]}')),
                       ["train.json", "key '0' position 1", "not an integer"]),
    "string_user_key": (lambda r: (make_promptmm(r), write_json(r, "test.json", '{"abc": [1]}')),
                        ["test.json", "key 'abc'", "not a decimal integer"]),
    "negative_item_id": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"0": [0, -3]}')),
                         ["train.json", "key '0' position 1", "negative"]),
    "negative_user_key": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"-1": [0]}')),
                          ["train.json", "key '-1'", "negative"]),
    "float_item_id": (lambda r: (make_promptmm(r), write_json(r, "val.json", '{"0": [1.5]}')),
                      ["val.json", "key '0' position 0", "not an integer"]),
    "bool_item_id": (lambda r: (make_promptmm(r), write_json(r, "val.json", '{"0": [true]}')),
                     ["val.json", "key '0' position 0", "not an integer"]),
    "item_past_feature_rows": (lambda r: (make_promptmm(r), write_json(r, "test.json", '{"1": [0, 8]}')),
                               ["test.json", "key '1' position 1", "no feature row", "8 rows"]),
    "json_list_top_level": (lambda r: (make_promptmm(r), write_json(r, "train.json", "[[0, 1], [1, 2]]")),
                            ["train.json", "top level must be an object"]),
    "json_value_not_list": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"0": 5}')),
                            ["train.json", "key '0'", "must be a list"]),
    "json_duplicate_user": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"0": [1], "0": [2]}')),
                            ["train.json", "key '0'", "twice"]),
    "duplicate_pair_in_split": (lambda r: (make_promptmm(r), write_json(r, "train.json", '{"0": [1, 2, 1]}')),
                                ["train.json", "key '0' position 2", "duplicate pair (user 0, item 1)"]),
    "missing_split_file": (lambda r: (make_promptmm(r), (r / "val.json").unlink()),
                           ["val.json", "missing split file"]),
    "empty_directory": (lambda r: r.mkdir(), ["src", "empty directory"]),
    "no_feature_file": (lambda r: (make_promptmm(r), (r / "image_feat.npy").unlink(),
                                   (r / "audio_feat.npy").unlink()), ["src", "no feature file"]),
    "no_interaction_file": (lambda r: (make_promptmm(r), *[(r / f"{s}.json").unlink()
                                                           for s in ("train", "val", "test")]),
                            ["src", "no interaction file"]),
    "features_different_lengths": (lambda r: (make_promptmm(r), np.save(r / "audio_feat.npy",
                                                                        np.zeros((7, 3), np.float16))),
                                   ["audio_feat.npy", "7 rows", "8"]),
    "nan_feature": (lambda r: (make_promptmm(r), _feature_row(r, "image_feat.npy", 3, np.nan)),
                    ["image_feat.npy", "row 3", "NaN"]),
    "inf_feature": (lambda r: (make_promptmm(r), _feature_row(r, "audio_feat.npy", 5, np.inf)),
                    ["audio_feat.npy", "row 5", "Inf"]),
    "float64_overflows_float32": (lambda r: (make_promptmm(r), np.save(r / "audio_feat.npy",
                                                                       np.full((8, 3), 1e300))),
                                  ["audio_feat.npy", "row 0", "overflows float32"]),
    "one_d_feature_file": (lambda r: (make_promptmm(r), np.save(r / "image_feat.npy", np.zeros(8, np.float32))),
                           ["image_feat.npy", "2-D"]),
    "pickle_feature_file": (lambda r: (make_promptmm(r), np.save(r / "image_feat.npy",
                                                                 np.array([{"a": 1}] * 8, dtype=object),
                                                                 allow_pickle=True)),
                            ["image_feat.npy", "pickle"]),
    "not_an_npy_file": (lambda r: (make_promptmm(r), (r / "image_feat.npy").write_bytes(b"PK\x03\x04junk")),
                        ["image_feat.npy", "not a valid .npy"]),
    "corrupt_npy_header": (lambda r: (make_promptmm(r), _corrupt_npy_header(r / "image_feat.npy", 1)),
                           ["image_feat.npy", "not a valid .npy"]),
    "corrupt_npy_header_v3": (lambda r: (make_promptmm(r), _corrupt_npy_header(r / "image_feat.npy", 3)),
                              ["image_feat.npy", "not a valid .npy"]),
    "inter_wrong_header": (lambda r: _set_line(r, 1, "user_id\titem_id\trating\tlabel"),
                           ["toy.inter", "line 1", "missing column(s) userID, itemID, x_label"]),
    "inter_bad_x_label": (lambda r: _set_line(r, 4, "1\t2\t1\t3"), ["toy.inter", "line 4", "x_label"]),
    "inter_wrong_field_count": (lambda r: _set_line(r, 5, "1\t3\t0"),
                                ["toy.inter", "line 5", "expected 4 tab-separated fields, got 3"]),
    "inter_string_id": (lambda r: _set_line(r, 3, "0\tabc\t1\t0"), ["toy.inter", "line 3", "itemID 'abc'"]),
    "inter_float_id": (lambda r: _set_line(r, 6, "1.5\t3\t1\t0"), ["toy.inter", "line 6", "userID '1.5'"]),
    "inter_negative_id": (lambda r: _set_line(r, 2, "-4\t0\t1\t0"), ["toy.inter", "line 2", "negative"]),
    "inter_duplicate_pair": (lambda r: _set_line(r, 3, "0\t0\t1\t0"),
                             ["toy.inter", "line 3", "duplicate pair (user 0, item 0)", "first at line 2"]),
    "inter_item_past_features": (lambda r: _set_line(r, 7, "2\t99\t1\t0"),
                                 ["toy.inter", "line 7", "item id 99 has no feature row"]),
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptmm_dist", *args], capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: list[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    for part in expected:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_rejects(case: str, tmp_path: Path) -> None:
    build, expected = CASES[case]
    src = tmp_path / "src"
    build(src)
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "OUT"
    proc = run_cli("prepare", str(src), str(out))
    assert_one_line_error(proc, expected)
    assert not out.exists()
    assert list(outs.iterdir()) == []  # no temp folder left beside OUT


@pytest.mark.parametrize("case", ["string_item_id", "nan_feature", "inter_wrong_field_count", "empty_directory",
                                  "pickle_feature_file"])
def test_info_rejects(case: str, tmp_path: Path) -> None:
    build, expected = CASES[case]
    src = tmp_path / "src"
    build(src)
    assert_one_line_error(run_cli("data", "info", str(src), "--json"), expected)


def test_existing_out_without_force(tmp_path: Path) -> None:
    src = make_promptmm(tmp_path / "src")
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run_cli("prepare", str(src), str(out)), ["OUT", "already exists", "--force"])
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "src"]


def test_out_equal_to_source_is_refused(tmp_path: Path) -> None:
    """prepare SRC SRC --force must not destroy the user's raw data."""
    src = make_promptmm(tmp_path / "src")
    assert_one_line_error(run_cli("prepare", str(src), str(src), "--force"), ["src", "must not be the source"])
    assert (src / "train.json").exists()


def test_missing_path_and_wrong_format(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("data", "info", str(tmp_path / "nope")), ["nope", "no such file"])
    src = make_promptmm(tmp_path / "src")
    assert_one_line_error(run_cli("data", "info", str(src), "--format", "mmrec"), ["src", "no .inter file"])


def test_missing_requested_modality(tmp_path: Path) -> None:
    src = make_promptmm(tmp_path / "src")
    with pytest.raises(DataError) as err:
        load_dataset(src, modalities=["image", "text"])
    msg = str(err.value)
    assert "\n" not in msg and "src" in msg and "'text' not found" in msg and "image, audio" in msg


def test_tampered_prepared_dataset(tmp_path: Path) -> None:
    src = make_promptmm(tmp_path / "src")
    out = tmp_path / "prep"
    proc = run_cli("prepare", str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    feat = np.load(out / "features" / "image.npy")
    feat[2, 0] += 1.0
    np.save(out / "features" / "image.npy", feat)
    assert_one_line_error(run_cli("data", "info", str(out)), ["features/image.npy", "sha256"])
    (out / "features" / "audio.npy").unlink()
    assert_one_line_error(run_cli("data", "info", str(out)), ["features/audio.npy", "missing"])


def test_npy_header_format_3_reads_with_public_api(tmp_path: Path) -> None:
    """Format 3.0 (utf-8 header) is parsed without numpy's private helpers."""
    from promptmm_dist.data.validate import read_npy_header

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    with open(tmp_path / "v3.npy", "wb") as fh:
        np.lib.format.write_array(fh, arr, version=(3, 0))
    assert read_npy_header(tmp_path / "v3.npy") == ((3, 4), np.dtype(np.float32))
    _corrupt_npy_header(tmp_path / "bad.npy", 3)
    with pytest.raises(DataError, match="bad.npy.*not a valid .npy"):
        read_npy_header(tmp_path / "bad.npy")
