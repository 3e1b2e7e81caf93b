"""Where things live: the real datasets beside the repository, and cache folders.

The real research data is never part of the repository. It is found, in order, at
$PROMPTMM_DATA_DIR, or in the `shared/data` folder next to the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Folder holding the real datasets (tiktok/, lastfm2k/); may not exist on a user's clone."""
    env = os.environ.get("PROMPTMM_DATA_DIR")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


def real_dataset(name: str) -> Path:
    return shared_data_dir() / name


def cache_dir() -> Path:
    """Per-user cache (synthetic default dataset, PCA hard tokens of read-only datasets)."""
    env = os.environ.get("PROMPTMM_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptmm_dist"
    return base


def hard_token_dir() -> Path:
    """Where the PCA hard tokens of each dataset are cached (computed once per dataset and size)."""
    return cache_dir() / "hard_tokens"
