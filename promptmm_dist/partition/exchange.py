"""The collectives partitioned execution needs (gloo on CPU, NCCL on GPU).

- `start_exchange`: rows to each peer and from each peer (all_to_all_single), not waited for, so a hop
  computes while they travel; a hop (`partition.operator`) fetches its halo with it and returns the
  halo's gradient to the owners the same way.

The rest are autograd functions whose backward is the matching reduction, so a rank's loss sends the
gradient of every row it borrowed back to the row's owner:

- `gather_rows`: a whole row-partitioned table on every rank (all_gather); backward reduce-scatters.
- `sum_over_ranks`: an all-reduce sum; backward all-reduces the gradient.

With one rank every function is the identity and no collective is called (no process group needed).

Devices: every collective runs in `train.world.group_for(t)`: device tensors (the row exchanges on GPU)
in the default group (NCCL), CPU tensors in gloo.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from promptmm_dist.train.world import group_for


class CollectiveClock:
    """Seconds this process spent inside collectives, waiting for its peers included: the exchange
    part of a step (bench/scale.py splits step time into compute and exchange with it)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


COLLECTIVES = CollectiveClock()


@dataclass
class RowRoutes:
    """Which local rows go to which peer, and how many rows come back from each peer.

    send_index: local rows to send, grouped by destination rank in rank order (self: none);
    send_counts / recv_counts: rows per peer (W,) as Python ints (collective split sizes)."""

    n_local: int
    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]

    def to(self, device: torch.device) -> "RowRoutes":
        return RowRoutes(self.n_local, self.send_index.to(device), self.send_counts, self.recv_counts)


class PendingRows:
    """An exchange in flight (`start_exchange`): `wait()` returns the received rows. The send buffer is
    held until then; the wait is counted as exchange time (what the computation did not hide)."""

    def __init__(self, out: torch.Tensor, work, send: torch.Tensor) -> None:  # noqa: ANN001
        self.out, self.work, self.send = out, work, send

    def wait(self) -> torch.Tensor:
        with COLLECTIVES.timing():
            self.work.wait()
        self.send = None
        return self.out


def start_exchange(rows: torch.Tensor, out_counts: list[int], in_counts: list[int]) -> PendingRows:
    """Send rows[sum(in_counts[:s]):...] to each peer s and receive out_counts[s] rows from it
    (all_to_all_single), without waiting: the caller computes while the rows travel."""
    rows = rows.contiguous()
    out = rows.new_empty((sum(out_counts),) + tuple(rows.shape[1:]))
    work = dist.all_to_all_single(out, rows, output_split_sizes=out_counts, input_split_sizes=in_counts,
                                  group=group_for(rows), async_op=True)
    return PendingRows(out, work, rows)


def max_over_ranks(value: int, world_size: int) -> int:
    """The largest `value` over ranks (setup-time: every rank must call it)."""
    if world_size == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group_for(t))
    return int(t.item())


class _GatherRows(torch.autograd.Function):
    """all_gather of blocks padded to the largest; with equal blocks (the usual case: balanced item
    counts) neither the padding nor the unpadding copy is made."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:  # noqa: ANN001
        ctx.counts, ctx.rank = counts, rank
        width = max(counts)
        if x.shape[0] == width:
            padded = x.contiguous()
        else:
            padded = x.new_zeros((width,) + tuple(x.shape[1:]))
            padded[: x.shape[0]] = x
        out = x.new_empty((width * len(counts),) + tuple(x.shape[1:]))
        with COLLECTIVES.timing():
            dist.all_gather_single(out, padded, group=group_for(padded))
        if all(c == width for c in counts):
            return out
        return torch.cat([out[s * width: s * width + n] for s, n in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        counts, width = ctx.counts, max(ctx.counts)
        blocks = list(torch.split(grad.contiguous(), counts))
        padded = [b if b.shape[0] == width else
                  torch.nn.functional.pad(b, (0, 0) * (grad.dim() - 1) + (0, width - b.shape[0])) for b in blocks]
        out = grad.new_empty((width,) + tuple(grad.shape[1:]))
        with COLLECTIVES.timing():
            dist.reduce_scatter(out, padded, op=dist.ReduceOp.SUM, group=group_for(out))
        return out[: counts[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    """Concatenation of every rank's block (rank order); `counts` = rows per rank."""
    if len(counts) == 1:
        return x
    return _GatherRows.apply(x, counts, rank)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = x.clone()
        with COLLECTIVES.timing():
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group_for(out))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        out = grad.clone()
        with COLLECTIVES.timing():
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group_for(out))
        return out


def sum_over_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum of x over ranks, differentiable (each rank's loss reaches every rank's input)."""
    return x if world_size == 1 else _SumOverRanks.apply(x)


def exchange_lists(lists: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Send lists[s] to rank s, receive what each peer sent to this rank (setup-time helper)."""
    if world_size == 1:
        return list(lists)
    send_counts = [int(x.shape[0]) for x in lists]
    counts = torch.tensor(send_counts, dtype=torch.int64, device=lists[0].device)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group_for(counts))
    recv_counts = [int(c) for c in recv.tolist()]
    payload = torch.cat(lists) if lists else torch.zeros(0)
    out = start_exchange(payload, recv_counts, send_counts).wait()
    return list(torch.split(out, recv_counts))
