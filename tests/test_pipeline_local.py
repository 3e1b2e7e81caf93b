"""End-to-end local (in-process) training: teacher -> student on real and synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptmm_dist.cli import main
from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.models.student import LightGCN
from promptmm_dist.pipeline import student_stage, teacher_stage
from promptmm_dist.train.validation import Validator
from tests.helpers import tiny_config, tiny_data


def _untrained_val_recall(data, cfg) -> float:
    torch.manual_seed(cfg.seed)
    s = LightGCN(data.n_users, data.n_items, cfg.student.embed_dim, cfg.student.n_layers)
    with torch.no_grad():
        u, i = s(GraphPropagator.from_train(data.train_csr))
    return Validator(data)(u, i, "val")["recall@20"]


def _teacher_then_student(data, cfg, tmp_path):
    teacher, t_meta = teacher_stage(data, cfg, tmp_path)
    _, s_meta = student_stage(data, cfg, tmp_path, teacher)
    return t_meta, s_meta


@pytest.mark.timeout(300)
def test_student_learns_on_synthetic(tmp_path):
    data = tiny_data()
    cfg = tiny_config(epochs=4)
    t_meta, s_meta = _teacher_then_student(data, cfg, tmp_path)
    assert s_meta["val"]["recall@20"] > _untrained_val_recall(data, cfg) + 0.02
    assert (tmp_path / "student" / "export.npz").exists() and (tmp_path / "teacher" / "teacher.pt").exists()
    assert s_meta["student_inference"] < t_meta["teacher_params"]


@pytest.mark.timeout(600)
def test_student_learns_on_real_tiktok_subset(tiktok_path, tmp_path):
    data = subset_first_users(load_dataset(tiktok_path), 800)
    cfg = tiny_config(epochs=8, batch_size=1024)
    cfg.teacher.epochs = 4
    _, s_meta = _teacher_then_student(data, cfg, tmp_path)
    untrained = _untrained_val_recall(data, cfg)
    assert s_meta["val"]["recall@20"] > untrained, (s_meta["val"]["recall@20"], untrained)


@pytest.mark.timeout(300)
def test_seeded_local_run_is_reproducible(tmp_path):
    data = tiny_data()
    cfg = tiny_config(epochs=2)
    _, a = student_stage(data, cfg, tmp_path / "a", None)
    _, b = student_stage(data, cfg, tmp_path / "b", None)
    assert a["val"] == b["val"] and a["test"] == b["test"]
    ea, eb = np.load(tmp_path / "a/lightgcn/export.npz"), np.load(tmp_path / "b/lightgcn/export.npz")
    np.testing.assert_array_equal(ea["user"], eb["user"])


@pytest.mark.timeout(300)
def test_cli_run_prints_the_metrics_contract(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--json", "--set", "teacher.epochs=1", "--set", "student.epochs=1",
               "--set", "teacher.embed_dim=16", "--set", "student.embed_dim=16"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert printed == on_disk
    for stage in ("teacher", "student"):
        for split in ("val", "test"):
            for k in (10, 20, 40, 50):
                for name in ("recall", "ndcg", "precision", "hit", "legacy_ndcg"):
                    assert 0.0 <= on_disk[stage][split][f"{name}@{k}"] <= 1.0
    assert on_disk["params"]["student_inference"] < on_disk["params"]["teacher_total"]
    assert set(on_disk["timings"]) >= {"teacher_s", "student_s", "total_s"}
    assert (out / "config.yaml").exists() and (out / "teacher" / "history.jsonl").exists()


def test_cli_rejects_unknown_config_key(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path), "--set", "student.nope=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "student.nope" in err[0]
