"""The synthetic generator: deterministic, the right shape, power-law, and learnable (a model that
uses the planted latents beats popularity; content-kNN on the informative modality beats random)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy.sparse.linalg import svds

from promptmm_dist.data import synthetic as S
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.subset import subset_first_users


@pytest.fixture(scope="module")
def default() -> InteractionData:
    return S.default_synthetic()


def recall_at_k(data: InteractionData, scores: np.ndarray, k: int = 20) -> float:
    """Test Recall@k (hits / min(k, |test|)), training items masked, users with test items only."""
    train, test = data.train_csr, data.csr("test")
    s = np.array(scores, dtype=np.float64, copy=True)
    s[train.nonzero()] = -np.inf
    top = np.argpartition(-s, k, axis=1)[:, :k]
    hits = np.take_along_axis(test.toarray(), top, axis=1).sum(axis=1)
    n = np.asarray(test.sum(axis=1)).ravel()
    has = n > 0
    return float((hits[has] / np.minimum(n[has], k)).mean())


def baselines(data: InteractionData) -> dict[str, float]:
    train = data.train_csr
    pop = np.asarray(train.sum(axis=0)).ravel()
    out = {"random": recall_at_k(data, np.random.default_rng(0).random((data.n_users, data.n_items))),
           "popularity": recall_at_k(data, np.tile(pop, (data.n_users, 1)))}
    u, s, vt = svds(train.astype(np.float64), k=16, random_state=0)
    out["puresvd16"] = recall_at_k(data, (u * s) @ vt)
    for m, f in data.features.items():
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        out[f"knn_{m}"] = recall_at_k(data, (train @ f) @ f.T)
    return out


def test_default_is_fast_and_matches_loader(default) -> None:
    t0 = time.perf_counter()
    again = S.generate_synthetic(**S.SYNTHETIC_DEFAULT)
    assert time.perf_counter() - t0 < 3.0  # about 0.2 s on an idle core
    assert again.manifest_sha256 == default.manifest_sha256
    assert load_dataset("synthetic").manifest_sha256 == default.manifest_sha256
    assert S.SYNTHETIC_DEFAULT == {"n_users": 2000, "n_items": 1000, "n_interactions": 40000,
                                   "modalities": {"image": 64, "text": 32}, "seed": 0}


def test_determinism() -> None:
    a = S.generate_synthetic(300, 200, 4000, seed=7)
    b = S.generate_synthetic(300, 200, 4000, seed=7)
    c = S.generate_synthetic(300, 200, 4000, seed=8)
    for name in ("users", "items", "splits"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    for m in a.modalities:
        assert np.array_equal(a.features[m], b.features[m])
    assert a.manifest_sha256 == b.manifest_sha256 != c.manifest_sha256
    assert len(a.items) == len(c.items) == 4000 and not np.array_equal(a.items, c.items)
    assert not np.array_equal(a.features["image"], c.features["image"])


def test_shape_and_invariants(default) -> None:
    d = default
    assert (d.n_users, d.n_items) == (2000, 1000) and len(d.users) == 40000
    assert d.modalities == ["image", "text"]
    assert d.features["image"].shape == (1000, 64) and d.features["text"].shape == (1000, 32)
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in d.features.values())
    per_user = np.bincount(d.users, minlength=d.n_users)
    assert per_user.min() >= 3
    train_per_user = np.bincount(d.users[d.splits == 0], minlength=d.n_users)
    assert train_per_user.min() >= 1
    key = d.users.astype(np.int64) * d.n_items + d.items
    assert len(np.unique(key)) == len(key)  # unique pairs, across splits too
    assert np.all(np.diff(key) > 0)  # sorted by (user, item)
    shares = np.bincount(d.splits, minlength=3) / len(d.splits)
    assert abs(shares[1] - 0.1) < 0.02 and abs(shares[2] - 0.1) < 0.02


def test_power_law(default) -> None:
    d = default
    pop = np.sort(np.bincount(d.items, minlength=d.n_items))[::-1]
    top_share = pop[: d.n_items // 10].sum() / pop.sum()
    assert top_share > 0.3  # top 10% of items hold well over 10% of interactions
    act = np.bincount(d.users)
    assert act.max() > 10 * np.median(act)  # heavy-tailed user activity
    assert np.median(act) < act.mean()


def test_learnable(default) -> None:
    r = baselines(default)
    assert r["puresvd16"] > 1.5 * r["popularity"], r  # latents beat popularity clearly
    assert r["knn_image"] > 5 * r["random"], r  # informative modality carries signal
    assert r["knn_image"] > r["knn_text"] > r["random"], r  # text: weakly informative


def test_many_chunks_keep_invariants(monkeypatch) -> None:
    monkeypatch.setattr(S, "CANDIDATE_BUDGET", 5000)  # force ~20 chunks on a small set
    d = S.generate_synthetic(1500, 120, 30000, modalities={"a": 8, "b": 4, "c": 2}, seed=3)
    assert len(d.users) == 30000 and d.modalities == ["a", "b", "c"]
    per_user = np.bincount(d.users, minlength=1500)
    assert per_user.min() >= 3 and per_user.max() <= 60
    key = d.users.astype(np.int64) * d.n_items + d.items
    assert len(np.unique(key)) == len(key)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        S.generate_synthetic(100, 50, 200)  # fewer than 3 per user
    with pytest.raises(ValueError):
        S.generate_synthetic(10, 10, 60)  # more than items/2 per user
    with pytest.raises(ValueError):
        S.generate_synthetic(10, 100, 100, modalities={"bad name": 4})


def test_subset_of_synthetic(default) -> None:
    sub = subset_first_users(default, 100)
    assert sub.n_users == 100 and len(sub.users) == int((default.users < 100).sum())
    assert np.array_equal(np.unique(sub.items), np.arange(sub.n_items))


def test_synth_cli(tmp_path) -> None:
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "promptmm_dist", "data", "synth", str(out), "--users", "400", "--items", "300",
           "--interactions", "6000", "--modalities", "image:16,text:8,audio:4", "--seed", "5", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["seconds"] > 0 and summary["peak_rss_mib"] > 0
    assert sum(summary["interactions"].values()) == 6000
    data = load_dataset(out)
    ref = S.generate_synthetic(400, 300, 6000, {"image": 16, "text": 8, "audio": 4}, seed=5)
    assert data.manifest_sha256 == ref.manifest_sha256 == summary["manifest_sha256"]
    assert data.modalities == ["image", "text", "audio"]  # the informative one stays first
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1 and "already exists" in again.stderr
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "x"), "--modalities", "image"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--modalities" in bad.stderr
    assert not (tmp_path / "x").exists()
