"""Contrastive multimodal teacher backbone: the PromptMM teacher whose collaborative (ID) view and
modality view of each user and item are aligned with InfoNCE, as in the cross-view self-supervision of
MICRO / MMSSL / MMHCL-style multimodal recommenders.

The ID view alone overfits the few interactions of sparse users; pulling it toward what the item
features say (and the modality view toward what co-interactions say) regularises both, while the
in-batch negatives keep the views from collapsing. The alignment is a loss term
(`train.steps.teacher_loss`, weight `teacher.lambda_cl`, temperature `teacher.cl_tau`); this class only
declares the two views, so the KD interface is unchanged.
"""

from __future__ import annotations

import torch

from promptmm_dist.models.teacher import PromptMMTeacher


class ContrastiveTeacher(PromptMMTeacher):
    def contrastive_views(self, ego: torch.Tensor, modal_user: dict[str, torch.Tensor],
                          modal_item: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        mean_user = torch.stack(list(modal_user.values())).mean(0)
        mean_item = torch.stack(list(modal_item.values())).mean(0)
        return {"id": (ego[: self.n_users], ego[self.n_users:]), "modal": (mean_user, mean_item)}
