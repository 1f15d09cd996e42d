"""ASE calculator: finite differences, NVE energy conservation, FIRE relaxation with a cell filter,
fidelity switching by name, clear errors. Uses a small PaiNN trained on the shared solids
(tests/data/solids_painn.yaml) and an untrained M3GNet."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from conftest import si64, tiny_m3gnet

import multifi
from multifi.errors import MultifiError
from multifi.models.registry import load_potential

CKPT = Path(__file__).parent / "data" / "solids_painn.pt"


def m3gnet_potential():
    """The tiny two-fidelity M3GNet, fidelity vectors at the readout only, equal energy scales."""
    return tiny_m3gnet(inject="readout", scale=(0.1, 0.1))


@pytest.mark.parametrize("source", ["painn", "m3gnet"])
def test_forces_and_stress_equal_finite_differences(source):
    pot = CKPT if source == "painn" else m3gnet_potential()
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.05, seed=3)
    atoms.set_cell(
        atoms.cell @ (np.eye(3) + [[0.01, 0.004, 0], [0.004, -0.01, 0.002], [0, 0.002, 0.005]]), scale_atoms=True
    )
    calc = multifi.Calculator(pot, fidelity="PBE", dtype="float64")
    atoms.calc = calc
    forces, stress = atoms.get_forces(), atoms.get_stress()
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5  # non-trivial
    np.testing.assert_allclose(forces, calc.calculate_numerical_forces(atoms, d=1e-4), atol=2e-5)
    np.testing.assert_allclose(stress, calc.calculate_numerical_stress(atoms, d=1e-5), atol=2e-6)


def test_float32_results_do_not_depend_on_where_the_structure_sits():
    """A float32 model formed edge vectors from float32 absolute positions: a molecule 10⁴ Å from the origin lost
    0.4 meV and 2e-3 eV/Å, a crystal whose atoms an MD run left unwrapped 1000 cells away 5e-3 eV/Å. Positions are
    made local in float64 first (translation, whole lattice vectors), so the results are the same anywhere."""
    solid = si64(rattle=0.05)
    far = solid.copy()
    far.positions += 1000 * far.cell.array.sum(0)  # every atom 1000 cells away, unwrapped
    far.positions[::3] -= 7 * far.cell.array[1]  # some wrapped back in part
    mol = molecule("CO2") + molecule("NO2")  # elements of the model's solids, a cluster
    mol.positions[3:] += [2.5, 0, 0]
    mol.rattle(0.05, seed=2)
    away = mol.copy()
    away.positions += 1e4
    for pot, pair in ((CKPT, (solid, far)), (CKPT, (mol, away))):
        calc = multifi.Calculator(pot, fidelity="PBE")  # float32
        (e0, f0), (e1, f1) = [(calc.get_potential_energy(a), calc.get_forces(a)) for a in pair]
        assert e1 == pytest.approx(e0, abs=2e-5 * len(pair[0])) and np.abs(f1 - f0).max() < 2e-5


def test_nve_md_conserves_energy_64_atom_si():
    """VelocityVerlet, 1 fs, 300 K start, 400 steps on 64-atom Si: drift per atom per ps and fluctuation."""
    atoms = si64()
    atoms.calc = multifi.Calculator(CKPT, fidelity="R2SCAN")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))  # ASE deprecation only
    Stationary(atoms)
    energies = []
    md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    md.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    md.run(400)
    e = np.array(energies) / len(atoms)
    t_ps = np.arange(len(e)) * 1e-3
    drift = np.polyfit(t_ps, e, 1)[0]  # eV / atom / ps
    assert atoms.get_temperature() > 50  # atoms really moved
    assert abs(drift) < 1e-4, f"drift {drift * 1e3:.4f} meV/atom/ps"
    assert e.std() < 1e-4


def test_fire_relaxation_with_cell_filter():
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = multifi.Calculator(CKPT, fidelity="PBE")
    e0 = atoms.get_potential_energy()
    f0 = np.abs(atoms.get_forces()).max()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    converged = opt.run(fmax=0.05, steps=1000)
    assert converged
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05 < f0
    assert atoms.get_potential_energy() < e0


def test_switch_fidelity_by_name_and_errors():
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    calc = multifi.Calculator(CKPT, fidelity="PBE")
    atoms.calc = calc
    e_pbe = atoms.get_potential_energy()
    calc.fidelity = "R2SCAN"
    e_r2 = atoms.get_potential_energy()
    assert calc.fidelities == ["PBE", "R2SCAN"]
    assert abs(e_pbe - e_r2) > 1e-3  # reference energies of the two functionals differ strongly
    with pytest.raises(MultifiError, match=rf"^{re.escape(str(CKPT))}: unknown fidelity 'r2scn'.*R2SCAN"):
        calc.fidelity = "r2scn"  # the error names the model file, as the command line does
    with pytest.raises(MultifiError, match="element Au was not seen in training"):
        bad = bulk("Au", "fcc", 4.08)
        bad.calc = calc
        bad.get_potential_energy()


def test_ase_set_changes_the_fidelity_and_misspelled_arguments_are_errors():
    """calc.set(fidelity=…) (ASE's way) switches like calc.fidelity = …; keywords the calculator does not have
    are errors, not parameters that do nothing."""
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    calc = multifi.Calculator(CKPT, fidelity="PBE")
    atoms.calc = calc
    e_pbe = atoms.get_potential_energy()
    assert calc.set(fidelity="R2SCAN") == {"fidelity": "R2SCAN"} and calc.parameters["fidelity"] == "R2SCAN"
    e_r2 = atoms.get_potential_energy()
    fresh = atoms.copy()
    fresh.calc = multifi.Calculator(CKPT, fidelity="R2SCAN")
    assert e_r2 == fresh.get_potential_energy() and abs(e_r2 - e_pbe) > 1e-3
    assert calc.set(fidelity="R2SCAN") == {}
    with pytest.raises(MultifiError, match="unknown argument 'strict_reference'; did you mean 'strict_references'"):
        multifi.Calculator(CKPT, fidelity="PBE", strict_reference=True)
    with pytest.raises(MultifiError, match="unknown argument 'dtpye'; did you mean 'dtype'"):
        multifi.Calculator(CKPT, fidelity="PBE", dtpye="float32")
    with pytest.raises(MultifiError, match="dtype is fixed when the calculator is made"):
        calc.set(dtype="float32")
    own = multifi.Calculator(load_potential(CKPT), fidelity="PBE", dtype="float32")  # the model's own (no copy)
    own.potential.double()  # after the calculator was made: a dtype mismatch deep inside the model (a traceback)
    with pytest.raises(MultifiError, match="calc.potential is now float64, the calculator computes in float32"):
        own.get_potential_energy(bulk("Si", "diamond", 5.43, cubic=True))
    multifi.Calculator(CKPT, fidelity="PBE", label="si", directory=".")  # ASE's own keywords stay allowed


def test_non_finite_positions_are_a_one_line_error():
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.positions[3, 1] = np.nan
    atoms.calc = multifi.Calculator(CKPT, fidelity="PBE")
    with pytest.raises(MultifiError, match=r"atom 3 \(0-based\) has a non-finite \(NaN/inf\) position"):
        atoms.get_potential_energy()
    for bad in (np.nan, np.inf):  # a periodic cell vector: LAPACK's least squares never returned (a hang)
        cell = bulk("Si", "diamond", 5.43, cubic=True)
        cell.cell[0, 0] = bad
        cell.calc = multifi.Calculator(CKPT, fidelity="PBE")
        with pytest.raises(MultifiError, match=r"structure 0: the cell has non-finite \(NaN/inf\) entries"):
            cell.get_potential_energy()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_a_one_line_error():
    """device="cuda" without CUDA was torch's AssertionError; the CLI's --device already said it in one line."""
    with pytest.raises(MultifiError, match="cuda: no CUDA device on this machine"):
        multifi.Calculator(CKPT, fidelity="PBE", device="cuda")
    with pytest.raises(MultifiError, match="not a device: 'gpu'"):
        multifi.Calculator(CKPT, fidelity="PBE", device="gpu")
    with pytest.raises(MultifiError, match="meta: not a device to run a model on"):  # was torch's NotImplementedError
        multifi.Calculator(CKPT, fidelity="PBE", device="meta")


def test_molecule_has_no_stress():
    pot = m3gnet_potential()
    atoms = molecule("SiH4")
    atoms.calc = multifi.Calculator(pot, fidelity="PBE")
    with pytest.raises(MultifiError, match="unknown|not seen"):
        atoms.get_potential_energy()  # H was never given a reference energy: unknown element


def test_stress_of_a_non_periodic_structure_is_not_implemented_as_ase_says():
    """ASE code catches PropertyNotImplementedError for a property a calculator cannot give here; the CLI a
    MultifiError: the error is both."""
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.pbc = False
    atoms.calc = multifi.Calculator(CKPT, fidelity="PBE")
    assert np.isfinite(atoms.get_potential_energy())
    for kind in (PropertyNotImplementedError, MultifiError):
        with pytest.raises(kind, match="stress needs a periodic cell"):
            atoms.get_stress()


def test_a_slab_without_vacuum_predicts_as_with_vacuum_and_has_no_stress(tmp_path, caplog):
    """ASE's surface builders leave the non-periodic cell vector zero (fcc111, diamond100 without vacuum): that
    was an error. Energy and forces equal those of the same slab given vacuum; stress (per volume) is an error
    in the calculator, absent in predict, and a stress label on such a cell is an error naming the structure;
    a periodic direction without its vector is still an error."""
    import ase.io
    from ase.build import diamond100

    from multifi.data.readers.ase_files import read_ase
    from multifi.predict import predict_atoms

    slab = diamond100("Si", size=(2, 2, 4))
    slab.rattle(0.05, seed=1)
    assert slab.cell.array[2].tolist() == [0, 0, 0] and slab.pbc.tolist() == [True, True, False]
    padded = slab.copy()
    padded.center(vacuum=8.0, axis=2)
    results = []
    for atoms in (slab, padded):
        atoms.calc = multifi.Calculator(CKPT, fidelity="PBE", dtype="float64")
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-8)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-8)
    assert np.abs(results[0][1]).max() > 1e-2
    with pytest.raises(MultifiError, match="stress needs a cell whose volume holds the structure.*atoms.center"):
        slab.get_stress()
    in_plane = slab.copy()  # a third vector in the plane of the periodic ones: no volume either, and said so
    in_plane.cell[2] = in_plane.cell[0]
    in_plane.calc = multifi.Calculator(CKPT, fidelity="PBE", dtype="float64")
    with pytest.raises(MultifiError, match="no volume: a zero cell vector, or one in the plane"):
        in_plane.get_stress()
    assert np.abs(padded.get_stress()).max() > 0
    for height in (1e-6, 0.5):  # a vector shorter than the slab is no vacuum: its stress scaled with 1/height
        short = slab.copy()
        short.cell[2] = [0.0, 0.0, height]
        short.calc = multifi.Calculator(CKPT, fidelity="PBE", dtype="float64")
        assert short.get_potential_energy() == pytest.approx(results[0][0], abs=1e-8)
        with pytest.raises(MultifiError, match="shorter than the structure along a non-periodic direction"):
            short.get_stress()
    pot = multifi.Calculator(CKPT, fidelity="PBE").potential
    with caplog.at_level(logging.WARNING, logger="multifi"):
        _, _, stresses = predict_atoms(pot, [padded, slab, short], "PBE")
    assert stresses[0] is not None and stresses[1] is None and stresses[2] is None
    assert "1 periodic structure(s) get no stress (e.g. structure 1): this cell has no volume" in caplog.text
    assert "1 periodic structure(s) get no stress (e.g. structure 2): this cell is shorter than" in caplog.text
    labelled = slab.copy()
    labelled.info.update(energy=-80.0, stress=np.zeros(6), fidelity="PBE")
    ase.io.write(tmp_path / "slab.extxyz", labelled)
    with pytest.raises(MultifiError, match=r"slab.extxyz.*structure 0: a stress label on a cell without volume"):
        read_ase(tmp_path / "slab.extxyz")
    no_area = slab.copy()
    no_area.cell[1] = 0
    no_area.calc = multifi.Calculator(CKPT, fidelity="PBE")
    with pytest.raises(MultifiError, match=r"pbc TTF.*zero area"):
        no_area.get_potential_energy()


def test_calculator_keeps_the_model_precision_unless_told():
    """A float64 model computes in float64 by default (as multifi predict does), a float32 one in float32;
    an explicit dtype wins; an unknown one is a one-line error."""
    import torch

    wide = m3gnet_potential().double()
    assert multifi.Calculator(wide, fidelity="PBE").dtype == torch.float64
    assert multifi.Calculator(m3gnet_potential(), fidelity="PBE").dtype == torch.float32
    assert multifi.Calculator(wide, fidelity="PBE", dtype="float32").dtype == torch.float32
    assert multifi.Calculator(wide, fidelity="PBE", dtype=torch.float32).dtype == torch.float32
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.calc = multifi.Calculator(wide, fidelity="PBE")
    e64 = atoms.get_potential_energy()
    atoms.calc = multifi.Calculator(wide, fidelity="PBE", dtype="float64")
    assert atoms.get_potential_energy() == e64
    with pytest.raises(MultifiError, match="dtype 'half'"):
        multifi.Calculator(wide, fidelity="PBE", dtype="half")


def test_a_potential_given_as_module_is_left_untouched():
    """Calculator(potential) works on a copy: the caller's module keeps its dtype, training mode, trainable
    parameters and compile setting (a second calculator on the same module changes nothing in the first)."""
    import torch

    pot = m3gnet_potential().train()
    before = {k: v.clone() for k, v in pot.state_dict().items()}
    eager = multifi.Calculator(pot, fidelity="PBE", dtype="float64", compile=False)
    multifi.Calculator(pot, fidelity="R2SCAN", compile=True)
    assert pot.training and not pot.use_compile and not eager.potential.use_compile
    assert all(p.requires_grad and p.dtype == torch.float32 for p in pot.parameters())
    assert all(torch.equal(v, before[k]) for k, v in pot.state_dict().items())
    assert next(eager.potential.parameters()).dtype == torch.float64


def test_state_check_finds_the_changes_ase_finds():
    """The calculator's exact comparison (cheaper than ASE's tolerance test, asked 2-3 times per MD step) reports
    what ASE's compare_atoms reports, and a result is recomputed after each change."""
    from ase.calculators.calculator import compare_atoms

    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    calc = multifi.Calculator(CKPT, fidelity="PBE")
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    assert calc.check_state(atoms) == [] and calc.get_property("energy", atoms, allow_calculation=False) == e0
    edits = {
        "positions": lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] + 1e-6),
        "cell": lambda a: a.set_cell(a.cell * 1.001, scale_atoms=False),
        "pbc": lambda a: a.set_pbc([True, True, False]),
        "numbers": lambda a: a.numbers.__setitem__(0, 6),
        "initial_magmoms": lambda a: a.set_initial_magnetic_moments(np.ones(len(a))),
        "initial_charges": lambda a: a.set_initial_charges(np.zeros(len(a))),
    }
    for name, edit in edits.items():
        changed = atoms.copy()
        edit(changed)
        assert calc.check_state(changed) == compare_atoms(calc.atoms, changed) == [name], name
    moved = atoms.copy()
    moved.positions[1] += 0.05
    moved.calc = calc
    assert moved.get_potential_energy() != pytest.approx(e0, abs=1e-9)  # recomputed
    calc.ignored_changes = {"initial_magmoms"}
    magnetic = moved.copy()
    magnetic.set_initial_magnetic_moments(np.ones(len(magnetic)))
    assert calc.check_state(magnetic) == []


def test_stress_comes_with_the_forces_of_a_periodic_cell():
    """A cell relaxation or NPT step asks for forces, then stress: one model evaluation, not two, once a stress was
    asked for (MD that never asks computes none)."""
    pot = m3gnet_potential()
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    calc = multifi.Calculator(pot, fidelity="PBE", script=False)
    atoms.calc = calc
    calls = []
    forward = calc.potential.forward
    calc.potential.forward = lambda *a, **k: calls.append(k.get("stress")) or forward(*a, **k)
    atoms.get_forces()  # MD that never asks for stress: none computed
    atoms.get_stress()
    assert calls == [False, True]
    atoms.positions[0] += 0.01  # the next step of a relaxation: forces, then stress, one evaluation
    atoms.get_forces()
    stress = atoms.get_stress()
    assert calls == [False, True, True] and np.abs(stress).max() > 0
    fresh = multifi.Calculator(pot, fidelity="PBE", script=False)
    np.testing.assert_array_equal(fresh.get_stress(atoms), stress)  # the same as when asked for first


def test_stress_at_a_fidelity_trained_without_stress_labels_is_said_once(caplog):
    """r2SCAN in the shared solids has no stress labels: a cell relaxation at it ran without a hint."""
    pot = m3gnet_potential()
    pot.spec["stress_labels"] = {"PBE": 40, pot.fidelities.names[1]: 0}
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    for name, said in (("PBE", False), (pot.fidelities.names[1], True)):
        atoms.calc = multifi.Calculator(pot, fidelity=name)
        caplog.clear()
        with caplog.at_level("WARNING", logger="multifi"):
            atoms.get_stress()
            atoms.positions[0] += 0.01
            atoms.get_stress()
        assert caplog.text.count("no training structure had a stress label") == int(said), caplog.text
    # predict too (its stresses feed screenings), once per call, naming the file
    from multifi.predict import predict_atoms

    for name, said in (("PBE", False), (pot.fidelities.names[1], True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="multifi"):
            predict_atoms(pot, [atoms, atoms.copy()], name, batch_size=1, where="cells.extxyz")
        assert caplog.text.count("cells.extxyz: R2SCAN: no training structure had a stress label") == int(said)


def test_deploying_a_fidelity_trained_without_stress_labels_says_so(tmp_path, caplog, capsys):
    """LAMMPS' pressure and NPT at a fidelity without stress labels ran without the hint the calculator gives:
    deploy warns, the file records the count (stress_labels) for pair_coeff's warning, and `info` says it."""

    from multifi.cli.main import main
    from multifi.deploy import deploy, deployed_metadata

    pot = m3gnet_potential()
    other = pot.fidelities.names[1]
    pot.spec["stress_labels"] = {"PBE": 40, other: 0}
    for name, count in (("PBE", 40), (other, 0)):
        out = tmp_path / f"{name}.pt"
        caplog.clear()
        with caplog.at_level("WARNING", logger="multifi"):
            deploy(pot, name, out)
        said = f"{out}: {other}: no training structure had a stress label"
        assert caplog.text.count(said) == int(count == 0), caplog.text
        assert deployed_metadata(out)["stress_labels"] == count
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        assert ("warning: no training structure had a stress label" in capsys.readouterr().out) == (count == 0)
    for counts in ({"PBE": 0, other: 0}, None):  # no stress labels at all (molecules: said too), or not recorded
        if counts is None:
            del pot.spec["stress_labels"]
        else:
            pot.spec["stress_labels"] = counts
        caplog.clear()
        with caplog.at_level("WARNING", logger="multifi"):
            deploy(pot, other, tmp_path / "old.pt")
        assert ("stress label" in caplog.text) == (counts is not None)
        assert deployed_metadata(tmp_path / "old.pt")["stress_labels"] == (None if counts is None else 0)


def test_a_trajectory_of_the_calculator_is_no_label_file_but_a_selection_pool(tmp_path, capsys):
    """A relaxation's .traj keeps the calculator's results: `evaluate` scored the model against itself (0.000
    everywhere); now an error. As a selection pool its frames are candidates without labels."""
    import ase.io
    from ase.optimize import FIRE

    from multifi.cli.main import main
    from multifi.select import read_pool

    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.05, seed=0)
    atoms.info["fidelity"] = "PBE"  # even when the frames name a fidelity
    atoms.calc = multifi.Calculator(CKPT, fidelity="PBE")
    FIRE(atoms, trajectory=str(tmp_path / "relax.traj"), logfile=None).run(steps=2)
    assert ase.io.read(tmp_path / "relax.traj", 0).calc.name == "multifi"
    assert main(["evaluate", str(CKPT), str(tmp_path / "relax.traj"), "--fidelity", "PBE"]) == 2
    assert "holds results of multifi's calculator" in capsys.readouterr().err
    pool = read_pool(str(tmp_path / "relax.traj"))
    assert len(pool) >= 2 and not pool.energy_mask.any()
    assert main(["data", "info", str(tmp_path / "relax.traj")]) == 0  # its frames, as unlabelled structures
    assert f"structures: {len(pool)}" in capsys.readouterr().out
    # predict its last frame (--index): the calculator's results are not kept as reference labels
    out = tmp_path / "last.extxyz"
    predict = ["predict", str(CKPT), str(tmp_path / "relax.traj"), "--fidelity", "PBE", "--out"]
    assert main([*predict, str(out), "--index", "-1"]) == 0
    (last,) = ase.io.read(out, ":")
    assert "ref_energy" not in last.info and "ref_forces" not in last.arrays
    np.testing.assert_allclose(last.positions, ase.io.read(tmp_path / "relax.traj", -1).positions, atol=1e-6)
    assert main([*predict, str(tmp_path / "x.extxyz"), "--index", "x"]) == 2
    assert "'x' is not a frame index ASE reads" in capsys.readouterr().err


def test_a_fidelity_blind_model_says_that_the_fidelity_selects_nothing(caplog):
    """inject: single pools the labels of all fidelities: asking it for one of them gives the pool's answer,
    the same for each; said once per model (not at every switch), and not by a model with one fidelity."""
    import logging

    pot = tiny_m3gnet(inject="single")
    si = si64()[:8]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        calc = multifi.Calculator(pot, fidelity="PBE")
        si.calc = calc
        e_pbe = si.get_potential_energy()
        calc.fidelity = "R2SCAN"
        assert si.get_potential_energy() == pytest.approx(e_pbe, abs=1e-9)
    assert caplog.text.count("fidelity-blind (fidelity_embedding.inject: single)") == 1
    assert "'PBE', 'R2SCAN'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        multifi.Calculator(tiny_m3gnet(inject="both"), fidelity="PBE")
    assert "fidelity-blind" not in caplog.text


def test_the_fidelity_edited_in_calc_parameters_is_the_one_computed():
    """ASE keeps a calculator's settings in calc.parameters (what todict() reports): editing the fidelity there,
    with or without calc.reset(), computes that fidelity, never the previous one's cached or recomputed result."""
    si = si64()[:8]
    ref = {}
    for name in ("PBE", "R2SCAN"):
        si.calc = multifi.Calculator(tiny_m3gnet(), fidelity=name)
        ref[name] = si.get_potential_energy()
    assert abs(ref["PBE"] - ref["R2SCAN"]) > 1e-3
    calc = multifi.Calculator(tiny_m3gnet(), fidelity="PBE")
    si.calc = calc
    assert si.get_potential_energy() == pytest.approx(ref["PBE"], abs=1e-6)
    calc.parameters["fidelity"] = "R2SCAN"
    assert si.get_potential_energy() == pytest.approx(ref["R2SCAN"], abs=1e-6)  # no reset: not the cached PBE
    assert calc.fidelity == "R2SCAN" and calc.todict()["fidelity"] == "R2SCAN"
    calc.parameters["fidelity"] = "PBE"
    calc.reset()
    assert si.get_potential_energy() == pytest.approx(ref["PBE"], abs=1e-6)
    calc.parameters["fidelity"] = "pbe"
    with pytest.raises(MultifiError, match="fidelity 'pbe'"):
        si.get_potential_energy()


def test_a_copied_calculator_switches_fidelity_without_switching_the_original():
    """copy.copy(calc) shares the model but not the settings: the copy's fidelity does not become the original's
    (Python's shallow copy shared ASE's parameters dict, so the original computed the copy's fidelity silently)."""
    import copy

    si = si64()[:8]
    calc = multifi.Calculator(tiny_m3gnet(), fidelity="PBE")
    si.calc = calc
    pbe = si.get_potential_energy()
    twin = copy.copy(calc)
    assert twin.potential is calc.potential and twin.parameters is not calc.parameters
    bound = [v for v in vars(twin).values() if hasattr(v, "__self__") and isinstance(v.__self__, multifi.Calculator)]
    assert all(method.__self__ is twin for method in bound)  # no method of the copy acts on the original
    twin.fidelity = "R2SCAN"
    other = si.copy()
    other.calc = twin
    r2scan = other.get_potential_energy()
    assert abs(r2scan - pbe) > 1e-3
    si.positions[0] += 0.01  # a new structure: computed again, at the original's own fidelity
    assert calc.fidelity == "PBE" and calc.parameters["fidelity"] == "PBE"
    fresh = si.copy()
    fresh.calc = multifi.Calculator(tiny_m3gnet(), fidelity="PBE")
    assert si.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-6)
    assert twin.fidelity == "R2SCAN" and twin.results is not calc.results


def test_predict_atoms_takes_one_atoms_as_a_list_of_one_and_names_other_objects():
    from multifi.predict import predict_atoms

    pot, si = tiny_m3gnet(), si64()[:8]
    energies, forces, _ = predict_atoms(pot, si, "PBE")
    ref_e, ref_f, _ = predict_atoms(pot, [si], "PBE")
    assert len(energies) == 1 and energies[0] == pytest.approx(ref_e[0], abs=1e-9)
    np.testing.assert_allclose(forces[0], ref_f[0], atol=1e-9)
    with pytest.raises(MultifiError, match="predict_atoms: expected ase.Atoms objects, got Atom"):
        predict_atoms(pot, list(si), "PBE")


def test_per_atom_energies_sum_to_the_energy_and_follow_the_fidelity():
    """atoms.get_potential_energies(): one energy per atom summing to the structure's energy, at the chosen
    fidelity, in the same call that gives forces (results cached together)."""
    si = si64()[:8]
    si.rattle(0.05, seed=1)
    si.calc = calc = multifi.Calculator(tiny_m3gnet(), fidelity="PBE", dtype="float64")
    per_atom = si.get_potential_energies()
    assert per_atom.shape == (8,) and per_atom.std() > 0
    assert per_atom.sum() == pytest.approx(si.get_potential_energy(), abs=1e-9)
    forces = si.get_forces()
    np.testing.assert_allclose(forces, calc.results["forces"])
    calc.fidelity = "R2SCAN"
    other = si.get_potential_energies()
    assert other.sum() == pytest.approx(si.get_potential_energy(), abs=1e-9)
    assert abs(other.sum() - per_atom.sum()) > 1e-3


def test_predictions_under_a_callers_inference_mode_and_from_a_model_path(model):
    """torch.inference_mode() around a pipeline broke forces ('element 0 of tensors does not require grad'):
    predict_atoms, the calculator and the potential now compute them as outside it. predict_atoms takes a model
    path as the calculator does; a calculator asked for results with no structure (after a fidelity switch
    reset it) says so; a batch size that is no positive integer is a one-line error."""
    from multifi.data.batch import graph_from_atoms
    from multifi.predict import predict_atoms

    h2o = molecule("H2O")
    pot = load_potential(model)
    energy, forces, _ = predict_atoms(pot, [h2o], "lo")
    with torch.inference_mode():
        e_inf, f_inf, _ = predict_atoms(model, [h2o], "lo")  # a path, as the calculator takes
        out = pot(graph_from_atoms([h2o], pot.cutoff, 0), forces=True)
        calc = multifi.Calculator(model, fidelity="lo")
        h2o.calc = calc
        f_calc = h2o.get_forces()
    np.testing.assert_array_equal(e_inf, energy)
    np.testing.assert_array_equal(f_inf[0], forces[0])
    np.testing.assert_allclose(out["forces"].numpy(), forces[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(f_calc, forces[0], rtol=0, atol=1e-6)
    calc.fidelity = "hi"
    with pytest.raises(MultifiError, match="no structure to compute"):
        calc.get_potential_energy()
    assert np.isfinite(h2o.get_potential_energy())  # with its atoms, as ever
    for bad in (2.5, "2", 0, True):
        with pytest.raises(MultifiError, match="batch size must be a positive number of structures"):
            predict_atoms(pot, [h2o], "lo", batch_size=bad)


def test_atoms_absurdly_far_apart_are_an_error_not_a_crash(model):
    """An atom 1e9 Å away made vesin's cell list divide by zero: the process died (SIGFPE), or predictions came
    back NaN with warnings only. Structures spanning more than 1e6 Å are a one-line error; 1e4 Å still predicts."""
    from ase import Atoms

    from multifi.predict import predict_atoms

    pot = load_potential(model)
    far = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [1e9, 0, 0]])
    with pytest.raises(MultifiError, match=r"atoms 1e\+09 Å apart: no structure spans that"):
        predict_atoms(pot, [far], "lo")
    far.calc = multifi.Calculator(model, fidelity="lo")
    with pytest.raises(MultifiError, match="no structure spans that"):
        far.get_potential_energy()
    apart = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [1e4, 0, 0]])
    assert np.isfinite(predict_atoms(pot, [apart], "lo")[0]).all()
