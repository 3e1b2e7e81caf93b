"""A process group without Ray: W local processes on gloo, each running `target(rank, world_size, *args)`.

Used by the exactness checks (tests) and the scale benchmark, which measure the partitioned code
itself; the product runs the same code inside Ray Train workers.

`emulate_nccl=True` makes the default group behave like NCCL's towards the CPU (the backend reads
"nccl" and a collective on a CPU tensor in the default group raises), so a CPU machine checks that every
collective of the GPU path routes its CPU tensors through the gloo control group
(`train.world.group_for`).
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


COLLECTIVE_CALLS = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_single", "reduce_scatter", "gather",
                    "barrier")


def emulate_nccl_default_group() -> None:
    """In this process: `dist.get_backend()` reads "nccl" and the collectives refuse CPU tensors in the
    default group, as NCCL does (a tensor-less barrier in the default group is refused too)."""
    import torch
    import torch.distributed as dist

    real_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl" if group is None else real_backend(group)

    def guard(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if kwargs.get("group") is None:
                tensors = [a for a in args if torch.is_tensor(a)] + [
                    t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
                if name == "barrier" or any(t.device.type == "cpu" for t in tensors):
                    raise RuntimeError(f"dist.{name}: a CPU tensor in the NCCL default group "
                                       "(route it through train.world.group_for)")
            return fn(*args, **kwargs)
        return call

    for name in COLLECTIVE_CALLS:
        setattr(dist, name, guard(name, getattr(dist, name)))


def _entry(rank: int, world_size: int, port: int, target: Callable, args: tuple, queue, threads: int,
           emulate_nccl: bool) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        if emulate_nccl:
            emulate_nccl_default_group()
        out = target(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(target: Callable, world_size: int, *args: Any, threads: int = 1, timeout_s: float = 600,
              emulate_nccl: bool = False) -> list[Any]:
    """Run `target` on W spawned ranks; their return values in rank order (an error on any rank raises)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, target, args, queue, threads, emulate_nccl))
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
