"""Plausibility checks on prepared data: overlapping atoms, duplicate geometries across splits,
energies that look like Hartree instead of eV. Errors are one line; doubtful data gives warnings."""
from __future__ import annotations

import logging

import numpy as np

from multifi.data.dataset import FidelityDataset, geometry_key
from multifi.errors import MultifiError

log = logging.getLogger("multifi")

MIN_DISTANCE = 0.1  # Å; closer atoms are a broken structure, not chemistry


def check_overlaps(dataset: FidelityDataset, neighbors) -> None:
    """Error if two atoms of a structure are closer than 0.1 Å (uses the cached neighbour lists)."""
    if neighbors.centers.size == 0:
        return
    struct = np.repeat(np.arange(len(dataset)), neighbors.n_edges)
    base = dataset.offsets[:-1][struct]
    i, j = base + neighbors.centers, base + neighbors.neighbors
    vec = dataset.positions[j] - dataset.positions[i] + np.einsum("ea,eab->eb", neighbors.shifts, dataset.cells[struct])
    d = np.linalg.norm(vec, axis=1)
    bad = np.flatnonzero(d < MIN_DISTANCE)
    if len(bad):
        s = int(struct[bad[0]])
        n_struct = len(np.unique(struct[bad]))
        raise MultifiError(f"{dataset.source or 'data'}: structure {dataset.keys[s]} has atoms {d[bad[0]]:.3f} Å apart "
                           f"(< {MIN_DISTANCE} Å; {n_struct} structure(s) affected)")


def check_split_duplicates(dataset: FidelityDataset, split) -> int:
    """Warn (and return how many) when one geometry occurs in two different splits under different keys."""
    owner: dict[str, str] = {}
    clashes, example = 0, ""
    for name in ("train", "val", "test"):
        for s in split[name].tolist():
            sl = dataset.atoms_slice(s)
            key = geometry_key(dataset.numbers[sl], dataset.positions[sl], dataset.cells[s] if dataset.pbc[s].any() else None)
            if key in owner and owner[key] != name:
                clashes += 1
                example = example or f"{dataset.keys[s]} ({name}) duplicates a {owner[key]} structure"
            owner.setdefault(key, name)
    if clashes:
        log.warning("%s: %d structure(s) appear in two splits under different keys, e.g. %s; "
                    "test errors will be optimistic", dataset.source or "data", clashes, example)
    return clashes


def check_energy_units(dataset: FidelityDataset, pairs: np.ndarray, ref: np.ndarray, scale: np.ndarray) -> list[str]:
    """Warn for fidelities whose energies look like Hartree: a fitted hydrogen reference below 0.7 in
    magnitude (every method gives 1–16 eV; Hartree gives 0.4–0.6) or a per-atom spread of residuals
    below 2 meV (eV data of real structures spreads by ≥ 10 meV/atom). Returns the suspicious names."""
    suspicious = []
    for k, name in enumerate(dataset.fidelities.names):
        s = pairs[pairs[:, 1] == k, 0]
        s = s[~np.isnan(dataset.energy[s, k])]
        if len(s) < 20:
            continue
        has_h = bool((dataset.numbers == 1).any())
        tiny_h = has_h and 0 < abs(ref[1, k]) < 0.7
        tiny_spread = scale[k] < 2e-3
        if tiny_h or tiny_spread:
            suspicious.append(name)
            why = f"hydrogen reference {ref[1, k]:.3f}" if tiny_h else f"per-atom spread {1000 * scale[k]:.2f} meV"
            log.warning("%s: energies at fidelity %r look like Hartree, not eV (%s); multiply by 27.211386 "
                        "if so", dataset.source or "data", name, why)
    return suspicious
