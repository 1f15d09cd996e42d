"""A reusable physics and model-contract check suite for any multifi backbone.

Every check takes `make_potential(fidelities: list[str]) -> Potential` (a freshly initialised model
with those fidelities; the checks seed torch themselves) and raises AssertionError on failure.
Checks run in float64 (the potential is converted with .double()) so that derivatives can be
compared with central finite differences tightly. A backbone's test module only needs e.g.

    def make_potential(fidelities):
        return build_potential({... "backbone": "m3gnet" ...}, fidelities)

    def test_forces(molecules): physics.check_forces_finite_difference(make_potential, molecules)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.emt import EMT

from multifi.data.batch import Graph, GraphCollator, graph_from_atoms
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import NeighborCache
from multifi.data.split import labelled_pairs
from multifi.data.stats import fit_baseline
from multifi.models.potential import Potential
from multifi.train.loss import MultiFidelityLoss

MakePotential = Callable[[list], Potential]
FIDELITIES = ["lo", "mid", "hi"]


# ---------------------------------------------------------------------------------------------- helpers
def prepared(make_potential: MakePotential, fidelities: Sequence[str] = ("lo", "hi"), seed: int = 0) -> Potential:
    """A float64 potential in eval mode, deterministically initialised."""
    torch.manual_seed(seed)
    return make_potential(list(fidelities)).double().eval()


def predict(potential: Potential, atoms_list: Sequence[Atoms], fidelity=0, stress: bool = False) -> dict:
    """Energies [B], forces [N,3] (and stress [B,3,3] GPa) as float64 numpy arrays."""
    g = graph_from_atoms(list(atoms_list), potential.cutoff, fidelity, dtype=torch.float64)
    out = potential(g, forces=True, stress=stress)
    return {k: v.detach().numpy().astype(np.float64) for k, v in out.items()}


def energy(potential: Potential, atoms: Atoms, fidelity: int = 0) -> float:
    g = graph_from_atoms([atoms], potential.cutoff, fidelity, dtype=torch.float64)
    with torch.no_grad():
        return float(potential(g)["energy"][0])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def rotated(atoms: Atoms, R: np.ndarray) -> Atoms:
    """atoms with positions (and cell rows) rotated by R: r → R r."""
    out = atoms.copy()
    out.positions = atoms.positions @ R.T
    if atoms.pbc.any():
        out.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    return out


def assert_nontrivial_forces(forces: np.ndarray, what: str = "") -> None:
    """Guard against vacuous passes: a model predicting zero forces satisfies every symmetry."""
    assert np.abs(forces).max() > 1e-4, f"{what}: forces are ~0, the check would be vacuous"


def _tol(x: np.ndarray, rel: float = 1e-9) -> float:
    return rel * max(1.0, float(np.abs(x).max()))


def labelled_dataset(atoms_list: Sequence[Atoms], fidelities: Sequence[str] = ("lo", "hi")) -> FidelityDataset:
    """Every structure labelled at every fidelity k: energy (1+0.2k)·E_EMT + 0.5k eV/atom, forces (1+0.2k)·F_EMT."""
    records = []
    for i, atoms in enumerate(atoms_list):
        a = atoms.copy()
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        labels = {
            name: {"energy": (1 + 0.2 * k) * e + 0.5 * k * len(a), "forces": (1 + 0.2 * k) * f}
            for k, name in enumerate(fidelities)
        }
        records.append({"numbers": a.numbers, "positions": a.positions, "labels": labels, "key": f"s{i}"})
    return FidelityDataset.from_records(records, source="synthetic")


def collate(dataset: FidelityDataset, pairs, cutoff: float, dtype=torch.float64) -> Graph:
    return GraphCollator(dataset, NeighborCache(dataset, cutoff))(pairs).to("cpu", dtype)


# ---------------------------------------------------------------------------------------------- symmetries
def check_energy_invariance(make_potential: MakePotential, atoms_list: Sequence[Atoms], seed: int = 0) -> None:
    """Energy unchanged by rotation, translation and permutation of atoms; forces permute along."""
    pot = prepared(make_potential)
    rng = np.random.default_rng(seed)
    for atoms in atoms_list:
        ref = predict(pot, [atoms])
        assert_nontrivial_forces(ref["forces"], "energy invariance")
        e0 = ref["energy"][0]
        R = random_rotation(rng)
        assert energy(pot, rotated(atoms, R)) == _approx(e0), "energy changed under rotation"
        moved = atoms.copy()
        moved.positions += rng.normal(scale=3.0, size=3)
        assert energy(pot, moved) == _approx(e0), "energy changed under translation"
        perm = rng.permutation(len(atoms))
        while len(atoms) > 1 and (perm == np.arange(len(atoms))).all():
            perm = rng.permutation(len(atoms))
        permuted = atoms[perm]
        out = predict(pot, [permuted])
        assert out["energy"][0] == _approx(e0), "energy changed under permutation of atoms"
        np.testing.assert_allclose(
            out["forces"],
            ref["forces"][perm],
            atol=_tol(ref["forces"]),
            err_msg="forces did not follow the permutation",
        )


def check_forces_equivariance(make_potential: MakePotential, atoms_list: Sequence[Atoms], seed: int = 1) -> None:
    """F(R r) = R F(r) for random rotations (and stress(R r) = R σ Rᵀ for periodic structures)."""
    pot = prepared(make_potential)
    rng = np.random.default_rng(seed)
    for atoms in atoms_list:
        periodic = bool(atoms.pbc.any())
        ref = predict(pot, [atoms], stress=periodic)
        assert_nontrivial_forces(ref["forces"], "forces equivariance")
        for _ in range(2):
            R = random_rotation(rng)
            out = predict(pot, [rotated(atoms, R)], stress=periodic)
            np.testing.assert_allclose(
                out["forces"],
                ref["forces"] @ R.T,
                atol=_tol(ref["forces"]),
                err_msg="forces are not rotation-equivariant",
            )
            if periodic:
                np.testing.assert_allclose(
                    out["stress"][0],
                    R @ ref["stress"][0] @ R.T,
                    atol=_tol(ref["stress"]),
                    err_msg="stress is not rotation-equivariant",
                )


def check_reflection_invariance(make_potential: MakePotential, atoms_list: Sequence[Atoms]) -> None:
    """Energy unchanged and forces mirrored under an improper rotation (for E(3)-invariant backbones)."""
    pot = prepared(make_potential)
    M = np.diag([1.0, 1.0, -1.0])
    for atoms in atoms_list:
        ref = predict(pot, [atoms])
        out = predict(pot, [rotated(atoms, M)])
        assert out["energy"][0] == _approx(ref["energy"][0]), "energy changed under reflection"
        np.testing.assert_allclose(out["forces"], ref["forces"] @ M.T, atol=_tol(ref["forces"]))


# ---------------------------------------------------------------------------------------------- derivatives
def check_forces_finite_difference(
    make_potential: MakePotential, atoms_list: Sequence[Atoms], h: float = 1e-4, fidelity: int = 1
) -> None:
    """Forces equal −dE/dr by central differences (every coordinate, float64)."""
    pot = prepared(make_potential)
    for atoms in atoms_list:
        f = predict(pot, [atoms], fidelity)["forces"]
        assert_nontrivial_forces(f, "forces finite difference")
        fd = np.zeros_like(f)
        for a in range(len(atoms)):
            for c in range(3):
                plus, minus = atoms.copy(), atoms.copy()
                plus.positions[a, c] += h
                minus.positions[a, c] -= h
                fd[a, c] = -(energy(pot, plus, fidelity) - energy(pot, minus, fidelity)) / (2 * h)
        np.testing.assert_allclose(
            f,
            fd,
            rtol=1e-5,
            atol=1e-6 * max(1.0, np.abs(f).max()),
            err_msg=f"forces differ from finite differences ({atoms.get_chemical_formula()})",
        )


def strained_atoms(atoms: Atoms, eps: np.ndarray) -> Atoms:
    """atoms with cell and positions deformed by (I + ε) (fractional coordinates kept)."""
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


def check_stress_finite_difference(
    make_potential: MakePotential, atoms: Atoms, h: float = 5e-4, fidelity: int = 0
) -> None:
    """stress (GPa, ASE sign) = (1/V) dE/dε by central differences under symmetric strain."""
    assert atoms.pbc.all()
    pot = prepared(make_potential)
    out = predict(pot, [atoms], fidelity, stress=True)
    assert "stress" in out, "no stress predicted for a periodic structure"
    sigma = out["stress"][0]
    assert sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, sigma.T, atol=_tol(sigma), err_msg="stress is not symmetric")
    assert np.abs(sigma).max() > 1e-3, "stress is ~0, the check would be vacuous"
    V = atoms.get_volume()
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            e = np.zeros((3, 3))
            e[i, j] += 0.5
            e[j, i] += 0.5
            dE = energy(pot, strained_atoms(atoms, h * e), fidelity) - energy(
                pot, strained_atoms(atoms, -h * e), fidelity
            )
            fd[i, j] = fd[j, i] = dE / (2 * h) / V / units.GPa
    np.testing.assert_allclose(
        sigma,
        fd,
        rtol=1e-4,
        atol=1e-5 * max(1.0, np.abs(fd).max()),
        err_msg="stress differs from (1/V) dE/dε by finite differences",
    )


# ---------------------------------------------------------------------------------------------- periodic systems
def check_periodic_invariances(make_potential: MakePotential, atoms: Atoms, seed: int = 2) -> None:
    """Energy/forces/stress independent of the choice of equivalent cell, of wrapping atoms by lattice
    vectors and of a rigid translation; a 2×1×1 supercell has twice the energy and the same stress."""
    assert atoms.pbc.all()
    pot = prepared(make_potential)
    rng = np.random.default_rng(seed)
    ref = predict(pot, [atoms], stress=True)
    assert_nontrivial_forces(ref["forces"], "periodic invariance")
    e0 = ref["energy"][0]

    def same(other: Atoms, what: str, factor: int = 1):
        out = predict(pot, [other], stress=True)
        assert out["energy"][0] == _approx(factor * e0), f"energy changed: {what}"
        np.testing.assert_allclose(
            out["forces"],
            np.tile(ref["forces"], (factor, 1)),
            atol=_tol(ref["forces"], 1e-8),
            err_msg=f"forces changed: {what}",
        )
        np.testing.assert_allclose(
            out["stress"][0], ref["stress"][0], atol=_tol(ref["stress"], 1e-8), err_msg=f"stress changed: {what}"
        )

    shifted = atoms.copy()
    shifted.positions += rng.integers(-2, 3, size=(len(atoms), 3)) @ atoms.cell.array
    same(shifted, "atoms moved by lattice vectors")
    translated = atoms.copy()
    translated.positions += rng.normal(size=3)
    translated.wrap()
    same(translated, "rigid translation (wrapped)")
    M = np.array([[1, 1, 0], [0, 1, 0], [-1, 0, 1]])  # unimodular: same lattice, different cell
    assert round(abs(np.linalg.det(M))) == 1
    recell = atoms.copy()
    recell.set_cell(M @ atoms.cell.array, scale_atoms=False)
    recell.wrap()
    same(recell, "equivalent (unimodular) cell")
    same(atoms.repeat((2, 1, 1)), "2x1x1 supercell", factor=2)


def check_cutoff_smoothness(make_potential: MakePotential, element: str = "C", h: float = 1e-6) -> None:
    """A dimer's energy and forces are continuous where the distance crosses the cutoff (forces → 0)."""
    pot = prepared(make_potential)
    rc = pot.cutoff
    dimer = lambda r: Atoms(element * 2, positions=[[0, 0, 0], [r, 0, 0]])  # noqa: E731
    e = [energy(pot, dimer(r)) for r in (rc - h, rc + h)]
    far = energy(pot, dimer(rc + 1.0))
    assert abs(e[0] - e[1]) < 1e-6 and abs(e[1] - far) < 1e-9, f"energy jumps at the cutoff: {e}, far {far}"
    inside = predict(pot, [dimer(rc - 1e-3)])["forces"]
    assert np.abs(inside).max() < 1e-4, f"forces do not vanish at the cutoff: {inside}"
    assert_nontrivial_forces(predict(pot, [dimer(0.7 * rc)])["forces"], "cutoff smoothness")


def check_isolated_atoms(make_potential: MakePotential) -> None:
    """Structures without edges (one atom; atoms beyond the cutoff) work: zero forces, additive energies."""
    pot = prepared(make_potential)
    far = 2 * pot.cutoff
    single_h, single_o = Atoms("H", positions=[[0, 0, 0]]), Atoms("O", positions=[[1, 2, 3]])
    apart = Atoms("HO", positions=[[0, 0, 0], [far, 0, 0]])
    out = predict(pot, [single_h, single_o, apart])
    assert np.isfinite(out["energy"]).all() and not out["forces"].any()
    assert out["energy"][2] == _approx(out["energy"][0] + out["energy"][1])


# ---------------------------------------------------------------------------------------------- batches, fidelities
def check_batch_independence(make_potential: MakePotential, atoms_list: Sequence[Atoms]) -> None:
    """A structure's energy, forces and stress do not depend on the other structures in its batch
    (nor on their fidelities)."""
    pot = prepared(make_potential, FIDELITIES)
    fids = [k % len(FIDELITIES) for k in range(len(atoms_list))]
    batch = predict(pot, atoms_list, fids, stress=True)
    start = 0
    for i, atoms in enumerate(atoms_list):
        periodic = bool(atoms.pbc.any())
        alone = predict(pot, [atoms], fids[i], stress=periodic)
        n = len(atoms)
        assert batch["energy"][i] == _approx(alone["energy"][0]), f"energy of structure {i} depends on its batch"
        np.testing.assert_allclose(
            batch["forces"][start : start + n],
            alone["forces"],
            atol=_tol(alone["forces"]),
            err_msg=f"forces of structure {i} depend on its batch",
        )
        if periodic:
            np.testing.assert_allclose(batch["stress"][i], alone["stress"][0], atol=_tol(alone["stress"]))
        else:
            assert not batch["stress"][i].any(), "a molecule got a non-zero stress"
        start += n


def check_fidelity_dependence(make_potential: MakePotential, atoms_list: Sequence[Atoms], expect_change: bool) -> None:
    """Predicting at another fidelity changes energy and forces (expect_change) or, for a model without
    fidelity information, changes nothing even when the per-fidelity reference energies differ."""
    pot = prepared(make_potential, FIDELITIES)
    K = len(FIDELITIES)
    if not expect_change:  # fidelity-dependent baselines must not leak into a fidelity-blind model
        rng = np.random.default_rng(0)
        pot.head.set_baseline(rng.normal(size=pot.head.ref.shape), rng.uniform(0.5, 2.0, size=K))
    preds = [predict(pot, atoms_list, k) for k in range(K)]
    for a in range(K):
        for b in range(a + 1, K):
            dE = np.abs(preds[a]["energy"] - preds[b]["energy"])
            dF = np.abs(preds[a]["forces"] - preds[b]["forces"]).max()
            if expect_change:
                assert (dE > 1e-6).all(), f"energy identical at fidelities {a} and {b}: {dE}"
                assert dF > 1e-6, f"forces identical at fidelities {a} and {b}"
            else:
                assert dE.max() < 1e-9 and dF < 1e-9, f"a fidelity-blind model changed with the fidelity ({dE}, {dF})"
    # mixed fidelities in one batch: each structure as if the whole batch were at its fidelity
    fids = [i % K for i in range(len(atoms_list))]
    mixed = predict(pot, atoms_list, fids)
    for i, k in enumerate(fids):
        assert mixed["energy"][i] == _approx(preds[k]["energy"][i])


# ---------------------------------------------------------------------------------------------- training contracts
def check_loss_decreases(
    make_potential: MakePotential, atoms_list: Sequence[Atoms], steps: int = 40, lr: float = 5e-3
) -> None:
    """A few Adam steps on a tiny two-fidelity set lower the multi-fidelity loss clearly, and every
    trainable parameter receives a finite gradient."""
    ds = labelled_dataset(atoms_list, ("lo", "hi"))
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    torch.manual_seed(0)
    pot = make_potential(list(ds.fidelities.names))
    pot.head.set_baseline(*fit_baseline(ds, pairs, pooled=pot.head.shared_baseline))
    pot.train()
    g = collate(ds, pairs, pot.cutoff, torch.float32)
    loss_fn = MultiFidelityLoss(energy=1.0, forces=1.0)
    opt = torch.optim.Adam(pot.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        out = pot(g, forces=True, create_graph=True)
        loss, terms = loss_fn(out, g)
        assert set(terms) == {"energy", "forces"}
        loss.backward()
        if step == 0:
            for name, p in pot.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None, f"parameter {name} gets no gradient"
                    assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
                    assert p.grad.abs().max() > 0, f"parameter {name} gets a zero gradient"
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses[0]:.4g} → {losses[-1]:.4g}"


def _param_grads(pot: Potential, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in pot.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _loss_and_grads(pot, g, loss_fn):
    need_f, need_s = loss_fn.needs(g)
    out = pot(g, forces=need_f, stress=need_s, create_graph=True)
    loss, terms = loss_fn(out, g)
    return loss, terms, _param_grads(pot, loss)


def check_missing_labels(make_potential: MakePotential, atoms_list: Sequence[Atoms]) -> None:
    """A missing label adds no loss and no gradient, whatever value sits in the masked slot."""
    assert len(atoms_list) >= 3
    ds = labelled_dataset(atoms_list[:3], ("lo", "hi"))
    torch.manual_seed(0)
    pot = make_potential(list(ds.fidelities.names)).double()
    pot.head.set_baseline(*fit_baseline(ds, labelled_pairs(ds, np.arange(3)), pooled=pot.head.shared_baseline))
    loss_fn = MultiFidelityLoss(energy=1.0, forces=1.0)
    pairs = np.array([[0, 0], [1, 1], [2, 0]])
    full = collate(ds, pairs, pot.cutoff)
    # structure 1 without any label; garbage in its label slots must not matter
    masked = collate(ds, pairs, pot.cutoff)
    masked.energy_mask[1] = False
    masked.forces_mask[1] = False
    masked.energy[1] = 1e6
    masked.forces[masked.batch == 1] = 1e6
    without = collate(ds, pairs[[0, 2]], pot.cutoff)
    loss_m, terms_m, grads_m = _loss_and_grads(pot, masked, loss_fn)
    loss_w, terms_w, grads_w = _loss_and_grads(pot, without, loss_fn)
    loss_f, _, grads_f = _loss_and_grads(pot, full, loss_fn)
    assert float(loss_m.detach()) == _approx(float(loss_w.detach()), 1e-6), "an unlabelled structure changed the loss"
    for a, b in zip(grads_m, grads_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8, msg="an unlabelled structure changed the gradient")
    assert float(loss_f.detach()) != _approx(float(loss_w.detach()), 1e-6), (
        "the labelled structure should matter (non-vacuous check)"
    )

    # energy label missing only: energy term equals the one of the other structures alone
    e_only = collate(ds, pairs, pot.cutoff)
    e_only.energy_mask[1] = False
    e_only.energy[1] = 1e6
    _, terms_e, _ = _loss_and_grads(pot, e_only, loss_fn)
    assert float(terms_e["energy"].detach()) == _approx(float(terms_w["energy"].detach()), 1e-6)
    assert float(terms_e["forces"].detach()) == _approx(
        float(_loss_and_grads(pot, full, loss_fn)[1]["forces"].detach()), 1e-9
    )

    # no forces labels at all: no forces term, no forces gradient (equals energy-only loss)
    no_f = collate(ds, pairs, pot.cutoff)
    no_f.forces_mask[:] = False
    no_f.forces[:] = 1e6
    out = pot(no_f, forces=True, create_graph=True)
    loss_nf, terms_nf = loss_fn(out, no_f)
    assert "forces" not in terms_nf and "stress" not in terms_nf
    assert loss_fn.needs(no_f) == (False, False)
    energy_only = MultiFidelityLoss(energy=1.0, forces=0.0)
    loss_eo, _, grads_eo = _loss_and_grads(pot, full, energy_only)
    assert float(loss_nf.detach()) == _approx(float(loss_eo.detach()), 1e-9)
    for a, b in zip(_param_grads(pot, loss_nf), grads_eo):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


class _Approx:
    def __init__(self, value: float, rel: float):
        self.value, self.rel = float(value), rel

    def __eq__(self, other) -> bool:
        return abs(float(other) - self.value) <= self.rel * max(1.0, abs(self.value))

    def __repr__(self) -> str:
        return f"{self.value!r} ± {self.rel:g} (relative, at least absolute)"


def _approx(value: float, rel: float = 1e-9) -> _Approx:
    """== within rel·max(1, |value|)."""
    return _Approx(value, rel)
