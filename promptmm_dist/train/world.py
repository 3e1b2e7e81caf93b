"""The process group a training loop runs in: one process locally, W ranks under Ray Train.

Loops ask for their rank, the world size, reductions, a rank's share of the global batch and a
gradient sync; here (one process, whole tables) those are no-ops. The partitioned world
(`partition.world.PartitionedWorld`) implements them over W ranks, so the same loop runs in one
process and on W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    partitioned = False  # tables are whole here

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def batch_share(self, n_local: int) -> float:
        """Weight of this process's mean batch loss in the global batch's loss."""
        return 1.0

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """Make the replicated parameters' gradients the global batch's (nothing to do here)."""

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def distinct_items(self, items: torch.Tensor, n_items: int) -> torch.Tensor:
        """The distinct item ids of the global batch, sorted (here: of this process's batch)."""
        return torch.unique(items)

    def full_state_dict(self, state: dict) -> dict | None:
        """The whole model's state (checkpoints); the same dict here."""
        return state

    def local_state_dict(self, state: dict) -> dict:
        """This process's rows of a whole model's state (resume); the same dict here."""
        return state

    def full_optimizer_state(self, state: dict, names: dict[int, str]) -> dict | None:
        return state

    def local_optimizer_state(self, state: dict, names: dict[int, str]) -> dict:
        return state
