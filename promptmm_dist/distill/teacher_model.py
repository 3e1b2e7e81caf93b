"""The TeacherModel actor: the one process of a student stage that holds the frozen teacher. Per cache
version it computes the teacher's final embeddings once and returns them as blocks (each shard's
user rows, and the item table), and it runs the prompt rounds that make new versions. The soft
rankings themselves are made from those blocks by the light TeacherWorkers (`teacher_workers.py`).

It *returns* its results; the driver that called it owns the object refs, so the blocks live as long
as the driver keeps the refs and no longer.

Every call is idempotent: it names the cache version it serves and carries that version's prompt
(`PromptState`), so a TeacherModel restarted by Ray (`max_restarts`, rebuilt from the canonical files
and the checkpoint) and a call retried on it (`max_task_retries`, which also lets Ray rebuild a lost
block by re-running the call) give exactly what the lost one would have given.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptmm_dist.actor_calls import ActorInfo
from promptmm_dist.config import Config, config_from_dict
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch, TrainSampler
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.models.teacher import PromptMMTeacher, TeacherOutput
from promptmm_dist.run_io import load_state
from promptmm_dist.train.steps import SoftRanking, soft_ranking


@dataclass
class PromptState:
    """The prompt of one cache version: parameters and the prompt optimiser's state (a round steps
    the prompt with Adam, so the next round depends on its moments too)."""

    version: int
    state: dict | None  # None: the teacher checkpoint's prompt (version 0)
    optimizer: dict | None = None


def user_block(out: TeacherOutput, shard: int, num_shards: int) -> dict:
    """Shard `shard`'s user rows (users shard, shard + N, ...: row u // N) of the fused and modality tables."""
    rows = slice(shard, None, num_shards)
    return {"user": out.user[rows].numpy().copy(), "modal": {m: h[rows].numpy().copy() for m, h in out.modal_user.items()},
            "shard": shard, "num_shards": num_shards}


def item_block(out: TeacherOutput) -> dict:
    """The item side of the fused and modality tables (every shard's samples index any item)."""
    return {"item": out.item.numpy().copy(), "modal": {m: h.numpy().copy() for m, h in out.modal_item.items()}}


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


def load_canonical(spec: dict) -> InteractionData:
    """The dataset of a spec (`partition.setup.dataset_spec`) from its canonical folder."""
    from promptmm_dist.data.formats import load_dataset

    return load_dataset(spec["dir"], modalities=spec.get("modalities"))


class TeacherModel(ActorInfo):
    """The frozen teacher (eval mode); its forward is computed once per cache version."""

    def __init__(self, data: InteractionData | dict, cfg_dict: dict, checkpoint: str, threads: int | None = None) -> None:
        """`data`: the dataset, or a dataset spec (paths and sizes) to read it from its canonical files,
        which is what a Ray run passes (the driver ships no rows, and a restart needs no driver object).
        `threads`: torch intra-op threads; None = the CPUs Ray reserved for this actor (`num_cpus`,
        whole CPUs, at least one)."""
        from promptmm_dist.ray_setup import actor_threads
        from promptmm_dist.train.teacher_loop import build_teacher
        from promptmm_dist.paths import hard_token_dir

        self.threads = max(1, threads) if threads is not None else actor_threads()
        torch.set_num_threads(self.threads)
        self.cfg: Config = config_from_dict(cfg_dict)
        self.data = data = data if isinstance(data, InteractionData) else load_canonical(data)
        self.graph = GraphPropagator.from_train(data.train_csr, self.cfg.teacher.norm)
        self.teacher: PromptMMTeacher = build_teacher(data, self.cfg, cache_folder=hard_token_dir())
        self.teacher.load_state_dict(load_state(Path(checkpoint)))
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.version = 0
        self._out: TeacherOutput | None = None
        self.forwards = 0
        self._sampler: TrainSampler | None = None
        self._prompt_opt = torch.optim.Adam(self.teacher.prompt.parameters(), lr=self.cfg.prompt.lr)
        self._rounds_from = 0  # the version whose optimiser state `_prompt_opt` holds (-1: unknown)
        self._initial = {k: v.detach().clone() for k, v in self.teacher.prompt.state_dict().items()}

    def _output(self) -> TeacherOutput:
        if self._out is None:
            self.teacher.eval()
            with torch.no_grad():
                self._out = self.teacher(self.graph)
            self.forwards += 1
        return self._out

    def forward_count(self) -> int:
        """Whole-graph teacher forwards this actor computed (one per cache version it served)."""
        return self.forwards

    def _serve(self, version: int, prompt: PromptState | None) -> None:
        """Hold `version`'s prompt: adopt `prompt` when given and different; else insist on `version`."""
        if prompt is not None and prompt.version != self.version:
            self.load_prompt(prompt.state, prompt.version, prompt.optimizer)
        if version != self.version:
            raise RuntimeError(f"the teacher model holds prompt version {self.version}, asked for {version}")

    def soft_ranking(self, version: int, samples: SampleBatch, prompt: PromptState | None = None) -> SoftRanking:
        """Teacher logits for a shard's epoch samples under cache `version` (whose prompt `prompt` is,
        for versions > 0: a restarted model starts from the checkpoint's prompt, version 0)."""
        self._serve(version, prompt)
        return soft_ranking(self._output(), np.asarray(samples.users), np.asarray(samples.items))

    def version_tables(self, version: int, prompt: PromptState | None, num_shards: int) -> tuple[dict, ...]:
        """Cache `version`'s final embeddings as N + 1 blocks: shard k's user rows (`user_block`) for
        k < N, then the item table (`item_block`). Called with `num_returns=N + 1`, so each block is its
        own object and a TeacherWorker reads only the blocks of the shard it ranks."""
        self._serve(version, prompt)
        out = self._output()
        return (*(user_block(out, k, num_shards) for k in range(num_shards)), item_block(out))

    def item_block(self, version: int, prompt: PromptState | None = None) -> dict:
        """The item block of cache `version` alone (the Tune shared cache's embedding-KD tables)."""
        self._serve(version, prompt)
        return item_block(self._output())

    def prompt_round(self, student: tuple[np.ndarray, np.ndarray, dict | None], seed: int,
                     base: PromptState | None = None) -> dict:
        """Step the prompt against the current student, starting from `base` (the current version's
        prompt; None: what the model holds); returns the new prompt state and a summary. A pure
        function of (teacher checkpoint, base, student, seed): dropout draws from `seed` too."""
        t0 = time.perf_counter()
        if base is not None and (base.version != self.version or self._rounds_from != base.version):
            self.load_prompt(base.state, base.version, base.optimizer)
        user, item, projector_state = student
        # no projector state = the student's nn.Identity projector (d_S = d): embedding KD still applies
        projector: torch.nn.Module = torch.nn.Identity()
        if projector_state:
            w = torch.as_tensor(np.asarray(projector_state["weight"]))
            projector = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            projector.weight.data.copy_(w)
        if self._sampler is None:
            self._sampler = TrainSampler(self.data.train_csr)
        # copies: the embeddings arrive read-only from the object store (torch warns on those)
        info = prompt_round(self.teacher, self.graph, torch.tensor(np.asarray(user)),
                            torch.tensor(np.asarray(item)), projector, self._sampler, self.cfg, seed,
                            optimizer=self._prompt_opt)
        state = {k: v.detach().clone() for k, v in self.teacher.prompt.state_dict().items()}
        self.version += 1
        self._rounds_from = self.version
        self._out = None
        return {"state": state, "version": self.version, "round_s": time.perf_counter() - t0,
                "optimizer": copy.deepcopy(self._prompt_opt.state_dict()), **info}

    def load_prompt(self, state: dict | None, version: int, optimizer: dict | None = None) -> int:
        """Adopt the prompt of a version made before (e.g. the one a lost TeacherModel held); `state`
        None: the checkpoint's prompt; `optimizer`: the prompt optimiser's state, for the next round."""
        self.teacher.prompt.load_state_dict(self._initial if state is None else state)
        self._prompt_opt = torch.optim.Adam(self.teacher.prompt.parameters(), lr=self.cfg.prompt.lr)
        if optimizer is not None:
            self._prompt_opt.load_state_dict(optimizer)
        # a fresh optimiser is exactly version 0's (no round yet)
        self._rounds_from = version if optimizer is not None or version == 0 else -1
        self.version = version
        self._out = None
        return version
