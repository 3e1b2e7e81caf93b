"""`PartitionedWorld`: the process group of a partitioned run, as the training loops see it.

The loops ask the world for three things besides rank and size, all no-ops in one process:
- `batch_share(n)`: this rank's share of the global batch, so the sum of the ranks' weighted losses is
  the loss of the whole global batch (ranks draw unequal numbers of samples per step);
- `sync_gradients(model)`: sum the replicated (dense) modules' gradients over ranks. Embedding tables
  are sharded: their rows already received every rank's gradient through the exchanges' backward, so
  they are never all-reduced (no dense (U+I) x d gradient traffic);
- `reduce_sums(d)`: a dict of per-rank partial sums summed over ranks (loss parts).
`full_table` makes a sharded table whole on rank 0 (the serving export); `local_table` takes a rank's
rows out of a whole one (a whole checkpoint resumed on W ranks). Checkpoints themselves are written in
row pieces, one per rank (train.row_pieces).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from promptmm_dist.partition.exchange import COLLECTIVES, gather_rows
from promptmm_dist.partition.plan import PartitionPlan
from promptmm_dist.train.world import ROW_TABLES, World, control_group, group_for

# parameter name -> which rows it has: what is sharded, not how the model uses it (TorchRec-style plan)
SHARDED_TABLES = ROW_TABLES


class PartitionedWorld(World):
    partitioned = True

    def __init__(self, rank: int, world_size: int, plan: PartitionPlan, device: torch.device | None = None) -> None:
        super().__init__(rank, world_size, device or torch.device("cpu"))
        self.plan = plan
        self.rows = {"user": plan.users_of(rank), "item": plan.items_of(rank)}
        self.totals = {"user": plan.n_users, "item": plan.n_items}
        self.counts = {"user": [int(c) for c in plan.user_counts], "item": [int(c) for c in plan.item_counts]}

    # ---- per step -----------------------------------------------------------------------------
    def batch_share(self, n_local: int) -> float:
        if self.world_size == 1:
            return 1.0
        total = torch.tensor([float(n_local)], dtype=torch.float64)
        with COLLECTIVES.timing():
            dist.all_reduce(total, group=group_for(total))
        return float(n_local) / max(float(total), 1.0)

    def sync_gradients(self, model: torch.nn.Module) -> None:
        if self.world_size == 1:
            return
        dense = [p for name, p in model.named_parameters() if name not in SHARDED_TABLES and p.requires_grad]
        if not dense:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense])
        with COLLECTIVES.timing():
            dist.all_reduce(flat, group=group_for(flat))
        at = 0
        for p in dense:
            n = p.numel()
            p.grad = flat[at:at + n].view_as(p).clone()
            at += n

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        with COLLECTIVES.timing():
            dist.all_reduce(vec, group=group_for(vec))
        return {k: float(v) for k, v in zip(keys, vec)}

    def distinct_items(self, items: torch.Tensor, n_items: int) -> torch.Tensor:
        """The distinct items of every rank's part of the batch (an (I,) mask summed over ranks)."""
        if self.world_size == 1:
            return torch.unique(items)
        mask = torch.zeros(n_items, dtype=torch.float32, device=items.device)
        mask[items.reshape(-1)] = 1.0
        with COLLECTIVES.timing():
            dist.all_reduce(mask, group=group_for(mask))
        return torch.nonzero(mask, as_tuple=True)[0]

    def gather_batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` (a different number per rank and step) in rank order, differentiable:
        the backward returns each rank its rows' gradient (reduce-scatter)."""
        if self.world_size == 1:
            return rows
        n = torch.tensor([rows.shape[0]], dtype=torch.int64)
        counts = [torch.zeros_like(n) for _ in range(self.world_size)]
        with COLLECTIVES.timing():
            dist.all_gather(counts, n, group=group_for(n))
        return gather_rows(rows, [int(c) for c in counts], self.rank)

    def global_numel(self, model: torch.nn.Module, names: tuple[str, ...] | None = None) -> int:
        """Parameters of the whole model (or of the parameters `names`): each sharded table's rows
        summed over ranks, the replicated modules counted once. Collective."""
        sharded = dense = 0
        for name, p in model.named_parameters():
            if names is not None and name not in names:
                continue
            if name in SHARDED_TABLES:
                sharded += p.numel()
            else:
                dense += p.numel()
        total = self.all_reduce_sum(torch.tensor([float(sharded)], dtype=torch.float64))
        return int(total.item()) + dense

    # ---- tables -------------------------------------------------------------------------------
    def table_rows(self, kind: str, n: int) -> np.ndarray:
        return self.rows[kind]

    def full_table(self, local: torch.Tensor, kind: str) -> torch.Tensor | None:
        """The whole table in global id order, on the CPU of rank 0 (None elsewhere). Collective; the
        rows travel through the CPU group (the serving export at the end, not every step)."""
        local = local.detach().cpu()
        if self.world_size == 1:
            out = torch.empty((self.totals[kind],) + tuple(local.shape[1:]), dtype=local.dtype)
            out[torch.from_numpy(self.rows[kind])] = local
            return out
        counts = self.counts[kind]
        width = max(counts)
        padded = local.new_zeros((width,) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        bufs = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
        dist.gather(padded, bufs, dst=0, group=control_group())
        if self.rank != 0:
            return None
        out = torch.empty((self.totals[kind],) + tuple(local.shape[1:]), dtype=local.dtype)
        for s, n in enumerate(counts):
            ids = self.plan.users_of(s) if kind == "user" else self.plan.items_of(s)
            out[torch.from_numpy(ids)] = bufs[s][:n]
        return out

    def local_table(self, full: torch.Tensor, kind: str) -> torch.Tensor:
        return full[torch.from_numpy(self.rows[kind]).to(full.device)].clone()

    def full_state_dict(self, state: dict) -> dict | None:
        out = {}
        for k, v in state.items():
            out[k] = self.full_table(v, SHARDED_TABLES[k]) if k in SHARDED_TABLES else (v.detach().cpu() if torch.is_tensor(v) else v)
        return out if self.rank == 0 else None

    def local_state_dict(self, state: dict) -> dict:
        return {k: self.local_table(v, SHARDED_TABLES[k]) if k in SHARDED_TABLES else v for k, v in state.items()}

    def local_optimizer_state(self, state: dict, names: dict[int, str]) -> dict:
        per_param = {}
        for idx, entry in state["state"].items():
            kind = SHARDED_TABLES.get(names.get(int(idx), ""))
            per_param[idx] = {k: (self.local_table(v, kind) if kind and torch.is_tensor(v) and v.dim() == 2 else v)
                              for k, v in entry.items()}
        return {"state": per_param, "param_groups": state["param_groups"]}
