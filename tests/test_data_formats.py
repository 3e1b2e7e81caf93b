"""Readers on the real datasets (counts from their READMEs), layout equivalence, the canonical
round trip, atomic writing and subsets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from promptmm_dist.data import prepare as P
from promptmm_dist.data.formats import file_sha256, from_arrays, load_dataset, load_source
from promptmm_dist.data.info import dataset_info
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.data.synthetic import default_synthetic
from promptmm_dist.data.validate import DataWarning
from promptmm_dist.errors import DataError

TIKTOK = {"n_users": 9308, "n_items": 6710, "train": 59541, "val": 3051, "test": 6130,
          "users_without_train": 10, "items_never_in_train": 465}
LASTFM = {"n_users": 1858, "n_items": 1425, "train": 44327, "val": 4799, "test": 7219}


from tests.helpers import TEST, TRAIN, VAL, inter_lines, make_promptmm  # noqa: E402,F401


def make_mmrec(root: Path, lines: list[str]) -> Path:
    make_promptmm(root)
    for name in ("train", "val", "test"):
        (root / f"{name}.json").unlink()
    (root / "toy.inter").write_text("\n".join(lines) + "\n")
    return root


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_dataset(*args, **kwargs)


def assert_same_data(a, b, features: bool = True) -> None:
    assert (a.n_users, a.n_items) == (b.n_users, b.n_items)
    for name in ("users", "items", "splits"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    if features:
        assert a.modalities == b.modalities
        for m in a.modalities:
            assert np.array_equal(a.features[m], b.features[m]), m
    assert a.manifest_sha256 == b.manifest_sha256


def check_counts(info: dict, expected: dict) -> None:
    assert info["n_users"] == expected["n_users"] and info["n_items"] == expected["n_items"]
    for split in ("train", "val", "test"):
        assert info["interactions"][split] == expected[split], split
    for key in ("users_without_train", "items_never_in_train"):
        if key in expected:
            assert info[key] == expected[key], key


# ------------------------------------------------------------------------------------------ tiktok

@pytest.fixture(scope="module")
def tiktok(tiktok_path):
    return quiet_load(tiktok_path)


def test_tiktok_json_counts(tiktok_path, tiktok) -> None:
    info = dataset_info(tiktok_path)
    check_counts(info, TIKTOK)
    assert info["source_format"] == "promptmm"  # auto prefers json when .inter is present too
    assert info["modalities"] == {m: {"dim": 128, "dtype_on_disk": "float16", "source_dtype": "float16"}
                                  for m in ("image", "audio")}
    assert tiktok.modalities == ["image", "audio"]
    assert all(f.dtype == np.float32 and f.shape == (6710, 128) for f in tiktok.features.values())
    assert tiktok.users.dtype == np.int32 and tiktok.items.dtype == np.int32 and tiktok.splits.dtype == np.int8
    assert abs(info["density"] - 68722 / (9308 * 6710)) < 1e-12


def test_tiktok_warns_about_cold_users_and_items(tiktok_path) -> None:
    with pytest.warns(DataWarning) as record:
        load_dataset(tiktok_path)
    text = " | ".join(str(w.message) for w in record)
    assert "10 user(s) have no training interaction" in text and "465 item(s) never appear in train" in text


def test_tiktok_mmrec_matches_json(tiktok_path, tiktok) -> None:
    via_inter = quiet_load(tiktok_path, format="mmrec")
    assert via_inter.source_format == "mmrec"
    assert_same_data(tiktok, via_inter)
    direct = quiet_load(tiktok_path / "tiktok.inter")  # a .inter path works too
    assert_same_data(tiktok, direct)


def test_tiktok_prepare_round_trip(tiktok_path, tiktok, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        out = P.prepare_dataset(tiktok_path, tmp_path / "tiktok_prepared")
    back = quiet_load(out)
    assert back.source_format == "canonical" and back.name == "tiktok"
    assert_same_data(tiktok, back)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_format"] == "promptmm"
    assert manifest["modalities"]["image"] == {"dim": 128, "dtype_on_disk": "float32", "source_dtype": "float16"}
    assert manifest["interactions"] == {"train": 59541, "val": 3051, "test": 6130, "total": 68722}
    for rel, digest in manifest["files"].items():
        assert file_sha256(out / rel) == digest
    info = dataset_info(out)
    check_counts(info, TIKTOK)
    assert info["modalities"]["audio"]["dtype_on_disk"] == "float32"
    assert info["modalities"]["audio"]["source_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiktok_prepared"]


def test_tiktok_validation_is_fast(tiktok) -> None:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        from_arrays("t", tiktok.users, tiktok.items, tiktok.splits, tiktok.features, "x")
    assert time.perf_counter() - t0 < 1.0


def test_tiktok_modality_subset(tiktok_path, tiktok) -> None:
    audio = quiet_load(tiktok_path, modalities=["audio"])
    assert audio.modalities == ["audio"]
    assert np.array_equal(audio.features["audio"], tiktok.features["audio"])
    assert audio.manifest_sha256 != tiktok.manifest_sha256  # content differs


def test_tiktok_cli_info_json(tiktok_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "promptmm_dist", "data", "info", str(tiktok_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_counts(json.loads(proc.stdout), TIKTOK)
    table = subprocess.run([sys.executable, "-m", "promptmm_dist", "data", "info", str(tiktok_path)],
                           capture_output=True, text=True, timeout=120).stdout
    assert "9,308" in table and "465 never in train" in table and "float16" in table


def test_subset_of_tiktok(tiktok) -> None:
    sub = subset_first_users(tiktok, 300)
    again = subset_first_users(tiktok, 300)
    assert_same_data(sub, again)
    keep = tiktok.users < 300
    old_items = np.unique(tiktok.items[keep])
    assert sub.n_items == len(old_items) and sub.n_users <= 300
    assert len(sub.users) == int(keep.sum())
    assert set(np.unique(sub.items)) == set(range(sub.n_items))  # dense re-indexing
    for m in tiktok.modalities:  # feature row j of the subset is old item old_items[j]
        assert np.array_equal(sub.features[m], tiktok.features[m][old_items])
    # pairs survive the re-indexing
    orig = set(zip(tiktok.users[keep].tolist(), tiktok.items[keep].tolist()))
    mapped = set(zip(sub.users.tolist(), old_items[sub.items].tolist()))
    assert orig == mapped


# ------------------------------------------------------------------------------------------ lastfm

def test_lastfm_both_layouts(lastfm_path) -> None:
    js = quiet_load(lastfm_path)
    inter = quiet_load(lastfm_path, format="mmrec")  # its .inter has an extra rating column
    assert js.modalities == ["text", "audio", "audio_whisper"]
    assert_same_data(js, inter)
    dims = {m: f.shape for m, f in js.features.items()}
    assert dims == {"text": (1425, 384), "audio": (1425, 128), "audio_whisper": (1425, 512)}
    assert all(f.dtype == np.float32 for f in js.features.values())
    raw_audio = np.load(lastfm_path / "audio_feat.npy")
    assert raw_audio.dtype == np.float64
    assert np.array_equal(js.features["audio"], raw_audio.astype(np.float32))
    for layout in ("promptmm", "mmrec"):
        info = dataset_info(lastfm_path, layout)
        check_counts(info, LASTFM)
        assert {m: (v["dim"], v["dtype_on_disk"]) for m, v in info["modalities"].items()} == {
            "text": (384, "float32"), "audio": (128, "float64"), "audio_whisper": (512, "float32")}


# ------------------------------------------------------------------------------------------ toy data

def test_mmrec_any_column_order_and_extra_columns(tmp_path) -> None:
    lines = [line.split("\t") for line in inter_lines()]
    shuffled = ["\t".join([f[3], "x", f[1], f[0]]) for f in lines]  # x_label, junk, itemID, userID
    shuffled[0] = "x_label\tnote\titemID\tuserID"
    a = load_dataset(make_mmrec(tmp_path / "a", shuffled))
    b = load_dataset(make_promptmm(tmp_path / "b"))
    assert_same_data(a, b)
    assert a.n_interactions("train") == 12 and a.n_interactions("val") == 2 and a.n_interactions("test") == 3


def test_pair_in_two_splits_and_cold_user_warn(tmp_path) -> None:
    src = make_promptmm(tmp_path / "s")
    (src / "test.json").write_text(json.dumps({"0": [1], "4": [2]}))  # (0, 1) also in train; user 4 cold
    with pytest.warns(DataWarning) as record:
        data = load_dataset(src)
    text = " | ".join(str(w.message) for w in record)
    assert "1 user(s) have no training interaction (e.g. 4)" in text
    assert "1 (user, item) pair(s) appear in more than one split" in text
    assert data.n_users == 5


def test_float16_and_float64_cast(tmp_path) -> None:
    src = make_promptmm(tmp_path / "s")
    np.save(src / "text_feat.npy", np.linspace(0, 1, 16, dtype=np.float64).reshape(8, 2))
    data = load_dataset(src)
    assert data.modalities == ["image", "text", "audio"]
    assert all(f.dtype == np.float32 and f.flags.c_contiguous for f in data.features.values())
    assert np.allclose(data.features["text"][-1], [14 / 15, 1.0])


def test_prepare_force_replaces_atomically(tmp_path) -> None:
    src = make_promptmm(tmp_path / "s")
    out = tmp_path / "o"
    P.prepare_dataset(src, out)
    with pytest.raises(DataError, match="already exists"):
        P.prepare_dataset(src, out)
    (src / "test.json").write_text(json.dumps({"0": [4]}))
    P.prepare_dataset(src, out, force=True)
    assert load_dataset(out).n_interactions("test") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "s"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    src = make_promptmm(tmp_path / "s")
    outs = tmp_path / "outs"

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P, "build_manifest", boom)
    with pytest.raises(DataError, match="No space left"):
        P.prepare_dataset(src, outs / "o")
    assert list(outs.iterdir()) == []


def test_ensure_canonical_reuses_matching_folder(tmp_path) -> None:
    data = default_synthetic()
    folder = P.ensure_canonical(data, tmp_path / "synth")
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert P.ensure_canonical(data, folder) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert_same_data(data, load_dataset(folder))
    other = subset_first_users(data, 50)
    P.ensure_canonical(other, folder)  # different content: rewritten
    assert_same_data(other, quiet_load(folder))
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        P.ensure_canonical(data, tmp_path / "mine")


def test_load_source_synthetic_modalities() -> None:
    src = load_source("synthetic", modalities=["text"])
    assert src.data.modalities == ["text"] and src.feature_dtypes == {"text": "float32"}
    with pytest.raises(DataError, match="'audio' not found"):
        load_dataset("synthetic", modalities=["audio"])


def test_bom_crlf_and_blank_lines_in_inter(tmp_path) -> None:
    src = make_mmrec(tmp_path / "s", inter_lines())
    text = "\ufeff" + "\r\n".join(inter_lines()[:8]) + "\r\n\r\n" + "\r\n".join(inter_lines()[8:]) + "\r\n"
    (src / "toy.inter").write_bytes(text.encode("utf-8"))
    assert_same_data(load_dataset(src), load_dataset(make_promptmm(tmp_path / "j")))
    dup = text.replace("\r\n\r\n2\t5\t1\t0", "\r\n\r\n2\t5\t1\t0\r\n2\t5\t1\t0", 1)
    (src / "toy.inter").write_bytes(dup.encode("utf-8"))
    with pytest.raises(DataError, match=r"toy.inter: line 11: duplicate pair \(user 2, item 5\) .*first at line 10"):
        load_dataset(src)  # line numbers count the blank line


def test_ids_too_large(tmp_path) -> None:
    src = make_promptmm(tmp_path / "s")
    (src / "val.json").write_text('{"%s": [1]}' % ("9" * 5000))
    with pytest.raises(DataError, match="val.json: key '9999.*too large"):
        load_dataset(src)
    lines = inter_lines()
    lines[2] = "1" * 30 + "\t1\t1\t0"
    with pytest.raises(DataError, match="toy.inter: line 3: userID 1+ is too large"):
        load_dataset(make_mmrec(tmp_path / "m", lines))
