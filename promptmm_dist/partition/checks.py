"""Rank programs that check the partitioned execution against one process: run them with
`partition.group.run_group` (tests, benchmarks). Each returns plain arrays keyed by global ids so the
caller can compare any W with the replicated implementation.
"""

from __future__ import annotations

import numpy as np
import torch

from promptmm_dist.partition.operator import HALO_CHUNK_ROWS
from promptmm_dist.partition.setup import setup_rank
from promptmm_dist.train.world import row_seeded_normal


def propagation_rank(rank: int, world_size: int, spec: dict, num_shards: int, norm: str, exchange: str,
                     dim: int, layers: int, chunk_rows: int | None = None) -> dict:
    """Forward and input gradients of the graph operators on this rank's rows, for inputs and output
    weights drawn per global id (so every W sees the same numbers). `chunk_rows`: halo pieces this
    small, so every hop runs pipelined in pieces."""
    rd, world, graph = setup_rank(spec, num_shards, rank, world_size, norm, exchange,
                                  chunk_rows=chunk_rows or HALO_CHUNK_ROWS)
    x_user = row_seeded_normal(rd.users, dim, 1, "x_user").requires_grad_()
    x_item = row_seeded_normal(rd.items, dim, 1, "x_item").requires_grad_()
    w_user = row_seeded_normal(rd.users, dim, 2, "w_user")
    w_item = row_seeded_normal(rd.items, dim, 2, "w_item")
    hop = graph.propagate(torch.cat([x_user, x_item]))
    mean = graph.layer_mean(torch.cat([x_user, x_item]), layers)
    umean = graph.user_item_mean(x_item)
    whole_items = graph.gather_items(x_item)[0]  # (I, d) gathered order
    total = graph.sum_items(x_item.t() @ x_item)
    # a scalar touching every output, weighted per global id
    u = rd.n_users
    loss = ((hop[:u] * w_user).sum() + (hop[u:] * w_item).sum() + (mean[:u] * w_user).sum() * 0.5
            + (mean[u:] * w_item).sum() * 0.5 + (umean * w_user).sum() * 0.25
            + (whole_items[torch.from_numpy(rd.plan.item_pos[rd.items])] * w_item).sum() * 0.1
            + total.sum() * (1e-3 if rank == 0 else 0.0))  # the same value on every rank: count it once
    loss.backward()
    return {"users": rd.users, "items": rd.items, "hop_user": hop[:u].detach().numpy(),
            "hop_item": hop[u:].detach().numpy(), "mean_user": mean[:u].detach().numpy(),
            "mean_item": mean[u:].detach().numpy(), "umean": umean.detach().numpy(),
            "gathered_ids": rd.plan.gathered_items, "gathered": whole_items.detach().numpy(),
            "total": total.detach().numpy(),
            "grad_user": x_user.grad.numpy(), "grad_item": x_item.grad.numpy(),
            "values_received": graph.nodes.values_received, "pieces": graph.nodes.n_pieces,
            "rows_received_per_hop": graph.nodes.rows_received, "rows_pushed_per_hop": sum(graph.nodes.push_recv_counts)}


def item_graph_rank(rank: int, world_size: int, spec: dict, num_shards: int, feature_norm: str, k: int,
                    exchange: str, dim: int, layers: int, chunk_rows: int | None = None) -> dict:
    """Forward and input gradients of `layers` hops over the rank's rows of the item-item kNN graph
    (built collectively from each rank's own items), inputs and output weights drawn per global id."""
    from promptmm_dist.partition.item_graph import item_knn_operator
    from promptmm_dist.partition.setup import feature_stats
    from promptmm_dist.train.teacher_loop import prepare_features

    rd, world, _graph = setup_rank(spec, num_shards, rank, world_size, "sym", exchange)
    stats = feature_stats(rd) if feature_norm == "standardize" else None
    op = item_knn_operator(rd.plan, world, rd.items, prepare_features(rd.all_features(), feature_norm, stats), k,
                           exchange, chunk_rows or HALO_CHUNK_ROWS)
    x = row_seeded_normal(rd.items, dim, 1, "x_item").requires_grad_()
    y = x
    for _ in range(layers):
        y = op(y)
    (y * row_seeded_normal(rd.items, dim, 2, "w_item")).sum().backward()
    pushed = op.push.nnz if op.push is not None else 0  # nonzeros this rank multiplies for its peers
    return {"items": rd.items, "out": y.detach().numpy(), "grad": x.grad.numpy(), "nnz": op.nnz + pushed,
            "pieces": op.n_pieces, "rows_received_per_hop": op.rows_received}


def teacher_curve_rank(rank: int, world_size: int, spec: dict, num_shards: int, cfg_dict: dict) -> dict:
    """Train the teacher for cfg.teacher.epochs on this rank's partition (shards built in-process) and
    return its per-epoch history (loss parts reduced over ranks, validation metrics)."""
    from pathlib import Path

    from promptmm_dist.config import config_from_dict
    from promptmm_dist.data.shards import ShardState
    from promptmm_dist.distill.local_kd import epoch_seed
    from promptmm_dist.partition.plan import rank_shards
    from promptmm_dist.partition.setup import build_rank_teacher
    from promptmm_dist.train.teacher_loop import fit_teacher, steps_per_epoch
    from promptmm_dist.data.sampling import SampleBatch, join_steps

    cfg = config_from_dict(cfg_dict)
    rd, world, graph = setup_rank(spec, num_shards, rank, world_size, cfg.teacher.norm, cfg.dist.exchange)
    teacher = build_rank_teacher(rd, cfg, None)
    parquet = str(Path(spec["dir"]) / "interactions.parquet")
    mine = rank_shards(num_shards, rank, world_size)
    shards = {k: ShardState(parquet, k, num_shards, spec["n_users"], spec["n_items"]) for k in mine}
    pairs = torch.tensor([float(sum(s.sampler.n_pairs for s in shards.values()))], dtype=torch.float64)
    total_pairs = int(world.all_reduce_sum(pairs).item())
    n_steps = steps_per_epoch(total_pairs, cfg.teacher.batch_size)

    def steps(epoch: int) -> list[SampleBatch]:
        parts = [shards[k].epoch_samples(1, epoch_seed(cfg.seed, epoch), n_steps) for k in mine]
        return [SampleBatch(*rd.local_ids(b.users, b.items)) for b in join_steps(parts, n_steps)]

    result = fit_teacher(rd.local, cfg, teacher, graph, steps, total_pairs, world=world, log=lambda _: None)
    held = {name: tuple(p.shape) for name, p in teacher.named_parameters()}
    full = world.full_state_dict(teacher.state_dict())  # one gather (rank 0 gets whole tables)
    first = steps(0)[0]
    distinct = world.distinct_items(torch.from_numpy(np.asarray(first.items[:, :2], dtype=np.int64)), rd.plan.n_items)
    return {"history": result.history, "n_steps": n_steps, "shapes": held, "users": rd.users, "items": rd.items,
            "full_user_rows": None if full is None else int(full["user_emb.weight"].shape[0]),
            "distinct_items_step0": int(len(distinct))}
