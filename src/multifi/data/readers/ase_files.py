"""Read any file ASE reads (extxyz, ASE database .db/.json, .traj, …) into a FidelityDataset."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset, voigt_or_matrix
from multifi.data.neighbors import check_cell
from multifi.errors import MultifiError

log = logging.getLogger("multifi")


def read_ase(
    path: str | os.PathLike,
    fidelity: str | None = None,
    index: str = ":",
    skip_invalid: bool = False,
    keys: dict[str, str] | None = None,
) -> FidelityDataset:
    """Structures and labels from an ASE-readable file.

    Energy (eV): info['energy'] or the attached calculator's results. Forces (eV/Å): arrays['forces']
    or the calculator. Stress (eV/Å³, ASE sign, Voigt 6 or 3×3): info['stress'] or the calculator;
    stored in GPa. Fidelity: info['fidelity'] (for ASE databases, the row's key-value pairs); `fidelity`
    only for structures that name none (a different name is an error, see `source_fidelity`). Key: info['key'], else a geometry hash. `index` selects frames as in
    ase.io.read. Non-finite labels raise unless `skip_invalid`, which drops them (count in ds.n_dropped).
    `keys` renames the labels looked up: {"energy": "REF_energy", "forces": "REF_forces", "stress": …}; with
    renamed keys, frames carrying none of them are skipped (a file with one label set per level of theory,
    e.g. REF_energy_PBE on every frame and REF_energy_R2SCAN on some, read once per fidelity) and counted
    in the log; with the default keys, or when no frame has them, a frame without labels is an error.
    """
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise MultifiError(f"{src}: no such file")
    if path.stat().st_size == 0:
        raise MultifiError(f"{src}: empty file")
    records, invalid = [], InvalidLabels(src)
    renamed = any(v != k for k, v in (keys or {}).items())
    unlabelled: list[str] = []  # errors of frames without the renamed labels (skipped)
    for i, atoms in enumerate(_frames(path, index)):
        tag = f"frame {i} (0-based)" if index == ":" else f"frame {i} (0-based, of index {index!r})"
        try:
            rec = _record(atoms, fidelity, f"{src}: {tag}", keys)
        except _NoLabel as exc:
            if not renamed:
                raise MultifiError(str(exc)) from None
            unlabelled.append(str(exc))
            continue
        rec["name"] = i
        if invalid.keep(rec, tag):
            records.append(rec)
    if unlabelled and not records:
        raise MultifiError(f"{unlabelled[0]} (nor has any other frame)")
    if unlabelled:
        named = "/".join(dict.fromkeys(v for v in keys.values()))
        log.info("%s: read %d frames with %s labels, skipped %d without", src, len(records), named, len(unlabelled))
    if not records and not invalid.count:
        raise MultifiError(f"{src}: no structures (index {index!r})")
    invalid.check(skip_invalid)
    ds = FidelityDataset.from_records(records, source=src)
    ds.n_dropped = invalid.count
    return ds


class InvalidLabels:
    """Counts non-finite labels of one source; drops them from records and reports them in one line."""

    def __init__(self, src: str):
        self.src, self.count, self.first = src, 0, ""

    def keep(self, rec: dict, tag: str) -> bool:
        """Remove non-finite labels from rec in place; False when no label is left."""
        for name, lab in rec["labels"].items():
            bad = [k for k, v in lab.items() if not np.isfinite(np.asarray(v, dtype=np.float64)).all()]
            if bad and not self.first:
                self.first = f"{tag} ({'/'.join(bad)} at fidelity {name!r})"
            self.count += len(bad)
            for k in bad:
                del lab[k]
        return any(rec["labels"].values())

    def check(self, skip_invalid: bool) -> None:
        if self.count and not skip_invalid:
            raise MultifiError(
                f"{self.src}: {self.count} non-finite (NaN/inf) labels, first in {self.first}; "
                "fix the data or drop them with data.skip_invalid: true (--set data.skip_invalid=true, or --skip-invalid for multifi data)"
            )


def _frames(path: Path, index: str) -> Iterator:
    """Atoms from the file, turning any reader failure into a one-line MultifiError."""
    from ase.io.formats import UnknownFileTypeError, filetype

    try:
        fmt = filetype(str(path))
    except Exception as exc:  # UnknownFileTypeError, or whatever a format sniffer trips over
        raise MultifiError(f"{path}: not a file format ASE can read ({_gist(exc)})") from None
    n = 0  # frames delivered so far = number of the frame that fails
    try:
        frames = _db_frames(path, index) if fmt in ("db", "json") else _text_frames(path, fmt, index)
        for atoms in frames:
            yield atoms
            n += 1
    except MultifiError:
        raise
    except UnknownFileTypeError as exc:
        raise MultifiError(f"{path}: not a file format ASE can read ({_gist(exc)})") from None
    except Exception as exc:  # ASE raises many types (XYZError, ValueError, KeyError, …) on bad files
        raise MultifiError(f"{path}: unreadable or truncated at frame {n} (0-based) ({_gist(exc)})") from None


def _text_frames(path: Path, fmt: str, index: str) -> Iterator:
    """ase.io.iread, but a compressed file is decompressed into memory first (ASE's extxyz reader seeks,
    which on a gzip stream re-decompresses from the start: quadratic time)."""
    import io

    import ase.io

    opener = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}.get(path.suffix.lower())
    if opener is None:
        yield from ase.io.iread(str(path), index=index)
        return
    import importlib

    with importlib.import_module(opener).open(path, "rt") as f:
        text = io.StringIO(f.read())
    yield from ase.io.iread(text, index=index, format=fmt)


def _gist(exc: Exception) -> str:
    """An exception as one short line."""
    return re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()[:200]


def _db_frames(path: Path, index: str) -> Iterator:
    """Rows of an ASE database as Atoms, with the key-value pairs (fidelity, key) in atoms.info."""
    import ase.db
    from ase.io.formats import string2index

    with ase.db.connect(str(path), serial=True) as db:
        rows = list(db.select())
    sel = string2index(index)
    rows = rows[sel] if isinstance(sel, slice) else [rows[sel]]
    for row in rows:
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        yield atoms


def source_fidelity(named, fidelity: str | None, where: str, field: str) -> str:
    """The fidelity of one structure: the one it names itself (`named`), else the source's `fidelity`.

    A source's fidelity never relabels a structure that names another one: that is an error naming
    the file and frame, so data labelled at one level of theory is never trained as another."""
    named = str(named) if named is not None and str(named) != "" else None
    if named is not None and fidelity is not None and named != fidelity:
        raise MultifiError(
            f"{where}: names fidelity {named!r} ({field}) but its source says {fidelity!r}; a "
            "source's fidelity applies only to structures that name none: remove one of the two"
        )
    fid = named or fidelity
    if not fid:
        raise MultifiError(
            f"{where}: no fidelity: set {field}, or give the source one ('fidelity:' in the config, "
            "--fidelity on the command line)"
        )
    return fid


class _NoLabel(MultifiError):
    """A frame carries none of the labels looked up."""


def _other_labels(atoms, keys: dict[str, str]) -> str:
    """A hint naming label-like keys the structure has under other names (REF_energy, DFT_forces, …)."""
    found = [
        k
        for k in [*atoms.info, *atoms.arrays]
        if any(w in k.lower() for w in ("energy", "force", "stress")) and k not in keys.values()
    ]
    if not found:
        return ""
    which = {"energy": "energy_key", "force": "forces_key", "stress": "stress_key"}
    if any(v != k for k, v in keys.items()):  # keys already chosen: another key may be another level of theory
        return f"; it has {', '.join(found[:3])} (labels of another level of theory belong to a source of their own)"
    hint = ", ".join(f"{k} (set {next(v for w, v in which.items() if w in k.lower())}: {k})" for k in found[:3])
    return f"; it has {hint}"


def _record(atoms, fidelity: str | None, where: str, keys: dict[str, str] | None = None) -> dict:
    """One from_records record: geometry, key and {fidelity: labels} (eV, eV/Å, GPa)."""
    from ase.units import GPa

    keys = {"energy": "energy", "forces": "forces", "stress": "stress", **(keys or {})}

    n = len(atoms)
    fid = source_fidelity(atoms.info.get("fidelity"), fidelity, where, "info['fidelity']")
    results = getattr(atoms.calc, "results", None) or {}
    lab = {}
    energy = atoms.info.get(keys["energy"], results.get(keys["energy"]))
    if energy is not None:
        try:
            lab["energy"] = float(energy)
        except (TypeError, ValueError):
            raise MultifiError(f"{where}: energy {energy!r} is not a number") from None
    forces = atoms.arrays.get(keys["forces"], results.get(keys["forces"]))
    if forces is not None:
        lab["forces"] = np.asarray(forces, dtype=np.float64)
        if lab["forces"].shape != (n, 3):
            raise MultifiError(f"{where}: forces have shape {lab['forces'].shape}, expected ({n}, 3)")
    stress = atoms.info.get(keys["stress"], results.get(keys["stress"]))
    if stress is not None:
        lab["stress"] = voigt_or_matrix(stress, where) / GPa
    if not lab:
        named = "/".join(keys.values())
        raise _NoLabel(f"{where} has no {named} label" + _other_labels(atoms, keys))
    periodic = bool(atoms.pbc.any())
    if periodic:
        check_cell(atoms.cell.array, atoms.pbc, where)
    rec = {
        "numbers": atoms.numbers,
        "positions": atoms.positions,
        "pbc": atoms.pbc.copy(),
        "cell": atoms.cell.array.copy() if periodic else None,
        "labels": {str(fid): lab},
    }
    if atoms.info.get("key") is not None:
        rec["key"] = str(atoms.info["key"])
    return rec
