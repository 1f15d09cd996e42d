"""Large data: memory-mapped directory datasets, neighbour lists built per batch, MultiXC-style wide tables."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule

from multifi.data.batch import GraphCollator
from multifi.data.dataset import FidelityDataset
from multifi.data.neighbors import NeighborCache, OnTheFlyNeighbors, make_neighbors
from multifi.errors import MultifiError


def _mixed(n=12, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        a = bulk("Si", "diamond", 5.43) * (1, 1, 2) if i % 2 else molecule("C2H6")
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        lab = {"PBE": {"energy": -5.0 * len(a) + rng.normal(), "forces": rng.normal(size=(len(a), 3))}}
        if i % 3 == 0:
            lab["R2SCAN"] = {"energy": -7.0 * len(a)}
        recs.append(
            {
                "numbers": a.numbers,
                "positions": a.positions,
                "cell": a.cell.array if a.pbc.any() else None,
                "pbc": a.pbc,
                "labels": lab,
                "key": f"s{i}",
            }
        )
    return FidelityDataset.from_records(recs, source="mixed")


def test_directory_dataset_is_memory_mapped_and_round_trips(tmp_path):
    ds = _mixed()
    ds.save(tmp_path / "data")
    back = FidelityDataset.load(tmp_path / "data")
    assert isinstance(back.positions, np.memmap) and isinstance(back.forces, np.memmap)
    for name in ("numbers", "positions", "offsets", "cells", "pbc", "energy", "forces", "forces_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), getattr(ds, name))
    assert back.fidelities == ds.fidelities and back.keys.tolist() == ds.keys.tolist()
    ds.save(tmp_path / "data")  # overwriting a dataset directory is allowed (atomically replaced)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MultifiError, match="not a multifi dataset directory; not overwriting"):
        ds.save(tmp_path / "other")


def test_on_the_fly_neighbours_build_the_same_batches_as_the_cache():
    ds = _mixed()
    pairs = np.array([[s, 0] for s in range(len(ds))] + [[0, 1], [3, 1]])
    a = GraphCollator(ds, NeighborCache(ds, 4.0, progress=False))(pairs)
    b = GraphCollator(ds, OnTheFlyNeighbors(ds, 4.0))(pairs)
    for name in ("numbers", "positions", "batch", "edge_index", "shifts", "energy", "forces", "fidelity"):
        assert getattr(a, name).shape == getattr(b, name).shape
        assert (getattr(a, name) == getattr(b, name)).all(), name


def test_auto_mode_picks_by_estimated_size():
    ds = _mixed()
    assert isinstance(make_neighbors(ds, 4.0, "auto", progress=False), NeighborCache)
    assert isinstance(make_neighbors(ds, 4.0, "auto", budget_bytes=100), OnTheFlyNeighbors)


def test_on_the_fly_neighbours_reject_overlapping_atoms():
    m = molecule("CH4")
    m.positions[1] = m.positions[0] + [0.02, 0, 0]
    ds = FidelityDataset.from_records(
        [{"numbers": m.numbers, "positions": m.positions, "labels": {"A": {"energy": 1.0}}, "key": "bad"}],
        source="x.extxyz",
    )
    with pytest.raises(MultifiError, match=r"x.extxyz: structure \d+ \(0-based, key bad\) has atoms 0.020 Å apart"):
        GraphCollator(ds, OnTheFlyNeighbors(ds, 4.0))(np.array([[0, 0]]))


def test_wide_table_stores_each_molecule_once(tmp_path):
    from multifi.data.readers import qm9

    try:
        geo = qm9.load_qm9_geometries()
    except MultifiError:
        pytest.skip("qm9pack not installed")
    idx = geo.index[:50]
    K = 228
    rng = np.random.default_rng(0)
    table = rng.normal(-1000, 5, (50, K))
    table[rng.random((50, K)) < 0.3] = np.nan
    names = [f"XC{k}/basis{k % 7}" for k in range(K)]
    lines = ["index," + ",".join(names)]
    for i, row in zip(idx, table):
        lines.append(f"{i}," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in row))
    path = tmp_path / "multixc.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = qm9.read_qm9(labels=path)
    assert len(ds) == 50 and len(ds.fidelities) == K
    assert len(ds.positions) == int(geo.offsets[50] - geo.offsets[0])  # atoms stored once, not once per label
    np.testing.assert_allclose(ds.energy, table, atol=1e-6)
    assert ds.energy_mask.sum() == (~np.isnan(table)).sum()
