"""Fail fast, with one line, when the Ray cluster cannot run what was asked: an address nobody
answers on (ray.init would retry "Failed to connect to GCS" for a minute or more) and more Train
workers than the cluster has CPUs (they would each start on a sliver of a CPU)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from promptmm_dist.errors import ConfigError

CONNECT_TIMEOUT_S = 5.0


def host_port(address: str) -> tuple[str, int] | None:
    """`host:port`, `ray://host:port` or `http(s)://host:port` -> (host, port); None when there is no
    port to probe (`auto`, `local`, a bare host): Ray resolves those itself."""
    if address in ("auto", "local") or not address.strip():
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"Ray address {address!r}: the port is not a number") from None
    if parts.hostname is None or port is None:
        return None
    return parts.hostname, port


def check_reachable(address: str, source: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connect to the GCS (or Ray client) port before ray.init; ConfigError when it fails."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except socket.timeout:
        raise ConfigError(f"{source} {address}: no answer within {timeout_s:g} s "
                          "(is the Ray head running and the port open?)") from None
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(f"{source} {address}: cannot reach the Ray cluster ({reason}; "
                          "is the Ray head running there?)") from None


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask on Linux), about what a local Ray detects."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_workers_fit(num_workers: int, cluster_cpus: float) -> None:
    """Rule: at most one Train worker per CPU of the cluster (each then gets a real share once the
    shard and teacher actors have their 0.1-0.25 CPU)."""
    if num_workers > cluster_cpus:
        raise ConfigError(f"--num-workers {num_workers}: the Ray cluster has {cluster_cpus:g} CPUs and each "
                          f"Train worker needs at least one; use --num-workers {max(int(cluster_cpus), 0)} "
                          "or fewer (0 = the Train loop in the driver), or add nodes")


def check_gpus_fit(num_workers: int, cluster_gpus: float) -> None:
    """Rule for `dist.use_gpu`: one GPU per Train worker, and at least one worker (GPUs are given to
    Train ranks; the driver loop, `--num-workers 0`, stays on the CPU). Without it Ray would wait
    forever for GPUs the cluster does not have."""
    if num_workers < 1:
        raise ConfigError("dist.use_gpu=true needs --num-workers >= 1 (each Train worker gets one GPU; "
                          "--num-workers 0 runs the loop in the driver, on the CPU)")
    if num_workers > cluster_gpus:
        raise ConfigError(f"dist.use_gpu=true with --num-workers {num_workers}: the Ray cluster has "
                          f"{cluster_gpus:g} GPUs (one per Train worker); use --num-workers "
                          f"{max(int(cluster_gpus), 0)} or fewer, add GPU nodes, or drop dist.use_gpu")
