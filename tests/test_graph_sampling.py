"""Graph normalisation and the training sampler (negatives are never training items)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from promptmm_dist.data.graph import GraphPropagator, normalized_adjacency
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


def test_negatives_are_never_training_items():
    data = tiny_data()
    csr = data.train_csr
    sampler = TrainSampler(csr)
    batch = sampler.epoch(n_neg=8, seed=3)
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
    a, b, c = sampler.epoch(4, 1), sampler.epoch(4, 1), sampler.epoch(4, 2)
    np.testing.assert_array_equal(a.items, b.items)
    assert not np.array_equal(a.items, c.items)


def test_sampler_refuses_a_user_who_has_every_item():
    r = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="negatives"):
        TrainSampler(r).epoch(2, 0)
