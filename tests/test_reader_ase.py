"""read_ase: extxyz / ASE database / traj → FidelityDataset, and its one-line errors."""

import re

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa

from multifi.data.readers.ase_files import read_ase
from multifi.errors import MultifiError


def labelled(atoms: Atoms, energy=-1.5, seed=0, stress=True, **info) -> Atoms:
    """atoms with a SinglePointCalculator: energy eV, forces eV/Å, Voigt stress eV/Å³."""
    rng = np.random.default_rng(seed)
    results = {"energy": energy, "forces": rng.normal(size=(len(atoms), 3))}
    if stress:
        results["stress"] = rng.normal(scale=0.01, size=6)
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(info)
    return atoms


def si(seed=0, **kw) -> Atoms:
    atoms = bulk("Si", cubic=True)
    atoms.rattle(0.05, seed=seed)
    return labelled(atoms, seed=seed, **kw)


def water(energy=-3.0, **kw) -> Atoms:
    return labelled(molecule("H2O"), energy=energy, stress=False, **kw)


def voigt_to_matrix(v):
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def raises_one_line(path, match):
    """pytest.raises for a MultifiError that names the file, matches `match` and is one line."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(MultifiError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert path.name in msg and "\n" not in msg, msg
            return out

    return Check()


def test_extxyz_roundtrip_stress_in_gpa(tmp_path):
    frames = [si(0), si(1)]
    path = tmp_path / "si.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = read_ase(path, fidelity="PBE")
    assert len(ds) == 2 and ds.fidelities.names == ("PBE",)
    for i, atoms in enumerate(frames):
        res = atoms.calc.results
        assert ds.energy[i, 0] == pytest.approx(res["energy"])
        np.testing.assert_allclose(ds.forces[ds.atoms_slice(i), 0], res["forces"], rtol=1e-6)
        np.testing.assert_allclose(ds.stress[i, 0], voigt_to_matrix(res["stress"]) / GPa, rtol=1e-8)
        np.testing.assert_allclose(ds.positions[ds.atoms_slice(i)], atoms.positions, atol=1e-7)
        np.testing.assert_allclose(ds.cells[i], atoms.cell.array)
    assert ds.pbc.all() and ds.has_stress().all()
    assert ds.source == str(path) and ds.n_dropped == 0
    # 0.01 eV/Å³ is 1.6 GPa
    assert abs(ds.stress).max() > 0.1


def test_per_structure_fidelity_two_fidelities_in_one_file(tmp_path):
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, [water(-3.0, fidelity="PBE"), water(-2.0, fidelity="B3LYP"), water(-4.0, fidelity="PBE")])
    ds = read_ase(path)
    assert set(ds.fidelities.names) == {"PBE", "B3LYP"}
    # identical geometries share a geometry key; from_records keeps them as separate structures
    assert ds.label_counts() == {
        "PBE": {"energy": 2, "forces": 2, "stress": 0},
        "B3LYP": {"energy": 1, "forces": 1, "stress": 0},
    }
    k = ds.fidelities.index("B3LYP")
    assert ds.energy[1, k] == -2.0 and np.isnan(ds.energy[0, k])
    assert not ds.pbc.any() and not ds.cells.any()


def test_source_fidelity_labels_only_structures_naming_none_and_key_from_info(tmp_path):
    path = tmp_path / "w.xyz"
    ase.io.write(path, [water(fidelity="PBE", key="qm9:17"), water(-2.0)])
    ds = read_ase(path, fidelity="PBE")  # the same name: agrees with the frame
    assert ds.fidelities.names == ("PBE",) and ds.keys.tolist()[0] == "qm9:17"
    assert ds.energy[:, 0].tolist() == [-3.0, -2.0]  # frame 1 names none: the source's fidelity


def test_source_fidelity_conflicting_with_the_frame_is_an_error(tmp_path):
    path = tmp_path / "w.xyz"
    ase.io.write(path, [water(fidelity="PBE"), water(-2.0, fidelity="EMT")])
    with raises_one_line(
        path, r"frame 1 \(0-based\): names fidelity 'EMT' \(info\['fidelity'\]\) but its source says 'PBE'"
    ):
        read_ase(path, fidelity="PBE")


def test_info_labels_without_calculator(tmp_path):
    atoms = molecule("CH4", vacuum=4.0, pbc=True)  # in a periodic box: a stress label needs a cell
    atoms.info.update(energy=-8.0, stress=np.full(6, 0.001))
    atoms.arrays["forces"] = np.ones((5, 3))
    path = tmp_path / "ch4.xyz"
    ase.io.write(path, atoms)
    ds = read_ase(path, fidelity="X")
    assert ds.energy[0, 0] == -8.0 and ds.forces[:, 0].sum() == 15
    np.testing.assert_allclose(ds.stress[0, 0], np.full((3, 3), 0.001 / GPa))
    atoms.pbc = False
    ase.io.write(path, atoms)
    with raises_one_line(path, r"structure 0: a stress label on a non-periodic structure"):
        read_ase(path, fidelity="X")


def test_periodic_extxyz_with_mixed_pbc(tmp_path):
    slab = bulk("Cu", cubic=True) * (1, 1, 2)
    slab.pbc = (True, True, False)
    path = tmp_path / "slab.xyz"
    ase.io.write(path, [labelled(slab, stress=False), si(3)])
    ds = read_ase(path, fidelity="PBE")
    assert ds.pbc.tolist() == [[True, True, False], [True, True, True]]
    np.testing.assert_allclose(ds.cells[0], slab.cell.array)
    assert ds.has_stress().tolist() == [[False], [True]]
    assert ds.keys[0] != ds.keys[1] and ds.keys[0].startswith("sha1:")


def test_ase_database(tmp_path):
    path = tmp_path / "structures.db"
    with ase.db.connect(path) as db:
        db.write(si(0), fidelity="PBE", key="si-0")
        db.write(water(), fidelity="B3LYP")
    ds = read_ase(path)
    assert ds.keys[0] == "si-0" and set(ds.fidelities.names) == {"PBE", "B3LYP"}
    assert ds.label_counts()["PBE"] == {"energy": 1, "forces": 1, "stress": 1}
    assert len(read_ase(path, index="1:")) == 1


def test_traj_and_index(tmp_path):
    path = tmp_path / "run.traj"
    ase.io.write(path, [si(i) for i in range(4)])
    assert len(read_ase(path, fidelity="PBE")) == 4
    assert len(read_ase(path, fidelity="PBE", index="::2")) == 2


def test_missing_file(tmp_path):
    path = tmp_path / "absent.xyz"
    with raises_one_line(path, "no such file"):
        read_ase(path, fidelity="PBE")


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.weird"
    path.write_text("hello\nworld\n")
    with raises_one_line(path, "not a file format ASE can read"):
        read_ase(path, fidelity="PBE")


@pytest.mark.parametrize("cut", [0.3, 0.55, 0.8])
def test_truncated_extxyz(tmp_path, cut):
    good = tmp_path / "good.xyz"
    ase.io.write(good, [si(0), si(1)])
    text = good.read_text()
    path = tmp_path / "cut.xyz"
    path.write_text(text[: int(len(text) * cut)])  # mid-frame, often mid-line
    with raises_one_line(path, r"unreadable or truncated at frame [01] \(0-based\)"):
        read_ase(path, fidelity="PBE")


def test_corrupt_database(tmp_path):
    path = tmp_path / "broken.db"
    path.write_bytes(b"not sqlite" * 100)
    with raises_one_line(path, "unreadable or truncated"):
        read_ase(path)


def test_missing_fidelity(tmp_path):
    path = tmp_path / "w.xyz"
    ase.io.write(path, [water(fidelity="PBE"), water()])
    with raises_one_line(path, r"frame 1 \(0-based\): no fidelity"):
        read_ase(path)


def test_structure_without_labels(tmp_path):
    path = tmp_path / "w.xyz"
    ase.io.write(path, [water(), water(), water(), molecule("H2O")])
    with raises_one_line(path, r"frame 3 \(0-based\) has no energy/forces/stress label"):
        read_ase(path, fidelity="PBE")


def test_nonfinite_labels_raise_or_drop(tmp_path):
    bad_e, bad_f = water(energy=np.nan), water()
    bad_f.calc.results["forces"][0, 0] = np.inf
    only_nan = molecule("H2O")
    only_nan.info["energy"] = np.inf
    path = tmp_path / "nan.xyz"
    ase.io.write(path, [water(), bad_e, bad_f, only_nan])
    with raises_one_line(path, r"3 non-finite \(NaN/inf\) labels, first in frame 1 \(0-based\)"):
        read_ase(path, fidelity="PBE")
    ds = read_ase(path, fidelity="PBE", skip_invalid=True)
    assert len(ds) == 3 and ds.n_dropped == 3  # frame 3 had nothing left
    assert ds.energy_mask[:, 0].tolist() == [True, False, True]
    assert ds.has_forces()[:, 0].tolist() == [True, True, False]


def test_bad_shapes(tmp_path):
    atoms = molecule("H2O")
    atoms.info["stress"] = np.zeros(4)
    atoms.info["energy"] = 1.0
    path = tmp_path / "shape.traj"  # extxyz itself refuses such a stress
    ase.io.write(path, atoms)
    with raises_one_line(path, r"frame 0 \(0-based\): stress has shape \(4,\)"):
        read_ase(path, fidelity="PBE")


def test_error_messages_have_no_newlines_for_multiline_exceptions(tmp_path):
    path = tmp_path / "x.xyz"
    path.write_text('2\nLattice="1 2 3" pbc="T T T"\nH 0 0 0\nH 0 0\n')
    with pytest.raises(MultifiError) as info:
        read_ase(path, fidelity="PBE")
    assert re.fullmatch(r"[^\n]+", str(info.value)) and path.name in str(info.value)


def test_one_file_with_a_label_set_per_level_of_theory(tmp_path, caplog):
    """REF_energy_PBE on every frame, REF_energy_R2SCAN on some (as multi-head training files carry them): read
    once per fidelity with renamed keys, frames without that fidelity's labels are skipped and counted, never
    given another level's labels."""
    import logging

    from conftest import rattled_molecule

    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    frames = []
    for i, name in enumerate(("H2O", "NH3", "CH4", "CO2")):
        a = rattled_molecule(name, i)
        a.info["REF_energy_PBE"] = -1.0 - i
        if i % 2 == 0:
            a.info["REF_energy_R2SCAN"] = -2.0 - i
        frames.append(a)
    path = tmp_path / "mh.extxyz"
    ase.io.write(path, frames)
    pbe = SourceConfig(path=str(path), fidelity="PBE", energy_key="REF_energy_PBE")
    r2 = SourceConfig(path=str(path), fidelity="R2SCAN", energy_key="REF_energy_R2SCAN")
    with caplog.at_level(logging.INFO, logger="multifi"):
        ds = read_sources([pbe, r2])
    assert len(ds) == 4 and ds.fidelities.names == ("PBE", "R2SCAN")
    np.testing.assert_array_equal(ds.energy[:, 0], [-1.0, -2.0, -3.0, -4.0])
    np.testing.assert_array_equal(ds.energy[:, 1], [-2.0, np.nan, -4.0, np.nan])
    assert "mh.extxyz: read 2 frames with REF_energy_R2SCAN labels, skipped 2 without" in caplog.text
    missing = SourceConfig(path=str(path), fidelity="X", energy_key="REF_energy_X")
    with pytest.raises(
        MultifiError,
        match=r"frame 0 \(0-based\) has no REF_energy_X label; it has "
        r"REF_energy_PBE, REF_energy_R2SCAN \(labels of another level of theory belong to a source "
        r"of their own\) \(nor has any other frame\)",
    ):
        read_sources([missing])


def _emt_with_stress(atoms: Atoms) -> Atoms:
    """A copy with EMT energy, forces and stress as a SinglePointCalculator, no fidelity in info."""
    from ase.calculators.emt import EMT

    a = atoms.copy()
    a.calc = EMT()
    e, f, st = a.get_potential_energy(), a.get_forces(), a.get_stress()
    a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=st)
    return a


def test_a_renamed_energy_reads_no_default_forces_and_unread_labels_are_named(tmp_path, caplog):
    """energy_key alone: the file's default `forces`/`stress` (another level of theory here) are not read, not even
    on frames without the renamed energy; one warning names them. Named explicitly, they are read."""
    import logging

    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    frames = []
    for i in range(4):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.rattle(0.05, seed=i)
        a = _emt_with_stress(a)
        if i % 2 == 0:
            a.info["energy_r2scan"] = a.get_potential_energy() - 1.0
        frames.append(a)
    path = tmp_path / "pbe_plus_r2scan.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_source(SourceConfig(path=str(path), fidelity="R2SCAN", energy_key="energy_r2scan"))
    assert len(ds) == 2 and ds.forces is None and ds.stress is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "read only the labels named (energy: energy_r2scan); not read: " in warning
    assert "forces" in warning and "stress" in warning
    both = read_source(SourceConfig(path=str(path), fidelity="R2SCAN", energy_key="energy_r2scan", forces_key="forces"))
    assert len(both) == 4 and np.isnan(both.energy[1::2, 0]).all() and both.forces is not None and both.stress is None
    # all three at their default names (configs written before the keys were optional) = nothing named
    assert SourceConfig(path="x", energy_key="energy", forces_key="forces", stress_key="stress") == SourceConfig(
        path="x"
    )
    plain = read_source(SourceConfig(path=str(path), fidelity="PBE"))  # default keys: everything, as before
    assert len(plain) == 4 and plain.forces is not None and plain.stress is not None


def test_a_virial_key_is_converted_to_stress_and_an_unnamed_one_is_named(tmp_path, caplog):
    """stress_key naming a virial (eV): σ = −W / V, the same stored stress as the file's own stress; a virial on
    a non-periodic structure is an error; a virial that is not named is mentioned, not silently dropped."""
    import logging

    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=1)
    a.set_cell(a.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.01], [0.0, 0.0, 0.98]]), scale_atoms=True)
    a = _emt_with_stress(a)
    sigma = a.get_stress(voigt=False)
    a.info["REF_energy"] = a.get_potential_energy()
    a.info["REF_virial"] = -sigma * a.get_volume()
    a.calc = None
    path = tmp_path / "virial.extxyz"
    ase.io.write(path, [a])
    ds = read_source(SourceConfig(path=str(path), fidelity="PBE", energy_key="REF_energy", stress_key="REF_virial"))
    np.testing.assert_allclose(ds.stress[0, 0], sigma / GPa, rtol=1e-9, atol=1e-9)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_source(SourceConfig(path=str(path), fidelity="PBE", energy_key="REF_energy"))
    assert "not read: REF_virial" in caplog.text
    m = a.copy()
    m.pbc = False
    ase.io.write(path, [m])
    with pytest.raises(MultifiError, match="REF_virial is a virial, which needs a cell periodic in 3 dimensions"):
        read_source(SourceConfig(path=str(path), fidelity="PBE", energy_key="REF_energy", stress_key="REF_virial"))


def test_fidelity_names_that_extxyz_reads_as_numbers_are_warned_about(tmp_path, caplog):
    """fidelity=01 and fidelity=1 (unquoted) both come back as the number 1: one name, and a warning says why."""
    import logging

    frames = []
    for i, name in enumerate(("01", "1", "T")):
        a = molecule("H2O")
        a.rattle(0.01, seed=i)
        a.info["fidelity"] = name
        a.info["energy"] = -1.0 - i
        frames.append(a)
    path = tmp_path / "numeric.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(path)
    assert "info['fidelity'] read as 1, True, not text" in caplog.text and "quoted or not" in caplog.text
    quoted = tmp_path / "quoted.extxyz"  # quoting does not help: ASE's reader still converts (advice was to quote)
    quoted.write_text('1\nfidelity="01" energy=-1.0 pbc="F F F"\nH 0 0 0\n')
    assert ase.io.read(quoted).info["fidelity"] == 1
    assert len(ds.fidelities.names) == 2  # what ASE made of them: 1 (twice) and True


def test_nine_value_stress_and_virial_labels_read_as_three_by_three():
    """MACE-style extxyz keeps REF_stress / REF_virials as 9 values row by row: read as the 3×3 tensor."""
    from multifi.data.dataset import voigt_or_matrix

    m = np.arange(9.0).reshape(3, 3)
    m = m + m.T
    assert np.array_equal(voigt_or_matrix(m.ravel()), m)
    assert np.array_equal(voigt_or_matrix(m), m)


def test_repeated_frames_are_one_structure_and_said_so(tmp_path, caplog):
    """A frame repeating a structure's label at the same fidelity (same key, or same geometry without keys) with
    the same value is counted once, with a warning naming the file; a structure at two fidelities is no repeat."""
    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    keyed = [water(-3.0 - i, key=f"w{i}", fidelity="dft") for i in range(3)]
    keyed.append(water(-4.0, key="w1", fidelity="dft"))  # w1 again, same geometry and energy
    keyed.append(water(-4.4, key="w1", fidelity="hf"))  # w1 at another fidelity: no repeat
    ase.io.write(tmp_path / "keyed.extxyz", keyed, format="extxyz")
    bare = [si(0, fidelity="dft"), si(1, fidelity="dft"), si(0, fidelity="dft")]  # a copy of the first, no keys
    ase.io.write(tmp_path / "bare.extxyz", bare, format="extxyz")
    for name, frames, structures in (("keyed", 5, 3), ("bare", 3, 2)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="multifi"):
            ds = read_sources([SourceConfig(path=str(tmp_path / f"{name}.extxyz"))])
        assert len(ds) == structures
        assert f"{name}.extxyz: 1 repeated labels" in caplog.text
        assert f"({structures} structures from {frames} frames)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        read_sources([SourceConfig(path=str(tmp_path / "keyed.extxyz"), index="0:3")])
    assert "repeated" not in caplog.text
    caplog.clear()  # one file listed twice beside another: the warning names the file repeated, not the other
    with caplog.at_level("WARNING", logger="multifi"):
        keyed_once = SourceConfig(path=str(tmp_path / "keyed.extxyz"), index="0:3")  # no repeat inside
        read_sources([keyed_once] + [SourceConfig(path=str(tmp_path / "bare.extxyz"))] * 2)
    assert "bare.extxyz: 4 repeated labels" in caplog.text and "keyed.extxyz" not in caplog.text


def test_fidelity_names_with_spaces_are_errors_and_names_alike_are_warned_about(tmp_path, caplog):
    """'MID ' beside 'MID' would be two fidelities printed alike: an error where a frame or a config names it;
    names equal up to case ('HI', 'hi') stay two fidelities, with a warning."""
    from multifi.config import SourceConfig, validate_config
    from multifi.data.fidelity import alike_names
    from multifi.data.sources import read_sources

    ase.io.write(tmp_path / "padded.extxyz", [water(fidelity="MID"), water(-3.5, fidelity="MID ")], format="extxyz")
    with pytest.raises(MultifiError, match=r"padded.extxyz: frame 1 .*fidelity name 'MID ' has leading or trailing"):
        read_sources([SourceConfig(path=str(tmp_path / "padded.extxyz"))])
    with pytest.raises(MultifiError, match=r"fidelity name ' HI' has leading or trailing spaces"):
        validate_config({"data": {"sources": [{"path": "x.extxyz", "fidelity": " HI"}]}})
    ase.io.write(tmp_path / "cases.extxyz", [water(fidelity="HI"), water(-3.5, fidelity="hi")], format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        ds = read_sources([SourceConfig(path=str(tmp_path / "cases.extxyz"))])
    assert list(ds.fidelities.names) == ["HI", "hi"]
    assert f"{tmp_path / 'cases.extxyz'}: fidelities 'HI' and 'hi' differ only in case or spaces" in caplog.text
    assert alike_names(["B3LYP", "PBE", "b3 lyp"]) == [("B3LYP", "b3 lyp")] and not alike_names(["PBE", "PBE0"])


def test_charged_or_open_shell_frames_are_warned_about(tmp_path, caplog):
    """The model has no charge or spin input: frames naming a net charge or a non-singlet spin get one warning
    with their counts; neutral singlets (charge 0, multiplicity 1) none."""
    import logging

    frames = []
    for info in ({"charge": 0, "spin": 1}, {"charge": -1}, {"total_charge": 1, "spin": 3}, {"multiplicity": 1}):
        a = molecule("H2O")
        a.info.update(info, fidelity="lo")
        a.calc = SinglePointCalculator(a, energy=-10.0)
        frames.append(a)
    ase.io.write(tmp_path / "q.extxyz", frames, format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(tmp_path / "q.extxyz")
    assert len(ds) == 4 and "2 frame(s) carry a net charge and 1 a spin state other than a singlet" in caplog.text
    caplog.clear()
    ase.io.write(tmp_path / "n.extxyz", frames[:1] + frames[3:], format="extxyz")  # fairchem's singlet: spin 1
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_ase(tmp_path / "n.extxyz")
    assert "net charge" not in caplog.text


def test_a_predict_output_read_by_its_inputs_label_keys_keeps_their_fidelity(tmp_path):
    """A file with MACE's REF_* labels at LOW, predicted at DFT: predict keeps REF_energy/REF_forces and marks the
    frames fidelity=DFT, ref_fidelity=LOW. Read back by REF_energy, those labels were filed under DFT (the
    prediction's fidelity) and scored as DFT labels; they are LOW's."""
    frames = []
    for i in range(3):
        a = molecule("H2O")
        a.rattle(0.05, seed=i)
        a.info.update(REF_energy=-3.0 - i, fidelity="LOW")
        a.arrays["REF_forces"] = np.full((3, 3), 0.1 * i)
        frames.append(a)
    ase.io.write(tmp_path / "low.extxyz", frames, format="extxyz")
    from multifi.data.readers.ase_files import PREDICTION_MARK
    from multifi.predict import predict_atoms  # noqa: F401  (the mark predict writes)

    out = ase.io.read(tmp_path / "low.extxyz", ":")
    for a in out:  # what predict writes: its energy as the calculator's, the input's fidelity moved aside
        a.info["ref_fidelity"] = a.info.pop("fidelity")
        a.info.update(fidelity="DFT", **{PREDICTION_MARK: "model.pt"})
        a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "pred.extxyz", out, format="extxyz")
    ds = read_ase(tmp_path / "pred.extxyz", keys={"energy": "REF_energy", "forces": "REF_forces"})
    assert list(ds.fidelities.names) == ["LOW"] and ds.energy[:, 0].tolist() == [-3.0, -4.0, -5.0]
    predictions = read_ase(tmp_path / "pred.extxyz", keys={"energy": "energy"})  # the predictions: at DFT
    assert list(predictions.fidelities.names) == ["DFT"] and predictions.energy[:, 0].tolist() == [-1.0] * 3


def test_frames_naming_several_mace_heads_and_no_fidelity_are_an_error(tmp_path):
    """MACE multi-head files name each frame's level of theory in info['head']: read as one fidelity, two
    methods' labels were merged silently."""
    frames = [water(energy=-3.0 - 0.1 * i, head="pbe" if i % 2 else "r2scan") for i in range(4)]
    ase.io.write(tmp_path / "heads.extxyz", frames, format="extxyz")
    with pytest.raises(
        MultifiError, match=r"heads.extxyz: frame 1 .*several MACE heads in info\['head'\] \(r2scan, pbe\) and no info"
    ):
        read_ase(tmp_path / "heads.extxyz", fidelity="PBE")
    for a in frames:  # label keys of one level of theory: the user chose which labels to read
        a.info["REF_energy_pbe"] = -1.0
    ase.io.write(tmp_path / "heads_keys.extxyz", frames, format="extxyz")
    assert len(read_ase(tmp_path / "heads_keys.extxyz", fidelity="PBE", keys={"energy": "REF_energy_pbe"})) == 4
    one = [water(head="pbe") for _ in range(2)]
    ase.io.write(tmp_path / "one.extxyz", one, format="extxyz")
    assert list(read_ase(tmp_path / "one.extxyz", fidelity="PBE").fidelities.names) == ["PBE"]
    with pytest.raises(
        MultifiError,
        match=r"no fidelity: .*; it has info\['head'\] = 'pbe': read the heads as fidelities with fidelity_key: head",
    ):
        read_ase(tmp_path / "one.extxyz")  # no fidelity anywhere: the hint names MACE's key


def test_per_atom_energies_without_a_total_are_warned(tmp_path, caplog):
    import logging

    frames = []
    for _ in range(2):
        a = water()
        a.arrays["energies"] = np.full(3, -1.0)
        a.calc = SinglePointCalculator(a, forces=np.zeros((3, 3)))
        frames.append(a)
    ase.io.write(tmp_path / "pa.extxyz", frames, format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_ase(tmp_path / "pa.extxyz", fidelity="PBE")
    assert "2 frame(s) have per-atom energies (arrays['energies']) and no total energy" in caplog.text
    assert "but no energy label" not in caplog.text  # said once, by the per-atom message


def test_frames_with_forces_but_no_energy_are_counted_in_a_warning(tmp_path, caplog):
    """A file where part of the frames lost their energy trained them on forces alone without a word."""
    import logging

    frames = []
    for i in range(5):
        a = water()
        labels = {"forces": np.zeros((3, 3))} if i % 2 else {"energy": -10.0 - i, "forces": np.zeros((3, 3))}
        a.calc = SinglePointCalculator(a, **labels)
        frames.append(a)
    ase.io.write(tmp_path / "part.extxyz", frames, format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(tmp_path / "part.extxyz", fidelity="PBE")
    assert ds.label_counts()["PBE"] == {"energy": 3, "forces": 5, "stress": 0}
    assert "part.extxyz: 2 of 5 frames have forces or stress but no energy label" in caplog.text
    caplog.clear()
    ase.io.write(tmp_path / "all.extxyz", [f for i, f in enumerate(frames) if i % 2 == 0], format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_ase(tmp_path / "all.extxyz", fidelity="PBE")
    assert "no energy label" not in caplog.text
    ase.io.write(tmp_path / "none.extxyz", [f for i, f in enumerate(frames) if i % 2], format="extxyz")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multifi"):  # a forces-only file: said, not warned on every read
        read_ase(tmp_path / "none.extxyz", fidelity="PBE")
    (record,) = [r for r in caplog.records if "no energy label" in r.getMessage()]
    assert record.levelname == "INFO" and "2 of 2 frames" in record.getMessage()


def test_an_ase_database_saved_as_json_is_read_as_one(tmp_path):
    """A .json file went to the MatPES reader ("line 1: invalid JSON") although ASE wrote it as a database."""
    from multifi.data.sources import read_labelled

    with ase.db.connect(tmp_path / "db.json") as db:
        for i in range(2):
            db.write(water(energy=-3.0 - i), fidelity="EMT", key=f"w{i}")
    ds = read_labelled(str(tmp_path / "db.json"))
    assert list(ds.fidelities.names) == ["EMT"] and sorted(ds.energy[:, 0].tolist()) == [-4.0, -3.0]


def test_per_fidelity_columns_of_a_predict_output_take_the_sources_fidelity(tmp_path):
    """predict keeps a structure's labels at other fidelities as ref_energy_<fidelity>; read by that key they were
    filed under info['ref_fidelity'] (the first fidelity's), silently. The suffix is a tag, so the source names it."""
    from multifi.data.readers.ase_files import PREDICTION_MARK

    frames = []
    for i in range(2):
        a = molecule("H2O")
        a.rattle(0.05, seed=i)
        a.info.update({"ref_energy": -3.0, "ref_energy_B": -7.0 - i, "ref_fidelity": "A", "fidelity": "A",
                       PREDICTION_MARK: "model.pt"})  # fmt: skip
        a.calc = SinglePointCalculator(a, energy=-1.0)
        frames.append(a)
    ase.io.write(tmp_path / "pred.extxyz", frames, format="extxyz")
    with pytest.raises(MultifiError, match="belong to the fidelity their key's suffix names: give it as the source"):
        read_ase(tmp_path / "pred.extxyz", keys={"energy": "ref_energy_B"})
    ds = read_ase(tmp_path / "pred.extxyz", fidelity="B", keys={"energy": "ref_energy_B"})
    assert list(ds.fidelities.names) == ["B"] and ds.energy[:, 0].tolist() == [-7.0, -8.0]
    ds = read_ase(tmp_path / "pred.extxyz", keys={"energy": "ref_energy"})
    assert list(ds.fidelities.names) == ["A"] and ds.energy[:, 0].tolist() == [-3.0, -3.0]


def test_naming_a_default_key_reads_only_the_named_labels(tmp_path, caplog):
    """A file with PBE labels under the default keys and r2SCAN ones under REF_*: naming `forces` (a default
    name) reads those forces and no energy, as naming any key does; the unread energies are named."""
    import logging

    frames = []
    for seed in range(3):
        a = molecule("H2O")
        a.rattle(0.05, seed=seed)
        a.calc = SinglePointCalculator(a, energy=-10.0 - seed, forces=np.full((3, 3), 0.1))
        a.info["REF_energy"] = -20.0 - seed
        a.arrays["REF_forces"] = np.full((3, 3), 0.2)
        frames.append(a)
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(path, fidelity="R2SCAN", keys={"forces": "forces"})
    assert not ds.energy_mask.any() and ds.has_forces().all()
    assert "not read" in caplog.text and "REF_energy" in caplog.text
    ds = read_ase(path, fidelity="R2SCAN", keys={"energy": "energy"})
    assert ds.energy_mask.all() and not ds.has_forces().any()
    ds = read_ase(path, fidelity="PBE")  # nothing named: the default keys, all of them
    assert ds.energy_mask.all() and ds.has_forces().all()


def test_frames_without_a_label_named_by_its_default_name_are_skipped(tmp_path):
    """--forces-key forces on a file where one frame has no forces: that frame is skipped, as for any named key."""
    frames = []
    for seed in range(3):
        a = molecule("H2O")
        a.rattle(0.05, seed=seed)
        forces = None if seed == 1 else np.full((3, 3), 0.1)
        a.calc = SinglePointCalculator(a, energy=-10.0 - seed, forces=forces)
        frames.append(a)
    path = tmp_path / "partly.extxyz"
    ase.io.write(path, frames)
    ds = read_ase(path, fidelity="PBE", keys={"forces": "forces"})
    assert len(ds) == 2 and ds.has_forces().all() and not ds.energy_mask.any()


def test_a_file_without_labels_says_so_before_asking_for_a_fidelity(tmp_path):
    """A CIF of structures only: "no fidelity" came first, although no fidelity would have helped."""
    from ase.build import bulk

    ase.io.write(tmp_path / "si.cif", bulk("Si", "diamond", 5.43))
    with pytest.raises(MultifiError, match=r"si.cif: frame 0 \(0-based\) has no energy/forces/stress label$"):
        read_ase(tmp_path / "si.cif")


def test_fidelity_names_one_letter_apart_are_warned_about_naming_their_files(tmp_path, caplog):
    """A typo of a fidelity name inside a data file ('R2SCN' beside 'R2SCAN') became a fidelity of its own without a
    word (its labels then train nothing the user asked for): a warning naming each name's file; different
    methods whose names differ in a digit or a last letter (GFN1/GFN2-xTB, TPSS/TPSSh) are not warned about."""
    from multifi.config import SourceConfig
    from multifi.data.fidelity import one_letter_apart
    from multifi.data.sources import read_sources

    ase.io.write(tmp_path / "good.extxyz", [water(fidelity="R2SCAN"), water(-3.5, fidelity="GFN1-xTB")])
    ase.io.write(tmp_path / "typo.extxyz", [water(-3.2, fidelity="R2SCN"), water(-3.4, fidelity="GFN2-xTB")])
    with caplog.at_level("WARNING", logger="multifi"):
        read_sources([SourceConfig(path=str(tmp_path / name)) for name in ("good.extxyz", "typo.extxyz")])
    typo = [r.getMessage() for r in caplog.records if "one letter apart" in r.getMessage()]
    assert len(typo) == 1, caplog.text
    assert typo[0].startswith(
        f"fidelities 'R2SCAN' ({tmp_path / 'good.extxyz'}) and 'R2SCN' ({tmp_path / 'typo.extxyz'})"
    )
    names = ["B3LYP", "B3YLP", "TPSS", "TPSSh", "wB97X-V", "wB97M-V", "HF/cc-pVDZ", "HF/cc-pVTZ", "PBE", "PBE0", "SCAN"]
    assert one_letter_apart([*names, "rSCAN"]) == [("B3LYP", "B3YLP")]  # swapped; replaced letters name methods
    parts = [
        "TPSS-D3",
        "TPSSh-D3",
        "M06/def2-SVP",
        "M06L/def2-SVP",
        "B97-D3",
        "B97M-D3",
        "MP2/def2-SVP",
        "MP2/def2-SVPD",
    ]
    assert one_letter_apart([*parts, "PBE/R2SCAN", "PBE/R2SCN", "B3LYP", "B3LyP"]) == [
        ("PBE/R2SCAN", "PBE/R2SCN")
    ]  # per part


def test_an_extxyz_stress_that_is_not_symmetric_is_an_error(tmp_path):
    """ASE turns an extxyz `stress="…"` into Voigt form from its upper triangle alone: a non-symmetric one (xy ≠ yx)
    was read without a word. Now a one-line error naming the file and line; a symmetric one (9 values) reads."""
    atoms = labelled(si(), fidelity="PBE")
    path = tmp_path / "sym.extxyz"
    ase.io.write(path, [atoms])
    ok = read_ase(path)
    expected = atoms.get_stress(voigt=False) / GPa
    np.testing.assert_allclose(ok.stress[0, 0], expected, atol=1e-9)
    text = path.read_text()
    values = re.search(r'stress="([^"]*)"', text).group(1).split()
    values[1] = str(float(values[1]) + 0.5)  # xy only
    bad = tmp_path / "asym.extxyz"
    bad.write_text(text.replace(re.search(r'stress="([^"]*)"', text).group(1), " ".join(values)))
    with pytest.raises(MultifiError, match=r"asym\.extxyz: line 2: stress is not symmetric \(xy .* against yx"):
        read_ase(bad)
    six = tmp_path / "six.extxyz"
    six.write_text(text.replace(re.search(r'stress="([^"]*)"', text).group(1), " ".join(["0.01"] * 6)))
    with pytest.raises(MultifiError, match=r"six\.extxyz: line 2: stress has 6 values.*9 values row by row"):
        read_ase(six)


@pytest.mark.parametrize("cut", [0, 6])
def test_an_extxyz_cut_mid_number_is_said(tmp_path, cut, caplog):
    """A file cut short (an interrupted copy) mid-number reads, ASE taking the partial number as it stands: a
    warning names the file. A complete file (ending in a newline) gets none; gzip-compressed the same."""
    import gzip
    import logging

    path = tmp_path / "frames.extxyz"
    ase.io.write(path, [labelled(molecule("H2O"), fidelity="PBE", stress=False, seed=i) for i in range(2)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    (tmp_path / "frames.extxyz.gz").write_bytes(gzip.compress(data[: len(data) - cut]))
    for name in ("frames.extxyz", "frames.extxyz.gz"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert len(read_ase(tmp_path / name)) == 2
        assert (f"{name}: does not end with a newline" in caplog.text) == bool(cut)


def test_a_capitalised_fidelity_key_is_named_in_the_error(tmp_path):
    """info['Fidelity'] is not info['fidelity']: the error for a frame without a fidelity says which key it has."""
    atoms = labelled(molecule("H2O"), stress=False)
    atoms.info["Fidelity"] = "PBE"
    path = tmp_path / "cap.extxyz"
    ase.io.write(path, [atoms])
    with pytest.raises(MultifiError, match=r"it has info\['Fidelity'\] = 'PBE': the key read is 'fidelity'"):
        read_ase(path)


def test_stress_symmetry_is_checked_in_the_files_units_and_only_for_the_stress_read(tmp_path):
    """A 9-value REF_stress (MACE's convention) with the rounding of written numbers (5e-7 eV/Å³ between xy and yx)
    reads, symmetrised; one asymmetric beyond rounding is an error naming the frame. An asymmetric `stress="…"` of
    another level of theory that the source does not read (keys named REF_*) does not stop the file."""
    atoms = labelled(si(), fidelity="PBE", stress=False)
    s = np.array([[0.01, 0.2, 0.003], [0.2, 0.02, 0.004], [0.003, 0.004, 0.03]])
    atoms.info["REF_stress"] = (s + np.array([[0, 5e-7, 0], [0, 0, 0], [0, 0, 0]])).reshape(9)
    atoms.info["REF_energy"] = -10.0
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, [atoms])
    text = path.read_text()
    ok = read_ase(path, keys={"energy": "REF_energy", "stress": "REF_stress"})
    np.testing.assert_allclose(ok.stress[0, 0] * GPa, s, atol=1e-6)
    assert np.array_equal(ok.stress[0, 0], ok.stress[0, 0].T)
    bad = tmp_path / "ref_bad.extxyz"
    atoms.info["REF_stress"] = (s + np.array([[0, 0.05, 0], [0, 0, 0], [0, 0, 0]])).reshape(9)
    ase.io.write(bad, [atoms])
    with pytest.raises(MultifiError, match=r"ref_bad\.extxyz: frame 0.*stress is not symmetric"):
        read_ase(bad, keys={"energy": "REF_energy", "stress": "REF_stress"})
    unused = tmp_path / "unused.extxyz"
    asym = " ".join(str(v) for v in (s + np.array([[0, 0.5, 0], [0, 0, 0], [0, 0, 0]])).reshape(9))
    unused.write_text(text.replace(" REF_energy=", f' stress="{asym}" REF_energy=', 1))
    assert 'stress="' in unused.read_text()
    assert len(read_ase(unused, keys={"energy": "REF_energy", "stress": "REF_stress"})) == 1
    with pytest.raises(MultifiError, match="stress is not symmetric"):
        read_ase(unused)  # the default keys read that stress


def test_the_stress_scan_reads_values_as_ase_does_and_leaves_non_finite_ones_to_the_label_checks(tmp_path):
    """Commas between values (ASE reads them) on one frame did not switch off the symmetry check of the next; an
    infinite shear component is a non-finite label (dropped with skip_invalid), not an asymmetric stress."""
    frames = [labelled(si(seed=i), fidelity="PBE", stress=False) for i in range(2)]
    path = tmp_path / "two.extxyz"
    ase.io.write(path, frames)
    lines = path.read_text().split("\n")
    heads = [i for i, line in enumerate(lines) if "Lattice=" in line]
    sym = "0.01, 0.002, 0.003, 0.002, 0.02, 0.004, 0.003, 0.004, 0.03"
    asym = "0.01 0.5 0.003 0.002 0.02 0.004 0.003 0.004 0.03"
    for head, stress in zip(heads, (sym, asym)):
        lines[head] += f' stress="{stress}"'
    path.write_text("\n".join(lines))
    with pytest.raises(MultifiError, match=rf"two\.extxyz: line {heads[1] + 1}: stress is not symmetric"):
        read_ase(path)
    inf = "0.01 0.002 0.003 inf 0.02 0.004 0.003 0.004 0.03"  # yx: the triangle ASE keeps
    lines[heads[1]] = lines[heads[1]].replace(asym, inf)
    path.write_text("\n".join(lines))
    with pytest.raises(MultifiError, match="non-finite"):
        read_ase(path)
    ds = read_ase(path, skip_invalid=True)
    assert ds.stress_mask[:, 0].tolist() == [True, False]


def test_predict_and_select_read_stresses_through_the_same_symmetry_check(tmp_path):
    """predict's reference stresses (and select's pool labels) come through the same check as training's."""
    from multifi.predict import read_structures

    atoms = labelled(si(), fidelity="PBE", stress=False)
    path = tmp_path / "asym.extxyz"
    ase.io.write(path, [atoms])
    lines = path.read_text().split("\n")
    lines[1] += ' stress="0.01 0.5 0.003 0.002 0.02 0.004 0.003 0.004 0.03"'
    path.write_text("\n".join(lines))
    with pytest.raises(MultifiError, match=r"asym\.extxyz: line 2: stress is not symmetric"):
        read_structures(str(path))


def test_a_compressed_file_is_decoded_strictly(tmp_path):
    """Two fidelity names differing in one non-UTF-8 byte were decoded to one name in a .gz file (replacement
    characters) and read as one fidelity; now a one-line error, as for the plain file."""
    import gzip

    frames = [labelled(molecule("H2O"), fidelity="PBE", stress=False, seed=i) for i in range(2)]
    path = tmp_path / "latin.extxyz"
    ase.io.write(path, frames)
    raw = path.read_bytes().replace(b"fidelity=PBE", b"fidelity=PBE-\xe9", 1)
    (tmp_path / "latin.extxyz.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(MultifiError, match=r"latin\.extxyz\.gz: unreadable.*UnicodeDecodeError"):
        read_ase(tmp_path / "latin.extxyz.gz")


def _mace_frames(head=None, **info):
    """Water frames labelled MACE's way: REF_energy / REF_forces, a head and other info keys."""
    out = []
    for i in range(4):
        a = molecule("H2O")
        a.rattle(0.05, seed=i)
        a.info.update(REF_energy=-14.0 - 0.1 * i, **info)
        a.arrays["REF_forces"] = np.random.default_rng(i).normal(size=(3, 3))
        if head is not None:
            a.info["head"] = head[i] if isinstance(head, list) else head
        out.append(a)
    return out


MACE_KEYS = {"energy": "REF_energy", "forces": "REF_forces"}


def test_mace_heads_are_checked_with_named_label_keys_too(tmp_path, caplog):
    """A MACE file always names REF_* keys: its frames of two heads in one source were merged into one fidelity
    silently (the check ran with default keys only). A single head read under another fidelity name is said;
    MACE's unnamed 'Default' head is not."""
    import logging

    path = tmp_path / "two_heads.extxyz"
    for heads in (["pbe", "pbe", "r2scan", "r2scan"], ["e", "e", "pbe", "pbe"]):  # "e": no part of REF_energy's name
        ase.io.write(path, _mace_frames(head=heads))
        with pytest.raises(MultifiError, match=r"several MACE heads in info\['head'\]"):
            read_ase(path, fidelity="pbe", keys=MACE_KEYS)
    for head, said in (("r2scan", True), ("pbe", False), ("PBE", False), ("Default", False)):
        ase.io.write(path, _mace_frames(head=head))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert read_ase(path, fidelity="pbe", keys=MACE_KEYS).fidelities.names == ("pbe",)
        assert ("name the MACE head 'r2scan' (info['head']) and are read as fidelity 'pbe'" in caplog.text) == said
    # `head` of another meaning (lipid head groups) with keys that are not MACE's: a warning, not an error
    frames = _mace_frames(head=["PC", "PC", "PE", "PE"])
    for a in frames:
        a.info["dft_energy"] = a.info.pop("REF_energy")
    ase.io.write(path, frames)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert len(read_ase(path, fidelity="pbe", keys={"energy": "dft_energy"})) == 4
    assert "name several heads in info['head'] (PC, PE), read as one fidelity" in caplog.text


def test_mace_per_frame_weights(tmp_path, caplog):
    """energy_weight=0 (config_weight=0: every label) keeps a label out of MACE's loss: it was trained here as any
    other. Now such labels are left out, counted in a warning; weights other than 0 and 1 are said not to apply."""
    import logging

    frames = _mace_frames()
    frames[0].info["config_energy_weight"] = 0.0
    frames[1].info["config_weight"] = 0
    frames[2].info["config_forces_weight"] = 2.5
    frames[3].info.update(weight=18.015, config_virials_weight=0.0)  # a molecular weight; no virial read
    path = tmp_path / "weights.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(path, fidelity="pbe", keys=MACE_KEYS)
    assert len(ds) == 3  # frame 1 has no label left
    assert np.isnan(ds.energy[0, 0]) and ds.forces_mask[0, 0] and not np.isnan(ds.energy[1:, 0]).any()
    assert ds.forces_mask[:, 0].all()
    assert "left out: 2 energy, 1 forces; 1 frame(s) without any label left skipped" in caplog.text
    assert "weights other than 0 and 1 (config_forces_weight) are not applied" in caplog.text
    assert "not read:" not in caplog.text and "weight=" not in caplog.text  # weights are no unread labels
    # the same frames read back as predictions (MACE's eval keys): the training weights do not apply
    for a in frames:
        a.info["MACE_energy"] = a.info["REF_energy"]
    ase.io.write(path, frames)
    assert not np.isnan(read_ase(path, fidelity="pbe", keys={"energy": "MACE_energy"}).energy).any()
    for a in frames:
        a.info["config_weight"] = 0
    ase.io.write(path, frames)
    with pytest.raises(MultifiError, match=r"weights\.extxyz: every frame's labels are weighted 0"):
        read_ase(path, fidelity="pbe", keys=MACE_KEYS)


def test_mace_reference_keys_beside_default_labels_are_named(tmp_path, caplog):
    """A file with a calculator's energy and forces and MACE's REF_energy / REF_forces, read with the default keys:
    the calculator's labels are read, and the REF_* keys are named (a MACE user's labels are those)."""
    import logging

    frames = [labelled(a, stress=False) for a in _mace_frames()]
    path = tmp_path / "both.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(path, fidelity="pbe")
    assert ds.energy[0, 0] == pytest.approx(-1.5)  # the calculator's
    assert "the file also holds REF_energy, REF_forces" in caplog.text
    assert "(energy_key: REF_energy, forces_key: REF_forces)" in caplog.text and "not read:" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_ase(path, fidelity="pbe", keys=MACE_KEYS)
    assert "the file also holds" not in caplog.text


def test_fidelity_key_reads_mace_heads_as_fidelities(tmp_path):
    """MACE's multi-head files name each frame's level in info['head']: `fidelity_key: head` reads them as
    fidelities in one source (one source per head before); a frame naming another info['fidelity'] is an error."""
    from ase.calculators.emt import EMT

    from multifi.config import SourceConfig
    from multifi.data.sources import read_source
    from multifi.errors import MultifiError

    frames = []
    for i, head in enumerate(["pbe", "r2scan", "pbe"]):
        a = ase.Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3 + 0.1 * i]])
        a.calc = EMT()
        a.info.update(REF_energy=a.get_potential_energy() * (1.1 if head == "r2scan" else 1.0), head=head)
        a.calc = None
        frames.append(a)
    path = tmp_path / "multihead.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = read_source(SourceConfig(path=str(path), energy_key="REF_energy", fidelity_key="head"))
    assert list(ds.fidelities.names) == ["pbe", "r2scan"] and int(ds.energy_mask.sum()) == 3
    k = ds.fidelities.index("r2scan")
    assert np.flatnonzero(ds.energy_mask[:, k]).tolist() == [1]
    frames[1].info["fidelity"] = "PBE"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(
        MultifiError, match=r"frame 1 \(0-based\): info\['head'\] names 'r2scan' and info\['fidelity'\] 'PBE'"
    ):
        read_source(SourceConfig(path=str(path), energy_key="REF_energy", fidelity_key="head"))


def test_a_label_held_twice_with_different_values_is_said(tmp_path, caplog):
    """An ASE trajectory keeps info['energy'] and the calculator's energy apart: when they differ (another method's
    energy in info), the one read (info) is named with both values; equal ones are no news."""
    import logging

    from ase.io.trajectory import Trajectory

    frames = []
    for i, shift in enumerate((5.0, 0.0, 5.0)):
        a = molecule("H2O")
        a.rattle(0.05, seed=i)
        a.info.update(fidelity="dft", energy=-10.0 - i + shift)
        a.calc = SinglePointCalculator(a, energy=-10.0 - i, forces=np.zeros((3, 3)) + i)
        frames.append(a)
    path = tmp_path / "both.traj"
    with Trajectory(path, "w") as t:
        for a in frames:
            t.write(a)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_ase(path)
    assert ds.energy[:, 0].tolist() == [-5.0, -11.0, -7.0]  # info's, as said
    assert "2 of 3 frames hold info['energy'] and different values in their calculator's results" in caplog.text
    assert "(frame 0 (0-based): -5 and -10 eV): info['energy'] read" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):  # only the energy named: no other kind looked up
        read_ase(path, keys={"energy": "energy"})
    assert "2 of 3 frames hold info['energy'] and different values" in caplog.text
    caplog.clear()
    path = tmp_path / "same.traj"
    with Trajectory(path, "w") as t:
        t.write(frames[1])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        read_ase(path)
    assert "different values" not in caplog.text


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"forces": "REF_energy"}, "forces_key 'REF_energy' names a value per frame (info), not forces per atom"),
        ({"forces": "positions"}, "forces_key 'positions' names the atoms' positions, not forces labels"),
        ({"energy": "REF_forces"}, "energy_key 'REF_forces' names an array per atom, not energy per frame"),
    ],
)
def test_a_label_key_naming_the_wrong_kind_of_entry_is_refused(tmp_path, keys, message):
    """A forces key naming a per-frame value read no forces (silently), one naming the positions trained them."""
    a = molecule("H2O")
    a.info.update(fidelity="dft", REF_energy=-3.0)
    a.arrays["REF_forces"] = np.ones((3, 3))
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, [a])
    with pytest.raises(MultifiError, match=re.escape(f"{path}: frame 0 (0-based): {message}")):
        read_ase(path, keys={"energy": "REF_energy", "forces": "REF_forces", **keys})
    assert read_ase(path, keys={"energy": "REF_energy", "forces": "REF_forces"}).forces is not None


@pytest.mark.parametrize(
    "i, index, tag",
    [
        (2, ":", "frame 2 (0-based)"),
        (2, "3:", "frame 5 (0-based)"),
        (2, "1::10", "frame 21 (0-based)"),
        (0, "7", "frame 7 (0-based)"),
        (2, "-5:", "frame 2 (0-based, of index '-5:')"),
        (2, "::-1", "frame 2 (0-based, of index '::-1')"),
    ],
)
def test_errors_name_the_files_frame_where_the_index_says_it(i, index, tag):
    from multifi.data.readers.ase_files import frame_tag

    assert frame_tag(i, index) == tag
