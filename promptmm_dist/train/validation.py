"""Per-epoch evaluation inside a training loop: each rank ranks its share of users, sums are reduced
exactly across ranks, then turned into means once."""

from __future__ import annotations

import numpy as np
import torch

from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.eval.evaluate import EvalData, embedding_scorer, full_ranking_sums
from promptmm_dist.eval.metrics import finalize, metric_keys
from promptmm_dist.train.world import World


class Validator:
    def __init__(self, data: InteractionData, world: World | None = None) -> None:
        self.data = EvalData.from_data(data, ("val", "test"))  # masks built once, reused every epoch
        self.world = world or World()
        all_users = np.arange(data.n_users)
        # partitioned: `data` holds this rank's users only; replicated: every rank ranks every W-th user
        self.users = all_users if self.world.partitioned else all_users[all_users % self.world.world_size == self.world.rank]
        self.keys = metric_keys()

    @torch.no_grad()
    def __call__(self, user_emb: torch.Tensor, item_emb: torch.Tensor, split: str = "val") -> dict[str, float]:
        sums, count = full_ranking_sums(embedding_scorer(user_emb, item_emb), self.data, split, users=self.users)
        vec = torch.tensor([sums[k] for k in self.keys] + [float(count)], dtype=torch.float64)
        vec = self.world.all_reduce_sum(vec)
        total = {k: float(v) for k, v in zip(self.keys, vec[:-1])}
        return finalize(total, int(vec[-1]))


CLOSING_FILE = "final.json"  # a Ray stage's closing metrics, written by rank 0 into its last checkpoint


def closing_metrics(validator: Validator, user_emb: torch.Tensor, item_emb: torch.Tensor) -> dict[str, dict]:
    """Validation and test metrics of the selected model, each rank ranking its own users (exact sums
    reduced): what the driver reports for a Ray stage, so it never holds the tables itself."""
    return {split: validator(user_emb, item_emb, split) for split in ("val", "test")}
