"""Plausibility checks: overlapping atoms, duplicates across splits, Hartree-looking energies."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import ase
import numpy as np
import pytest
from ase.build import molecule

from multifi.config import validate_config
from multifi.data.checks import (
    check_energy_units,
    check_length_unit,
    check_overlaps,
    check_repeated_geometries,
    check_split_duplicates,
    geometry_fingerprints,
    geometry_groups,
)
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import NeighborCache
from multifi.data.split import Split
from multifi.data.stats import fit_baseline
from multifi.errors import MultifiError
from multifi.train.run import train

HARTREE = 27.211386245988


def _records(n=40, unit=1.0, seed=0, overlap_at=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = molecule(["CH4", "H2O", "NH3", "C2H6"][i % 4])
        m.positions += rng.normal(0, 0.08, m.positions.shape)
        if i == overlap_at:
            m.positions[1] = m.positions[0] + [0.05, 0, 0]
        e = sum({1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0}[z] for z in m.numbers) + rng.normal(0, 0.3)
        out.append(
            {"numbers": m.numbers, "positions": m.positions, "labels": {"DFT": {"energy": e / unit}}, "key": f"m{i}"}
        )
    return out


def test_overlapping_atoms_is_an_error_naming_the_structure():
    ds = FidelityDataset.from_records(_records(overlap_at=7), source="mols.extxyz")
    with pytest.raises(MultifiError, match=r"mols.extxyz: structure 7 \(0-based, key m7\) has atoms 0.050 Å apart"):
        check_overlaps(ds, NeighborCache(ds, 4.0))
    clean = FidelityDataset.from_records(_records(), source="ok")
    check_overlaps(clean, NeighborCache(clean, 4.0))


def test_overlap_stops_training_before_anything_is_written(tmp_path):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for r in _records(overlap_at=3):
        from ase import Atoms

        a = Atoms(numbers=r["numbers"], positions=r["positions"])
        a.calc = SinglePointCalculator(a, energy=r["labels"]["DFT"]["energy"])
        frames.append(a)
    ase.io.write(tmp_path / "bad.extxyz", frames)
    cfg = validate_config(
        {
            "data": {"sources": [{"path": str(tmp_path / "bad.extxyz"), "fidelity": "DFT"}]},
            "output_dir": str(tmp_path / "run"),
            "train": {"epochs": 1, "progress": False},
        }
    )
    with pytest.raises(MultifiError, match=r"bad.extxyz: structure 3 \(0-based\) has atoms 0.050 Å apart"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_duplicate_geometry_across_splits_is_reported(caplog):
    recs = _records(12)
    dup = dict(recs[0], key="copy-of-m0")
    ds = FidelityDataset.from_records(recs + [dup], source="dups")
    split = Split(train=np.arange(0, 10), val=np.array([10, 11]), test=np.array([12]))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_split_duplicates(ds, split) == 1
    assert "copy-of-m0 (test) duplicates a train structure" in caplog.text
    ok = Split(train=np.array([0, 12]), val=np.arange(1, 6), test=np.arange(6, 12))
    assert check_split_duplicates(ds, ok) == 0


def test_a_geometry_repeated_under_another_key_is_reported_wherever_it_lands(caplog, tmp_path, capsys):
    """Copies that did not merge (a MatPES file and an extxyz of the same cells under other keys) count their
    labels twice in training, in one split as much as across splits: warned, naming a pair and how to merge."""
    recs = _records(12)
    ds = FidelityDataset.from_records(recs + [dict(recs[3], key="copy-of-m3")], source="dups")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_repeated_geometries(ds) == 1
    assert "dups: 1 structure(s) repeat the geometry of another under a different key" in caplog.text
    assert f"(e.g. {recs[3]['key']} and copy-of-m3)" in caplog.text and "'matpes:<matpes_id>'" in caplog.text
    assert check_repeated_geometries(FidelityDataset.from_records(recs)) == 0
    bent = np.array(recs[3]["positions"], dtype=float)
    bent[1] += [0.0, 0.0, 1e-2]  # one atom moved: another geometry
    assert (
        check_repeated_geometries(FidelityDataset.from_records(recs + [dict(recs[3], key="bent", positions=bent)])) == 0
    )
    # the molecule moved, turned, mirrored and renumbered, coordinates printed to 4 decimals: a copy
    theta = 0.7
    turn = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, -1.0]])
    order = np.arange(len(recs[3]["numbers"]))[::-1]
    moved = np.round((np.asarray(recs[3]["positions"]) @ turn.T + [3.0, -1.0, 0.5])[order], 4)
    copy = dict(recs[3], key="moved", positions=moved, numbers=np.asarray(recs[3]["numbers"])[order])
    with_copy = FidelityDataset.from_records(recs + [copy])
    assert check_repeated_geometries(with_copy) == 1
    split = Split(train=np.arange(0, 8), val=np.arange(8, 12), test=np.array([12]))
    assert check_split_duplicates(with_copy, split) == 1  # a test structure moved from the training split
    # finite-difference displacements (1e-3 Å) are other geometries; a scan in steps below the tolerance is
    # compared with its first frame, not chained: frames 0 and 1 one geometry, 2 (3e-4 Å from 0) another
    scan = []
    for i, shift in enumerate((0.0, 1.5e-4, 3e-4, 1e-3)):
        pos = np.array(recs[3]["positions"], dtype=float)
        pos[1] += [0.0, 0.0, shift]
        scan.append(dict(recs[3], key=f"scan{i}", positions=pos))
    assert geometry_groups(FidelityDataset.from_records(scan)).tolist() == [0, 0, 2, 3]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_repeated_geometries(ds)
    assert "carry" not in caplog.text  # same energy: no contradiction
    other = dict(recs[3], key="other", labels={"DFT": {"energy": recs[3]["labels"]["DFT"]["energy"] + 0.5}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_repeated_geometries(FidelityDataset.from_records(recs + [other]))
    assert "1 copies of a geometry carry 'DFT' energies that differ (up to 0.5 eV" in caplog.text


def _crystals() -> list[dict]:
    """Relaxed crystals of several bondings (metals, ionic, covalent), rattled, with argon among them."""
    from ase.build import bulk

    rng = np.random.default_rng(1)
    out = []
    for i, (formula, kind, a) in enumerate(
        [
            ("Cu", "fcc", 3.61),
            ("Al", "fcc", 4.05),
            ("Fe", "bcc", 2.87),
            ("NaCl", "rocksalt", 5.64),
            ("MgO", "rocksalt", 4.21),
            ("LiF", "rocksalt", 4.03),
            ("Si", "diamond", 5.43),
            ("C", "diamond", 3.57),
            ("Ar", "fcc", 5.26),
        ]
    ):
        atoms = bulk(formula, kind, a=a).repeat(2)
        atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
        out.append(
            {
                "numbers": atoms.numbers,
                "positions": atoms.positions,
                "cell": atoms.cell.array,
                "pbc": atoms.pbc,
                "labels": {"DFT": {"energy": -3.0 * len(atoms)}},
                "key": f"c{i}",
            }
        )
    return out


@pytest.mark.parametrize("scale, expect", [(1.0, None), (1 / 0.529177, "in Bohr ~1.9"), (0.1, "in nm ~0.1")])
def test_positions_in_another_length_unit_are_flagged(scale, expect, caplog):
    """Molecules and crystals in Å lie ~1× the sum of covalent radii from their nearest neighbours (QM9 1.01, the shared
    PBE and r2SCAN solids 0.99); one fidelity's positions in Bohr (×1.89) or nm (×0.1) are named, the other's not;
    argon (van der Waals contacts) is left out."""
    molecules = _records(40)
    scaled = [
        dict(r, positions=np.asarray(r["positions"]) * scale, key=f"b{i}", labels={"HF": {"energy": -1.0}})
        for i, r in enumerate(_records(40, seed=1))
    ]
    ds = FidelityDataset.from_records(molecules + _crystals() + scaled)
    pairs = np.array([[s, k] for s in range(len(ds)) for k in range(2) if ds.energy_mask[s, k]])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        doubted = check_length_unit(ds, NeighborCache(ds, 5.0, progress=False), pairs)
    assert doubted == ([] if expect is None else ["HF"])
    if expect:
        assert re.search(r"the atoms of fidelity 'HF' lie [\d.]+× the sum of their covalent radii", caplog.text)
        assert expect in caplog.text and "'DFT'" not in caplog.text
    argon = FidelityDataset.from_records(_crystals()[-1:])
    assert check_length_unit(argon, NeighborCache(argon, 5.0, progress=False), np.array([[0, 0]])) == []


def test_centrosymmetric_molecules_of_other_atoms_are_other_geometries(tmp_path):
    """QM9's C4H2 and C4N2 (qm9:23, qm9:486), linear on one axis: their fingerprints collided (the atoms at ±x
    cancelled in a hash linear in the coordinates) and training on QM9 warned of a repeat whose energies differ by
    131 eV. Their QM9 geometries (qm9pack) are two fingerprints now, and a rattled centrosymmetric pair too."""
    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    (tmp_path / "two.txt").write_text("23\n486\n")
    ds = read_sources([SourceConfig(qm9={"indices": str(tmp_path / "two.txt")})])
    assert sorted(map(str, ds.keys)) == ["qm9:23", "qm9:486"]
    assert len(set(geometry_fingerprints(ds).tolist())) == 2 and check_repeated_geometries(ds) == 0
    rng = np.random.default_rng(0)
    records = []
    for name, numbers in (("A", [6, 6, 8, 8]), ("B", [6, 6, 7, 7])):
        half = rng.normal(0, 1, (2, 3))
        pos = np.concatenate([half, -half])[[0, 2, 1, 3]]
        records.append({"numbers": np.array(numbers), "positions": pos, "labels": {"A": {"energy": -1.0}}, "key": name})
    assert len(set(geometry_fingerprints(FidelityDataset.from_records(records)).tolist())) == 2


@pytest.mark.parametrize("unit, expect", [(1.0, []), (HARTREE, ["DFT"])])
def test_hartree_energies_are_flagged(unit, expect, caplog):
    ds = FidelityDataset.from_records(_records(60, unit=unit), source="energies.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == expect
    assert ("look like Hartree" in caplog.text) == bool(expect)


@pytest.mark.parametrize("n", [8, 12, 19])
@pytest.mark.parametrize("unit, expect", [(1.0, []), (HARTREE, ["DFT"])])
def test_hartree_energies_of_a_few_structures_are_flagged(n, unit, expect, caplog):
    """A fidelity added from a few labels (multifi extend) is where Hartree labels are most likely: fewer than 20
    structures are judged too once there are a few more than elements."""
    ds = FidelityDataset.from_records(_records(n, unit=unit), source="few.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == expect
    assert ("look like Hartree" in caplog.text) == bool(expect)
    assert (f"from {n} structures" in caplog.text) == bool(expect)


@pytest.mark.parametrize(
    "units, message",
    [
        ({}, None),
        ({"all": 1 / 23.0605}, "look like kcal/mol, kJ/mol or meV"),  # kcal/mol
        ({"all": 1e-3}, "look like kcal/mol, kJ/mol or meV"),  # meV
        ({"odd": HARTREE}, "20 of 60 energies at fidelity 'DFT' lie far from the reference energies that fit 40"),
        ({"some": HARTREE}, "5 of 60 energies at fidelity 'DFT' lie far from the reference energies that fit 55"),
        ({"half": 1e-3}, "28 of 60 energies at fidelity 'DFT' lie far from the reference energies that fit 32"),
        (
            {"quarter": 1 / 23.0605},
            "12 of 60 energies at fidelity 'DFT' lie far from the reference energies that fit 48",
        ),
    ],
)
def test_energies_in_other_or_mixed_units_are_flagged(units, message, caplog):
    recs = _records(60)
    for i, r in enumerate(recs):
        unit = units.get("all", 1.0)
        picked = {"odd": i % 3 == 1, "some": i % 12 == 5, "half": (i // 4) % 2 == 0, "quarter": (i // 4) % 4 == 3}
        for which, factor in units.items():
            if which != "all" and picked[which]:
                unit = factor
        r["labels"]["DFT"]["energy"] /= unit
    ds = FidelityDataset.from_records(recs, source="energies.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == ([] if message is None else ["DFT"])
    assert (message is None and not caplog.records) or (message and message in caplog.text)


def test_mixed_units_name_the_element_whose_one_structure_the_count_cannot_see(caplog):
    """Every tenth energy in Hartree; one of them is the only structure with Cl: Cl's fitted reference absorbs its
    label, so the count misses it (6 of the 7 counted): the warning names Cl and that structure."""
    recs = _records(60)
    hf = molecule("CH3Cl")
    e = sum({1: -13.6, 6: -1029.0, 17: -12500.0}[z] for z in hf.numbers)
    recs.append({"numbers": hf.numbers, "positions": hf.positions, "labels": {"DFT": {"energy": e}}, "key": "chloro"})
    for i, r in enumerate(recs):
        if i % 10 == 0:
            r["labels"]["DFT"]["energy"] /= HARTREE
    ds = FidelityDataset.from_records(recs, source="mixed.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == ["DFT"]
    assert "6 of 61 energies at fidelity 'DFT' lie far" in caplog.text
    assert "Elements in one structure only" in caplog.text and "Cl (structure chloro)" in caplog.text


def test_skipped_invalid_labels_are_counted_and_reported(tmp_path, caplog):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.sources import read_sources

    frames = []
    for i, r in enumerate(_records(6)):
        a = Atoms(numbers=r["numbers"], positions=r["positions"])
        a.calc = SinglePointCalculator(a, energy=float("nan") if i in (1, 4) else r["labels"]["DFT"]["energy"])
        frames.append(a)
    ase.io.write(tmp_path / "nan.extxyz", frames)
    from multifi.config import SourceConfig

    src = [SourceConfig(path=str(tmp_path / "nan.extxyz"), fidelity="DFT")]
    with pytest.raises(MultifiError, match=r"nan.extxyz: 2 non-finite"):
        read_sources(src)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        ds = read_sources(src, skip_invalid=True)
    assert len(ds) == 4
    assert "nan.extxyz: skipped 2 non-finite (NaN/inf) labels; other labels of the same structures" in caplog.text


def test_data_info_reports_repeated_geometries(tmp_path, caplog, capsys):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.cli.main import main

    frames = []
    for key in ("one", "two"):
        a = molecule("CH4")
        a.info.update(key=key, fidelity="DFT")
        a.calc = SinglePointCalculator(a, energy=-24.0)
        frames.append(a)
    ase.io.write(tmp_path / "pool.extxyz", frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["data", "info", str(tmp_path / "pool.extxyz")]) == 0
    assert "1 structure(s) repeat the geometry of another under a different key (e.g. one and two)" in caplog.text


SMALL = ["CH4", "H2O", "NH3", "C2H6", "CH3OH", "C2H4", "HCN", "CH3CH2OH", "C2H2", "H2CO", "CH3CN"]  # 3-9 atoms
SIMILAR = ["CH3CH2OH", "C3H8", "CH3COCH3", "CH3CH2OCH3", "CH3CONH2", "C3H6_D3h", "CH3CH2NH2", "C4H4O"]  # 9-12


@pytest.mark.parametrize("names, seed", [(SMALL, 1), (SIMILAR, 2)])
def test_energies_per_atom_are_named_as_such(caplog, names, seed):
    """Per-atom energies were diagnosed as kcal/mol (their hydrogen reference looks large): they do not grow with
    the number of atoms, which the per-element fit shows; total energies pass. Also where sizes vary by only
    5-15 % (SIMILAR, as in a QM9 subset; the check once looked only at sizes varying by ≥ 15 %)."""
    rng = np.random.default_rng(seed)
    recs = []  # more compositions than elements, as in any real data set (else any labels fit exactly)
    for i in range(8 * len(names)):
        m = molecule(names[i % len(names)])
        e = sum({1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0}[z] for z in m.numbers) + rng.normal(0, 0.3)
        recs.append({"numbers": m.numbers, "positions": m.positions, "labels": {"DFT": {"energy": e}}, "key": f"m{i}"})
    if names is SIMILAR:
        sizes = np.array([len(r["numbers"]) for r in recs])
        assert 0.05 < sizes.std() / sizes.mean() < 0.15
    ds = FidelityDataset.from_records(recs, source="totals.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    for r in recs:
        r["labels"]["DFT"]["energy"] /= len(r["numbers"])
    per_atom = FidelityDataset.from_records(recs, source="per_atom.extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, *fit_baseline(ds, pairs)) == []
        assert check_energy_units(per_atom, pairs, *fit_baseline(per_atom, pairs)) == ["DFT"]
    assert "per_atom.extxyz: energies at fidelity 'DFT' look like energies per atom, not per structure" in caplog.text
    assert "kcal/mol" not in caplog.text and "totals.extxyz" not in caplog.text


def test_per_atom_energies_of_the_shared_solids_are_named_as_such(caplog):
    """MatPES-style per-atom energies (energy / nsites) of ../shared/data/solids fit 0.23× as well as totals: the
    check asked for 0.2× and stayed silent; totals there fit 29× worse when multiplied."""
    from multifi.data.readers.matpes import read_matpes

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "solids" / "PBE.jsonl.gz"
    if not path.exists():
        pytest.skip("shared solids data not on this machine")
    ds = read_matpes(path, stress_order="vasp")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, *fit_baseline(ds, pairs)) == []
        ds.energy[:, 0] /= ds.n_atoms
        assert check_energy_units(ds, pairs, *fit_baseline(ds, pairs)) == ["PBE"]
    assert "look like energies per atom, not per structure" in caplog.text


def test_two_sources_of_one_fidelity_that_disagree_systematically_are_warned(caplog):
    """GFN1-xTB labels added under the name GFN2-xTB trained silently (test MAE 18.7 eV): per-element references
    fitted to one source predict the other off by ~1 eV/atom. Two halves of one method's labels are not warned."""
    from multifi.data.sources import warn_disagreeing_sources

    rng = np.random.default_rng(0)
    refs = {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0}

    def source(name, shift, seed):
        recs = []
        for i in range(40):
            m = molecule(SMALL[(i + seed) % len(SMALL)])
            e = sum(refs[z] + shift for z in m.numbers) + rng.normal(0, 0.05) * len(m)
            recs.append({"numbers": m.numbers, "positions": m.positions, "key": f"{name}{i}",
                         "labels": {"GFN2-xTB": {"energy": e}}})  # fmt: skip
        return FidelityDataset.from_records(recs, source=name)

    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_disagreeing_sources([source("a.csv", 0.0, 0), source("b.csv", 0.0, 3)])
        assert "another method's labels" not in caplog.text
        warn_disagreeing_sources([source("a.csv", 0.0, 0), source("gfn1.csv", 1.0, 3)])
    assert re.search(r"gfn1.csv: their 'GFN2-xTB' energies differ by [+-](0\.9\d|1\.0\d) eV/atom", caplog.text)
    assert "another method's labels under this name?" in caplog.text


def test_sources_whose_compositions_the_other_does_not_determine_are_not_compared(caplog):
    """Per-element references fitted to one molecule's trajectory (composition matrix of rank 1) are one of
    infinitely many fits: applied to other molecules they gave "differ by -61.89 eV/atom" for agreeing labels."""
    from multifi.data.sources import warn_disagreeing_sources

    rng = np.random.default_rng(1)
    refs = {1: -13.6, 6: -1029.0, 8: -2041.0}

    def trajectory(name, formulas):
        recs = []
        for i in range(30):
            m = molecule(formulas[i % len(formulas)])
            m.rattle(0.02, seed=i)
            e = sum(refs[z] for z in m.numbers) + rng.normal(0, 0.05)
            recs.append({"numbers": m.numbers, "positions": m.positions, "key": f"{name}{i}",
                         "labels": {"PBE": {"energy": e}}})  # fmt: skip
        return FidelityDataset.from_records(recs, source=name)

    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_disagreeing_sources([trajectory("ethanol.xyz", ["CH3CH2OH"]), trajectory("other.xyz", ["CH3OH", "H2CO"])])
    assert "another method's labels" not in caplog.text


def test_a_periodic_structure_with_an_atom_unwrapped_is_the_same_geometry(caplog):
    """One atom written a cell vector away (unwrapped) is the same crystal: it went unnoticed in two splits."""
    from ase.build import bulk

    cells = []
    for i in range(4):
        a = bulk("Cu", "fcc", 3.6, cubic=True)
        a.rattle(0.05, seed=i)
        cells.append({"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array, "pbc": [True] * 3,
                      "key": f"c{i}", "labels": {"DFT": {"energy": -10.0 - i}}})  # fmt: skip
    moved = np.array(cells[2]["positions"])
    moved[1] += cells[2]["cell"][0] - cells[2]["cell"][2]  # one atom a lattice vector away
    slab = dict(cells[1], key="slab", pbc=[True, True, False])  # not periodic along c: not the same as c1 shifted
    ds = FidelityDataset.from_records([*cells, dict(cells[2], key="unwrapped", positions=moved), slab])
    fp = geometry_fingerprints(ds)
    assert fp[4] == fp[2] and len(set(fp[:4].tolist())) == 4 and fp[5] != fp[1]
    # a slab without vacuum (zero third vector): an atom a lattice vector away is the same slab, one moved
    # across it is not
    flat = dict(cells[0], key="flat", cell=np.diag([3.6, 3.6, 0.0]), pbc=[True, True, False])
    shifted, lifted = np.array(flat["positions"]), np.array(flat["positions"])
    shifted[1] += [3.6, -3.6, 0.0]
    lifted[1] += [0.0, 0.0, 0.7]
    fp = geometry_fingerprints(
        FidelityDataset.from_records(
            [flat, dict(flat, key="f2", positions=shifted), dict(flat, key="f3", positions=lifted)]
        )
    )
    assert fp[1] == fp[0] and fp[2] != fp[0]
    fp = geometry_fingerprints(ds)
    split = Split(train=np.arange(0, 4), val=np.array([5]), test=np.array([4]))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_split_duplicates(ds, split) == 1
    assert "unwrapped (test) duplicates a train structure" in caplog.text


@pytest.mark.parametrize(
    ("factor", "noise", "said"),
    [(-1.0, 0.0, "point the other way"), (1 / 51.42, 0.0, "× the size"), (1.1, 0.0, None), (0.04, 0.1, None)],
)
def test_forces_that_disagree_with_another_fidelity_on_the_same_structures_are_named(factor, noise, said, caplog):
    """Forces of a second fidelity on the same structures as gradients (−F) or in Ha/Bohr (÷51.4) are said,
    naming both fidelities; a 10 % difference (another level of theory) is not, nor small forces hardly
    correlated with the other level's (structures near a minimum of the second level)."""
    import logging

    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.checks import check_force_units
    from multifi.data.dataset import FidelityDataset

    rng = np.random.default_rng(0)
    frames = []
    for i in range(8):
        atoms = ase.Atoms("CH4", positions=rng.normal(size=(5, 3)) * 1.2)
        f = rng.normal(size=(5, 3))
        for name, scale in (("PBE", 1.0), ("R2SCAN", factor)):
            a = atoms.copy()
            extra = noise * rng.normal(size=(5, 3)) if name == "R2SCAN" else 0.0
            a.calc = SinglePointCalculator(a, energy=-20.0, forces=f * scale + extra)
            a.info.update(fidelity=name, key=f"m{i}")
            frames.append(a)
    from multifi.data.readers.ase_files import _record

    ds = FidelityDataset.merge([FidelityDataset.from_records([_record(a, None, "x") for a in frames])])
    pairs = np.argwhere(ds.forces_mask)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        found = check_force_units(ds, pairs)
    if said is None:
        assert found == [] and "forces at fidelity" not in caplog.text
    else:
        assert found == ["R2SCAN"] and said in caplog.text and "'PBE'" in caplog.text
        assert caplog.text.count("forces at fidelity") == 1
    # units known at one fidelity: it is the yardstick, the other is still checked against it (a trial declared the
    # good fidelity's units known, and the flipped forces of the other went unsaid)
    for known, blamed in (({"R2SCAN"}, "PBE"), ({"PBE"}, "R2SCAN")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            found = check_force_units(ds, pairs, known=known)
        if said is None:
            assert found == []
        else:
            assert found == [blamed] and said in caplog.text and f"fix those at '{blamed}'" in caplog.text
    assert check_force_units(ds, pairs, known={"PBE", "R2SCAN"}) == []


def test_the_force_yardstick_is_a_known_fidelity_and_never_one_found_off(caplog):
    """A holds gradients (−F), B and C the forces; C's units known: A alone is named, once (B was blamed for
    disagreeing with A, and A named twice, when each fidelity met the first earlier one)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.checks import check_force_units
    from multifi.data.readers.ase_files import _record

    rng = np.random.default_rng(0)
    frames = []
    for i in range(8):
        atoms = ase.Atoms("CH4", positions=rng.normal(size=(5, 3)) * 1.2)
        f = rng.normal(size=(5, 3))
        for name, sign in (("A", -1.0), ("B", 1.0), ("C", 1.0), ("D", 1.05)):
            a = atoms.copy()
            a.calc = SinglePointCalculator(a, energy=-20.0, forces=sign * f)
            a.info.update(fidelity=name, key=f"m{i}")
            frames.append(a)
    ds = FidelityDataset.merge([FidelityDataset.from_records([_record(a, None, "x") for a in frames])])  # by key
    pairs = np.argwhere(ds.forces_mask)
    for known in ({"C"}, {"B", "C"}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert check_force_units(ds, pairs, known=known) == ["A"]
        assert caplog.text.count("forces at fidelity") == 1 and "fix those at 'A'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):  # nothing known: A is apart from all three others
        assert check_force_units(ds, pairs) == ["A"]
    assert "they disagree with 3 of the 3 fidelities sharing its structures: fix those at 'A'" in caplog.text


@pytest.mark.parametrize(
    ("force_factor", "said"),
    [
        (1.0, None),
        (1 / 51.42, r"(4[6-9]|5[0-6])\.\d× what the forces imply"),
        (-1.0, "gradients"),
        (1.05, None),
        ("per atom", r"energies per atom given as the structure's energy\? \(1/N = 1/(4|32) here\)"),
    ],
)
@pytest.mark.parametrize("periodic", [False, True])
def test_forces_that_disagree_with_their_own_energies_on_a_trajectory_are_named(force_factor, said, periodic, caplog):
    """A single-fidelity trajectory (small steps of a Lennard-Jones system): forces in Ha/Bohr read as eV/Å
    (÷51.4) or given as gradients (−F) contradict the energy changes between neighbouring frames and are said;
    consistent forces are not, nor within a few per cent, with atoms wrapped back into the cell in between. Energies
    per atom written as the structure's energy are named as such."""
    from ase.build import bulk
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.checks import check_force_units
    from multifi.data.readers.ase_files import _record

    rng = np.random.default_rng(1)
    if periodic:
        atoms = bulk("Ar", "fcc", 5.26, cubic=True).repeat(2)
        atoms.positions[0] = [0.01, 0.01, 0.01]  # crosses the cell's boundary during the walk
    else:
        atoms = bulk("Ar", "fcc", 5.26, cubic=True)
        atoms.pbc, atoms.cell = False, np.zeros((3, 3))
    frames = []
    for i in range(24):
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0)
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        frame = atoms.copy()
        if periodic:
            frame.wrap()
        if force_factor == "per atom":  # a common extxyz mistake: E/N written as the energy
            frame.calc = SinglePointCalculator(frame, energy=energy / len(frame), forces=forces)
        else:
            frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces * force_factor)
        frame.info.update(fidelity="DFT", key=f"f{i}")
        frames.append(frame)
    ds = FidelityDataset.from_records([_record(a, None, "traj.xyz") for a in frames])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        found = check_force_units(ds, np.argwhere(ds.forces_mask))
    if said is None:
        assert found == [] and "neighbouring frames" not in caplog.text
    else:
        assert found == ["DFT"] and re.search(said, caplog.text) and "23 neighbouring frames" in caplog.text


@pytest.mark.parametrize("boxes", [None, True])
def test_isolated_atoms_that_inflate_the_energy_scale_are_said(boxes, caplog):
    """Isolated atoms (MACE's E0 convention) among EMT crystals are trained as ordinary structures; their
    cohesive-energy gap raised the fitted scale ~9× silently: a warning with both scales; none without them. Free
    atoms or atoms in a 20 Å periodic box (DFT's way); either is no unit mistake (they were taken for one)."""
    from ase import Atoms
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.checks import check_energy_units, isolated_atoms, warn_isolated_atoms
    from multifi.data.readers.ase_files import _record
    from multifi.data.stats import fit_references

    frames = []
    for k in range(40):
        a = bulk("Cu", "fcc", 3.6).repeat(2)
        a.numbers[: k % 4] = 28  # Cu–Ni alloys
        a.rattle(0.05, seed=k)
        frames.append(a)
    boxed = [Atoms(z, positions=[[1, 1, 1]], cell=[20, 20, 20], pbc=boxes) for z in ("Cu", "Ni", "Cu")]
    isolated = [Atoms(z, positions=[[0, 0, 0]]) for z in ("Cu", "Ni", "Cu")] if boxes is None else boxed
    for a in frames + isolated:
        a.calc = SinglePointCalculator(a, energy=EMT().get_potential_energy(a))
        a.info.update(fidelity="EMT")
    for atoms, said in ((frames + isolated, True), (frames, False)):
        ds = FidelityDataset.from_records([_record(a, None, "emt.xyz") for a in atoms])
        pairs = np.argwhere(ds.energy_mask)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert warn_isolated_atoms(ds, pairs) == (["EMT"] if said else [])
        if said:
            scales = [
                float(x) for x in re.findall(r"scale is ([\d.e-]+) eV, without them ([\d.e-]+) eV", caplog.text)[0]
            ]
            assert "3 isolated atoms" in caplog.text and scales[0] > 3 * scales[1]
        else:
            assert caplog.text == ""
    # free atoms lie far from the crystals' reference energies by their nature, not by a unit: no unit warning
    # (energies 4 eV/atom lower, as DFT's: EMT's near-zero crystal energies look like Hartree to another check)
    records = [_record(a, None, "emt.xyz") for a in frames + isolated]
    for r, a in zip(records, frames + isolated):
        r["labels"]["EMT"]["energy"] -= 4.0 * len(a)
    ds = FidelityDataset.from_records(records)
    pairs = np.argwhere(ds.energy_mask)
    fit = fit_references(ds, pairs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energy_units(ds, pairs, fit.ref, fit.scale) == []
    assert "lie far" not in caplog.text
    cu = bulk("Cu", "fcc", 3.6)
    cu.calc = SinglePointCalculator(cu, energy=-4.0)
    cu.info.update(fidelity="EMT")
    assert not isolated_atoms(FidelityDataset.from_records([_record(cu, None, "cu.xyz")])).any()  # images at 2.5 Å
    assert isolated_atoms(ds)[-3:].all() and not isolated_atoms(ds)[:-3].any()


DEMO = Path(__file__).resolve().parents[1] / "src" / "multifi" / "demo_data" / "qm9_demo.extxyz.gz"


@pytest.mark.parametrize("roll, said", [(0, None), (-1, "next"), (1, "previous"), ("swapped", "")])
def test_energies_attached_to_the_wrong_structures_are_warned(roll, said, caplog):
    """QM9 energies given to the neighbouring molecule (an index column off by one: test MAE 17 eV instead of 0.6 eV,
    silently) lie eV/atom from what per-element references give; the check says so, and which way the labels moved.
    A tenth of the labels swapped in pairs is said too; the labels as they are, not."""
    from multifi.data.checks import check_energies_follow_compositions
    from multifi.data.readers.ase_files import read_ase

    ds = read_ase(DEMO)
    k = ds.fidelities.index("GFN2-xTB")
    s = np.flatnonzero(~np.isnan(ds.energy[:, k]))
    if roll == "swapped":
        pick = np.random.default_rng(0).choice(len(s), size=len(s) // 10, replace=False)
        a, b = s[pick[::2]], s[pick[1::2]]
        ds.energy[a, k], ds.energy[b, k] = ds.energy[b, k], ds.energy[a, k].copy()
    elif roll:
        ds.energy[s, k] = np.roll(ds.energy[s, k], roll)  # roll −1: each label is the next molecule's energy
    pairs = np.stack([s, np.full(len(s), k)], 1)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warned = check_energies_follow_compositions(ds, pairs)
    assert warned == ([] if said is None else ["GFN2-xTB"])
    assert ("energies attached to the wrong structures" in caplog.text) == (said is not None)
    if said:
        assert f"Each label fits the {said} structure in the data's order far better" in caplog.text
    elif said == "":
        assert "Each label fits" not in caplog.text


def test_real_high_energy_crystals_are_not_taken_for_misplaced_energies(caplog):
    """The shared solids (PBE and r2SCAN, high-energy structures up to 2.2 eV/atom from the composition fit, 0.4 % of
    them beyond 1 eV/atom) pass the check."""
    from multifi.data.checks import check_energies_follow_compositions
    from multifi.data.readers.matpes import read_matpes

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "solids"
    if not root.exists():
        pytest.skip("shared solids data not on this machine")
    for name in ("PBE", "R2SCAN"):
        ds = read_matpes(root / f"{name}.jsonl.gz", stress_order="vasp")
        pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert check_energies_follow_compositions(ds, pairs) == []
    assert "wrong structures" not in caplog.text


def test_far_from_equilibrium_data_of_few_compositions_is_not_taken_for_misplaced_energies(caplog):
    """Dissociation curves of five diatomics and one element's clusters and cells of eight sizes (EMT) lie eV/atom
    from a composition fit by design; with so few stoichiometric ratios the fit says nothing about misplaced labels,
    and the check stays silent."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.cluster import Icosahedron

    from multifi.data.checks import check_energies_follow_compositions

    def labelled(atoms):
        atoms.calc = EMT()
        return {
            "numbers": atoms.numbers,
            "positions": atoms.positions,
            "cell": atoms.cell.array,
            "pbc": atoms.pbc,
            "labels": {"EMT": {"energy": atoms.get_potential_energy()}},
        }

    curves = [
        labelled(ase.Atoms(m, [[0, 0, 0], [0, 0, d]]))
        for m in ("H2", "N2", "O2", "CO", "NO")
        for d in np.linspace(0.6, 4.0, 30)
    ]
    cu = [labelled(bulk("Cu", cubic=True, a=a)) for a in np.linspace(3.3, 3.9, 25)]
    cu += [labelled(ase.Atoms("Cu2", [[0, 0, 0], [0, 0, d]])) for d in np.linspace(1.8, 5.0, 30)]
    cu += [labelled(Icosahedron("Cu", shells)) for shells in (2, 3)]
    cu += [labelled(bulk("Cu", "fcc", a=3.6).repeat(r)) for r in ((1, 1, 2), (1, 2, 2), (2, 2, 2), (2, 2, 3))]
    for records in (curves, cu):
        ds = FidelityDataset.from_records(records, source="far.extxyz")
        pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
        with caplog.at_level(logging.WARNING, logger="multifi"):
            assert check_energies_follow_compositions(ds, pairs) == []
    assert not caplog.records


def test_training_checks_energies_against_compositions_also_for_units_known(caplog):
    """doubtful_units runs the composition check on every fidelity, data.units_known ones too (known units do not
    place labels on the right structures), and not on one whose units it already doubts."""
    from multifi.data.checks import doubtful_units
    from multifi.data.readers.ase_files import read_ase

    ds = read_ase(DEMO)
    k = ds.fidelities.index("GFN2-xTB")
    s = np.flatnonzero(~np.isnan(ds.energy[:, k]))
    ds.energy[s, k] = np.roll(ds.energy[s, k], 1)
    pairs = np.stack([s, np.full(len(s), k)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        doubtful_units(ds, pairs, ref, scale, known=["GFN2-xTB"])
    assert "energies attached to the wrong structures" in caplog.text
    caplog.clear()
    ds.energy[s, k] /= HARTREE  # now a unit doubt: that warning, not this one
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert doubtful_units(ds, pairs, *fit_baseline(ds, pairs)) == {"energy": ["GFN2-xTB"]}
    assert "look like Hartree" in caplog.text and "wrong structures" not in caplog.text


def test_an_offset_of_one_in_few_molecules_trajectories_is_found(caplog):
    """Five molecules' MD frames, interleaved, their energies moved by one place: too few compositions for the
    composition test alone, but each label fits the next frame's molecule: said."""
    from ase.calculators.emt import EMT

    from multifi.data.checks import check_energies_follow_compositions

    rng = np.random.default_rng(0)
    records = []
    for _ in range(10):
        for name in ("CH4", "H2O", "CO2", "C2H6", "CH3OH"):
            m = molecule(name)
            m.positions += rng.normal(0, 0.05, m.positions.shape)
            m.calc = EMT()
            e = m.get_potential_energy() + sum({1: -13.6, 6: -1029.0, 8: -2041.0}[z] for z in m.numbers)
            records.append({"numbers": m.numbers, "positions": m.positions, "labels": {"DFT": {"energy": e}}})
    ds = FidelityDataset.from_records(records, source="md.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energies_follow_compositions(ds, pairs) == []
        ds.energy[:, 0] = np.roll(ds.energy[:, 0], -1)
        assert check_energies_follow_compositions(ds, pairs) == ["DFT"]
    assert "Each label fits the next structure in the data's order far better" in caplog.text


def test_isolated_atoms_are_not_taken_for_misplaced_energies(caplog):
    """MACE's E0 frames (one free atom each) lie eV/atom from a composition fit by nature: left out of the check."""
    from ase.collections import g2

    from multifi.data.checks import check_energies_follow_compositions

    refs = {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0}
    rng = np.random.default_rng(0)
    names = [n for n in g2.names if set(g2[n].numbers) <= set(refs) and len(g2[n]) > 1]
    records = [
        {
            "numbers": g2[n].numbers,
            "positions": g2[n].positions,
            "labels": {"DFT": {"energy": sum(refs[z] for z in g2[n].numbers) + rng.normal(0, 0.2)}},
        }
        for n in names
    ]
    records += [
        {"numbers": [z], "positions": [[0.0, 0.0, 0.0]], "labels": {"DFT": {"energy": refs[z] + 4.0 + 0.1 * i}}}
        for i in range(3)
        for z in refs
    ]
    ds = FidelityDataset.from_records(records, source="e0.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    assert ds.n_atoms.tolist().count(1) / len(ds) > 0.1  # beyond the share the check allows
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_energies_follow_compositions(ds, pairs) == []
    assert "wrong structures" not in caplog.text


def test_isolated_atoms_in_the_held_out_splits_are_said(caplog):
    """E0 frames split at random landed in validation and test, whose errors they then dominated (test MAE 1120 vs
    262 meV in a trial), without a word (the isolated-atom warning looked at training structures only)."""
    from multifi.data.checks import warn_isolated_atoms_held_out

    records = [dict(r, key=f"m{i}") for i, r in enumerate(_records(20))]
    records += [
        {"numbers": [z], "positions": [[0.0, 0.0, 0.0]], "labels": {"DFT": {"energy": -10.0}}, "key": f"a{z}"}
        for z in (1, 6, 7, 8)
    ]
    ds = FidelityDataset.from_records(records)
    atoms = np.flatnonzero(ds.n_atoms == 1)
    pair = lambda rows: np.stack([rows, np.zeros(len(rows), np.int64)], 1)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert (
            warn_isolated_atoms_held_out(
                ds, {"train": pair(atoms), "val": pair(np.arange(3)), "test": pair(np.arange(3, 6))}
            )
            == 0
        )
        assert not caplog.records
        held = {"train": pair(atoms[:1]), "val": pair(atoms[1:2]), "test": pair(atoms[2:])}
        assert warn_isolated_atoms_held_out(ds, held) == 3
    assert "fell into the held-out splits (validation 1, test 2)" in caplog.text


def test_forces_of_exactly_zero_are_said_where_no_calculation_gives_them(caplog):
    """Placeholder forces (zeros written for forces not computed) train toward zero forces: said for molecules,
    crystals with atoms off ideal sites and structures with forces at another fidelity; crystals on ideal sites
    (symmetry zeroes their forces: also slabs without a vacuum vector, 5-decimal CIF sites) are no news."""
    from ase.build import bulk, graphene

    from multifi.data.checks import check_zero_forces, largest_forces
    from multifi.data.split import labelled_pairs

    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):  # molecules: 'hi' forces zero on 0, 2, 4
        a = molecule("H2O")
        f = rng.normal(size=(3, 3))
        labels = {"lo": {"energy": -10.0 + i, "forces": f}, "hi": {"energy": -11.0 + i, "forces": f * (i % 2)}}
        recs.append({"numbers": a.numbers, "positions": a.positions + 0.01 * i, "labels": labels})
    crystals = [bulk("NaCl", "rocksalt", a=5.6 + 0.05 * i) for i in range(6)]
    crystals[5].rattle(0.05, seed=1)
    sheet = graphene(vacuum=None)  # pbc T T F, zero third cell vector
    mg = bulk("Mg", "hcp", a=3.21, c=5.21)
    mg.set_scaled_positions(np.round(mg.get_scaled_positions(), 5))  # 0.33333, 0.66667
    for i, c in enumerate([*crystals, sheet, mg]):  # at 'hi' only: zero forces but on crystals 2-4
        f = rng.normal(size=(len(c), 3)) if i in (2, 3, 4) else np.zeros((len(c), 3))
        recs.append(
            {
                "numbers": c.numbers,
                "positions": c.positions,
                "cell": c.cell.array,
                "pbc": c.pbc,
                "labels": {"hi": {"energy": -7.0 + i, "forces": f}},
            }
        )
    ds = FidelityDataset.from_records(recs)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_zero_forces(ds, pairs) == {"hi": 4}
    assert "4 of 14 structures with forces at fidelity 'hi' have forces of exactly 0 on every atom" in caplog.text
    assert "(molecules 3, crystals with atoms off ideal sites 1, with forces at another fidelity 3)" in caplog.text
    periodic = pairs[ds.pbc[pairs[:, 0]].any(1)]
    assert check_zero_forces(ds, periodic[[0, 1, 6, 7]]) == {}  # on ideal sites: NaCl, graphene, hcp Mg
    assert check_zero_forces(ds, periodic[[2, 5]]) == {"hi": 1}  # a rattled crystal's zeros
    s, k = pairs[:, 0], pairs[:, 1]  # in chunks of a few atoms as in one pass
    np.testing.assert_array_equal(largest_forces(ds, s, k, chunk=5), largest_forces(ds, s, k))


def _harmonic_solids(pulay: float = 150.0, n: int = 7) -> list:
    """fcc Cu and Al cells at n volumes ±3 % around V0 with a harmonic E(V) (B = 100 GPa), stresses −P·I plus a
    0.5 GPa shear (ASE's sign, eV/Å³), Cu's with a Pulay-like offset: its labels' pressure `pulay` GPa below −dE/dV;
    and two Cu supercells (8 atoms) at the ends of the scan."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa

    frames = []
    for element, a0, offset in (("Cu", 3.6, pulay), ("Al", 4.05, 0.0)):
        v0 = a0**3
        for x in np.linspace(0.97, 1.03, n):
            atoms = bulk(element, "fcc", a0 * x ** (1 / 3), cubic=True)
            v = atoms.get_volume()
            pressure = -100.0 * (v - v0) / v0  # GPa, −dE/dV
            energy = -4.0 * len(atoms) + 100.0 * GPa / (2 * v0) * (v - v0) ** 2
            sigma = (-pressure + offset) * np.eye(3) + 0.5 * (np.ones((3, 3)) - np.eye(3))
            atoms.calc = SinglePointCalculator(atoms, energy=energy, stress=sigma * GPa)
            atoms.info["fidelity"] = "PBE"
            frames.append(atoms)
            if element == "Cu" and x in (0.97, 1.03):  # two supercells: too few for a group of their own
                big = atoms.repeat((2, 1, 1))
                big.calc = SinglePointCalculator(big, energy=2 * energy, stress=sigma * GPa)
                big.info["fidelity"] = "PBE"
                frames.append(big)
    return frames


def test_pulay_offsets_are_corrected_or_dropped_in_the_composition_they_were_found_in(tmp_path, write_config, caplog):
    """data.pulay_stress: correct gives the labels the pressure of their energies (shear unchanged, other
    compositions unchanged, the input dataset unchanged); drop leaves that composition's stresses out; keep (the
    default) only warns, naming both settings."""
    from multifi.config import load_config
    from multifi.data.checks import pressure_offsets, remove_pressure_offsets
    from multifi.data.readers.ase_files import read_ase
    from multifi.data.split import labelled_pairs
    from multifi.train.prepare import prepare_data

    ase.io.write(tmp_path / "clean.extxyz", _harmonic_solids(pulay=0.0))
    ase.io.write(tmp_path / "pulay.extxyz", _harmonic_solids())
    clean, ds = read_ase(tmp_path / "clean.extxyz"), read_ase(tmp_path / "pulay.extxyz")
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    assert pressure_offsets(clean, pairs) == []
    (found,) = pressure_offsets(ds, pairs)
    assert found.formula == "Cu" and found.energy - found.label == pytest.approx(150.0, abs=1e-6)
    before = ds.stress.copy()
    corrected = remove_pressure_offsets(ds, [found], "correct")
    np.testing.assert_allclose(
        corrected.stress, clean.stress, atol=1e-6
    )  # Cu's offset gone (supercells too), shear and Al kept
    np.testing.assert_array_equal(ds.stress, before)
    dropped = remove_pressure_offsets(ds, [found], "drop")
    cu = ds.numbers[ds.offsets[:-1]] == 29
    assert not dropped.stress_mask[cu, 0].any() and dropped.stress_mask[~cu, 0].all()
    for setting, said in (
        ("keep", "data.pulay_stress: drop leaves those compositions' stresses out, correct shifts their pressure"),
        ("correct", "data.pulay_stress: pressure offsets removed: PBE Cu (9 structures: pressure -150 → 0 GPa)"),
        ("drop", "data.pulay_stress: stresses left out: PBE Cu (9 structures)"),
    ):
        source = {"path": str(tmp_path / "pulay.extxyz")}
        cfg = write_config(data={"sources": [source], "split": {"val": 0.0, "test": 0.0}, "pulay_stress": setting})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            prepared = prepare_data(load_config(cfg))
            if setting == "keep":
                from multifi.data.checks import check_stress_units

                check_stress_units(prepared.dataset, prepared.pairs["train"])
        assert said in caplog.text, caplog.text
    from multifi.train.extension_data import read_new_data  # extend reads its new fidelity's data the same way

    source = {"path": str(tmp_path / "pulay.extxyz")}
    cfg = write_config(name="extend.yaml", data={"sources": [source], "pulay_stress": "drop"})
    new, _ = read_new_data(load_config(cfg), "PBE")
    cu = new.numbers[new.offsets[:-1]] == 29
    assert not new.stress_mask[cu, 0].any() and new.stress_mask[~cu, 0].all()
