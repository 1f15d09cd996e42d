"""Edge features from the features of both end atoms in one pass: out[e] = a[i_e] + b[j_e].

Eagerly, a.index_select(0, i) + b.index_select(0, j) passes over edge-sized [E, F] tensors three times (two
gathers and the sum); torch's embedding_bag (bags of two rows of [a; b], summed) writes the result once.
Differentiable to any order (force training): the derivative is the scatter of the gradient into the rows
of a by i and of b by j, and the scatter's derivative is this gather again. Where tensors are traced
(torch.compile, make_fx for deploy and AOTInductor, torch.func transforms, forward-mode AD) the plain operators
run, with the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multifi.nn import fused


class EdgePairs:
    """The bags of one batch's edges, built once per forward and shared by all layers: row i_e of a and row
    n_a + j_e of the stacked [a; b] for every edge e. centre i [E], neighbour j [E] (int64), n_a rows of a."""

    def __init__(self, center: torch.Tensor, neighbor: torch.Tensor, n_a: int):
        self.center, self.neighbor, self.n_a = center, neighbor, n_a
        self.bags = torch.stack([center, neighbor + n_a], dim=1)  # [E, 2]


def _plain() -> bool:
    """Inside tracing or a transform, where the autograd functions below cannot (or need not) run; make_fx inside
    fused.traced_kernels (a graph for this process) records them as the eager model runs them."""
    return (
        torch.compiler.is_compiling()
        or (torch._C._len_torch_dispatch_stack() > 0 and not fused.tracing_plans())
        or bool(torch._C._are_functorch_transforms_active())
        or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    )


class _PairSum(torch.autograd.Function):
    """a [Na, F], b [Nb, F] → [E, F] = a[i] + b[j]; its derivative is _PairScatter."""

    @staticmethod
    def forward(ctx, a, b, pairs: EdgePairs):
        ctx.pairs, ctx.n_b = pairs, b.shape[0]
        return F.embedding_bag(pairs.bags, torch.cat([a, b]), mode="sum")

    @staticmethod
    def backward(ctx, g):
        ga, gb = _PairScatter.apply(g, ctx.pairs, ctx.n_b)
        return ga, gb, None


class _PairScatter(torch.autograd.Function):
    """g [E, F] → (Σ_{e: i_e = n} g_e [Na, F], Σ_{e: j_e = n} g_e [Nb, F]); its derivative is _PairSum."""

    @staticmethod
    def forward(ctx, g, pairs: EdgePairs, n_b: int):
        ctx.pairs, ctx.n_b = pairs, n_b
        ga = g.new_zeros((pairs.n_a, g.shape[1])).index_add_(0, pairs.center, g)
        gb = g.new_zeros((n_b, g.shape[1])).index_add_(0, pairs.neighbor, g)
        return ga, gb

    @staticmethod
    def backward(ctx, gga, ggb):
        like = gga if gga is not None else ggb
        gga = like.new_zeros((ctx.pairs.n_a, like.shape[1])) if gga is None else gga
        ggb = like.new_zeros((ctx.n_b, like.shape[1])) if ggb is None else ggb
        return _PairSum.apply(gga, ggb, ctx.pairs), None, None


def pair_sum(a: torch.Tensor, b: torch.Tensor, pairs: EdgePairs) -> torch.Tensor:
    """a [Na, F] and b [Nb, F] at the two ends of every edge, summed: [E, F] = a[i_e] + b[j_e]."""
    if _plain() or a.shape[1] != b.shape[1] or a.dtype != b.dtype:
        return a.index_select(0, pairs.center) + b.index_select(0, pairs.neighbor)
    return _PairSum.apply(a, b, pairs)
