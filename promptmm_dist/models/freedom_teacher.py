"""FREEDOM-style teacher backbone (Zhou & Shen, ACM MM 2023): the PromptMM teacher plus a frozen
item-item graph built from the modality features.

Each modality gives a kNN graph over items (cosine similarity of its feature rows, top `knn_k`
neighbours, symmetrised and D^-1/2 A D^-1/2 normalised); the graphs are averaged and never trained
("freezing"; `data.item_graph`). The prompted item ID embeddings are propagated `item_layers` hops over
it and added to the item side of the LightGCN output, so items that look or sound alike pull together
even with few interactions. Everything else (prompt hook, modality encoders, per-modality embeddings for
the KD, loss) is the PromptMM teacher's. Not copied: the original's degree-sensitive edge pruning of the
user-item graph (it needs a per-epoch graph, which the shared training loop does not sample).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch

from promptmm_dist.config import PromptConfig, TeacherConfig
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.item_graph import item_item_graph
from promptmm_dist.models.prompt import PromptModule
from promptmm_dist.models.teacher import PromptMMTeacher

ItemHop = Callable[[torch.Tensor], torch.Tensor]


class FreedomTeacher(PromptMMTeacher):
    uses_item_graph: ClassVar[bool] = True

    def __init__(self, n_users: int, n_items: int, features: dict[str, np.ndarray],
                 prompt: PromptModule, cfg: TeacherConfig, prompt_cfg: PromptConfig,
                 item_hop: ItemHop | None = None) -> None:
        """`item_hop`: one hop over the item-item graph for the item rows this process holds (a
        partitioned rank passes its rows' operator); None: built here from `features`, all items."""
        super().__init__(n_users, n_items, features, prompt, cfg, prompt_cfg)
        self.item_hop = item_hop or GraphPropagator(item_item_graph(features, cfg.knn_k), 0, n_items).propagate

    def item_graph_term(self, item_ids: torch.Tensor) -> torch.Tensor:
        h = item_ids
        for _ in range(self.cfg.item_layers):
            h = self.item_hop(h)
        return h
