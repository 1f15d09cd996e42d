"""Neighbour lists from vesin (compiled), shared by training (cached) and the ASE calculator."""

from __future__ import annotations

import sys

import numpy as np
from tqdm.auto import tqdm

from multifi.data.cells import MIN_MEASURE, check_cell, periodic_measure
from multifi.errors import MultifiError


def neighbor_list(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    calculator=None,
    distances: bool = False,
    where: str = "",
):
    """Full neighbour list within `cutoff` Å.

    Returns (i, j, shifts): centres [E], neighbours [E] (int64) and integer cell shifts [E, 3], such
    that the vector from i to j is positions[j] - positions[i] + shifts @ cell; with `distances`, also
    the distances [E] Å. `calculator`: a vesin.NeighborList to reuse across calls. `where` names the
    structure in the error for a periodic cell without volume (check_cell).
    """
    from vesin import NeighborList

    positions = np.ascontiguousarray(positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        atom = int(np.flatnonzero(~np.isfinite(positions).all(1))[0])
        raise MultifiError(f"{where + ': ' if where else ''}atom {atom} (0-based) has a non-finite (NaN/inf) position")
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    periodic = bool(pbc.any())
    span = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
    if span > MAX_SPAN:  # vesin's cell list divides by zero (the process dies, SIGFPE) from about 1e8 Å
        raise MultifiError(
            f"{where + ': ' if where else ''}atoms {span:.3g} Å apart: no structure spans that (positions in another "
            "unit, or an atom misplaced?)"
        )
    if periodic:
        if not np.isfinite(np.asarray(cell, dtype=np.float64)).all():
            raise MultifiError(f"{where + ': ' if where else ''}the cell has non-finite (NaN/inf) entries")
        check_cell(cell, pbc, where)
        box = np.asarray(cell, dtype=np.float64)
        check_periodic_neighbours(box, pbc, len(positions), cutoff, where)
    else:
        box = np.zeros((3, 3))
    nl = calculator or NeighborList(cutoff=float(cutoff), full_list=True)
    out = nl.compute(
        points=positions,
        box=box,
        periodic=pbc.tolist() if periodic else False,
        quantities="ijSd" if distances else "ijS",
    )
    i, j, s = out[0].astype(np.int64), out[1].astype(np.int64), out[2].astype(np.int64)
    return (i, j, s, out[3]) if distances else (i, j, s)


#: Å: atoms further apart than this are no structure (a unit or a misplaced atom); vesin's cell list crashes the
#: process from about 1e8 Å
MAX_SPAN = 1e6

#: neighbours per atom beyond which a cutoff is a slip (models here use 4-6 Å: tens of neighbours; 12 Å in a
#: dense metal gives ~600); the neighbour list alone would take minutes and gigabytes, or never end
MAX_NEIGHBOURS_PER_ATOM = 3000


def check_periodic_neighbours(cell: np.ndarray, pbc: np.ndarray, n_atoms: int, cutoff: float, where: str = "") -> None:
    """An error when `cutoff` would give more than MAX_NEIGHBOURS_PER_ATOM neighbours per atom in a periodic
    cell: n_atoms × (the cutoff ball's measure in the periodic directions: 2r, πr², 4/3πr³) / (the cell's length,
    area or volume in them), counted before the neighbour list is built."""
    dims = int(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).sum())
    ball = {1: 2 * cutoff, 2: np.pi * cutoff**2, 3: 4 / 3 * np.pi * cutoff**3}[dims]
    measure = periodic_measure(cell, pbc)
    expected = n_atoms * ball / measure
    if expected > MAX_NEIGHBOURS_PER_ATOM:
        raise MultifiError(_too_many(where, cutoff, expected, n_atoms, measure, dims))


#: Å: cutoffs up to this are usual for these models; a neighbour count beyond MAX_NEIGHBOURS_PER_ATOM with one
#: is the cell's doing (a vector near zero, cell and positions in different units), not the cutoff's
USUAL_CUTOFF = 8.0


def _too_many(where: str, cutoff: float, expected: float, n_atoms: int, measure: float, dims: int) -> str:
    """The error for `expected` neighbours per atom: blames the cell when the cutoff is usual, else the cutoff.
    measure: the cell's length, area or volume along its `dims` periodic directions (Å, Å², Å³)."""
    how = "about" if dims == 3 else "up to"  # 3-D: the density times the ball; slab, wire: the cross-section's atoms
    head = (
        f"{where + ': ' if where else ''}a cutoff of {cutoff:g} Å gives {how} {expected:,.0f} neighbours per atom "
        f"in this periodic cell ({n_atoms} atoms; more than {MAX_NEIGHBOURS_PER_ATOM})"
    )
    if cutoff > USUAL_CUTOFF:
        return head + "; is model.cutoff a slip (these models use 4-6 Å)?"
    what, unit = {1: ("length", "Å"), 2: ("area", "Å²"), 3: ("volume", "Å³")}[dims]
    return (
        f"{head}: its periodic {what} is {measure:.3g} {unit}, {measure / n_atoms:.3g} {unit} per atom (solids: "
        f"{ {1: '1-4', 2: '3-15', 3: '5-50'}[dims] }); is a cell vector near zero, or are the cell and the "
        "positions in different units?"
    )


def check_cutoff(dataset, cutoff: float) -> None:
    """check_periodic_neighbours for every periodic structure of `dataset` (vectorised for fully periodic ones),
    before any neighbour list is built; the error names the source and the structure."""
    full = dataset.pbc.all(1)
    volume = np.abs(np.linalg.det(dataset.cells[full]))
    expected = np.where(
        volume > 1e-6, dataset.n_atoms[full] * (4 / 3 * np.pi * cutoff**3) / np.maximum(volume, 1e-6), 0
    )
    partial = np.flatnonzero(dataset.pbc.any(1) & ~full)
    bad = np.flatnonzero(full)[expected > MAX_NEIGHBOURS_PER_ATOM]
    name = lambda s: f"{dataset.source or 'data'}: {dataset.structure_name(s)}"  # noqa: E731
    if len(bad):
        s = int(bad[0])
        raise MultifiError(
            _too_many(
                name(s),
                cutoff,
                float(expected[np.flatnonzero(full) == s][0]),
                int(dataset.n_atoms[s]),
                float(volume[np.flatnonzero(full) == s][0]),
                3,
            )
        )
    for s in partial.tolist():
        if periodic_measure(dataset.cells[s], dataset.pbc[s]) > MIN_MEASURE:  # else check_cell's error, later
            check_periodic_neighbours(dataset.cells[s], dataset.pbc[s], int(dataset.n_atoms[s]), cutoff, name(s))


class NeighborCache:
    """Neighbour lists of every structure in a dataset, computed once (positions are fixed data).

    Stored as one edge table in CSR form: edges of structure s are edge_offsets[s]:edge_offsets[s+1],
    with local atom indices (0..n_atoms-1 inside the structure). `min_distance` [S] Å is the shortest
    interatomic distance of each structure within the cutoff (inf for isolated atoms).
    """

    def __init__(self, dataset, cutoff: float, progress: bool = True):
        from vesin import NeighborList

        self.cutoff = float(cutoff)
        S = len(dataset)
        counts = np.zeros(S, np.int64)
        self.min_distance = np.full(S, np.inf)
        positions = np.asarray(dataset.positions).view(np.ndarray)  # no per-slice memmap overhead
        cells, pbc, offsets = np.asarray(dataset.cells).view(np.ndarray), np.asarray(dataset.pbc), dataset.offsets
        nl = NeighborList(cutoff=self.cutoff, full_list=True)
        ii, jj, ss = [], [], []
        it = range(S)
        if progress and S > 2000 and sys.stderr.isatty():  # logs (CI, nohup, SLURM) get no bar
            it = tqdm(it, desc=f"neighbour lists ({cutoff:g} Å)", unit="struct", leave=False)
        for s in it:
            try:
                i, j, sh, d = neighbor_list(positions[offsets[s] : offsets[s + 1]], cells[s], pbc[s], cutoff, nl, True)
            except MultifiError as exc:  # name the structure only when needed (no string per structure)
                raise MultifiError(f"{dataset.source or 'data'}: {dataset.structure_name(s)}: {exc}") from None
            counts[s] = len(i)
            if len(d):
                self.min_distance[s] = d.min()
            ii.append(i.astype(np.int32))
            jj.append(j.astype(np.int32))
            ss.append(sh.astype(np.int32))
        self.edge_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.centers = np.concatenate(ii) if ii else np.zeros(0, np.int32)
        self.neighbors = np.concatenate(jj) if jj else np.zeros(0, np.int32)
        self.shifts = np.concatenate(ss) if ss else np.zeros((0, 3), np.int32)

    @property
    def n_edges(self) -> np.ndarray:
        return np.diff(self.edge_offsets)

    def edges(self, structures: np.ndarray):
        """Edges of the given structures: local centres, local neighbours, shifts [E,3], counts per structure."""
        from multifi.data.dataset import ranges

        n_edges = self.n_edges[structures]
        idx = ranges(self.edge_offsets[structures], n_edges)
        return self.centers[idx], self.neighbors[idx], self.shifts[idx], n_edges


class OnTheFlyNeighbors:
    """Neighbour lists computed per batch (in DataLoader workers), for datasets too large to cache.

    Also rejects atoms closer than `min_distance` Å, which the cached path checks once up front.
    """

    def __init__(self, dataset, cutoff: float, min_distance: float = 0.1):
        self.dataset, self.cutoff, self.min_distance = dataset, float(cutoff), min_distance

    def edges(self, structures: np.ndarray):
        ds = self.dataset
        ii, jj, ss, counts = [], [], [], np.zeros(len(structures), np.int64)
        for n, s in enumerate(np.asarray(structures).tolist()):
            sl = ds.atoms_slice(s)
            pos = np.asarray(ds.positions[sl])
            try:
                i, j, sh = neighbor_list(pos, ds.cells[s], ds.pbc[s], self.cutoff)
            except MultifiError as exc:
                raise MultifiError(f"{ds.source or 'data'}: {ds.structure_name(s)}: {exc}") from None
            if len(i):
                d = np.linalg.norm(pos[j] - pos[i] + sh @ ds.cells[s], axis=1)
                if d.min() < self.min_distance:
                    raise MultifiError(
                        f"{ds.source or 'data'}: {ds.structure_name(s)} has atoms {d.min():.3f} Å apart "
                        f"(< {self.min_distance} Å)"
                    )
            ii.append(i), jj.append(j), ss.append(sh)
            counts[n] = len(i)
        cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.int64)  # noqa: E731
        return cat(ii, 0), cat(jj, 0), cat(ss, (0, 3)), counts


def estimate_edges(dataset, cutoff: float, sample: int = 200, seed: int = 0) -> float:
    """Expected total number of directed edges, from the neighbour lists of a random sample of structures."""
    S = len(dataset)
    if S == 0:
        return 0.0
    pick = np.random.default_rng(seed).choice(S, min(sample, S), replace=False)
    edges = 0
    for s in pick.tolist():
        where = f"{dataset.source or 'data'}: {dataset.structure_name(s)}"
        edges += len(
            neighbor_list(
                dataset.positions[dataset.atoms_slice(s)], dataset.cells[s], dataset.pbc[s], cutoff, where=where
            )[0]
        )
    atoms = dataset.n_atoms[pick].sum()
    return float(edges / max(atoms, 1) * dataset.n_atoms.sum())


def make_neighbors(dataset, cutoff: float, mode: str = "auto", budget_bytes: float = 1.5e9, progress: bool = True):
    """Cached neighbour lists when they fit `budget_bytes` (≈ 20 bytes per edge), else on the fly.

    mode: "cache", "on_the_fly" or "auto".
    """
    check_cutoff(dataset, cutoff)
    if mode == "auto":
        mode = "cache" if estimate_edges(dataset, cutoff) * 20 <= budget_bytes else "on_the_fly"
    if mode == "cache":
        return NeighborCache(dataset, cutoff, progress=progress)
    if mode == "on_the_fly":
        return OnTheFlyNeighbors(dataset, cutoff)
    raise MultifiError(f"unknown neighbour list mode {mode!r} (known: auto, cache, on_the_fly)")
