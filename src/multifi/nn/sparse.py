"""Per-centre sums of edge features times fixed edge directions, as two sparse matrix products.

For unit vectors û [E, 3] that need no gradient (energy-only training,
inference without forces), out[i, a, :] = Σ_{e: i_e = i} x[e, :] û[e, a] is U @ x with a sparse
U [3N, E] (3 non-zeros per edge), and its gradient is Uᵀ @ g. This replaces an edge-sized [E, 3, F]
product, its index_add and, in the backward, an [E, 3, F] gather, product and sum (bench/RESULTS.md).
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable


class _SparseProduct(torch.autograd.Function):
    """a @ x for a sparse CSR `a` without gradient, x [E, F] dense; backward at @ g (at = aᵀ, CSR)."""

    @staticmethod
    def forward(ctx, x, a, at):
        ctx.at = at
        return a @ x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return ctx.at @ g, None, None


def _csr(crow, col, val, size):
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=size)


class DirectionSum:
    """x [E, F] ↦ Σ over each centre's edges of x ⊗ û, [N, 3, F], by sparse products.

    center [E], unit [E, 3] (constant: no gradient flows to it), n_atoms N. Sums over each centre's
    edges in edge order, like index_add (edges sorted by centre, as cached neighbour lists are, skip a sort).
    """

    def __init__(self, center: torch.Tensor, unit: torch.Tensor, n_atoms: int):
        E, dev = center.numel(), center.device
        edge = torch.arange(E, device=dev)
        if not bool((center[1:] >= center[:-1]).all()):  # cached neighbour lists are sorted; others may not be
            edge = torch.argsort(center, stable=True)
        c = center.index_select(0, edge)  # centres in ascending order; edge[k] is the k-th edge of that order
        deg = torch.bincount(center, minlength=n_atoms)
        start = (deg.cumsum(0) - deg).index_select(0, c)  # first (sorted) position of each edge's centre
        comp = torch.arange(3, device=dev)
        # row 3i + a of U holds û[e, a] of the edges e of centre i, in edge order
        dest = (2 * start + torch.arange(E, device=dev)).unsqueeze(1) + comp * deg.index_select(0, c).unsqueeze(1)
        col = torch.empty(3 * E, dtype=torch.long, device=dev)
        col[dest.reshape(-1)] = edge.repeat_interleave(3)
        val = torch.empty(3 * E, dtype=unit.dtype, device=dev)
        val[dest.reshape(-1)] = unit.index_select(0, edge).reshape(-1)
        crow = torch.cat([deg.new_zeros(1), deg.repeat_interleave(3).cumsum(0)])
        self.n = n_atoms
        self.u = _csr(crow, col, val, (3 * n_atoms, E))
        self.ut = _csr(
            torch.arange(0, 3 * E + 1, 3, device=dev),
            (3 * center.unsqueeze(1) + comp).reshape(-1),
            unit.reshape(-1),
            (E, 3 * n_atoms),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseProduct.apply(x, self.u, self.ut).view(self.n, 3, x.shape[-1])

    @staticmethod
    def applicable(center: torch.Tensor, unit: torch.Tensor) -> bool:
        """CPU tensors, no gradient wanted for û, not inside torch.compile tracing."""
        return (
            center.device.type == "cpu"
            and not unit.requires_grad
            and center.numel() > 0
            and not torch.compiler.is_compiling()
        )
