"""Which structures of a set are one geometry within a tolerance: same elements in the same order, same
periodicity, cells and positions within `tol` Å (positions modulo the lattice along periodic directions).

Rounding coordinates to a grid and hashing them splits copies whose coordinates straddle a grid line (copies
printed to 1e-6 Å differ from the originals by up to 5e-7 Å: with 1e-5 Å rounding about one coordinate in ten
lands in another cell), so copies are found by sorting instead: structures are ordered by an exact hash of their
elements and by features that move continuously with the positions (random projections of a few atoms'
positions, through the cosine and sine of their fractional coordinates along periodic directions, so that an atom
wrapped across the cell gives the same ones); only neighbours in that order whose features all differ by less
than copies' can are compared atom by atom. Features of single atoms, not sums over atoms, keep that window as
narrow as the tolerance for any size: frames of an MD run, far closer to each other than distinct molecules, still
differ in them by far more.

MoleculeTable finds copies of molecules up to translation, rotation, reflection and atom order as well (selection,
and an extension's split of its new molecules)."""

from __future__ import annotations

import numpy as np

from multifi.data.cells import MIN_MEASURE, complete_cells

#: Å: copies without keys that merge into one structure (readers, FidelityDataset.merge)
MERGE_TOLERANCE = 1e-5
#: Å: copies that the duplicate checks (repeated geometries, a geometry in two splits) count as one. Kept tight:
#: the search window grows with it, and near-identical crystals (frames rattled by 0.01 Å) then pair with almost
#: every other (2e-3 took minutes and GBs for 10 000 frames); finite-displacement sets (1e-3 Å) stay apart
DUPLICATE_TOLERANCE = 1e-4
#: atoms of each structure whose positions give the sort features (spread over the structure)
N_FEATURES = 4


def first_of_same_geometry(
    numbers, positions, offsets, cells, pbc, tol: float, chunk: int = 1 << 20, shift: bool = False
) -> np.ndarray:
    """[S] int64: for each structure the index of the first structure (lowest index) of the same geometry
    within `tol` Å that is no copy itself, itself when none comes earlier (first_of_pairs: no chains).
    numbers [A], positions [A, 3] Å, offsets [S+1], cells [S, 3, 3] Å, pbc [S, 3]; per-atom arrays are read in
    chunks of `chunk` atoms (memory-mapped datasets). `shift`: also up to a rigid translation (positions
    compared relative to each structure's first atom). A periodic structure whose cell spans no volume once
    completed (check_cell's error elsewhere) matches none."""
    a, b, alias = same_geometry_pairs(numbers, positions, offsets, cells, pbc, tol, chunk, shift)
    return first_of_pairs(len(offsets) - 1, a, b, alias)


def same_geometry_pairs(
    numbers, positions, offsets, cells, pbc, tol: float, chunk: int = 1 << 20, shift: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (a, b) of structures that are one geometry within `tol` Å (as first_of_same_geometry says), and
    alias [P]: b is identical to a in every sort feature (a run of identical structures: each paired with the run's
    first only), so b is whatever a is."""
    offsets = np.asarray(offsets, dtype=np.int64)
    S = len(offsets) - 1
    if S < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    cells = np.asarray(cells, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    inverse, full, usable = _cells(cells, pbc)
    exact = _element_hash(numbers, offsets, pbc, chunk)
    features, reach = _features(positions, offsets, pbc, inverse, full, shift, chunk)
    a, b, alias = _candidate_pairs(exact, features, tol * reach, np.flatnonzero(usable))
    same = _same(a, b, numbers, positions, offsets, cells, pbc, inverse, full, tol, chunk, shift)
    return a[same], b[same], alias[same]


def _cells(cells: np.ndarray, pbc: np.ndarray):
    """inverse [S, 3, 3] and completed cells [S, 3, 3] of periodic structures (zeros for the others), and [S]
    whether a structure can be compared (not periodic, or a completed cell with a volume)."""
    inverse, full = np.zeros_like(cells), np.zeros_like(cells)
    usable = np.ones(len(cells), bool)
    periodic = np.flatnonzero(pbc.any(1))
    if len(periodic):
        done = complete_cells(cells[periodic], pbc[periodic])
        ok = np.abs(np.linalg.det(done)) > MIN_MEASURE
        usable[periodic[~ok]] = False
        full[periodic[ok]] = done[ok]
        inverse[periodic[ok]] = np.linalg.inv(done[ok])
    return inverse, full, usable


def _element_hash(numbers, offsets, pbc, chunk) -> np.ndarray:
    """[S] int64 hash of (atom count, elements in order, periodicity); int64 sums wrap around, on purpose."""
    rng = np.random.default_rng(20261205)
    n = np.diff(offsets)
    weight_of_place = rng.integers(1, 2**61, size=int(n.max()), dtype=np.int64)
    exact = n * np.int64(0x9E3779B97F4A7C1) + (pbc.astype(np.int64) * [3, 5, 7]).sum(1)
    first = offsets[:-1]
    for lo in range(0, int(offsets[-1]), chunk):
        hi = min(lo + chunk, int(offsets[-1]))
        owner = np.searchsorted(offsets, np.arange(lo, hi), "right") - 1
        z = np.asarray(numbers[lo:hi], dtype=np.int64)
        np.add.at(exact, owner, z * weight_of_place[np.arange(lo, hi) - first[owner]])
    return exact


def _features(positions, offsets, pbc, inverse, full, shift: bool = False, chunk: int = 1 << 20):
    """features [S, 1 + N_FEATURES] (Å-like): the sum over all atoms (_sum_feature), then those of
    N_FEATURES atoms spread over each structure; reach [S, 1 + N_FEATURES]: the most a feature moves per Å of
    tolerance on the positions and on the cell's entries.

    A feature is a random projection of its atom's position: Cartesian for a structure without periodicity;
    else in fractional coordinates f of the completed cell, L/2π·(cos 2πf, sin 2πf) along periodic directions
    (L the cell vector's length) and L·f along the others, so a lattice vector added moves nothing. With `shift`,
    of its position relative to the structure's first atom (the others' atoms then: a translation moves nothing)."""
    rng = np.random.default_rng(20261206)
    n = np.diff(offsets)
    S = len(n)
    first = int(shift)  # with shift, atom 0 is the origin: the features come from the others (if any)
    spread = np.maximum(n - first, 1)[:, None]
    place = np.minimum(first + (np.arange(N_FEATURES)[None, :] * spread) // N_FEATURES, n[:, None] - 1)
    atom = offsets[:-1, None] + place  # [S, F] rows of the chosen atoms
    x = np.asarray(positions[atom.ravel()], dtype=np.float64).reshape(S, N_FEATURES, 3)
    if shift:
        x -= np.asarray(positions[offsets[:-1]], dtype=np.float64)[:, None, :]
    w = rng.uniform(-1.0, 1.0, size=(3, N_FEATURES, 3))  # (Cartesian / L·f, cos, sin) × feature × axis
    features = np.einsum("sfa,fa->sf", x, w[0])
    reach = np.full((S, N_FEATURES), np.sqrt(3.0))  # |w| ≤ 1 on three axes
    periodic = np.flatnonzero(pbc.any(1) & (np.abs(full).sum((1, 2)) > 0))
    if len(periodic):
        length = np.linalg.norm(full[periodic], axis=2)  # [P, 3]
        frac = np.einsum("pfi,pij->pfj", x[periodic], inverse[periodic])  # [P, F, 3]
        along = pbc[periodic][:, None, :]
        angle = 2 * np.pi * frac
        scale = length[:, None, :]
        term = np.where(
            along,
            scale / (2 * np.pi) * (w[1] * np.cos(angle) + w[2] * np.sin(angle)),
            scale * frac * w[0],
        )
        features[periodic] = term.sum(2)
        # per axis |Δ feature| ≤ √2·L·|Δf| (and L·|Δf| across), Δf = Δx·inv + x·Δinv with Δinv = −inv·Δcell·inv:
        # |Δf_a| ≤ ‖inv[:, a]‖·tol·(1 + 3‖f‖) (‖Δcell‖ ≤ 3·tol for entries within tol)
        column = np.linalg.norm(inverse[periodic], axis=1)  # [P, 3] ‖inv[:, a]‖
        size = np.linalg.norm(frac, axis=2)  # [P, F]
        reach[periodic] = np.sqrt(2) * (length * column).sum(1)[:, None] * (1 + 3 * size)
    total, total_reach = _sum_feature(positions, offsets, pbc, inverse, full, shift, chunk, w[:, 0])
    features = np.concatenate([total[:, None], features], axis=1)
    reach = np.concatenate([total_reach[:, None], reach], axis=1)
    return features, (2.02 if shift else 1.01) * reach + 1e-9  # relative positions: both atoms move


def _sum_feature(positions, offsets, pbc, inverse, full, shift, chunk, w) -> tuple[np.ndarray, np.ndarray]:
    """[S] the feature of every atom (as _features: w [3 kinds, 3 axes]) summed over each structure, and [S] its
    reach: structures that differ only in atoms the single-atom features skip (adsorbates on one slab) differ here."""
    n = np.diff(offsets)
    S = len(n)
    total, reach = np.zeros(S), np.zeros(S)
    length = np.linalg.norm(full, axis=2)  # [S, 3]
    column = np.linalg.norm(inverse, axis=1)  # [S, 3]
    periodic = pbc.any(1) & (np.abs(full).sum((1, 2)) > 0)
    first = np.asarray(positions[offsets[:-1]], dtype=np.float64)
    for lo in range(0, int(offsets[-1]), chunk):
        hi = min(lo + chunk, int(offsets[-1]))
        owner = np.searchsorted(offsets, np.arange(lo, hi), "right") - 1
        x = np.asarray(positions[lo:hi], dtype=np.float64)
        if shift:
            x = x - first[owner]
        term = x @ w[0]
        atom_reach = np.full(len(x), np.sqrt(3.0))
        wrapped = np.flatnonzero(periodic[owner])
        if len(wrapped):
            o = owner[wrapped]
            frac = np.einsum("ai,aij->aj", x[wrapped], inverse[o])
            angle = 2 * np.pi * frac
            along = pbc[o]
            scale = length[o]
            term[wrapped] = np.where(
                along, scale / (2 * np.pi) * (w[1] * np.cos(angle) + w[2] * np.sin(angle)), scale * frac * w[0]
            ).sum(1)
            size = np.linalg.norm(frac, axis=1)
            atom_reach[wrapped] = np.sqrt(2) * (length[o] * column[o]).sum(1) * (1 + 3 * size)
        total += np.bincount(owner, weights=term, minlength=S)
        reach += np.bincount(owner, weights=atom_reach, minlength=S)
    return total, reach


def _candidate_pairs(exact: np.ndarray, features: np.ndarray, window: np.ndarray, usable: np.ndarray):
    """Pairs (a, b) among the `usable` structures, of equal exact hash and every feature within the larger of their
    windows. Structures with equal hash and features (the sum over all atoms included: structures differing only
    in atoms the single-atom features skip differ there) are paired with the first of them only (a thousand copies:
    a thousand pairs, not half a million; `alias` [P] marks those pairs); the others are looked for along the order
    of the first single-atom feature, whose window is of the tolerance's scale. Returns (a, b, alias)."""
    drive = 1 if features.shape[1] > 1 else 0  # a single atom's feature: its window is the tolerance's scale
    keys = features[usable][:, [*range(drive, features.shape[1]), *range(drive)]]  # driving feature first
    order = usable[np.lexsort((*keys.T[::-1], exact[usable]))]
    e, f = exact[order], features[order]
    repeat = np.zeros(len(order), bool)
    repeat[1:] = (e[1:] == e[:-1]) & (f[1:] == f[:-1]).all(1)
    head = np.maximum.accumulate(np.where(~repeat, np.arange(len(order)), 0))  # the first of each run of repeats
    pairs_a, pairs_b = [order[head[repeat]]], [order[repeat]]
    n_alias = int(repeat.sum())
    order = order[~repeat]
    e, f, win = exact[order], features[order], window[order]  # [*, C]: each feature its own window
    i = np.arange(len(order) - 1)  # structures that may still have a partner d places on
    d = 0
    while len(i):
        d += 1
        i = i[i + d < len(order)]
        j = i + d
        near = (e[j] == e[i]) & (f[j, drive] - f[i, drive] <= win[i, drive])
        i, j = i[near], j[near]  # sorted by the first feature within a hash: the others have no partner further on
        keep = (np.abs(f[j] - f[i]) <= np.maximum(win[i], win[j])).all(1)
        pairs_a.append(order[i[keep]])
        pairs_b.append(order[j[keep]])
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    alias = np.zeros(len(a), bool)
    alias[:n_alias] = True
    return a, b, alias


def _same(a, b, numbers, positions, offsets, cells, pbc, inverse, full, tol, chunk, shift=False) -> np.ndarray:
    """[P] whether the structures a[p] and b[p] (equal atom counts by their hash) are one geometry within tol
    (with `shift`, once b is translated to put its first atom on a's)."""
    n = np.diff(offsets)
    same = (n[a] == n[b]) & (pbc[a] == pbc[b]).all(1) & (np.abs(cells[a] - cells[b]).max((1, 2)) <= tol)
    ends = np.cumsum(n[a])
    start = 0
    while start < len(a):  # pairs in groups of about `chunk` atoms
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + chunk, "right")))
        p = np.arange(start, min(stop, len(a)))
        p = p[same[p]]
        if len(p):
            count = n[a[p]]
            pair = np.repeat(np.arange(len(p)), count)
            local = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            ia, ib = offsets[a[p]][pair] + local, offsets[b[p]][pair] + local
            z_ok = np.asarray(numbers[ia]) == np.asarray(numbers[ib])
            d = np.asarray(positions[ib], dtype=np.float64) - np.asarray(positions[ia], dtype=np.float64)
            if shift:
                d -= d[np.cumsum(count) - count][pair]  # relative to the pair's first atoms
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


def first_of_pairs(S: int, a: np.ndarray, b: np.ndarray, alias: np.ndarray | None = None) -> np.ndarray:
    """[S]: each structure's copy of, from pairs (a, b) of structures found alike: in index order, a structure
    alike an earlier one that is no copy itself is a copy of the first such; else it is its own. No chains: a
    run of near-copies each within the tolerance of the next (frames 3e-5 Å apart) does not become one structure,
    every structure is within the tolerance of the one it is a copy of. `alias` pairs (identical structures: b the
    same as a) give b a's first."""
    first = np.arange(S, dtype=np.int64)
    if not len(a):
        return first
    alias = np.zeros(len(a), bool) if alias is None else np.asarray(alias, bool)
    heads, members = a[alias], b[alias]  # identical to their head: whatever it is, they are
    a, b = a[~alias], b[~alias]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    lo, hi = lo[keep], hi[keep]
    order = np.lexsort((lo, hi))  # by the later structure, then the earlier: its first candidate comes first
    for i, j in zip(lo[order].tolist(), hi[order].tolist()):
        if first[j] == j and first[i] == i:  # j not yet a copy, i no copy itself (final: all i's pairs came earlier)
            first[j] = i
    first[members] = first[heads]
    return first


class MoleculeTable:
    """The molecules of a dataset, to find copies of up to translation, rotation, reflection and atom order: the
    same elements, distances to the centroid (sorted by element and distance) within `tol` Å, then the
    interatomic distances of each pair of elements (sorted) within `tol` (conformers that turn about an axis keep
    their centroid distances; orderings of the same elements on one template keep the distances without elements).
    Indexed once by composition and radius of gyration: a query looks at the molecules within `tol` of its radius."""

    def __init__(self, ds, tol: float, cache: bool = False):
        self.ds, self.tol, self.cache = ds, tol, cache  # cache: keep matched molecules' distances (queried again)
        rows: dict[bytes, list] = {}
        for s in np.flatnonzero(~np.asarray(ds.pbc).any(1)).tolist():
            key, profile = _centroid_profile(ds, s)
            rows.setdefault(key, []).append((_radius(profile), s, profile))
        self.groups = {}
        for key, group in rows.items():
            group.sort(key=lambda r: r[0])
            profiles = np.stack([r[2] for r in group])
            self.groups[key] = (np.array([r[0] for r in group]), np.array([r[1] for r in group]), profiles)
        self._distances: dict[int, np.ndarray] = {}

    def find(self, other, s: int, allowed: np.ndarray | None = None, below: int | None = None) -> int | None:
        """The lowest id of the table's molecules that structure s of `other` is a copy of, among those with
        allowed[id] (all when None) and id < below (any when None), or None."""
        key, profile = _centroid_profile(other, s)
        if key not in self.groups:
            return None
        rgs, ids, profiles = self.groups[key]
        rg = _radius(profile)
        lo, hi = int(np.searchsorted(rgs, rg - self.tol)), int(np.searchsorted(rgs, rg + self.tol, side="right"))
        near = np.abs(profiles[lo:hi] - profile).max(1) < self.tol
        if allowed is not None:
            near &= allowed[ids[lo:hi]]
        if below is not None:
            near &= ids[lo:hi] < below
        close = np.sort(ids[lo:hi][near]).tolist()
        if not close:
            return None
        mine = _pair_distances(other, s)
        for t in close:
            theirs = self._distances.get(t)
            if theirs is None:
                theirs = _pair_distances(self.ds, t)
                if self.cache:
                    self._distances[t] = theirs
            if np.abs(theirs - mine).max(initial=0.0) < self.tol:
                return t
        return None


def _radius(profile: np.ndarray) -> float:
    return float(np.sqrt(np.mean(profile**2)))


def _pair_distances(ds, s: int) -> np.ndarray:
    """Interatomic distances [N(N-1)/2] Å of structure s, grouped by the pair of elements, sorted within each."""
    sl = ds.atoms_slice(s)
    pos = np.asarray(ds.positions[sl], dtype=np.float64)
    z = np.asarray(ds.numbers[sl], dtype=np.int64)
    i, j = np.triu_indices(len(pos), 1)
    d = np.linalg.norm(pos[i] - pos[j], axis=1)
    pair = np.minimum(z[i], z[j]) * 256 + np.maximum(z[i], z[j])
    return d[np.lexsort((d, pair))]


def _centroid_profile(ds, s: int) -> tuple[bytes, np.ndarray]:
    """(sorted atomic numbers as bytes, [N] distances Å of the atoms to their centroid, sorted by element, then
    distance) of structure s: invariant to translation, rotation and atom order."""
    sl = ds.atoms_slice(s)
    z, pos = np.asarray(ds.numbers[sl]), np.asarray(ds.positions[sl], dtype=np.float64)
    r = np.linalg.norm(pos - pos.mean(0), axis=1)
    order = np.lexsort((r, z))
    return z[order].astype(np.int64).tobytes(), r[order]


def same_molecules(pool, known, tol: float) -> np.ndarray:
    """[len(pool)] bool: the non-periodic structures of `pool` that are a structure of `known` (FidelityDatasets)
    up to translation, rotation, reflection and atom order, sorted distances within `tol` Å (MoleculeTable).
    Periodic structures: False."""
    table = MoleculeTable(known, tol)
    out = np.zeros(len(pool), bool)
    for s in np.flatnonzero(~pool.pbc.any(1)).tolist():
        out[s] = table.find(pool, s) is not None
    return out
