"""Read any file ASE reads (extxyz, ASE database .db/.json, .traj, …) into a FidelityDataset."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from multifi.config import name_problem
from multifi.data.cells import check_cell
from multifi.data.dataset import (
    STRESS_ASYMMETRY,
    FidelityDataset,
    geometry_key,
    symmetric_stress,
    voigt_or_matrix,
)
from multifi.data.isolated import is_free_atom
from multifi.errors import SKIP_INVALID_HINT, MultifiError, NoFidelityError
from multifi.files import warn_if_cut_short

log = logging.getLogger("multifi")


def read_ase(
    path: str | os.PathLike,
    fidelity: str | None = None,
    index: str = ":",
    skip_invalid: bool = False,
    keys: dict[str, str] | None = None,
    fidelity_key: str | None = None,
    free_atoms: bool = False,
) -> FidelityDataset:
    """Structures and labels from an ASE-readable file.

    Energy (eV): info['energy'] or the attached calculator's results. Forces (eV/Å): arrays['forces']
    or the calculator. Stress (eV/Å³, ASE sign, Voigt 6 or 3×3): info['stress'] or the calculator;
    stored in GPa. Fidelity: info['fidelity'] (for ASE databases, the row's key-value pairs); `fidelity`
    only for structures that name none (a different name is an error, see `source_fidelity`). Key: info['key'], else a geometry hash. `index` selects frames as in
    ase.io.read. Non-finite labels raise unless `skip_invalid`, which drops them (count in ds.n_dropped).
    `keys` names the labels looked up: {"energy": "REF_energy", "forces": "REF_forces", "stress": …}. Once a
    key is named (a default name too), only the labels named in `keys` are read (a named energy never picks up
    the file's default `forces`/`stress`, which may belong to another level of theory); label-like keys left
    unread are named in one warning. With named keys, frames carrying none of them are skipped (a file with one
    label set per level of theory, e.g. REF_energy_PBE on every frame and REF_energy_R2SCAN on some, read once
    per fidelity) and counted in the log; with no keys, or when no frame has them, a frame without labels is an
    error. A stress key naming a virial (`virial`, `REF_virials`: eV, W = −σ·V) is converted
    to stress, σ = −W / V. `fidelity_key` (e.g. MACE's head): the info key naming each frame's fidelity instead of
    info['fidelity'] (a frame naming both differently is an error). MACE's per-frame weights 0 drop labels
    (MaceWeights); `free_atoms` keeps free atoms' energies whatever their weight (data.atomic_energies: isolated).
    """
    path = Path(path)
    src = str(path)
    if path.is_dir():
        raise MultifiError(f"{src}: is a folder, expected a structure file or a saved dataset (multifi data convert)")
    if not path.is_file():
        raise MultifiError(f"{src}: no such file")
    if path.stat().st_size == 0:
        raise MultifiError(f"{src}: empty file")
    records, invalid = [], InvalidLabels(src)
    named = bool(keys)  # labels chosen by name (default names too): frames without them are skipped
    keys = label_keys(keys)
    unlabelled: list[str] = []  # errors of frames without the named labels (skipped)
    unread: dict[str, None] = {}  # label-like keys of the file that no label was read from
    parsed: dict[str, None] = {}  # fidelity names ASE turned into numbers or booleans
    heads: dict[str, None] = {}  # MACE's info['head'] of frames naming no fidelity
    per_atom_only = 0  # frames with per-atom energies (arrays['energies']) and no total energy read
    no_energy = 0  # other frames with forces or stress but no energy: trained on those alone
    charged = {"charge": 0, "spin": 0}  # frames with a net charge / a spin state the model cannot see
    weights = MaceWeights(src, free_atoms)  # MACE's per-frame weights: 0 drops a label, others are said not to apply
    kinds_read: set[str] = set()  # label kinds the file gave (before weights dropped any)
    conflicts: list[tuple] = []  # (frame, {kind: (info value, calculator value)}) where the two differ
    for i, atoms in enumerate(read_frames(path, index, stress_key=keys.get("stress"))):
        for kind, flagged in _charge_and_spin(atoms.info).items():
            charged[kind] += flagged
        tag = frame_tag(i, index)
        if fidelity_key not in (None, "fidelity") and fidelity_key in atoms.info:
            _fidelity_from(atoms, fidelity_key, f"{src}: {tag}")
        unread.update(dict.fromkeys(_label_like(atoms, keys)))
        if not isinstance(atoms.info.get("fidelity", ""), str):
            parsed.setdefault(str(atoms.info["fidelity"]), None)
        if from_multifi_calculator(atoms) and not named:
            raise MultifiError(
                f"{src}: {tag} holds results of multifi's calculator (a trajectory of an MD run or relaxation with "
                "a multifi model), not reference labels; to score the model on these geometries, label them with "
                "the reference method, or name energy_key/forces_key to take the results as labels on purpose"
            )
        if PREDICTION_MARK in atoms.info and not named:
            raise MultifiError(
                f"{src}: {tag} holds predictions of `multifi predict` ({atoms.info[PREDICTION_MARK]}), not labels; "
                "its input's labels are ref_energy / ref_forces / ref_stress: read them with energy_key: ref_energy "
                "(forces_key: ref_forces, …), or name energy_key: energy (forces_key: forces) to take the predictions as labels"
            )
        try:
            rec = _record(atoms, fidelity, f"{src}: {tag}", keys)
        except _NoLabel as exc:
            if not named:
                raise MultifiError(str(exc)) from None
            unlabelled.append(str(exc))
            continue
        if "head" in atoms.info and "fidelity" not in atoms.info and PREDICTION_MARK not in atoms.info:
            heads.setdefault(str(atoms.info["head"]), None)  # of frames whose labels were read
            if len(heads) > 1 and not _keys_name_a_head(keys, heads) and _mace_keys(keys, named):
                raise MultifiError(  # several levels of theory under the same label keys
                    f"{src}: {tag}: its frames name several MACE heads in info['head'] ({', '.join(heads)}) and no "
                    "info['fidelity']: read the heads as fidelities with fidelity_key: head (--fidelity-key head), or "
                    "one source per level of theory, or label keys of one level (energy_key: REF_energy_<head>)"
                )
        has_energy = any("energy" in lab for lab in rec["labels"].values())  # in the file (weights aside)
        kinds_read.update(kind for lab in rec["labels"].values() for kind in lab)
        mace = _mace_keys(keys, named) and PREDICTION_MARK not in atoms.info
        if mace and not weights.apply(atoms.info, rec, keys, is_free_atom(atoms)):
            continue  # every label weighted 0
        rec["name"] = frame_number(i, index)  # errors of from_records name the file's frame (or the selection's)
        if "conflicts" in rec:
            conflicts.append((tag, rec.pop("conflicts")))
        per_atom = "energies" in atoms.arrays or "energies" in (getattr(atoms.calc, "results", None) or {})
        per_atom_only += per_atom and not has_energy
        if invalid.keep(rec, tag):
            records.append(rec)
            no_energy += not per_atom and not has_energy
    _warn_unread(src, keys, unread, kinds_read if records else set(), named)
    _warn_two_values(src, conflicts, len(records), keys)
    weights.report()
    if not records and weights.frames_dropped:
        raise MultifiError(
            f"{src}: every frame's labels are weighted 0 (MACE's config_weight, config_energy_weight, …)"
        )
    if len(heads) > 1 and not _keys_name_a_head(keys, heads):  # (not MACE's keys: a warning, not the error above)
        log.warning(
            "%s: its frames name several heads in info['head'] (%s), read as one fidelity", src, ", ".join(heads)
        )
    elif not _keys_name_a_head(keys, heads):
        _warn_head_renamed(src, heads, fidelity)
    if no_energy:
        (log.warning if no_energy < len(records) else log.info)(  # a forces-only file: said, not warned
            "%s: %d of %d frames have forces or stress but no %s label: they train forces and stress only, and "
            "count in no energy error (an energy lost on the way? an extxyz written without it?)",
            src,
            no_energy,
            len(records),
            keys.get("energy") or "energy",
        )
    if per_atom_only:
        log.warning(
            "%s: %d frame(s) have per-atom energies (arrays['energies']) and no total energy: per-atom energies are "
            "not read; give each frame's total (their sum) as info['energy'] to train on energies",
            src,
            per_atom_only,
        )
    if parsed:
        log.warning(
            "%s: info['fidelity'] read as %s, not text (ASE's extxyz reader makes 1, 01, T, True, 1e3 numbers or "
            "booleans, quoted or not, so '01' and '1' become one name); give each fidelity a name with a letter "
            "in it (fidelity=DFT01)",
            src,
            ", ".join(list(parsed)[:4]),
        )
    if charged["charge"] or charged["spin"]:
        log.warning(
            "%s: %d frame(s) carry a net charge and %d a spin state other than a singlet (info['charge'], "
            "['spin'], ['multiplicity']): the model has no charge or spin input and trains on them as if neutral "
            "singlets (one geometry in two charge states gets one prediction); keep one charge and spin state "
            "per fidelity, or leave them out",
            src,
            charged["charge"],
            charged["spin"],
        )
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


def _charge_and_spin(info: dict) -> dict[str, bool]:
    """Whether a frame's info names a net charge (charge, total_charge ≠ 0) or a spin state other than a
    singlet: spin, total_spin, multiplicity, spin_multiplicity not 1 (fairchem's `spin` and MACE's
    `total_spin` are multiplicities, 1 for a singlet) and not 0 (a total spin S of 0, also a singlet)."""

    def number(*names):
        for name in names:
            try:
                return float(info[name])
            except (KeyError, TypeError, ValueError):
                continue
        return None

    charge = number("charge", "total_charge")
    spin = number("spin", "total_spin", "multiplicity", "spin_multiplicity")
    return {"charge": charge is not None and charge != 0, "spin": spin is not None and spin not in (0, 1)}


DEFAULT_KEYS = {"energy": "energy", "forces": "forces", "stress": "stress"}
#: info key `multifi predict` marks its output frames with: their energy/forces/stress are predictions, the
#: input's labels are under ref_energy / ref_forces / ref_stress at info['ref_fidelity']
PREDICTION_MARK = "predicted_by"
#: the name multifi's ASE calculator gives itself: trajectories (.traj) and databases keep it with the results
CALCULATOR_NAME = "multifi"


def from_multifi_calculator(atoms) -> bool:
    """Whether a frame's results were left by multifi's calculator (a trajectory or database of an MD run or a
    relaxation): predictions, not reference labels."""
    return getattr(atoms.calc, "name", None) == CALCULATOR_NAME


def label_keys(keys: dict[str, str] | None) -> dict[str, str]:
    """The labels to read, kind → key. No keys: all three under their default names. Once one is named (a
    default name given explicitly too), only those named: a file's other labels may be another level of theory."""
    keys = dict(keys or {})
    return keys if keys else dict(DEFAULT_KEYS)


def _kind(key: str) -> str | None:
    low = key.lower()
    if "weight" in low:  # MACE's config_energy_weight, config_forces_weight: weights, not labels (MaceWeights)
        return None
    if "virial" in low or "stress" in low:
        return "stress"
    return next((k for k in ("energy", "force") if k in low), None)


def _label_like(atoms, keys: dict[str, str]) -> list[str]:
    """Keys of info, arrays and calculator results that look like labels and are not being read."""
    results = getattr(atoms.calc, "results", None) or {}
    read = set(keys.values())
    return [k for k in [*atoms.info, *atoms.arrays, *results] if k not in read and _kind(k)]


def _warn_unread(src: str, keys: dict[str, str], unread: dict, got: set[str], named: bool = True) -> None:
    """One warning naming label-like keys nothing was read from, when their kind was not read at all (a
    renamed energy without forces_key; REF_forces beside default keys that found no forces; a virial); with the
    default keys (not `named`), MACE's REF_* keys beside default labels that were read are named in a warning of
    their own (a calculator's results read where the file's reference labels are REF_*). `got`: the label kinds read
    (empty: nothing read)."""
    if not got:
        return
    mace = [k for k in unread if str(k).upper().startswith("REF_")] if not named else []
    if mace:
        kinds = {{"force": "forces"}.get(_kind(k), _kind(k)) for k in mace}
        log.warning(
            "%s: read the default labels (%s: info, arrays or a calculator's results); the file also holds %s, "
            "MACE's keys for reference labels: if those are this source's labels, name them (%s)",
            src,
            "/".join(sorted(got)),
            ", ".join(mace[:6]),
            ", ".join(
                f"{kind}_key: {next(k for k in mace if {'force': 'forces'}.get(_kind(k), _kind(k)) == kind)}"
                for kind in ("energy", "forces", "stress")
                if kind in kinds
            ),
        )
    missing = [k for k in unread if k not in mace and {"force": "forces"}.get(_kind(k), _kind(k)) not in got]
    if not missing:
        return
    shown = ", ".join(f"{k}: {v}" for k, v in keys.items())
    log.warning(
        "%s: read only the labels named (%s); not read: %s. Name a key if it holds labels of this source's level "
        "of theory (energy_key / forces_key / stress_key; a virial is converted to stress)",
        src,
        shown,
        ", ".join(missing[:6]) + (" …" if len(missing) > 6 else ""),
    )


#: MACE's per-frame weight keys (mace.data.utils.config_from_atoms), by the labels they weigh ("all": every label of
#: the frame); config_stress_weight weighs a stress read, config_virials_weight a virial read (MACE weighs both apart)
MACE_WEIGHTS = {
    "all": "config_weight",
    "energy": "config_energy_weight",
    "forces": "config_forces_weight",
    "stress": "config_stress_weight",
    "virials": "config_virials_weight",
}


def _mace_keys(keys: dict[str, str], named: bool) -> bool:
    """Whether labels are read the way MACE's training files hold them: default keys, or REF_* keys (MACE's); not
    predictions read back (MACE_energy of MACE's eval script, a renamed prediction) or other named keys."""
    return not named or any(str(v).upper().startswith("REF_") for v in keys.values())


class MaceWeights:
    """MACE's per-frame weights in info (config_energy_weight=0 keeps a label out of MACE's loss): a weight 0 drops that
    label here too (a frame whose labels are all dropped is skipped), counted in one warning; other weights are not
    applied (multifi weighs fidelities, loss.fidelity_weights, not frames), said in one warning. `free_atoms`: keep
    the energy of free atoms (one-atom frames, isolated_atoms' sense) whatever their weight: MACE's E0 frames, weighted
    0 and read as atomic energies (data.atomic_energies: isolated)."""

    def __init__(self, src: str, free_atoms: bool = False):
        self.src = src
        self.free_atoms = free_atoms
        self.dropped = {"energy": 0, "forces": 0, "stress": 0}
        self.frames_dropped = 0
        self.free_dropped = 0  # free atoms among the frames dropped
        self.free_kept = 0  # free atoms weighted 0 whose energy was kept (free_atoms)
        self.other: dict[str, None] = {}

    def apply(self, info: dict, rec: dict, keys: dict[str, str], free_atom: bool = False) -> bool:
        """Drop rec's labels weighted 0 in place; False when no label is left. `keys`: the label keys read (a stress
        read from a virial key answers to config_virials_weight, else to config_stress_weight); `free_atom`: the
        frame is a free atom (its energy kept when free_atoms)."""
        virial = "virial" in str(keys.get("stress", "")).lower()
        keep_energy, kept = free_atom and self.free_atoms, False
        for kind, name in MACE_WEIGHTS.items():
            if name not in info or (kind == "stress" and virial) or (kind == "virials" and not virial):
                continue
            try:
                w = float(info[name])
            except (TypeError, ValueError):
                continue
            label = "stress" if kind == "virials" else kind
            if w == 0:
                for lab in rec["labels"].values():
                    for k in [k for k in lab if label in ("all", k)]:
                        if keep_energy and k == "energy":
                            kept = True
                            continue
                        del lab[k]
                        self.dropped[k] += 1
            elif w != 1:
                self.other.setdefault(name, None)
        self.free_kept += kept
        rec["labels"] = {fid: lab for fid, lab in rec["labels"].items() if lab}
        if not rec["labels"]:
            self.frames_dropped += 1
            self.free_dropped += free_atom
            return False
        return True

    def report(self) -> None:
        if any(self.dropped.values()):
            free = (
                f" ({self.free_dropped} of them free atoms, MACE's E0 frames: data.atomic_energies: isolated takes "
                "them as atomic energies)"
                if self.free_dropped
                else ""
            )
            log.warning(
                "%s: labels weighted 0 by MACE's per-frame weights (config_weight, config_energy_weight, …) left out: %s%s",
                self.src,
                ", ".join(f"{n} {kind}" for kind, n in self.dropped.items() if n),
                f"; {self.frames_dropped} frame(s) without any label left skipped{free}" if self.frames_dropped else "",
            )
        if self.free_kept:
            log.info(
                "%s: %d free-atom energies weighted 0 (MACE's E0 frames) read for data.atomic_energies: isolated",
                self.src,
                self.free_kept,
            )
        if self.other:
            log.warning(
                "%s: MACE's per-frame weights other than 0 and 1 (%s) are not applied: multifi weighs the loss per "
                "fidelity (loss.fidelity_weights) and per label kind (loss.energy, loss.forces, loss.stress), not "
                "per frame",
                self.src,
                ", ".join(self.other),
            )


def _fidelity_from(atoms, key: str, where: str) -> None:
    """info['fidelity'] ← info[key] (a source's fidelity_key, e.g. MACE's head); one naming another is an error."""
    value, own = str(atoms.info[key]).strip(), atoms.info.get("fidelity")
    if own is not None and str(own) != value:
        raise MultifiError(f"{where}: info[{key!r}] names {value!r} and info['fidelity'] {str(own)!r}: which one?")
    if not value:
        raise MultifiError(f"{where}: info[{key!r}] is empty (fidelity_key: {key})")
    atoms.info["fidelity"] = value


def _keys_name_a_head(keys: dict[str, str], heads: dict) -> bool:
    """Whether a label key names one of the heads (REF_energy_pbe): the key, not info['head'], picks the level."""
    return any(
        re.search(rf"(?<![A-Za-z0-9]){re.escape(str(h))}(?![A-Za-z0-9])", str(v), re.IGNORECASE)
        for h in heads
        for v in keys.values()
        if str(h)
    )


def _warn_head_renamed(src: str, heads: dict, fidelity: str | None) -> None:
    """Frames naming one MACE head (info['head']) read as a fidelity of another name (the source's): said once,
    unless the head is MACE's unnamed 'Default'."""
    head = next(iter(heads), None)
    if head is not None and fidelity is not None and head.lower() not in (str(fidelity).lower(), "default"):
        log.warning(
            "%s: its frames name the MACE head %r (info['head']) and are read as fidelity %r (the source's); if "
            "they are that head's level of theory under another name, nothing to do",
            src,
            head,
            fidelity,
        )


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
                f"fix the data or {SKIP_INVALID_HINT}"
            )


def frame_key(atoms) -> str:
    """The key read_ase gives the structure of a frame: info['key'], else (none, or empty) its geometry hash
    (geometry_key)."""
    if atoms.info.get("key") is not None and str(atoms.info["key"]):
        return str(atoms.info["key"])
    cell = atoms.cell.array if atoms.pbc.any() else None
    return geometry_key(np.asarray(atoms.numbers, np.int64), np.asarray(atoms.positions, np.float64), cell)


def read_frames(path: Path, index: str, stress_key: str | None = None) -> Iterator:
    """Atoms from the file, turning any reader failure into a one-line MultifiError. `stress_key`: the stress label
    read (extxyz `stress="…"` is checked for symmetry when it is "stress", see check_stress_values)."""
    from ase.io.formats import UnknownFileTypeError, filetype

    if path.is_file() and path.stat().st_size == 0:  # as read_ase says it (ASE: "not a format it can read")
        raise MultifiError(f"{path}: empty file")
    try:
        fmt = filetype(str(path))
    except Exception as exc:  # UnknownFileTypeError, or whatever a format sniffer trips over
        raise MultifiError(f"{path}: not a file format ASE can read ({_gist(exc)})") from None
    n = 0  # frames delivered so far = number of the frame that fails
    try:
        frames = (
            _db_frames(path, index) if fmt in ("db", "json") else _text_frames(path, fmt, index, stress_key == "stress")
        )
        for atoms in frames:
            yield atoms
            n += 1
    except MultifiError:
        raise
    except UnknownFileTypeError as exc:
        raise MultifiError(f"{path}: not a file format ASE can read ({_gist(exc)})") from None
    except Exception as exc:  # ASE raises many types (XYZError, ValueError, KeyError, …) on bad files
        raise MultifiError(f"{path}: unreadable or truncated at frame {n} (0-based) ({_gist(exc)})") from None
    if n == 0:  # e.g. a file of blank lines, which ASE reads as no frames
        raise MultifiError(f"{path}: no structures (index {index!r})")


def _text_frames(path: Path, fmt: str, index: str, stress_read: bool = False) -> Iterator:
    """ase.io.iread, but a compressed file is decompressed into memory first (ASE's extxyz reader seeks,
    which on a gzip stream re-decompresses from the start: quadratic time). An extxyz file's `stress="…"` values
    are checked first (check_stress_values; for symmetry when `stress_read`), and a text file that does not end
    with a newline is said to (warn_if_cut_short)."""
    import io

    import ase.io

    opener = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}.get(path.suffix.lower())
    if opener is None:
        if fmt == "extxyz":
            import mmap

            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
                check_stress_values(raw, path, stress_read)
        yield from ase.io.iread(str(path), index=index)
        if fmt in TEXT_FORMATS:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                warn_if_cut_short(path, f.read(1).decode("latin-1"))
        return
    import importlib

    with importlib.import_module(opener).open(path, "rb") as f:
        raw = f.read()
    if fmt == "extxyz":
        check_stress_values(raw, path, stress_read)
    last = raw[-1:].decode("latin-1")
    text = io.StringIO(raw.decode("utf-8"))  # strictly, as a plain file is read (a UnicodeDecodeError: one line)
    del raw
    yield from ase.io.iread(text, index=index, format=fmt)
    if fmt in TEXT_FORMATS:
        warn_if_cut_short(path, last)


_STRESS_3X3 = re.compile(rb'stress="([^"]*)"')


def check_stress_values(raw, path: Path, symmetric: bool = True, chunk: int = 65536) -> None:
    """An extxyz file's `stress="…"` values, ahead of ASE (one-line errors naming the line): 6 values, on which ASE
    fails with a message about a "special 3x3 matrix", and (`symmetric`: the key stress is read) a 3×3 that is not
    symmetric, which ASE turns into Voigt form from one triangle alone, without a word. `raw`: the file's bytes (or
    a memory map of them); the 3×3 values are parsed and compared `chunk` stresses at a time."""
    starts, texts = [], []
    for match in _STRESS_3X3.finditer(raw):
        start = match.start()
        if start and raw[start - 1 : start] not in (b" ", b"\t", b"\n"):  # REF_stress=, my_stress=: another key
            continue
        values = _VALUE.findall(match.group(1))  # separated by spaces or commas, as ASE reads them
        if len(values) == 6:
            raise MultifiError(
                f"{path}: line {_line_of(raw, start)}: stress has 6 values; ASE reads the extxyz key stress as a 3×3 "
                "matrix only: write its 9 values row by row, or keep the 6 (xx yy zz yz xz xy) under another key and "
                "name it (stress_key)"
            )
        if symmetric and len(values) == 9:  # (a malformed list: ASE's reader says what is wrong)
            starts.append(start)
            texts.append(b" ".join(values))
            if len(texts) == chunk:
                _check_symmetric(raw, path, starts, texts)
                starts, texts = [], []
    _check_symmetric(raw, path, starts, texts)


_VALUE = re.compile(rb"[^\s,]+")


def _check_symmetric(raw, path: Path, starts: list[int], texts: list[bytes]) -> None:
    """The stresses `texts` (9 values each, at byte offsets `starts` of `raw`) are symmetric (symmetric_stress's
    one-line error for the first that is not). A text that is no number list is left to ASE's reader."""
    if not texts:
        return
    try:
        s = np.array(b" ".join(texts).split(), dtype=np.float64).reshape(-1, 3, 3)
    except ValueError:  # some value is no number: one by one, skipping those
        for start, text in zip(starts, texts):
            try:
                one = np.array(text.split(), dtype=np.float64).reshape(3, 3)
            except ValueError:
                continue
            symmetric_stress(one, f"{path}: line {_line_of(raw, start)}")
        return
    finite = np.isfinite(s) & np.isfinite(s.transpose(0, 2, 1))
    gap = np.where(finite, np.abs(s - s.transpose(0, 2, 1)), 0.0).max(axis=(1, 2))
    size = np.abs(np.where(np.isfinite(s), s, 0.0)).max(axis=(1, 2))
    bad = np.flatnonzero(gap > STRESS_ASYMMETRY * (1 + size))
    if len(bad):
        symmetric_stress(s[bad[0]], f"{path}: line {_line_of(raw, starts[bad[0]])}")


def _line_of(raw, offset: int) -> int:
    """1-based line number of byte `offset`."""
    return bytes(raw[:offset]).count(b"\n") + 1


#: ASE formats of text files whose last line a cut could shorten unnoticed (warn_if_cut_short)
TEXT_FORMATS = ("extxyz", "xyz")


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
    if named is not None and (problem := name_problem(named)):
        raise MultifiError(f"{where}: {problem} ({field}); two names that print alike would be two fidelities")
    if not fid:
        raise NoFidelityError(
            f"{where}: no fidelity: set {field}, or give the source one ('fidelity:' in the config, "
            "--fidelity on the command line)"
        )
    return fid


def frame_tag(i: int, index: str = ":") -> str:
    """'frame N (0-based)': the file's frame number of the i-th frame ASE's `index` selects where the index says it
    (frame_number), else the i-th of the selection, named so."""
    n = frame_number(i, index)
    return f"frame {n} (0-based)" if isinstance(n, int) else f"frame {i} (0-based, of index {index!r})"


def frame_number(i: int, index: str = ":") -> int | str:
    """The file's frame number of the i-th frame ASE's `index` selects, where the index says it without counting
    the file (an integer or a slice from a non-negative start, forward); else 'i of index …' (text)."""
    try:
        parts = [int(p) if p.strip() else None for p in index.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] is not None and parts[0] >= 0:
        return parts[0]
    if 2 <= len(parts) <= 3:
        start, step = parts[0] or 0, (parts[2] if len(parts) == 3 else None) or 1
        if start >= 0 and step > 0:
            return start + i * step
    return f"{i} of index {index!r}"


def _get(first: dict, then: dict, key: str | None):
    return None if key is None else first.get(key, then.get(key))


#: per-atom arrays of ase.Atoms that are no labels
ATOMS_ARRAYS = ("positions", "numbers", "momenta", "masses", "tags", "initial_magmoms", "initial_charges")


def _check_key_kinds(atoms, results: dict, keys: dict[str, str], where: str) -> None:
    """A label key naming the wrong kind of entry is an error: forces or stress keys naming the atoms' own arrays
    (positions, …), a forces key naming a per-frame value (info), an energy or stress key naming a per-atom array."""
    for kind, key in keys.items():
        if key in results:
            continue
        if key in ATOMS_ARRAYS:
            raise MultifiError(f"{where}: {kind}_key {key!r} names the atoms' {key}, not {kind} labels")
        if kind == "forces" and key in atoms.info:
            raise MultifiError(f"{where}: forces_key {key!r} names a value per frame (info), not forces per atom")
        if kind != "forces" and key in atoms.arrays and key not in atoms.info:
            raise MultifiError(f"{where}: {kind}_key {key!r} names an array per atom, not {kind} per frame")


def _two_values(first: dict, then: dict, key: str | None) -> tuple | None:
    """(first's, then's) value of `key` where both hold one and they differ (an info/arrays entry and the
    attached calculator's result: _get reads the first), else None."""
    if key is None or key not in first or key not in then:
        return None
    try:
        a, b = np.asarray(first[key], dtype=np.float64), np.asarray(then[key], dtype=np.float64)
        same = a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6)
    except (TypeError, ValueError):
        same = False
    return None if same else (first[key], then[key])


def _stress_from_virial(virial: np.ndarray, atoms, where: str, key: str) -> np.ndarray:
    """σ = −W / V (eV/Å³) from a virial W (eV), as extxyz files for GAP, ACE, NequIP and MACE carry it."""
    if not atoms.pbc.all():
        raise MultifiError(f"{where}: {key} is a virial, which needs a cell periodic in 3 dimensions (a volume)")
    return -virial / abs(atoms.cell.volume)


def _warn_two_values(src: str, conflicts: list[tuple], n: int, keys: dict[str, str]) -> None:
    """One warning for frames holding a label twice with different values, info/arrays and the calculator's."""
    if not conflicts:
        return
    tag, first = conflicts[0]
    kind, (a, b) = next(iter(first.items()))
    kinds = sorted({k for _, c in conflicts for k in c})  # kinds read (keys names them)
    where = {k: f"{'arrays' if k == 'forces' else 'info'}[{keys[k]!r}]" for k in kinds}
    shown = f": {float(a):.6g} and {float(b):.6g} eV" if kind == "energy" else ""
    log.warning(
        "%s: %d of %d frames hold %s and different values in their calculator's results (%s%s): %s read; keep "
        "one of the two in the file",
        src,
        len(conflicts),
        n,
        " and ".join(where[k] for k in kinds),
        tag,
        shown,
        " and ".join(where[k] for k in kinds),
    )


class _NoLabel(MultifiError):
    """A frame carries none of the labels looked up."""


def _other_labels(atoms, keys: dict[str, str]) -> str:
    """A hint naming label-like keys the structure has under other names (REF_energy, DFT_forces, …)."""
    found = [k for k in [*atoms.info, *atoms.arrays] if _kind(k) and k not in keys.values()]
    if not found:
        return ""
    if keys != DEFAULT_KEYS:  # keys already chosen: another key may be another level of theory
        return f"; it has {', '.join(found[:3])} (labels of another level of theory belong to a source of their own)"
    which = {"energy": "energy_key", "force": "forces_key", "stress": "stress_key"}
    return "; it has " + ", ".join(f"{k} (set {which[_kind(k)]}: {k})" for k in found[:3])


def _fidelity_field(info: dict, keys: dict[str, str]) -> str | None:
    """Where a frame's labels name their fidelity: info['fidelity'], or in a `multifi predict` output (its
    energy/forces/stress are predictions at info['fidelity']) info['ref_fidelity'] for the input's labels
    (ref_energy, …, and keys predict does not write, e.g. REF_energy), and None (the source's fidelity) for
    per-fidelity columns, ref_energy_<fidelity> or energy_<fidelity>, whose suffix is a fidelity's tag."""
    if PREDICTION_MARK not in info or all(v in DEFAULT_KEYS.values() for v in keys.values()):
        return "info['fidelity']"
    if any(re.fullmatch(r"(ref_)?(energy|forces|stress)_.+", v) for v in keys.values()):
        return None
    return "info['ref_fidelity']"


def _record(atoms, fidelity: str | None, where: str, keys: dict[str, str] | None = None) -> dict:
    """One from_records record: geometry, key and {fidelity: labels} (eV, eV/Å, GPa)."""
    from ase.units import GPa

    keys = label_keys(keys)
    n = len(atoms)
    field = _fidelity_field(atoms.info, keys)
    named = atoms.info.get(field[6:-2]) if field else None
    if field is None and fidelity is None:
        raise NoFidelityError(
            f"{where}: the labels {'/'.join(keys.values())} of this `multifi predict` output belong to the fidelity "
            "their key's suffix names: give it as the source's fidelity ('fidelity:', --fidelity)"
        )
    results = getattr(atoms.calc, "results", None) or {}
    _check_key_kinds(atoms, results, keys, where)
    lab = {}
    conflicts = {  # label kind → (info/arrays value, calculator value) where they differ
        kind: pair
        for kind, where_first in (("energy", atoms.info), ("forces", atoms.arrays), ("stress", atoms.info))
        if (pair := _two_values(where_first, results, keys.get(kind))) is not None
    }
    energy = _get(atoms.info, results, keys.get("energy"))
    if energy is not None:
        try:
            lab["energy"] = float(energy)
        except (TypeError, ValueError):
            raise MultifiError(f"{where}: energy {energy!r} is not a number") from None
    forces = _get(atoms.arrays, results, keys.get("forces"))
    if forces is not None:
        lab["forces"] = np.asarray(forces, dtype=np.float64)
        if lab["forces"].shape != (n, 3):
            raise MultifiError(f"{where}: forces have shape {lab['forces'].shape}, expected ({n}, 3)")
    stress = _get(atoms.info, results, keys.get("stress"))
    if stress is not None:
        sigma = symmetric_stress(voigt_or_matrix(stress, where), where)  # eV/Å³ (eV for a virial)
        if "virial" in keys["stress"].lower():
            sigma = _stress_from_virial(sigma, atoms, where, keys["stress"])
        lab["stress"] = sigma / GPa
    if not lab:
        wanted = "/".join(keys.values())
        raise _NoLabel(f"{where} has no {wanted} label" + _other_labels(atoms, keys))
    try:  # after the labels: a file of none says so
        fid = source_fidelity(named, fidelity, where, field or "the source")
    except NoFidelityError as exc:
        read = field[6:-2] if field else None  # the key a fidelity is read from
        alike = [k for k in atoms.info if read and k != read and str(k).strip().lower() == read]
        if alike:  # Fidelity=, FIDELITY= where 'fidelity' is read
            raise NoFidelityError(
                f"{exc}; it has info[{alike[0]!r}] = {str(atoms.info[alike[0]])!r}: the key read is {read!r} "
                "(lower case)"
            ) from None
        if atoms.info.get("head") in (None, ""):  # (config_type is a kind of structure, not a method)
            raise
        raise NoFidelityError(  # MACE's multi-head files name the level of theory in info['head']
            f"{exc}; it has info['head'] = {str(atoms.info['head'])!r}: read the heads as fidelities with "
            "fidelity_key: head (--fidelity-key head), or each head as a source of its own with 'fidelity:'"
        ) from None
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
    if conflicts:
        rec["conflicts"] = conflicts  # read_ase says them (and drops this entry)
    return rec
