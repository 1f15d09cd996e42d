"""nn/gather.py: a[i] + b[j] in one pass, its derivatives to second order, and the plain operators where traced."""

import pytest
import torch

from multifi.nn.gather import EdgePairs, pair_sum


def _case(n_a=5, n_b=5, n_edges=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_a, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n_b, 4, generator=g, dtype=torch.float64, requires_grad=True)
    i, j = torch.randint(0, n_a, (n_edges,), generator=g), torch.randint(0, n_b, (n_edges,), generator=g)
    return a, b, i, j


def test_values_are_the_two_gathers_summed():
    a, b, i, j = _case(n_a=5, n_b=7)
    out = pair_sum(a, b, EdgePairs(i, j, 5))
    assert out.shape == (11, 4)
    torch.testing.assert_close(out, a[i] + b[j], rtol=0, atol=0)  # one sum of two rows: exact


def test_first_and_second_derivatives():
    a, b, i, j = _case()
    pairs = EdgePairs(i, j, 5)
    w = torch.randn(11, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: pair_sum(a, b, pairs) * w, (a, b))
    torch.autograd.gradgradcheck(lambda a, b: (pair_sum(a, b, pairs) ** 2) * w, (a, b))


def test_gradients_match_torch_ops_in_force_training_pattern():
    """A gradient taken with create_graph, then differentiated again (what force training does)."""
    a, b, i, j = _case(seed=3)
    pairs = EdgePairs(i, j, 5)
    grads = []
    for f in (lambda a, b: pair_sum(a, b, pairs), lambda a, b: a[i] + b[j]):
        y = torch.tanh(f(a, b)).sum()
        (ga,) = torch.autograd.grad(y, a, create_graph=True)
        grads.append((ga, *torch.autograd.grad(ga.square().sum(), (a, b))))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_no_edges():
    a, b, _, _ = _case()
    empty = torch.zeros(0, dtype=torch.long)
    out = pair_sum(a, b, EdgePairs(empty, empty, 5))
    assert out.shape == (0, 4)
    out.sum().backward()
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traced_graph_holds_plain_operators(dtype):
    """make_fx (deploy, aot) sees index_select and add, not the autograd function, with the same values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    a, b, i, j = _case()
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    traced = make_fx(lambda a, b, i, j: pair_sum(a, b, EdgePairs(i, j, a.shape[0])))(a, b, i, j)
    ops = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert "aten.embedding_bag.default" not in ops and any("index_select" in o for o in ops)
    torch.testing.assert_close(traced(a, b, i, j), a[i] + b[j], rtol=0, atol=0)
