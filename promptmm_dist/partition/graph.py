"""`PartitionedGraph`: the `GraphPropagator` interface over W ranks.

Tables are the rank's own rows: nodes = [its users; its items], items = its items. `propagate` is one
hop of the normalised adjacency (rows fetched from their owners per hop), `user_item_mean` the users'
mean of their training items, `sum_items` a sum over all items' rows (all ranks), `gather_items` the
whole item tables in the gathered order, for losses that index items by id.
"""

from __future__ import annotations

import torch

from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.partition.exchange import gather_rows, sum_over_ranks
from promptmm_dist.partition.operator import PartitionedSpMM
from promptmm_dist.partition.plan import PartitionPlan


class PartitionedGraph(GraphPropagator):
    def __init__(self, nodes: PartitionedSpMM, user_mean: PartitionedSpMM, plan: PartitionPlan, rank: int,
                 world_size: int) -> None:  # noqa: D107 - no replicated adjacency: the base init is skipped
        self.nodes, self.user_mean_op, self.plan = nodes, user_mean, plan
        self.rank, self.world_size = rank, world_size
        self.n_users = int(plan.user_counts[rank])
        self.n_items = int(plan.item_counts[rank])
        self.item_counts = [int(c) for c in plan.item_counts]

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        return self.nodes(x)

    def user_item_mean(self, items: torch.Tensor) -> torch.Tensor:
        return self.user_mean_op(items)

    def sum_items(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(x, self.world_size)

    def gather_items(self, *tables: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return list(tables)
        widths = [t.shape[1] for t in tables]
        full = gather_rows(torch.cat(tables, dim=1), self.item_counts, self.rank)
        return list(torch.split(full, widths, dim=1))

    def exchange_stats(self) -> dict[str, float]:
        """Floats received per hop (per rank) and hops run, for the scale benchmark."""
        calls = max(self.nodes.calls, 1)
        return {"hops": self.nodes.calls, "values_received_per_hop": self.nodes.values_received / calls,
                "rows_received_per_hop": self.nodes.rows_received, "mode": self.nodes.mode}
