"""TeacherWorker actors: load the teacher checkpoint once, then turn shard samples into soft
rankings (the cache entries) and run prompt rounds.

Workers *return* their results; the driver that called them owns the object refs, so the cache
lives as long as the driver keeps the refs and no longer.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from promptmm_dist.config import Config, config_from_dict
from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch, TrainSampler
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.models.teacher import PromptMMTeacher, TeacherOutput
from promptmm_dist.run_io import load_state
from promptmm_dist.train.steps import SoftRanking, soft_ranking


class TeacherWorker:
    """One frozen teacher (eval mode) per worker; forward computed once per cache version."""

    def __init__(self, data: InteractionData, cfg_dict: dict, checkpoint: str, threads: int = 1) -> None:
        from promptmm_dist.train.teacher_loop import build_teacher
        from promptmm_dist.pipeline import hard_token_cache

        torch.set_num_threads(max(1, threads))
        self.cfg: Config = config_from_dict(cfg_dict)
        self.data = data
        self.graph = GraphPropagator.from_train(data.train_csr, self.cfg.teacher.norm)
        self.teacher: PromptMMTeacher = build_teacher(data, self.cfg, cache_folder=hard_token_cache(self.cfg))
        self.teacher.load_state_dict(load_state(Path(checkpoint)))
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.version = 0
        self._out: TeacherOutput | None = None
        self._sampler: TrainSampler | None = None
        self._prompt_opt = torch.optim.Adam(self.teacher.prompt.parameters(), lr=self.cfg.prompt.lr)

    def _output(self) -> TeacherOutput:
        if self._out is None:
            self.teacher.eval()
            with torch.no_grad():
                self._out = self.teacher(self.graph)
        return self._out

    def soft_ranking(self, version: int, samples: SampleBatch) -> SoftRanking:
        """Teacher logits for a shard's epoch samples under cache `version`."""
        if version != self.version:
            raise RuntimeError(f"teacher worker holds prompt version {self.version}, asked for {version}")
        return soft_ranking(self._output(), np.asarray(samples.users), np.asarray(samples.items))

    def item_modal_embeddings(self, version: int) -> dict[str, np.ndarray]:
        """Teacher item modality embeddings h^m_i (one shared object per version, for embedding KD)."""
        if version != self.version:
            raise RuntimeError(f"teacher worker holds prompt version {self.version}, asked for {version}")
        return {m: h.numpy().copy() for m, h in self._output().modal_item.items()}

    def final_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Fused teacher embeddings (for the explicit `init_from_teacher` option)."""
        out = self._output()
        return out.user.numpy().copy(), out.item.numpy().copy()

    def prompt_round(self, student: tuple[np.ndarray, np.ndarray, dict | None], seed: int) -> dict:
        """Step the prompt against the current student; returns the new prompt state and a summary."""
        t0 = time.perf_counter()
        user, item, projector_state = student
        projector = None
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
        self._out = None
        return {"state": state, "version": self.version, "round_s": time.perf_counter() - t0, **info}

    def load_prompt(self, state: dict, version: int) -> int:
        """Adopt the prompt another worker stepped (all workers serve the same cache version)."""
        self.teacher.prompt.load_state_dict(state)
        self.version = version
        self._out = None
        return version
