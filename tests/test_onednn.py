"""multifi.nn.onednn: float32 CPU products on oneDNN agree with F.linear, with first and second derivatives."""

import pytest
import torch
import torch.nn.functional as F

import multifi.nn.onednn as dnn

pytestmark = pytest.mark.skipif(not dnn.ONEDNN, reason="oneDNN not available in this torch build")


@pytest.mark.parametrize("rows,bias", [(2048, True), (2049, False), (5000, True), (9137, True)])
def test_linear_matches_f_linear_with_double_backward(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x64 = torch.randn(rows, 21, dtype=torch.float64, generator=g)
    w64 = torch.randn(6, 21, dtype=torch.float64, generator=g)
    b64 = torch.randn(6, dtype=torch.float64, generator=g) if bias else None
    res = {}
    for name, fn, dtype in (("onednn", dnn.linear, torch.float32), ("reference", F.linear, torch.float64)):
        x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
        b = b64.to(dtype).requires_grad_() if bias else None
        y = fn(x, w, b)
        inputs = (x, w, b) if bias else (x, w)
        grads = torch.autograd.grad((y.tanh() ** 2).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((gr**2).sum() for gr in grads), inputs)
        res[name] = [t.detach().double() for t in (y, *grads, *second)]
    assert dnn._use_onednn(x64.float(), w64.float().requires_grad_())
    for got, want in zip(res["onednn"], res["reference"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6)


def test_linear_keeps_leading_dims_and_falls_back_for_float64():
    x, w = torch.randn(1000, 3, 8), torch.randn(4, 8, requires_grad=True)
    assert dnn.linear(x, w).shape == (1000, 3, 4) and dnn._use_onednn(x, w)
    torch.testing.assert_close(dnn.linear(x, w).detach(), F.linear(x, w).detach(), rtol=1e-5, atol=1e-5)
    assert not dnn._use_onednn(x.double(), w.double())
    assert not dnn._use_onednn(x, w.detach())  # frozen weights (calculator, evaluation): torch's products
    with torch.no_grad():
        assert not dnn._use_onednn(x, w)


def test_padded_row_counts_are_few_and_bounded():
    sizes = {dnn._rows(m) for m in range(5000, 12000)}
    assert len(sizes) < 40
    assert all(m <= dnn._rows(m) <= m * 1.0625 + 64 for m in range(1, 20000, 7))


def test_painn_energy_of_a_structure_does_not_depend_on_its_batch():
    """Kernels are chosen per call site and training state, not per batch size: a molecule's energy and
    forces agree (to float32 rounding) whether it is evaluated alone or batched with others."""
    import numpy as np
    from ase.build import molecule

    from multifi.config import ModelConfig
    from multifi.data.batch import graph_from_atoms
    from multifi.models.registry import build_potential

    torch.manual_seed(0)
    pot = build_potential(ModelConfig(features=32).model_dump(), ["a"])
    mols = [molecule(n) for n in ("C6H6", "CH3CH2OH", "C4H4NH", "CH3COOH")]
    for a in mols:
        a.rattle(0.05, seed=1)
    alone = pot(graph_from_atoms(mols[:1], pot.cutoff, fidelity=[0]), forces=True)
    batch = pot(graph_from_atoms(mols, pot.cutoff, fidelity=[0] * len(mols)), forces=True)
    n0 = len(mols[0])
    assert float(alone["energy"][0]) == pytest.approx(float(batch["energy"][0]), rel=1e-9, abs=1e-6)
    np.testing.assert_allclose(alone["forces"].numpy(), batch["forces"][:n0].numpy(), rtol=0, atol=1e-6)
    with torch.no_grad():  # energy only: the sparse direction sum
        e1 = float(pot(graph_from_atoms(mols[:1], pot.cutoff, fidelity=[0]))["energy"][0])
        e4 = float(pot(graph_from_atoms(mols, pot.cutoff, fidelity=[0] * len(mols)))["energy"][0])
    assert e1 == pytest.approx(e4, rel=1e-9, abs=1e-6)
