"""A sparse matrix whose rows this rank owns, times a dense block whose rows are spread over ranks.

`PartitionedSpMM(x_local)`: fetch the input rows the local matrix rows touch from their owners
(`exchange.fetch_rows`), append them to the rank's own rows ("halo"), multiply locally. Backward is the
local transpose product followed by the reverse exchange, so input gradients land on the owners.

Two routing modes: `needed` (only the rows some local matrix row reads: less traffic at large W) and
`all` (every peer row: the all-gather cost model, kept for measurement).
"""

from __future__ import annotations


import numpy as np
import scipy.sparse as sp
import torch

from promptmm_dist.data.graph import cpu_product, to_torch_sparse
from promptmm_dist.partition.exchange import RowRoutes, exchange_lists, fetch_rows, return_rows


class LocalSparse:
    """A local CSR matrix and its transpose, multiplied with autograd on CPU (scipy) or a device
    (torch sparse CSR); the transpose is built once, never per backward."""

    def __init__(self, m: sp.csr_matrix) -> None:
        self.csr = m.astype(np.float32, copy=False).tocsr()  # no copy of a float32 CSR (setup peak)
        self.csr.sort_indices()
        self.csr_t = self.csr.T.tocsr()
        self.csr_t.sort_indices()
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
            self._device[key] = (to_torch_sparse(self.csr).to(device), to_torch_sparse(self.csr_t).to(device))
        return self._device[key]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        return _SparseProduct.apply(x, self)

    def mul(self, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """A x without autograd (x float32, on the CPU or a device); with `add_to`, add_to += A x in place."""
        if x.device.type == "cpu":
            return cpu_product(self.csr, x, add_to)
        return self.on(x.device)[0] @ x if add_to is None else add_to.addmm_(self.on(x.device)[0], x)

    def mul_t(self, g: torch.Tensor) -> torch.Tensor:
        """A^T g without autograd."""
        if g.device.type == "cpu":
            return cpu_product(self.csr_t, g)
        return self.on(g.device)[1] @ g


class _SparseProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, m: LocalSparse) -> torch.Tensor:  # noqa: ANN001
        ctx.m = m
        return m.mul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return ctx.m.mul_t(grad), None


class _Hop(torch.autograd.Function):
    """y = A_own x + A_halo halo, the halo fetched from the owners inside: neither the halo nor the
    [x; halo] concatenation outlives the forward (the product's backward needs no input), the halo's
    product is added into y in place, and the backward sends the halo's gradient back before it makes the
    own rows' one. Peak extra memory per hop is about two halo-sized buffers (the send and receive sides,
    about (U + I) x d x (W - 1) / W each on a graph without locality), never [x; halo] or a product-sized
    temporary. (Column blocks would bound the buffers, but cost 25% more time per step at 1M users.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "PartitionedSpMM") -> torch.Tensor:  # noqa: ANN001
        ctx.op = op
        routes = op.routes_on(x.device)
        halo = fetch_rows(x.detach(), routes)  # inside a Function: a plain exchange, no graph recorded
        op.values_received += int(halo.numel())
        y = op.own.mul(x)
        return op.remote.mul(halo, add_to=y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        op = ctx.op
        routes = op.routes_on(grad.device)
        back = return_rows(op.remote.mul_t(grad), routes)  # the halo rows' gradient, summed at the owners
        out = op.own.mul_t(grad)
        out.index_add_(0, routes.send_index, back)
        return out, None


class PartitionedSpMM:
    """y = A x for the rows of A this rank owns; x is row-partitioned (`in_counts[s]` rows on rank s).

    Built collectively (every rank constructs its own at the same time): the nonzeros are given as
    local output rows, and (owner rank, row on the owner) of their input columns."""

    def __init__(self, rows: np.ndarray, col_owner: np.ndarray, col_row: np.ndarray, vals: np.ndarray,
                 n_out: int, in_counts: list[int], rank: int, world_size: int, mode: str = "needed") -> None:
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
        self.routes = RowRoutes(n_in, torch.cat(asked).long() if asked else torch.zeros(0, dtype=torch.long),
                                [int(a.shape[0]) for a in asked], recv_counts)
        halo_start = n_in + np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(np.int64)
        n_ext = n_in + sum(recv_counts)
        ext_col = np.empty(len(col_row), dtype=np.int32 if max(n_ext, n_out) < 2**31 else np.int64)
        for s in range(world_size):
            m = col_owner == s
            ext_col[m] = col_row[m] if s == rank else halo_start[s] + np.searchsorted(need[s], col_row[m])
        del need
        a = sp.csr_matrix((np.asarray(vals, np.float32), (np.asarray(rows), ext_col)), shape=(n_out, n_ext))
        del ext_col
        a.sum_duplicates()
        self.n_rows, self.nnz = a.shape[0], int(a.nnz)
        # own columns and halo columns apart: a hop multiplies each with its block, never [x; halo]
        own, remote = (a, a[:, n_in:]) if n_ext == n_in else (a[:, :n_in], a[:, n_in:])
        del a  # the blocks only from here (each LocalSparse adds its transpose)
        self.own, self.remote = LocalSparse(own), LocalSparse(remote)
        self._device_routes: dict[str, RowRoutes] = {}
        self.calls = 0
        self.values_received = 0  # floats fetched from peers, all calls (bench: bytes exchanged per hop)

    @property
    def n_out(self) -> int:
        return self.n_rows

    def routes_on(self, device: torch.device) -> RowRoutes:
        key = str(device)
        if key not in self._device_routes:
            self._device_routes[key] = self.routes.to(device)
        return self._device_routes[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.dtype != torch.float32:
            x = x.float()
        if self.world_size == 1:
            return self.own @ x
        return _Hop.apply(x, self)
