"""Setting up one rank of a partitioned stage, from a dataset spec the driver passes (paths and sizes,
never rows): read the rank's share, build its graph operators, its world, and the teacher's rows.

The driver side (`dataset_spec`) makes sure the canonical files exist; ranks read them directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.dataset import DatasetInfo, InteractionData
from promptmm_dist.models.prompt import cached_hard_tokens
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.models.teachers import TEACHERS
from promptmm_dist.partition.graph import PartitionedGraph
from promptmm_dist.partition.item_graph import item_knn_operator
from promptmm_dist.partition.memory import return_large_blocks_to_the_os
from promptmm_dist.partition.operator import HALO_CHUNK_ROWS
from promptmm_dist.partition.rank_data import RankData, load_rank_data
from promptmm_dist.partition.world import PartitionedWorld
from promptmm_dist.train.teacher_loop import assemble_teacher, prepare_features
from promptmm_dist.train.world import World, control_group


def canonical_folder(data: InteractionData | DatasetInfo, data_path: str, out: Path) -> Path:
    """The canonical dataset folder the ranks and shards read: the source itself when it is one,
    else a copy written once into `<out>/data` (synthetic data, other layouts, subsets)."""
    from promptmm_dist.data.formats import read_manifest
    from promptmm_dist.data.prepare import ensure_canonical

    src = Path(data_path)
    if data_path != "synthetic" and (src / "interactions.parquet").exists():
        try:
            if read_manifest(src).get("content_sha256") in (data.manifest_sha256, None) or not data.manifest_sha256:
                return src
        except Exception:  # noqa: BLE001 - not a readable prepared folder: write our own copy below
            pass
    folder = out / "data"
    ensure_canonical(data, folder)
    return folder


def dataset_spec(data: InteractionData | DatasetInfo, data_path: str, out: Path) -> dict:
    """What a rank needs to find its share: small values only (the driver never ships rows)."""
    folder = canonical_folder(data, data_path, out)
    return {"dir": str(folder.resolve()), "n_users": int(data.n_users), "n_items": int(data.n_items),
            "modalities": list(data.modalities), "name": data.name, "manifest_sha256": data.manifest_sha256}


def setup_rank(spec: dict, num_shards: int, rank: int, world_size: int, norm: str, exchange: str = "cover",
               device: torch.device | None = None, chunk_rows: int = HALO_CHUNK_ROWS,
               ) -> tuple[RankData, PartitionedWorld, PartitionedGraph]:
    """This rank's data, world and graph (collective: every rank of the group calls it). `device`: where
    the rank's tables and row exchanges live (default CPU); setup itself runs on the CPU. `chunk_rows`:
    rows per piece of a hop's halo exchange."""
    return_large_blocks_to_the_os()  # a rank's freed arrays leave the process (partition.memory)
    control_group()  # the CPU group beside NCCL, created by every rank at the same point
    base = World(rank, world_size)
    rd = load_rank_data(spec["dir"], spec["n_users"], spec["n_items"], spec["modalities"], num_shards, base,
                        name=spec.get("name", ""), manifest_sha256=spec.get("manifest_sha256", ""),
                        shard_files=spec.get("shard_files") if len(spec.get("shard_files") or ()) == num_shards else None)
    world = PartitionedWorld(rank, world_size, rd.plan, device)
    rd.world = world
    return rd, world, rd.graph(norm, exchange, chunk_rows)


def feature_stats(rd: RankData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Column mean and sd of every modality over all items, from each rank's rows (sums all-reduced)."""
    out = {}
    for m, x in rd.features.items():
        x64 = x.astype(np.float64)
        vec = torch.from_numpy(np.concatenate([x64.sum(0), (x64 ** 2).sum(0), [float(len(x))]]))
        vec = rd.world.all_reduce_sum(vec).numpy()
        f = x.shape[1]
        n = max(vec[-1], 1.0)
        mu = vec[:f] / n
        sd = np.sqrt(np.maximum(vec[f:2 * f] / n - mu ** 2, 0.0))
        out[m] = (mu[None, :].astype(np.float32), sd[None, :].astype(np.float32))
    return out


def rank_train_rows(rd: RankData) -> sp.csr_matrix:
    """The rank's users' training rows over all items (global item ids)."""
    return sp.csr_matrix((np.ones(len(rd.train_users), np.float32), (rd.train_users, rd.train_items)),
                         shape=(rd.n_users, rd.plan.n_items))


def build_rank_teacher(rd: RankData, cfg: Config, token_cache: str | Path | None) -> PromptMMTeacher:
    """The teacher's rows on this rank: its users and items, its items' features, every item's hard
    tokens (item side: computed once per dataset by rank 0 and cached, then read by all)."""
    def tokens() -> np.ndarray:
        return cached_hard_tokens(rd.all_features(), cfg.teacher.embed_dim, token_cache, rd.local.manifest_sha256)

    if rd.world.rank == 0:
        item_tokens = tokens()
    rd.world.barrier()
    if rd.world.rank != 0:
        item_tokens = tokens()
    stats = feature_stats(rd) if cfg.teacher.feature_norm == "standardize" else None
    features = prepare_features(rd.features, cfg.teacher.feature_norm, stats)
    item_hop = None
    if TEACHERS.get(cfg.teacher.backbone, PromptMMTeacher).uses_item_graph:  # its rows of the kNN graph
        every_item = prepare_features(rd.all_features(), cfg.teacher.feature_norm, stats)
        item_hop = item_knn_operator(rd.plan, rd.world, rd.items, every_item, cfg.teacher.knn_k, cfg.dist.exchange)
        del every_item
    teacher = assemble_teacher(cfg, rd.n_users, rd.n_items, features, item_tokens, rank_train_rows(rd),
                               items=rd.items, users=rd.users, item_hop=item_hop)
    rd.world.init_tables(teacher, cfg.seed)
    return teacher.to(rd.world.device)
