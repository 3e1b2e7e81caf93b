"""FREEDOM-style teacher backbone (Zhou & Shen, ACM MM 2023): the PromptMM teacher plus a frozen
item-item graph built from the modality features.

Each modality gives a kNN graph over items (cosine similarity of its feature rows, top `knn_k`
neighbours, symmetrised and D^-1/2 A D^-1/2 normalised); the graphs are averaged and never trained
("freezing"). The prompted item ID embeddings are propagated `item_layers` hops over it and added to
the item side of the LightGCN output, so items that look or sound alike pull together even with few
interactions. Everything else (prompt hook, modality encoders, per-modality embeddings for the KD,
loss) is the PromptMM teacher's. Not copied: the original's degree-sensitive edge pruning of the
user-item graph (it needs a per-epoch graph, which the shared training loop does not sample).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from promptmm_dist.config import PromptConfig, TeacherConfig
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.models.prompt import PromptModule
from promptmm_dist.models.teacher import PromptMMTeacher


def knn_graph(x: np.ndarray, k: int, chunk: int = 2048) -> sp.csr_matrix:
    """Symmetric 0/1 kNN graph of the rows of x by cosine similarity (self excluded).

    Chunked so memory is chunk x I, not I x I; compute is O(I^2 d), fine for real item catalogues
    of this size (tens of thousands) and meant to be built once per dataset."""
    n = len(x)
    k = max(1, min(k, n - 1))
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rows, cols = [], []
    for lo in range(0, n, chunk):
        sim = xn[lo:lo + chunk] @ xn.T
        sim[np.arange(len(sim)), np.arange(lo, lo + len(sim))] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        rows.append(np.repeat(np.arange(lo, lo + len(sim)), k))
        cols.append(top.ravel())
    r, c = np.concatenate(rows), np.concatenate(cols)
    a = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float32)
    return a.tocsr()


def sym_normalize(a: sp.csr_matrix) -> sp.csr_matrix:
    deg = np.asarray(a.sum(axis=1)).ravel()
    d = np.where(deg > 0, deg ** -0.5, 0.0).astype(np.float32)
    out = (sp.diags(d) @ a @ sp.diags(d)).tocsr().astype(np.float32)
    out.sort_indices()
    return out


def item_item_graph(features: dict[str, np.ndarray], k: int) -> sp.csr_matrix:
    """Mean over modalities of each modality's normalised kNN graph (no modality is special)."""
    graphs = [sym_normalize(knn_graph(np.asarray(x, dtype=np.float32), k)) for x in features.values()]
    return (sum(graphs[1:], graphs[0]) / len(graphs)).tocsr()


class FreedomTeacher(PromptMMTeacher):
    def __init__(self, n_users: int, n_items: int, features: dict[str, np.ndarray],
                 prompt: PromptModule, cfg: TeacherConfig, prompt_cfg: PromptConfig) -> None:
        super().__init__(n_users, n_items, features, prompt, cfg, prompt_cfg)
        self.item_graph = GraphPropagator(item_item_graph(features, cfg.knn_k), 0, n_items)

    def item_graph_term(self, item_ids: torch.Tensor) -> torch.Tensor:
        h = item_ids
        for _ in range(self.cfg.item_layers):
            h = self.item_graph.propagate(h)
        return h
