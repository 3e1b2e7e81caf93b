"""`promptmm recommend --all` with Ray Data on Tiktok's shapes: every user's top-K against an
independent numpy reference (float64, full sort), training items excluded, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from promptmm_dist.cli import main
from promptmm_dist.serve.batch import recommend_all

K = 10


@pytest.fixture(scope="module")
def tiktok_run(tiktok_path, tmp_path_factory):
    """A run-like folder (config.yaml naming Tiktok, student/export.npz + meta.json) holding random
    float32 tables of Tiktok's shapes: no training needed."""
    from promptmm_dist.data.formats import load_dataset

    data = load_dataset(tiktok_path)
    rng = np.random.default_rng(7)
    user = rng.normal(size=(data.n_users, 32)).astype(np.float32)
    item = rng.normal(size=(data.n_items, 32)).astype(np.float32)
    run = tmp_path_factory.mktemp("rec") / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  path: {tiktok_path}\n  format: auto\n")
    np.savez(run / "student" / "export.npz", user=user, item=item)
    (run / "student" / "meta.json").write_text(json.dumps({"manifest_sha256": data.manifest_sha256}))
    return run, data, user, item


def reference_top_k(user: np.ndarray, item: np.ndarray, masked, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, masked items at -inf, full stable argsort: (items, scores) per user."""
    scores = user.astype(np.float64) @ item.astype(np.float64).T
    scores[masked.nonzero()] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.slow  # ~15 s alone, ~30 s on a busy 2-CPU machine
def test_recommend_all_on_tiktok_equals_numpy_reference(tiktok_run, ray_session, tmp_path, capsys):
    run, data, user, item = tiktok_run
    out = tmp_path / "recs.parquet"
    assert main(["recommend", "--model", str(run), "--all", "--k", str(K), "--out", str(out),
                 "--num-workers", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == [f"block-{b:05d}.parquet" for b in range(summary["blocks"])] and summary["blocks"] == 10
    df = pd.read_parquet(out).sort_values(["user", "rank"])
    assert len(df) == 9308 * K == data.n_users * K
    assert [str(t) for t in df.dtypes] == ["int32", "int32", "int32", "float32"]
    assert (df.groupby("user")["rank"].apply(list) == [list(range(1, K + 1))] * data.n_users).all()
    got = df["item"].to_numpy().reshape(data.n_users, K)
    ref_items, ref_scores = reference_top_k(user, item, data.train_csr, K)
    # no training item is ever recommended
    csr = data.train_csr
    assert csr[np.repeat(np.arange(data.n_users), K), got.ravel()].sum() == 0
    # rank by rank the same scores as the reference, for every user ...
    got_scores = np.take_along_axis(user.astype(np.float64) @ item.astype(np.float64).T, got, axis=1)
    np.testing.assert_allclose(got_scores, ref_scores[:, :K], rtol=0, atol=1e-4)
    np.testing.assert_allclose(df["score"].to_numpy().reshape(-1, K), ref_scores[:, :K], rtol=0, atol=1e-4)
    # ... and the same items wherever float32 rounding cannot swap two neighbours (near-ties < 1e-4)
    tied = (np.abs(np.diff(ref_scores, axis=1)) < 1e-4).any(axis=1)
    assert tied.mean() < 0.01
    assert (got[~tied] == ref_items[~tied, :K]).all()


def test_recommend_all_exclude_val_and_users_path_agree(tiktok_run, ray_session, tmp_path, capsys):
    run, data, user, item = tiktok_run
    out = tmp_path / "recs"
    assert main(["recommend", "--model", str(run), "--all", "--k", "5", "--out", str(out), "--exclude-val",
                 "--num-workers", "1", "--block-size", "4000"]) == 0
    df = pd.read_parquet(out)
    assert len(list(out.glob("*.parquet"))) == 3 and len(df) == data.n_users * 5
    val = data.csr("val")
    assert val[df["user"].to_numpy(), df["item"].to_numpy()].sum() == 0
    assert data.train_csr[df["user"].to_numpy(), df["item"].to_numpy()].sum() == 0
    users = [0, 17, 4242, data.n_users - 1]
    capsys.readouterr()
    assert main(["recommend", "--model", str(run), "--users", ",".join(map(str, users)), "--k", "5",
                 "--exclude-val", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for u in users:
        assert listed[str(u)] == df[df["user"] == u].sort_values("rank")["item"].tolist()


def test_recommend_all_error_leaves_nothing_behind(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    user, item = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    out = tmp_path / "recs"

    def fail_on_first_block(msg: str) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        recommend_all(user, item, None, 3, out, block_size=10, num_workers=1, progress=fail_on_first_block)
    assert list(tmp_path.iterdir()) == []
    summary = recommend_all(user, item, None, 3, out, block_size=10, num_workers=1, progress=lambda m: None)
    assert summary["rows"] == 150 and len(pd.read_parquet(out)) == 150
