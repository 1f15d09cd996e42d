"""multifi.nn.sparse.DirectionSum: Σ over each centre's edges of x ⊗ û, and its gradient, as dense code gives."""

import pytest
import torch

from multifi.nn.sparse import DirectionSum


@pytest.mark.parametrize("sort", [True, False])
def test_direction_sum_matches_dense_with_gradient(sort):
    g = torch.Generator().manual_seed(3)
    n_atoms, E, F = 7, 40, 5
    center = torch.randint(0, n_atoms - 1, (E,), generator=g)  # the last atom has no edges
    if sort:
        center = center.sort().values
    unit = torch.nn.functional.normalize(torch.randn(E, 3, dtype=torch.float64, generator=g), dim=-1)
    x = torch.randn(E, F, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(n_atoms, 3, F, dtype=torch.float64, generator=g)
    got = DirectionSum(center, unit, n_atoms)(x)
    want = torch.zeros(n_atoms, 3, F, dtype=torch.float64).index_add(0, center, x.unsqueeze(1) * unit.unsqueeze(-1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad((got * w).sum(), x)
    (wx,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)
    assert torch.all(got[-1] == 0)


def test_direction_sum_refuses_second_derivatives_and_differentiable_directions():
    center, unit = torch.tensor([0, 0, 1]), torch.eye(3)
    x = torch.randn(3, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(DirectionSum(center, unit, 2)(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
    assert not DirectionSum.applicable(center, unit.requires_grad_())
