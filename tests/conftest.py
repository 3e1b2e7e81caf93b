"""Shared fixtures: real datasets (skipped with the path when absent) and one Ray session per test run."""

from __future__ import annotations

import os

import pytest

from promptmm_dist.paths import real_dataset

# Faster Ray Train fits on small machines (health checks every 0.2 s, no preemption watcher).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _real(name: str):
    path = real_dataset(name)
    if not path.exists():
        pytest.skip(f"real dataset not found at {path} (set PROMPTMM_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiktok_path():
    return _real("tiktok")


@pytest.fixture(scope="session")
def lastfm_path():
    return _real("lastfm2k")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        from promptmm_dist.ray_setup import LOCAL_SYSTEM_CONFIG

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()
