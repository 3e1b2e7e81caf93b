"""LightGCN student: two ID embedding tables over the normalised graph, no modality encoder.

Serving needs only the propagated user and item tables (`export`). A training-only projector maps
the student size d_S to the teacher size d for the embedding KD when they differ.
"""

from __future__ import annotations

import torch
from torch import nn

from promptmm_dist.data.graph import GraphPropagator


class LightGCN(nn.Module):
    def __init__(self, n_users: int, n_items: int, embed_dim: int, n_layers: int,
                 teacher_dim: int | None = None) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_layers = n_users, n_items, n_layers
        # training-only: not part of the inference parameter count. Built before the tables so its
        # initial weights depend on the seed only, not on how many rows this process holds
        self.projector = (nn.Linear(embed_dim, teacher_dim, bias=False)
                          if teacher_dim is not None and teacher_dim != embed_dim else nn.Identity())
        self.user_emb = nn.Embedding(n_users, embed_dim)
        self.item_emb = nn.Embedding(n_items, embed_dim)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)

    def forward(self, graph: GraphPropagator, project: bool = False) -> tuple[torch.Tensor, ...]:
        """(user, item) propagated tables; with `project`, also the items mapped to the teacher size
        for the embedding KD. The projector runs here, inside forward, so a DDP-wrapped student sees
        every parameter it trains used in its forward pass."""
        x0 = torch.cat([self.user_emb.weight, self.item_emb.weight])
        out = graph.layer_mean(x0, self.n_layers) if self.n_layers > 0 else x0
        user, item = out[: self.n_users], out[self.n_users:]
        return (user, item, self.projector(item)) if project else (user, item)

    def base_embeddings(self) -> list[torch.Tensor]:
        return [self.user_emb.weight, self.item_emb.weight]

    def inference_parameters(self) -> int:
        """Parameters needed to serve: the two embedding tables."""
        return self.user_emb.weight.numel() + self.item_emb.weight.numel()

    @torch.no_grad()
    def init_from(self, user: torch.Tensor, item: torch.Tensor) -> None:
        """Explicit option: start from (projected) teacher embeddings."""
        self.user_emb.weight.copy_(user[:, : self.user_emb.weight.shape[1]])
        self.item_emb.weight.copy_(item[:, : self.item_emb.weight.shape[1]])


class MatrixFactorization(LightGCN):
    """MF-BPR baseline: LightGCN with zero propagation layers."""

    def __init__(self, n_users: int, n_items: int, embed_dim: int, **_: object) -> None:
        super().__init__(n_users, n_items, embed_dim, n_layers=0)


MODELS = {"lightgcn": LightGCN, "mf": MatrixFactorization}
