"""FidelityDataset: structures in columnar arrays, with energy/forces/stress labels per fidelity.

Layout (S structures, A atoms in total, K fidelities):
  numbers    [A]        uint8    atomic numbers
  positions  [A, 3]     float64  Å
  offsets    [S+1]      int64    atoms of structure s are offsets[s]:offsets[s+1]
  cells      [S, 3, 3]  float64  Å, rows are lattice vectors (zeros when not periodic)
  pbc        [S, 3]     bool
  keys       [S]        str      identity used to merge sources (e.g. "qm9:17", "matpes:mp-1")
  energy     [S, K]     float64  eV total energy, NaN where missing
  forces     [A, K, 3]  float32  eV/Å (None when no fidelity has forces), forces_mask [S, K]
  stress     [S, K, 3, 3] float64 GPa, ASE sign (positive = tensile), stress_mask [S, K]
A structure may carry several fidelities; a (structure, fidelity) pair is one training sample.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from multifi.data.cells import MIN_MEASURE, complete_cells
from multifi.data.fidelity import FidelityTable
from multifi.data.same_geometry import MERGE_TOLERANCE, first_of_same_geometry
from multifi.data.stats import MAX_Z
from multifi.errors import SKIP_INVALID_HINT, MultifiError
from multifi.files import atomic_write, make_dir, new_dir_mode, reported  # noqa: F401 (atomic_write re-exported)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start+count) for each pair, without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.cumsum(counts) - counts
    return np.repeat(starts - seg_start, counts) + np.arange(total, dtype=np.int64)


def geometry_key(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None = None) -> str:
    """A content hash of a structure (positions rounded to 1e-5 Å): the key of a structure read without one.
    Copies whose coordinates round differently still merge (FidelityDataset.merge compares them)."""
    h = hashlib.sha1(np.asarray(numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(positions, dtype=np.float64), 5).tobytes())
    if cell is not None:
        h.update(np.round(np.asarray(cell, dtype=np.float64), 5).tobytes())
    return GEOMETRY_KEY_PREFIX + h.hexdigest()[:20]


#: the start of a key made from the geometry (a structure read without one)
GEOMETRY_KEY_PREFIX = "sha1:"


@dataclass
class FidelityDataset:
    numbers: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    cells: np.ndarray
    pbc: np.ndarray
    keys: np.ndarray
    fidelities: FidelityTable
    energy: np.ndarray
    forces: np.ndarray | None = None
    forces_mask: np.ndarray | None = None
    stress: np.ndarray | None = None
    stress_mask: np.ndarray | None = None
    source: str = field(default="", compare=False)
    #: where each structure of a concatenation of several sources was read: (source names, [S] their index,
    #: [S] the structure's number in it); None for one source (its order is the order read)
    origins: tuple | None = field(default=None, compare=False, repr=False)
    #: {fidelity name: the sources holding its labels} of a merge of several sources (see source_of)
    label_sources: dict | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        """[S] atoms per structure."""
        return np.diff(self.offsets)

    @property
    def energy_mask(self) -> np.ndarray:
        """[S, K] True where an energy label exists."""
        return ~np.isnan(self.energy)

    @property
    def elements(self) -> list[int]:
        return sorted(int(z) for z in np.unique(self.numbers))

    def has_forces(self) -> np.ndarray:
        """[S, K] bool."""
        if self.forces_mask is None:
            return np.zeros(self.energy.shape, dtype=bool)
        return self.forces_mask

    def sum_over_atoms(self, values: np.ndarray, structures: np.ndarray) -> np.ndarray:
        """[len(structures)]: Σ values[a] over the atoms a of each structure (values [A], one per atom of the
        dataset; bool values count)."""
        prefix = np.concatenate([[0], np.cumsum(values)])
        s = np.asarray(structures, dtype=np.int64)
        offsets = np.asarray(self.offsets)
        return prefix[offsets[s + 1]] - prefix[offsets[s]]

    def has_stress(self) -> np.ndarray:
        if self.stress_mask is None:
            return np.zeros(self.energy.shape, dtype=bool)
        return self.stress_mask

    def label_counts(self, pairs: np.ndarray | None = None) -> dict[str, dict[str, int]]:
        """Per fidelity: number of structures with energy, forces and stress labels; among the (structure,
        fidelity) rows of `pairs` [P, 2] when given (e.g. a training split), else in the whole dataset."""
        masks = (self.energy_mask, self.has_forces(), self.has_stress())
        if pairs is None:
            e, f, s = (m.sum(0) for m in masks)
        else:
            pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            K = len(self.fidelities)
            e, f, s = (np.bincount(pairs[:, 1], weights=m[pairs[:, 0], pairs[:, 1]], minlength=K) for m in masks)
        return {
            name: {"energy": int(e[k]), "forces": int(f[k]), "stress": int(s[k])}
            for k, name in enumerate(self.fidelities.names)
        }

    def source_of(self, fidelity: str) -> str:
        """The source(s) holding labels at `fidelity`, for messages about them: of a merge, only those files."""
        return (self.label_sources or {}).get(fidelity) or self.source or "data"

    def structure_name(self, s: int) -> str:
        """Structure s as a user finds it: its number in the order read (of several sources: in its own file,
        named), and its key unless made from the geometry."""
        key = str(self.keys[s])
        number = f"structure {s}"
        if self.origins is not None:
            names, part, index = self.origins
            number = f"structure {int(index[s])} of {names[int(part[s])]}"
        return f"{number} (0-based)" if key.startswith(GEOMETRY_KEY_PREFIX) else f"{number} (0-based, key {key})"

    def atoms_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def to_atoms(self, i: int):
        """Structure i as an ase.Atoms (labels in .info['labels'] per fidelity)."""
        from ase import Atoms

        sl = self.atoms_slice(i)
        periodic = bool(self.pbc[i].any())
        atoms = Atoms(
            numbers=self.numbers[sl].astype(int),
            positions=self.positions[sl],
            cell=self.cells[i] if periodic else None,
            pbc=self.pbc[i],
        )
        atoms.info["key"] = str(self.keys[i])
        return atoms

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, fidelities: FidelityTable | None = None) -> FidelityDataset:
        k = len(fidelities or ())
        return cls(
            numbers=np.zeros(0, np.uint8),
            positions=np.zeros((0, 3)),
            offsets=np.zeros(1, np.int64),
            cells=np.zeros((0, 3, 3)),
            pbc=np.zeros((0, 3), bool),
            keys=np.zeros(0, dtype="U1"),
            fidelities=fidelities or FidelityTable([]),
            energy=np.zeros((0, k)),
        )

    @classmethod
    def from_records(cls, records: list[dict], source: str = "") -> FidelityDataset:
        """Build from per-structure dicts (readers' common currency).

        Each record: numbers [n], positions [n,3] Å, optional cell [3,3] Å and pbc [3],
        optional key, and labels {fidelity: {"energy": eV, "forces": [n,3] eV/Å, "stress": [3,3] GPa}}.
        """
        names: list[str] = []
        for r in records:
            for name in r.get("labels", {}):
                if name not in names:
                    names.append(name)
        table = FidelityTable(names)
        S, K = len(records), len(table)
        counts = np.array([len(r["numbers"]) for r in records], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        A = int(offsets[-1])
        numbers = np.zeros(A, np.int64)
        positions = np.zeros((A, 3))
        cells, pbc = np.zeros((S, 3, 3)), np.zeros((S, 3), bool)
        energy = np.full((S, K), np.nan)
        any_f = any("forces" in lab for r in records for lab in r.get("labels", {}).values())
        any_s = any("stress" in lab for r in records for lab in r.get("labels", {}).values())
        forces = np.zeros((A, K, 3), np.float32) if any_f else None
        fmask = np.zeros((S, K), bool) if any_f else None
        stress = np.zeros((S, K, 3, 3)) if any_s else None
        smask = np.zeros((S, K), bool) if any_s else None
        keys = []
        for i, r in enumerate(records):
            where = f"{source}: structure {r.get('name', i)}"
            sl = slice(offsets[i], offsets[i + 1])
            n = int(counts[i])
            if n == 0:
                raise MultifiError(f"{where}: no atoms")
            pos = np.asarray(r["positions"], dtype=np.float64)
            if pos.shape != (n, 3):
                raise MultifiError(f"{where}: positions have shape {pos.shape}, expected ({n}, 3)")
            if not np.isfinite(pos).all():
                raise MultifiError(f"{where}: non-finite (NaN/inf) atom positions")
            numbers[sl] = np.asarray(r["numbers"], dtype=np.int64)
            positions[sl] = pos
            if r.get("cell") is not None:
                cell = np.asarray(r["cell"], dtype=np.float64)
                if cell.shape != (3, 3):
                    raise MultifiError(f"{where}: cell has shape {cell.shape}, expected (3, 3)")
                if not np.isfinite(cell).all():
                    raise MultifiError(f"{where}: non-finite (NaN/inf) cell")
                cells[i] = cell
            pbc[i] = np.broadcast_to(np.asarray(r.get("pbc", False), dtype=bool), (3,))
            keys.append(r.get("key") or geometry_key(numbers[sl], pos, cells[i] if pbc[i].any() else None))
            for name, lab in r.get("labels", {}).items():
                k = table.index(name)
                if lab.get("energy") is not None:
                    energy[i, k] = float(lab["energy"])
                    if np.isnan(energy[i, k]):  # NaN marks a missing label in the array; a given NaN is invalid
                        raise MultifiError(f"{where}: non-finite (NaN/inf) energy label at fidelity {name!r}")
                if lab.get("forces") is not None:
                    f = np.asarray(lab["forces"], dtype=np.float64)
                    if f.shape != (n, 3):
                        raise MultifiError(f"{where}: forces have shape {f.shape}, expected ({n}, 3)")
                    forces[sl, k] = f
                    fmask[i, k] = True
                if lab.get("stress") is not None:
                    stress[i, k] = voigt_or_matrix(lab["stress"], where)
                    smask[i, k] = True
                    if not pbc[i].any():
                        raise MultifiError(
                            f"{where}: a stress label on a non-periodic structure (pbc all False); "
                            "stress needs a periodic cell"
                        )
        ds = cls(
            numbers=numbers,
            positions=positions,
            offsets=offsets,
            cells=cells,
            pbc=pbc,
            keys=np.array(keys, dtype=str) if keys else np.zeros(0, dtype="U1"),
            fidelities=table,
            energy=energy,
            forces=forces,
            forces_mask=fmask,
            stress=stress,
            stress_mask=smask,
            source=source,
        )
        ds.validate()
        return ds

    # ------------------------------------------------------------------ checks
    def validate(self, skip_invalid: bool = False) -> FidelityDataset:
        """Check shapes, elements and finiteness of labels; raise a one-line error naming the source.

        With skip_invalid, non-finite labels are dropped (set missing) instead and the count kept in
        `self.n_dropped`.
        """
        src = self.source or "dataset"
        S, A, K = len(self), len(self.numbers), len(self.fidelities)
        if self.offsets[-1] != A or self.positions.shape != (A, 3):
            raise MultifiError(
                f"{src}: inconsistent array shapes (offsets end {self.offsets[-1]}, "
                f"{A} numbers, positions {self.positions.shape})"
            )
        if self.energy.shape != (S, K) or self.cells.shape != (S, 3, 3) or self.pbc.shape != (S, 3):
            raise MultifiError(
                f"{src}: inconsistent array shapes (energy {self.energy.shape}, "
                f"cells {self.cells.shape}, pbc {self.pbc.shape} for {S} structures, {K} fidelities)"
            )
        if A and (self.numbers.min() < 1 or self.numbers.max() > MAX_Z):
            bad = self.numbers[(self.numbers < 1) | (self.numbers > MAX_Z)][0]
            s = int(np.searchsorted(self.offsets, np.argmax((self.numbers < 1) | (self.numbers > MAX_Z)), "right") - 1)
            raise MultifiError(f"{src}: structure {s}: unknown element with atomic number {int(bad)}")
        if S and (self.n_atoms == 0).any():
            raise MultifiError(f"{src}: structure {int(np.argmax(self.n_atoms == 0))}: no atoms")
        if self.stress_mask is not None and (self.stress_mask.any(1) & ~self.pbc.any(1)).any():
            s = int(np.argmax(self.stress_mask.any(1) & ~self.pbc.any(1)))
            raise MultifiError(f"{src}: structure {s}: a stress label on a non-periodic structure (pbc all False)")
        if self.stress_mask is not None and self.stress_mask.any():
            flat = np.flatnonzero(self.stress_mask.any(1))
            no_volume = np.abs(np.linalg.det(np.asarray(self.cells[flat], dtype=np.float64))) <= MIN_MEASURE
            if no_volume.any():
                raise MultifiError(
                    f"{src}: structure {int(flat[np.argmax(no_volume)])}: a stress label on a cell without volume (a "
                    "zero or in-plane cell vector along a non-periodic direction): stress is per volume; give that direction the "
                    "length the reference calculation used"
                )
        self.numbers = self.numbers.astype(np.uint8, copy=False)
        if not np.isfinite(self.positions).all():
            s = int(np.searchsorted(self.offsets, np.argwhere(~np.isfinite(self.positions))[0, 0], "right") - 1)
            raise MultifiError(f"{src}: structure {s}: non-finite positions")
        self.n_dropped = 0
        bad_e = np.isinf(self.energy)
        bad_f = np.zeros((S, K), bool)
        if self.forces is not None:
            nonfinite_atoms = ~np.isfinite(self.forces).all(-1)  # [A, K]
            bad_f = np.zeros((S, K), bool)
            if nonfinite_atoms.any():
                per_struct = (
                    np.add.reduceat(nonfinite_atoms.astype(np.int64), self.offsets[:-1], axis=0) if A else bad_f
                )
                per_struct[self.n_atoms == 0] = 0
                bad_f = (per_struct > 0) & self.forces_mask
        bad_s = np.zeros((S, K), bool)
        if self.stress is not None:
            bad_s = ~np.isfinite(self.stress).all((-1, -2)) & self.stress_mask
        n_bad = int(bad_e.sum() + bad_f.sum() + bad_s.sum())
        if n_bad:
            if not skip_invalid:
                s, k = np.argwhere(bad_e | bad_f | bad_s)[0]
                raise MultifiError(
                    f"{src}: {n_bad} non-finite (NaN/inf) labels, first in structure {s} at fidelity "
                    f"{self.fidelities.names[k]!r}; fix the data or {SKIP_INVALID_HINT}"
                )
            self.energy[bad_e] = np.nan
            if self.forces is not None:
                self.forces_mask &= ~bad_f
            if self.stress is not None:
                self.stress_mask &= ~bad_s
            self.n_dropped = n_bad
        return self

    # ------------------------------------------------------------------ transformations
    def subset(self, idx: np.ndarray) -> FidelityDataset:
        """The structures `idx` (in that order) as a new dataset."""
        idx = np.asarray(idx, dtype=np.int64)
        counts = self.n_atoms[idx]
        atom_idx = ranges(self.offsets[idx], counts)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        opt = lambda a, sel: None if a is None else a[sel]  # noqa: E731
        return replace(
            self,
            numbers=self.numbers[atom_idx],
            positions=self.positions[atom_idx],
            offsets=offsets,
            cells=self.cells[idx],
            pbc=self.pbc[idx],
            keys=self.keys[idx],
            energy=self.energy[idx],
            forces=opt(self.forces, atom_idx),
            forces_mask=opt(self.forces_mask, idx),
            stress=opt(self.stress, idx),
            stress_mask=opt(self.stress_mask, idx),
            origins=None if self.origins is None else (self.origins[0], self.origins[1][idx], self.origins[2][idx]),
        )

    def with_fidelities(self, table: FidelityTable) -> FidelityDataset:
        """The same data with label columns laid out as `table` (a superset of our fidelities)."""
        if table == self.fidelities:
            return self
        cols = table.indices(self.fidelities.names)
        S, A, K = len(self), len(self.numbers), len(table)
        energy = np.full((S, K), np.nan)
        energy[:, cols] = self.energy
        out = replace(self, fidelities=table, energy=energy)
        if self.forces is not None:
            out.forces = np.zeros((A, K, 3), np.float32)
            out.forces[:, cols] = self.forces
            out.forces_mask = np.zeros((S, K), bool)
            out.forces_mask[:, cols] = self.forces_mask
        if self.stress is not None:
            out.stress = np.zeros((S, K, 3, 3))
            out.stress[:, cols] = self.stress
            out.stress_mask = np.zeros((S, K), bool)
            out.stress_mask[:, cols] = self.stress_mask
        return out

    def select_fidelities(self, names: list[str], where: str = "") -> FidelityDataset:
        """Only the label columns of `names` (in that order); unknown names are an error."""
        return self._take_fidelities(np.asarray(self.fidelities.indices(names, where), dtype=np.int64))

    def drop_fidelities_without_labels(self) -> FidelityDataset:
        keep = np.flatnonzero(self.energy_mask.any(0) | self.has_forces().any(0) | self.has_stress().any(0))
        if len(keep) == len(self.fidelities):
            return self
        return self._take_fidelities(keep)

    def _take_fidelities(self, keep: np.ndarray) -> FidelityDataset:
        out = replace(
            self, fidelities=FidelityTable([self.fidelities.names[k] for k in keep]), energy=self.energy[:, keep]
        )
        if self.forces is not None:
            out.forces, out.forces_mask = self.forces[:, keep], self.forces_mask[:, keep]
        if self.stress is not None:
            out.stress, out.stress_mask = self.stress[:, keep], self.stress_mask[:, keep]
        return out

    @staticmethod
    def merge(datasets: list[FidelityDataset]) -> FidelityDataset:
        """Concatenate datasets; structures with equal keys become one structure with all labels, and so do
        structures without a key (a geometry hash instead) whose geometries agree within MERGE_TOLERANCE.

        The same (structure, fidelity) label given twice with different values is an error.
        """
        return FidelityDataset.merge_with_index(datasets)[0]

    @staticmethod
    def merge_with_index(datasets: list[FidelityDataset]) -> tuple[FidelityDataset, list[np.ndarray]]:
        """merge, and for each dataset given [S_i] the index of each of its structures in the merged one (a copy
        merged by geometry keeps the first copy's key, so its own key need not be in the merged dataset)."""
        datasets = [d for d in datasets if d is not None]
        if not datasets:
            return FidelityDataset.empty(), []
        table = datasets[0].fidelities
        for d in datasets[1:]:
            table = table.union(d.fidelities)
        parts = [d.with_fidelities(table) for d in datasets]
        cat = _concatenate(parts, table)
        _same_keys_for_copies(cat)
        bounds = np.cumsum([len(d) for d in parts])[:-1]
        uniq, first, inverse = np.unique(cat.keys, return_index=True, return_inverse=True)
        if len(uniq) == len(cat):
            return cat, np.split(np.arange(len(cat), dtype=np.int64), bounds)
        order = np.sort(first)  # keep first-appearance order
        rank_of_unique = np.empty(len(uniq), np.int64)
        rank_of_unique[np.argsort(first)] = np.arange(len(uniq))
        target = rank_of_unique[inverse]  # [S_cat] → merged structure index
        out = cat.subset(order)
        where = _Origins(parts, target)
        if not (out.n_atoms[target] == cat.n_atoms).all():
            bad = int(np.argmax(out.n_atoms[target] != cat.n_atoms))
            raise MultifiError(f"{where.pair(bad)}: same key {str(cat.keys[bad])!r}, different atom counts")
        src_atoms = ranges(cat.offsets[:-1], cat.n_atoms)
        dst_atoms = ranges(out.offsets[target], cat.n_atoms)
        differ = out.numbers[dst_atoms] != cat.numbers[src_atoms]
        if differ.any():
            bad = int(np.repeat(np.arange(len(cat)), cat.n_atoms)[np.argmax(differ)])
            raise MultifiError(f"{where.pair(bad)}: same key {str(cat.keys[bad])!r}, different elements")
        _check_same_geometry(cat, out, target, src_atoms, dst_atoms, where)
        for k, name in enumerate(table.names):
            _fold(out.energy[:, k], cat.energy[:, k], target, ~np.isnan(cat.energy[:, k]), name, cat, where)
            if cat.forces is not None:  # duplicates allowed when they agree, as for energies
                m = cat.forces_mask[:, k]
                am = np.repeat(m, cat.n_atoms)
                src, dst = cat.forces[src_atoms[am], k], dst_atoms[am]
                out.forces[dst, k] = src
                out.forces_mask[target[m], k] = True
                bad = np.abs(out.forces[dst, k] - src).max(-1, initial=0) > 1e-5
                if bad.any():
                    _conflict(
                        cat, np.repeat(np.flatnonzero(m), cat.n_atoms[m])[np.argmax(bad)], name, "forces", where, m
                    )
            if cat.stress is not None:
                m = cat.stress_mask[:, k]
                out.stress[target[m], k] = cat.stress[m, k]
                out.stress_mask[target[m], k] = True
                bad = np.abs(out.stress[target[m], k] - cat.stress[m, k]).max((-1, -2), initial=0) > 1e-6
                if bad.any():
                    _conflict(cat, np.flatnonzero(m)[np.argmax(bad)], name, "stress", where, m)
        return out, np.split(target.astype(np.int64), bounds)

    # ------------------------------------------------------------------ persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(
            numbers=self.numbers,
            positions=self.positions,
            offsets=self.offsets,
            cells=self.cells,
            pbc=self.pbc,
            keys=self.keys,
            energy=self.energy,
            fidelities=np.array(self.fidelities.names, dtype=str),
        )
        for name in ("forces", "forces_mask", "stress", "stress_mask"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: `*.npz` → one file; any other path → a directory of .npy arrays that
        `load` memory-maps (for datasets larger than memory; workers share the pages)."""
        path = Path(path)
        if path.suffix == ".npz":
            atomic_write(path, lambda f: np.savez(f, **self._arrays()))
            return path
        if path.exists() and not (path / "multifi_dataset.json").exists():
            raise MultifiError(f"{path}: exists and is not a multifi dataset directory; not overwriting it")
        make_dir(path.parent)
        with reported(path):
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            with reported(path):
                for name, a in self._arrays().items():
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
                (tmp / "multifi_dataset.json").write_text('{"format": 1}\n')
                new_dir_mode(tmp)
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> FidelityDataset:
        """Read a dataset saved by `save`; a directory dataset is memory-mapped read-only unless mmap=False."""
        path = Path(path)
        if not path.exists():
            raise MultifiError(f"{path}: no such file")
        try:
            if path.is_dir():
                if not (path / "multifi_dataset.json").exists():
                    raise MultifiError(f"{path}: not a multifi dataset directory (no multifi_dataset.json)")
                files = {f.stem: f for f in path.glob("*.npy")}
                get = lambda k: np.load(files[k], mmap_mode="r" if mmap else None) if k in files else None  # noqa: E731
                names = files.keys()
            else:
                z = np.load(path, allow_pickle=False)
                get = lambda k: z[k] if k in z.files else None  # noqa: E731
                names = z.files
            missing = {"numbers", "positions", "offsets", "cells", "pbc", "keys", "energy", "fidelities"} - set(names)
            if missing:
                raise MultifiError(f"{path}: not a multifi dataset (missing {', '.join(sorted(missing))})")
            return cls(
                numbers=get("numbers"),
                positions=get("positions"),
                offsets=np.asarray(get("offsets")),
                cells=get("cells"),
                pbc=np.asarray(get("pbc")),
                keys=get("keys"),
                energy=get("energy"),
                fidelities=FidelityTable(np.asarray(get("fidelities")).tolist()),
                forces=get("forces"),
                forces_mask=get("forces_mask"),
                stress=get("stress"),
                stress_mask=get("stress_mask"),
                source=str(path),
            )
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # also a cut file
            if "allow_pickle" in str(exc):  # numpy's reading of a text file: its pickle advice does not apply
                raise MultifiError(f"{path}: not a multifi dataset file (not an .npz archive)") from None
            first = (str(exc).splitlines() or [""])[0]
            raise MultifiError(f"{path}: not a multifi dataset file ({type(exc).__name__}: {first})") from None


#: a 3×3 stress (or virial) in a file's own units whose xy and yx (and so on) differ by more than this times
#: (1 + its largest |component|) is not a stress: rounding of written numbers stays far below (float32: ~1e-7 of
#: the largest); MatPES records: readers/matpes.STRESS_ASYMMETRY
STRESS_ASYMMETRY = 1e-5


def symmetric_stress(s: np.ndarray, where: str) -> np.ndarray:
    """A 3×3 stress (or virial) in a file's own units, symmetrised ((s + sᵀ)/2: the rounding of written numbers);
    one asymmetric beyond STRESS_ASYMMETRY is a one-line error naming `where`."""
    finite = np.isfinite(s) & np.isfinite(s.T)  # a NaN or inf component: the label checks name it (--skip-invalid)
    gap = np.where(finite, np.abs(s - s.T), 0.0)
    bad = gap > STRESS_ASYMMETRY * (1 + np.abs(s[np.isfinite(s)]).max(initial=0.0))
    if bad.any():
        i, j = np.unravel_index(np.argmax(np.where(bad, gap, -1.0)), (3, 3))
        raise MultifiError(
            f"{where}: stress is not symmetric ({'xyz'[i]}{'xyz'[j]} {s[i, j]:g} against {'xyz'[j]}{'xyz'[i]} "
            f"{s[j, i]:g}): a stress tensor is"
        )
    return 0.5 * (s + s.T)


def voigt_or_matrix(stress, where: str = "") -> np.ndarray:
    """A 3×3 stress from a 3×3 matrix, its 9 values row by row (extxyz `REF_stress="…"`, as MACE writes them) or a
    6-vector Voigt (xx yy zz yz xz xy, ASE order)."""
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (9,):
        s = s.reshape(3, 3)
    if s.shape == (3, 3):
        return s
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise MultifiError(f"{where}: stress has shape {s.shape}, expected (3, 3), (9,) or (6,)")


def _concatenate(parts: list[FidelityDataset], table: FidelityTable) -> FidelityDataset:
    counts = np.concatenate([p.n_atoms for p in parts])
    any_f = any(p.forces is not None for p in parts)
    any_s = any(p.stress is not None for p in parts)
    K = len(table)

    def cat_opt(name, shape_fn, dtype):
        if not (any_f if name.startswith("forces") else any_s):
            return None
        return np.concatenate(
            [getattr(p, name) if getattr(p, name) is not None else np.zeros(shape_fn(p), dtype) for p in parts]
        )

    return FidelityDataset(
        numbers=np.concatenate([p.numbers for p in parts]).astype(np.uint8),
        positions=np.concatenate([p.positions for p in parts]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        cells=np.concatenate([p.cells for p in parts]),
        pbc=np.concatenate([p.pbc for p in parts]),
        keys=np.concatenate([p.keys.astype(str) for p in parts]),
        fidelities=table,
        energy=np.concatenate([p.energy for p in parts]),
        forces=cat_opt("forces", lambda p: (len(p.numbers), K, 3), np.float32),
        forces_mask=cat_opt("forces_mask", lambda p: (len(p), K), bool),
        stress=cat_opt("stress", lambda p: (len(p), K, 3, 3), np.float64),
        stress_mask=cat_opt("stress_mask", lambda p: (len(p), K), bool),
        source=" + ".join(p.source for p in parts if p.source),
        origins=_concatenated_origins(parts) if len(parts) > 1 else parts[0].origins,
    )


def _concatenated_origins(parts: list[FidelityDataset]) -> tuple:
    """FidelityDataset.origins of the parts' concatenation (a part that is itself a concatenation keeps its own)."""
    names: list[str] = []
    part_of, index = [], []
    for p in parts:
        own = p.origins or ((p.source or "input",), np.zeros(len(p), np.int64), np.arange(len(p)))
        part_of.append(np.asarray(own[1]) + len(names))
        index.append(np.asarray(own[2]))
        names += list(own[0])
    return tuple(names), np.concatenate(part_of), np.concatenate(index)


class _Origins:
    """Names the input structures of a merge: "<source>: structure i (0-based)" of the part it came from."""

    def __init__(self, parts: list[FidelityDataset], target: np.ndarray):
        self.parts, self.target = parts, target  # target[s]: the merged structure of concatenated structure s
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __call__(self, s: int) -> str:
        p = int(np.searchsorted(self.starts, s, side="right")) - 1
        return f"{self.parts[p].source or 'input'}: structure {s - int(self.starts[p])} (0-based)"

    def pair(self, s: int, among: np.ndarray | None = None) -> str:
        """The input structures merged with s (its key's first ones, s among them); among [rows] bool: only
        those rows (e.g. the ones labelled at the fidelity whose labels conflict), and the last of them, whose
        labels were kept, first after s."""
        same = self.target == self.target[s]
        group = [int(x) for x in np.flatnonzero(same if among is None else same & among)]
        shown = sorted(set(group[:1] + group[-1:] + [s]) if among is not None else set(group[:2] + [s]))
        more = f" (and {len(group) - len(shown)} more)" if len(group) > len(shown) else ""
        return " and ".join(self(x) for x in shown) + more


#: Å: structures merged by key must agree this well (positions modulo the lattice, cell); coordinates printed to
#: 3 decimals move an atom by up to 0.87e-3 Å and, relative to atom 0, by up to 1.7e-3 Å
GEOMETRY_TOLERANCE = 2e-3


def _same_keys_for_copies(cat: FidelityDataset) -> None:
    """Structures read without a key whose geometries agree within MERGE_TOLERANCE (coordinates printed to
    another precision) take the key of the first of them, so that they merge (their hashed keys can differ)."""
    hashed = np.flatnonzero(np.char.startswith(cat.keys.astype(str), GEOMETRY_KEY_PREFIX))
    if len(hashed) < 2:
        return
    sub = cat.subset(hashed)
    first = first_of_same_geometry(sub.numbers, sub.positions, sub.offsets, sub.cells, sub.pbc, MERGE_TOLERANCE)
    if (first != np.arange(len(hashed))).any():
        keys = cat.keys.astype(object)
        keys[hashed] = keys[hashed[first]]
        cat.keys = np.array(keys.tolist(), dtype=str)


def _check_same_geometry(cat, out, target, src_atoms, dst_atoms, where: _Origins) -> None:
    """Structures merged by key must be one geometry: same periodicity, cell and positions up to a rigid shift
    (within GEOMETRY_TOLERANCE, atoms compared modulo the lattice along periodic axes); otherwise labels of one
    geometry would silently move to another. A shifted copy (another code's origin) keeps energies, forces and
    stress, so it merges."""
    same_pbc = (cat.pbc == out.pbc[target]).all(1)
    cell_gap = np.abs(cat.cells - out.cells[target]).max((1, 2))
    bad = np.flatnonzero(~same_pbc | (cell_gap > GEOMETRY_TOLERANCE))
    if len(bad):
        s = int(bad[0])
        what = "periodicity" if not same_pbc[s] else f"cells (by up to {cell_gap[s]:.3g} Å)"
        raise MultifiError(f"{where.pair(s)}: same key {str(cat.keys[s])!r}, different {what}")
    d = cat.positions[src_atoms] - out.positions[dst_atoms]  # [A_cat, 3] Å
    atom_of = np.repeat(np.arange(len(cat)), cat.n_atoms)
    # relative to the structure's first atom: a rigid shift leaves every label as it is
    d -= d[cat.offsets[:-1]][atom_of]
    periodic = cat.pbc.any(1)
    if periodic.any():
        cells = complete_cells(cat.cells[periodic], cat.pbc[periodic])  # slabs without vacuum: z stays Cartesian
        inv = np.zeros_like(cat.cells, dtype=np.float64)
        inv[periodic], full = np.linalg.pinv(cells), np.zeros_like(inv)
        full[periodic] = cells
        wrap = periodic[atom_of]
        s_of = atom_of[wrap]
        frac = np.einsum("ai,aij->aj", d[wrap], inv[s_of])
        frac -= np.round(frac) * cat.pbc[s_of]
        d[wrap] = np.einsum("aj,aji->ai", frac, full[s_of])
    gap = np.linalg.norm(d, axis=-1)
    if (gap > GEOMETRY_TOLERANCE).any():
        a = int(np.argmax(gap))
        s = int(atom_of[a])
        raise MultifiError(
            f"{where.pair(s)}: same key {str(cat.keys[s])!r}, different geometries "
            f"(atom {a - int(cat.offsets[s])} (0-based) {gap[a]:.3g} Å apart once shifted to put atom 0 on atom 0); "
            f"more than the {GEOMETRY_TOLERANCE:g} Å that coordinates rounded to 3 decimals stay within: other "
            "structures (give them different keys)"
        )


def _conflict(cat: FidelityDataset, s: int, name: str, what: str, where: _Origins, among: np.ndarray):
    raise MultifiError(
        f"{where.pair(s, among)}: conflicting {what} labels at fidelity {name!r} for structure "
        f"{str(cat.keys[s])!r} (given twice with different values)"
    )


#: eV; labels of one structure and fidelity given twice agree within this (1 meV: tables that round the same
#: energy to 3 or more decimals); further apart they conflict (the last one given is kept)
SAME_ENERGY_EV = 1e-3


def _fold(out_col, col, target, mask, name, cat, where: _Origins):
    t = target[mask]
    u, c = np.unique(t, return_counts=True)
    if (c > 1).any():  # duplicates: allowed only when the values agree
        vals = col[mask]
        order = np.argsort(t, kind="stable")
        ts, vs = t[order], vals[order]
        same = ts[1:] == ts[:-1]
        first = vs[np.searchsorted(ts, ts)][1:]  # each copy against the first of its structure (no chaining)
        differ = np.abs(vs[1:] - first) > SAME_ENERGY_EV
        if (differ & same).any():
            i = int(np.flatnonzero(same & differ)[0])
            b = int(np.flatnonzero(mask)[order[i + 1]])
            raise MultifiError(
                f"{where.pair(b, mask)}: conflicting energy labels at fidelity {name!r} for structure "
                f"{str(cat.keys[b])!r} ({first[i]:.6f} vs {vs[i + 1]:.6f} eV)"
            )
    out_col[t] = col[mask]
