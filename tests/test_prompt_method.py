"""The prompt is wired into the method: unplugging it, or dropping a KD term from the prompt's
gradient, or serving prompt rounds differently in the Ray path, makes one of these fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.losses import embedding_kd, modality_list_kd, pairwise_kd
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.distill.teacher_model import TeacherRank
from promptmm_dist.pipeline import teacher_stage
from promptmm_dist.train.steps import list_logits
from promptmm_dist.train.teacher_checkpoint import load_teacher
from promptmm_dist.train.teacher_loop import build_teacher
from tests.helpers import tiny_config, tiny_data


def _perturbed_prompt_output(cfg, part: str):
    """Teacher outputs before and after changing one linear layer of the prompt."""
    data = tiny_data()
    teacher = build_teacher(data, cfg).eval()
    graph = GraphPropagator.from_train(data.train_csr)
    with torch.no_grad():
        before = teacher(graph)
        getattr(teacher.prompt, part).weight.add_(0.5)
        after = teacher(graph)
    return before, after


@pytest.mark.parametrize("part", ["item_linear", "user_linear"])
def test_teacher_output_changes_with_the_id_prompt(part):
    cfg = tiny_config()
    cfg.prompt.feat_soft_token_rate = 0.0
    before, after = _perturbed_prompt_output(cfg, part)
    assert not torch.allclose(before.user, after.user, atol=1e-6)
    assert not torch.allclose(before.item, after.item, atol=1e-6)


def test_teacher_modality_embeddings_change_with_the_feature_prompt():
    cfg = tiny_config()
    cfg.prompt.soft_token_rate = 0.0
    before, after = _perturbed_prompt_output(cfg, "item_linear")
    for m in before.modal_item:
        assert not torch.allclose(before.modal_item[m], after.modal_item[m], atol=1e-6), m


def test_prompt_off_means_output_independent_of_prompt():
    """The control for the two tests above: with both rates 0 the fused/modal outputs ignore the prompt."""
    cfg = tiny_config()
    cfg.prompt.soft_token_rate = cfg.prompt.feat_soft_token_rate = 0.0
    before, after = _perturbed_prompt_output(cfg, "item_linear")
    assert torch.allclose(before.user, after.user) and torch.allclose(before.item, after.item)


@pytest.mark.parametrize("scale", ["unit", "row"])
def test_feature_prompt_strength_is_absolute_or_relative_to_the_feature_row(scale):
    """'unit' (the paper): each row moves by lambda_f, ~1% of a standardised row of norm ~sqrt(D);
    'row': each row moves by lambda_f times its own norm, whatever the features' scale."""
    from promptmm_dist.models.prompt import PromptModule

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 128, generator=gen) * torch.linspace(0.5, 20.0, 50)[:, None]
    p_items = torch.randn(50, 16, generator=gen)
    moved = (PromptModule.feature_prompt(x, p_items, 0.2, scale=scale) - x).norm(dim=1)
    want = torch.full((50,), 0.2) if scale == "unit" else 0.2 * x.norm(dim=1)
    assert torch.allclose(moved, want, rtol=1e-4)


def _kd_term(name: str, out, users, items, s_user, s_item, tau: float = 2.0) -> torch.Tensor:
    t_fused = list_logits(out.user, out.item, users, items)
    s = list_logits(s_user, s_item, users, items)
    if name == "pair":
        return pairwise_kd(t_fused[:, 0] - t_fused[:, 1], s[:, 0] - s[:, 1], tau, detach_teacher=False)
    if name == "list":
        lists = {m: list_logits(out.modal_user[m], out.modal_item[m], users, items) for m in out.modal_user}
        return modality_list_kd(lists, s, tau, detach_teacher=False)
    batch = torch.unique(items[:, :2])
    return embedding_kd({m: h[batch] for m, h in out.modal_item.items()}, s_item[batch], detach_teacher=False)


@pytest.mark.parametrize("term", ["pair", "list", "emb"])
def test_prompt_gets_gradient_from_each_kd_term_alone(term):
    """No BPR at all: the KD term by itself must reach the prompt through the frozen teacher."""
    data = tiny_data()
    cfg = tiny_config()
    teacher = build_teacher(data, cfg).eval()
    for n, p in teacher.named_parameters():
        p.requires_grad_(n.startswith("prompt."))
    graph = GraphPropagator.from_train(data.train_csr)
    sampler = TrainSampler(data.train_csr)
    s = sampler.epoch(4, 0, 4)
    users, items = torch.from_numpy(s.users[:256]), torch.from_numpy(s.items[:256])
    s_user = torch.randn(data.n_users, cfg.teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    s_item = torch.randn(data.n_items, cfg.teacher.embed_dim, generator=torch.Generator().manual_seed(2))
    loss = _kd_term(term, teacher(graph), users, items, s_user, s_item)
    loss.backward()
    grads = [p.grad for p in teacher.prompt.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0.0


def _rank(data, cfg, ckpt, folder) -> TeacherRank:
    """A one-rank frozen teacher (what a one-worker Ray run's teacher group holds), read from `folder`."""
    from promptmm_dist.data.prepare import ensure_canonical
    from promptmm_dist.partition.setup import dataset_spec

    ensure_canonical(data, folder)
    return TeacherRank(dataset_spec(data, str(folder), folder), cfg.to_dict(), str(ckpt), 1)


def test_ray_prompt_round_equals_local_prompt_round(tmp_path):
    """A teacher rank's prompt round (what the Ray cache runs, fed what RayCacheKD sends: no projector
    state when the student's projector is nn.Identity) gives the local round's loss and prompt."""
    data = tiny_data()
    cfg = tiny_config(lambda_emb=0.5)
    cfg.prompt.round_steps = 3
    teacher = build_teacher(data, cfg)
    ckpt = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    graph = GraphPropagator.from_train(data.train_csr)
    s_user = torch.randn(data.n_users, cfg.student.embed_dim, generator=torch.Generator().manual_seed(3))
    s_item = torch.randn(data.n_items, cfg.student.embed_dim, generator=torch.Generator().manual_seed(4))

    model = _rank(data, cfg, ckpt, tmp_path / "data")
    remote = model.prompt_round((s_user.numpy(), s_item.numpy(), None), seed=7)

    local_teacher = build_teacher(data, cfg)
    local_teacher.load_state_dict(torch.load(ckpt, weights_only=True))
    local_teacher.eval()
    for p in local_teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(local_teacher.prompt.parameters(), lr=cfg.prompt.lr)
    torch.manual_seed(123)  # the caller's RNG state must not matter: the round draws from its seed
    local = prompt_round(local_teacher, graph, s_user, s_item, torch.nn.Identity(), TrainSampler(data.train_csr),
                         cfg, seed=7, optimizer=opt)
    assert remote["round_loss"] == pytest.approx(local["round_loss"], rel=1e-6, abs=1e-7)
    for k, v in local_teacher.prompt.state_dict().items():
        # the rank's graph is the partitioned one (W = 1): the same sums, in another order
        torch.testing.assert_close(remote["state"][k], v, rtol=1e-5, atol=1e-6)


def test_distill_uses_the_checkpoints_teacher_settings(tmp_path):
    """A teacher trained with one fusion weight and loaded under a config that says another keeps its own."""
    data = tiny_data()
    cfg = tiny_config()
    cfg.teacher.epochs = 1
    cfg.teacher.lambda_c = 0.3
    trained, _ = teacher_stage(data, cfg, tmp_path)
    other = tiny_config()
    other.teacher.lambda_c = 2.0
    other.prompt.soft_token_rate = 0.7
    loaded = load_teacher(data, other, tmp_path)
    assert other.teacher.lambda_c == 0.3 and other.prompt.soft_token_rate == cfg.prompt.soft_token_rate
    graph = GraphPropagator.from_train(data.train_csr)
    trained.eval()
    with torch.no_grad():
        a, b = trained(graph), loaded(graph)
    torch.testing.assert_close(a.user, b.user)
    torch.testing.assert_close(a.item, b.item)
    # the Ray path's teacher rank, given the adopted config, serves the same teacher
    model = _rank(data, other, tmp_path / "teacher" / "teacher.pt", tmp_path / "data")
    _, users, items = model.version_tables(0, None, 1)
    u = users["user"]
    np.testing.assert_allclose(u, a.user.numpy(), rtol=1e-5, atol=1e-6)
