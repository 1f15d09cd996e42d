"""M3GNet: special functions, the three-body sums against triplet enumeration, the physics check suite, cutoff smoothness, fidelity
conditioning and training."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import numpy as np
import physics
import pytest
import torch
from ase import Atoms
from conftest import TINY_MODEL

from multifi.config import ModelConfig
from multifi.data.batch import graph_from_atoms
from multifi.data.dataset import FidelityDataset
from multifi.data.split import labelled_pairs
from multifi.data.stats import fit_baseline
from multifi.errors import MultifiError
from multifi.models.m3gnet import (
    AngularMonomials,
    M3GNet,
    SmoothBesselBasis,
    SphericalBesselRadial,
    ThreeBodyBasis,
    spherical_jn,
    spherical_jn_roots,
    threebody_bonds,
)
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.nn.fidelity import MODES
from multifi.train.loss import MultiFidelityLoss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository

SOLIDS = SHARED / "solids"
#: small enough for finite differences; three-body cutoff below the two-body one so both are exercised
SMALL = {
    "backbone": "m3gnet",
    "features": 16,
    "interactions": 2,
    "cutoff": 4.0,
    "threebody_cutoff": 3.0,
    "max_n": 2,
    "max_l": 3,
    "n_rbf": 6,
}


def make_m3gnet(fidelities, inject: str = "both", **model):
    cfg = copy.deepcopy(TINY_MODEL)
    cfg.update(SMALL, **model)
    cfg["fidelity_embedding"] = {"dim": 4, "inject": inject}
    return build_potential(cfg, fidelities)


@pytest.fixture(params=["both", "readout", "single"])
def make_potential(request):
    return partial(make_m3gnet, inject=request.param)


# ---------------------------------------------------------------------------------------------- special functions
def test_spherical_bessel_matches_scipy_including_small_arguments():
    sj = pytest.importorskip("scipy.special").spherical_jn
    x = torch.cat([torch.logspace(-4, 0, 200, dtype=torch.float64), torch.linspace(1, 40, 4000, dtype=torch.float64)])
    for l in range(8):
        np.testing.assert_allclose(spherical_jn(x, l).numpy(), sj(l, x.numpy()), atol=1e-14, err_msg=f"j_{l}")


def test_bessel_roots_and_orthonormal_radial_bases():
    sj = pytest.importorskip("scipy.special").spherical_jn
    roots = spherical_jn_roots(5, 4)
    assert torch.allclose(roots[0], torch.arange(1, 5, dtype=torch.float64) * np.pi)
    for l in range(5):
        assert np.abs(sj(l, roots[l].numpy())).max() < 1e-12
        assert (roots[l].diff() > 0).all() and roots[l][0] > l  # first max_n zeros, in order
    r = torch.linspace(1e-6, 4.0, 100001, dtype=torch.float64)
    dr = r[1] - r[0]
    radial = SphericalBesselRadial(4.0, max_n=4, max_l=3)(r)  # [E, L, Nn]
    for l in range(3):
        gram = torch.einsum("en,em,e->nm", radial[:, l], radial[:, l], r**2) * dr
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    smooth = SmoothBesselBasis(4.0, 8)(r)
    gram = torch.einsum("en,em,e->nm", smooth, smooth, r**2) * dr
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)


def test_three_body_radial_basis_has_exact_first_and_second_derivatives():
    """The basis is evaluated without autograd and carries closed-form derivatives (f + δf′ + δ²f″/2): its
    first and second derivatives in r equal those of autograd through the Bessel functions themselves (the
    previous form), from small arguments (series) to large ones (recurrence), and finite differences."""
    radial = SphericalBesselRadial(4.0, max_n=3, max_l=4)
    r = torch.cat([torch.tensor([0.05, 0.3, 0.9]), torch.linspace(1.0, 3.99, 60)]).double().requires_grad_(True)
    w = torch.randn(60 + 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def direct(r):  # autograd through the recurrences and series
        x = r.unsqueeze(-1) / radial.cutoff
        return torch.stack([spherical_jn(x * radial.roots[l], l) * radial.norm[l] for l in range(4)], dim=1)

    for basis in (radial, direct):
        out = basis(r)
        (g,) = torch.autograd.grad((out * w).sum(), r, create_graph=True)
        (gg,) = torch.autograd.grad((g * torch.linspace(1, 2, len(r), dtype=torch.float64)).sum(), r)
        if basis is radial:
            got = (out.detach(), g.detach(), gg)
        else:
            want = (out.detach(), g.detach(), gg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    f, df, ddf = radial.values_and_derivatives(r.detach())
    h = 1e-5
    fp, dfp, _ = radial.values_and_derivatives(r.detach() + h)
    fm, dfm, _ = radial.values_and_derivatives(r.detach() - h)
    torch.testing.assert_close(df, (fp - fm) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ddf, (dfp - dfm) / (2 * h), rtol=1e-6, atol=1e-6)
    assert radial(r.float()).dtype == torch.float32


def test_smooth_bessel_vanishes_with_two_derivatives_at_cutoff():
    basis = SmoothBesselBasis(5.0, 12).double()
    r = torch.tensor([5.0 - 1e-3], dtype=torch.float64, requires_grad=True)
    b = basis(r)[0]
    d1 = torch.stack([torch.autograd.grad(b[n], r, create_graph=True)[0][0] for n in range(12)])
    d2 = torch.stack([torch.autograd.grad(d1[n], r, retain_graph=True)[0][0] for n in range(12)])
    assert b.abs().max() < 1e-6 and d1.abs().max() < 1e-3 and d2.abs().max() < 1
    assert basis(torch.tensor([2.0], dtype=torch.float64)).abs().max() > 0.1  # non-trivial inside
    assert not basis(torch.tensor([5.0, 5.5], dtype=torch.float64)).any()


# ---------------------------------------------------------------------------------------------- three-body sums
def brute_force_triplets(edge_index: np.ndarray, r: np.ndarray, cutoff: float) -> list[tuple[int, int]]:
    """Reference: every ordered pair of distinct edges (i→j, i→k) sharing the centre, both shorter than cutoff."""
    E = edge_index.shape[1]
    return [
        (a, b)
        for a in range(E)
        for b in range(E)
        if a != b and edge_index[0, a] == edge_index[0, b] and r[a] < cutoff and r[b] < cutoff
    ]


def graph_edges(atoms_list, cutoff):
    g = graph_from_atoms(atoms_list, cutoff, dtype=torch.float64)
    i, j = g.edge_index
    vec = g.positions[j] - g.positions[i] + torch.einsum("ea,eab->eb", g.shifts, g.cell[g.batch[i]])
    return g, vec, torch.linalg.norm(vec, dim=-1)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("max_l", [1, 3, 5])
def test_three_body_sum_equals_the_sum_over_enumerated_triplets(periodic, molecules, shuffle, max_l):
    """ThreeBodyBasis.sum_over_k (bond-wise, by the addition of monomials) against the explicit sum over every
    triplet (i→j, i→k) of √((2l+1)/4π) P_l(cos θ_jik) R_ln(r_ik) f_c(r_ik) x_k, periodic images included: values
    and their gradient with respect to the edge vectors, float64."""
    rc3, max_n = 3.0, 2
    g, vec, r = graph_edges([periodic, molecules[1]], 4.0)
    ei = g.edge_index
    if shuffle:  # no reliance on the neighbour list's edge order
        perm = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(0))
        ei, vec, r = ei[:, perm], vec[perm], r[perm]
    pairs = brute_force_triplets(ei.numpy(), r.numpy(), rc3)
    assert len(pairs) > 100  # periodic images included: a small cell has many triplets
    radial, envelope = SphericalBesselRadial(rc3, max_n, max_l), lambda d: (1 - d / rc3) ** 3
    x = torch.randn(len(g.numbers), max_l * max_n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vec = vec.clone().requires_grad_(True)
    d = torch.linalg.norm(vec, dim=-1)
    bonds = threebody_bonds(d, rc3)
    got = ThreeBodyBasis(bonds, ei, vec, d, radial, AngularMonomials(max_l), envelope, len(g.numbers)).sum_over_k(
        x
    )  # [E3, L·Nn]

    a, b = (torch.tensor(c) for c in zip(*pairs))
    cos = (vec[a] * vec[b]).sum(-1) / (d[a] * d[b])
    legendre = [torch.ones_like(cos), cos]  # Bonnet's recurrence, differentiable
    for l in range(1, max_l - 1):
        legendre.append(((2 * l + 1) * cos * legendre[l] - l * legendre[l - 1]) / (l + 1))
    legendre = torch.stack(legendre[:max_l], -1)  # [T, L]
    ylm = legendre * torch.sqrt((2 * torch.arange(max_l, dtype=torch.float64) + 1) / (4 * np.pi))
    term = ylm.unsqueeze(-1) * radial(d[b]) * envelope(d[b]).view(-1, 1, 1) * x[ei[1, b]].view(-1, max_l, max_n)
    row = torch.full((ei.shape[1],), -1, dtype=torch.long)
    row[bonds] = torch.arange(len(bonds))  # edge id → row of the bond in the result
    want = torch.zeros_like(got).index_add(0, row[a], term.flatten(1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g_got,) = torch.autograd.grad((got * w).sum(), vec, retain_graph=True)
    (g_want,) = torch.autograd.grad((want * w).sum(), vec)
    assert g_want.abs().max() > 1e-3
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-11)


def test_gated_mlp_on_edges_is_forward_of_the_concatenation():
    """GatedMLP.on_edges (atom parts of the first layer per atom, values and gates apart) = forward(s_i ⊕ s_j ⊕ e_ij)."""
    from multifi.models.m3gnet import GatedMLP
    from multifi.nn.gather import EdgePairs

    g = torch.Generator().manual_seed(0)
    s, e = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    i, j = torch.randint(0, 5, (9,), generator=g), torch.randint(0, 5, (9,), generator=g)
    f = torch.randn(9, 4, generator=g, dtype=torch.float64)
    for sizes, bias in (([12, 6, 4], True), ([12, 4], False)):
        mlp = GatedMLP(sizes, bias=bias).double()
        want = mlp(torch.cat([s[i], s[j], e], dim=-1), f)
        torch.testing.assert_close(mlp.on_edges(s, e, EdgePairs(i, j, 5), f), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("width", [9, 15])
def test_gated_mlp_padded_equals_forward_with_derivatives(width):
    """GatedMLP.padded (float32 features narrower than 16 and the first-layer weights zero-padded to 16 columns) =
    forward: values, input gradient, its derivative (force training's double backward) and the weight gradients."""
    from multifi.models.m3gnet import GatedMLP

    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, width, generator=g)
    results = []
    for padded in (False, True):
        torch.manual_seed(0)
        mlp = GatedMLP([width, 6, 5], bias=width != 9)
        xi = x.clone().requires_grad_(True)
        y = mlp.padded(xi) if padded else mlp(xi)
        (dx,) = torch.autograd.grad(y.sin().sum(), xi, create_graph=True)
        second = torch.autograd.grad(dx.square().sum(), [xi, *mlp.parameters()])
        results.append((y, dx, *second))
    assert results[1][0].shape == (11, 5)
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gated_mlp_pads_only_narrow_float32_inputs_and_the_three_body_layer_uses_it(monkeypatch, periodic):
    """16 or more columns, float64: forward itself, bit for bit; M3GNet's three-body update goes through padded."""
    from multifi.models.m3gnet import GatedMLP

    torch.manual_seed(0)
    for x in (torch.randn(7, 20), torch.randn(7, 9, dtype=torch.float64)):
        mlp = GatedMLP([x.shape[1], 4]).to(x.dtype)
        assert torch.equal(mlp.padded(x), mlp(x))
    calls = []
    original = GatedMLP.padded
    monkeypatch.setattr(GatedMLP, "padded", lambda self, x, width=16: calls.append(x.shape) or original(self, x, width))
    pot = make_m3gnet(["a"])
    pot(graph_from_atoms([periodic], pot.cutoff, 0))
    blocks = len(pot.representation.three_body)
    assert len(calls) == blocks and all(
        shape[1] == pot.representation.three_body[0].atom_gate.out_features for shape in calls
    )


def test_three_body_sum_without_bonds():
    """No bond within the three-body cutoff (or a lone bond whose only partner is itself): zero sums."""
    ei = torch.tensor([[0, 1], [1, 0]])
    vec = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0]], dtype=torch.float64)
    d = torch.linalg.norm(vec, dim=-1)
    for rc3, n_bonds in ((1.5, 0), (3.0, 2)):  # no bonds; one bond per atom (no partner k ≠ j)
        radial, angular = SphericalBesselRadial(rc3, 2, 3), AngularMonomials(3)
        t = ThreeBodyBasis(threebody_bonds(d, rc3), ei, vec, d, radial, angular, torch.ones_like, 2)
        out = t.sum_over_k(torch.ones(2, 6, dtype=torch.float64))
        assert out.shape == (n_bonds, 6) and (out.numel() == 0 or out.abs().max() < 1e-14)


def test_no_triplets_still_runs():
    """Atoms farther apart than the three-body cutoff but within the two-body one: no triplets, finite output."""
    pot = physics.prepared(make_m3gnet)
    out = physics.predict(pot, [Atoms("CO", positions=[[0, 0, 0], [3.5, 0, 0]])])
    assert np.isfinite(out["energy"]).all() and np.abs(out["forces"]).max() > 0


# ---------------------------------------------------------------------------------------------- physics suite
def test_energy_invariant_under_rotation_translation_permutation(make_potential, molecules, periodic):
    physics.check_energy_invariance(make_potential, molecules + [periodic])


def test_forces_and_stress_rotation_equivariant(molecules, periodic):
    physics.check_forces_equivariance(make_m3gnet, molecules[:2] + [periodic])


def test_reflection(molecules):
    physics.check_reflection_invariance(make_m3gnet, molecules)


def test_forces_are_minus_energy_gradient(make_potential, molecules, periodic):
    physics.check_forces_finite_difference(make_potential, [molecules[1], periodic])


def test_stress_is_strain_derivative(make_potential, periodic):
    physics.check_stress_finite_difference(make_potential, periodic)


def test_periodic_cell_choice_and_lattice_translations(periodic):
    physics.check_periodic_invariances(make_m3gnet, periodic)


def test_prediction_independent_of_batch(make_potential, molecules, periodic):
    physics.check_batch_independence(make_potential, [molecules[0], periodic, molecules[1], molecules[2]])


# ---------------------------------------------------------------------------------------------- smoothness
def test_energy_continuous_at_two_body_cutoff_dimer():
    physics.check_cutoff_smoothness(make_m3gnet)


def _three_atoms(d: float) -> Atoms:
    """O at the origin, H at 1.0 Å, C at distance d from O (at 100° from the O–H bond)."""
    th = np.deg2rad(100)
    return Atoms("OHC", positions=[[0, 0, 0], [1.0, 0, 0], [d * np.cos(th), d * np.sin(th), 0.0]])


@pytest.mark.parametrize("which", ["threebody_cutoff", "cutoff"])
def test_energy_and_forces_continuous_when_atom_crosses_cutoff(which):
    """Atom C crosses a cutoff sphere of O while the O–H bond keeps the three-body terms alive."""
    pot = physics.prepared(make_m3gnet)
    rc = SMALL[which]
    h = 1e-6
    inside, outside = physics.predict(pot, [_three_atoms(rc - h)]), physics.predict(pot, [_three_atoms(rc + h)])
    assert abs(inside["energy"][0] - outside["energy"][0]) < 1e-8, "energy jumps at the cutoff"
    np.testing.assert_allclose(inside["forces"], outside["forces"], atol=1e-5, err_msg="forces jump at the cutoff")
    physics.assert_nontrivial_forces(physics.predict(pot, [_three_atoms(rc - 0.3)])["forces"], which)
    # the energy does change as C approaches (a non-vacuous check)
    assert abs(physics.energy(pot, _three_atoms(rc - 0.3)) - outside["energy"][0]) > 1e-6


def test_three_body_terms_contribute_inside_three_body_cutoff():
    """Zeroing the three-body update changes the energy only when C is within the three-body cutoff."""
    pot = physics.prepared(make_m3gnet)
    blind = copy.deepcopy(pot)
    with torch.no_grad():
        for tb in blind.representation.three_body:
            for lin in [*tb.update.layers, *tb.update.gates]:
                lin.weight.zero_()
    far = _three_atoms(SMALL["threebody_cutoff"] + 0.2)
    far.positions[1] = [4.5, 0, 0]  # H also out of O's three-body sphere: no triplet at all
    assert physics.energy(pot, far) == physics._approx(physics.energy(blind, far))
    near = _three_atoms(2.0)  # small at initialisation (bias-free gated update of small inputs), far above noise
    assert abs(physics.energy(pot, near) - physics.energy(blind, near)) > 1e-9


# ---------------------------------------------------------------------------------------------- fidelity, training
@pytest.mark.parametrize("mode", MODES)
def test_fidelity_changes_prediction_except_single(mode, molecules, periodic):
    physics.check_fidelity_dependence(
        partial(make_m3gnet, inject=mode), molecules + [periodic], expect_change=mode != "single"
    )


@pytest.mark.parametrize("mode", ["both", "readout", "single"])
def test_loss_decreases_synthetic(mode, molecules):
    physics.check_loss_decreases(partial(make_m3gnet, inject=mode), molecules)


def test_missing_labels(molecules):
    physics.check_missing_labels(make_m3gnet, molecules)


@pytest.mark.skipif(not (SOLIDS / "PBE.jsonl.gz").exists(), reason="shared solids data not present")
def test_few_steps_on_solids_lower_the_loss():
    """Energy + forces + stress on 24 MatPES-style solids at two fidelities (PBE, r2SCAN)."""
    from multifi.data.readers.matpes import read_matpes

    ds = FidelityDataset.merge(
        [
            read_matpes(SOLIDS / "PBE.jsonl.gz", stress_order="vasp"),
            read_matpes(SOLIDS / "R2SCAN.jsonl.gz", stress_order="vasp"),
        ]
    )
    ds = ds.subset(np.arange(24))
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    torch.manual_seed(0)
    pot = make_m3gnet(list(ds.fidelities.names), inject="readout", cutoff=5.0, threebody_cutoff=4.0, features=32)
    pot.head.set_baseline(*fit_baseline(ds, pairs))
    g = physics.collate(ds, pairs, pot.cutoff, torch.float32)
    loss_fn = MultiFidelityLoss(energy=1.0, forces=1.0, stress=0.01)
    need_f, need_s = loss_fn.needs(g)
    assert need_f and need_s
    opt = torch.optim.Adam(pot.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss, _ = loss_fn(pot(g, forces=True, stress=True, create_graph=True), g)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------------- config, save/load
def test_from_config_and_registry(tmp_path, molecules):
    cfg = dict(SMALL, features=24, interactions=3, max_n=4, max_l=2, n_rbf=7)
    rep = M3GNet.from_config(ModelConfig(**cfg))
    assert rep.features == 24 and len(rep.convs) == 3 and rep.threebody_cutoff == 3.0
    assert rep.rbf.n == 7 and rep.radial3.roots.shape == (2, 4)
    assert rep.three_body[0].atom_gate.out_features == 8
    pot = physics.prepared(make_m3gnet, ["a", "b"])
    path = save_potential(pot, tmp_path / "m3gnet.pt")
    again = load_potential(path).double()
    assert type(again.representation) is M3GNet
    a, b = physics.predict(pot, molecules, 1), physics.predict(again, molecules, 1)
    np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-12)
    np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-12)


def test_threebody_cutoff_beyond_cutoff_is_an_error():
    with pytest.raises(MultifiError, match="threebody_cutoff"):
        make_m3gnet(["a"], cutoff=4.0, threebody_cutoff=4.5)


def test_float32_close_to_float64(molecules, periodic):
    torch.manual_seed(0)
    pot = make_m3gnet(["a", "b"]).eval()
    atoms = molecules + [periodic]
    e32 = pot(graph_from_atoms(atoms, pot.cutoff, 1))["energy"].detach().numpy()
    pot64 = copy.deepcopy(pot).double()
    e64 = pot64(graph_from_atoms(atoms, pot.cutoff, 1, dtype=torch.float64))["energy"].detach().numpy()
    np.testing.assert_allclose(e32, e64, rtol=1e-5, atol=1e-5)
