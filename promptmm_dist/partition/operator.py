"""A sparse matrix whose rows this rank owns, times a dense block whose rows are spread over ranks.

`PartitionedSpMM(x_local)`: multiply the rank's own rows locally, and the input rows the local matrix
rows touch from other ranks ("halo") as they arrive from their owners, in pieces that overlap the
products (`exchange.start_exchange`). Backward is the local transpose product followed by the reverse
exchange, so input gradients land on the owners.

Three routing modes:
- `cover` (the default): each nonzero A[i, j] with j on peer s is either *pulled* (s sends x[j], this rank
  multiplies) or *pushed* (this rank hands the nonzero to s at setup; every hop s multiplies it with its
  own x[j] and sends the partial sum for row i). A row of the block sent either way serves every nonzero
  it covers, so the choice per nonzero is a vertex cover of the block's rows and columns (`cover_split`):
  on a user-item graph a rank pulls the remote items its users read and receives pushed partial sums for
  its items from the users' owners, instead of pulling every remote user that touched its items. At 1M
  users / 100k items and W = 2 that is about (I / 2 + I / 2) rows a hop instead of (U / 2 + I / 2).
- `needed`: pull only, just the rows some local matrix row reads.
- `all`: every peer row (the all-gather cost model, kept for measurement).
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

    def mul_t(self, g: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """A^T g without autograd; with `add_to`, add_to += A^T g in place."""
        if g.device.type == "cpu":
            return self.csr_t.product(g, add_to)
        return self.on(g.device)[1] @ g if add_to is None else add_to.addmm_(self.on(g.device)[1], g)


class _SparseProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, m: LocalSparse) -> torch.Tensor:  # noqa: ANN001
        ctx.m = m
        return m.mul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return ctx.m.mul_t(grad), None


EXCHANGE_MODES = ("cover", "needed", "all")

HALO_CHUNK_ROWS = 1 << 16
"""Rows of one piece of a hop's row exchange (16 MiB at 64 columns). A larger halo travels in pieces,
each multiplied with its own column block of A_halo while the next piece travels: the exchange overlaps
the products, and a hop's transient memory beside its output is a few pieces, not two whole halos."""


def cover_split(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Which nonzeros of one peer's block to push (True) rather than pull: each is covered by the side
    with more nonzeros in the block (a row sent serves all of its nonzeros), then every nonzero of a row
    already pushed is pushed too (free, and it can only drop pulled columns). A greedy vertex cover: the
    rows sent per hop are the pushed rows plus the pulled columns, never more than pulling alone."""
    if len(rows) == 0:
        return np.zeros(0, dtype=bool)
    _, r_inv, r_deg = np.unique(rows, return_inverse=True, return_counts=True)
    _, c_inv, c_deg = np.unique(cols, return_inverse=True, return_counts=True)
    push = r_deg[r_inv] > c_deg[c_inv]
    pushed_row = np.zeros(len(r_deg), dtype=bool)
    pushed_row[r_inv[push]] = True
    push |= pushed_row[r_inv]
    if np.unique(r_inv[push]).size + np.unique(c_inv[~push]).size > c_deg.size:  # pulling alone is cheaper
        push[:] = False
    return push


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
        pieces, push_index = op.pieces_on(x.device), op.push_index_on(x.device)
        pushed = None
        if op.push is not None:  # my rows' products for peers' rows travel while everything else is computed
            pushed = start_exchange(op.push.mul(x), op.push_recv_counts, op.push_send_counts)
        pending = start_exchange(x[pieces[0][0].send_index], pieces[0][0].recv_counts, pieces[0][0].send_counts)
        y = op.own.mul(x)
        for k, (_routes, block) in enumerate(pieces):
            halo = pending.wait()
            if k + 1 < len(pieces):
                nxt = pieces[k + 1][0]
                pending = start_exchange(x[nxt.send_index], nxt.recv_counts, nxt.send_counts)
            op.values_received += int(halo.numel())
            block.mul(halo, add_to=y)
            del halo
        if pushed is not None:
            part = pushed.wait()
            op.values_received += int(part.numel())
            y.index_add_(0, push_index, part)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        op = ctx.op
        pieces, push_index = op.pieces_on(grad.device), op.push_index_on(grad.device)
        pushed = None
        if op.push is not None:  # the pushed rows' gradient goes back to the peers that multiplied them
            pushed = start_exchange(grad[push_index], op.push_send_counts, op.push_recv_counts)
        routes, block = pieces[0]
        pending = start_exchange(block.mul_t(grad), routes.send_counts, routes.recv_counts)
        out = op.own.mul_t(grad)
        for k, (routes, _block) in enumerate(pieces):
            nxt = pieces[k + 1][1].mul_t(grad) if k + 1 < len(pieces) else None  # while piece k travels
            back = pending.wait()  # the piece's halo rows' gradient, on their owner
            if nxt is not None:
                pending = start_exchange(nxt, pieces[k + 1][0].send_counts, pieces[k + 1][0].recv_counts)
                del nxt
            out.index_add_(0, routes.send_index, back)
            del back
        if pushed is not None:
            op.push.mul_t(pushed.wait(), add_to=out)  # no (n_in, d) temporary
        return out, None


class PartitionedSpMM:
    """y = A x for the rows of A this rank owns; x is row-partitioned (`in_counts[s]` rows on rank s).

    Built collectively (every rank constructs its own at the same time): the nonzeros are given as
    local output rows, and (owner rank, row on the owner) of their input columns."""

    def __init__(self, rows: np.ndarray, col_owner: np.ndarray, col_row: np.ndarray, vals: np.ndarray,
                 n_out: int, in_counts: list[int], rank: int, world_size: int, mode: str = "cover",
                 chunk_rows: int = HALO_CHUNK_ROWS) -> None:
        if mode not in EXCHANGE_MODES:
            raise ValueError(f"unknown exchange mode {mode!r} ({' | '.join(EXCHANGE_MODES)})")
        self.rank, self.world_size, self.mode = rank, world_size, mode
        col_owner, col_row = np.asarray(col_owner), np.asarray(col_row)  # any integer dtype: no 64-bit copies
        n_in = int(in_counts[rank])
        self.push: LocalSparse | None = None
        self.push_index = torch.zeros(0, dtype=torch.long)
        self.push_send_counts = self.push_recv_counts = [0] * world_size
        if mode == "cover" and world_size > 1:
            rows, col_owner, col_row, vals = self._hand_over_pushed(np.asarray(rows), col_owner, col_row,
                                                                     np.asarray(vals), n_in)
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
        self._device_push_index: dict[str, torch.Tensor] = {}
        self.rows_received += sum(self.push_recv_counts)
        self.calls = 0
        self.values_received = 0  # floats fetched from peers, all calls (bench: bytes exchanged per hop)

    def _hand_over_pushed(self, rows: np.ndarray, col_owner: np.ndarray, col_row: np.ndarray, vals: np.ndarray,
                          n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Send each peer the nonzeros it will multiply for this rank (`cover_split`), receive the ones
        this rank multiplies for its peers (collective); return the nonzeros left to pull or own."""
        w, me = self.world_size, self.rank
        keep = np.ones(len(rows), dtype=bool)
        asked_rows: list[np.ndarray] = []
        send_int, send_val = [], []
        for s in range(w):
            at = np.flatnonzero(col_owner == s) if s != me else np.zeros(0, np.int64)
            push = at[cover_split(rows[at], col_row[at])]
            keep[push] = False
            distinct, pos = np.unique(rows[push], return_inverse=True)  # my rows s computes, sorted
            asked_rows.append(distinct.astype(np.int64))
            send_int.append(torch.from_numpy(np.stack([pos, col_row[push]], axis=1).astype(np.int64)))
            send_val.append(torch.from_numpy(vals[push].astype(np.float32)))
        got_int, got_val = exchange_lists(send_int, w), exchange_lists(send_val, w)
        del send_int, send_val
        # rows of the push matrix: peer r's asked rows (r's order), peers in rank order
        row_counts = [int(g[:, 0].max()) + 1 if g.shape[0] else 0 for g in (x.reshape(-1, 2) for x in got_int)]
        offsets = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
        p_rows = np.concatenate([g.numpy().reshape(-1, 2)[:, 0] + offsets[r] for r, g in enumerate(got_int)])
        p_cols = np.concatenate([g.numpy().reshape(-1, 2)[:, 1] for g in got_int])
        p_vals = np.concatenate([g.numpy() for g in got_val])
        del got_int, got_val
        if max_over_ranks(int(offsets[-1]) + sum(len(a) for a in asked_rows), w) > 0:
            self.push = LocalSparse(sp.csr_matrix((p_vals, (p_rows, p_cols)), shape=(int(offsets[-1]), n_in)))
            self.push_index = torch.from_numpy(np.concatenate(asked_rows))
            self.push_send_counts = row_counts
            self.push_recv_counts = [len(a) for a in asked_rows]
        return rows[keep], col_owner[keep], col_row[keep], vals[keep]

    @property
    def n_out(self) -> int:
        return self.n_rows

    def push_index_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._device_push_index:
            self._device_push_index[key] = self.push_index.to(device)
        return self._device_push_index[key]

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
