"""Atomic energies as reference energies (MACE's E0s): the energy of each free atom, per fidelity.

By default a fidelity's reference energies are fitted by least squares to its labels (a per-element energy that
absorbs the average bonding). Given atomic energies instead (`data.atomic_energies`: a table per fidelity, or
`isolated`: the one-atom frames of the data, MACE's `IsolatedAtom` frames), a fidelity's references are those
energies plus one shift per atom fitted to its labels (their mean binding energy per atom, MACE's shift), and the
model learns binding energies, which differ between levels of theory less than total energies. An element
with an atomic energy at a fidelity but no labels there then has a reference that is known, not estimated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from multifi.data.isolated import ISOLATED_IMAGE_DISTANCE, isolated_atoms
from multifi.data.stats import N_ELEMENTS, composition_matrix
from multifi.errors import MultifiError

log = logging.getLogger("multifi")

#: `data.atomic_energies: isolated`: take them from the data's one-atom frames
ISOLATED = "isolated"
#: eV: one-atom frames of one element and fidelity that differ by more than this are refused (spin states?)
AGREE_EV = 1e-3
#: eV: a table's atomic energy farther than this from a one-atom frame of the same element and fidelity in the data
#: is said (a unit, a typo, another spin state?)
TABLE_FRAME_EV = 0.05
#: eV per atom: binding energies beyond this (cohesive and atomization energies stay below ~10) mean atomic energies
#: in another unit than the labels (Hartree, kcal/mol) or of another method
MAX_BINDING_EV = 25.0


@dataclass
class AtomicEnergies:
    """values [N_ELEMENTS, K] eV (NaN: not given) per fidelity of a dataset; frames [n]: the one-atom structures they
    were read from (`isolated`; they are references, not training data), empty for a table."""

    values: np.ndarray
    frames: np.ndarray
    isolated: bool = False  # read from the data's one-atom frames (ISOLATED), not a table

    def given(self, k: int) -> np.ndarray:
        """[N_ELEMENTS] bool: elements with an atomic energy at fidelity k."""
        return ~np.isnan(self.values[:, k])


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def resolve_atomic_energies(setting, dataset, where: str = "config", left_out=frozenset()) -> AtomicEnergies | None:
    """The atomic energies a `data.atomic_energies` setting gives for `dataset` (FidelityDataset): None (not set),
    ISOLATED (its one-atom frames' energy labels, which must agree per element and fidelity), or
    {fidelity: {element symbol: eV}} (fidelities named as in the data; those in `left_out`, fidelities of the
    sources that data.fidelities leaves out, are passed over), or the path of a YAML/JSON file holding that table."""
    if setting is None:
        return None
    if isinstance(setting, str) and setting != ISOLATED:
        setting = read_table(setting)
    names, K = list(dataset.fidelities.names), len(dataset.fidelities)
    values = np.full((N_ELEMENTS, K), np.nan)
    prefix = f"{where}: data.atomic_energies"
    frames = np.flatnonzero(isolated_atoms(dataset))
    free = _free_atom_energies(dataset, frames, f"{prefix}: isolated")
    if setting == ISOLATED:
        return AtomicEnergies(free, frames, isolated=True)
    for name, table in setting.items():
        if name in left_out:
            continue
        if name not in dataset.fidelities:
            raise MultifiError(f"{prefix}: no fidelity {name!r} in the data (fidelities: {', '.join(names)})")
        for key, energy in table.items():
            element = _element(key)
            if not element:
                raise MultifiError(f"{prefix}: {name}: {key!r} is no element (a symbol, or an atomic number as MACE's)")
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not np.isfinite(energy):
                raise MultifiError(f"{prefix}: {name}: {key}: {energy!r} is no energy in eV")
            values[element, names.index(name)] = float(energy)
    _compare_with_frames(values, free, names, prefix)
    return AtomicEnergies(values, np.zeros(0, np.int64))


def _element(key) -> int:
    """The atomic number of a table's key: a symbol (H) or an atomic number (1, '1'; MACE's E0s); 0 if neither."""
    from ase.data import atomic_numbers

    text = str(key).strip()
    if text.isdigit():
        return int(text) if 0 < int(text) < N_ELEMENTS else 0
    return atomic_numbers.get(text, 0)


def _free_atom_energies(dataset, frames: np.ndarray, prefix: str) -> np.ndarray:
    """[N_ELEMENTS, K] eV (NaN: none): the energy labels of the one-atom frames `frames` per element and fidelity,
    which must agree within AGREE_EV."""
    names = dataset.fidelities.names
    out = np.full((N_ELEMENTS, len(names)), np.nan)
    z = np.asarray(dataset.numbers)[np.asarray(dataset.offsets)[frames]]
    for k in range(len(names)):
        e = np.asarray(dataset.energy)[frames, k]
        for element in np.unique(z[~np.isnan(e)]).tolist():
            found = e[(z == element) & ~np.isnan(e)]
            if found.max() - found.min() > AGREE_EV:
                raise MultifiError(
                    f"{prefix}: {len(found)} one-atom frames of {_symbol(element)} at {names[k]} disagree "
                    f"({found.min():.4f} to {found.max():.4f} eV); keep one (spin state?) or give a table"
                )
            out[element, k] = float(found.mean())
    return out


def _compare_with_frames(table: np.ndarray, free: np.ndarray, names, prefix: str) -> None:
    """Warn where a table's atomic energy lies more than TABLE_FRAME_EV from a one-atom frame of the data at the same
    element and fidelity (a unit, a typo, another spin state)."""
    both = ~np.isnan(table) & ~np.isnan(free)
    for z, k in np.argwhere(both & (np.abs(np.nan_to_num(table - free)) > TABLE_FRAME_EV)).tolist():
        ratio = free[z, k] / table[z, k] if table[z, k] else np.inf
        log.warning(
            "%s: %s: %s %.6g eV, but the data's one-atom frame of %s at %s has %.6g eV (%.4g×): a unit (Hartree is "
            "27.21 eV), a typo or another spin state? (isolated takes the frames)",
            prefix,
            names[k],
            _symbol(z),
            table[z, k],
            _symbol(z),
            names[k],
            free[z, k],
            ratio,
        )


def as_table(atomic: AtomicEnergies, names) -> dict[str, dict[str, float]]:
    """{fidelity: {element symbol: eV}} of the atomic energies given (a run's record of them)."""
    return {
        name: {_symbol(int(z)): float(atomic.values[z, k]) for z in np.flatnonzero(~np.isnan(atomic.values[:, k]))}
        for k, name in enumerate(names)
        if not np.isnan(atomic.values[:, k]).all()
    }


def check_unchanged(recorded: dict, now: dict, where: str) -> None:
    """A resume's atomic energies are those its run started with (its checkpoint's references are made of them): a
    one-line error naming the first that changed (a table file edited since)."""
    for name in sorted(set(recorded) | set(now)):
        before, after = recorded.get(name, {}), now.get(name, {})
        for element in sorted(set(before) | set(after)):
            if before.get(element) != after.get(element):
                raise MultifiError(
                    f"{where}: data.atomic_energies changed since the run started ({name} {element}: "
                    f"{before.get(element, 'none')} → {after.get(element, 'none')} eV); the run's references are made "
                    "of the old ones: restore them, or start a new run"
                )


def read_table(path: str) -> dict:
    """{fidelity: {element: eV}} from a YAML or JSON file; a one-line error naming the file otherwise."""
    import yaml

    try:
        table = yaml.safe_load(open(path, encoding="utf-8"))
    except FileNotFoundError:
        raise MultifiError(
            f"{path}: no such file (data.atomic_energies: isolated, a table, or a table's file)"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MultifiError(f"{path}: not a YAML or JSON table of atomic energies ({type(exc).__name__})") from None
    well_formed = isinstance(table, dict) and all(
        isinstance(row, dict) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in row.values())
        for row in table.values()
    )
    if not well_formed or not table:
        raise MultifiError(f"{path}: expected {{fidelity: {{element: eV, …}}, …}} (data.atomic_energies)")
    return {str(name): {str(z): float(e) for z, e in row.items()} for name, row in table.items()}


def check_atomic_coverage(atomic: AtomicEnergies, dataset, train: np.ndarray, where: str = "config") -> None:
    """Every fidelity with training energy labels has an atomic energy for each element in them: references of
    both kinds (atomic energies plus a shift, least-squares fits) differ by each element's bonding and cannot be
    compared or estimated from each other. train [P, 2] (structure, fidelity) pairs."""
    names, energy = dataset.fidelities.names, np.asarray(dataset.energy)
    elements, counts = composition_matrix(dataset)  # [n_el], [S, n_el]
    rows = train[~np.isnan(energy[train[:, 0], train[:, 1]]), 0]
    unlabelled = [
        z for z in np.flatnonzero(~np.isnan(atomic.values).all(1)) if z not in elements[counts[rows].sum(0) > 0]
    ]
    if unlabelled:
        log.warning(
            "%s: data.atomic_energies: %s: no training label holds %s: the model does not learn %s (an atomic "
            "energy alone teaches nothing of its bonding)",
            where,
            ", ".join(map(_symbol, unlabelled)),
            "it" if len(unlabelled) == 1 else "them",
            "it" if len(unlabelled) == 1 else "them",
        )
    how = "no one-atom frame labelled there" if atomic.isolated else "none in the table"
    for k, name in enumerate(names):
        rows = train[(train[:, 1] == k) & ~np.isnan(energy[train[:, 0], k])][:, 0]
        present = elements[counts[rows].sum(0) > 0]
        missing = [int(z) for z in present if np.isnan(atomic.values[z, k])]
        if missing:
            boxed = _boxed_atoms(dataset, k, missing) if atomic.isolated else []
            why = (
                f"{how}; its one-atom frames of {', '.join(map(_symbol, boxed))} lie in cells whose periodic images "
                f"are closer than {ISOLATED_IMAGE_DISTANCE:g} Å: no free atoms"
                if boxed
                else how
            )
            raise MultifiError(
                f"{where}: data.atomic_energies: {name}'s training labels contain "
                f"{', '.join(map(_symbol, missing))} without an atomic energy ({why}); every element of every "
                "trained fidelity needs one (references of both kinds cannot be compared)"
            )


def _boxed_atoms(dataset, k: int, elements: list[int]) -> list[int]:
    """Of `elements`, those with a one-atom structure labelled at fidelity k that is no free atom (a small box)."""
    one = np.flatnonzero((np.asarray(dataset.n_atoms) == 1) & ~np.isnan(np.asarray(dataset.energy)[:, k]))
    one = one[~isolated_atoms(dataset)[one]]
    z = np.asarray(dataset.numbers)[np.asarray(dataset.offsets)[one]]
    return [e for e in elements if (z == e).any()]


def check_binding(refs, names, where: str = "config") -> None:
    """The labels' energies beyond the atomic energies are binding energies of a few eV per atom: a one-line error
    for a fidelity where they are not (refs.atomic_shift, their mean per atom, beyond MAX_BINDING_EV).
    refs: data.stats.References of atomic energies; names: the fidelities, as refs' columns."""
    for k, name in enumerate(names):
        shift = np.nan if refs.atomic_shift is None else refs.atomic_shift[k]
        if np.isnan(shift) or abs(shift) <= MAX_BINDING_EV:
            continue
        raise MultifiError(
            f"{where}: data.atomic_energies: at {name}, the labels hold {shift:+.1f} eV per atom beyond their atomic "
            "energies, where binding energies are a few eV per atom: atomic energies in another unit than the labels "
            "(Hartree: ×27.211386 to eV; kcal/mol: ÷23.061) or of another method?"
        )


def without_frames(pairs: dict[str, np.ndarray], atomic: AtomicEnergies | None) -> dict[str, np.ndarray]:
    """The split pairs without the one-atom frames the atomic energies were read from (references, not data);
    logs how many were taken out."""
    if atomic is None or not len(atomic.frames):
        return pairs
    out = {part: p[~np.isin(p[:, 0], atomic.frames)] for part, p in pairs.items()}
    taken = {part: len(pairs[part]) - len(out[part]) for part in pairs}
    log.info(
        "data.atomic_energies: isolated: %d one-atom frame label(s) taken as atomic energies, not trained or "
        "evaluated (%s)",
        sum(taken.values()),
        ", ".join(f"{part} {n}" for part, n in taken.items()),
    )
    return out
