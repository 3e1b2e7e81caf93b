"""PromptMM teacher: per-modality encoders + graph propagation + fusion, steered by the prompt module.

Any set of one or more modalities; no modality name is special.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from promptmm_dist.config import PromptConfig, TeacherConfig
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.models.prompt import PromptModule, l2norm
from promptmm_dist.models.row_dropout import RowDropout


@dataclass
class TeacherOutput:
    """Final embeddings: fused (user, item) and per-modality h^m (user, item); prompts P_u, P_i."""

    user: torch.Tensor
    item: torch.Tensor
    modal_user: dict[str, torch.Tensor]
    modal_item: dict[str, torch.Tensor]
    prompt_user: torch.Tensor
    prompt_item: torch.Tensor
    # pairs of (user, item) views the teacher loss aligns contrastively (backbones that use it fill it)
    views: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class PromptMMTeacher(nn.Module):
    uses_item_graph: ClassVar[bool] = False  # backbones over an item-item graph take `item_hop` (FREEDOM)

    def __init__(self, n_users: int, n_items: int, features: dict[str, np.ndarray],
                 prompt: PromptModule, cfg: TeacherConfig, prompt_cfg: PromptConfig) -> None:
        """`n_users`/`n_items`/`features`: the rows this process holds (all of them in one process,
        a rank's block when partitioned; the graph object knows which)."""
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.cfg, self.prompt_cfg = cfg, prompt_cfg
        d = cfg.embed_dim
        # dense modules first, tables last: the dense initial weights then depend on the seed only,
        # not on how many table rows this process holds (partitioned ranks re-draw their rows by id)
        self.modalities = list(features)
        for name, x in features.items():
            self.register_buffer(f"feat_{name}", torch.tensor(np.asarray(x), dtype=torch.float32),
                                 persistent=False)
        self.encoders = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in features.items()})
        for enc in self.encoders.values():
            nn.init.xavier_uniform_(enc.weight)
        self.dropout = RowDropout(cfg.dropout)  # masks keyed by item id: the same on any rank
        self.prompt = prompt
        self.user_emb = nn.Embedding(n_users, d)
        self.item_emb = nn.Embedding(n_items, d)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)

    def feature(self, m: str) -> torch.Tensor:
        return getattr(self, f"feat_{m}")

    def forward(self, graph: GraphPropagator) -> TeacherOutput:
        p_u, p_i = self.prompt()
        pc = self.prompt_cfg
        # ID embeddings with the ID prompt (LightGCN propagation)
        e_u = self.user_emb.weight + pc.soft_token_rate * l2norm(p_u)
        e_i = self.item_emb.weight + pc.soft_token_rate * l2norm(p_i)
        # modality encoders on prompted features; users start as the mean of their items
        f_items = [self.dropout(self.encoders[m](
            PromptModule.feature_prompt(self.feature(m), p_i, pc.feat_soft_token_rate, graph.sum_items,
                                        pc.feat_prompt_scale)),
            self.prompt.item_ids) for m in self.modalities]
        f_i = torch.cat(f_items, dim=1)
        f_u = graph.user_item_mean(f_i)
        ego, modal = graph.layer_means([(torch.cat([e_u, e_i]), self.cfg.n_layers),
                                        (torch.cat([f_u, f_i]), self.cfg.modal_layers)])
        modal_user, modal_item = {}, {}
        extra = self.item_graph_term(e_i)
        fused = ego if extra is None else torch.cat([ego[: self.n_users], ego[self.n_users:] + extra])
        for m, h in zip(self.modalities, torch.split(modal, self.cfg.embed_dim, dim=1)):
            modal_user[m], modal_item[m] = h[: self.n_users], h[self.n_users:]
            fused = fused + self.cfg.lambda_c * l2norm(h)
        return TeacherOutput(fused[: self.n_users], fused[self.n_users:], modal_user, modal_item, p_u, p_i,
                             views=self.contrastive_views(ego, modal_user, modal_item))

    def contrastive_views(self, ego: torch.Tensor, modal_user: dict[str, torch.Tensor],
                          modal_item: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Views for the contrastive term of the loss; none for the PromptMM teacher."""
        return {}

    def item_graph_term(self, item_ids: torch.Tensor) -> torch.Tensor | None:
        """Extra item-side signal added to the propagated ID embeddings (backbones override it)."""
        return None

    def base_embeddings(self) -> list[torch.Tensor]:
        return [self.user_emb.weight, self.item_emb.weight]
