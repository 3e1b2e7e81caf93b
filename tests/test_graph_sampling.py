"""Graph normalisation and the training sampler (negatives are never training items)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from promptmm_dist.data import graph as graph_module
from promptmm_dist.data.graph import BlockedCsr, GraphPropagator, normalized_adjacency
from promptmm_dist.data.sampling import TrainSampler
from tests.helpers import tiny_data


def _random_csr(seed=0, n_users=40, n_items=25, density=0.15):
    r = sp.random(n_users, n_items, density=density, format="csr", random_state=seed)
    r.data[:] = 1.0
    return r


def test_symmetric_normalisation_matches_definition():
    r = _random_csr()
    a = sp.bmat([[None, r], [r.T, None]]).toarray()
    deg = a.sum(1)
    d = np.where(deg > 0, np.power(np.maximum(deg, 1e-12), -0.5), 0)
    expected = d[:, None] * a * d[None, :]
    np.testing.assert_allclose(normalized_adjacency(r, "sym").toarray(), expected, rtol=1e-6)
    left = normalized_adjacency(r, "left").toarray()
    np.testing.assert_allclose(left.sum(1)[deg > 0], 1.0, rtol=1e-5)
    with pytest.raises(ValueError):
        normalized_adjacency(r, "bogus")


def test_propagate_equals_dense_product_and_layer_mean():
    r = _random_csr(1)
    g = GraphPropagator.from_train(r)
    x = torch.randn(r.shape[0] + r.shape[1], 4)
    dense = torch.from_numpy(normalized_adjacency(r).toarray())
    torch.testing.assert_close(g.propagate(x), dense @ x, rtol=1e-5, atol=1e-5)
    expected = (x + dense @ x + dense @ (dense @ x)) / 3
    torch.testing.assert_close(g.layer_mean(x, 2), expected, rtol=1e-5, atol=1e-5)


def test_column_blocked_products_equal_the_whole_product(monkeypatch):
    """Products over column blocks (how the CPU multiplies large graphs) add up to the one product:
    forward, in place, the transpose in backward, and the user-item mean, with blocks of 8 columns."""
    m = sp.random(30, 70, density=0.2, format="csr", random_state=3, dtype=np.float32)
    blocked = BlockedCsr(m, block=8)
    assert len(blocked.blocks) == 9 and blocked.nnz == m.nnz
    x = torch.randn(70, 5)
    dense = torch.from_numpy(m.toarray())
    torch.testing.assert_close(blocked.product(x), dense @ x, rtol=1e-5, atol=1e-5)
    y = torch.ones(30, 5)
    assert blocked.product(x, add_to=y) is y
    torch.testing.assert_close(y, 1 + dense @ x, rtol=1e-5, atol=1e-5)
    assert (blocked.to_csr() != m).nnz == 0
    assert len(BlockedCsr(m, block=60).blocks) == 1  # under 1.5 blocks of columns: one
    monkeypatch.setattr(graph_module, "COLUMN_BLOCK", 8)
    for norm in ("sym", "left"):  # left: A^T is its own blocked matrix
        r = _random_csr(4)
        g = GraphPropagator.from_train(r, norm)
        assert len(g.adj_blocks.blocks) > 1
        a = torch.from_numpy(normalized_adjacency(r, norm).toarray())
        x = torch.randn(a.shape[0], 3, requires_grad=True)
        out = g.propagate(x)
        torch.testing.assert_close(out, a @ x.detach(), rtol=1e-5, atol=1e-5)
        w = torch.randn_like(out)
        (out * w).sum().backward()
        torch.testing.assert_close(x.grad, a.T @ w, rtol=1e-5, atol=1e-5)
    items = torch.randn(r.shape[1], 3)
    mean = torch.from_numpy((r.toarray() / np.maximum(r.toarray().sum(1, keepdims=True), 1)).astype(np.float32))
    torch.testing.assert_close(g.user_item_mean(items), mean @ items, rtol=1e-5, atol=1e-5)


def test_negatives_are_never_training_items():
    data = tiny_data()
    csr = data.train_csr
    sampler = TrainSampler(csr)
    batch = sampler.epoch(n_neg=8, seed=3, n_steps=4)
    assert batch.items.shape == (csr.nnz, 9)
    dense = csr.toarray().astype(bool)
    assert dense[batch.users, batch.items[:, 0]].all(), "column 0 must be the user's positive"
    assert not dense[batch.users[:, None], batch.items[:, 1:]].any(), "a negative is a training item"
    # every training pair appears exactly once per epoch
    keys = np.sort(batch.users * data.n_items + batch.items[:, 0])
    coo = csr.tocoo()
    np.testing.assert_array_equal(keys, np.sort(coo.row.astype(np.int64) * data.n_items + coo.col))


def test_sampler_is_seeded():
    sampler = TrainSampler(tiny_data().train_csr)
    a, b, c = sampler.epoch(4, 1, 3), sampler.epoch(4, 1, 3), sampler.epoch(4, 2, 3)
    np.testing.assert_array_equal(a.items, b.items)
    assert not np.array_equal(a.items, c.items)


def test_sampler_refuses_a_user_who_has_every_item():
    r = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="negatives"):
        TrainSampler(r).epoch(2, 0, 1)


def _rows(batch) -> set[tuple[int, ...]]:
    return {(int(u), *map(int, its)) for u, its in zip(batch.users, batch.items)}


def test_an_epochs_steps_are_the_same_for_any_sharding():
    """Step t of the whole sampler = the union of step t of each user shard's sampler (negatives
    included), and a sampler numbering its users locally (`row_ids`) draws the same: so 1 process, N
    shards and W ranks train on the same global batches (drawing per shard generator made it differ)."""
    r = tiny_data().train_csr
    whole = TrainSampler(r).epoch(3, seed=7, n_steps=5)
    assert len(whole.step_ends) == 5 and whole.step_ends[-1] == r.nnz
    sizes = np.diff(np.concatenate([[0], whole.step_ends]))
    assert sizes.min() > 0.5 * r.nnz / 5  # near-equal steps
    parts = []
    for k in range(3):  # shard k: users u % 3 == k, global rows
        users = np.arange(k, r.shape[0], 3)
        parts.append(TrainSampler(r, users=users).epoch(3, seed=7, n_steps=5).steps())
    local = r[np.arange(1, r.shape[0], 3)]  # shard 1 in local row numbering
    local_steps = TrainSampler(local, row_ids=np.arange(1, r.shape[0], 3)).epoch(3, seed=7, n_steps=5).steps()
    for t, step in enumerate(whole.steps()):
        assert _rows(step) == set().union(*(_rows(p[t]) for p in parts)), t
        relabelled = type(step)(np.arange(1, r.shape[0], 3)[local_steps[t].users], local_steps[t].items)
        assert _rows(relabelled) == _rows(parts[1][t])
    other = TrainSampler(r).epoch(3, seed=8, n_steps=5)
    assert _rows(other.steps()[0]) != _rows(whole.steps()[0])


def test_a_prompt_rounds_batch_is_the_same_for_any_sharding():
    r = tiny_data().train_csr
    whole = TrainSampler(r).round_batch(0.2, 4, seed=3, step=1)
    assert 0.1 * r.nnz < len(whole) < 0.3 * r.nnz
    dense = r.toarray().astype(bool)
    assert not dense[whole.users[:, None], whole.items[:, 1:]].any()
    shards = [TrainSampler(r, users=np.arange(k, r.shape[0], 2)).round_batch(0.2, 4, seed=3, step=1) for k in range(2)]
    assert _rows(whole) == _rows(shards[0]) | _rows(shards[1])
    assert _rows(TrainSampler(r).round_batch(0.2, 4, seed=3, step=2)) != _rows(whole)


def test_row_dropout_masks_a_row_alike_wherever_it_is_held():
    """`RowDropout` keys each row's mask by its id: the rows a rank holds are dropped as the same rows
    of the whole table are in one process, given the same generator state; the rate is the one asked."""
    from promptmm_dist.models.row_dropout import RowDropout

    drop = RowDropout(0.3).train()
    x = torch.ones(4000, 16)
    ids = torch.arange(4000)
    torch.manual_seed(5)
    whole = drop(x, ids)
    torch.manual_seed(5)
    part = drop(x[1000:2500], ids[1000:2500])
    torch.testing.assert_close(part, whole[1000:2500])
    assert abs(float((whole == 0).float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(whole.mean(), torch.tensor(1.0), atol=0.02, rtol=0)  # rescaled like nn.Dropout
    assert not torch.equal(drop(x, ids), whole)  # the next call draws another key
    assert torch.equal(drop.eval()(x, ids), x)
