"""Serving from the exported student: `recommend` and `evaluate --model RUN_DIR`."""

from __future__ import annotations

import json

import numpy as np

from promptmm_dist.cli import main
from promptmm_dist.serve import recommend


def test_recommend_ranks_by_dot_product_and_excludes_seen():
    users = np.eye(3, dtype=np.float32)
    items = np.array([[0, 0, 1], [1, 0, 0], [2, 0, 0], [0, 1, 0]], dtype=np.float32)
    assert recommend(users, items, [0], 2) == {0: [2, 1]}
    assert recommend(users, items, [0], 2, exclude={0: np.array([2])}) == {0: [1, 0]}


def test_recommend_and_evaluate_cli_on_an_export(tmp_path, capsys):
    rng = np.random.default_rng(0)
    from promptmm_dist.data.synthetic import default_synthetic

    data = default_synthetic()
    np.savez(tmp_path / "export.npz", user=rng.normal(size=(data.n_users, 8)).astype(np.float32),
             item=rng.normal(size=(data.n_items, 8)).astype(np.float32))
    assert main(["recommend", "--model", str(tmp_path), "--users", "0,5", "--k", "5", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert set(recs) == {"0", "5"} and all(len(v) == 5 for v in recs.values())
    assert main(["evaluate", "--model", str(tmp_path), "--split", "both", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["test"]["recall@20"] < 0.2  # random embeddings are near chance
    assert main(["recommend", "--model", str(tmp_path), "--users", "999999"]) == 2
    assert "unknown user" in capsys.readouterr().err
