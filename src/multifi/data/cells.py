"""What a cell spans: the length, area or volume of its periodic directions, and whether it has a volume."""

from __future__ import annotations

import numpy as np

from multifi.errors import MultifiError

#: Å, Å², Å³: the length, area or volume below which periodic cell vectors span nothing
MIN_MEASURE = 1e-6


def periodic_measure(cell: np.ndarray, pbc: np.ndarray) -> float:
    """Length, area or volume (Å, Å², Å³) spanned by the cell vectors of the periodic directions (0 without any)."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    lattice = np.asarray(cell, dtype=np.float64)[pbc]
    return float(np.sqrt(abs(np.linalg.det(lattice @ lattice.T)))) if len(lattice) else 0.0


def has_volume(cell: np.ndarray) -> bool:
    """Whether the three cell vectors span a volume (> MIN_MEASURE Å³): what a stress (per volume) needs. A slab
    or wire whose non-periodic cell vectors are zero (ASE's surface builders without vacuum) has none."""
    return abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64)))) > MIN_MEASURE


def check_cell(cell: np.ndarray, pbc: np.ndarray, where: str = "") -> None:
    """A structure periodic in some directions needs cell vectors along them that span a length, area or
    volume (> MIN_MEASURE); the other vectors may be zero (a slab from ase.build.fcc111 without vacuum).
    Otherwise an error naming `where` (file and structure)."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if pbc.any() and periodic_measure(cell, pbc) < MIN_MEASURE:
        prefix = f"{where}: " if where else ""
        what = {1: "length", 2: "area", 3: "volume"}[int(pbc.sum())]
        raise MultifiError(
            f"{prefix}periodic (pbc {''.join('T' if p else 'F' for p in pbc)}) but the cell vectors of its periodic "
            f"directions have zero {what}: give each periodic direction its cell vector, or set pbc False there"
        )


def complete_cells(cells: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """cells [S, 3, 3] (or one [3, 3]) with a volume, for fractional coordinates: a cell with volume as it is; one
    without (a zero or in-plane vector along a non-periodic direction) gets unit vectors orthogonal to its periodic
    vectors (and to each other) in its non-periodic directions. Wrapping along the periodic directions in these
    cells is wrapping in the original lattice; the non-periodic coordinates are then Cartesian ones."""
    cells = np.array(cells, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), cells.shape[:-1])
    flat, flat_pbc = cells.reshape(-1, 3, 3), pbc.reshape(-1, 3)
    for s in np.flatnonzero(np.abs(np.linalg.det(flat)) <= MIN_MEASURE).tolist():
        periodic = flat[s][flat_pbc[s]]
        # rows of vt beyond the periodic vectors' rank span their orthogonal complement
        complement = np.linalg.svd(periodic)[2][len(periodic) :] if len(periodic) else np.eye(3)
        flat[s][~flat_pbc[s]] = complement
    return flat.reshape(cells.shape)


def stress_volume_problem(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray) -> str | None:
    """Why a stress (per volume) of this periodic structure would mean nothing, or None: a cell without volume,
    or one shorter than the structure along a non-periodic direction (a vector of 1e-6 Å or 0.5 Å across a
    4 Å slab: its volume is no vacuum-padded cell's, and the stress scales with its inverse)."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if not has_volume(cell):
        return (
            "this cell has no volume: a zero cell vector, or one in the plane (line) of the periodic ones, along a "
            "non-periodic direction (a slab or wire built without vacuum)"
        )
    if pbc.all():
        return None
    frac = np.asarray(positions, dtype=np.float64) @ np.linalg.inv(np.asarray(cell, dtype=np.float64))
    span = np.ptp(frac[:, ~pbc], axis=0) if len(frac) else np.zeros(int((~pbc).sum()))
    if (span > 1 + 1e-9).any():
        return "this cell is shorter than the structure along a non-periodic direction (its volume is no vacuum)"
    return None
