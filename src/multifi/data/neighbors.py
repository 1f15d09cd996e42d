"""Neighbour lists from vesin (compiled), shared by training (cached) and the ASE calculator."""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from multifi.errors import MultifiError


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Full neighbour list within `cutoff` Å.

    Returns (i, j, shifts): centres [E], neighbours [E] (int64) and integer cell shifts [E, 3], such
    that the vector from i to j is positions[j] - positions[i] + shifts @ cell.
    """
    from vesin import NeighborList

    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if pbc.any():
        if abs(np.linalg.det(cell)) < 1e-6:
            raise MultifiError("periodic structure with a lattice of zero volume")
        box = np.asarray(cell, dtype=np.float64)
    else:
        box = np.zeros((3, 3))
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s = nl.compute(points=positions, box=box, periodic=pbc.tolist() if pbc.any() else False, quantities="ijS")
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.int64)


class NeighborCache:
    """Neighbour lists of every structure in a dataset, computed once (positions are fixed data).

    Stored as one edge table in CSR form: edges of structure s are edge_offsets[s]:edge_offsets[s+1],
    with local atom indices (0..n_atoms-1 inside the structure).
    """

    def __init__(self, dataset, cutoff: float, progress: bool = True):
        self.cutoff = float(cutoff)
        S = len(dataset)
        counts = np.zeros(S, np.int64)
        ii, jj, ss = [], [], []
        it = range(S)
        if progress and S > 2000:
            it = tqdm(it, desc=f"neighbour lists ({cutoff:g} Å)", unit="struct", leave=False)
        for s in it:
            sl = dataset.atoms_slice(s)
            i, j, sh = neighbor_list(dataset.positions[sl], dataset.cells[s], dataset.pbc[s], cutoff)
            counts[s] = len(i)
            ii.append(i.astype(np.int32))
            jj.append(j.astype(np.int32))
            ss.append(sh.astype(np.int8) if np.abs(sh).max(initial=0) < 127 else sh.astype(np.int32))
        self.edge_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.centers = np.concatenate(ii) if ii else np.zeros(0, np.int32)
        self.neighbors = np.concatenate(jj) if jj else np.zeros(0, np.int32)
        self.shifts = np.concatenate([s.astype(np.int32) for s in ss]) if ss else np.zeros((0, 3), np.int32)

    @property
    def n_edges(self) -> np.ndarray:
        return np.diff(self.edge_offsets)
