"""Distillation losses: divergences, the re-weighting identity, stability and gradient directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptmm_dist.distill.losses import (
    KD_TERMS,
    LIST_KD_VARIANTS,
    bpr_loss,
    disentangled_list_kd,
    dkd_list_kd,
    embedding_kd,
    l2_reg,
    list_kl,
    modality_list_kd,
    pairwise_kd,
)
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.models.student import LightGCN
from promptmm_dist.train.steps import SoftRanking
from promptmm_dist.train.student_loop import student_step
from promptmm_dist.train.world import World
from tests.helpers import tiny_config, tiny_data

# float(loss) on a graph-attached scalar is intended here (values are compared, not differentiated)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lists(seed: int = 0, b: int = 16, n: int = 10, scale: float = 1.0, dtype=torch.float64):
    g = gen(seed)
    t = torch.randn(b, 1 + n, generator=g, dtype=dtype) * scale
    s = torch.randn(b, 1 + n, generator=g, dtype=dtype) * scale
    return t, s


# every list-wise KD function under test, with a uniform signature (t, s, tau)
LIST_TERMS = {
    "list_kl": list_kl,
    "reweighted": disentangled_list_kd,
    "dkd": lambda t, s, tau: dkd_list_kd(t, s, tau, alpha=1.0, beta=8.0),
    "modality_reweighted": lambda t, s, tau: modality_list_kd({"image": t, "audio": t * 0.5 + 1}, s, tau),
    "modality_dkd": lambda t, s, tau: modality_list_kd({"image": t, "audio": -t}, s, tau, variant="dkd"),
}


# --------------------------------------------------------------------------------------------------
# divergences: >= 0, == 0 at the teacher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("name", ["list_kl", "reweighted", "dkd"])
def test_list_kl_terms_nonnegative_and_zero_iff_equal(name, tau):
    fn = LIST_TERMS[name]
    for seed in range(5):
        t, s = lists(seed, scale=3.0)
        assert float(fn(t, s, tau)) > 1e-6  # different lists: strictly positive
        assert abs(float(fn(t, t.clone(), tau))) < 1e-6
        # shifting all logits of a row leaves the softmax unchanged: still zero
        assert abs(float(fn(t, t + 5.0, tau))) < 1e-6


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_pairwise_kd_nonnegative_and_zero_iff_equal(tau):
    g = gen(1)
    for _ in range(5):
        dt, ds = torch.randn(64, generator=g) * 4, torch.randn(64, generator=g) * 4
        assert float(pairwise_kd(dt, ds, tau)) > 1e-6
        assert abs(float(pairwise_kd(dt, dt.clone(), tau))) < 1e-6
    # element-wise non-negativity, not only on average
    dt, ds = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    per = torch.stack([pairwise_kd(dt[i : i + 1], ds[i : i + 1], tau) for i in range(0, 1000, 50)])
    assert bool((per >= -1e-7).all())


def test_modality_list_kd_zero_when_every_modality_matches():
    t, _ = lists(3)
    for variant in LIST_KD_VARIANTS:
        assert abs(float(modality_list_kd({"image": t, "audio": t}, t.clone(), 2.0, variant=variant))) < 1e-6
        assert float(modality_list_kd({"image": t, "audio": t + 0.3 * torch.randn_like(t)}, t, 2.0,
                                      variant=variant)) > 1e-6


# --------------------------------------------------------------------------------------------------
# closed forms and identities
# --------------------------------------------------------------------------------------------------


def test_pairwise_kd_closed_form():
    # triple 1: dT = 2, dS = -1, tau = 2 -> pT = sigmoid(1), pS = sigmoid(-0.5); triple 2: equal (KL 0)
    pt = 1 / (1 + math.exp(-1.0))
    ps = 1 / (1 + math.exp(0.5))
    kl = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    assert kl == pytest.approx(0.2574032, abs=1e-6)  # the number, written out
    got = pairwise_kd(torch.tensor([2.0, 0.7], dtype=torch.float64), torch.tensor([-1.0, 0.7], dtype=torch.float64), 2.0)
    assert float(got) == pytest.approx(kl / 2, abs=1e-12)


def test_list_kl_closed_form_and_tau_squared():
    t = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(t / 2, -1)
    want = float((p * (p.log() - math.log(1 / 3))).sum()) * 4
    assert float(list_kl(t, s, 2.0)) == pytest.approx(want, abs=1e-12)
    assert float(list_kl(t, s, 2.0)) == pytest.approx(float(F.kl_div(torch.log_softmax(s / 2, -1), p, reduction="batchmean")) * 4)


@pytest.mark.parametrize("scale,tau", [(1.0, 1.0), (3.0, 0.5), (50.0, 4.0), (1e3, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reweighted_list_kd_equals_plain_kl(scale, tau, dtype):
    """The DESIGN identity: KL(p^T||p^S) = KL(b^T||b^S) + b^T_neg KL(q^T||q^S), also for huge logits."""
    t, s = lists(7, b=32, n=20, scale=scale, dtype=dtype)
    s = s.requires_grad_(True)
    a = disentangled_list_kd(t, s, tau)
    b = list_kl(t, s, tau)
    assert torch.isfinite(a) and torch.isfinite(b)
    rel = 1e-10 if dtype == torch.float64 else 2e-4
    assert a.item() == pytest.approx(b.item(), rel=rel, abs=1e-9)
    ga, = torch.autograd.grad(a, s)
    gb, = torch.autograd.grad(b, s)
    assert torch.isfinite(ga).all()
    assert torch.allclose(ga, gb, rtol=rel * 10, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_extreme_logits_no_nan():
    t = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    s = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, -1e4]], requires_grad=True)
    for name, fn in LIST_TERMS.items():
        loss = fn(t, s, 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name
        s.grad = None
    dm = torch.tensor([1e4, -1e4, 50.0])
    sm = torch.tensor([-1e4, 1e4, -50.0], requires_grad=True)
    loss = pairwise_kd(dm, sm, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sm.grad).all()
    assert loss.item() > 1e3  # confidently wrong student: large (finite) divergence
    assert torch.isfinite(bpr_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_dkd_relation_to_reweighted():
    t, s = lists(11, scale=2.0)
    tau = 1.5
    re = float(disentangled_list_kd(t, s, tau))
    d11 = float(dkd_list_kd(t, s, tau, alpha=1.0, beta=1.0))
    # b^T_neg < 1 strictly, so dkd(1, 1) weighs the negative part more: strictly larger in general
    assert d11 > re + 1e-6
    # dkd is linear in its weights: alpha * (binary part) + beta * (negative part)
    kl_b = float(dkd_list_kd(t, s, tau, alpha=1.0, beta=0.0))
    kl_q = float(dkd_list_kd(t, s, tau, alpha=0.0, beta=1.0))
    assert float(dkd_list_kd(t, s, tau, alpha=2.0, beta=8.0)) == pytest.approx(2 * kl_b + 8 * kl_q, rel=1e-12)
    assert d11 == pytest.approx(kl_b + kl_q, rel=1e-12)
    # teacher sure the positive is wrong (p_1 -> 0, b^T_neg -> 1): the two coincide
    t_low = t.clone()
    t_low[:, 0] = -1e3
    assert float(dkd_list_kd(t_low, s, tau, 1.0, 1.0)) == pytest.approx(
        float(disentangled_list_kd(t_low, s, tau)), rel=1e-9)
    # teacher sure of the positive (b^T_neg -> 0): the re-weighted form ignores the negatives' order
    t_high = t.clone()
    t_high[:, 0] = 1e3
    s_perm = s.clone()
    s_perm[:, 1:] = s[:, 1:].flip(-1)
    assert float(disentangled_list_kd(t_high, s, tau)) == pytest.approx(
        float(disentangled_list_kd(t_high, s_perm, tau)), abs=1e-9)
    assert float(dkd_list_kd(t_high, s, tau, 1.0, 1.0)) != pytest.approx(
        float(dkd_list_kd(t_high, s_perm, tau, 1.0, 1.0)), abs=1e-6)


def test_modality_weights():
    t1, s = lists(2)
    t2, _ = lists(3)
    tau = 2.0
    a, b = float(disentangled_list_kd(t1, s, tau)), float(disentangled_list_kd(t2, s, tau))
    assert float(modality_list_kd({"image": t1, "audio": t2}, s, tau)) == pytest.approx((a + b) / 2)
    assert float(modality_list_kd({"image": t1, "audio": t2}, s, tau, weights={"image": 1.0, "audio": 0.25})) \
        == pytest.approx(a + 0.25 * b)
    d = float(dkd_list_kd(t1, s, tau, alpha=0.5, beta=3.0))
    assert float(modality_list_kd({"image": t1}, s, tau, variant="dkd", alpha=0.5, beta=3.0)) == pytest.approx(d)
    with pytest.raises(ValueError, match="weights"):
        modality_list_kd({"image": t1, "audio": t2}, s, tau, weights={"image": 1.0})
    with pytest.raises(ValueError, match="variant"):
        modality_list_kd({"image": t1}, s, tau, variant="nope")
    with pytest.raises(ValueError):
        modality_list_kd({}, s, tau)


def test_float16_teacher_logits_are_accepted():
    t, s = lists(5, dtype=torch.float32)
    half = modality_list_kd({"image": t.half()}, s, 2.0)
    full = modality_list_kd({"image": t.half().float()}, s, 2.0)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(full), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LIST_TERMS))
def test_sgd_step_on_student_lowers_list_losses(name):
    fn = LIST_TERMS[name]
    t, s0 = lists(9, scale=2.0)
    s = s0.clone().requires_grad_(True)
    before = fn(t, s, 2.0)
    before.backward()
    with torch.no_grad():
        s_new = s - 0.05 * s.grad
    after = fn(t, s_new, 2.0)
    assert float(after) < float(before) - 1e-8


def test_sgd_step_on_student_lowers_pairwise_and_embedding_losses():
    g = gen(4)
    dt, ds = torch.randn(32, generator=g) * 3, (torch.randn(32, generator=g) * 3).requires_grad_(True)
    before = pairwise_kd(dt, ds, 1.0)
    before.backward()
    assert float(pairwise_kd(dt, ds.detach() - 1.0 * ds.grad, 1.0)) < float(before) - 1e-8

    teach = {"image": torch.randn(50, 8, generator=g), "audio": torch.randn(50, 8, generator=g)}
    e = torch.randn(50, 8, generator=g, requires_grad=True)
    before = embedding_kd(teach, e)
    before.backward()
    assert float(embedding_kd(teach, e.detach() - 0.5 * e.grad)) < float(before) - 1e-8


def test_pairwise_kd_moves_student_margins_towards_teacher():
    teacher = torch.tensor([-4.0, -1.0, 0.0, 0.5, 2.0, 6.0])
    student = torch.zeros(6, requires_grad=True)
    pairwise_kd(teacher, student, tau=1.0).backward()
    with torch.no_grad():
        moved = student - 1.0 * student.grad
    assert bool((moved[1:] > moved[:-1]).all())  # larger teacher margin -> larger rise
    assert bool((torch.sign(moved) == torch.sign(teacher)).all())  # negative where the teacher prefers i-
    assert float(moved[2]) == 0.0


def test_gradients_do_not_reach_the_teacher():
    t, s = lists(1)
    t = t.requires_grad_(True)
    s = s.requires_grad_(True)
    for name, fn in LIST_TERMS.items():
        fn(t, s, 2.0).backward()
        assert t.grad is None, name
        assert s.grad is not None and float(s.grad.abs().sum()) > 0, name
        s.grad = None
    dt = torch.randn(8, requires_grad=True)
    ds = torch.randn(8, requires_grad=True)
    pairwise_kd(dt, ds, 1.0).backward()
    assert dt.grad is None and ds.grad is not None
    h = torch.randn(10, 4, requires_grad=True)
    e = torch.randn(10, 4, requires_grad=True)
    embedding_kd({"image": h}, e).backward()
    assert h.grad is None and e.grad is not None


# --------------------------------------------------------------------------------------------------
# embedding KD, BPR, L2, registries
# --------------------------------------------------------------------------------------------------


def test_embedding_kd_values():
    g = gen(6)
    h = torch.randn(20, 8, generator=g)
    assert abs(float(embedding_kd({"image": h}, h.clone()))) < 1e-6
    assert abs(float(embedding_kd({"image": h}, 3.0 * h))) < 1e-6  # scale-invariant (cosine)
    assert float(embedding_kd({"image": h}, -h)) == pytest.approx(4.0, abs=1e-5)  # (1 - (-1))^2
    assert float(embedding_kd({"image": h, "audio": h}, -h)) == pytest.approx(8.0, abs=1e-5)  # sum over m
    assert float(embedding_kd({"image": h}, -h, alpha=1.0)) == pytest.approx(2.0, abs=1e-5)
    # orthogonal rows: cos = 0 -> (1 - 0)^2 = 1
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    assert float(embedding_kd({"image": a}, b)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        embedding_kd({"image": h}, torch.randn(20, 4))


def test_bpr_and_l2():
    pos = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    neg = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    want = -sum(math.log(1 / (1 + math.exp(-(p - n)))) for p, n in zip(pos.tolist(), neg.tolist())) / 3
    assert float(bpr_loss(pos, neg)) == pytest.approx(want, rel=1e-12)
    u = torch.ones(4, 3)
    i = torch.full((4, 3), 2.0)
    assert float(l2_reg(u, i)) == pytest.approx((12 + 48) / 4)
    assert float(l2_reg(u, i, batch_size=2)) == pytest.approx((12 + 48) / 2)


def test_registries():
    assert set(LIST_KD_VARIANTS) == {"reweighted", "dkd"}
    assert {"pair", "list", "emb"} <= set(KD_TERMS)
    t, s = lists(0)
    assert float(KD_TERMS["list"]({"image": t}, s, 1.0)) == pytest.approx(float(list_kl(t, s, 1.0)))


def test_detach_teacher_false_lets_the_prompt_learn():
    """Prompt rounds differentiate through the teacher: same value, gradient reaches the teacher and
    a step on the teacher side lowers the loss too."""
    t, s = lists(12, scale=2.0)
    dt, ds = torch.randn(16, generator=gen(1), dtype=torch.float64), torch.randn(16, generator=gen(2), dtype=torch.float64)
    h, e = torch.randn(10, 4, generator=gen(3)), torch.randn(10, 4, generator=gen(4))
    cases = {
        "pair": (lambda a, d: pairwise_kd(a, ds, 2.0, detach_teacher=d), dt),
        "list_kl": (lambda a, d: list_kl(a, s, 2.0, detach_teacher=d), t),
        "reweighted": (lambda a, d: modality_list_kd({"image": a}, s, 2.0, detach_teacher=d), t),
        "dkd": (lambda a, d: modality_list_kd({"image": a}, s, 2.0, variant="dkd", detach_teacher=d), t),
        "emb": (lambda a, d: embedding_kd({"image": a}, e, detach_teacher=d), h),
    }
    for name, (fn, teacher) in cases.items():
        tt = teacher.clone().requires_grad_(True)
        loss = fn(tt, False)
        assert float(loss) == pytest.approx(float(fn(teacher, True)), rel=1e-12), name
        loss.backward()
        assert tt.grad is not None and float(tt.grad.abs().sum()) > 0, name
        with torch.no_grad():
            stepped = tt - 0.05 * tt.grad
        assert float(fn(stepped, True)) < float(loss) - 1e-9, name


@pytest.mark.parametrize("scope", ["batch", "all"])
def test_embedding_kd_averages_over_the_batch_items_or_every_item(scope):
    """`student.emb_kd_items`: the student step's embedding KD is the SCE over exactly the chosen items
    (the batch's distinct positives and negatives, or the whole item table)."""
    data = tiny_data()
    cfg = tiny_config()
    sc = cfg.student
    sc.emb_kd_items, sc.lambda_pair, sc.lambda_list = scope, 0.0, 0.0
    torch.manual_seed(0)
    student = LightGCN(data.n_users, data.n_items, embed_dim=sc.embed_dim, n_layers=1)
    graph = GraphPropagator.from_train(data.train_csr)
    rng = np.random.default_rng(0)
    n = 64
    items = rng.integers(0, data.n_items // 4, size=(n, 1 + sc.neg_sample_num))  # a quarter of the items
    part = SoftRanking(users=rng.integers(0, data.n_users, n), items=items, modal_logits={},
                       fused_logits=np.zeros(items.shape, np.float16), margins=np.zeros(n, np.float32))
    teacher_items = {"image": torch.randn(data.n_items, sc.embed_dim, generator=gen(3))}
    with torch.no_grad():
        item_emb = student(graph)[1]
    chosen = torch.arange(data.n_items) if scope == "all" else torch.unique(torch.from_numpy(items[:, :2]))
    expected = float(embedding_kd({"image": teacher_items["image"][chosen]}, item_emb[chosen]))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    parts, _ = student_step(student, student, graph, part, opt, sc, World(), has_teacher=True,
                            teacher_items=teacher_items)
    assert parts["emb_kd"] == pytest.approx(expected, rel=1e-5)
