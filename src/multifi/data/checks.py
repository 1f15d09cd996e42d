"""Plausibility checks on prepared data: overlapping atoms, duplicate geometries across splits,
energies that look like Hartree instead of eV, stresses that look like GPa or kBar instead of eV/Å³. Errors are one line; doubtful data gives warnings."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from multifi.data.cells import MIN_MEASURE, complete_cells
from multifi.data.dataset import FidelityDataset, ranges
from multifi.data.isolated import ISOLATED_IMAGE_DISTANCE, isolated_atoms  # noqa: F401 - re-exported
from multifi.data.same_geometry import DUPLICATE_TOLERANCE, MoleculeTable, first_of_same_geometry
from multifi.errors import MultifiError

log = logging.getLogger("multifi")

MIN_DISTANCE = 0.1  # Å; closer atoms are a broken structure, not chemistry


def check_overlaps(dataset: FidelityDataset, neighbors) -> None:
    """Error if two atoms of a structure are closer than 0.1 Å (from the cached neighbour lists)."""
    if not hasattr(neighbors, "min_distance"):
        return  # on-the-fly neighbour lists check each batch as it is built
    bad = np.flatnonzero(neighbors.min_distance < MIN_DISTANCE)
    if len(bad):
        s = int(bad[0])
        raise MultifiError(
            f"{dataset.source or 'data'}: {dataset.structure_name(s)} has atoms "
            f"{neighbors.min_distance[s]:.3f} Å apart (< {MIN_DISTANCE} Å; {len(bad)} structure(s) affected)"
        )


def warn_structures_without_edges(dataset: FidelityDataset, neighbors, structures: np.ndarray) -> None:
    """Warn when training structures of several atoms have no pair within the cutoff (from the cached neighbour
    lists): the model gives them the sum of per-element references and zero forces, whatever their labels
    (positions in Bohr, or a cutoff shorter than every bond)."""
    if not hasattr(neighbors, "edge_offsets") or not len(structures):
        return
    several = structures[dataset.n_atoms[structures] > 1]
    empty = several[neighbors.n_edges[several] == 0]
    if len(empty):
        log.warning(
            "%s: %d of %d training structures of more than one atom have no two atoms within the cutoff (%.2f Å), "
            "e.g. %s: the model predicts zero forces and reference energies for them; positions in Bohr, or a "
            "cutoff too short?",
            dataset.source or "data",
            len(empty),
            len(several),
            neighbors.cutoff,
            dataset.structure_name(int(empty[0])),
        )


#: an energy scale this many times larger with isolated atoms than without them is worth a warning
ISOLATED_SCALE_RATIO = 1.5


def warn_isolated_atoms(dataset: FidelityDataset, pairs: np.ndarray) -> list[str]:
    """Warn for fidelities whose training `pairs` hold isolated atoms (isolated_atoms) that raise the
    fidelity's own fitted energy scale (fit_references, per fidelity) more than ISOLATED_SCALE_RATIO× over the
    same fit without them: they are trained as ordinary structures (the reference energies are a least-squares
    fit over every structure, not the isolated atoms' energies as MACE's E0s), and the cohesive-energy gap between
    them and the rest inflates the scale the model's outputs are multiplied by. Returns the names warned about."""
    from multifi.data.stats import fit_references

    isolated = isolated_atoms(dataset)
    if not isolated[pairs[:, 0]].any():
        return []
    rest = pairs[~isolated[pairs[:, 0]]]
    with_them, without_them = fit_references(dataset, pairs), fit_references(dataset, rest)
    scale, without = with_them.scale, without_them.scale
    warned = []
    for k, name in enumerate(dataset.fidelities.names):
        count = int((isolated[pairs[:, 0]] & (pairs[:, 1] == k)).sum())
        borrowed = with_them.borrowed_scale[k] or without_them.borrowed_scale[k]  # another fidelity's: no comparison
        if count == 0 or borrowed or not (rest[:, 1] == k).any() or not scale[k] > ISOLATED_SCALE_RATIO * without[k]:
            continue
        warned.append(name)
        log.warning(
            "%s: %d isolated atoms (one-atom structures, free or in a box) among the training structures of fidelity %r "
            "are trained as ordinary structures: reference energies are fitted over every structure. With them the "
            "fidelity's energy scale is %.3g eV, without them %.3g eV; take them as atomic energies (MACE's E0s, "
            "data.atomic_energies: isolated), or leave them out unless the model should learn the dissociation limit",
            dataset.source_of(name),
            count,
            name,
            scale[k],
            without[k],
        )
    return warned


def warn_isolated_atoms_held_out(dataset: FidelityDataset, pairs: dict[str, np.ndarray]) -> int:
    """Warn when isolated atoms (MACE's E0 frames, say) fall into the validation or test split: a random split
    treats them as any structure, and their errors (a free atom, eV/atom from the references the rest fits) then
    enter the errors that pick the checkpoint and are reported. Returns their number."""
    isolated = isolated_atoms(dataset)
    held = {part: np.unique(pairs[part][:, 0]) for part in ("val", "test") if part in pairs}
    counts = {part: int(isolated[rows].sum()) for part, rows in held.items()}
    if not any(counts.values()):
        return 0
    log.warning(
        "isolated atoms (one-atom structures) fell into the held-out splits (%s): their errors enter the validation "
        "and test errors (a free atom's energy lies eV from what the rest fits); keep them in training with split "
        "files (data.split.files), or leave them out",
        ", ".join(f"{'validation' if part == 'val' else part} {n}" for part, n in counts.items() if n),
    )
    return sum(counts.values())


def geometry_fingerprints(dataset: FidelityDataset, chunk: int = 1 << 20) -> np.ndarray:
    """[S] int64 fingerprints of (numbers, positions on a 1e-4 Å grid, cell), vectorised, in chunks of atoms;
    positions of periodic structures as fractional coordinates on a 1e-6 grid, wrapped into the cell along its
    periodic directions (an atom written unwrapped, one cell vector away, is the same structure).

    Structures whose geometries agree within DUPLICATE_TOLERANCE get the fingerprint of the first of them (their
    grid values can differ: a coordinate next to a grid line); different ones collide with negligible probability."""
    rng = np.random.default_rng(12345)
    w = rng.integers(1, 2**31 - 1, size=4, dtype=np.int64)
    S, A = len(dataset), len(dataset.numbers)
    atom = np.empty(A, np.int64)
    owner = np.repeat(np.arange(S), dataset.n_atoms)  # structure of each atom
    periodic = np.asarray(dataset.pbc).any(1)
    inverse = np.zeros((S, 3, 3))
    if periodic.any():  # a slab without vacuum: fractional along its periodic vectors, Cartesian across
        cells = complete_cells(np.asarray(dataset.cells)[periodic], np.asarray(dataset.pbc)[periodic])
        invertible = np.abs(np.linalg.det(cells)) > MIN_MEASURE  # else check_cell's error, elsewhere
        periodic[np.flatnonzero(periodic)[~invertible]] = False
        inverse[periodic] = np.linalg.inv(cells[invertible])
    for a in range(0, A, chunk):
        pos = np.asarray(dataset.positions[a : a + chunk], dtype=np.float64)
        s = owner[a : a + chunk]
        q = (pos * 1e4).astype(np.int64)
        wrap = periodic[s]
        if wrap.any():
            frac = np.rint(np.einsum("ai,aij->aj", pos[wrap], inverse[s[wrap]]) * 1e6).astype(np.int64)
            along = np.asarray(dataset.pbc)[s[wrap]]
            q[wrap] = np.where(along, np.mod(frac, 1_000_000), frac)
        z = np.asarray(dataset.numbers[a : a + chunk], np.int64)
        atom[a : a + chunk] = _mixed(q[:, 0] * w[0] + q[:, 1] * w[1] + q[:, 2] * w[2] + z * w[3])
    fp = np.zeros(S, np.int64)
    nonempty = dataset.n_atoms > 0
    if A:
        fp[nonempty] = np.add.reduceat(atom, dataset.offsets[:-1][nonempty])
    wc = rng.integers(1, 2**31 - 1, size=9, dtype=np.int64)
    for a in range(0, S, chunk):
        cell = (np.asarray(dataset.cells[a : a + chunk]).reshape(-1, 9) * 1e4).astype(np.int64)
        fp[a : a + chunk] += (cell * wc).sum(1)
    fp += dataset.n_atoms * w[0]
    first = first_of_same_geometry(
        dataset.numbers, dataset.positions, dataset.offsets, dataset.cells, dataset.pbc, DUPLICATE_TOLERANCE, chunk
    )
    return fp[first]


def _mixed(x: np.ndarray) -> np.ndarray:
    """[n] int64: splitmix64's finaliser of x (wrapping arithmetic). Atoms' hashes are summed per structure: a hash
    linear in the coordinates let the atoms at r and −r of a centrosymmetric molecule cancel, so that C4H2 and C4N2
    on one axis collided in QM9 (a 'repeat' whose energies differ by 131 eV)."""
    with np.errstate(over="ignore"):
        u = x.astype(np.int64).view(np.uint64)
        u = (u ^ (u >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        u = (u ^ (u >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (u ^ (u >> np.uint64(31))).view(np.int64)


def _member(x: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """x ∈ pool, by binary search (np.isin's hashing was 10× slower on millions of int64 here)."""
    if len(sorted_pool) == 0:
        return np.zeros(len(x), bool)
    pos = np.minimum(np.searchsorted(sorted_pool, x), len(sorted_pool) - 1)
    return sorted_pool[pos] == x


#: Å: molecules moved, turned, mirrored or renumbered whose sorted distances agree this well count as copies in the
#: repeat and split checks: copies printed to 4 decimals (errors up to 1.7e-4 Å relative to another atom) do;
#: finite-difference displacements (1e-3 Å and more) stay apart (2e-3, evaluate's tolerance for training
#: molecules, joined a finite-difference set's frames and, by chains of them, a scan of 1.5e-3 Å steps)
MOLECULE_COPY_TOLERANCE = 2e-4
#: molecules beyond which the repeat checks compare coordinates only (the search by distances looks at every
#: molecule of a similar size: minutes for a million frames of one molecule's dynamics)
MOLECULE_SEARCH_LIMIT = 200_000


def geometry_groups(dataset: FidelityDataset) -> np.ndarray:
    """[S] int64: for each structure the first structure of its geometry that is no copy itself (itself when
    none): within DUPLICATE_TOLERANCE (geometry_fingerprints), and for molecules also up to translation, rotation,
    reflection and atom order within MOLECULE_COPY_TOLERANCE (MoleculeTable; up to MOLECULE_SEARCH_LIMIT molecules).
    No chains: a copy of a copy is compared with the first, not joined through the second."""
    fp = geometry_fingerprints(dataset)
    _, first, group = np.unique(fp, return_index=True, return_inverse=True)
    groups = first[group].astype(np.int64)
    molecules = np.flatnonzero(~np.asarray(dataset.pbc).any(1))
    if len(molecules) > MOLECULE_SEARCH_LIMIT:
        log.info(
            "%d molecules: copies moved, turned or renumbered under another key are not looked for (beyond %d)",
            len(molecules),
            MOLECULE_SEARCH_LIMIT,
        )
    elif len(molecules) > 1:
        table = MoleculeTable(dataset, MOLECULE_COPY_TOLERANCE)
        own = groups == np.arange(len(groups))  # structures that are no copy (of coordinates) themselves
        target = np.arange(len(groups))  # each first-of-coordinates structure's first of its molecule
        for s in molecules[own[molecules]].tolist():
            t = table.find(dataset, s, allowed=own, below=s)
            if t is not None:  # t is no copy itself: one level, no chains
                target[s] = t
                own[s] = False
        groups = target[groups]  # s and its coordinate copies together
    return groups


def check_repeated_geometries(dataset: FidelityDataset, groups: np.ndarray | None = None) -> int:
    """Warn (and return how many) when structures repeat another's geometry under a different key (structures
    with one key are merged by the readers, so these did not merge): each copy trains as a structure of its
    own, its labels counted again, and labels of other fidelities on a copy are not paired with the original.
    `groups`: geometry_groups(dataset), when already made."""
    if len(dataset) < 2:
        return 0
    groups = geometry_groups(dataset) if groups is None else groups
    repeats = np.flatnonzero(groups != np.arange(len(dataset)))
    if len(repeats):
        s = int(repeats[0])
        log.warning(
            "%s: %d structure(s) repeat the geometry of another under a different key (e.g. %s and %s): they stay "
            "separate structures and their labels count again; to merge copies into one structure with labels at "
            "several fidelities give them the same key (info['key']; a MatPES record's key is 'matpes:<matpes_id>') "
            "(copies: within %g Å, molecules also moved, turned, mirrored or renumbered within %g Å)",
            dataset.source or "data",
            len(repeats),
            dataset.keys[groups[s]],
            dataset.keys[s],
            DUPLICATE_TOLERANCE,
            MOLECULE_COPY_TOLERANCE,
        )
        _warn_contradicting_copies(dataset, repeats, groups[repeats])
    return len(repeats)


#: eV per atom: copies of a geometry whose energies differ by more are contradicting labels (atoms up to
#: DUPLICATE_TOLERANCE = 1e-4 Å apart under forces up to 10 eV/Å change the energy by at most 1e-3 eV per atom)
CONTRADICTING_EV_PER_ATOM = 5e-3


def _warn_contradicting_copies(dataset: FidelityDataset, copies: np.ndarray, originals: np.ndarray) -> None:
    """Warn per fidelity where copies of one geometry (within DUPLICATE_TOLERANCE) carry energies more than
    CONTRADICTING_EV_PER_ATOM apart per atom: one method gives one energy per geometry, so one of the labels is
    wrong (another method, unit or structure)."""
    for k, name in enumerate(dataset.fidelities.names):
        a, b = dataset.energy[copies, k], dataset.energy[originals, k]
        gap = np.where(np.isnan(a) | np.isnan(b), 0.0, np.abs(a - b))
        bad = np.flatnonzero(gap > CONTRADICTING_EV_PER_ATOM * dataset.n_atoms[copies])
        if len(bad):
            i = int(bad[np.argmax(gap[bad])])
            log.warning(
                "%s: %d copies of a geometry carry %r energies that differ (up to %.3g eV, e.g. %s and %s): one "
                "method gives one energy per geometry, so one of each pair is wrong (another method, unit or "
                "structure under that key?)",
                dataset.source_of(name),
                len(bad),
                name,
                float(gap[i]),
                dataset.keys[originals[i]],
                dataset.keys[copies[i]],
            )


def check_split_duplicates(dataset: FidelityDataset, split, groups: np.ndarray | None = None) -> int:
    """Warn (and return how many) when one geometry (geometry_groups, or `groups` when already made) occurs in two
    different splits under different keys."""
    groups = geometry_groups(dataset) if groups is None else groups
    clashes, example = 0, ""
    for name, before in (("val", ["train"]), ("test", ["train", "val"])):
        idx = split[name]
        seen = np.sort(np.concatenate([groups[split[b]] for b in before]))
        hit = _member(groups[idx], seen)
        clashes += int(hit.sum())
        if hit.any() and not example:
            s = int(idx[np.argmax(hit)])
            where = next(b for b in before if (groups[split[b]] == groups[s]).any())
            example = f"{dataset.keys[s]} ({name}) duplicates a {where} structure"
    if clashes:
        log.warning(
            "%s: %d structure(s) appear in two splits under different keys, e.g. %s; test errors will be optimistic",
            dataset.source or "data",
            clashes,
            example,
        )
    return clashes


#: the median over a fidelity's atoms of (nearest neighbour's distance / the two atoms' covalent radii summed) lies
#: at 0.95-1.2 for molecules and crystals with positions in Å (C–H 1.02, Cu 0.97, NaCl 1.05, H2 1.19); positions in
#: Bohr give ~1.9, in nm ~0.1: outside this range the length unit is doubted
BOND_RATIO_RANGE = (0.6, 1.5)
#: structures per fidelity the length check looks at (a random choice, seeded)
BOND_RATIO_STRUCTURES = 2000
#: noble gases, whose nearest neighbours lie at van der Waals distances (left out of the length check)
NOBLE_GASES = (2, 10, 18, 36, 54, 86)


def check_length_unit(dataset: FidelityDataset, neighbors, pairs: np.ndarray) -> list[str]:
    """Warn for fidelities whose atoms lie, in the median, farther from or closer to their nearest neighbour than
    BOND_RATIO_RANGE × the sum of the two covalent radii (positions in Bohr, ×1.89, or in nm); atoms without a
    neighbour within the cutoff and noble gases left out. Returns the names warned about."""
    from ase.data import covalent_radii

    from multifi.data.stats import edge_lengths

    if not hasattr(neighbors, "edges") or not hasattr(neighbors, "edge_offsets"):
        return []  # on-the-fly lists (large data): not looked at
    numbers = np.asarray(dataset.numbers, dtype=np.int64)
    radius = np.asarray(covalent_radii)[np.clip(numbers, 0, len(covalent_radii) - 1)]
    rng = np.random.default_rng(0)
    doubted = []
    for k, name in enumerate(dataset.fidelities.names):
        structures = np.unique(pairs[pairs[:, 1] == k, 0])
        if len(structures) > BOND_RATIO_STRUCTURES:
            structures = np.sort(rng.choice(structures, BOND_RATIO_STRUCTURES, replace=False))
        ratios = []
        for atoms, gi, gj, d, centre in edge_lengths(dataset, neighbors, structures):
            gas = np.isin(numbers[gi], NOBLE_GASES) | np.isin(numbers[gj], NOBLE_GASES)
            nearest = np.full(len(atoms), np.inf)
            np.minimum.at(nearest, centre[~gas], (d / (radius[gi] + radius[gj]))[~gas])
            ratios.append(nearest[np.isfinite(nearest)])
        ratios = np.concatenate(ratios) if ratios else np.zeros(0)
        if len(ratios) < 10:
            continue
        median = float(np.median(ratios))
        if BOND_RATIO_RANGE[0] <= median <= BOND_RATIO_RANGE[1]:
            continue
        doubted.append(name)
        log.warning(
            "%s: the atoms of fidelity %r lie %.2f× the sum of their covalent radii from their nearest neighbour "
            "(median of %d atoms; positions in Å give 0.95-1.2%s): are these positions in another unit? "
            "(multifi reads Å)",
            dataset.source_of(name),
            name,
            median,
            len(ratios),
            ", in Bohr ~1.9" if median > 1 else ", in nm ~0.1",
        )
    return doubted


def check_energy_units(dataset: FidelityDataset, pairs: np.ndarray, ref: np.ndarray, scale: np.ndarray) -> list[str]:
    """Warn for fidelities whose energies look like Hartree: a fitted hydrogen reference between −0.7 and 0
    (every method gives −1 to −16 eV; Hartree −0.4 to −0.6; EMT's energies relative to the bulk a small positive
    one, in eV) or a per-atom spread of residuals below 2 meV (eV data of real structures spreads by ≥ 10 meV/atom), or crystals whose median |energy|
    per atom lies in 0.02-0.4 (eV data: 1-10 or more). Returns the suspicious names."""
    suspicious = []
    isolated = isolated_atoms(dataset)
    for k, name in enumerate(dataset.fidelities.names):
        s = pairs[pairs[:, 1] == k, 0]
        s = s[~np.isnan(dataset.energy[s, k])]
        if len(s) < 20:  # a few labels (a fidelity added by `multifi extend`): the Hartree test where the fit holds
            if (
                len(s)
                >= len(np.unique(dataset.numbers[ranges(dataset.offsets[s], dataset.n_atoms[s])])) + SMALL_SET_MARGIN
            ):
                _warn_small_set_in_hartree(dataset, s, k, name, ref, scale, suspicious)
            continue
        if _looks_per_atom(dataset, s, k):
            suspicious.append(name)
            log.warning(
                "%s: energies at fidelity %r look like energies per atom, not per structure (they do not grow with "
                "the number of atoms, which varies %.0f-%.0f); labels are total energies in eV: multiply by the "
                "number of atoms if so",
                dataset.source_of(name),
                name,
                dataset.n_atoms[s].min(),
                dataset.n_atoms[s].max(),
            )
            continue
        has_h = bool(_atoms_of(dataset, s, 1).any())  # this fidelity's structures (a mixed file: crystals too)
        tiny_h = has_h and -0.7 < ref[1, k] < 0  # Hartree: negative (EMT's relative energies: positive, in eV)
        tiny_spread = scale[k] < 2e-3
        crystal_ha = _crystal_per_atom_magnitude(dataset, s, k)
        if tiny_h or tiny_spread or crystal_ha is not None:
            suspicious.append(name)
            why = (
                f"hydrogen reference {ref[1, k]:.3f}"
                if tiny_h
                else (
                    f"per-atom spread {1000 * scale[k]:.2f} meV"
                    if tiny_spread
                    else f"crystals' median |energy| per atom {crystal_ha:.3f}, where eV data of electronic-"
                    "structure methods gives 1-10; a model with energies relative to the bulk, e.g. EMT, gives "
                    "such values in eV: then ignore this"
                )
            )
            log.warning(
                "%s: energies at fidelity %r look like Hartree, not eV (%s); multiply by 27.211386 if so",
                dataset.source_of(name),
                name,
                why,
            )
        elif _report_far_from_references(dataset, s[~isolated[s]], k, ref):  # free atoms: far by nature
            suspicious.append(name)
        elif has_h and abs(ref[1, k]) > 20:  # every method: 1-16 eV; kcal/mol 23×, kJ/mol 96×, meV 1000×
            suspicious.append(name)
            log.warning(
                "%s: energies at fidelity %r look like kcal/mol, kJ/mol or meV, not eV (hydrogen reference "
                "%.1f; every method gives 1-16 eV)",
                dataset.source_of(name),
                name,
                ref[1, k],
            )
        elif not has_h and (large := _large_references(ref[:, k])) is not None:
            large, all_electron = large
            if scale[k] > IMPLAUSIBLE_SPREAD:  # whatever the references: all-electron eV data spreads as little
                suspicious.append(name)
                log.warning(
                    "%s: energies at fidelity %r look like kcal/mol, kJ/mol or meV, not eV (median |reference "
                    "energy| per element %.0f, spread of per-atom energies around them %.1f, where eV data of "
                    "real structures spreads by well under %g)",
                    dataset.source_of(name),
                    name,
                    large,
                    scale[k],
                    IMPLAUSIBLE_SPREAD,
                )
            elif not all_electron:  # absolute pseudopotential energies (Quantum ESPRESSO, CP2K, ABINIT, CASTEP)
                log.info(
                    "%s: energies at fidelity %r: median |reference energy| per element %.0f (absolute "
                    "pseudopotential energies as Quantum ESPRESSO or CP2K give; kcal/mol or meV would also "
                    "look like this, with a spread of per-atom energies far above the %.2f here)",
                    dataset.source_of(name),
                    name,
                    large,
                    scale[k],
                )
    return suspicious


#: structures beyond one per element a small set needs before its fitted references and spread are judged
SMALL_SET_MARGIN = 3
#: eV per atom; below this spread of per-atom energies around the references, a small set with a tiny hydrogen
#: reference is taken for Hartree
SMALL_SET_SPREAD = 5e-3


def _warn_small_set_in_hartree(
    dataset: FidelityDataset, s: np.ndarray, k: int, name: str, ref: np.ndarray, scale: np.ndarray, out: list
) -> None:
    """The Hartree test for fewer than 20 structures (a few more than elements): a hydrogen reference between −0.7
    and 0 (eV labels give −1 to −16, Hartree −0.4 to −0.6) together with a per-atom spread below SMALL_SET_SPREAD (eV labels of
    distinct structures spread by ≥ 10 meV, Hartree 27× less), since a fit of a few structures can put one
    reference anywhere."""
    has_h = bool(_atoms_of(dataset, s, 1).any())
    if has_h and -0.7 < ref[1, k] < 0 and scale[k] < SMALL_SET_SPREAD:
        out.append(name)
        log.warning(
            "%s: energies at fidelity %r look like Hartree, not eV (hydrogen reference %.3f, per-atom spread "
            "%.2f meV, from %d structures); multiply by 27.211386 if so",
            dataset.source_of(name),
            name,
            ref[1, k],
            1000 * scale[k],
            len(s),
        )


#: eV per atom; the spread of per-atom energies around their element references above which eV is implausible
#: (real data: 0.05-0.5, e.g. 0.16 PBE / 0.18 r2SCAN for ../shared/data/solids; kcal/mol gives 23×, meV 1000×)
IMPLAUSIBLE_SPREAD = 2.0


#: residual(labels × n) / residual(labels) below which labels look per atom (see _looks_per_atom)
PER_ATOM_RATIO = 0.5


def _looks_per_atom(dataset: FidelityDataset, s: np.ndarray, k: int) -> bool:
    """Energies of structures s at fidelity k that are per atom: per-element reference energies fit totals (RMS
    residual per atom) far better when each label is multiplied by its number of atoms than as given. Only where
    sizes vary (coefficient of variation of n ≥ 0.05: with n constant the two fits are alike, never 5× apart);
    at most 5 000 structures looked at."""
    from multifi.data.stats import composition_matrix

    s = s[:: max(1, len(s) // 5000)]
    n = dataset.n_atoms[s].astype(np.float64)
    if n.std() < 0.05 * n.mean():
        return False
    _, counts = composition_matrix(dataset.subset(s))
    counts = counts.astype(np.float64)
    e = dataset.energy[s, k]

    def residual(y):  # RMS per atom of the per-element fit of totals y
        coef = np.linalg.lstsq(counts, y, rcond=None)[0]
        return float(np.sqrt(np.mean(((counts @ coef - y) / n) ** 2)))

    # measured ratios residual(e·n) / residual(e): true totals 29-10 000 (solids PBE/r2SCAN, QM9), per-atom labels
    # 0.01-0.26 (the same data divided by n; 0.42 on a 40-structure subset of the solids)
    return residual(e * n) < PER_ATOM_RATIO * residual(e)


def _atoms_of(dataset: FidelityDataset, s: np.ndarray, z: int) -> np.ndarray:
    """[len(s)] bool: structure s contains element z."""
    return dataset.sum_over_atoms(dataset.numbers == z, s) > 0


#: eV; elements' fitted reference energies lie at 1-16 eV in magnitude with VASP/GPAW-style pseudopotential
#: energies (Quantum ESPRESSO, CP2K and all-electron codes give absolute energies, far larger)
PSEUDOPOTENTIAL_REFERENCE_MAX = 20.0


def _large_references(ref: np.ndarray) -> tuple[float, bool] | None:
    """(median |fitted reference energy| [eV] of the elements of ref [119], whether they look all-electron) when
    that median lies above PSEUDOPOTENTIAL_REFERENCE_MAX (kcal/mol, kJ/mol, meV, or absolute energies); all-electron:
    at least half of the elements within a factor 2 of an all-electron atom's energy (≈ 0.6·Z^(7/3) Hartree: C 38,
    Si 289, Fe 1263 Ha). None for references of pseudopotential size."""
    z = np.flatnonzero(ref)
    if len(z) == 0:
        return None
    size = np.abs(ref[z])
    median = float(np.median(size))
    if median <= PSEUDOPOTENTIAL_REFERENCE_MAX:
        return None
    ratio = size / (0.6 * z ** (7 / 3) * 27.211386)
    return median, bool(((ratio > 0.5) & (ratio < 2)).mean() >= 0.5)


def _report_far_from_references(dataset: FidelityDataset, s: np.ndarray, k: int, ref: np.ndarray) -> bool:
    """Warn when energies of structures `s` at fidelity k lie far from their fitted reference energies: a
    per-atom residual more than 1 eV beyond half the structure's own reference energy per atom (real data
    stays below: ≤ 2.1 eV/atom against references of 1-10 eV/atom for the crystals of ../shared/data/solids,
    far less for molecules), as energies of one file in two units (eV and Hartree) or of another method give.

    A fit to all of them follows neither group of a mixed file (every energy can then look far), so the count
    and the example come from references refitted to the largest group that agrees with itself."""
    if not ref[:, k].any():  # no references fitted: nothing to compare with
        return False
    y = dataset.energy[s, k]
    far, expected = _far(dataset, s, y, ref[:, k])
    agree = _consistent_part(dataset, s, y, expected)  # also when a fit pulled far off makes nothing look far
    if agree is not None:
        far, expected = agree
    if not far.any():
        return False
    n = dataset.n_atoms[s]
    i = int(np.argmax(np.where(far, np.abs(y - expected) / n, -1.0)))
    log.warning(
        "%s: %d of %d energies at fidelity %r lie far from the reference energies that fit %s (e.g. structure "
        "%s: %.2f eV/atom against %.2f expected): energies in two units (eV and Hartree, kcal/mol, meV), or "
        "labels of another method, in one fidelity?%s",
        dataset.source_of(dataset.fidelities.names[k]),
        int(far.sum()),
        len(s),
        dataset.fidelities.names[k],
        "all of them" if agree is None else f"{int((~far).sum())} others",
        dataset.keys[s[i]],
        y[i] / n[i],
        expected[i] / n[i],
        _unseen_by_the_fit(dataset, s),
    )
    return True


def _unseen_by_the_fit(dataset: FidelityDataset, s: np.ndarray) -> str:
    """For the warning above: elements that occur in one of the structures `s` only. Their reference energy is
    fitted to that one label, which it then matches exactly, so a label in another unit there cannot show in the
    count; "" when there are none."""
    from ase.data import chemical_symbols

    from multifi.data.stats import composition_matrix

    elements, counts = composition_matrix(dataset)
    present = counts[s] > 0  # [len(s), n_el]
    single = np.flatnonzero(present.sum(0) == 1)
    if len(single) == 0:
        return ""
    parts = [f"{chemical_symbols[elements[c]]} (structure {dataset.keys[s[present[:, c]][0]]})" for c in single[:5]]
    return (
        f" Elements in one structure only, whose reference energy is fitted to that label alone (another unit there "
        f"cannot show in this count): {', '.join(parts)}"
    )


def _far(dataset: FidelityDataset, s: np.ndarray, y: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([len(s)] bool far, [len(s)] eV expected energy Σ ref[Z]) of energies y of structures s against ref [119]:
    far by more than 1 eV/atom beyond half the expected energy per atom, and by a factor of a unit (UNIT_GAP or
    more, or the other sign): an outlier of one method (a molecule EMT describes badly at 3× its expected energy)
    is not another unit."""
    expected = dataset.sum_over_atoms(ref[dataset.numbers], s)
    n = dataset.n_atoms[s]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = y / expected
    unit_like = ~((ratio > 1 / UNIT_GAP) & (ratio < UNIT_GAP))  # NaN (expected 0) counts as unit-like
    return (np.abs(y - expected) / n > 0.5 * np.abs(expected / n) + 1.0) & unit_like, expected


#: smallest factor between two groups of energies taken for two units (kcal/mol 23, Hartree 27, kJ/mol 96, meV 1000)
UNIT_GAP = 3.0


def _consistent_part(
    dataset: FidelityDataset, s: np.ndarray, y: np.ndarray, expected: np.ndarray, rounds: int = 5
) -> tuple[np.ndarray, np.ndarray] | None:
    """(far, expected) against references refitted to the larger of two groups of energies a factor ≥ UNIT_GAP
    apart relative to the first fit (two units); structures with elements that group lacks are not judged.
    None when the energies form no two such groups or the refit leaves fewer than a quarter agreeing."""
    from multifi.data.stats import composition_matrix, least_squares_references

    ratio = np.log(np.maximum(np.abs(y / np.where(expected == 0, np.nan, expected)), 1e-12))
    order = np.argsort(np.nan_to_num(ratio, nan=np.inf))
    gaps = np.diff(ratio[order])
    if not len(gaps) or not np.nanmax(gaps, initial=0.0) > np.log(UNIT_GAP):
        return None
    cut = int(np.nanargmax(gaps)) + 1
    keep = np.zeros(len(s), bool)
    keep[order[:cut] if cut >= len(s) - cut else order[cut:]] = True
    elements, counts = composition_matrix(dataset)
    for _ in range(rounds):
        ref = least_squares_references(elements, counts, s[keep], y[keep])
        far, expected = _far(dataset, s, y, ref)
        judged = counts[s][:, ref[elements] == 0].sum(1) == 0  # every element has a refitted reference
        far &= judged
        agree = ~far & judged
        if agree.sum() < len(s) / 4:
            return None
        if np.array_equal(agree, keep):
            break
        keep = agree
    return far, expected


def _crystal_per_atom_magnitude(dataset: FidelityDataset, s: np.ndarray, k: int) -> float | None:
    """The median |energy| per atom of the periodic structures `s` at fidelity k when it looks like Hartree
    (0.02-0.4: total energies of crystals are 1-10 eV/atom in magnitude with pseudopotential codes, far
    more with all-electron ones; in Hartree 0.04-0.4); None otherwise or with fewer than 20 crystals."""
    periodic = s[dataset.pbc[s].any(1)]
    if len(periodic) < 20:
        return None
    m = float(np.median(np.abs(dataset.energy[periodic, k]) / dataset.n_atoms[periodic]))
    return m if 0.02 < m < 0.4 else None


#: eV/Å: median |force component| above which forces look like meV/Å numbers read as eV/Å (real data: MD
#: snapshots 0.1-1, strongly distorted structures a few; ../shared/data/solids PBE: 0.35)
IMPLAUSIBLE_FORCE = 20.0


def check_force_units(dataset: FidelityDataset, pairs: np.ndarray, min_count: int = 5, known=frozenset()) -> list[str]:
    """Warn for fidelities whose force labels have a median |component| above IMPLAUSIBLE_FORCE over at least
    `min_count` of `pairs`' structures (at most 5 000 of them looked at): meV/Å read as eV/Å comes out 1000×
    too large; then check_force_agreement and check_forces_against_energies. Fidelities in `known` (units known) are
    not checked themselves, but are a yardstick for the others (a sign flip at another fidelity shows against
    them). Returns the suspicious names."""
    if dataset.forces is None:
        return []
    suspicious = []
    for k, name in enumerate(dataset.fidelities.names):
        if name in known:
            continue
        s = pairs[pairs[:, 1] == k, 0]
        s = s[dataset.forces_mask[s, k]]
        if len(s) < min_count:
            continue
        s = s[:: max(1, len(s) // 5000)]
        atoms = ranges(np.asarray(dataset.offsets)[s], dataset.n_atoms[s])
        median = float(np.median(np.abs(dataset.forces[atoms, k])))
        if median > IMPLAUSIBLE_FORCE:
            suspicious.append(name)
            log.warning(
                "%s: forces at fidelity %r look like numbers in another unit read as eV/Å (median |component| %.0f "
                "eV/Å; real data: 0.1-5); force labels are read in eV/Å: divide meV/Å by 1000, kJ/mol/Å by 96.49, "
                "kcal/mol/Å by 23.06",
                dataset.source_of(name),
                name,
                median,
            )
    # fidelities found off already are no yardstick for the others (they would be blamed for the bad one's unit)
    suspicious += check_force_agreement(dataset, pairs, skip=set(suspicious), known=known)
    own = pairs[~np.isin(pairs[:, 1], [dataset.fidelities.index(n) for n in known if n in dataset.fidelities])]
    return suspicious + [name for name in check_forces_against_energies(dataset, own) if name not in suspicious]


#: eV/Å: forces at another fidelity of a structure beyond which its forces of exactly 0 are no minimum there
MOVED_FORCE = 0.05
#: fractions of a cell vector on which the sites of ideal high-symmetry crystals (and their supercells up to 8×) lie
SITE_GRID = 840
#: tolerance of a site on SITE_GRID, in fractions of a cell vector (5-decimal CIF coordinates: 0.33333 for 1/3)
SITE_TOLERANCE = 1e-4


def check_placeholders(dataset: FidelityDataset, pairs: np.ndarray) -> None:
    """Forces and stresses of exactly 0 where no calculation gives them (check_zero_forces, check_zero_stress)."""
    check_zero_forces(dataset, pairs)
    check_zero_stress(dataset, pairs)


def on_symmetric_sites(dataset: FidelityDataset, s: np.ndarray) -> np.ndarray:
    """[len(s)] bool: periodic structures s whose atoms all lie, relative to their first atom, on SITE_GRID
    fractions of the cell vectors (within SITE_TOLERANCE; a slab's or wire's non-periodic directions completed by
    complete_cells): ideal sites, where symmetry may make every force exactly 0; a displaced (rattled, or relaxed
    with free parameters) structure's atoms do not lie there."""
    cells = complete_cells(dataset.cells[s], dataset.pbc[s])
    out = np.zeros(len(s), bool)
    for i, t in enumerate(s.tolist()):
        atoms = slice(dataset.offsets[t], dataset.offsets[t + 1])
        frac = np.linalg.solve(cells[i].T, (dataset.positions[atoms] - dataset.positions[atoms][:1]).T).T
        periodic = frac[:, dataset.pbc[t]] * SITE_GRID
        out[i] = bool(np.all(np.abs(periodic - np.round(periodic)) < SITE_TOLERANCE * SITE_GRID))
    return out


def largest_forces(dataset: FidelityDataset, s: np.ndarray, k: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """[len(s)] eV/Å: the largest |component| of the forces of structure s[i] at fidelity k[i] (chunks of ~`chunk`
    atoms: bounded memory on large, memory-mapped data)."""
    out = np.zeros(len(s))
    n = dataset.n_atoms[s]
    ends = np.cumsum(n)
    start = 0
    while start < len(s):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + chunk, side="right")))
        part = slice(start, stop)
        atoms = ranges(np.asarray(dataset.offsets)[s[part]], n[part])
        per_atom = np.abs(dataset.forces[atoms, np.repeat(k[part], n[part])]).max(1)
        out[part] = np.maximum.reduceat(per_atom, np.concatenate([[0], np.cumsum(n[part])[:-1]]))
        start = stop
    return out


def check_zero_forces(dataset: FidelityDataset, pairs: np.ndarray) -> dict[str, int]:
    """Warn per fidelity about structures of ≥ 2 atoms among `pairs` whose forces are exactly 0 on every atom where
    no calculation gives that: molecules (a geometry optimised to a tolerance keeps small forces), crystals with atoms
    off ideal sites (on_symmetric_sites; on them symmetry can zero every force), structures with forces above
    MOVED_FORCE at another fidelity: placeholders for missing forces, which train the model toward zero forces.
    Returns {fidelity: such structures} of those warned about."""
    if dataset.forces is None or not len(pairs):
        return {}
    labelled = np.zeros(dataset.forces_mask.shape, bool)
    labelled[pairs[:, 0], pairs[:, 1]] = dataset.forces_mask[pairs[:, 0], pairs[:, 1]]
    labelled[dataset.n_atoms < 2] = False
    s, k = np.nonzero(labelled)
    largest = largest_forces(dataset, s, k)
    zero = largest == 0
    if not zero.any():
        return {}
    elsewhere = np.zeros(len(dataset), bool)  # structures with forces above MOVED_FORCE at some fidelity
    elsewhere[s[largest > MOVED_FORCE]] = True
    molecule = ~dataset.pbc[s].any(1)
    displaced = np.zeros(len(s), bool)
    crystal = np.flatnonzero(zero & ~molecule)
    displaced[crystal] = ~on_symmetric_sites(dataset, s[crystal])
    odd = zero & (molecule | displaced | elsewhere[s])
    warned = {}
    for j, name in enumerate(dataset.fidelities.names):
        at = odd & (k == j)
        if not at.any():
            continue
        warned[name] = int(at.sum())
        log.warning(
            "%s: %d of %d structures with forces at fidelity %r have forces of exactly 0 on every atom where no "
            "calculation gives them (molecules %d, crystals with atoms off ideal sites %d, with forces at another "
            "fidelity %d): placeholders for forces not computed? They train the model toward zero forces there; "
            "write those structures without forces",
            dataset.source_of(name),
            warned[name],
            int((k == j).sum()),
            name,
            int((at & molecule).sum()),
            int((at & displaced).sum()),
            int((at & elsewhere[s]).sum()),
        )
    return warned


def check_force_agreement(
    dataset: FidelityDataset, pairs: np.ndarray, min_count: int = 5, skip: set[str] = frozenset(), known=frozenset()
) -> list[str]:
    """Warn for fidelities whose forces, on structures also force-labelled at another fidelity (at least `min_count`
    of `pairs`' structures, at most 5 000 looked at), point the other way (correlation below −0.5: gradients given
    as forces) or follow the same pattern (correlation above 0.5) at a size more than 5× apart (RMS ratio; Ha/Bohr
    read as eV/Å is 51.4× too small). Levels of theory differ by far less; near a minimum of one level its forces
    are small and hardly correlated with another's, and nothing is said. Who is off: a fidelity apart from one in
    `known` (units known, data.units_known; never blamed themselves); else one apart from most of the others it
    shares structures with (with two or more); else, of a lone pair, the later one (said conditionally). Fidelities
    in `skip` (warned about already) are compared with none. Returns the suspicious names, each once."""
    if dataset.forces is None or len(dataset.fidelities) < 2:
        return []
    labelled = np.zeros(dataset.forces_mask.shape, bool)
    labelled[pairs[:, 0], pairs[:, 1]] = dataset.forces_mask[pairs[:, 0], pairs[:, 1]]
    names = dataset.fidelities.names
    ks = [k for k, n in enumerate(names) if n not in skip]
    compared: dict[int, list[tuple[int, int, str]]] = {k: [] for k in ks}  # k → (other, shared structures, why)
    for i, k in enumerate(ks):
        for ref in ks[:i]:
            s = np.flatnonzero(labelled[:, k] & labelled[:, ref])
            if len(s) >= min_count:
                why = _forces_apart(dataset, s, k, ref)
                compared[k].append((ref, len(s), why))
                compared[ref].append((k, len(s), _forces_apart(dataset, s, ref, k) if why else ""))
    suspicious: list[str] = []
    for k in ks:
        if names[k] in known or not compared[k]:
            continue
        apart = [(o, n, why) for o, n, why in compared[k] if why]
        by_known = [x for x in apart if names[x[0]] in known]
        most = len(compared[k]) >= 2 and len(apart) > len(compared[k]) / 2
        lone = len(compared[k]) == 1 and apart and apart[0][0] < k and names[apart[0][0]] not in suspicious
        if not (by_known or most or lone):
            continue
        other, n, why = (by_known or apart)[0]
        if by_known:
            verdict = f"{names[other]}'s units are known (data.units_known): fix those at {names[k]!r}"
        elif most:
            verdict = f"they disagree with {len(apart)} of the {len(compared[k])} fidelities sharing its structures: fix those at {names[k]!r}"
        else:
            verdict = f"if the forces at {names[other]!r} are right, fix those at {names[k]!r}"
        suspicious.append(names[k])
        log.warning(
            "%s: forces at fidelity %r, on the %d structures labelled at %r too, %s; levels of theory differ by far "
            "less: %s",
            dataset.source_of(names[k]),
            names[k],
            n,
            names[other],
            why,
            verdict,
        )
    return suspicious


def _forces_apart(dataset: FidelityDataset, s: np.ndarray, k: int, ref: int) -> str:
    """How the forces of structures `s` at fidelity k differ from those at `ref` beyond levels of theory ('' if
    they do not): of the opposite sign, or of one pattern at a size more than 5× apart."""
    s = s[:: max(1, len(s) // 5000)]
    atoms = ranges(np.asarray(dataset.offsets)[s], dataset.n_atoms[s])
    fk, fr = dataset.forces[atoms, k].ravel(), dataset.forces[atoms, ref].ravel()
    nk, nr = float(np.linalg.norm(fk)), float(np.linalg.norm(fr))
    if nk == 0 or nr == 0:
        return ""
    corr, ratio = float(fk @ fr) / (nk * nr), nk / nr
    if corr < -0.5:
        return f"point the other way (correlation {corr:+.2f}): gradients, −F, given as forces?"
    if corr > 0.5 and not 0.2 < ratio < 5:
        return f"are {ratio:.3g}× the size (correlation {corr:+.2f}): a unit? (Ha/Bohr is 51.4 eV/Å)"
    return ""


#: Å: neighbouring frames (consecutive structures of the same atoms and cell) whose atoms moved at most this far
#: are compared by the trapezoid rule (exact for a harmonic energy; MD and relaxation steps move ≤ 0.1 Å)
FRAME_STEP = 0.3


def frame_energy_changes(dataset: FidelityDataset, pairs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Energy changes ΔE [P] eV between neighbouring frames labelled with energy and forces at fidelity k among
    `pairs` (consecutive such structures with the same atoms in the same order, the same cell and periodicity,
    every atom moved < FRAME_STEP Å by the minimum image, some atom moved), and what the forces imply,
    −½ Σ (F_a + F_b)·Δx [P] eV (the trapezoid rule); at most 5 000 frame pairs of 200 000 atoms in all."""
    s = pairs[pairs[:, 1] == k, 0]
    s = np.unique(s[dataset.forces_mask[s, k] & dataset.energy_mask[s, k]])
    a, b = s[:-1], s[1:]
    n = dataset.n_atoms
    same = (n[a] == n[b]) & (n[a] > 0) & (dataset.pbc[a] == dataset.pbc[b]).all(1)
    same &= np.abs(dataset.cells[a] - dataset.cells[b]).max(axis=(1, 2)) < 1e-6
    a, b = a[same], b[same]
    n_a = dataset.n_atoms[a]
    step = max(1, -(-len(a) // 5000), -(-int(n_a.sum()) // 200_000))  # ≤ 5 000 pairs and 200 000 atoms
    a, b = a[::step], b[::step]
    if len(a) == 0:
        return np.zeros(0), np.zeros(0)
    offsets = np.asarray(dataset.offsets)
    ia, ib = ranges(offsets[a], n[a]), ranges(offsets[b], n[b])
    pair_of_atom = np.repeat(np.arange(len(a)), n[a])
    step = dataset.positions[ib] - dataset.positions[ia]  # [A, 3]
    periodic = dataset.pbc[a][pair_of_atom]
    cell = complete_cells(dataset.cells[a], dataset.pbc[a])[pair_of_atom]  # [A, 3, 3] rows: lattice vectors
    wrap = periodic.any(1) & (np.abs(np.linalg.det(cell)) > MIN_MEASURE)  # minimum image along periodic axes
    if wrap.any():  # along periodic directions (an atom wrapped into the cell moved little)
        frac = np.einsum("ai,aij->aj", step[wrap], np.linalg.inv(cell[wrap]))
        frac -= np.where(periodic[wrap], np.round(frac), 0.0)
        step[wrap] = np.einsum("ai,aij->aj", frac, cell[wrap])
    start = np.concatenate([[0], np.cumsum(n[a])[:-1]])
    moved = np.maximum.reduceat(np.abs(step).max(1), start)
    same_atoms = np.minimum.reduceat(dataset.numbers[ia] == dataset.numbers[ib], start)
    work = np.add.reduceat(((dataset.forces[ia, k] + dataset.forces[ib, k]) * step).sum(1), start)
    keep = same_atoms & (moved < FRAME_STEP) & (moved > 1e-4)
    return (dataset.energy[b, k] - dataset.energy[a, k])[keep], -0.5 * work[keep]


def check_forces_against_energies(dataset: FidelityDataset, pairs: np.ndarray, min_count: int = 10) -> list[str]:
    """Warn for fidelities whose forces disagree with their own energies on neighbouring frames (trajectories:
    MD, relaxations; at least `min_count` frame pairs, frame_energy_changes): where the energy changes follow the
    forces' prediction closely (|correlation| > 0.9) but with a slope outside 0.7-1.4, forces and energies are in
    different units (Ha/Bohr forces give 51.4, Hartree energies 1/27.2) or the forces are gradients (−1).
    Returns the suspicious names."""
    if dataset.forces is None:
        return []
    suspicious = []
    for k, name in enumerate(dataset.fidelities.names):
        de, implied = frame_energy_changes(dataset, pairs, k)
        if len(de) < min_count or not implied.any() or not de.any():
            continue
        corr = float(np.corrcoef(de, implied)[0, 1])
        slope = float(de @ implied / (implied @ implied))
        if not abs(corr) >= 0.9 or 0.7 < slope < 1.4:  # (a NaN correlation says nothing)
            continue
        suspicious.append(name)
        atoms = float(np.median(dataset.n_atoms[pairs[pairs[:, 1] == k, 0]]))  # a slope of 1/N: per-atom energies
        per_atom = (
            f"energies per atom given as the structure's energy? (1/N = 1/{atoms:.0f} here); "
            if atoms > 1 and 1 / 1.5 < slope * atoms < 1.5
            else ""
        )
        why = (
            "the forces point uphill: gradients (−F) given as forces?"
            if slope < 0
            else per_atom + "forces and energies in different units? (forces in Ha/Bohr: 51.4; energies in Hartree: "
            "1/27.2; kcal/mol: 23.1 or 1/23.1)"
        )
        log.warning(
            "%s: at fidelity %r the energy changes between %d neighbouring frames are %.3g× what the forces imply "
            "(trapezoid rule, correlation %+.2f); %s",
            dataset.source_of(name),
            name,
            len(de),
            slope,
            corr,
            why,
        )
    return suspicious


#: GPa; the median over structures of the largest |stress component| above which stresses look like GPa or
#: kBar numbers given as eV/Å³ (×160 or ×1602: real data, strongly compressed crystals included, have medians
#: of 1-10 GPa and maxima of a few hundred)
IMPLAUSIBLE_STRESS = 300.0


def doubtful_units(
    dataset: FidelityDataset, pairs: np.ndarray, ref: np.ndarray, scale: np.ndarray, known: Iterable[str] = ()
) -> dict:
    """The energy, force and stress unit checks (each warns); {label: [fidelities]} of those whose labels looked
    like another unit (empty lists dropped), for the run's record and the reminder beside its test errors.
    Fidelities in `known` (data.units_known: their units are known) are not checked for units; every fidelity is
    checked for energies attached to the wrong structures (check_energies_follow_compositions)."""
    every = pairs
    skipped = [k for k, name in enumerate(dataset.fidelities.names) if name in set(known)]
    if skipped:
        log.info("data.units_known: the unit checks skip %s", ", ".join(dataset.fidelities.names[k] for k in skipped))
        pairs = pairs[~np.isin(pairs[:, 1], skipped)]
    check_placeholders(dataset, every)  # no unit question: every fidelity
    found = {
        "energy": check_energy_units(dataset, pairs, ref, scale),
        "stress": check_stress_units(dataset, pairs),
        "forces": check_force_units(dataset, every, known=set(known)),  # a known fidelity is a yardstick for others
    }
    check_energies_follow_compositions(dataset, every, skip=set(found["energy"]))
    return {label: names for label, names in found.items() if names}


#: eV/atom from the fit of per-element reference energies beyond which a label counts as not following its
#: structure's composition; share of a fidelity's labels beyond it that earns a warning. Measured on the shared
#: data (|residual − median| per atom, each fidelity's own least-squares fit; scripts/composition_residuals.py): QM9
#: at all seven methods of ../shared/data never beyond 0.79 (all 130 831 molecules at GFN2-xTB, GFN1-xTB and
#: B3LYP/6-31G(2df,p)); the solids' PBE and r2SCAN 0.35 % and 0.40 % of labels beyond 1 (high-energy structures, at
#: most 2.2); QM9 GFN2-xTB energies each given to the next molecule (400 of them) 42 %
MISMATCH_EV_PER_ATOM = 1.0
MISMATCH_SHARE = 0.05


def check_energies_follow_compositions(dataset: FidelityDataset, pairs: np.ndarray, skip=frozenset()) -> list[str]:
    """Warn for fidelities (at least 20 energy labels) whose energies do not follow their structures' compositions:
    more than MISMATCH_SHARE of them lie beyond MISMATCH_EV_PER_ATOM of what per-element reference energies fitted to
    them give, as labels attached to the wrong structures do (an index column off by one, frames reordered after
    their energies were written); said too when each label fits its neighbour in the data's order far better (an
    offset of one). With few distinct compositions (stoichiometric ratios; at most elements + SMALL_SET_MARGIN: one
    element's clusters of any size, a few dissociation curves or molecules' trajectories) the fit is little more than an energy per atom, which data
    far from equilibrium leaves by eV: warned there only when the neighbour test finds the offset. Isolated atoms are
    left out. Fidelities in
    `skip` (another unit suspected: that warning explains them) are not checked. Returns the names warned about."""
    from multifi.data.stats import composition_matrix

    elements, counts = composition_matrix(dataset)
    isolated = isolated_atoms(dataset)  # free atoms (MACE's E0 frames) lie eV/atom from any fit by nature
    warned = []
    for k, name in enumerate(dataset.fidelities.names):
        s = np.unique(pairs[pairs[:, 1] == k, 0])
        s = s[~np.isnan(dataset.energy[s, k]) & ~isolated[s]]
        if name in skip or len(s) < 20:
            continue
        present = int((counts[s].sum(0) > 0).sum())
        ratios = np.round(counts[s] / dataset.n_atoms[s, None], 6)  # Cu2 and Cu55 are one: the fit sees ratios
        few = len(np.unique(ratios, axis=0)) <= present + SMALL_SET_MARGIN
        y = dataset.energy[s, k]
        off = _residual_per_atom(dataset, elements, counts, s, y)
        off -= np.median(off)
        far = np.abs(off) > MISMATCH_EV_PER_ATOM
        if far.mean() <= MISMATCH_SHARE:
            continue
        offset = _neighbour_fits_better(dataset, elements, counts, s, y, off)
        if few and not offset:
            continue
        warned.append(name)
        i = int(np.argmax(np.abs(off)))
        log.warning(
            "%s: %d of %d energies at fidelity %r lie more than %g eV/atom from what per-element reference energies "
            "fitted to them give (e.g. structure %s: %+.2f eV/atom; the shared QM9 and MatPES-style data: under "
            "0.5 %% of labels so far off): energies attached to the wrong structures (an index off by one, frames "
            "reordered)?%s",
            dataset.source_of(name),
            int(far.sum()),
            len(s),
            name,
            MISMATCH_EV_PER_ATOM,
            dataset.keys[s[i]],
            off[i],
            offset
            or " Data far from equilibrium by design (dissociation, clusters, high-energy configurations) can lie so "
            "far too: then ignore this.",
        )
    return warned


def _residual_per_atom(dataset, elements, counts, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[len(s)] eV/atom: energies y of structures s less the per-element reference energies fitted to them."""
    from multifi.data.stats import least_squares_references

    ref = least_squares_references(elements, counts, s, y)
    return (y - dataset.sum_over_atoms(ref[dataset.numbers], s)) / dataset.n_atoms[s]


def _neighbour_fits_better(dataset, elements, counts, s, y, off) -> str:
    """For the warning above: " Each label fits the next structure …" when the labels moved by one place in the
    data's order fit their new structures with a 5× smaller RMS residual; "" otherwise."""
    rms = float(np.sqrt(np.mean(off**2)))  # (off: centred on its median; the moved labels' fit is not, a stricter test)
    for step, which in ((1, "next"), (-1, "previous")):
        moved = _residual_per_atom(
            dataset, elements, counts, s[step:] if step > 0 else s[:step], y[:-step] if step > 0 else y[-step:]
        )
        better = float(np.sqrt(np.mean(moved**2)))
        if better * 5 < rms:
            return (
                f" Each label fits the {which} structure in the data's order far better (RMS {better:.3f} against "
                f"{rms:.3f} eV/atom): an offset of one between labels and structures."
            )
    return ""


def check_stress_units(dataset: FidelityDataset, pairs: np.ndarray, min_count: int = 5) -> list[str]:
    """Warn for fidelities whose stress labels (stored in GPa) have a median largest |component| above
    IMPLAUSIBLE_STRESS over at least `min_count` of `pairs`' structures: readers take eV/Å³ (ASE units), so
    GPa or kBar numbers come out 160× or 1602× too large. Returns the suspicious names."""
    if dataset.stress is None:
        return []
    suspicious = []
    for k, name in enumerate(dataset.fidelities.names):
        s = pairs[pairs[:, 1] == k, 0]
        s = s[dataset.stress_mask[s, k]]
        if len(s) < min_count:
            continue
        median = float(np.median(np.abs(dataset.stress[s, k]).max(axis=(1, 2))))
        if median > IMPLAUSIBLE_STRESS:
            suspicious.append(name)
            log.warning(
                "%s: stresses at fidelity %r look like numbers in another unit (median largest component %.0f GPa "
                "after conversion; real data: 1-10); %s",
                dataset.source_of(name),
                name,
                median,
                _stress_unit_advice(dataset.source_of(name)),
            )
    suspicious += check_stress_sign(dataset, pairs, skip=set(suspicious))  # one warning per fidelity
    check_pressure_against_energies(dataset, pairs, skip=set(suspicious))
    return suspicious


def _stress_unit_advice(source: str) -> str:
    """How the stress labels of `source` (a file name, or several joined by ", ") are read, and how to convert them:
    MatPES records in kBar, files ASE reads in eV/Å³ (both said for a mix)."""
    from pathlib import Path

    from multifi.data.sources import guess_format

    def kind(name: str) -> str:
        try:
            return guess_format(Path(name))
        except Exception:  # noqa: BLE001 - a name that is no file (e.g. "data"): ASE's reading is the default
            return "ase"

    kinds = {kind(name) for name in source.split(", ")}
    advice = []
    if "matpes" in kinds:
        advice.append(
            "MatPES records' stresses are read in kBar (VASP's): a file in bar is 1000× too large (divide by 1000), "
            "in MPa 100× (divide by 100)"
        )
    if kinds - {"matpes"}:
        advice.append(
            "stress labels in files ASE reads are read in eV/Å³ (ASE units): multiply GPa by ase.units.GPa "
            "(1/160.2), kBar by 0.1·ase.units.GPa"
        )
    return "; ".join(advice)


def check_zero_stress(dataset: FidelityDataset, pairs: np.ndarray) -> dict[str, int]:
    """Warn per fidelity about structures among `pairs` whose stress labels are exactly 0 in every component, which
    no calculation gives (a cell relaxed to zero pressure keeps residual stresses): placeholders for stresses not
    computed, which train the model toward zero stress. Returns {fidelity: such structures} of those warned."""
    if dataset.stress is None or not len(pairs):
        return {}
    labelled = dataset.stress_mask[pairs[:, 0], pairs[:, 1]]
    s, k = pairs[labelled, 0], pairs[labelled, 1]
    zero = ~np.any(dataset.stress[s, k] != 0, axis=(1, 2))
    warned = {}
    for j, name in enumerate(dataset.fidelities.names):
        n = int((zero & (k == j)).sum())
        if not n:
            continue
        warned[name] = n
        log.warning(
            "%s: %d of %d structures with stress labels at fidelity %r have a stress of exactly 0 in every "
            "component, which no calculation gives: placeholders for stresses not computed? They train the model "
            "toward zero stress there; write those structures without stress",
            dataset.source_of(name),
            n,
            int((k == j).sum()),
            name,
        )
    return warned


def check_pressure_against_energies(dataset: FidelityDataset, pairs: np.ndarray, skip: set[str] = frozenset()) -> list:
    """Warn for fidelities whose stress labels carry a pressure their energies do not (pressure_offsets): a Pulay
    stress (a plane-wave cutoff too low for hard pseudopotentials: F, O, N) does this; trained on, it teaches
    pressures the energies contradict. Returns the PressureOffset of each composition found."""
    found = [f for f in pressure_offsets(dataset, pairs) if dataset.fidelities.names[f.k] not in skip]
    for k in dict.fromkeys(f.k for f in found):
        mine = [f for f in found if f.k == k]
        name = dataset.fidelities.names[k]
        log.warning(
            "%s: stresses at fidelity %r carry pressures their energies do not have in %d composition(s): %s "
            "(labels vs −dE/dV of the energies, GPa); a Pulay stress (plane-wave cutoff too low for hard "
            "pseudopotentials such as F, O, N)? Trained on, they teach those pressures (cells relaxed by the model "
            "too small where the labels' pressure is lower, too large where higher), the more the larger loss.stress; "
            "data.pulay_stress: drop leaves those compositions' stresses out, correct shifts their pressure to −dE/dV of "
            "their energies (which needs energies of a volume scan: through rattled snapshots it was 11-16 GPa off)",
            dataset.source_of(name),
            name,
            len(mine),
            ", ".join(f"{f.formula} {f.label:.0f} vs {f.energy:.0f}" for f in mine[:5])
            + (" …" if len(mine) > 5 else ""),
        )
    return found


@dataclass(frozen=True)
class PressureOffset:
    """A composition whose stress labels at fidelity k carry a pressure its energies do not: `atoms` (the sorted
    atomic numbers of one formula unit, int64 bytes: reduced_compositions), `formula`, the median label pressure
    −tr(σ)/3 and −dE/dV of its energies (GPa)."""

    k: int
    atoms: bytes
    formula: str
    label: float
    energy: float


def pressure_offsets(dataset: FidelityDataset, pairs: np.ndarray) -> list[PressureOffset]:
    """Per fidelity and reduced composition (MgO: every cell of Mg and O 1:1; ≥ 5 periodic structures among `pairs`
    with energies and stresses there, volumes per formula unit ≥ 0.5 % apart): the median label pressure against
    −dE/dV of a least-squares line through the energies per formula unit against the volume per formula unit, where
    they lie more than PRESSURE_GAP GPa and 4 standard errors of that slope apart (thermal displacements scatter the
    energies)."""
    from ase import Atoms
    from ase.units import GPa as ev_per_a3_per_gpa

    if dataset.stress is None:
        return []
    found = []
    for k in range(len(dataset.fidelities)):
        s = pairs[pairs[:, 1] == k, 0]
        s = s[dataset.stress_mask[s, k] & dataset.pbc[s].all(1) & ~np.isnan(dataset.energy[s, k])]
        reduced, units = reduced_compositions(dataset, s)
        volume = np.abs(np.linalg.det(dataset.cells[s])) / units  # Å³ per formula unit
        groups: dict[bytes, list[int]] = {}
        for i, key in enumerate(reduced):
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            m, v = s[rows], volume[rows]
            if len(m) < 5 or v.std() < 0.005 * v.mean():
                continue
            pressure = -np.trace(dataset.stress[m, k], axis1=1, axis2=2) / 3  # GPa
            (slope, _), cov = np.polyfit(v, dataset.energy[m, k] / units[rows], 1, cov=True)  # eV/Å³
            from_energy = -slope / ev_per_a3_per_gpa
            gap = abs(float(np.median(pressure)) - from_energy)
            if gap > PRESSURE_GAP and gap > 4 * np.sqrt(cov[0, 0]) / ev_per_a3_per_gpa:
                formula = Atoms(np.frombuffer(key, dtype=np.int64)).get_chemical_formula("metal")
                found.append(PressureOffset(k, key, formula, float(np.median(pressure)), float(from_energy)))
    return found


def reduced_compositions(dataset: FidelityDataset, structures: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Per structure of `structures`: its reduced composition (sorted atomic numbers of one formula unit, int64
    bytes) and [len(structures)] how many formula units it holds."""
    from math import gcd

    keys, units = [], np.ones(len(structures))
    for i, t in enumerate(np.asarray(structures).tolist()):
        z, n = np.unique(dataset.numbers[dataset.offsets[t] : dataset.offsets[t + 1]], return_counts=True)
        g = 0
        for c in n.tolist():
            g = gcd(g, c)
        keys.append(np.repeat(z.astype(np.int64), n // max(g, 1)).tobytes())
        units[i] = max(g, 1)
    return keys, units


def without_pulay_stress(dataset: FidelityDataset, setting: str) -> FidelityDataset:
    """`dataset` with data.pulay_stress `setting` (keep, correct, drop) applied to every structure's stresses: the
    offsets found on all of them (the labels' own consistency, as check_pressure_against_energies looks at it)."""
    from multifi.data.split import labelled_pairs

    if setting == "keep" or dataset.stress is None:
        return dataset
    every = labelled_pairs(dataset, np.arange(len(dataset)))
    return remove_pressure_offsets(dataset, pressure_offsets(dataset, every), setting)


def remove_pressure_offsets(dataset: FidelityDataset, offsets: list[PressureOffset], how: str) -> FidelityDataset:
    """`dataset` with the stress labels of every structure of each offset's composition and fidelity (any split)
    corrected (`how` = "correct": label pressure − energy pressure added to the diagonal, so that their pressure is
    the energies') or left out ("drop"); a copy, the input unchanged. Says what it changed."""
    if not offsets or dataset.stress is None:
        return dataset
    stress, mask = dataset.stress.copy(), dataset.stress_mask.copy()
    stressed = np.flatnonzero(mask.any(1))
    reduced, _ = reduced_compositions(dataset, stressed)
    changed = []
    for f in offsets:
        members = stressed[[a == f.atoms for a in reduced]]
        members = members[mask[members, f.k]]
        what = f"{dataset.fidelities.names[f.k]} {f.formula} ({len(members)} structures"
        if how == "drop":
            mask[members, f.k] = False
            stress[members, f.k] = 0.0
            changed.append(what + ")")
        else:
            stress[members, f.k] += (f.label - f.energy) * np.eye(3)  # pressure −tr(σ)/3: label → energy's
            changed.append(f"{what}: pressure {round(f.label):d} → {round(f.energy):d} GPa)")
    log.warning(
        "data.pulay_stress: %s: %s",
        "stresses left out" if how == "drop" else "pressure offsets removed",
        ", ".join(changed),
    )
    return replace(dataset, stress=stress, stress_mask=mask)


#: GPa: a composition's label pressure further than this from the pressure its energies imply is suspicious
PRESSURE_GAP = 50.0


def check_stress_sign(
    dataset: FidelityDataset, pairs: np.ndarray, min_groups: int = 3, skip: set[str] = frozenset()
) -> list[str]:
    """Warn for fidelities whose stresses look sign-flipped or off by a unit, from how the pressure −tr(σ)/3
    follows the volume among structures of one composition (same atoms) at different volumes (at least
    `min_groups` compositions of ≥ 5 structures whose volumes differ by ≥ 0.5 %):
    - it rises with the volume in most compositions (median correlation above +0.5): VASP's sign, not ASE's
      (real data: about −0.9; the MatPES-schema PBE solids of ../shared/data: −0.93 over 33 compositions);
    - the median bulk modulus −dP/dlnV it implies (over compositions whose own pressure-volume correlation is
      below −0.4: a composition holding polymorphs at volumes apart has little correlation and a slope biased low) is far from
      any solid's: below SOFTEST_MEDIAN_MODULUS (eV/Å³ or GPa given where kBar, MatPES, or eV/Å³, ASE, is
      read), above HARDEST_MEDIAN_MODULUS + 6 × the median pressure (GPa or kBar read as eV/Å³; compression
      stiffens a solid by 4-6× its pressure), or below TYPICAL_MEDIAN_MODULUS (a question: molecular crystals
      and alkali metals are that soft, inorganic solids rarely; GPa where kBar is read gives 10× small numbers;
      not asked when a quarter of the compositions are stiffer than 3 × TYPICAL_MEDIAN_MODULUS, as a 10× error
      softens all: _stiff_share_answers).
    Fidelities in `skip` (warned about already) are not checked. Returns the suspicious names (not those of
    the last, milder case)."""
    if dataset.stress is None:
        return []
    suspicious = []
    for k, name in enumerate(dataset.fidelities.names):
        if name in skip:
            continue
        groups = [(v, p) for _, v, p in _volume_pressure_groups(dataset, pairs, k) if p.std() > 0]
        corr = [float(np.corrcoef(v, p)[0, 1]) for v, p in groups]
        moduli = [float(-np.polyfit(np.log(v), p, 1)[0]) for v, p in groups]
        where = f"{dataset.source_of(name)}: stresses at fidelity {name!r}"
        if len(corr) >= min_groups and np.median(corr) > 0.5:
            suspicious.append(name)
            flipped = -float(np.median(moduli))
            log.warning(
                "%s look sign-flipped: the pressure rises with the volume in %d of %d compositions (median "
                "correlation %+.2f; real data: about -0.9); labels are read with ASE's sign (positive = tensile), "
                "VASP's stress has the opposite one: multiply them by -1 (flipped, they imply a median bulk "
                "modulus of %.3g GPa; real solids: about 1-450, most 30-300)%s",
                where,
                sum(c > 0 for c in corr),
                len(corr),
                float(np.median(corr)),
                flipped,
                _unit_hint(flipped) or _softness_question(flipped),
            )
            continue
        # only where the pressure clearly follows the volume (relaxed cells all at P ≈ 0 have no slope)
        clear = [(m, float(np.abs(p).mean())) for (_, p), c, m in zip(groups, corr, moduli) if c < -0.4]
        if not (len(corr) >= min_groups and np.median(corr) < -0.5 and len(clear) >= min_groups):
            continue
        modulus = float(np.median([m for m, _ in clear]))
        pressure = float(np.median([p for _, p in clear]))
        implied = (
            f"how the pressure follows the volume implies a median bulk modulus of {modulus:.3g} GPa over "
            f"{len(clear)} compositions (median |pressure| {pressure:.3g} GPa)"
        )
        hint = _unit_hint(modulus, pressure)
        if hint:
            suspicious.append(name)
            log.warning(
                "%s look too %s: %s (real solids: about 1-450 GPa, most 30-300, more under pressure)%s",
                where,
                "small" if modulus < SOFTEST_MEDIAN_MODULUS else "large",
                implied,
                hint,
            )
        elif _softness_question(modulus) and not _stiff_share_answers(m for m, _ in clear):
            log.warning("%s look small: %s%s", where, implied, _softness_question(modulus))
    return suspicious


def _stiff_share_answers(moduli) -> bool:
    """Whether the compositions' implied moduli (GPa) answer the 10× question: a 10× unit error shrinks every
    composition, so a quarter or more of them as stiff as 3 × TYPICAL_MEDIAN_MODULUS (450 GPa and more if 10×
    small: near diamond's) says the soft ones are soft. A few that stiff among many soft ones do not: compression
    stiffens, and MatPES-like PBE solids imply up to 475 GPa (../shared/data: 21 of 29 compositions above 45 GPa;
    2 of 24 when the stresses are 10× small)."""
    moduli = list(moduli)
    return sum(m >= 3 * TYPICAL_MEDIAN_MODULUS for m in moduli) >= STIFF_SHARE * len(moduli)


#: share of compositions at ≥ 3 × TYPICAL_MEDIAN_MODULUS that answers the 10× question (see _stiff_share_answers)
STIFF_SHARE = 0.25


def _unit_hint(modulus: float, pressure: float = 0.0) -> str:
    """What a median bulk modulus (GPa) far from any solid's at that median pressure (GPa) says about the stress
    unit ('' when plausible)."""
    if modulus < SOFTEST_MEDIAN_MODULUS:
        return (
            "; that far below, the unit is off too: eV/Å³ or GPa given where kBar (MatPES) is read, or eV/Å³ read "
            "as GPa?"
        )
    if modulus > HARDEST_MEDIAN_MODULUS + 6 * pressure:
        return (
            "; that far above, the unit is off too: GPa or kBar numbers read as eV/Å³ (ASE units; multiply GPa "
            "by ase.units.GPa, kBar by 0.1·ase.units.GPa)?"
        )
    return ""


def _softness_question(modulus: float) -> str:
    """The 10× question of a median bulk modulus (GPa) that only soft solids have ('' above TYPICAL_MEDIAN_MODULUS)."""
    if SOFTEST_MEDIAN_MODULUS <= modulus < TYPICAL_MEDIAN_MODULUS:
        return (
            "; molecular crystals and alkali metals are that soft, most inorganic solids are not (30-300 GPa): if "
            "these are, the stresses may be GPa numbers where kBar (MatPES) is read, 10× too small"
        )
    return ""


#: GPa: a median bulk modulus over compositions below this looks like stresses 10-1000× too small (the softest
#: solids, alkali metals and rare-gas crystals, reach 1-3 GPa; MatPES-like data sets have medians of ~70)
SOFTEST_MEDIAN_MODULUS = 3.0
#: GPa: above this plus 6× the median pressure (compression stiffens), 160× or 1602× too large (diamond, the
#: stiffest at ambient pressure, has 443 GPa)
HARDEST_MEDIAN_MODULUS = 1000.0
#: GPa: below this, a question (molecular crystals, alkali metals: 2-15 GPa; GPa read where kBar is: 10× small)
TYPICAL_MEDIAN_MODULUS = 15.0


def _volume_pressure_groups(dataset: FidelityDataset, pairs: np.ndarray, k: int) -> list[tuple]:
    """(structure indices [M], volumes [M] Å³, pressures −tr(σ)/3 [M] GPa) of each composition with ≥ 5
    periodic structures stressed at fidelity k among `pairs`, whose volumes differ by ≥ 0.5 % (relative std)."""
    offsets = np.asarray(dataset.offsets)
    volume = np.abs(np.linalg.det(dataset.cells))
    s = pairs[pairs[:, 1] == k, 0]
    s = s[dataset.stress_mask[s, k] & dataset.pbc[s].all(1)]
    groups: dict[bytes, list[int]] = {}
    for i in s.tolist():
        groups.setdefault(np.sort(dataset.numbers[offsets[i] : offsets[i + 1]]).tobytes(), []).append(i)
    out = []
    for m in groups.values():
        v = volume[m]
        if len(m) >= 5 and v.std() >= 0.005 * v.mean():
            p = -np.trace(dataset.stress[m, k], axis1=1, axis2=2) / 3
            out.append((np.asarray(m), v, p))
    return out
