"""The process group a training loop runs in: one process locally, W ranks under Ray Train.

Devices: a rank's model, tables and row exchanges live on its device (`World.device`); small control
values (counts, loss and metric sums, checkpoint gathers) stay on the CPU. `group_for(t)` routes a
collective: device tensors through the default group (NCCL on GPU), CPU tensors through gloo (the
default group itself on CPU, a second gloo group beside NCCL, which only moves device tensors).

Loops ask for their rank, the world size, reductions, a rank's share of the global batch and a
gradient sync; here (one process, whole tables) those are no-ops. The partitioned world
(`partition.world.PartitionedWorld`) implements them over W ranks, so the same loop runs in one
process and on W ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

_CONTROL_GROUPS: dict[int, object] = {}
# parameter name -> which rows it has (the tables a partitioned world shards; every world draws their
# initial rows by id, so one process and W ranks start from the same model)
ROW_TABLES = {"user_emb.weight": "user", "item_emb.weight": "item"}
ROW_INIT_STD = 0.1  # both models draw their tables from N(0, 0.1^2)
INIT_CHUNK = 4096


def control_group():
    """A gloo group over all ranks for CPU tensors, or None (the default group) when the default
    backend is gloo already. Created on first use; every rank reaches its first CPU collective at the
    same call (collectives are matched), so the collective `new_group` is entered by all in order."""
    if not dist.is_initialized() or "gloo" in str(dist.get_backend()):  # gloo, or "cpu:gloo,cuda:nccl"
        return None
    key = id(dist.group.WORLD)
    if key not in _CONTROL_GROUPS:
        _CONTROL_GROUPS[key] = dist.new_group(backend="gloo")
    return _CONTROL_GROUPS[key]


def group_for(t: torch.Tensor):
    """The group a collective on `t` runs in: device tensors the default group, CPU tensors gloo."""
    return control_group() if t.device.type == "cpu" else None


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    partitioned = False  # tables are whole here

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group_for(t))
        return t

    def table_rows(self, kind: str, n: int) -> np.ndarray:
        """Global ids of the `n` rows of a `kind` ("user"/"item") table this process holds (all here)."""
        return np.arange(n)

    def init_tables(self, model: torch.nn.Module, seed: int) -> None:
        """Re-draw the embedding tables so every row's initial value depends on (seed, table, global
        id) only: one process and W ranks (each holding its rows) start from the same model."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, kind in ROW_TABLES.items():
                if name in params:
                    rows = self.table_rows(kind, params[name].shape[0])
                    params[name].copy_(row_seeded_normal(rows, params[name].shape[1], seed, name).to(params[name].device))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=control_group())

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

    def gather_batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows for this step, concatenated in rank order (here: this process's)."""
        return rows

    def full_state_dict(self, state: dict) -> dict | None:
        """The whole model's state (one gather; checkpoints use row pieces instead); the same dict here."""
        return state

    def local_state_dict(self, state: dict) -> dict:
        """This process's rows of a whole model's state (resume); the same dict here."""
        return state

    def local_optimizer_state(self, state: dict, names: dict[int, str]) -> dict:
        return state


def row_seeded_normal(ids: np.ndarray, dim: int, seed: int, table: str) -> torch.Tensor:
    """N(0, ROW_INIT_STD^2) rows for global `ids`, each drawn from the generator of its id chunk."""
    ids = np.asarray(ids, dtype=np.int64)
    out = torch.empty((len(ids), dim), dtype=torch.float32)
    chunk = ids // INIT_CHUNK
    tag = int(hashlib.sha256(table.encode()).hexdigest()[:8], 16)
    for c in np.unique(chunk):
        where = np.flatnonzero(chunk == c)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + tag * 7919 + int(c)) % (2**63 - 1))
        block = torch.randn((INIT_CHUNK, dim), generator=gen) * ROW_INIT_STD
        out[torch.from_numpy(where)] = block[torch.from_numpy(ids[where] % INIT_CHUNK)]
    return out
