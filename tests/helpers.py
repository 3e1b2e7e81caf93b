"""Small datasets and configs shared by tests (importable from test modules only)."""

from __future__ import annotations

from promptmm_dist.config import Config
from promptmm_dist.data.synthetic import generate_synthetic


def tiny_data(seed: int = 0, modalities: dict[str, int] | None = None):
    return generate_synthetic(300, 150, 4000, modalities or {"image": 16, "text": 8}, seed=seed)


def tiny_config(**student) -> Config:
    cfg = Config()
    cfg.teacher.embed_dim = 16
    cfg.teacher.epochs = 3
    cfg.teacher.batch_size = 512
    cfg.student.embed_dim = 16
    cfg.student.epochs = 3
    cfg.student.batch_size = 512
    cfg.student.neg_sample_num = 4
    for k, v in student.items():
        setattr(cfg.student, k, v)
    return cfg
