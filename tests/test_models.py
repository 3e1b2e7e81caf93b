"""Teacher, prompt and student models: shapes, any modality set, prompt rounds move only the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.models.prompt import hard_tokens, pca_project
from promptmm_dist.models.student import LightGCN, MatrixFactorization
from promptmm_dist.train.steps import soft_ranking
from promptmm_dist.train.teacher_loop import build_teacher
from tests.helpers import tiny_config, tiny_data


@pytest.mark.parametrize("mods", [{"image": 16}, {"text": 8, "audio": 12, "audio_whisper": 20}])
def test_teacher_handles_any_modality_set(mods):
    data = tiny_data(modalities=mods)
    cfg = tiny_config()
    teacher = build_teacher(data, cfg)
    out = teacher(GraphPropagator.from_train(data.train_csr))
    assert out.user.shape == (data.n_users, 16) and out.item.shape == (data.n_items, 16)
    assert sorted(out.modal_item) == sorted(mods)
    assert all(torch.isfinite(h).all() for h in out.modal_user.values())


def test_pca_hard_tokens_are_centred_and_padded():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    z = pca_project(x, 10)
    assert z.shape == (50, 10)
    np.testing.assert_allclose(z[:, 6:], 0.0)
    np.testing.assert_allclose(z[:, :6].mean(0), 0.0, atol=1e-5)
    tokens = hard_tokens({"a": x, "b": x * 3}, 4)
    np.testing.assert_allclose(tokens, pca_project(x, 4), rtol=1e-4, atol=1e-5)  # scale-free PCA


def test_student_inference_parameters_are_two_tables():
    s = LightGCN(30, 20, embed_dim=8, n_layers=2, teacher_dim=16)
    assert s.inference_parameters() == (30 + 20) * 8
    assert sum(p.numel() for p in s.parameters()) == (30 + 20) * 8 + 8 * 16  # + training-only projector

def test_mf_uses_no_propagation():
    data = tiny_data()
    mf = MatrixFactorization(data.n_users, data.n_items, embed_dim=8)
    u, i = mf(GraphPropagator.from_train(data.train_csr))
    assert torch.equal(u, mf.user_emb.weight) and torch.equal(i, mf.item_emb.weight)


def test_soft_ranking_matches_teacher_dot_products():
    data = tiny_data()
    teacher = build_teacher(data, tiny_config()).eval()
    g = GraphPropagator.from_train(data.train_csr)
    with torch.no_grad():
        out = teacher(g)
    samples = TrainSampler(data.train_csr).epoch(3, 0, 4)
    sr = soft_ranking(out, samples.users, samples.items)
    m = teacher.modalities[0]
    j = 7
    expected = float(out.modal_user[m][samples.users[j]] @ out.modal_item[m][samples.items[j, 2]])
    assert abs(float(sr.modal_logits[m][j, 2]) - expected) < 1e-2 * max(1, abs(expected))
    assert sr.fused_logits.dtype == np.float16
    fused = (out.user[samples.users] * out.item[samples.items[:, 0]]).sum(1) - \
        (out.user[samples.users] * out.item[samples.items[:, 1]]).sum(1)
    np.testing.assert_allclose(sr.margins, fused.numpy(), rtol=1e-5, atol=1e-5)


def test_prompt_round_moves_only_the_prompt():
    data = tiny_data()
    cfg = tiny_config()
    cfg.prompt.round_steps = 3
    teacher = build_teacher(data, cfg)
    g = GraphPropagator.from_train(data.train_csr)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = LightGCN(data.n_users, data.n_items, 16, 2)
    with torch.no_grad():
        su, si = student(g)
    info = prompt_round(teacher, g, su, si, student.projector, TrainSampler(data.train_csr), cfg, seed=0)
    assert np.isfinite(info["round_loss"])
    changed = {n for n, p in teacher.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the prompt received no gradient"
    assert all(n.startswith("prompt.") for n in changed), changed
