"""The frozen teacher of a student stage, partitioned: `TeacherRank` r of W holds what rank r of a
Train stage holds (its users', items' and adjacency rows, its items' features, its rows of the
teacher's tables; `partition.setup`), so no process holds the whole graph or the whole teacher.
Per cache version the W ranks compute the teacher's final embeddings once, together (one partitioned
forward), and return them as blocks: rank r each of its shards' user rows (`user_block`), rank 0 also
the item table (items are the small side, gathered). They run the prompt rounds that
make new versions the same way: each rank steps the replicated prompt on its share of the batch.

They *return* their results; the driver that called them owns the object refs, so the blocks live as
long as the driver keeps the refs and no longer. `distill.teacher_group.TeacherGroup` is the driver's
handle on the W ranks (start, calls, restart of the whole group when one dies).

Every call is idempotent: it names the cache version it serves and carries that version's prompt
(`PromptState`), so a group started again (rebuilt from the canonical files and the checkpoint) gives
exactly what the lost one would have given.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptmm_dist.actor_calls import ActorInfo
from promptmm_dist.config import Config, config_from_dict
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.models.teacher import PromptMMTeacher, TeacherOutput
from promptmm_dist.train.steps import gather_item_side


@dataclass
class PromptState:
    """The prompt of one cache version: parameters and the prompt optimiser's state (a round steps
    the prompt with Adam, so the next round depends on its moments too)."""

    version: int
    state: dict | None  # None: the teacher checkpoint's prompt (version 0)
    optimizer: dict | None = None


def user_block(out: TeacherOutput, plan, shard: int) -> dict:
    """Shard `shard`'s user rows (users shard, shard + N, ...: row u // N) of the fused and modality
    tables, from the rank's rows (`out`) that hold them."""
    rows = shard_rows(plan, shard)
    return {"user": out.user[rows].numpy().copy(), "modal": {m: h[rows].numpy().copy() for m, h in out.modal_user.items()},
            "shard": shard, "num_shards": plan.num_shards}


def rows_from_blocks(user_blocks: dict[int, dict], items: dict, users: np.ndarray,
                     item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fused rows of `users` (each in the block of its shard, `user_blocks` keyed by shard) and of
    `item_ids`: a rank's part of the teacher tables, read from the blocks of its own shards."""
    out = np.full((len(users), items["item"].shape[1]), np.nan, np.float32)
    for k, block in user_blocks.items():
        sel = users % block["num_shards"] == k
        out[sel] = np.asarray(block["user"])[users[sel] // block["num_shards"]]
    if np.isnan(out).any():
        raise ValueError("rows_from_blocks: some users belong to shards whose blocks were not given")
    return out, np.asarray(items["item"])[item_ids]


def shard_rows(plan, shard: int) -> slice:
    """The local rows of shard `shard`'s users on their rank (users shard, shard + N, ..: row u // N)."""
    from promptmm_dist.partition.plan import shard_size

    start = int(plan.shard_offset[shard])
    return slice(start, start + shard_size(plan.n_users, shard, plan.num_shards))


def load_canonical(spec: dict) -> InteractionData:
    """The dataset of a spec (`partition.setup.dataset_spec`) from its canonical folder."""
    from promptmm_dist.data.formats import load_dataset

    return load_dataset(spec["dir"], modalities=spec.get("modalities"))


class TeacherRank(ActorInfo):
    """Rank `rank` of the frozen teacher (eval mode); its forward is computed once per cache version.

    With `world_size` 1 it is ready when built (one process: the whole teacher, as in a one-worker
    stage); with more, `join` sets up the process group and the rank's share (every rank at once)."""

    def __init__(self, spec: dict, cfg_dict: dict, checkpoint: str, num_shards: int, rank: int = 0,
                 world_size: int = 1, threads: int | None = None) -> None:
        """`spec`: the dataset spec (paths and sizes: the driver ships no rows, and a restart needs no
        driver object). `threads`: torch intra-op threads; None = the CPUs Ray reserved for this actor
        (`num_cpus`, whole CPUs, at least one)."""
        from promptmm_dist.ray_setup import actor_threads

        self.threads = max(1, threads) if threads is not None else actor_threads()
        torch.set_num_threads(self.threads)
        self.spec, self.checkpoint, self.num_shards = spec, checkpoint, num_shards
        self.rank, self.world_size = rank, world_size
        self.cfg: Config = config_from_dict(cfg_dict)
        self.version = 0
        self._out: TeacherOutput | None = None
        self._items: dict | None = None
        self.forwards = 0
        self._sampler: TrainSampler | None = None
        self.teacher: PromptMMTeacher | None = None
        if world_size == 1:
            self._build()

    def address(self) -> tuple[str, int]:
        """Where the group's rendezvous listens (asked of rank 0): this node's address and a free port."""
        import ray

        from promptmm_dist.partition.group import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, address: str, port: int, timeout_s: float) -> int:
        """Join the group's gloo process group and set up this rank's share (collective); its pid."""
        import datetime
        import os

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self._build()
        return os.getpid()

    def _build(self) -> None:
        from promptmm_dist.partition.setup import build_rank_teacher, setup_rank
        from promptmm_dist.paths import hard_token_dir
        from promptmm_dist.run_io import load_rows_of

        self.rd, self.world, self.graph = setup_rank(self.spec, self.num_shards, self.rank, self.world_size,
                                                     self.cfg.teacher.norm, self.cfg.dist.exchange)
        teacher = build_rank_teacher(self.rd, self.cfg, hard_token_dir())
        # only this rank's rows of the checkpoint's tables are read (from its row pieces, or mapped)
        teacher.load_state_dict(load_rows_of(Path(self.checkpoint), self.world))
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self._prompt_opt = torch.optim.Adam(teacher.prompt.parameters(), lr=self.cfg.prompt.lr)
        self._rounds_from = 0  # the version whose optimiser state `_prompt_opt` holds (-1: unknown)
        self._initial = {k: v.detach().clone() for k, v in teacher.prompt.state_dict().items()}

    def _output(self) -> TeacherOutput:
        """This version's forward (collective), with the item side gathered in global id order."""
        if self._out is None:
            self.teacher.eval()
            with torch.no_grad():
                out = self.teacher(self.graph)
                whole = gather_item_side(out, None, self.graph)[0]  # collective: every rank takes part
            if self.rank == 0:  # the item block is rank 0's to return
                back = torch.from_numpy(self.rd.plan.item_pos)  # global id -> gathered position
                self._items = {"item": whole.item[back].numpy(),
                               "modal": {m: h[back].numpy() for m, h in whole.modal_item.items()}}
            self._out = out
            self.forwards += 1
        return self._out

    def forward_count(self) -> int:
        """Teacher forwards this rank computed (one per cache version it served)."""
        return self.forwards

    def _serve(self, version: int, prompt: PromptState | None) -> None:
        """Hold `version`'s prompt: adopt `prompt` when given and different; else insist on `version`."""
        if prompt is not None and prompt.version != self.version:
            self.load_prompt(prompt.state, prompt.version, prompt.optimizer)
        if version != self.version:
            raise RuntimeError(f"the teacher holds prompt version {self.version}, asked for {version}")

    def version_tables(self, version: int, prompt: PromptState | None, num_shards: int):
        """Cache `version`'s final embeddings (collective): a small status dict, then the user block of
        each shard this rank owns (`user_block`, in shard order), then on rank 0 the item block. Called
        with `num_returns` = their count, so each block is its own object and a TeacherWorker reads
        only the blocks of the shard it ranks; the driver reads only the status."""
        from promptmm_dist.partition.plan import rank_shards

        if num_shards != self.num_shards:
            raise ValueError(f"the teacher is partitioned over {self.num_shards} shards, asked for {num_shards}")
        self._serve(version, prompt)
        out = self._output()
        mine = rank_shards(num_shards, self.rank, self.world_size)
        blocks = [user_block(out, self.rd.plan, k) for k in mine]
        status = {"rank": self.rank, "version": version, "shards": mine, "users": self.rd.n_users,
                  "items": self.rd.n_items, "forwards": self.forwards}
        return (status, *blocks, *([self._items] if self.rank == 0 else []))

    def prompt_round(self, student: tuple[np.ndarray, np.ndarray, dict | None], seed: int,
                     base: PromptState | None = None) -> dict:
        """Step the prompt against the current student (collective), starting from `base` (the current
        version's prompt; None: what the rank holds); returns the new prompt state and a summary.
        `student`: the student's rows that this rank's partition holds (user rows, item rows, projector
        state), as student rank r hands them in. A pure function of (teacher checkpoint, base, student,
        seed, world size): dropout draws from `seed` too."""
        t0 = time.perf_counter()
        if base is not None and (base.version != self.version or self._rounds_from != base.version):
            self.load_prompt(base.state, base.version, base.optimizer)
        user, item, projector_state = student
        if len(user) != self.rd.n_users or len(item) != self.rd.n_items:
            raise ValueError(f"teacher rank {self.rank}: the student's rows ({len(user)} users, {len(item)} "
                             f"items) are not this partition's ({self.rd.n_users}, {self.rd.n_items})")
        # no projector state = the student's nn.Identity projector (d_S = d): embedding KD still applies
        projector: torch.nn.Module = torch.nn.Identity()
        if projector_state:
            w = torch.as_tensor(np.asarray(projector_state["weight"]))
            projector = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            projector.weight.data.copy_(w)
        if self._sampler is None:
            self._sampler = self._round_sampler()
        # this version's tables are done with (the blocks live in the object store): the round's
        # forwards with autograd need the room
        self._out = self._items = None
        with warnings.catch_warnings():  # read-only object-store rows, never written (the round detaches them)
            warnings.simplefilter("ignore", UserWarning)
            s_user, s_item = torch.from_numpy(np.asarray(user)), torch.from_numpy(np.asarray(item))
        info = prompt_round(self.teacher, self.graph, s_user, s_item, projector, self._sampler, self.cfg, seed,
                            optimizer=self._prompt_opt, world=self.world, item_pos=self.rd.plan.item_pos)
        state = {k: v.detach().clone() for k, v in self.teacher.prompt.state_dict().items()}
        self.version += 1
        self._rounds_from = self.version
        self._out = None
        return {"state": state, "version": self.version, "round_s": time.perf_counter() - t0,
                "optimizer": copy.deepcopy(self._prompt_opt.state_dict()), **info}

    def _round_sampler(self) -> TrainSampler:
        """The training pairs of this rank's users (local rows, keyed by their global ids)."""
        from promptmm_dist.partition.setup import rank_train_rows

        return TrainSampler(rank_train_rows(self.rd).tocsr(), row_ids=self.rd.users)

    def load_prompt(self, state: dict | None, version: int, optimizer: dict | None = None) -> int:
        """Adopt the prompt of a version made before (e.g. the one a lost group held); `state` None:
        the checkpoint's prompt; `optimizer`: the prompt optimiser's state, for the next round."""
        self.teacher.prompt.load_state_dict(self._initial if state is None else state)
        self._prompt_opt = torch.optim.Adam(self.teacher.prompt.parameters(), lr=self.cfg.prompt.lr)
        if optimizer is not None:
            self._prompt_opt.load_state_dict(optimizer)
        # a fresh optimiser is exactly version 0's (no round yet)
        self._rounds_from = version if optimizer is not None or version == 0 else -1
        self.version = version
        self._out = None
        return version
