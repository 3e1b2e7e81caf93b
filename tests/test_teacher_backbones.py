"""Teacher backbones share one interface; FREEDOM's frozen item-item graph is built as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.errors import ConfigError
from promptmm_dist.data.item_graph import item_item_graph, knn_graph, knn_rows, unit_rows
from promptmm_dist.models.teachers import TEACHERS
from promptmm_dist.pipeline import teacher_stage
from promptmm_dist.train.teacher_loop import build_teacher
from tests.helpers import tiny_config, tiny_data


def test_knn_graph_is_symmetric_without_self_loops_and_keeps_the_nearest():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    a = knn_graph(x, 3, chunk=7).toarray()
    assert (a == a.T).all() and (np.diag(a) == 0).all()
    assert (a.sum(1) >= 3).all()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    for i in range(len(x)):
        assert set(np.argsort(-sim[i])[:3]) <= set(np.flatnonzero(a[i]))


def test_knn_rows_pick_the_lowest_ids_among_exact_ties_whatever_the_split():
    """Items with identical features tie exactly; the choice must not depend on chunking or on which
    rank asks (BLAS blocking differs), or W ranks would build another graph than one process."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 6)).astype(np.float32)
    for copy in (9, 21, 33, 47, 58):
        x[copy] = x[40]  # five duplicates of item 40
    xn = unit_rows(x)
    whole = knn_rows(xn, np.arange(60), 3)
    assert set(whole[40]) == {9, 21, 33} and set(whole[58]) == {9, 21, 33} and set(whole[9]) == {21, 33, 40}
    for rows in (np.arange(0, 60, 2), np.arange(59, -1, -3)):
        part = knn_rows(xn, rows, 3, chunk=4)
        assert all(set(a) == set(b) for a, b in zip(part, whole[rows]))


def test_item_item_graph_averages_normalised_modalities():
    rng = np.random.default_rng(1)
    feats = {"a": rng.standard_normal((30, 4)), "b": rng.standard_normal((30, 5))}
    g = item_item_graph(feats, 4).toarray()
    np.testing.assert_allclose(g, g.T, atol=1e-7)
    # each modality's D^-1/2 A D^-1/2 has spectral radius 1, so their mean has at most 1
    assert np.abs(np.linalg.eigvalsh(g)).max() <= 1 + 1e-5


@pytest.mark.parametrize("backbone", sorted(TEACHERS))
def test_every_backbone_serves_the_teacher_interface(backbone):
    data = tiny_data()
    cfg = tiny_config()
    cfg.teacher.backbone = backbone
    teacher = build_teacher(data, cfg).eval()
    out = teacher(GraphPropagator.from_train(data.train_csr))
    assert out.user.shape == (data.n_users, 16) and out.item.shape == (data.n_items, 16)
    assert sorted(out.modal_item) == sorted(data.features)
    assert out.prompt_item.shape == (data.n_items, 16)


def test_freedom_items_use_the_item_graph():
    data = tiny_data()
    cfg = tiny_config()
    graph = GraphPropagator.from_train(data.train_csr)
    outs = {}
    for backbone in ("promptmm", "freedom"):
        cfg.teacher.backbone = backbone
        with torch.no_grad():
            outs[backbone] = build_teacher(data, cfg).eval()(graph)
    torch.testing.assert_close(outs["promptmm"].user, outs["freedom"].user)  # same seed, users untouched
    assert not torch.allclose(outs["promptmm"].item, outs["freedom"].item)


def test_freedom_teacher_trains_and_is_selected_on_validation(tmp_path):
    data = tiny_data()
    cfg = tiny_config()
    cfg.teacher.backbone = "freedom"
    _, meta = teacher_stage(data, cfg, tmp_path)
    assert 0 <= meta["best_epoch"] < cfg.teacher.epochs
    assert meta["val"]["recall@20"] > 0


def test_unknown_backbone_is_refused():
    cfg = tiny_config()
    cfg.teacher.backbone = "nope"
    with pytest.raises(ConfigError, match="teacher.backbone"):
        build_teacher(tiny_data(), cfg)


def test_info_nce_matches_its_definition_and_prefers_aligned_views():
    from promptmm_dist.distill.losses import info_nce

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = an @ bn.t() / 0.5
    expected = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    torch.testing.assert_close(info_nce(a, b, 0.5), expected)
    assert info_nce(a, 2 * a, 0.2) < info_nce(a, b, 0.2)


def test_contrastive_backbone_adds_an_alignment_term_that_reaches_the_encoders():
    from promptmm_dist.train.steps import teacher_loss

    data = tiny_data()
    cfg = tiny_config()
    cfg.teacher.backbone = "contrastive"
    teacher = build_teacher(data, cfg)
    out = teacher(GraphPropagator.from_train(data.train_csr))
    assert set(out.views) == {"id", "modal"}
    users = torch.arange(64)
    items = torch.stack([torch.arange(64) % data.n_items, (torch.arange(64) + 7) % data.n_items], 1)
    cfg.teacher.lambda_m = 0.0  # only the alignment connects the encoders to the loss besides fusion
    cfg.teacher.lambda_c = 0.0
    cfg.prompt.feat_soft_token_rate = 0.0
    loss, parts = teacher_loss(out, teacher.base_embeddings(), users, items, cfg.teacher, cfg.prompt)
    assert parts["cl"] > 0
    loss.backward()
    enc = next(iter(teacher.encoders.values()))
    assert enc.weight.grad is not None and float(enc.weight.grad.abs().sum()) > 0


def test_config_rule_lists_exactly_the_registered_backbones():
    from promptmm_dist.config import RULES, load_config

    assert set(RULES["teacher.backbone"].choices) == set(TEACHERS)
    with pytest.raises(ConfigError, match="teacher.backbone"):
        load_config(overrides=["teacher.backbone=nope"])
