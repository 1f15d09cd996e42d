"""Read MatPES records (JSON list or JSON lines, optionally gzipped) into a FidelityDataset.

MatPES units: energy eV (total), forces eV/Å, stress in kBar with VASP's sign, 6 components in Voigt order
xx yy zz yz xz xy (MatPES's own, emmet's MatPESTrainDoc) or, with stress_order="vasp", xx yy zz xy yz zx (VASP's
OUTCAR order, as in files written that way); the dataset stores stress as a 3×3 in GPa with ASE's sign:
σ_ASE = −0.1 × σ_VASP.
pymatgen is not needed: the Structure dict is read directly.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset
from multifi.data.readers.ase_files import InvalidLabels, source_fidelity
from multifi.errors import MultifiError

MIN_VOLUME = 1e-6  # Å³

log = logging.getLogger("multifi")


def read_matpes(
    path: str | os.PathLike,
    fidelity: str | None = None,
    skip_invalid: bool = False,
    stress_order: str = "voigt",
    order_chosen: bool = True,
) -> FidelityDataset:
    """MatPES records → dataset; key "matpes:<matpes_id>" so files of other functionals merge; `stress_order`: of
    6-component stresses ("voigt" or "vasp", see the module); `order_chosen` False (the default order, not named):
    6-component stresses with shear say which order they were read in (the two differ in their shear only).

    Fidelity: the record's `functional` (e.g. "PBE", "R2SCAN"); `fidelity` only for records naming none.
    Non-finite labels raise unless `skip_invalid`, which drops them (count in ds.n_dropped).
    """
    path = Path(path)
    src = str(path)
    records, invalid, seen, sheared = [], InvalidLabels(src), {}, 0
    for i, raw in enumerate(load_json_records(path)):
        sheared += not order_chosen and _six_with_shear(raw)
        mid = raw.get("matpes_id") if isinstance(raw, dict) else None
        tag = f"record {i}" if mid is None else f"record {i} (matpes_id {mid})"
        rec = matpes_record(raw, fidelity, f"{src}: {tag}", stress_order)
        rec["name"] = i
        fid = next(iter(rec["labels"]))
        if mid is not None and (mid, fid) in seen:
            raise MultifiError(f"{src}: {tag}: duplicate of record {seen[mid, fid]} at fidelity {fid!r}")
        seen[mid, fid] = i
        if invalid.keep(rec, tag):
            records.append(rec)
    invalid.check(skip_invalid)
    if sheared:
        log.warning(
            "%s: %d records' 6-component stresses read in MatPES's order xx yy zz yz xz xy (stress_order: voigt, "
            "the default); in VASP's order xx yy zz xy yz zx (OUTCAR's, the shared solids') they need "
            "stress_order: vasp (--stress-order vasp): the two orders differ in the shear components. Naming the "
            "order silences this",
            src,
            sheared,
        )
    ds = FidelityDataset.from_records(records, source=src)
    if len(np.unique(ds.keys)) < len(ds):  # one file holding several functionals of a structure
        ds = FidelityDataset.merge([ds])
    ds.n_dropped = invalid.count
    return ds


def _six_with_shear(raw) -> bool:
    """Whether a record holds a 6-component stress with a non-zero shear component."""
    stress = raw.get("stress") if isinstance(raw, dict) else None
    try:
        values = np.asarray(stress, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return values.shape == (6,) and bool(np.any(values[3:] != 0))


def load_json_records(path: Path) -> list:
    """The records of a JSON list or JSON-lines file (gzip detected from the content)."""
    src = str(path)
    if not path.is_file():
        raise MultifiError(f"{src}: no such file")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise MultifiError(f"{src}: unreadable or truncated gzip ({type(exc).__name__}: {exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MultifiError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise MultifiError(f"{src}: no records (empty file)")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise MultifiError(f"{src}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MultifiError(
                    f"{src}: line {lineno} (record {len(out)}): invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
    return out


def matpes_record(raw, fidelity: str | None, where: str, stress_order: str = "voigt") -> dict:
    """One MatPES record → a from_records record (Å, eV, eV/Å, GPa with ASE sign)."""
    if not isinstance(raw, dict):
        raise MultifiError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for field in ("structure", "energy"):
        if raw.get(field) is None:
            raise MultifiError(f"{where}: missing {field!r}")
    fid = source_fidelity(raw.get("functional"), fidelity, where, "the record's 'functional'")
    numbers, positions, cell, pbc = structure_arrays(raw["structure"], where)
    n = len(numbers)
    _check_summary(raw, numbers, where)
    lab = {"energy": _numbers(raw["energy"], (), "energy", where)}
    if raw.get("forces") is not None:
        lab["forces"] = _numbers(raw["forces"], (n, 3), "forces", where)
    if raw.get("stress") is not None:
        lab["stress"] = vasp_stress_to_ase(_numbers(raw["stress"], None, "stress", where), where, stress_order)
    rec = {"numbers": numbers, "positions": positions, "cell": cell, "pbc": pbc, "labels": {str(fid): lab}}
    if raw.get("matpes_id") is not None:
        rec["key"] = f"matpes:{raw['matpes_id']}"
    return rec


def _check_summary(raw: dict, numbers: np.ndarray, where: str) -> None:
    """The record's own summary of its structure (nsites, nelements, elements as symbols), where given, agrees with
    its sites: a record whose structure was cut or swapped is an error, not a structure read with another's labels.
    Fields of another form (pymatgen Element objects, text) are not compared."""
    from ase.data import chemical_symbols

    symbols = sorted({chemical_symbols[z] for z in numbers})
    found = {"nsites": len(numbers), "nelements": len(symbols), "elements": symbols}
    for field, have in found.items():
        value = raw.get(field)
        if field == "elements":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                continue
            value = sorted(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            continue
        if value != have:
            unit = " sites" if field == "nsites" else ""
            raise MultifiError(f"{where}: {field} is {value!r} but its structure has {have!r}{unit}")


def structure_arrays(st, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """numbers [n], positions [n,3] Å, cell [3,3] Å, pbc [3] from a pymatgen Structure dict."""
    from ase.data import atomic_numbers

    try:
        lattice, sites = st["lattice"], st["sites"]
        if not isinstance(sites, list):
            raise TypeError(f"sites is a {type(sites).__name__}, not a list")
        matrix = lattice["matrix"]
        pbc = np.broadcast_to(np.asarray(lattice.get("pbc", True), dtype=bool), (3,)).copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise MultifiError(f"{where}: structure lacks a valid lattice or sites ({type(exc).__name__}: {exc})") from None
    cell = _numbers(matrix, (3, 3), "lattice.matrix", where)
    volume = abs(np.linalg.det(cell))
    if not volume >= MIN_VOLUME:  # also catches NaN
        raise MultifiError(f"{where}: lattice has (near) zero volume ({volume:.3g} Å³)")
    if not sites:
        raise MultifiError(f"{where}: structure has no sites")
    numbers, positions = np.zeros(len(sites), np.int64), np.zeros((len(sites), 3))
    for j, site in enumerate(sites):
        try:
            species = site["species"]
            element = species[0]["element"]
            xyz, abc = site.get("xyz"), site.get("abc")
            positions[j] = xyz if xyz is not None else np.asarray(abc, dtype=np.float64) @ cell
            # pymatgen builds a site from abc: both must say the same
            apart = (
                0.0
                if xyz is None or abc is None
                else float(np.abs(positions[j] - np.asarray(abc, dtype=np.float64) @ cell).max())
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MultifiError(
                f"{where}: site {j}: no species/element or xyz/abc ({type(exc).__name__}: {exc})"
            ) from None
        if not apart <= SITE_AGREEMENT:
            raise MultifiError(
                f"{where}: site {j}: its xyz and abc (times the lattice) disagree by {apart:.3g} Å (an edited "
                "record? pymatgen places the site by abc)"
            )
        if len(species) != 1:
            raise MultifiError(f"{where}: site {j}: disordered site ({len(species)} species) is not supported")
        occupancy = species[0].get("occu", 1.0) if isinstance(species[0], dict) else 1.0
        try:
            partial = abs(float(occupancy) - 1.0) > 1e-6
        except (TypeError, ValueError):
            partial = True
        if partial:  # read as a whole atom it would be another structure than the labels'
            raise MultifiError(
                f"{where}: site {j}: partial occupancy {occupancy!r} of {element} is not supported (an atomistic "
                "model needs whole atoms)"
            )
        if element not in atomic_numbers or atomic_numbers[element] == 0:
            raise MultifiError(f"{where}: site {j}: unknown element {element!r}")
        numbers[j] = atomic_numbers[element]
    return numbers, positions, cell, pbc


#: Å: a site's xyz and abc × lattice agree this well in records pymatgen or emmet wrote (floating-point rounding)
SITE_AGREEMENT = 1e-4

#: kBar: a 3×3 stress whose xy and yx (and so on) differ by more than this plus 1e-6 of its largest component is
#: not a stress (MatPES keeps a numerically non-symmetric one apart, as stress_matrix)
STRESS_ASYMMETRY = 1e-3

#: positions of xx yy zz yz xz xy in a 6-component stress of each order
STRESS_ORDERS = {"voigt": (0, 1, 2, 3, 4, 5), "vasp": (0, 1, 2, 4, 5, 3)}


def vasp_stress_to_ase(stress: np.ndarray, where: str = "", order: str = "voigt") -> np.ndarray:
    """kBar, VASP sign, 6 components in `order` (STRESS_ORDERS: "voigt" xx yy zz yz xz xy, "vasp" xx yy zz xy yz
    zx) or 3×3 → 3×3 GPa with ASE sign (−0.1 ×)."""
    if stress.shape == (6,):
        xx, yy, zz, yz, xz, xy = stress[list(STRESS_ORDERS[order])]
        stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    elif stress.shape != (3, 3):
        raise MultifiError(f"{where}: stress has shape {stress.shape}, expected (6,) or (3, 3)")
    elif not np.abs(stress - stress.T).max() <= STRESS_ASYMMETRY + 1e-6 * np.abs(stress).max():
        i, j = np.unravel_index(np.argmax(np.abs(stress - stress.T)), (3, 3))
        raise MultifiError(
            f"{where}: stress is not symmetric ({'xyz'[i]}{'xyz'[j]} {stress[i, j]:g} against {'xyz'[j]}{'xyz'[i]} "
            f"{stress[j, i]:g} kBar): a stress tensor is"
        )
    return -0.1 * stress


def _text_first(value) -> bool:
    """Whether a JSON value (a number or nested lists) is a string, or its first number is (cheap: records hold
    thousands of force components; a file writing numbers as text writes them all so)."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, str)


def _numbers(value, shape: tuple | None, what: str, where: str):
    """value as float64 array (a float for shape ()), checking the shape; a one-line error otherwise (also for
    numbers written as JSON strings: "-3.2" is text, so which number was meant, and in what unit, is unsaid)."""
    if _text_first(value):
        raise MultifiError(f"{where}: {what} holds text ({str(value)[:40]!r}), not numbers")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise MultifiError(f"{where}: {what} is not a number array") from None
    if shape is not None and arr.shape != shape:
        raise MultifiError(f"{where}: {what} has shape {arr.shape}, expected {shape}")
    return float(arr) if shape == () else arr
