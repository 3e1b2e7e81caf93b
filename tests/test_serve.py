"""Serving from the exported student: `recommend` and `evaluate --model RUN_DIR`, and the one-line
errors `recommend` gives for bad input (no traceback, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from promptmm_dist.cli import main
from promptmm_dist.serve.command import recommend


@pytest.fixture(scope="module")
def synth():
    from promptmm_dist.data.formats import load_dataset

    return load_dataset("synthetic")


def write_run(folder: Path, user: np.ndarray, item: np.ndarray, data_path: str = "synthetic",
              manifest: str | None = None) -> Path:
    """A run-like folder: RUN/config.yaml naming the data, RUN/student/{export.npz, meta.json}."""
    (folder / "student").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"data:\n  path: {data_path}\n  format: auto\n")
    np.savez(folder / "student" / "export.npz", user=user, item=item)
    if manifest is not None:
        (folder / "student" / "meta.json").write_text(json.dumps({"manifest_sha256": manifest}))
    return folder


def random_tables(n_users: int, n_items: int, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_users, dim)).astype(np.float32), rng.normal(size=(n_items, dim)).astype(np.float32))


def test_recommend_ranks_by_dot_product_and_excludes_seen():
    users = np.eye(3, dtype=np.float32)
    items = np.array([[0, 0, 1], [1, 0, 0], [2, 0, 0], [0, 1, 0]], dtype=np.float32)
    assert recommend(users, items, [0], 2) == {0: [2, 1]}
    assert recommend(users, items, [0], 2, exclude={0: np.array([2])}) == {0: [1, 0]}
    assert recommend(users, items, [0], 9, exclude={0: np.array([0, 1, 2])}) == {0: [3]}  # masked never returned


def test_recommend_and_evaluate_cli_on_an_export(tmp_path, capsys, synth):
    user, item = random_tables(synth.n_users, synth.n_items)
    np.savez(tmp_path / "export.npz", user=user, item=item)
    args = ["recommend", "--model", str(tmp_path), "--data", "synthetic", "--users", "0,5", "--k", "5", "--json"]
    assert main(args) == 0
    recs = json.loads(capsys.readouterr().out)
    assert set(recs) == {"0", "5"} and all(len(v) == 5 for v in recs.values())
    assert main(["evaluate", "--model", str(tmp_path), "--data", "synthetic", "--split", "both", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["test"]["recall@20"] < 0.2  # random embeddings are near chance
    assert main(["recommend", "--model", str(tmp_path), "--data", "synthetic", "--users", "999999"]) == 2
    assert "unknown user" in capsys.readouterr().err


def test_recommend_without_data_masks_with_the_runs_own_dataset(tmp_path, capsys, synth):
    """User 0's training items score highest; without --data they must still be left out."""
    csr = synth.train_csr
    seen = csr.indices[csr.indptr[0]:csr.indptr[1]]
    user, item = random_tables(synth.n_users, synth.n_items, seed=1)
    user[0] = 0.0
    user[0, 0] = 1.0
    item[:, 0] = np.clip(item[:, 0], -1, 1)
    item[seen, 0] = 10.0 + np.arange(len(seen))
    run = write_run(tmp_path / "run", user, item, manifest=synth.manifest_sha256)
    assert main(["recommend", "--model", str(run), "--users", "0", "--k", "10", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["0"]
    assert len(got) == 10 and not set(got) & set(seen.tolist())
    assert recommend(user, item, [0], 3)[0] == seen[::-1][:3].tolist()  # unmasked, they would come first


def test_recommend_bare_export_without_data_says_so(tmp_path, capsys, synth):
    user, item = random_tables(synth.n_users, synth.n_items)
    np.savez(tmp_path / "export.npz", user=user, item=item)
    assert main(["recommend", "--model", str(tmp_path / "export.npz"), "--users", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptmm: error: ") and "pass --data" in err and err.count("\n") == 1


@pytest.mark.parametrize("k", ["0", "-3"])
def test_recommend_rejects_non_positive_k(tmp_path, capsys, synth, k):
    run = write_run(tmp_path / "run", *random_tables(synth.n_users, synth.n_items))
    out = tmp_path / "recs"
    assert main(["recommend", "--model", str(run), "--all", "--k", k, "--out", str(out)]) == 2
    assert f"--k must be a positive number of items, got {k}" in capsys.readouterr().err
    assert not out.exists()
    assert main(["recommend", "--model", str(run), "--users", "1", "--k", k]) == 2


def test_recommend_truncated_export_is_one_line(tmp_path, capsys, synth):
    run = write_run(tmp_path / "run", *random_tables(synth.n_users, synth.n_items))
    npz = run / "student" / "export.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    assert main(["recommend", "--model", str(run), "--users", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"promptmm: error: {npz}: truncated or corrupt .npz archive") and err.count("\n") == 1


def test_recommend_text_file_named_npz(tmp_path, capsys):
    fake = tmp_path / "model.npz"
    fake.write_text("user,item\n1,2\n")
    assert main(["recommend", "--model", str(fake), "--data", "synthetic", "--users", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{fake}: not a NumPy .npz archive" in err and "pickle" not in err


def test_recommend_model_from_another_dataset(tmp_path, capsys, synth):
    # table sizes differ from the data's
    other = write_run(tmp_path / "other", *random_tables(synth.n_users + 7, synth.n_items))
    out = tmp_path / "recs"
    assert main(["recommend", "--model", str(other), "--all", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{synth.n_users + 7} users x {synth.n_items} items but synthetic has" in err
    assert "a model from another dataset" in err and not out.exists()
    assert main(["recommend", "--model", str(other), "--users", str(synth.n_users + 3)]) == 2
    assert "a model from another dataset" in capsys.readouterr().err
    # same sizes, but meta.json records another dataset's hash
    moved = write_run(tmp_path / "moved", *random_tables(synth.n_users, synth.n_items), manifest="0" * 64)
    assert main(["recommend", "--model", str(moved), "--users", "1"]) == 2
    err = capsys.readouterr().err
    assert "meta.json: manifest_sha256: the model was trained on another dataset" in err


def test_recommend_all_requires_out_and_keeps_an_existing_one(tmp_path, capsys, synth):
    run = write_run(tmp_path / "run", *random_tables(synth.n_users, synth.n_items))
    assert main(["recommend", "--model", str(run), "--all"]) == 2
    assert "--all writes a Parquet folder" in capsys.readouterr().err
    out = tmp_path / "recs"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["recommend", "--model", str(run), "--all", "--out", str(out)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
