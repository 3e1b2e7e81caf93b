"""A sparse matrix whose rows this rank owns, times a dense block whose rows are spread over ranks.

`PartitionedSpMM(x_local)`: multiply the rank's own rows locally, and the input rows the local matrix
rows touch from other ranks ("halo") as they arrive from their owners, in pieces that overlap the
products (`exchange.start_exchange`). Backward is the local transpose product followed by the reverse
exchange, so input gradients land on the owners.

Two routing modes: `needed` (only the rows some local matrix row reads: less traffic at large W) and
`all` (every peer row: the all-gather cost model, kept for measurement).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from promptmm_dist.data.graph import BlockedCsr, to_torch_sparse
from promptmm_dist.partition.exchange import RowRoutes, exchange_lists, max_over_ranks, start_exchange


class LocalSparse:
    """A local CSR matrix and its transpose, multiplied with autograd on CPU (MKL over column blocks,
    `data.graph.BlockedCsr`) or a device (torch sparse CSR); the transpose is built once, never per
    backward."""

    def __init__(self, m: sp.csr_matrix) -> None:
        m = m.astype(np.float32, copy=False).tocsr()  # no copy of a float32 CSR (setup peak)
        m.sort_indices()
        self.csr_t = BlockedCsr(m.T.tocsr())
        self.csr = BlockedCsr(m)
        self._device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.csr.shape

    @property
    def nnz(self) -> int:
        return self.csr.nnz

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device:
            self._device[key] = (to_torch_sparse(self.csr.to_csr()).to(device),
                                 to_torch_sparse(self.csr_t.to_csr()).to(device))
        return self._device[key]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        return _SparseProduct.apply(x, self)

    def mul(self, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """A x without autograd (x float32, on the CPU or a device); with `add_to`, add_to += A x in place."""
        if x.device.type == "cpu":
            return self.csr.product(x, add_to)
        return self.on(x.device)[0] @ x if add_to is None else add_to.addmm_(self.on(x.device)[0], x)

    def mul_t(self, g: torch.Tensor) -> torch.Tensor:
        """A^T g without autograd."""
        if g.device.type == "cpu":
            return self.csr_t.product(g)
        return self.on(g.device)[1] @ g


class _SparseProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, m: LocalSparse) -> torch.Tensor:  # noqa: ANN001
        ctx.m = m
        return m.mul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return ctx.m.mul_t(grad), None


HALO_CHUNK_ROWS = 1 << 16
"""Rows of one piece of a hop's row exchange (16 MiB at 64 columns). A larger halo travels in pieces,
each multiplied with its own column block of A_halo while the next piece travels: the exchange overlaps
the products, and a hop's transient memory beside its output is a few pieces, not two whole halos."""


def _split_points(n: int, pieces: int) -> np.ndarray:
    """Boundaries of `pieces` near-equal parts of n rows: the asker and the owner of a list of rows
    compute the same ones from its length."""
    return np.array([n * k // pieces for k in range(pieces + 1)], dtype=np.int64)


class _Hop(torch.autograd.Function):
    """y = A_own x + sum_k A_halo,k halo_k, the halo pieces fetched from the owners inside (piece k + 1
    travels while piece k is multiplied): neither the halo nor [x; halo] outlives the forward (the
    product's backward needs no input), and each piece's product is added into y in place. The backward
    makes the own rows' gradient, then returns the halo pieces' gradients to their owners the same way,
    pipelined. Peak extra memory per hop: about three pieces, not two halo-sized buffers (a halo is about
    (U + I) x d x (W - 1) / W rows on a graph without locality)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "PartitionedSpMM") -> torch.Tensor:  # noqa: ANN001
        ctx.op = op
        x = x.detach()
        pieces = op.pieces_on(x.device)
        y = op.own.mul(x)
        pending = start_exchange(x[pieces[0][0].send_index], pieces[0][0].recv_counts, pieces[0][0].send_counts)
        for k, (_routes, block) in enumerate(pieces):
            halo = pending.wait()
            if k + 1 < len(pieces):
                nxt = pieces[k + 1][0]
                pending = start_exchange(x[nxt.send_index], nxt.recv_counts, nxt.send_counts)
            op.values_received += int(halo.numel())
            block.mul(halo, add_to=y)
            del halo
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        op = ctx.op
        pieces = op.pieces_on(grad.device)
        out = op.own.mul_t(grad)
        routes, block = pieces[0]
        pending = start_exchange(block.mul_t(grad), routes.send_counts, routes.recv_counts)
        for k, (routes, _block) in enumerate(pieces):
            nxt = pieces[k + 1][1].mul_t(grad) if k + 1 < len(pieces) else None  # while piece k travels
            back = pending.wait()  # the piece's halo rows' gradient, on their owner
            if nxt is not None:
                pending = start_exchange(nxt, pieces[k + 1][0].send_counts, pieces[k + 1][0].recv_counts)
                del nxt
            out.index_add_(0, routes.send_index, back)
            del back
        return out, None


class PartitionedSpMM:
    """y = A x for the rows of A this rank owns; x is row-partitioned (`in_counts[s]` rows on rank s).

    Built collectively (every rank constructs its own at the same time): the nonzeros are given as
    local output rows, and (owner rank, row on the owner) of their input columns."""

    def __init__(self, rows: np.ndarray, col_owner: np.ndarray, col_row: np.ndarray, vals: np.ndarray,
                 n_out: int, in_counts: list[int], rank: int, world_size: int, mode: str = "needed",
                 chunk_rows: int = HALO_CHUNK_ROWS) -> None:
        if mode not in ("needed", "all"):
            raise ValueError(f"unknown exchange mode {mode!r} (needed | all)")
        self.rank, self.world_size, self.mode = rank, world_size, mode
        col_owner, col_row = np.asarray(col_owner), np.asarray(col_row)  # any integer dtype: no 64-bit copies
        n_in = int(in_counts[rank])
        need: list[np.ndarray] = []
        for s in range(world_size):
            if s == rank:
                need.append(np.zeros(0, np.int64))
            elif mode == "all":
                need.append(np.arange(int(in_counts[s]), dtype=np.int64))
            else:
                need.append(np.unique(col_row[col_owner == s]).astype(np.int64))
        asked = exchange_lists([torch.from_numpy(n) for n in need], world_size)  # my rows each peer needs
        recv_counts = [len(n) for n in need]
        self.rows_received = sum(recv_counts)  # halo rows per hop (bench statistics)
        # the halo in pieces (the same number on every rank: each piece is one collective); halo columns
        # are numbered piece-major, so piece k's rows are one column block of A_halo
        largest = max_over_ranks(max(self.rows_received, sum(int(a.shape[0]) for a in asked)), world_size)
        self.n_pieces = max(1, -(-largest // max(1, int(chunk_rows))))
        recv_at = [_split_points(len(n), self.n_pieces) for n in need]
        send_at = [_split_points(int(a.shape[0]), self.n_pieces) for a in asked]
        piece_sizes = [[int(at[k + 1] - at[k]) for at in recv_at] for k in range(self.n_pieces)]
        piece_start = n_in + np.concatenate([[0], np.cumsum([sum(p) for p in piece_sizes])]).astype(np.int64)
        n_ext = n_in + sum(recv_counts)
        ext_col = np.empty(len(col_row), dtype=np.int32 if max(n_ext, n_out) < 2**31 else np.int64)
        for s in range(world_size):
            m = col_owner == s
            if s == rank:
                ext_col[m] = col_row[m]
                continue
            pos = np.searchsorted(need[s], col_row[m])  # position in the list asked of s
            k = np.searchsorted(recv_at[s], pos, side="right") - 1  # its piece
            before = np.array([piece_start[j] + sum(piece_sizes[j][:s]) for j in range(self.n_pieces)], np.int64)
            ext_col[m] = before[k] + (pos - recv_at[s][k])
        del need
        a = sp.csr_matrix((np.asarray(vals, np.float32), (np.asarray(rows), ext_col)), shape=(n_out, n_ext))
        del ext_col
        a.sum_duplicates()
        self.n_rows, self.nnz = a.shape[0], int(a.nnz)
        # own columns and halo pieces apart: a hop multiplies each with its block, never [x; halo]
        self.own = LocalSparse(a if n_ext == n_in else a[:, :n_in])
        self.pieces: list[tuple[RowRoutes, LocalSparse]] = []
        for k in range(self.n_pieces):
            send = [asked[s][int(send_at[s][k]):int(send_at[s][k + 1])] for s in range(world_size)]
            routes = RowRoutes(n_in, torch.cat(send).long() if send else torch.zeros(0, dtype=torch.long),
                               [int(t.shape[0]) for t in send], piece_sizes[k])
            self.pieces.append((routes, LocalSparse(a[:, int(piece_start[k]):int(piece_start[k + 1])])))
        del a
        self._device_pieces: dict[str, list[tuple[RowRoutes, LocalSparse]]] = {}
        self.calls = 0
        self.values_received = 0  # floats fetched from peers, all calls (bench: bytes exchanged per hop)

    @property
    def n_out(self) -> int:
        return self.n_rows

    def pieces_on(self, device: torch.device) -> list[tuple[RowRoutes, "LocalSparse"]]:
        key = str(device)
        if key not in self._device_pieces:
            self._device_pieces[key] = [(r.to(device), block) for r, block in self.pieces]
        return self._device_pieces[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.dtype != torch.float32:
            x = x.float()
        if self.world_size == 1:
            return self.own @ x
        return _Hop.apply(x, self)
