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
    if not len(single):
        return out
    pbc = dataset.pbc[single]
    n = np.array([v for v in np.ndindex(3, 3, 3) if v != (1, 1, 1)], dtype=np.float64) - 1  # [26, 3]
    shifts = np.einsum("sta,sab->stb", n[None] * pbc[:, None, :], dataset.cells[single])  # [s, 26, 3] Å
    length = np.linalg.norm(shifts, axis=-1)
    nearest = np.where(length > 0, length, np.inf).min(1)  # inf: no periodic direction
    out[single] = nearest >= ISOLATED_IMAGE_DISTANCE
    return out
