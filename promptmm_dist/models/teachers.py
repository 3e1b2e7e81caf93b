"""Teacher backbones: one interface (TeacherOutput: fused and per-modality user/item embeddings plus
the prompts), so the student and the KD losses never depend on which one trained."""

from __future__ import annotations

from promptmm_dist.models.contrastive_teacher import ContrastiveTeacher
from promptmm_dist.models.freedom_teacher import FreedomTeacher
from promptmm_dist.models.teacher import PromptMMTeacher

TEACHERS: dict[str, type[PromptMMTeacher]] = {
    "promptmm": PromptMMTeacher,  # the paper's teacher
    "freedom": FreedomTeacher,  # + frozen item-item kNN graphs from the modality features
    "contrastive": ContrastiveTeacher,  # + InfoNCE alignment of the ID and modality views
}
