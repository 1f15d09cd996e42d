"""Free atoms among the structures: one-atom structures, not periodic or in a box whose images lie far away (MACE's
E0 frames, DFT's way of computing a free atom)."""

from __future__ import annotations

import numpy as np

#: Å: a one-atom periodic cell whose nearest image lies at least this far is an isolated atom in a box (DFT's way
#: of computing a free atom); one-atom crystals (fcc, bcc primitive cells) have their images at 2-5 Å
ISOLATED_IMAGE_DISTANCE = 6.0


def isolated_atoms(dataset) -> np.ndarray:
    """[S] bool: one-atom structures of `dataset` (FidelityDataset) that are free atoms: not periodic, or periodic with every image at least
    ISOLATED_IMAGE_DISTANCE away (the shortest of the lattice translations n·cell, n ∈ {−1, 0, 1}³ along periodic
    directions)."""
    single = np.flatnonzero(dataset.n_atoms == 1)
    out = np.zeros(len(dataset.n_atoms), bool)
    if len(single):
        out[single] = nearest_image(dataset.pbc[single], dataset.cells[single]) >= ISOLATED_IMAGE_DISTANCE
    return out


def is_free_atom(atoms) -> bool:
    """Whether an ase.Atoms is a free atom in the sense of isolated_atoms."""
    if len(atoms) != 1:
        return False
    pbc = np.asarray(atoms.pbc, bool)[None]
    return bool(nearest_image(pbc, np.asarray(atoms.cell[:], np.float64)[None])[0] >= ISOLATED_IMAGE_DISTANCE)


def nearest_image(pbc: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """[s] Å: the shortest lattice translation n·cell, n ∈ {−1, 0, 1}³ along periodic directions, of each of s cells
    (pbc [s, 3] bool, cells [s, 3, 3] Å); inf without a periodic direction."""
    n = np.array([v for v in np.ndindex(3, 3, 3) if v != (1, 1, 1)], dtype=np.float64) - 1  # [26, 3]
    shifts = np.einsum("sta,sab->stb", n[None] * pbc[:, None, :], cells)  # [s, 26, 3] Å
    length = np.linalg.norm(shifts, axis=-1)
    return np.where(length > 0, length, np.inf).min(1)
