"""Copies of a structure are found within a tolerance, not by grid rounding: coordinates printed to another
precision (straddling a grid line), atoms wrapped across a periodic cell; different structures stay apart."""

from __future__ import annotations

import logging

import ase.io
import numpy as np
from ase.build import bulk
from conftest import emt_labelled, rattled_molecule

from multifi.data.checks import check_repeated_geometries, geometry_fingerprints
from multifi.data.dataset import FidelityDataset
from multifi.data.same_geometry import MERGE_TOLERANCE, first_of_same_geometry
from multifi.data.sources import read_sources


def arrays(structures):
    """numbers, positions, offsets, cells, pbc of a list of ase.Atoms."""
    n = [len(a) for a in structures]
    return (
        np.concatenate([a.numbers for a in structures]),
        np.concatenate([a.positions for a in structures]),
        np.concatenate([[0], np.cumsum(n)]),
        np.stack([a.cell.array for a in structures]),
        np.stack([a.pbc for a in structures]),
    )


def crystal(seed: int):
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    a.rattle(0.05, seed=seed)
    return a


def test_copies_within_the_tolerance_are_one_geometry_and_others_are_not():
    mols = [rattled_molecule("CH4", i) for i in range(30)]
    rounded = [m.copy() for m in mols]
    for m in rounded:
        m.positions = np.round(m.positions, 6)  # straddles a 1e-5 grid line in about one coordinate of ten
    assert any(
        not np.array_equal(np.round(a.positions, 5), np.round(b.positions, 5)) for a, b in zip(mols, rounded)
    )  # the case that grid hashing splits
    moved = mols[0].copy()
    moved.positions[2] += [0, 0, 3 * MERGE_TOLERANCE]  # another geometry at this tolerance
    swapped = mols[1].copy()
    swapped.numbers = swapped.numbers[[1, 0, 2, 3, 4]]  # the same positions, elements in another order
    first = first_of_same_geometry(*arrays(mols + rounded + [moved, swapped]), tol=MERGE_TOLERANCE)
    np.testing.assert_array_equal(first, list(range(30)) * 2 + [60, 61])


def test_periodic_copies_wrapped_across_the_cell_or_with_rounded_cells_are_one_geometry():
    cells = [crystal(i) for i in range(8)]
    copies = [c.copy() for c in cells]
    for c in copies:
        c.positions[0] += c.cell[0]  # written unwrapped, one lattice vector away
        c.positions = np.round(c.positions, 6)
        c.cell = np.round(c.cell.array + 2e-7, 6)
    strained = cells[0].copy()
    strained.set_cell(cells[0].cell.array * 1.001, scale_atoms=True)
    slab = cells[1].copy()
    slab.pbc = [True, True, False]  # another periodicity: another structure
    first = first_of_same_geometry(*arrays(cells + copies + [strained, slab]), tol=1e-5)
    np.testing.assert_array_equal(first, list(range(8)) * 2 + [16, 17])


def test_chunks_do_not_change_the_result():
    mols = [rattled_molecule(n, i) for i, n in enumerate(["H2O", "NH3", "CH4"] * 5)]
    copies = [m.copy() for m in mols[::2]]
    for m in copies:
        m.positions = np.round(m.positions, 6)
    data = arrays(mols + copies)
    whole = first_of_same_geometry(*data, tol=1e-5)
    np.testing.assert_array_equal(first_of_same_geometry(*data, tol=1e-5, chunk=7), whole)
    assert (whole[15:] == np.arange(0, 15, 2)).all()


def test_files_without_keys_merge_copies_printed_to_another_precision(tmp_path, caplog):
    """The same 20 crystals at two fidelities, the second file's coordinates printed to 1e-6 Å and no keys:
    20 structures labelled at both (grid hashing merged 9 and reported 3 of the 11 repeats)."""
    lo = [emt_labelled(crystal(i), "LO") for i in range(20)]
    hi = []
    for a in lo:
        b = a.copy()
        b.positions = np.round(b.positions, 6)
        hi.append(emt_labelled(b, "HI", 1.1))
    ase.io.write(tmp_path / "lo.extxyz", lo)
    ase.io.write(tmp_path / "hi.extxyz", hi)
    with caplog.at_level(logging.INFO, logger="multifi"):
        ds = read_sources([str(tmp_path / "lo.extxyz"), str(tmp_path / "hi.extxyz")])
    assert len(ds) == 20 and ds.energy_mask.all(), ds.label_counts()
    assert "40 frames are 20 structures" in caplog.text  # said, not only counted
    np.testing.assert_allclose(ds.energy[:, 1], 1.1 * ds.energy[:, 0], atol=1e-5)  # EMT at the rounded positions
    assert "repeat the geometry" not in caplog.text


def test_repeats_are_counted_within_the_duplicate_tolerance(caplog):
    """Copies under other keys with coordinates rounded to 1e-5 Å (beyond merging, within the checks' 1e-4)
    are all counted and share one fingerprint."""
    mols = [rattled_molecule("CH4", i) for i in range(12)]
    recs = [{"numbers": m.numbers, "positions": m.positions, "key": f"m{i}"} for i, m in enumerate(mols)]
    copies = [dict(r, key=f"copy{i}", positions=np.round(r["positions"], 5)) for i, r in enumerate(recs)]
    for r in recs + copies:
        r["labels"] = {"x": {"energy": -1.0}}
    ds = FidelityDataset.from_records(recs + copies, source="dups")
    fp = geometry_fingerprints(ds)
    np.testing.assert_array_equal(fp[:12], fp[12:])
    assert len(np.unique(fp)) == 12
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_repeated_geometries(ds) == 12


def test_close_frames_of_a_trajectory_stay_apart_and_their_copies_are_found():
    """Frames of an MD run differ by far less than an atom's spacing from each other (hundreds of them within a
    projection's window): none is taken for another, and copies printed to 1e-6 Å are found, quickly."""
    import time

    rng = np.random.default_rng(1)
    frames, n = 5000, 21
    base = rng.normal(size=(n, 3)) * 1.5
    trajectory = base + 0.1 * np.cumsum(rng.normal(size=(frames, n, 3)) * 0.01, axis=0)
    copies = np.round(trajectory[::250], 6)
    positions = np.concatenate([trajectory, copies]).reshape(-1, 3)
    S = frames + len(copies)
    numbers = np.tile(rng.choice([1, 6, 8], n), S)
    start = time.perf_counter()
    first = first_of_same_geometry(
        numbers, positions, np.arange(S + 1) * n, np.zeros((S, 3, 3)), np.zeros((S, 3), bool), 1e-4
    )
    assert time.perf_counter() - start < 30  # a window over all pairs of frames took minutes and gigabytes
    np.testing.assert_array_equal(first[:frames], np.arange(frames))
    np.testing.assert_array_equal(first[frames:], np.arange(0, frames, 250))


def test_wrapped_copies_of_slabs_and_wires_with_tilted_lattice_vectors_are_found():
    """A lattice vector with a component along a non-periodic axis (a slab's a = (5, 0, 1), a wire along (3, 3, 0)):
    an atom wrapped by it moved the Cartesian coordinate the sort features read there, and the copy was missed."""
    rng = np.random.default_rng(1)
    cases = [
        (np.array([[5.0, 0, 1], [0, 5, 0], [0, 0, 0]]), [True, True, False]),
        (np.array([[3.0, 3, 0], [0, 0, 0], [0, 0, 0]]), [True, False, False]),
        (np.array([[0.0, 0, 0], [5, 0, 0], [0, 5, 0]]), [False, True, True]),
    ]
    for cell, pbc in cases:
        pos = rng.uniform(0, 3, (5, 3))
        moved = pos.copy()
        periodic_vector = cell[int(np.argmax(pbc))]
        moved[2] += periodic_vector  # the same structure, one atom in the next cell
        other = pos.copy()
        other[1, 2] += 0.3
        data = (
            np.tile([1, 6, 8, 1, 1], 3),
            np.concatenate([pos, moved, other]),
            np.arange(4) * 5,
            np.stack([cell] * 3),
            np.array([pbc] * 3),
        )
        np.testing.assert_array_equal(first_of_same_geometry(*data, tol=1e-5), [0, 0, 2], err_msg=str(pbc))


def test_periodic_structures_whose_cell_spans_nothing_match_nothing():
    """Periodic with a zero cell (check_cell's error where it is read): with no inverse every displacement looked
    like zero and different structures matched."""
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 3, (6, 3))
    first = first_of_same_geometry(
        np.ones(6, int), pos, [0, 3, 6], np.zeros((2, 3, 3)), np.ones((2, 3), bool), tol=1e-4
    )
    np.testing.assert_array_equal(first, [0, 1])


def test_many_identical_copies_pair_with_the_first_only():
    """Thousands of identical structures (isolated atoms): one pair per copy, not one per pair of copies."""
    import time

    S = 20000
    numbers = np.where(np.arange(S) % 4 == 0, 1, 6)
    positions = np.zeros((S, 3))
    start = time.perf_counter()
    first = first_of_same_geometry(
        numbers, positions, np.arange(S + 1), np.zeros((S, 3, 3)), np.zeros((S, 3), bool), 1e-4
    )
    assert time.perf_counter() - start < 20
    np.testing.assert_array_equal(first, np.where(numbers == 1, 0, 1))


def test_structures_differing_only_in_atoms_the_single_atom_features_skip_are_compared_with_each_other():
    """Adsorbate frames on one frozen slab (every feature atom identical): the frames were paired only with the
    first of them, so copies of the others were never found; and an exact copy of a copy followed nobody."""
    from ase.build import add_adsorbate, fcc111

    frames, copies = [], []
    for i in range(3):
        slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
        add_adsorbate(slab, "Cu", 2.0, "fcc")
        slab.positions[-1] += [0.3 * i, 0.1 * i, 0.05 * i]
        copy = slab.copy()
        copy.positions[-1] += 2e-6
        frames.append(slab)
        copies.append(copy)
    first = first_of_same_geometry(*arrays(frames + copies), tol=MERGE_TOLERANCE)
    np.testing.assert_array_equal(first, [0, 1, 2, 0, 1, 2])
    crystal_ = crystal(0)
    rounded = crystal_.copy()
    rounded.positions = np.round(rounded.positions, 4)
    first = first_of_same_geometry(*arrays([crystal_, rounded, rounded.copy()]), tol=3e-4)
    np.testing.assert_array_equal(first, [0, 0, 0])  # the exact copy of the copy is a copy of the first too
