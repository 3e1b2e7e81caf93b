"""In-process KD sources: the same contract as the Ray cache, for the local single-process mode,
the no-KD baseline, and the 'online' teacher of the cache benchmark."""

from __future__ import annotations

import numpy as np
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import SampleBatch, TrainSampler
from promptmm_dist.distill.prompt_rounds import prompt_round
from promptmm_dist.models.teacher import PromptMMTeacher, TeacherOutput
from promptmm_dist.train.steps import SoftRanking, soft_ranking
from promptmm_dist.train.teacher_loop import steps_per_epoch


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """Sampling seed of (run seed, epoch): identical wherever the samples are drawn (the pair itself
    keys each draw, so every shard uses the epoch's one seed); `stream` separates other uses."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def student_steps(sampler: TrainSampler, cfg: Config) -> int:
    return steps_per_epoch(sampler.n_pairs, cfg.student.batch_size)


class NoKD:
    """Plain BPR samples (the LightGCN / MF baselines)."""

    def __init__(self, sampler: TrainSampler, cfg: Config) -> None:
        self.sampler, self.cfg = sampler, cfg

    def epoch(self, epoch: int):
        s = self.sampler.epoch(1, epoch_seed(self.cfg.seed, epoch), student_steps(self.sampler, self.cfg))
        empty = np.zeros(0, dtype=np.float32)
        return SoftRanking(s.users, s.items, {}, empty, empty, step_ends=s.step_ends), None, False

    def after_epoch(self, epoch, user_emb, item_emb):
        return None


class InProcessTeacherKD:
    """The frozen teacher in this process. `online=False` computes one forward per cache version
    (what the Ray cache does); `online=True` recomputes it at every epoch like the authors' code does
    at every step (the benchmark's reference point)."""

    def __init__(self, teacher: PromptMMTeacher, graph: GraphPropagator, sampler: TrainSampler,
                 cfg: Config, student=None) -> None:
        self.teacher, self.graph, self.sampler, self.cfg = teacher, graph, sampler, cfg
        self.student = student  # for the projector used in prompt rounds
        self.version = 0
        self._out: TeacherOutput | None = None
        self._prompt_opt = torch.optim.Adam(teacher.prompt.parameters(), lr=cfg.prompt.lr)
        for p in teacher.parameters():
            p.requires_grad_(False)

    def teacher_output(self) -> TeacherOutput:
        if self._out is None:
            self.teacher.eval()  # dropout off while producing KD targets
            with torch.no_grad():
                self._out = self.teacher(self.graph)
        return self._out

    def samples(self, epoch: int) -> SampleBatch:
        return self.sampler.epoch(self.cfg.student.neg_sample_num, epoch_seed(self.cfg.seed, epoch),
                                  student_steps(self.sampler, self.cfg))

    def epoch(self, epoch: int):
        s = self.samples(epoch)
        out = self.teacher_output()
        ranking = soft_ranking(out, s.users, s.items, step_ends=s.step_ends)
        return ranking, dict(out.modal_item), True

    def after_epoch(self, epoch: int, user_emb: torch.Tensor, item_emb: torch.Tensor):
        every = self.cfg.prompt.refresh_epochs
        if every <= 0 or (epoch + 1) % every != 0:
            return None
        info = prompt_round(self.teacher, self.graph, user_emb, item_emb,
                            getattr(self.student, "projector", None), self.sampler, self.cfg,
                            seed=epoch_seed(self.cfg.seed + 1, epoch), optimizer=self._prompt_opt)
        self.version += 1
        self._out = None
        return {**info, "cache_version": self.version}

    def state_dict(self) -> dict:
        """What prompt rounds changed (prompt, its optimiser, cache version): saved with each epoch so
        a resumed student sees the same teacher."""
        return {"prompt": self.teacher.prompt.state_dict(), "prompt_opt": self._prompt_opt.state_dict(),
                "cache_version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.prompt.load_state_dict(state["prompt"])
        self._prompt_opt.load_state_dict(state["prompt_opt"])
        self.version = int(state["cache_version"])
        self._out = None


class _OnlineRanking:
    """Samples whose teacher logits are computed when a mini-batch is sliced: one full teacher
    forward per optimiser step, as the authors' code does."""

    def __init__(self, kd: "OnlineTeacherKD", samples: SampleBatch) -> None:
        self.kd, self.users, self.items = kd, samples.users, samples.items
        self.step_ends = samples.step_ends

    def __len__(self) -> int:
        return len(self.users)

    step_bounds = SoftRanking.step_bounds

    def slice(self, start: int, stop: int) -> SoftRanking:
        self.kd.teacher.eval()
        with torch.no_grad():
            out = self.kd.teacher(self.kd.graph)
        return soft_ranking(out, self.users[start:stop], self.items[start:stop])


class OnlineTeacherKD(InProcessTeacherKD):
    """Reference point for the cache benchmark: no cache, the teacher runs at every step."""

    def epoch(self, epoch: int):
        return _OnlineRanking(self, self.samples(epoch)), dict(self.teacher_output().modal_item), True
