"""Graph batches: many structures as one disconnected graph; the only place indices are shifted."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from multifi.data.checks import MIN_DISTANCE
from multifi.data.dataset import FidelityDataset, ranges
from multifi.data.neighbors import neighbor_list
from multifi.errors import MultifiError

Tensor = torch.Tensor


@dataclass
class Graph:
    """A batch of B structures with N atoms and E directed edges in total.

    numbers    [N]      long     atomic numbers
    positions  [N, 3]   float    Å
    cell       [B, 3, 3] float   Å (zeros when not periodic)
    batch      [N]      long     structure of each atom, 0..B-1
    n_atoms    [B]      long
    edge_index [2, E]   long     (centre i, neighbour j); r_ij = pos[j] - pos[i] + shifts @ cell
    shifts     [E, 3]   float    integer cell shifts of neighbour j
    fidelity   [B]      long     fidelity index the structure is evaluated (and labelled) at
    energy     [B]      float64  eV (label; NaN-free where energy_mask)
    energy_mask [B]     bool
    forces     [N, 3]   float    eV/Å (label), forces_mask [B] bool
    stress     [B, 3, 3] float   GPa, ASE sign (label), stress_mask [B] bool
    structure  [B]      long     index of the structure in its dataset
    """

    numbers: Tensor
    positions: Tensor
    cell: Tensor
    batch: Tensor
    n_atoms: Tensor
    edge_index: Tensor
    shifts: Tensor
    fidelity: Tensor
    energy: Tensor
    energy_mask: Tensor
    forces: Tensor
    forces_mask: Tensor
    stress: Tensor
    stress_mask: Tensor
    structure: Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device, dtype: torch.dtype | None = None) -> Graph:
        """Move to a device (and cast floating fields except the float64 energy labels)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point() and f.name != "energy":
                t = t.to(dtype)
            out[f.name] = t.to(device, non_blocking=True)
        return Graph(**out)

    def pin_memory(self) -> Graph:
        return Graph(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def volume(self) -> Tensor:
        """[B] cell volumes, Å³."""
        return torch.linalg.det(self.cell).abs()


class GraphCollator:
    """Turns a list of (structure, fidelity) index pairs into a Graph, from cached neighbour lists. Positions are
    taken relative to each structure's first atom (in float64, before the float32 cast): a structure stored far from
    the origin (10⁴ Å: 1e-3 Å apart in float32) keeps the precision of its geometry, as prediction does."""

    def __init__(self, dataset: FidelityDataset, neighbors):
        """neighbors: a NeighborCache or OnTheFlyNeighbors (anything with .edges(structures))."""
        self.ds = dataset
        self.nl = neighbors

    def __call__(self, pairs) -> Graph:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        s, k = pairs[:, 0], pairs[:, 1]
        ds, nl = self.ds, self.nl
        n_atoms = ds.n_atoms[s]
        atom_idx = ranges(ds.offsets[s], n_atoms)
        centers, neighbors, shifts, n_edges = nl.edges(s)
        first_atom = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        edge_shift = np.repeat(first_atom, n_edges)
        edge_index = np.stack([centers + edge_shift, neighbors + edge_shift])
        B, N = len(s), len(atom_idx)
        energy = ds.energy[s, k]
        emask = ~np.isnan(energy)
        if ds.forces is not None:
            forces = ds.forces[atom_idx, np.repeat(k, n_atoms)]
            fmask = ds.forces_mask[s, k]
        else:
            forces, fmask = np.zeros((N, 3), np.float32), np.zeros(B, bool)
        if ds.stress is not None:
            stress, smask = ds.stress[s, k], ds.stress_mask[s, k]
        else:
            stress, smask = np.zeros((B, 3, 3)), np.zeros(B, bool)
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        i64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return Graph(
            numbers=i64(ds.numbers[atom_idx]),
            positions=f32(ds.positions[atom_idx] - np.repeat(ds.positions[ds.offsets[s]], n_atoms, axis=0)),
            cell=f32(ds.cells[s]),
            batch=i64(np.repeat(np.arange(B), n_atoms)),
            n_atoms=i64(n_atoms),
            edge_index=i64(edge_index),
            shifts=f32(shifts),
            fidelity=i64(k),
            energy=torch.from_numpy(np.nan_to_num(energy)),
            energy_mask=torch.from_numpy(emask),
            forces=f32(np.nan_to_num(forces)),
            forces_mask=torch.from_numpy(fmask),
            stress=f32(np.nan_to_num(stress)),
            stress_mask=torch.from_numpy(smask),
            structure=i64(s),
        )


def local_positions(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """[N, 3] Å float64: the positions moved (a translation, and whole lattice vectors along periodic directions)
    so that they lie near the origin: the first atom at 0, the others wrapped into the cell from there. Edge vectors,
    energies, forces and stress are unchanged; a float32 model then sees the same numbers wherever the structure
    sits (positions of 10⁴ Å in float32 keep 1e-3 Å, and an MD run's unwrapped atoms drift that far)."""
    out = np.asarray(positions, dtype=np.float64) - np.asarray(positions[0], dtype=np.float64)
    periodic = np.flatnonzero(pbc)
    if len(periodic) == 0 or not np.isfinite(cell[periodic]).all():  # NaN/inf: LAPACK's lstsq never returned
        return out  # the cell's own error comes later
    with np.errstate(all="ignore"):
        frac = np.linalg.lstsq(cell[periodic].T, out.T, rcond=None)[0].T  # [N, P] along the periodic vectors
        wrapped = out - np.floor(frac) @ cell[periodic]
    return wrapped if np.isfinite(wrapped).all() else out  # a degenerate cell: its own error comes later


def graph_from_atoms(
    atoms_list,
    cutoff: float,
    fidelity: int | list[int] = 0,
    dtype: torch.dtype = torch.float32,
    where: str = "",
    first: int = 0,
) -> Graph:
    """A label-free Graph from ase.Atoms objects (for prediction and the calculator).

    Atoms closer than MIN_DISTANCE Å and structures without atoms are errors naming `where`, structure
    `first + n` (and the atoms), as in training (the model's energy there is NaN, meaningless or a plain 0)."""
    numbers, positions, cells, n_atoms, ei, shifts = [], [], [], [], [], []
    start = 0
    for n, a in enumerate(atoms_list):
        pbc = a.pbc
        cell = a.cell.array if pbc.any() else np.zeros((3, 3))
        prefix = f"{where}: " if where else ""
        if len(a) == 0:  # its energy would be a plain 0.0, as training refuses such structures
            raise MultifiError(f"{prefix}structure {first + n}: no atoms")
        local = local_positions(a.positions, cell, pbc)
        i, j, s, d = neighbor_list(local, cell, pbc, cutoff, distances=True, where=f"{prefix}structure {first + n}")
        if len(d) and d.min() < MIN_DISTANCE:
            e = int(np.argmin(d))
            raise MultifiError(
                f"{prefix}structure {first + n}: atoms {i[e]} and {j[e]} are {d[e]:.3f} Å apart (< {MIN_DISTANCE} Å)"
            )
        ei.append(np.stack([i, j]) + start)
        shifts.append(s)
        numbers.append(a.numbers)
        positions.append(local)
        cells.append(cell)
        n_atoms.append(len(a))
        start += len(a)
    B = len(atoms_list)
    fid = np.broadcast_to(np.asarray(fidelity, dtype=np.int64), (B,))
    n = np.asarray(n_atoms, dtype=np.int64)
    N = int(n.sum())
    t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return Graph(
        numbers=t(np.concatenate(numbers), torch.long),
        positions=t(np.concatenate(positions)),
        cell=t(np.stack(cells)),
        batch=t(np.repeat(np.arange(B), n), torch.long),
        n_atoms=t(n, torch.long),
        edge_index=t(np.concatenate(ei, axis=1), torch.long),
        shifts=t(np.concatenate(shifts)),
        fidelity=t(fid.copy(), torch.long),
        energy=torch.zeros(B, dtype=torch.float64),
        energy_mask=torch.zeros(B, dtype=torch.bool),
        forces=torch.zeros(N, 3, dtype=dtype),
        forces_mask=torch.zeros(B, dtype=torch.bool),
        stress=torch.zeros(B, 3, 3, dtype=dtype),
        stress_mask=torch.zeros(B, dtype=torch.bool),
        structure=torch.arange(B),
    )
