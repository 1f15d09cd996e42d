"""FidelityDataset (columnar layout, merge, save/load, subset), splits, limits, samples, baselines, neighbours."""

from __future__ import annotations

import json
import logging

import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from conftest import emt_labelled, periodic_cell, rattled_molecule

from multifi.data.dataset import FidelityDataset, geometry_key, ranges
from multifi.data.neighbors import NeighborCache, neighbor_list
from multifi.data.sources import read_sources
from multifi.data.split import Split, check_disjoint, labelled_pairs, limit_pairs, random_split, split_from_files
from multifi.data.stats import N_ELEMENTS, fit_baseline, fit_references
from multifi.errors import MultifiError

PINNED_HASH_QM9_1_SEED_0 = 18163760704920500151  # key_hashes(['qm9:1'], 0): changing it changes every run's split


def record(atoms, labels, key=None, **extra):
    r = {"numbers": atoms.numbers, "positions": atoms.positions, "labels": labels, **extra}
    if atoms.pbc.any():
        r.update(cell=atoms.cell.array, pbc=atoms.pbc)
    if key is not None:
        r["key"] = key
    return r


def water_methane_si():
    w, m, si = rattled_molecule("H2O", 0), rattled_molecule("CH4", 1), periodic_cell(0)
    rng = np.random.default_rng(0)
    recs = [
        record(w, {"PBE": {"energy": -14.0, "forces": rng.normal(size=(3, 3))}, "CC": {"energy": -14.5}}, key="w"),
        record(m, {"CC": {"energy": -24.0}}, key="m"),
        record(
            si,
            {"PBE": {"energy": -10.0, "forces": rng.normal(size=(4, 3)), "stress": [1.0, 2.0, 3.0, 0.4, 0.5, 0.6]}},
            key="si",
        ),
    ]
    return recs, (w, m, si)


def assert_same_dataset(a: FidelityDataset, b: FidelityDataset) -> None:
    assert a.fidelities == b.fidelities and len(a) == len(b)
    for name in (
        "numbers",
        "positions",
        "offsets",
        "cells",
        "pbc",
        "keys",
        "energy",
        "forces",
        "forces_mask",
        "stress",
        "stress_mask",
    ):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------------------------------------- from_records
def test_from_records_columnar_layout():
    recs, (w, m, si) = water_methane_si()
    ds = FidelityDataset.from_records(recs, source="mem")
    assert len(ds) == 3 and ds.fidelities.names == ("PBE", "CC")
    assert ds.offsets.tolist() == [0, 3, 8, 12] and ds.n_atoms.tolist() == [3, 5, 4]
    assert ds.numbers.dtype == np.uint8 and ds.numbers.tolist() == [*w.numbers, *m.numbers, *si.numbers]
    np.testing.assert_array_equal(ds.positions[ds.atoms_slice(1)], m.positions)
    assert ds.keys.tolist() == ["w", "m", "si"]
    np.testing.assert_array_equal(ds.energy_mask, [[True, True], [False, True], [True, False]])
    assert np.isnan(ds.energy[1, 0]) and ds.energy[0, 1] == -14.5
    np.testing.assert_array_equal(ds.has_forces(), [[True, False], [False, False], [True, False]])
    np.testing.assert_allclose(ds.forces[ds.atoms_slice(0), 0], recs[0]["labels"]["PBE"]["forces"], rtol=1e-6)
    assert not ds.forces[ds.atoms_slice(1)].any()
    np.testing.assert_array_equal(ds.has_stress(), [[False, False], [False, False], [True, False]])
    # Voigt (xx yy zz yz xz xy) → symmetric 3×3
    np.testing.assert_array_equal(ds.stress[2, 0], [[1.0, 0.6, 0.5], [0.6, 2.0, 0.4], [0.5, 0.4, 3.0]])
    assert ds.pbc.tolist() == [[False] * 3, [False] * 3, [True] * 3]
    np.testing.assert_array_equal(ds.cells[2], si.cell.array)
    assert not ds.cells[:2].any()
    assert ds.label_counts() == {
        "PBE": {"energy": 2, "forces": 2, "stress": 1},
        "CC": {"energy": 2, "forces": 0, "stress": 0},
    }
    pairs = np.array([[2, 0], [1, 1], [0, 1]])  # e.g. a training split: Si at PBE, methane and water at CC
    assert ds.label_counts(pairs) == {
        "PBE": {"energy": 1, "forces": 1, "stress": 1},
        "CC": {"energy": 2, "forces": 0, "stress": 0},
    }
    assert ds.label_counts(pairs[:1])["CC"] == {"energy": 0, "forces": 0, "stress": 0}
    assert ds.elements == [1, 6, 8, 11, 17]
    back = ds.to_atoms(2)
    np.testing.assert_allclose(back.positions, si.positions)
    assert back.pbc.all() and back.info["key"] == "si"


def test_geometry_keys_identify_structures():
    a = rattled_molecule("H2O", 0)
    b = a.copy()
    b.positions += 1e-7  # below the 1e-5 Å rounding
    c = rattled_molecule("H2O", 1)
    ka, kb, kc = (geometry_key(x.numbers, x.positions) for x in (a, b, c))
    assert ka == kb != kc and ka.startswith("sha1:")
    ds = FidelityDataset.from_records([record(a, {"x": {"energy": 1.0}})])
    assert ds.keys[0] == ka


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            lambda r: r.update(positions=np.zeros((2, 3))),
            r"mem: structure 0: positions have shape \(2, 3\), expected \(3, 3\)",
        ),
        (
            lambda r: r["labels"]["PBE"].update(forces=np.zeros((3, 2))),
            r"structure 0: forces have shape \(3, 2\), expected \(3, 3\)",
        ),
        (lambda r: r.update(cell=np.eye(2), pbc=True), r"structure 0: cell has shape \(2, 2\)"),
        (lambda r: r["labels"]["PBE"].update(stress=[1.0, 2.0]), r"structure 0: stress has shape \(2,\)"),
        (
            lambda r: r["positions"].__setitem__((1, 0), np.nan),
            r"mem: structure 0: non-finite \(NaN/inf\) atom positions",
        ),
        (lambda r: r.update(cell=np.diag([5.0, np.inf, 5.0]), pbc=True), r"structure 0: non-finite \(NaN/inf\) cell"),
    ],
)
def test_from_records_inconsistent_shapes_are_one_line_errors(bad, match):
    recs, _ = water_methane_si()
    bad(recs[0])
    with pytest.raises(MultifiError, match=match) as info:
        FidelityDataset.from_records(recs, source="mem")
    assert "\n" not in str(info.value)


def test_validate_inconsistent_columns():
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs, source="mem")
    ds.positions = ds.positions[:-1]
    with pytest.raises(MultifiError, match="mem: inconsistent array shapes"):
        ds.validate()


@pytest.mark.parametrize("z", [0, 150])
def test_unknown_element_in_records(z):
    recs, _ = water_methane_si()
    recs[1]["numbers"] = np.array([6, 1, 1, 1, z])
    with pytest.raises(MultifiError, match=f"mem: structure 1: unknown element with atomic number {z}"):
        FidelityDataset.from_records(recs, source="mem")


@pytest.mark.parametrize("what", ["energy", "forces", "stress"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_labels_are_errors(what, value):
    recs, _ = water_methane_si()
    lab = recs[2]["labels"]["PBE"]
    if what == "energy":
        lab["energy"] = value
    else:
        arr = np.array(lab[what], dtype=float)
        arr.flat[1] = value
        lab[what] = arr
    with pytest.raises(MultifiError, match=r"^mem: .*non-finite \(NaN/inf\)") as info:
        FidelityDataset.from_records(recs, source="mem")
    msg = str(info.value)
    assert "structure 2" in msg and "'PBE'" in msg and "\n" not in msg


def test_skip_invalid_drops_non_finite_labels():
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs, source="mem")
    ds.forces[ds.atoms_slice(0), 0] = np.nan
    ds.energy[1, 1] = np.inf
    ds.validate(skip_invalid=True)
    assert ds.n_dropped == 2 and not ds.forces_mask[0, 0] and np.isnan(ds.energy[1, 1])
    assert ds.energy_mask[0, 0]  # the energy of that structure is kept


# ---------------------------------------------------------------------------------------------- merge
def two_sources_sharing_structures():
    mols = [rattled_molecule(n, i) for i, n in enumerate(("H2O", "NH3", "CH4", "CH3OH"))]
    a = FidelityDataset.from_records(
        [
            record(m, {"PBE": {"energy": -float(i), "forces": np.full((len(m), 3), float(i))}})
            for i, m in enumerate(mols[:3])
        ],
        source="a.xyz",
    )
    b = FidelityDataset.from_records(
        [record(m, {"CC": {"energy": -10.0 - i}}) for i, m in enumerate(mols[1:], start=1)], source="b.xyz"
    )
    return mols, a, b


def test_merge_combines_labels_of_shared_structures():
    mols, a, b = two_sources_sharing_structures()
    ds = FidelityDataset.merge([a, b])
    assert len(ds) == 4 and ds.fidelities.names == ("PBE", "CC")
    assert ds.keys.tolist() == [*a.keys, b.keys[-1]]  # first-appearance order
    np.testing.assert_array_equal(ds.energy_mask, [[True, False], [True, True], [True, True], [False, True]])
    np.testing.assert_array_equal(ds.energy[1], [-1.0, -11.0])
    np.testing.assert_array_equal(ds.energy[3, 1], -13.0)
    np.testing.assert_array_equal(ds.has_forces()[:, 0], [True, True, True, False])
    np.testing.assert_array_equal(ds.forces[ds.atoms_slice(2), 0], 2.0)
    np.testing.assert_array_equal(ds.positions[ds.atoms_slice(3)], mols[3].positions)
    assert ds.source == "a.xyz + b.xyz"
    # merging is symmetric up to order
    ba = FidelityDataset.merge([b, a])
    assert ba.fidelities.names == ("CC", "PBE") and sorted(ba.keys) == sorted(ds.keys)


def test_merge_identical_duplicates_are_fine():
    _, a, b = two_sources_sharing_structures()
    ds = FidelityDataset.merge([a, b, a])
    assert len(ds) == 4
    assert_same_dataset(ds, FidelityDataset.merge([a, b]))


def test_merge_conflicting_energy_is_an_error():
    mols, a, _ = two_sources_sharing_structures()
    c = FidelityDataset.from_records([record(mols[0], {"PBE": {"energy": -5.0}})], source="c.xyz")
    with pytest.raises(
        MultifiError,
        match=r"a.xyz: structure 0 \(0-based\) and c.xyz: structure 0 \(0-based\): conflicting energy labels at fidelity 'PBE'",
    ):
        FidelityDataset.merge([a, c])


def test_coordinates_rounded_to_three_decimals_are_the_same_structure_under_one_key():
    """A file printing coordinates to 3 decimals and another to full precision give one structure (up to 1.7e-3 Å
    relative to atom 0); 0.01 Å apart under one key is another structure: an error saying so."""
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 3, (6, 3))
    pos[0] = [0.0004, 0.0004, 0.0004]  # atom 0 rounds one way, others the other: the worst case relative to it
    numbers = np.array([6, 1, 1, 1, 8, 1])
    full = {"numbers": numbers, "positions": pos, "key": "m", "labels": {"A": {"energy": -1.0}}}
    rounded = {"numbers": numbers, "positions": np.round(pos, 3), "key": "m", "labels": {"B": {"energy": -2.0}}}
    merged = FidelityDataset.merge(
        [FidelityDataset.from_records([full], source="a.xyz"), FidelityDataset.from_records([rounded], source="b.xyz")]
    )
    assert len(merged) == 1 and not np.isnan(merged.energy[0]).any()
    moved = dict(rounded, positions=pos + np.r_[[0.0], [0.01] * 5][:, None] * [1, 0, 0])
    with pytest.raises(MultifiError, match=r"same key 'm', different geometries .* 0.01 Å apart .* other structures"):
        FidelityDataset.merge(
            [
                FidelityDataset.from_records([full], source="a.xyz"),
                FidelityDataset.from_records([moved], source="b.xyz"),
            ]
        )


def test_merge_conflicting_forces_is_an_error():
    mols, a, _ = two_sources_sharing_structures()
    c = FidelityDataset.from_records(
        [record(mols[0], {"PBE": {"energy": -0.0, "forces": np.ones((3, 3))}})], source="c.xyz"
    )
    with pytest.raises(
        MultifiError,
        match=r"a.xyz: structure 0 .* and c.xyz: structure 0 .*: conflicting forces labels at fidelity 'PBE'",
    ):
        FidelityDataset.merge([a, c])


def test_a_conflict_names_the_files_with_labels_at_that_fidelity():
    """Four sources share a structure: PBE in one, r2SCAN in three of which the last disagrees. The error names
    the r2SCAN files (the first and the disagreeing one), not the PBE one."""
    mol = rattled_molecule("H2O", 0)
    f = np.full((3, 3), 0.1)
    parts = [
        FidelityDataset.from_records([record(mol, {"PBE": {"energy": -1.0, "forces": f}})], source="pbe.xyz"),
        FidelityDataset.from_records([record(mol, {"R2SCAN": {"energy": -2.0, "forces": f}})], source="r2a.xyz"),
        FidelityDataset.from_records([record(mol, {"R2SCAN": {"energy": -2.0, "forces": f}})], source="r2b.xyz"),
        FidelityDataset.from_records([record(mol, {"R2SCAN": {"energy": -2.0, "forces": -f}})], source="neg.xyz"),
    ]
    with pytest.raises(MultifiError, match="conflicting forces labels at fidelity 'R2SCAN'") as err:
        FidelityDataset.merge(parts)
    assert "pbe.xyz" not in str(err.value) and "neg.xyz" in str(err.value) and "r2a.xyz" in str(err.value)


def test_merge_same_key_different_structure_is_an_error():
    w, nh3 = rattled_molecule("H2O", 0), rattled_molecule("NH3", 0)
    a = FidelityDataset.from_records([record(w, {"PBE": {"energy": -1.0}}, key="k1")], source="a.xyz")
    b = FidelityDataset.from_records([record(nh3, {"CC": {"energy": -1.0}}, key="k1")], source="b.xyz")
    with pytest.raises(
        MultifiError, match=r"a.xyz: structure 0 .* and b.xyz: structure 0 .*: same key 'k1', different atom counts"
    ):
        FidelityDataset.merge([a, b])
    co = molecule("CO2")  # 3 atoms like water, other elements
    c = FidelityDataset.from_records([record(co, {"CC": {"energy": -1.0}}, key="k1")], source="c.xyz")
    with pytest.raises(MultifiError, match="same key 'k1', different elements"):
        FidelityDataset.merge([a, c])


def test_merge_same_key_different_geometry_is_an_error():
    """A key reused for a displaced or strained frame must not move its labels onto the other geometry."""
    w = rattled_molecule("H2O", 0)
    moved = w.copy()
    moved.positions[1] += [0.37, 0.0, 0.0]
    a = FidelityDataset.from_records([record(w, {"PBE": {"energy": -1.0}}, key="k1")], source="a.xyz")
    b = FidelityDataset.from_records([record(moved, {"CC": {"energy": -1.0}}, key="k1")], source="b.xyz")
    with pytest.raises(
        MultifiError,
        match=r"a.xyz: structure 0 .* and b.xyz: structure 0 .*: same key 'k1', different geometries \(atom 1 \(0-based\) 0.37 Å apart once shifted to put atom 0 on atom 0\)",
    ):
        FidelityDataset.merge([a, b])
    nudged = w.copy()
    nudged.positions[0] += 2e-4  # rounding of a written file: still the same structure
    nudged.positions += [3.0, -1.0, 0.5]  # and another origin: a rigid shift changes no label
    c = FidelityDataset.from_records([record(nudged, {"CC": {"energy": -1.0}}, key="k1")], source="c.xyz")
    merged = FidelityDataset.merge([a, c])
    assert len(merged) == 1 and merged.energy_mask.all()
    np.testing.assert_array_equal(merged.positions, w.positions)  # the first structure's geometry is kept


def test_merge_same_key_periodic_compares_modulo_the_lattice_and_the_cell():
    si = bulk("Si", "diamond", a=5.43)
    rec = lambda atoms, name: {  # noqa: E731
        "numbers": atoms.numbers,
        "positions": atoms.positions,
        "cell": np.array(atoms.cell),
        "pbc": atoms.pbc,
        "key": "mp-149",
        "labels": {name: {"energy": -10.0}},
    }
    wrapped = si.copy()
    wrapped.positions[1] += si.cell[0] - si.cell[2]  # the same crystal, atom written in another image
    a = FidelityDataset.from_records([rec(si, "PBE")], source="pbe.xyz")
    b = FidelityDataset.from_records([rec(wrapped, "R2SCAN")], source="r2.xyz")
    merged = FidelityDataset.merge([a, b])
    assert len(merged) == 1 and merged.energy_mask.all()
    strained = si.copy()
    strained.set_cell(si.cell * 1.04, scale_atoms=True)
    c = FidelityDataset.from_records([rec(strained, "R2SCAN")], source="r2.xyz")
    with pytest.raises(MultifiError, match=r"same key 'mp-149', different cells \(by up to 0.109 Å\)"):
        FidelityDataset.merge([a, c])
    # a slab without vacuum (zero third vector): compared modulo its two lattice vectors, not across the slab
    from ase.build import diamond100

    slab = diamond100("Si", size=(2, 2, 2))
    across, along = slab.copy(), slab.copy()
    across.positions[3] += [0.0, 0.0, 0.7]
    along.positions[3] += slab.cell[0]
    a = FidelityDataset.from_records([rec(slab, "PBE")], source="pbe.xyz")
    with pytest.raises(MultifiError, match=r"same key 'mp-149', different geometries \(atom 3 \(0-based\) 0.7 Å"):
        FidelityDataset.merge([a, FidelityDataset.from_records([rec(across, "R2SCAN")], source="r2.xyz")])
    merged = FidelityDataset.merge([a, FidelityDataset.from_records([rec(along, "R2SCAN")], source="r2.xyz")])
    assert len(merged) == 1 and merged.energy_mask.all()


def test_read_sources_merges_files_and_repeated_structures(tmp_path):
    mols = [rattled_molecule(n, i) for i, n in enumerate(("H2O", "NH3", "CH4"))]
    one = tmp_path / "one.extxyz"  # two fidelities in one file: the same geometry twice
    ase.io.write(one, [emt_labelled(m, "lo") for m in mols] + [emt_labelled(mols[0], "hi", 2.0)])
    two = tmp_path / "two.extxyz"
    ase.io.write(two, [emt_labelled(mols[1], "x")])
    ds = read_sources([str(one), str(two)])
    assert len(ds) == 3 and ds.fidelities.names == ("lo", "hi", "x")
    np.testing.assert_array_equal(ds.energy_mask, [[1, 1, 0], [1, 0, 1], [1, 0, 0]])
    single = read_sources([str(one)])
    assert len(single) == 3 and single.label_counts()["hi"]["energy"] == 1


# ---------------------------------------------------------------------------------------------- persistence, subsets
def test_save_load_roundtrip(tmp_path):
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs, source="mem")
    path = ds.save(tmp_path / "sub" / "ds.npz")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    back = FidelityDataset.load(path)
    assert_same_dataset(ds, back)
    assert back.source == str(path)
    # a dataset without forces/stress
    plain = FidelityDataset.from_records([record(rattled_molecule("H2O", 0), {"a": {"energy": 1.0}})])
    assert_same_dataset(plain, FidelityDataset.load(plain.save(tmp_path / "plain.npz")))


def test_load_errors(tmp_path):
    with pytest.raises(MultifiError, match="missing.npz: no such file"):
        FidelityDataset.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MultifiError, match="other.npz: not a multifi dataset file"):
        FidelityDataset.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("3\nProperties=species:S:1:pos:R:3\n")  # an extxyz named .npz
    with pytest.raises(MultifiError, match=r"text.npz: not a multifi dataset file \(not an .npz archive\)$"):
        FidelityDataset.load(tmp_path / "text.npz")


def test_subset_keeps_structures_in_the_given_order():
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs)
    sub = ds.subset(np.array([2, 0]))
    assert sub.keys.tolist() == ["si", "w"] and sub.offsets.tolist() == [0, 4, 7]
    np.testing.assert_array_equal(sub.positions[sub.atoms_slice(1)], ds.positions[ds.atoms_slice(0)])
    np.testing.assert_array_equal(sub.forces[sub.atoms_slice(0)], ds.forces[ds.atoms_slice(2)])
    np.testing.assert_array_equal(sub.stress_mask, ds.stress_mask[[2, 0]])
    np.testing.assert_array_equal(sub.energy, ds.energy[[2, 0]])
    assert sub.cells[0].any() and not sub.cells[1].any()
    assert len(ds.subset(np.array([], dtype=int))) == 0
    assert ranges(np.array([5, 0]), np.array([2, 3])).tolist() == [5, 6, 0, 1, 2]


def test_with_fidelities_and_drop_unlabelled_fidelities():
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs)
    wide = ds.with_fidelities(ds.fidelities.union(type(ds.fidelities)(["CC", "NEW"])))
    assert wide.fidelities.names == ("PBE", "CC", "NEW") and wide.energy.shape == (3, 3)
    assert np.isnan(wide.energy[:, 2]).all() and not wide.forces_mask[:, 2].any()
    np.testing.assert_array_equal(wide.energy[:, :2], ds.energy)
    back = wide.drop_fidelities_without_labels()
    assert_same_dataset(back, ds)


# ---------------------------------------------------------------------------------------------- splits and samples
def test_random_split_is_disjoint_complete_and_seeded():
    keys = np.array([f"s{i}" for i in range(100)])
    s = random_split(keys, val=0.1, test=0.2, seed=3)
    parts = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
    assert [len(p) for p in parts] == [70, 10, 20]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(range(100))
    again = random_split(keys, val=0.1, test=0.2, seed=3)
    assert all((s[n] == again[n]).all() for n in ("train", "val", "test"))
    assert not (random_split(keys, 0.1, 0.2, seed=4).test == s.test).all()
    with pytest.raises(MultifiError, match="no training structures"):
        random_split(keys[:3], val=0.5, test=0.5, seed=0)


def test_key_hashes_depend_on_the_key_and_seed_only_and_are_pinned():
    """A structure's place in the random order comes from its key and the seed alone: not from the width of the
    other keys' array, nor from their order; and the values are fixed across versions and machines (a run's split
    must come out the same wherever it is resumed or evaluated)."""
    from multifi.data.split import key_hashes, key_order

    short = key_hashes(np.array(["qm9:1"]), 0)
    wide = key_hashes(np.array(["qm9:1", "a-much-longer-key-0123456789"]), 0)
    assert short[0] == wide[0]
    assert key_hashes(np.array(["qm9:1"]), 1)[0] != short[0]  # the seed matters
    assert key_hashes(np.array(["qm9:1"]), 0, 5)[0] != short[0]  # and so does a second one
    assert key_hashes(np.array(["qm9:1"]), -1)[0] != short[0]  # negative seeds are seeds
    assert len(set(key_hashes(np.array(["ab", "ba", "a", "b", "", "é", "e"]), 0).tolist())) == 7
    assert int(short[0]) == PINNED_HASH_QM9_1_SEED_0
    keys = np.array([f"matpes:mp-{i}" for i in range(50)])
    order = key_order(keys, 3)
    shuffled = np.random.default_rng(0).permutation(50)
    assert keys[shuffled][key_order(keys[shuffled], 3)].tolist() == keys[order].tolist()
    assert key_hashes(np.zeros(0, dtype=str), 0).shape == (0,)
    swapped = np.array(["qm9:1", "b"], dtype=">U5")  # keys saved on a big-endian machine
    assert key_hashes(swapped, 0).tolist() == key_hashes(np.array(["qm9:1", "b"]), 0).tolist()
    assert key_hashes(np.array(["a"]), np.int64(-5)).tolist() == key_hashes(np.array(["a"]), -5).tolist()


def test_random_split_is_the_same_whatever_the_order_of_the_structures():
    """Sources listed in another order (or a file's frames reordered) split into the same structures by key;
    the older order by position is kept for runs that split by it."""
    keys = np.array([f"k{i}" for i in range(97)])
    perm = np.random.default_rng(1).permutation(len(keys))
    a, b = random_split(keys, 0.1, 0.2, seed=7), random_split(keys[perm], 0.1, 0.2, seed=7)
    for name in ("train", "val", "test"):
        assert sorted(keys[a[name]].tolist()) == sorted(keys[perm][b[name]].tolist()), name
    assert [len(a[n]) for n in ("train", "val", "test")] == [68, 10, 19]
    old = random_split(keys, 0.1, 0.2, seed=7, order="position")
    expected = np.random.default_rng(7).permutation(97)
    assert old.test.tolist() == np.sort(expected[:19]).tolist()


def test_train_limits_and_splits_of_swapped_sources_are_the_same(tmp_path):
    """Two sources listed in either order: the same structures in each split and the same limited training
    labels (by structure key and fidelity), for a run's data as `multifi train` prepares it."""
    from multifi.config import RunConfig
    from multifi.train.prepare import prepare_data

    lo = [emt_labelled(rattled_molecule(m, seed=i), "lo") for i, m in enumerate(["H2O", "CH4", "NH3", "C2H6"] * 6)]
    hi = [emt_labelled(rattled_molecule(m, seed=100 + i), "hi", scale=1.1) for i, m in enumerate(["H2O", "CH4"] * 8)]
    for i, a in enumerate(lo + hi):
        a.info["key"] = f"mol-{i}"
    ase.io.write(tmp_path / "lo.extxyz", lo, format="extxyz")
    ase.io.write(tmp_path / "hi.extxyz", hi, format="extxyz")

    def prepared(order, by="key"):
        raw = {
            "data": {
                "sources": [{"path": str(tmp_path / name)} for name in order],
                "split": {"val": 0.2, "test": 0.2, "seed": 4, "order": by},
                "train_limits": {"lo": 5, "hi": 3},
            },
            "model": {"backbone": "painn"},
        }
        prep = prepare_data(RunConfig.model_validate(raw))
        keys, names = prep.dataset.keys, prep.dataset.fidelities.names
        split = {n: sorted(keys[prep.split[n]].tolist()) for n in ("train", "val", "test")}
        limited = sorted((str(keys[s]), names[k]) for s, k in prep.pairs["train"].tolist())
        return split, limited

    split, limited = prepared(["lo.extxyz", "hi.extxyz"])
    assert prepared(["hi.extxyz", "lo.extxyz"]) == (split, limited)
    assert prepared(["hi.extxyz", "lo.extxyz"], "position") != prepared(["lo.extxyz", "hi.extxyz"], "position")
    assert sum(1 for _, f in limited if f == "lo") == 5 and sum(1 for _, f in limited if f == "hi") == 3


def test_split_files_that_cannot_be_read_are_one_line_errors(tmp_path):
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs)
    (tmp_path / "bad.json").write_text('["w", "m",')
    (tmp_path / "folder.txt").mkdir()
    (tmp_path / "latin.txt").write_bytes(b"w\n\xff\n")
    for name, match in [
        ("bad.json", r"bad\.json: invalid JSON at line 1"),
        ("folder.txt", r"folder\.txt: not a readable split file \(IsADirectoryError"),
        ("latin.txt", r"latin\.txt: not a readable split file \(UnicodeDecodeError"),
    ]:
        with pytest.raises(MultifiError, match=match) as info:
            split_from_files({"train": str(tmp_path / name)}, ds)
        assert "\n" not in str(info.value)


def test_numbers_in_a_split_file_of_data_keyed_by_numbers_are_keys_or_an_error():
    """Structures keyed 1…10 and a file listing 0-based positions 0…6: '0' was read as a position and '1'…'6' as keys,
    moving one structure into another split silently. Numbers that are all keys are keys; keys and positions mixed
    are an error."""
    records = [
        {"numbers": [1, 1], "positions": [[0, 0, 0], [0, 0, 0.74 + 0.01 * i]], "labels": {"lo": {"energy": -1.0 - i}}}
        | {"key": str(i + 1)}
        for i in range(10)
    ]
    ds = FidelityDataset.from_records(records)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        positions = Path(tmp) / "train.txt"
        positions.write_text("\n".join(str(i) for i in range(7)))
        with pytest.raises(MultifiError, match=r"train\.txt: '1' is a structure key and '0' a position"):
            split_from_files({"train": str(positions)}, ds)
        keys = Path(tmp) / "val.txt"
        keys.write_text("7\n8\n")
        assert ds.keys[split_from_files({"val": str(keys)}, ds).val].tolist() == ["7", "8"]


def test_split_files_by_key_and_overlap_error(tmp_path, caplog):
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs)
    (tmp_path / "train.txt").write_text("# training structures\nw  # water\nsi\n")  # comments are skipped
    (tmp_path / "test.json").write_text(json.dumps(["m"]))
    with caplog.at_level("WARNING", logger="multifi"):
        s = split_from_files({"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.json")}, ds)
    assert s.train.tolist() == [0, 2] and s.test.tolist() == [1] and s.val.tolist() == []
    assert "in none of these split files" not in caplog.text
    with caplog.at_level("WARNING", logger="multifi"):  # structures left out are named, not dropped silently
        split_from_files({"train": str(tmp_path / "train.txt")}, ds)
    assert "train.txt: 1 of 3 structures are in none of these split files (e.g. m): they are not used" in caplog.text
    (tmp_path / "val.txt").write_text("2\n")  # an index, also in train
    with pytest.raises(MultifiError, match=r"train.txt, .*val.txt: structure si is in both the train and val splits"):
        split_from_files({"train": str(tmp_path / "train.txt"), "val": str(tmp_path / "val.txt")}, ds)
    (tmp_path / "bad.txt").write_text("nope\n")
    with pytest.raises(MultifiError, match=r"bad.txt: 'nope' is neither a structure key nor an index below 3"):
        split_from_files({"train": str(tmp_path / "bad.txt")}, ds)
    with pytest.raises(MultifiError, match="missing.txt: no such split file"):
        split_from_files({"train": str(tmp_path / "missing.txt")}, ds)
    keyed = FidelityDataset.from_records([dict(r, key=f"matpes:{r['key']}") for r in recs])
    (tmp_path / "bare.txt").write_text("si\n")  # a MatPES id without the prefix its key carries
    with pytest.raises(MultifiError, match=r"bare.txt: 'si' is neither .*; did you mean 'matpes:si'\?"):
        split_from_files({"train": str(tmp_path / "bare.txt")}, keyed)
    # saved splits list keys
    s.save(tmp_path / "splits.json", ds)
    assert json.loads((tmp_path / "splits.json").read_text()) == {"train": ["w", "si"], "val": [], "test": ["m"]}
    with pytest.raises(MultifiError):
        check_disjoint(Split(train=np.array([0, 1]), val=np.array([1]), test=np.array([], int)), ds)


def test_labelled_pairs():
    recs, _ = water_methane_si()
    recs.append(record(rattled_molecule("NH3", 0), {"CC": {}}))  # a structure without labels gives no sample
    ds = FidelityDataset.from_records(recs)
    assert labelled_pairs(ds, np.arange(4)).tolist() == [[0, 0], [0, 1], [1, 1], [2, 0]]
    assert labelled_pairs(ds, np.array([2, 1])).tolist() == [[2, 0], [1, 1]]
    assert labelled_pairs(ds, np.array([3])).shape == (0, 2)


def test_forces_only_and_stress_only_labels_are_samples():
    si = periodic_cell(0)
    ds = FidelityDataset.from_records([record(si, {"F": {"forces": np.ones((4, 3))}, "S": {"stress": np.eye(3)}})])
    assert labelled_pairs(ds, np.arange(1)).tolist() == [[0, 0], [0, 1]]
    assert not ds.energy_mask.any()


def test_train_limits_are_nested_and_per_fidelity():
    rng = np.random.default_rng(0)
    S = 500
    energy = np.where(rng.random((S, 2)) < 0.8, rng.normal(size=(S, 2)), np.nan)
    ds = FidelityDataset(
        numbers=np.ones(S, np.uint8),
        positions=np.zeros((S, 3)),
        offsets=np.arange(S + 1),
        cells=np.zeros((S, 3, 3)),
        pbc=np.zeros((S, 3), bool),
        keys=np.arange(S).astype(str),
        fidelities=__import__("multifi").data.FidelityTable(["lo", "hi"]),
        energy=energy,
    )
    pairs = labelled_pairs(ds, np.arange(S))
    n_hi = int((pairs[:, 1] == 1).sum())
    limits = lambda given: ds.fidelities.per_index(given, np.nan, "data.train_limits")  # noqa: E731
    small = limit_pairs(pairs, limits({"hi": 100}), ds, seed=0)
    large = limit_pairs(pairs, limits({"hi": 200}), ds, seed=0)
    as_set = lambda p: set(map(tuple, p.tolist()))  # noqa: E731
    assert (small[:, 1] == 1).sum() == 100 and (large[:, 1] == 1).sum() == 200 and n_hi > 200
    assert as_set(small) <= as_set(large)
    assert ((small[:, 1] == 0).sum(), (large[:, 1] == 0).sum()) == ((pairs[:, 1] == 0).sum(),) * 2  # lo untouched
    both = limit_pairs(pairs, limits({"hi": 100, "lo": 50}), ds, seed=0)
    assert as_set(both[both[:, 1] == 1]) == as_set(small[small[:, 1] == 1])
    assert (both[:, 1] == 0).sum() == 50
    assert as_set(limit_pairs(pairs, limits({"hi": 10**6}), ds, seed=0)) == as_set(pairs)
    assert limit_pairs(pairs, limits({}), ds, seed=0) is pairs  # no limit: every sample
    assert not as_set(limit_pairs(pairs, limits({"hi": 100}), ds, seed=1)) == as_set(small)
    with pytest.raises(MultifiError, match=r"data.train_limits: unknown fidelity 'HI'.*known: lo, hi"):
        limits({"HI": 5})


# ---------------------------------------------------------------------------------------------- baselines
def synthetic_linear_dataset(ref: dict[str, dict[int, float]], n: int = 30, seed: int = 0) -> FidelityDataset:
    """Random compositions of H, C, N, O; energies exactly Σ_Z n_Z ref[fidelity][Z]; some labels missing."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        numbers = rng.choice([1, 6, 7, 8], size=rng.integers(2, 9))
        labels = {
            name: {"energy": float(sum(r[int(z)] for z in numbers))}
            for k, (name, r) in enumerate(ref.items())
            if (i + k) % 4
        }  # each fidelity misses some
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    return FidelityDataset.from_records(recs)


def test_fit_baseline_recovers_per_element_references():
    ref = {"lo": {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}, "hi": {1: -13.1, 6: -1027.5, 7: -1484.0, 8: -2041.5}}
    ds = synthetic_linear_dataset(ref)
    fitted, scale = fit_baseline(ds, labelled_pairs(ds, np.arange(len(ds))))
    assert fitted.shape == (N_ELEMENTS, 2) and scale.shape == (2,)
    for k, name in enumerate(ds.fidelities.names):
        for z, value in ref[name].items():
            assert fitted[z, k] == pytest.approx(value, abs=1e-4), (name, z)
    assert not np.delete(fitted, [1, 6, 7, 8], axis=0).any()
    np.testing.assert_allclose(scale, 1.0)  # exact fit, no forces: fallback scale of 1 eV


def test_fit_baseline_uses_only_the_given_pairs_and_scales_residuals():
    ref = {"lo": {1: -1.0, 6: -5.0, 7: -7.0, 8: -9.0}, "hi": {1: -2.0, 6: -6.0, 7: -8.0, 8: -10.0}}
    ds = synthetic_linear_dataset(ref, n=60)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    noise = np.random.default_rng(1).normal(scale=0.05, size=len(ds))
    lo, hi = ds.fidelities.index("lo"), ds.fidelities.index("hi")
    ds.energy[:, hi] += noise * ds.n_atoms  # per-atom noise on 'hi'
    refs = fit_references(ds, pairs[pairs[:, 1] == hi])
    fitted, scale = refs.ref, refs.scale
    # 'lo' not in the pairs: nothing fitted from its labels; its references are the estimate from 'hi'
    assert not refs.fitted[:, lo].any() and refs.estimated(lo) == [1, 6, 7, 8]
    assert scale[lo] == scale[hi] and refs.borrowed_scale.tolist() == [lo == 0, hi == 0]  # no labels: hi's scale
    np.testing.assert_allclose(fitted[:, lo], fitted[:, hi], atol=1e-6)
    np.testing.assert_allclose(fitted[[1, 6, 7, 8], hi], [-2.0, -6.0, -8.0, -10.0], atol=0.2)
    assert 0.02 < scale[hi] < 0.1


def test_fit_baseline_pooled_fits_all_fidelities_as_one():
    ref = {"lo": {1: -1.0, 6: -5.0, 7: -7.0, 8: -9.0}, "hi": {1: -2.0, 6: -6.0, 7: -8.0, 8: -10.0}}
    ds = synthetic_linear_dataset(ref)
    both = ds.energy_mask.all(1)
    ds = ds.subset(np.flatnonzero(both))  # every structure at both fidelities: pooled fit = mean offsets
    fitted, _ = fit_baseline(ds, labelled_pairs(ds, np.arange(len(ds))), pooled=True)
    np.testing.assert_allclose(fitted[[1, 6, 7, 8], 0], [-1.5, -5.5, -7.5, -9.5], atol=1e-4)
    np.testing.assert_array_equal(fitted[:, 0], fitted[:, 1])


# ---------------------------------------------------------------------------------------------- neighbours
def test_neighbor_list_matches_ase_for_a_small_periodic_cell():
    atoms = periodic_cell(0)
    cutoff = 6.0  # larger than the cell: several images of every atom
    i, j, s = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    ai, aj, aS = ase_neighbor_list("ijS", atoms, cutoff)
    assert sorted(zip(i, j, map(tuple, s))) == sorted(zip(ai, aj, map(tuple, aS)))
    d = atoms.positions[j] - atoms.positions[i] + s @ atoms.cell.array
    assert (np.linalg.norm(d, axis=1) < cutoff).all() and (i != j).any()


def test_neighbor_cache_is_csr_of_per_structure_lists():
    recs, (w, m, si) = water_methane_si()
    ds = FidelityDataset.from_records(recs)
    nc = NeighborCache(ds, 3.0)
    for s, atoms in enumerate((w, m, si)):
        sl = slice(nc.edge_offsets[s], nc.edge_offsets[s + 1])
        i, j, sh = neighbor_list(atoms.positions, atoms.cell.array if s == 2 else np.zeros((3, 3)), atoms.pbc, 3.0)
        assert nc.centers[sl].tolist() == i.tolist() and nc.neighbors[sl].tolist() == j.tolist()
        np.testing.assert_array_equal(nc.shifts[sl], sh)
    assert nc.n_edges.tolist() == [6, 20, len(neighbor_list(si.positions, si.cell.array, si.pbc, 3.0)[0])]
    with pytest.raises(MultifiError, match="zero volume"):
        neighbor_list(si.positions, np.zeros((3, 3)), [True] * 3, 3.0)


def test_neighbor_cache_draws_no_progress_bar_into_a_log(capsys):
    """Without a terminal (a log file, CI) the neighbour lists of a large dataset leave stderr clean."""
    recs, _ = water_methane_si()
    ds = FidelityDataset.from_records(recs[:2] * 1100)  # > 2000 structures: the size that draws a bar on a terminal
    NeighborCache(ds, 3.0, progress=True)
    err = capsys.readouterr().err
    assert "neighbour lists" not in err and "\r" not in err


def test_limits_keep_every_element_represented():
    from ase.build import molecule

    from multifi.data.split import labelled_pairs, limit_pairs

    recs = []
    for i in range(60):
        name = "CH3Cl" if i == 37 else ("H2O" if i % 2 else "CH4")
        m = molecule(name)
        recs.append(
            {
                "numbers": m.numbers,
                "positions": m.positions + 0.01 * i,
                "labels": {"A": {"energy": -float(i)}},
                "key": f"m{i}",
            }
        )
    ds = FidelityDataset.from_records(recs, source="t")
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    for seed in range(5):
        small = limit_pairs(pairs, np.array([4.0]), ds, seed)
        assert 37 in small[:, 0]  # the only chlorine molecule is kept even at 4 of 60
        big = limit_pairs(pairs, np.array([10.0]), ds, seed)
        assert set(small[:, 0]) <= set(big[:, 0])  # still nested


def test_split_file_integers_are_qm9_indices_for_qm9_data(tmp_path):
    """On QM9 data an integer is a QM9 index (key qm9:<i>), as in qm9.indices and label tables; read as a row
    position it shifted every split by one without a word."""
    recs, _ = water_methane_si()
    for r, i in zip(recs, (1, 2, 5)):
        r["key"] = f"qm9:{i}"
    ds = FidelityDataset.from_records(recs)
    (tmp_path / "train.txt").write_text("1\n5\n")
    (tmp_path / "test.txt").write_text("qm9:2\n")
    s = split_from_files({"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}, ds)
    assert ds.keys[s.train].tolist() == ["qm9:1", "qm9:5"] and ds.keys[s.test].tolist() == ["qm9:2"]
    (tmp_path / "bad.txt").write_text("0\n")  # no QM9 molecule 0 in the data: an error, not row 0
    with pytest.raises(MultifiError, match=r"bad.txt: QM9 index 0 is not a molecule of the data"):
        split_from_files({"train": str(tmp_path / "bad.txt")}, ds)


def test_indices_files_take_comments_and_say_what_is_wrong(tmp_path, caplog):
    """One QM9 index per line, # comments; an empty file or a non-integer is a one-line error (numpy's warning
    and a row-parse message before)."""
    from multifi.data.sources import _read_indices

    (tmp_path / "i.txt").write_text("# the first molecules\n1\n2  # ethane\n\n7\n")
    assert _read_indices(tmp_path / "i.txt").tolist() == [1, 2, 7]
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(MultifiError, match=r"empty.txt: no indices in the file"):
        _read_indices(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("1\nabc\n")
    with pytest.raises(MultifiError, match=r"bad.txt: 'abc' is not an integer index"):
        _read_indices(tmp_path / "bad.txt")
    (tmp_path / "twice.txt").write_text("1\n2\n1\n")  # dropped silently before
    with caplog.at_level(logging.WARNING, logger="multifi"):
        _read_indices(tmp_path / "twice.txt")
    assert "twice.txt: 1 index(es) listed more than once" in caplog.text
    (tmp_path / "folder").mkdir()
    with pytest.raises(MultifiError, match=r"folder: cannot read \(Is a directory\)"):  # was 'cannot write'
        _read_indices(tmp_path / "folder")


def test_a_hash_inside_a_key_is_part_of_the_key(tmp_path):
    """Only a # at a line's start or after a space starts a comment: keys such as mol#3 stay whole."""
    recs, _ = water_methane_si()
    for r, key in zip(recs, ["mol#1", "mol", "si"]):
        r["key"] = key
    ds = FidelityDataset.from_records(recs)
    (tmp_path / "train.txt").write_text("mol#1 # the water\n#mol\nsi\n")
    assert split_from_files({"train": str(tmp_path / "train.txt")}, ds).train.tolist() == [0, 2]
    from multifi.data.sources import _read_indices

    (tmp_path / "i.txt").write_text("+5\n--5\n")
    with pytest.raises(MultifiError, match=r"'--5' is not an integer index"):
        _read_indices(tmp_path / "i.txt")


def test_a_merged_structure_is_named_by_its_own_file_and_number():
    """Errors about a structure of merged sources name the file it came from and its number there (not its
    position in the merged data); subsets keep that."""
    mols = [rattled_molecule("H2O", s) for s in range(5)]
    a = FidelityDataset.from_records(
        [record(m, {"PBE": {"energy": -1.0 - i}}) for i, m in enumerate(mols[:3])], source="a.xyz"
    )
    b = FidelityDataset.from_records(
        [record(m, {"HF": {"energy": -2.0 - i}}) for i, m in enumerate(mols[2:])], source="b.xyz"
    )
    merged = FidelityDataset.merge([a, b])  # mols[2] is in both: one structure, first named by a.xyz
    assert len(merged) == 5
    assert merged.structure_name(4).startswith("structure 2 of b.xyz (0-based")
    assert merged.structure_name(2).startswith("structure 2 of a.xyz (0-based")
    assert merged.subset(np.array([4])).structure_name(0).startswith("structure 2 of b.xyz")
    assert a.structure_name(1).startswith("structure 1 (0-based")
