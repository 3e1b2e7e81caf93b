"""A process group without Ray: W local processes on gloo, each running `target(rank, world_size, *args)`.

Used by the exactness checks (tests) and the scale benchmark, which measure the partitioned code
itself; the product runs the same code inside Ray Train workers.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, target: Callable, args: tuple, queue, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = target(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(target: Callable, world_size: int, *args: Any, threads: int = 1, timeout_s: float = 600) -> list[Any]:
    """Run `target` on W spawned ranks; their return values in rank order (an error on any rank raises)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, target, args, queue, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}: {value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(errors[0])
    return [results[r] for r in range(world_size)]
