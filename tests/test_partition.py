"""Partitioned execution (DESIGN 3, v2): W ranks own blocks of users, items, adjacency and embedding
rows, and compute what one process computes. Ranks run as real gloo processes (no Ray needed for the
math); the Ray Train path is covered end to end in test_distributed.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.formats import load_dataset
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.subset import subset_first_users
from promptmm_dist.partition.checks import propagation_rank, teacher_curve_rank
from promptmm_dist.partition.group import run_group
from promptmm_dist.partition.plan import PartitionPlan, balanced_owner
from promptmm_dist.partition.setup import dataset_spec
from promptmm_dist.train.world import row_seeded_normal


@pytest.fixture(scope="module")
def subset(tiktok_path, tmp_path_factory):
    """600 real Tiktok users (all their items), as a canonical folder the ranks read."""
    data = subset_first_users(load_dataset(tiktok_path), 600)
    return data, dataset_spec(data, "subset", tmp_path_factory.mktemp("part"))


def test_plan_gives_every_user_and_item_one_owner_and_balances_item_degree():
    rng = np.random.default_rng(0)
    degree = rng.zipf(1.8, size=1000).clip(max=500)
    plan = PartitionPlan.build(world_size=3, num_shards=5, n_users=777, item_degree=degree)
    users = np.concatenate([plan.users_of(r) for r in range(3)])
    items = np.concatenate([plan.items_of(r) for r in range(3)])
    assert sorted(users.tolist()) == list(range(777)) and sorted(items.tolist()) == list(range(1000))
    for r in range(3):  # a user's owner and row are arithmetic and agree with the rank's list
        own = plan.users_of(r)
        assert (plan.user_owner(own) == r).all()
        assert (plan.local_user(own) == np.arange(len(own))).all()
        assert (plan.local_item(plan.items_of(r)) == np.arange(len(plan.items_of(r)))).all()
    loads = np.array([degree[plan.items_of(r)].sum() for r in range(3)])
    assert loads.max() / loads.mean() < 1.02, loads  # by degree, not just by count
    assert plan.item_counts.max() - plan.item_counts.min() <= 1
    # one rank, one shard: the numbering is the global ids
    one = PartitionPlan.build(1, 1, 50, degree[:20])
    assert (one.users_of(0) == np.arange(50)).all() and (one.gathered_items == np.arange(20)).all()


def test_item_dealing_is_deterministic_and_respects_the_count_cap():
    assert balanced_owner(np.ones(6, int), 2).tolist() == [0, 1, 0, 1, 0, 1]
    owner = balanced_owner(np.array([100, 1, 1, 1, 1, 1]), 2)  # the heavy item alone cannot fill a rank
    assert np.bincount(owner).tolist() == [3, 3]


@pytest.mark.parametrize("exchange,chunk_rows", [("cover", None), ("needed", None), ("all", None), ("needed", 50),
                                                 ("cover", 50)])
def test_two_ranks_propagate_exactly_like_one_process_forward_and_backward(subset, exchange, chunk_rows):
    data, spec = subset
    d, layers = 8, 2
    u_n, i_n = data.n_users, data.n_items
    graph = GraphPropagator.from_train(data.train_csr, "sym")
    xu = row_seeded_normal(np.arange(u_n), d, 1, "x_user").requires_grad_()
    xi = row_seeded_normal(np.arange(i_n), d, 1, "x_item").requires_grad_()
    wu = row_seeded_normal(np.arange(u_n), d, 2, "w_user")
    wi = row_seeded_normal(np.arange(i_n), d, 2, "w_item")
    x = torch.cat([xu, xi])
    hop, mean, umean = graph.propagate(x), graph.layer_mean(x, layers), graph.user_item_mean(xi)
    total = graph.sum_items(xi.t() @ xi)
    loss = ((hop[:u_n] * wu).sum() + (hop[u_n:] * wi).sum() + (mean[:u_n] * wu).sum() * 0.5
            + (mean[u_n:] * wi).sum() * 0.5 + (umean * wu).sum() * 0.25 + (xi * wi).sum() * 0.1 + total.sum() * 1e-3)
    loss.backward()
    ranks = run_group(propagation_rank, 2, spec, 4, "sym", exchange, d, layers, chunk_rows)
    # small pieces: every hop's halo travels in several pieces, pipelined with the products
    assert all((r["pieces"] > 2) if chunk_rows else (r["pieces"] == 1) for r in ranks)

    def close(got: np.ndarray, want: torch.Tensor) -> None:
        want = want.detach().numpy()
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())

    assert sorted(np.concatenate([r["users"] for r in ranks]).tolist()) == list(range(u_n))
    for r in ranks:
        u, i = r["users"], r["items"]
        assert 0 < len(u) < u_n and 0 < len(i) < i_n  # nobody holds everything
        close(r["hop_user"], hop[:u_n][u])
        close(r["hop_item"], hop[u_n:][i])
        close(r["mean_user"], mean[:u_n][u])
        close(r["mean_item"], mean[u_n:][i])
        close(r["umean"], umean[u])
        close(r["gathered"], xi[r["gathered_ids"]])
        close(r["total"], total)
        close(r["grad_user"], xu.grad[u])
        close(r["grad_item"], xi.grad[i])
    n_nodes = u_n + i_n
    for r in ranks:  # rows a hop receives: pull-only = the remote neighbours of the rank's nodes
        u, i = r["users"], r["items"]
        remote = (len(np.setdiff1d(np.unique(data.train_csr[u].indices), i))
                  + len(np.setdiff1d(np.unique(data.train_csr.T.tocsr()[i].indices), u)))
        if exchange == "needed":
            assert r["rows_received_per_hop"] == remote < n_nodes - len(u) - len(i)
            assert r["values_received"] == remote * d * (1 + layers) and r["rows_pushed_per_hop"] == 0
        elif exchange == "cover":  # pushed partial sums replace pulled rows where they are fewer
            assert 0 < r["rows_pushed_per_hop"] and r["rows_received_per_hop"] < 0.8 * remote, (r, remote)
        else:
            assert r["rows_received_per_hop"] == n_nodes - len(u) - len(i)


@pytest.mark.parametrize("exchange,chunk_rows", [("cover", None), ("needed", 40)])
def test_two_ranks_build_and_propagate_the_one_process_item_knn_graph(subset, exchange, chunk_rows):
    """FREEDOM's frozen item-item graph, partitioned: each rank finds only its items' neighbours, the
    reversed edges and degrees travel to their owners, and 2 hops over the ranks' rows equal 2 hops over
    the one-process graph (standardised features, as the teacher uses), forward and input gradients."""
    from promptmm_dist.data.item_graph import item_item_graph
    from promptmm_dist.partition.checks import item_graph_rank
    from promptmm_dist.train.teacher_loop import prepare_features

    data, spec = subset
    d, k, layers = 8, 5, 2
    whole = item_item_graph(prepare_features(data.features, "standardize"), k)
    hop = GraphPropagator(whole, 0, data.n_items)
    x = row_seeded_normal(np.arange(data.n_items), d, 1, "x_item").requires_grad_()
    y = hop.propagate(hop.propagate(x))
    (y * row_seeded_normal(np.arange(data.n_items), d, 2, "w_item")).sum().backward()
    ranks = run_group(item_graph_rank, 2, spec, 4, "standardize", k, exchange, d, layers, chunk_rows)
    assert sorted(np.concatenate([r["items"] for r in ranks]).tolist()) == list(range(data.n_items))
    assert sum(r["nnz"] for r in ranks) == whole.nnz and all(0 < r["nnz"] < whole.nnz for r in ranks)
    assert all(r["pieces"] > 1 for r in ranks) if chunk_rows else True
    for r in ranks:
        i = r["items"]
        for got, want in ((r["out"], y[i]), (r["grad"], x.grad[i])):
            want = want.detach().numpy()
            assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("backbone", ["promptmm", "contrastive", "freedom"])
def test_two_rank_teacher_follows_the_one_process_loss_curve(subset, backbone, tmp_path):
    """Same seed and global batch size: 3 epochs of the real teacher on 2 ranks over 4 shards = on 1
    rank over 1 shard = the local one-process stage (no partition at all), loss and validation, with
    dropout on, while each rank holds only its rows of the embedding tables. The contrastive backbone's
    InfoNCE is over the global batch's distinct users and items, so it adds up across ranks too."""
    from promptmm_dist.pipeline import teacher_stage

    data, spec = subset
    cfg = Config()
    cfg.teacher.backbone = backbone
    cfg.teacher.epochs, cfg.teacher.embed_dim, cfg.teacher.batch_size = 3, 16, 512
    assert cfg.teacher.dropout > 0 and cfg.prompt.prompt_dropout > 0  # masks keyed by row id: exact anyway
    one = run_group(teacher_curve_rank, 1, spec, 1, cfg.to_dict())[0]
    two = run_group(teacher_curve_rank, 2, spec, 4, cfg.to_dict())
    teacher_stage(data, cfg, tmp_path)
    local = [json.loads(x) for x in (tmp_path / "teacher" / "history.jsonl").read_text().splitlines()]
    assert len(one["history"]) == len(local) == 3
    for a, b, c in zip(one["history"], two[0]["history"], local):
        for k in ("loss_bpr", "loss_modal_bpr", "loss_prompt_bpr") + (("loss_cl",) if backbone == "contrastive" else ()):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["epoch"], k)
            assert c[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), ("local", a["epoch"], k)
        for x in (b, c):
            assert x["val"]["recall@20"] == pytest.approx(a["val"]["recall@20"], abs=1e-9)
            assert x["val"]["ndcg@20"] == pytest.approx(a["val"]["ndcg@20"], rel=1e-4)
    assert one["history"][-1]["loss_bpr"] < one["history"][0]["loss_bpr"]  # it trains
    rows = [r["shapes"]["user_emb.weight"][0] for r in two]
    assert sum(rows) == data.n_users and max(rows) < data.n_users
    assert sum(r["shapes"]["item_emb.weight"][0] for r in two) == data.n_items
    assert two[0]["full_user_rows"] == data.n_users and two[1]["full_user_rows"] is None
    assert two[0]["distinct_items_step0"] == two[1]["distinct_items_step0"] == one["distinct_items_step0"]


def test_gpu_path_routes_every_cpu_collective_through_the_gloo_control_group(subset):
    """On GPU the default group is NCCL, which refuses CPU tensors; counts, loss and metric sums and
    checkpoint gathers stay on the CPU and must go through the gloo control group. Emulated on CPU: the
    default group reads "nccl" and raises on CPU tensors, and the 2-rank teacher still trains exactly as
    on plain gloo (break a `group=group_for(...)` and this fails with the collective's name)."""
    data, spec = subset
    cfg = Config()
    cfg.teacher.epochs, cfg.teacher.embed_dim, cfg.teacher.batch_size = 1, 16, 512
    cfg.teacher.dropout = 0.0
    cfg.prompt.prompt_dropout = 0.0
    plain = run_group(teacher_curve_rank, 2, spec, 4, cfg.to_dict())
    routed = run_group(teacher_curve_rank, 2, spec, 4, cfg.to_dict(), emulate_nccl=True)
    for a, b in zip(plain[0]["history"], routed[0]["history"]):
        assert b["loss_bpr"] == pytest.approx(a["loss_bpr"], rel=1e-6)
        assert b["val"]["recall@20"] == pytest.approx(a["val"]["recall@20"], abs=1e-9)
    assert routed[0]["full_user_rows"] == data.n_users


def test_joined_shard_rankings_give_each_step_the_same_samples_on_one_rank_as_on_two():
    """A rank holding shards 0 and 1 joins their rankings step by step; 2 ranks holding one each cut
    their own: step t's global batch is the same set of samples either way (and covers every row once)."""
    from promptmm_dist.train.steps import SoftRanking, join_by_step

    rng = np.random.default_rng(0)

    def ranking(n: int, first_user: int) -> SoftRanking:
        return SoftRanking(np.arange(first_user, first_user + n), rng.integers(0, 50, (n, 3)),
                           {"image": rng.standard_normal((n, 3)).astype(np.float16)},
                           rng.standard_normal((n, 3)).astype(np.float16), rng.standard_normal(n).astype(np.float32))

    parts, n_steps = [ranking(23, 0), ranking(17, 100)], 4
    one = join_by_step(parts, n_steps)
    seen = []
    for t, (lo, hi) in enumerate(one.step_bounds(n_steps)):
        alone = [p.slice(*p.step_bounds(n_steps)[t]) for p in parts]  # what each of 2 ranks trains at step t
        want = np.sort(np.concatenate([a.users for a in alone]))
        assert np.array_equal(np.sort(one.users[lo:hi]), want), t
        np.testing.assert_array_equal(one.margins[lo:hi][np.argsort(one.users[lo:hi])],
                                      np.concatenate([a.margins for a in alone])[np.argsort(np.concatenate([a.users for a in alone]))])
        seen.append(one.users[lo:hi])
    assert sorted(np.concatenate(seen).tolist()) == list(range(23)) + list(range(100, 117))
