"""QM9 molecules (geometries from the PyPI package `qm9pack`) with energy labels per fidelity.

Geometries and QM9's own B3LYP/6-31G(2df,p) energies are parsed once from qm9pack's CSVs (a few
seconds, string operations + numpy) and cached as one .npz in `$MULTIFI_CACHE` or `~/.cache/multifi`.
Other fidelities come from label tables `index,energy_eV` (optionally gzipped) keyed by QM9 index.
Everything is columnar: no Python loop over molecules.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset, ranges
from multifi.data.fidelity import FidelityTable
from multifi.errors import SKIP_INVALID_HINT, MultifiError, NoFidelityError
from multifi.files import atomic_write, reported, warn_if_cut_short
from multifi.units import HARTREE_EV

log = logging.getLogger(__name__)

QM9_FIDELITY = "B3LYP/6-31G(2df,p)"
QM9_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
LABEL_HEADER = "index,energy_eV"
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
_SYMBOLS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr").split()
_Z = {s: z for z, s in enumerate(_SYMBOLS, start=1)}
_MEMO: dict[Path, Qm9Geometries] = {}  # last cache file loaded in this process → geometries


# ---------------------------------------------------------------------------------------- geometries
@dataclass
class Qm9Geometries:
    """All QM9 molecules in columnar arrays, sorted by QM9 index.

    index [S] int64, numbers [A] uint8, positions [A, 3] float64 Å, offsets [S+1] int64,
    energy [S] float64 eV (B3LYP/6-31G(2df,p) electronic energy, U0 − ZPVE).
    """

    index: np.ndarray
    numbers: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    energy: np.ndarray
    source: str = ""
    _lut: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.index)

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """[n] bool: which QM9 indices are known."""
        return self._rows_or_minus_one(indices) >= 0

    def rows(self, indices: np.ndarray, where: str = "") -> np.ndarray:
        """[n] int64 row of each QM9 index; an unknown index raises an error naming it."""
        rows = self._rows_or_minus_one(indices)
        if (rows < 0).any():
            bad = np.asarray(indices).ravel()[rows < 0]
            prefix = f"{where}: " if where else ""
            raise MultifiError(
                f"{prefix}QM9 index {int(bad[0])} is not a QM9 molecule ({len(bad)} unknown indices; QM9 has "
                f"{len(self)} molecules with indices {int(self.index.min())}..{int(self.index.max())})"
            )
        return rows

    def _rows_or_minus_one(self, indices) -> np.ndarray:
        if self._lut is None:
            self._lut = np.full(int(self.index.max(initial=0)) + 1, -1, np.int64)
            self._lut[self.index] = np.arange(len(self.index))
        idx = np.asarray(indices, dtype=np.int64).ravel()
        ok = (idx >= 0) & (idx < len(self._lut))
        return np.where(ok, self._lut[np.where(ok, idx, 0)], -1)

    @classmethod
    def concatenate(cls, parts: list[Qm9Geometries]) -> Qm9Geometries:
        """Parts joined and sorted by index; a QM9 index given twice is an error."""
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        geo = cls(
            index=np.concatenate([p.index for p in parts]),
            numbers=np.concatenate([p.numbers for p in parts]),
            positions=np.concatenate([p.positions for p in parts]),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            energy=np.concatenate([p.energy for p in parts]),
            source=" + ".join(p.source for p in parts),
        )
        order = np.argsort(geo.index, kind="stable")
        dup = np.flatnonzero(np.diff(geo.index[order]) == 0)
        if len(dup):
            raise MultifiError(f"{geo.source}: QM9 index {int(geo.index[order][dup[0]])} appears twice")
        if (order != np.arange(len(order))).any():
            geo = geo.take(order)
        return geo

    def take(self, rows: np.ndarray) -> Qm9Geometries:
        """The molecules at `rows`, in that order."""
        counts = np.diff(self.offsets)[rows]
        atoms = ranges(self.offsets[rows], counts)
        return Qm9Geometries(
            index=self.index[rows],
            numbers=self.numbers[atoms],
            positions=self.positions[atoms],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            energy=self.energy[rows],
            source=self.source,
        )

    def save(self, path: Path) -> None:
        """One uncompressed .npz, written atomically."""
        arrays = dict(
            index=self.index,
            numbers=self.numbers,
            positions=self.positions,
            offsets=self.offsets,
            energy=self.energy,
            format=np.array(_CACHE_FORMAT),
        )
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path) -> Qm9Geometries:
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != _CACHE_FORMAT:
                    raise ValueError(f"cache format {int(z['format'])}, expected {_CACHE_FORMAT}")
                geo = cls(
                    index=z["index"],
                    numbers=z["numbers"],
                    positions=z["positions"],
                    offsets=z["offsets"],
                    energy=z["energy"],
                    source=str(path),
                )
        except (OSError, KeyError, ValueError, EOFError) as exc:
            raise MultifiError(f"{path}: unreadable QM9 cache ({type(exc).__name__}: {exc})") from None
        S, A = len(geo.index), len(geo.numbers)
        if (
            geo.offsets.shape != (S + 1,)
            or geo.offsets[-1] != A
            or geo.positions.shape != (A, 3)
            or geo.energy.shape != (S,)
        ):
            raise MultifiError(f"{path}: inconsistent QM9 cache arrays")
        return geo


def qm9_csv_paths() -> list[Path]:
    """The three QM9 CSVs inside the installed `qm9pack` (located without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise MultifiError("qm9pack is not installed; QM9 geometries come from it: pip install qm9pack")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = [folder / name for name in QM9_PARTS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MultifiError(
            f"{folder}: qm9pack data files missing ({', '.join(missing)}); "
            "reinstall it: pip install --force-reinstall qm9pack"
        )
    return paths


def default_cache_dir() -> Path:
    """`$MULTIFI_CACHE` if set, else `~/.cache/multifi`."""
    env = os.environ.get("MULTIFI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multifi"


def _cache_file(paths: list[Path], cache_dir) -> Path:
    """Cache path keyed by the qm9pack version and the CSV names and sizes."""
    try:
        version = importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key = f"{_CACHE_FORMAT}|{version}|" + "|".join(f"{p.name}:{p.stat().st_size}" for p in paths)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return (
        Path(cache_dir).expanduser() / f"qm9_geometries_{digest}.npz"
        if cache_dir
        else default_cache_dir() / f"qm9_geometries_{digest}.npz"
    )


def load_qm9_geometries(cache_dir: str | os.PathLike | None = None) -> Qm9Geometries:
    """All QM9 geometries and B3LYP energies: from the .npz cache (~1 s), else parsed and cached."""
    paths = qm9_csv_paths()
    cache = _cache_file(paths, cache_dir)
    if cache in _MEMO:
        return _MEMO[cache]
    geo = None
    if cache.exists():
        try:
            geo = Qm9Geometries.load(cache)
        except MultifiError as exc:
            log.warning("%s; parsing qm9pack again", exc)
    if geo is None:
        t0 = time.perf_counter()
        geo = Qm9Geometries.concatenate([parse_qm9_csv(p) for p in paths])
        log.info("parsed %d QM9 molecules in %.1f s", len(geo), time.perf_counter() - t0)
        try:
            geo.save(cache)
        except OSError as exc:
            log.warning("could not write the QM9 cache %s (%s); it will be parsed again next time", cache, exc)
    geo.source = "qm9pack"
    for a in (geo.index, geo.numbers, geo.positions, geo.offsets, geo.energy):
        a.flags.writeable = False  # shared through _MEMO
    _MEMO.clear()
    _MEMO[cache] = geo
    return geo


# ---------------------------------------------------------------------------------------- CSV parsing
def parse_qm9_csv(path: str | os.PathLike) -> Qm9Geometries:
    """Parse one qm9pack CSV (columns Index, Elements, XYZ_Ang Å, InternalEnergy_0K_au, ZPVE_au)."""
    path = Path(path)
    cols = _read_columns(path, ("Index", "Elements", "XYZ_Ang", "InternalEnergy_0K_au", "ZPVE_au"))
    idx_s, el_s, xyz_s, u0_s, zpve_s = cols
    if not idx_s:
        raise MultifiError(f"{path}: no molecules")
    index = _numbers(idx_s, path, "Index", idx_s, np.int64)
    n_el = np.array([e.count(",") for e in el_s], np.int64) + 1
    n_xyz = np.array([x.count("[") for x in xyz_s], np.int64) - 1
    n_comma = np.array([x.count(",") for x in xyz_s], np.int64)
    bad = (n_el != n_xyz) | (n_comma != 3 * n_xyz - 1) | (n_xyz < 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise MultifiError(
            f"{path}: molecule {idx_s[i]}: Elements lists {n_el[i]} atoms but XYZ_Ang is not "
            f"a list of {n_el[i]} [x,y,z] triples"
        )
    numbers = _symbols_to_numbers(el_s, n_el, idx_s, path)
    xyz = ",".join(xyz_s).replace("[", "").replace("]", "")
    positions = _numbers(xyz_s, path, "XYZ_Ang", idx_s, joined=xyz, size=3 * len(numbers)).reshape(-1, 3)
    energy = _numbers(u0_s, path, "InternalEnergy_0K_au", idx_s) - _numbers(zpve_s, path, "ZPVE_au", idx_s)
    energy *= HARTREE_EV
    offsets = np.concatenate([[0], np.cumsum(n_el)]).astype(np.int64)
    bad = ~np.isfinite(energy) | (np.add.reduceat(~np.isfinite(positions).all(1), offsets[:-1]) > 0)
    if bad.any():
        raise MultifiError(f"{path}: molecule {idx_s[int(np.argmax(bad))]}: non-finite coordinates or energy")
    return Qm9Geometries(
        index=index, numbers=numbers, positions=positions, offsets=offsets, energy=energy, source=str(path)
    )


def _read_columns(path: Path, names: tuple[str, ...]) -> list[list[str]]:
    """The named columns of a CSV file as lists of strings (csv module: fields are quoted)."""
    if not path.is_file():
        raise MultifiError(f"{path}: no such file")
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [n for n in names if n not in header]
        if missing:
            raise MultifiError(f"{path}: not a qm9pack CSV: missing column(s) {', '.join(missing)}")
        pos = [header.index(n) for n in names]
        rows = list(reader)
    width = np.array([len(r) for r in rows], np.int64)
    if (width != len(header)).any():
        i = int(np.argmax(width != len(header)))
        raise MultifiError(f"{path}: row {i + 1}: {width[i]} fields, expected {len(header)}")
    return [[r[p] for r in rows] for p in pos]


def _numbers(
    strings: list[str],
    path: Path,
    column: str,
    names: list[str],
    dtype=np.float64,
    joined: str | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Parse comma-joined numbers at C speed (one per string unless `size` given); on failure find the
    bad molecule (slow path, errors only)."""
    try:
        out = np.fromstring(",".join(strings) if joined is None else joined, dtype=dtype, sep=",")
        if out.size == (len(strings) if size is None else size):
            return out
    except ValueError:
        pass
    for s, name in zip(strings, names):
        try:
            n = np.fromstring(s.replace("[", "").replace("]", ""), dtype=dtype, sep=",").size
        except ValueError:
            n = 0
        if n == 0 or (size is None and n != 1):
            raise MultifiError(f"{path}: molecule {name}: {column} {s[:40]!r} is not numeric")
    raise MultifiError(f"{path}: column {column} is not numeric")


def _symbols_to_numbers(el_s: list[str], n_el: np.ndarray, names: list[str], path: Path) -> np.ndarray:
    """Element-symbol lists like "['C','H']" → [A] uint8 atomic numbers."""
    joined = ",".join(el_s)
    for ch in "[]'\" ":
        joined = joined.replace(ch, "")
    symbols, inverse = np.unique(np.array(joined.split(",")), return_inverse=True)
    unknown = [s for s in symbols if s not in _Z]
    if unknown:
        atom = int(np.argmax(np.isin(symbols[inverse], unknown)))
        mol = int(np.searchsorted(np.cumsum(n_el), atom, "right"))
        raise MultifiError(f"{path}: molecule {names[mol]}: unknown element symbol {unknown[0]!r}")
    return np.array([_Z[s] for s in symbols], np.uint8)[inverse.ravel()]


# ---------------------------------------------------------------------------------------- label tables
@dataclass
class Qm9Labels:
    """One label table, sorted by index: index [n] int64, energy [n] float64 eV, line [n] (1-based)."""

    index: np.ndarray
    energy: np.ndarray
    line: np.ndarray
    fidelity: str
    path: Path
    n_dropped: int = 0


def read_label_table(path: str | os.PathLike, fidelity: str | None = None, skip_invalid: bool = False) -> Qm9Labels:
    """Read `index,energy_eV` (eV, total electronic energy; .csv or .csv.gz) keyed by QM9 index.

    The fidelity name is `fidelity`, else the entry for this file in `manifest.json` next to it.
    NaN/inf energies raise, or with skip_invalid are dropped and counted in `n_dropped`.
    """
    path = Path(path)
    body = _read_label_text(path)
    index, energy = _parse_label_body(body, path)
    line = np.arange(2, len(index) + 2, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    index, energy, line = index[order], energy[order], line[order]
    dup = np.flatnonzero(np.diff(index) == 0)
    if len(dup):
        d = dup[0]
        raise MultifiError(f"{path}: index {int(index[d])} appears twice (lines {line[d]} and {line[d + 1]})")
    bad = ~np.isfinite(energy)
    if bad.any() and not skip_invalid:
        first = int(line[bad].min())
        raise MultifiError(
            f"{path}: {int(bad.sum())} non-finite (NaN/inf) energies, first at line {first}; "
            f"fix the file or {SKIP_INVALID_HINT}"
        )
    if bad.any():
        log.warning("%s: dropped %d rows with non-finite energies", path, int(bad.sum()))
        index, energy, line = index[~bad], energy[~bad], line[~bad]
    return Qm9Labels(
        index=index,
        energy=energy,
        line=line,
        fidelity=_label_fidelity(path, fidelity),
        path=path,
        n_dropped=int(bad.sum()),
    )


def _read_label_text(path: Path) -> bytes:
    """The body (after the checked header) of a label table, ending in one newline (or empty)."""
    if not path.is_file():
        raise MultifiError(f"{path}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise MultifiError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    raw = raw.replace(b"\r", b"").removeprefix(b"\xef\xbb\xbf")
    warn_if_cut_short(path, raw[-1:].decode("latin-1"))
    header, _, body = raw.partition(b"\n")
    if header.strip().decode(errors="replace") != LABEL_HEADER:
        raise MultifiError(f"{path}: wrong header {header[:60].decode(errors='replace')!r}, expected {LABEL_HEADER!r}")
    body = body.rstrip()
    return body + b"\n" if body else b""


def _parse_label_body(body: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """[n] int64 indices and [n] float64 energies; errors name the line (header = line 1)."""
    b = np.frombuffer(body, np.uint8)
    ends = np.flatnonzero(b == ord("\n"))
    commas = np.diff(np.searchsorted(np.flatnonzero(b == ord(",")), ends), prepend=0)
    if (commas != 1).any():
        i = int(np.argmax(commas != 1))
        raise MultifiError(f"{path}: line {i + 2}: expected 2 fields (index,energy_eV), found {commas[i] + 1}")
    try:
        values = np.fromstring(body.replace(b"\n", b","), sep=",").reshape(-1, 2)
    except ValueError:
        _raise_bad_line(body, path)
    index = values[:, 0].astype(np.int64)
    bad = index != values[:, 0]
    if bad.any():
        i = int(np.argmax(bad))
        raise MultifiError(f"{path}: line {i + 2}: index {float(values[i, 0]):g} is not an integer")
    return index, values[:, 1].copy()


def _raise_bad_line(body: bytes, path: Path):
    """Slow path, errors only: find and report the first non-numeric field."""
    for n, line in enumerate(body.decode(errors="replace").split("\n"), start=2):
        for what, text in zip(("index", "energy"), line.split(",")):
            try:
                float(text)
            except ValueError:
                raise MultifiError(f"{path}: line {n}: {what} {text.strip()[:40]!r} is not a number") from None
    raise MultifiError(f"{path}: not a numeric index,energy_eV table")


def _label_fidelity(path: Path, given: str | None) -> str:
    """`given`, else the manifest's name; a given name that contradicts the manifest is an error (data is never
    silently relabelled)."""
    if given is None:
        return _manifest_fidelity(path)
    if (path.parent / "manifest.json").is_file():
        try:
            listed = _manifest_fidelity(path)
        except MultifiError:
            return given  # not listed (or no usable manifest): the given name stands
        if listed != given:
            raise MultifiError(
                f"{path}: labels of {listed!r} by {path.parent / 'manifest.json'}, given as {given!r}; "
                "drop the fidelity (the manifest names it) or use the file of that method"
            )
    return given


def _manifest_fidelity(path: Path) -> str:
    """Fidelity name of `path` from manifest.json in its folder ({"files": [{"file", "fidelity"}]})."""
    manifest = path.parent / "manifest.json"
    hint = "give the source a fidelity (qm9: {labels: …, fidelity: NAME}, or --fidelity) or list the file in a manifest.json next to it"
    if not manifest.is_file():
        raise NoFidelityError(f"{path}: fidelity name unknown: {hint}")
    try:
        files = json.loads(manifest.read_text())["files"]
        names = {e["file"]: e["fidelity"] for e in files}
    except (ValueError, KeyError, TypeError) as exc:
        raise MultifiError(f"{manifest}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if path.name not in names:
        raise NoFidelityError(f"{path}: fidelity name unknown: not listed in {manifest}; {hint}")
    return str(names[path.name])


# ---------------------------------------------------------------------------------------- datasets
def read_qm9(
    labels: str | os.PathLike | None = None,
    fidelity: str | None = None,
    limit: int | None = None,
    indices=None,
    seed: int = 0,
    skip_invalid: bool = False,
    cache_dir=None,
    indices_source: str = "indices",
) -> FidelityDataset:
    """QM9 molecules with energies (eV) at one fidelity, as a FidelityDataset with keys "qm9:<index>".

    Without `labels`: QM9's own B3LYP/6-31G(2df,p) energies for every molecule. With `labels`: the
    molecules listed in that `index,energy_eV` table. `indices` restricts to those QM9 indices; `limit`
    keeps a reproducible random subset (seed) of at most that many, sorted by index.
    """
    geo = load_qm9_geometries(cache_dir)
    n_dropped = 0
    if labels is None:
        if fidelity not in (None, QM9_FIDELITY):
            raise MultifiError(
                f"QM9 itself provides only {QM9_FIDELITY!r} energies; for fidelity {fidelity!r} "
                "give a labels table (qm9: {labels: TABLE.csv}, or qm9:TABLE.csv on the command line)"
            )
        fidelity, idx, energy, source = QM9_FIDELITY, geo.index, geo.energy, "qm9pack"
    elif _is_wide_table(labels):
        if fidelity is not None and fidelity not in _wide_columns(labels):  # it would be ignored silently
            raise MultifiError(
                f"{labels}: a table with several columns after index ({', '.join(_wide_columns(labels))}), each "
                f"read as a fidelity named by its header, so fidelity {fidelity!r} cannot apply: keep only the "
                "index and energy columns, or give no fidelity to read each column as a fidelity"
            )
        return read_qm9_wide(
            labels,
            fidelity=fidelity,
            limit=limit,
            indices=indices,
            seed=seed,
            skip_invalid=skip_invalid,
            cache_dir=cache_dir,
            indices_source=indices_source,
        )
    else:
        table = read_label_table(labels, fidelity, skip_invalid)
        unknown = ~geo.contains(table.index)
        if unknown.any():
            i = int(np.argmax(unknown))
            raise MultifiError(
                f"{table.path}: line {table.line[i]}: index {table.index[i]} is not a QM9 molecule "
                f"({int(unknown.sum())} such rows)"
            )
        fidelity, idx, energy, source = table.fidelity, table.index, table.energy, str(table.path)
        n_dropped = table.n_dropped
    keep = _select(geo, idx, indices, limit, seed, source, indices_source)
    _check_selected(source, len(idx), keep, indices, limit)
    ds = _dataset(geo, idx[keep], energy[keep], fidelity, source)
    ds.n_dropped = n_dropped
    return ds


def _check_selected(source: str, rows: int, keep: np.ndarray, indices, limit) -> None:
    """A QM9 source that selects no molecule is an error (as a structure file without structures is), not a
    fidelity that silently drops out of training."""
    if len(keep):
        return
    if rows == 0:
        why = "the table has no rows"
    elif indices is not None and limit != 0:
        why = f"none of its {rows} molecules is among the {len(np.unique(np.asarray(indices)))} QM9 `indices` given"
    else:
        why = "limit 0"
    raise MultifiError(f"{source}: no molecule selected ({why})")


def _select(
    geo: Qm9Geometries, idx: np.ndarray, indices, limit: int | None, seed: int, source: str, indices_source: str
) -> np.ndarray:
    """Positions in `idx` (sorted QM9 indices) kept by `indices` (read from `indices_source`, named in errors)
    and `limit`."""
    keep = np.arange(len(idx))
    if indices is not None:
        want = np.asarray(indices)
        if want.size and not np.issubdtype(want.dtype, np.integer):
            raise MultifiError(f"indices must be integer QM9 indices, got dtype {want.dtype}")
        want = np.unique(want.astype(np.int64))
        geo.rows(want, where=indices_source)
        keep = np.flatnonzero(np.isin(idx, want))
        missing = want[~np.isin(want, idx)]
        if len(missing) and len(keep):  # (none found at all: an error, _check_selected)
            log.warning(
                "%s: %d of the %d QM9 `indices` given have no label here (e.g. %d): those molecules are left out",
                source,
                len(missing),
                len(want),
                int(missing[0]),
            )
    if limit is not None:
        if int(limit) < 0:
            raise MultifiError(f"limit must be >= 0, got {limit}")
        if int(limit) < len(keep):
            keep = np.sort(keep[np.random.default_rng(seed).permutation(len(keep))[: int(limit)]])
    return keep


def _dataset(geo: Qm9Geometries, idx: np.ndarray, energy: np.ndarray, fidelity: str, source: str) -> FidelityDataset:
    """Columnar FidelityDataset of QM9 molecules `idx` with energies [S] eV at one fidelity."""
    rows = geo.rows(idx)
    counts = geo.offsets[rows + 1] - geo.offsets[rows]
    atoms = ranges(geo.offsets[rows], counts)
    S = len(rows)
    width = len(str(int(idx.max()))) if S else 1
    ds = FidelityDataset(
        numbers=geo.numbers[atoms],
        positions=geo.positions[atoms],
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        cells=np.zeros((S, 3, 3)),
        pbc=np.zeros((S, 3), bool),
        keys=np.char.add("qm9:", idx.astype(f"U{width}")),
        fidelities=FidelityTable([fidelity]),
        energy=np.asarray(energy, np.float64).reshape(S, 1).copy(),
        source=source,
    )
    return ds.validate()


def _is_wide_table(path) -> bool:
    """A MultiXC-style table: header `index,<fidelity 1>,<fidelity 2>,…` (more than one energy column)."""
    p = Path(path)
    if not p.exists():
        return False
    opener = gzip.open if p.suffix == ".gz" else open
    with reported(p, "read"), opener(p, "rt") as f:  # a folder, a corrupt .gz: one line, not a traceback
        header = _header_fields(f.readline())
    return len(header) > 2 and header[0] == "index"


def _wide_columns(path) -> list[str]:
    p = Path(path)
    with reported(p, "read"), (gzip.open if p.suffix == ".gz" else open)(p, "rt") as f:
        return _header_fields(f.readline())[1:]


def _header_fields(line: str) -> list[str]:
    """A CSV header line's fields (a quoted field may hold commas: "B3LYP/6-31G(2df,p)")."""
    return [h.strip() for h in next(csv.reader([line.strip()]), [])]


def read_qm9_wide(
    path: str | os.PathLike,
    fidelity: str | None = None,
    limit: int | None = None,
    indices=None,
    seed: int = 0,
    skip_invalid: bool = False,
    cache_dir=None,
    indices_source: str = "indices",
) -> FidelityDataset:
    """QM9 molecules with energies (eV) at many fidelities from one wide table.

    Header `index,<fidelity>,<fidelity>,…`; one row per molecule; an empty field or `nan` is a missing
    label. Each molecule is stored once with a row of K labels (energy [S, K]), not once per label.
    `fidelity`: only that column, on the molecules it labels (limit and indices choose among those).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            first = f.readline()
            header = _header_fields(first)
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # a cut gzip, a folder, not text
        raise MultifiError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    names = header[1:]
    if len(set(names)) != len(names):
        raise MultifiError(f"{path}: duplicate fidelity names in the header")
    text = re.sub(r"(?<=,)(?=,|\n|$)", "nan", text)  # empty fields → nan
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise MultifiError(f"{path}: not a numeric table ({str(exc).splitlines()[0]})") from None
    if table.shape[1] != len(header):
        hint = (
            '; a fidelity name with a comma, e.g. B3LYP/6-31G(2df,p), must be quoted: "B3LYP/6-31G(2df,p)"'
            if '"' not in first and any("(" in n and ")" not in n for n in names)
            else ""
        )
        raise MultifiError(f"{path}: {table.shape[1]} columns, header names {len(header)}{hint}")
    idx = table[:, 0].astype(np.int64)
    energy = table[:, 1:]
    if fidelity is not None:
        if fidelity not in names:
            raise MultifiError(f"{path}: no column {fidelity!r} (columns after index: {', '.join(names)})")
        column = names.index(fidelity)
        labelled = ~np.isnan(energy[:, column])
        idx, energy, names = idx[labelled], energy[labelled][:, [column]], [fidelity]
    bad = np.isinf(energy)
    if bad.any():
        if not skip_invalid:
            raise MultifiError(f"{path}: {int(bad.sum())} infinite energies; fix the data or {SKIP_INVALID_HINT}")
        energy[bad] = np.nan
    if len(np.unique(idx)) != len(idx):
        raise MultifiError(f"{path}: duplicate QM9 indices")
    order = np.argsort(idx)
    idx, energy = idx[order], energy[order]
    geo = load_qm9_geometries(cache_dir)
    unknown = ~geo.contains(idx)
    if unknown.any():
        raise MultifiError(
            f"{path}: index {idx[np.argmax(unknown)]} is not a QM9 molecule ({int(unknown.sum())} such rows)"
        )
    keep = _select(geo, idx, indices, limit, seed, str(path), indices_source)
    _check_selected(str(path), len(idx), keep, indices, limit)
    ds = _dataset(geo, idx[keep], energy[keep, 0], names[0], str(path))
    ds.fidelities = FidelityTable(names)
    ds.energy = np.ascontiguousarray(energy[keep])
    ds.n_dropped = int(bad.sum())
    return ds.validate(skip_invalid)


def read_qm9_blocks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """blocks.json ({"seed", "block_size", "methods", "blocks": {method: [QM9 index, ...]}}) → method → indices."""
    path = Path(path)
    if not path.is_file():
        raise MultifiError(f"{path}: no such file")
    try:
        blocks = json.loads(path.read_text())["blocks"]
        out = {str(m): np.asarray(v) for m, v in blocks.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MultifiError(f"{path}: not a QM9 blocks file ({type(exc).__name__}: {exc})") from None
    for m, v in out.items():
        if v.ndim != 1 or (v.size and not np.issubdtype(v.dtype, np.integer)):
            raise MultifiError(f"{path}: block {m!r} is not a list of integer QM9 indices")
        out[m] = v.astype(np.int64)
    return out
