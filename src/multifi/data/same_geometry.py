"""Which structures of a set are one geometry within a tolerance: same elements in the same order, same
periodicity, cells and positions within `tol` Å (positions modulo the lattice along periodic directions).

Rounding coordinates to a grid and hashing them splits copies whose coordinates straddle a grid line (copies
printed to 1e-6 Å differ from the originals by up to 5e-7 Å: with 1e-5 Å rounding about one coordinate in ten
lands in another cell), so the copies are found by sorting instead: structures are ordered by an exact hash of
their elements and a continuous projection of their positions, and only neighbours in that order whose
projections differ by less than copies can are compared atom by atom."""

from __future__ import annotations

import numpy as np

from multifi.data.cells import MIN_MEASURE, complete_cells

#: Å: copies without keys that merge into one structure (readers, FidelityDataset.merge)
MERGE_TOLERANCE = 1e-5
#: Å: copies that the duplicate checks (repeated geometries, a geometry in two splits, select) count as one
DUPLICATE_TOLERANCE = 1e-4


def first_of_same_geometry(numbers, positions, offsets, cells, pbc, tol: float, chunk: int = 1 << 20) -> np.ndarray:
    """[S] int64: for each structure the index of the first structure (lowest index) of the same geometry
    within `tol` Å, itself when none comes earlier. numbers [A], positions [A, 3] Å, offsets [S+1], cells
    [S, 3, 3] Å, pbc [S, 3]; per-atom arrays are read in chunks of `chunk` atoms (memory-mapped datasets)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    S = len(offsets) - 1
    if S < 2:
        return np.arange(S, dtype=np.int64)
    cells = np.asarray(cells, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    inverse = _inverse_cells(cells, pbc)
    exact, projections, reach = _sort_keys(numbers, positions, offsets, cells, pbc, inverse, chunk)
    a, b = _candidate_pairs(exact, projections, tol * reach)
    same = _same(a, b, numbers, positions, offsets, cells, pbc, inverse, tol, chunk)
    return _first_of_groups(S, a[same], b[same])


#: random projections of the positions compared before atoms are (frames of an MD run differ in some of them)
N_PROJECTIONS = 4


def _inverse_cells(cells: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """[S, 3, 3] inverses of the completed cells of periodic structures (zeros for the others)."""
    inverse = np.zeros_like(cells)
    periodic = pbc.any(1)
    if periodic.any():
        full = complete_cells(cells[periodic], pbc[periodic])
        ok = np.abs(np.linalg.det(full)) > MIN_MEASURE  # else check_cell's error, elsewhere
        idx = np.flatnonzero(periodic)[ok]
        inverse[idx] = np.linalg.inv(full[ok])
    return inverse


def _sort_keys(numbers, positions, offsets, cells, pbc, inverse, chunk):
    """exact [S] int64: a hash of (atom count, elements in order, periodicity); projections [S, P] float64: sums
    over atoms of random projections of the positions that move continuously with them (cos / sin of the
    fractional coordinates along periodic axes, so an atom wrapped across the cell projects alike) and with the
    cell; reach [S]: how far a projection can move per Å of tolerance (positions and cell entries within tol)."""
    rng = np.random.default_rng(20261205)
    n = np.diff(offsets)
    S = len(n)
    weight_of_place = rng.integers(1, 2**61, size=int(n.max()), dtype=np.int64)
    w = rng.uniform(-1.0, 1.0, size=(3, 3, N_PROJECTIONS))  # (Cartesian, cos, sin) × axis × projection
    exact = n * np.int64(0x9E3779B97F4A7C1) + (pbc.astype(np.int64) * [3, 5, 7]).sum(1)
    projections = cells.reshape(S, 9) @ rng.uniform(-1.0, 1.0, size=(9, N_PROJECTIONS))
    farthest = np.zeros(S)  # largest |x| of an atom of a periodic structure (Å): a cell change moves it most
    first = offsets[:-1]
    with np.errstate(over="ignore"):
        for lo in range(0, int(offsets[-1]), chunk):
            hi = min(lo + chunk, int(offsets[-1]))
            owner = np.searchsorted(offsets, np.arange(lo, hi), "right") - 1
            z = np.asarray(numbers[lo:hi], dtype=np.int64)
            np.add.at(exact, owner, z * weight_of_place[np.arange(lo, hi) - first[owner]])
            pos = np.asarray(positions[lo:hi], dtype=np.float64)
            along = pbc[owner]  # [a, 3]
            term = np.where(along, 0.0, pos) @ w[0]  # [a, P]: Cartesian along non-periodic axes
            wrapped = np.flatnonzero(along.any(1))
            if len(wrapped):
                s = owner[wrapped]
                np.maximum.at(farthest, s, np.linalg.norm(pos[wrapped], axis=1))
                angle = 2 * np.pi * np.einsum("ai,aij->aj", pos[wrapped], inverse[s])
                m = along[wrapped]
                term[wrapped] += np.where(m, np.cos(angle), 0.0) @ w[1] + np.where(m, np.sin(angle), 0.0) @ w[2]
            for k in range(N_PROJECTIONS):
                projections[:, k] += np.bincount(owner, weights=term[:, k], minlength=S)
    # per atom: √3 (Cartesian, weights ≤ 1); along periodic axes √2·2π·|Δf| per axis, Δf from the position
    # (‖inv‖) and from the cell (|x|·‖inv‖²·3); the cell's 9 entries: 9
    inv = np.linalg.norm(inverse.reshape(S, 9), axis=1)
    periodic = 3 * np.sqrt(2) * 2 * np.pi * (inv + 3 * farthest * inv**2)
    reach = 1.01 * (n * (np.sqrt(3) + periodic) + 9) + 1e-9
    return exact, projections, reach


def _candidate_pairs(exact: np.ndarray, projections: np.ndarray, window: np.ndarray):
    """Pairs (a, b) of equal exact hash whose projections all differ by at most the larger of their windows,
    found along the order of the first projection (only neighbours there within the window are looked at)."""
    order = np.lexsort((projections[:, 0], exact))
    e, p, win = exact[order], projections[order], window[order]
    pairs_a, pairs_b = [], []
    for d in range(1, len(order)):
        near = (e[d:] == e[:-d]) & (p[d:, 0] - p[:-d, 0] <= win[:-d])
        if not near.any():  # sorted: no pair further apart is nearer
            break
        i = np.flatnonzero(near)
        j = i + d
        limit = np.maximum(win[i], win[j])[:, None]
        keep = (np.abs(p[j] - p[i]) <= limit).all(1)
        pairs_a.append(order[i[keep]])
        pairs_b.append(order[j[keep]])
    if not pairs_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs_a), np.concatenate(pairs_b)


def _same(a, b, numbers, positions, offsets, cells, pbc, inverse, tol, chunk) -> np.ndarray:
    """[P] whether the structures a[p] and b[p] (equal atom counts by their hash) are one geometry within tol."""
    n = np.diff(offsets)
    same = (n[a] == n[b]) & (pbc[a] == pbc[b]).all(1) & (np.abs(cells[a] - cells[b]).max((1, 2)) <= tol)
    full = np.zeros_like(cells)
    periodic = pbc.any(1)
    if periodic.any():
        full[periodic] = complete_cells(cells[periodic], pbc[periodic])
    start = 0
    while start < len(a):  # pairs in groups of about `chunk` atoms
        stop = start + max(1, int(np.searchsorted(np.cumsum(n[a[start:]]), chunk)))
        p = np.arange(start, min(stop, len(a)))
        p = p[same[p]]
        if len(p):
            count = n[a[p]]
            pair = np.repeat(np.arange(len(p)), count)
            local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            ia, ib = offsets[a[p]][pair] + local, offsets[b[p]][pair] + local
            z_ok = np.asarray(numbers)[ia] == np.asarray(numbers)[ib]
            d = np.asarray(positions)[ib].astype(np.float64) - np.asarray(positions)[ia]
            s = a[p][pair]
            wrap = pbc[s]
            if wrap.any():  # the nearest image along periodic axes
                frac = np.einsum("ai,aij->aj", d, inverse[s])
                frac -= np.round(frac) * wrap
                d = np.where(wrap.any(1, keepdims=True), np.einsum("aj,aji->ai", frac, full[s]), d)
            ok = z_ok & (np.linalg.norm(d, axis=1) <= tol)
            bad = np.bincount(pair[~ok], minlength=len(p)) > 0
            same[p[bad]] = False
        start = stop
    return same


def _first_of_groups(S: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[S] the lowest index of each connected group of the pairs (a, b)."""
    if not len(a):
        return np.arange(S, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(S, S))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, S, dtype=np.int64)
    np.minimum.at(first, label, np.arange(S))
    return first[label]
