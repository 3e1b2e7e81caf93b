"""The normalised user-item bipartite graph shared by the teacher, the student and the baselines.

A = [[0, R], [R^T, 0]] over U + I nodes (users first). `sym` is D^-1/2 A D^-1/2 (LightGCN, the
default); `left` is D^-1 A, the authors' one-sided variant, offered for comparison.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def normalized_adjacency(train_csr: sp.csr_matrix, norm: str = "sym") -> sp.csr_matrix:
    """Normalised (U+I) x (U+I) adjacency as scipy CSR (float32); isolated nodes keep zero rows."""
    n_users, n_items = train_csr.shape
    r = train_csr.astype(np.float32)
    adj = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    deg = np.asarray(adj.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        if norm == "sym":
            d = np.where(deg > 0, deg ** -0.5, 0.0).astype(np.float32)
            out = sp.diags(d) @ adj @ sp.diags(d)
        elif norm == "left":
            d = np.where(deg > 0, 1.0 / deg, 0.0).astype(np.float32)
            out = sp.diags(d) @ adj
        else:
            raise ValueError(f"unknown adjacency normalisation {norm!r} (use 'sym' or 'left')")
    out = out.tocsr().astype(np.float32)
    out.sort_indices()
    return out


def to_torch_sparse(m: sp.csr_matrix) -> torch.Tensor:
    """scipy CSR -> torch sparse CSR tensor with int64 indices (a copy; for accelerator devices)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,
        )


def cpu_product(m: sp.csr_matrix, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """m @ x for a float32 scipy CSR `m` and a CPU tensor `x`, without autograd; with `add_to`,
    add_to += m @ x in place (no temporary of the product's size) and returns add_to.

    With int32 indices (scipy's choice below 2^31 nonzeros) the product runs torch's MKL CSR kernel on
    a view of m's own arrays (no copy): 1.2-2.2x scipy's loop on one thread, on Tiktok and at 1M users,
    64 and 192 columns, on different days of this machine (bench/results/spmm_kernel.md).
    With int64 indices torch has no MKL path and is slower than scipy, so scipy does those."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    x = x.contiguous()
    if not m.has_sorted_indices:
        m.sort_indices()
    if m.nnz == 0 or x.shape[0] == 0:
        return add_to if add_to is not None else x.new_zeros((m.shape[0],) + tuple(x.shape[1:]))
    if m.indices.dtype == np.int32 and m.indptr.dtype == np.int32 and m.data.dtype == np.float32:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            view = torch.sparse_csr_tensor(torch.from_numpy(m.indptr), torch.from_numpy(m.indices),
                                           torch.from_numpy(m.data), size=m.shape, check_invariants=False)
        if add_to is not None:
            return add_to.addmm_(view, x)
        # into a new uninitialised tensor with beta=0 (never read): `view @ x` would zero a temporary,
        # multiply into it and copy it out, 1.5x the time of the product itself
        out = x.new_empty((m.shape[0],) + tuple(x.shape[1:]))
        return torch.addmm(out, view, x, beta=0.0, out=out)
    y = torch.from_numpy(np.asarray(m @ x.numpy()))
    return y if add_to is None else add_to.add_(y)


COLUMN_BLOCK = 1 << 16
"""Input rows one block of a CPU sparse product reads (16 MiB at 64 columns)."""


class BlockedCsr:
    """A float32 CSR matrix kept as column blocks for CPU products: m @ x = sum_k m[:, k] @ x[k].

    One product over all columns reads x's rows at random across the whole table, which at 1M users
    (280 MB at 64 columns) misses cache on nearly every non-zero; a block's rows stay in cache while
    its non-zeros stream. At 1M users one product is 1.2x (bench/spmm_kernel.py's graph) to 1.4x (the
    scale set's) faster this way, and a 1-rank student step 1.30x (bench/results/spmm_kernel.md,
    docs/partitioned.md).
    The blocks hold the same non-zeros (plus one row pointer array each); a matrix of at most
    1.5 blocks of columns stays one block, the very matrix given (no copy)."""

    def __init__(self, m: sp.csr_matrix, block: int | None = None) -> None:
        block = block or COLUMN_BLOCK
        m = m.astype(np.float32, copy=False).tocsr()
        m.sort_indices()
        self.shape, self.nnz = m.shape, int(m.nnz)
        n = m.shape[1]
        pieces = max(1, round(n / block)) if n > 1.5 * block else 1
        self.bounds = [n * k // pieces for k in range(pieces + 1)]
        if pieces == 1:
            self.blocks = [m]
        else:
            self.blocks = []
            for a, b in zip(self.bounds[:-1], self.bounds[1:]):
                part = m[:, a:b].tocsr()
                part.sort_indices()
                self.blocks.append(part)

    def to_csr(self) -> sp.csr_matrix:
        """The whole matrix again (a copy when blocked): for accelerators and one-off reads."""
        return self.blocks[0] if len(self.blocks) == 1 else sp.hstack(self.blocks, format="csr")

    def product(self, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """m @ x on the CPU without autograd (x: (shape[1], d)); with `add_to`, add_to += m @ x."""
        out = add_to
        for a, b, part in zip(self.bounds[:-1], self.bounds[1:], self.blocks):
            out = cpu_product(part, x[a:b], add_to=out)
        return out


def row_normalized(train_csr: sp.csr_matrix) -> sp.csr_matrix:
    """D_u^-1 R: each user row averages its training items (users' hard tokens, modality init)."""
    deg = np.asarray(train_csr.sum(axis=1)).ravel()
    inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1), 0.0).astype(np.float32)
    out = (sp.diags(inv) @ train_csr).tocsr().astype(np.float32)
    out.sort_indices()
    return out


class _CsrProduct(torch.autograd.Function):
    """y = A x with a CSR matrix in column blocks: forward A x, backward A^T g (A^T precomputed once).

    On CPU this is ~6x faster than autograd through a torch sparse CSR tensor, whose backward
    rebuilds the transpose at every call (0.05 s vs 0.32 s per hop on Tiktok, 64 columns).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, adj: BlockedCsr, adj_t: BlockedCsr) -> torch.Tensor:  # noqa: ANN001
        ctx.adj_t = adj_t
        return adj.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return ctx.adj_t.product(grad), None, None


class GraphPropagator:
    """One `propagate(x)` call = one hop over the normalised graph.

    Everything that walks the graph or reduces over items goes through this object, so the
    row-partitioned version (`partition.graph.PartitionedGraph`: each rank multiplies its own node
    rows, fetching the rows it needs from their owners) replaces this replicated one without the
    models or the losses knowing. Here tables are whole: node rows = all users then all items.
    """

    def __init__(self, adj: sp.csr_matrix, n_users: int, n_items: int) -> None:
        self.n_users = n_users
        self.n_items = n_items
        adj = adj.astype(np.float32).tocsr()
        symmetric = (abs(adj - adj.T) > 1e-7).nnz == 0
        self.adj_blocks = BlockedCsr(adj)
        self.adj_t_blocks = self.adj_blocks if symmetric else BlockedCsr(adj.T.tocsr())
        del adj
        self._torch_adj: torch.Tensor | None = None  # for accelerator tensors only
        self._user_mean: tuple[BlockedCsr, BlockedCsr] | None = None  # D_u^-1 R and its transpose

    @property
    def adj(self) -> torch.Tensor:
        if self._torch_adj is None:
            self._torch_adj = to_torch_sparse(self.adj_blocks.to_csr())
        return self._torch_adj

    @classmethod
    def from_train(cls, train_csr: sp.csr_matrix, norm: str = "sym") -> "GraphPropagator":
        return cls(normalized_adjacency(train_csr, norm), *train_csr.shape)

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.adj.to(x.device) @ x
        if x.dtype != torch.float32:
            x = x.float()
        return _CsrProduct.apply(x, self.adj_blocks, self.adj_t_blocks)

    def user_item_mean(self, items: torch.Tensor) -> torch.Tensor:
        """Each user's mean of its training items' rows (D_u^-1 R items): users start from their items.
        R is read off the adjacency's user-item block (its pattern, whatever the normalisation)."""
        if self._user_mean is None:
            block = self.adj_blocks.to_csr()[: self.n_users, self.n_users:].copy()
            block.data[:] = 1.0
            mean = row_normalized(block)
            self._user_mean = (BlockedCsr(mean), BlockedCsr(mean.T.tocsr()))
        if items.device.type != "cpu":
            return to_torch_sparse(self._user_mean[0].to_csr()).to(items.device) @ items
        return _CsrProduct.apply(items.float(), *self._user_mean)

    def sum_items(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over items computed from this process's item rows (here: all of them) -> over all items."""
        return x

    def gather_items(self, *tables: torch.Tensor) -> list[torch.Tensor]:
        """Whole item tables from this process's item rows (here they are already whole)."""
        return list(tables)

    def layer_mean(self, x0: torch.Tensor, n_layers: int) -> torch.Tensor:
        """LightGCN readout: mean of x0, Ax0, ..., A^L x0."""
        acc = x0
        x = x0
        for _ in range(n_layers):
            x = self.propagate(x)
            acc = acc + x
        return acc / (n_layers + 1)

    def layer_means(self, blocks: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """`layer_mean` of several (x0, n_layers) blocks, hopping their concatenated columns together
        (one sparse product over wider rows costs far less than one per block)."""
        widths = [x.shape[1] for x, _ in blocks]
        layers = [n for _, n in blocks]
        current = [x for x, _ in blocks]
        acc = list(current)
        for hop in range(1, max(layers, default=0) + 1):
            live = [i for i, n in enumerate(layers) if n >= hop]
            out = self.propagate(torch.cat([current[i] for i in live], dim=1))
            for i, part in zip(live, torch.split(out, [widths[i] for i in live], dim=1)):
                current[i] = part
                acc[i] = acc[i] + part
        return [a / (n + 1) for a, n in zip(acc, layers)]
