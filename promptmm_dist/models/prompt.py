"""Soft prompt module (DESIGN 2): fixed hard tokens from item features -> trainable soft prompts.

Hard tokens H_i = mean_m PCA_d(X^m) are computed once per dataset and cached; H_u = D_u^-1 R H_i.
Soft prompts P_u = Linear(H_u), P_i = Linear(H_i) (with dropout) enter the teacher as a feature prompt,
an ID prompt and a prompt BPR term.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
import torch.nn.functional as F

from promptmm_dist.models.row_dropout import RowDropout

from promptmm_dist.data.graph import row_normalized


def pca_project(x: np.ndarray, dim: int) -> np.ndarray:
    """Rows of x projected on their top-`dim` principal components (zero-padded if rank < dim)."""
    x = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(dim, vt.shape[0])
    z = x @ vt[:k].T
    z /= max(float(s[0]) / np.sqrt(len(x)), 1e-12)  # scale-free: largest component has unit RMS
    if k < dim:
        z = np.concatenate([z, np.zeros((len(x), dim - k))], axis=1)
    return z.astype(np.float32)


def hard_tokens(features: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """H_i = mean over modalities of PCA_d(X^m): (I, dim) float32."""
    return np.mean([pca_project(x, dim) for x in features.values()], axis=0).astype(np.float32)


def cached_hard_tokens(features: dict[str, np.ndarray], dim: int, cache_folder: Path | None,
                       dataset_hash: str) -> np.ndarray:
    """Hard tokens, cached as `hard_tokens_d{dim}_{hash}.npy` in cache_folder (atomic write)."""
    if cache_folder is None or not dataset_hash:
        return hard_tokens(features, dim)
    key = hashlib.sha256(f"{dataset_hash}:{sorted(features)}:{dim}".encode()).hexdigest()[:16]
    path = Path(cache_folder) / f"hard_tokens_d{dim}_{key}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    tokens = hard_tokens(features, dim)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, tokens, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only cache: recompute next time
    return tokens


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


class PromptModule(nn.Module):
    """Trainable soft prompts from fixed hard tokens.

    Kept as its own module so the student stage can step it (prompt rounds) with the teacher frozen.
    """

    def __init__(self, item_tokens: np.ndarray, train_csr: sp.csr_matrix, dropout: float = 0.1,
                 items: np.ndarray | None = None, users: np.ndarray | None = None) -> None:
        """`item_tokens`: all items' hard tokens (I, d); `train_csr`: the training rows of the users this
        process holds (columns: all items); `items`/`users`: the ids of the items/users it holds
        (default: all; dropout masks are keyed by them)."""
        super().__init__()
        dim = item_tokens.shape[1]
        own = item_tokens if items is None else item_tokens[items]
        h_i = torch.from_numpy(np.ascontiguousarray(own, dtype=np.float32))
        h_u = torch.from_numpy(np.asarray(row_normalized(train_csr) @ item_tokens, dtype=np.float32))
        self.register_buffer("user_tokens", h_u, persistent=False)
        self.register_buffer("item_tokens", h_i, persistent=False)
        ids = lambda given, n: torch.as_tensor(np.arange(n) if given is None else np.asarray(given), dtype=torch.int64)  # noqa: E731
        self.register_buffer("user_ids", ids(users, h_u.shape[0]), persistent=False)
        self.register_buffer("item_ids", ids(items, h_i.shape[0]), persistent=False)
        self.user_linear = nn.Linear(dim, dim)
        self.item_linear = nn.Linear(dim, dim)
        self.dropout = RowDropout(dropout)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_u (U, d), P_i (I, d))."""
        return (self.dropout(self.user_linear(self.user_tokens), self.user_ids),
                self.dropout(self.item_linear(self.item_tokens), self.item_ids))

    @staticmethod
    def feature_prompt(x: torch.Tensor, p_items: torch.Tensor, rate: float,
                       sum_items: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       scale: str = "unit") -> torch.Tensor:
        """X~ = X + rate * norm(P_i (P_i^T X)): the prompt re-weights the modality features.
        P_i^T X sums over all items: `sum_items` completes it when this process holds only some rows.
        `scale="row"` multiplies each prompt row by its feature row's norm (rate = relative change)."""
        if rate == 0.0:
            return x
        mixed = p_items.t() @ x
        if sum_items is not None:
            mixed = sum_items(mixed)
        step = l2norm(p_items @ mixed)
        if scale == "row":
            step = step * x.norm(dim=1, keepdim=True)
        return x + rate * step
