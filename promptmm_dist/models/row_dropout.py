"""Dropout whose mask is a function of (a key, the row's id, the column).

A row gets the same mask in whichever process holds it, so W ranks that each hold some rows of a
table drop exactly what one process holding all of them drops (`nn.Dropout` draws each process's
mask from its own generator, so a partitioned run would train another model). One key per call is
drawn from torch's global generator: every process seeds it alike and calls in the same order, and
checkpoints save its state, so the keys, and with them the masks, are reproducible and resumable.
"""

from __future__ import annotations

import torch
from torch import nn

_M32 = 0xFFFFFFFF
_CHUNK_ROWS = 1 << 16  # rows hashed at a time: bounds the int64 temporaries


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A low-bias 32-bit integer hash (xorshift-multiply, both multipliers < 2^31, so int64
    products of 32-bit values never overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def keep_mask(row_ids: torch.Tensor, width: int, key: int, keep: float) -> torch.Tensor:
    """(len(row_ids), width) bool: element (r, c) is kept with probability `keep`, as a function of
    (key, row_ids[r], c) alone."""
    threshold = int(keep * 2**32)
    cols = (torch.arange(width, device=row_ids.device, dtype=torch.int64) * 0x61C88647) & _M32
    out = torch.empty((len(row_ids), width), dtype=torch.bool, device=row_ids.device)
    for lo in range(0, len(row_ids), _CHUNK_ROWS):
        rows = _hash32((row_ids[lo:lo + _CHUNK_ROWS].to(torch.int64) & _M32) ^ (key & _M32))
        out[lo:lo + _CHUNK_ROWS] = _hash32(rows.unsqueeze(1) ^ cols) < threshold
    return out


class RowDropout(nn.Module):
    """`nn.Dropout` over the rows of a table, keyed by the rows' (global) ids."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        key = int(torch.randint(0, 2**31 - 1, (1,)).item())
        mask = keep_mask(row_ids, x.shape[1], key, 1.0 - self.p)
        return x * mask.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
