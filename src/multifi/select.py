"""Which unlabelled structures to compute next at a fidelity: random, uncertainty, diversity, batch.

All strategies work on the model's readout features at the requested fidelity (uncertainty.py):
- random       a seeded random sample
- uncertainty  the n largest LLPR σ (needs the model's LLPR calibration)
- diversity    farthest-point sampling on the per-atom mean of the last hidden activations (Euclidean),
               starting from the already labelled structures: the pool's and, given as `anchors`, the
               model's own training structures at the fidelity (or a seeded random first pick)
- batch        greedy LLPR variance reduction: take the largest σ, then update Σ as if that structure
               were labelled (Σ ← Σ − Σ f fᵀ Σ / (1 + fᵀ Σ f); no label needed), so structures similar
               to one already picked lose their uncertainty: uncertainty and diversity in one rule
Every strategy is deterministic given its seed, never picks a structure twice, and never one that is
labelled (at this fidelity in the pool, or listed in `exclude`).
"""

from __future__ import annotations

import logging

import numpy as np

from multifi.data.dataset import GEOMETRY_TOLERANCE
from multifi.data.same_geometry import MoleculeTable, same_molecules
from multifi.errors import MultifiError

log = logging.getLogger("multifi")

STRATEGIES = ("random", "uncertainty", "diversity", "batch")


def select_structures(
    potential,
    pool,
    fidelity: str,
    n: int,
    strategy: str,
    seed: int = 0,
    exclude=(),
    llpr=None,
    batch_size: int = 64,
    features: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
    copies: np.ndarray | None = None,
) -> np.ndarray:
    """Indices into `pool` (a FidelityDataset) of the n structures to label at `fidelity`, in pick order.

    exclude: structure keys already labelled; pool structures labelled at `fidelity` are excluded too.
    llpr: an uncertainty.LLPR (needed by uncertainty and batch). features: precomputed readout features
    of every pool structure at `fidelity` [S, H+1] (else computed here). anchors: per-atom mean features
    [m, H] of labelled structures outside the pool (the model's training structures; see
    `mean_hidden`), which diversity keeps its picks away from like the pool's labelled ones. copies: first_copies
    of the pool (else computed here)."""
    from multifi.uncertainty import dataset_features

    if strategy not in STRATEGIES:
        raise MultifiError(f"unknown selection strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if n < 0:
        raise MultifiError(f"number of structures to select must be ≥ 0, got {n}")
    labelled = labelled_mask(pool, fidelity, exclude, copies)
    candidates = np.flatnonzero(~labelled)
    if n > len(candidates):
        why = (
            f"unlabelled ones remain (of {len(pool)} in the pool; the others are labelled at {fidelity} there, listed in "
            "--exclude, in the model's training data or repeat a geometry)"
        )
        if not len(candidates):
            raise MultifiError(f"{pool.source or 'pool'}: asked for {n} structures but no {why}: nothing to pick")
        log.warning(
            "%s: asked for %d structures but only %d %s: picking all %d",
            pool.source or "pool",
            n,
            len(candidates),
            why,
            len(candidates),
        )
        n = len(candidates)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return rng.permutation(candidates)[:n]
    _check_pool_elements(potential, pool, fidelity, strategy)
    if strategy in ("uncertainty", "batch") and llpr is None:
        raise MultifiError(f"strategy {strategy} needs the model's LLPR calibration (run `multifi calibrate`)")
    if features is None:
        features, _ = dataset_features(potential, pool, np.arange(len(pool)), fidelity, batch_size)
    if strategy in ("uncertainty", "batch"):
        sigma = llpr.of(fidelity, "select").sigma(features[candidates])
        first = undetermined_first(potential, pool, fidelity, candidates, sigma, n)  # positions in candidates
        if strategy == "uncertainty":
            rest = np.flatnonzero(~np.isin(np.arange(len(candidates)), first))
            order = rest[np.lexsort((rng.permutation(len(rest)), -sigma[rest]))]  # ties: seeded order
            return candidates[np.concatenate([first, order[: n - len(first)]])]
        cov = llpr.of(fidelity, "select").cov  # the forced picks condition the later ones, as any pick does
        return candidates[greedy_variance(features[candidates], cov, n, rng, first=first)]
    return farthest_points(mean_hidden(features), candidates, np.flatnonzero(labelled), n, rng, anchors)


#: diversity keeps its picks away from at most this many of the model's training structures (a seeded sample
#: of them beyond it): their features cost a forward pass each
MAX_ANCHORS = 5000


def training_anchors(potential, dataset, fidelity: str, batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """Per-atom mean features [m, H] at `fidelity` of the structures of `dataset` (labelled ones outside the
    pool, e.g. the model's training structures), at most MAX_ANCHORS of them (a seeded sample)."""
    from multifi.uncertainty import dataset_features

    rows = np.arange(len(dataset))
    if len(rows) > MAX_ANCHORS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_ANCHORS, replace=False))
        log.info(
            "diversity: %d of the %d training structures at %s as labelled points", MAX_ANCHORS, len(dataset), fidelity
        )
    if not len(rows):
        return np.zeros((0, potential.head.mlps[0][-1].in_features))
    features, _ = dataset_features(potential, dataset.subset(rows), np.arange(len(rows)), fidelity, batch_size)
    return mean_hidden(features)


def mean_hidden(features: np.ndarray) -> np.ndarray:
    """Per-atom mean of the last hidden activations [S, H] from readout features [S, H+1] (Σ h, atom count)."""
    return features[:, :-1] / np.maximum(features[:, -1:], 1.0)


def outside_training_geometry(potential, pool) -> np.ndarray:
    """[len(pool)] bool: structures where the model extrapolates in geometry by the rule `predict` warns with
    (models.elements.outside_geometry: atoms closer than CONTACT_FRACTION of their pair's shortest distance in
    training, or farther from their nearest neighbour than REACH_FACTOR × their element's farthest in training).
    False everywhere for a model that recorded neither."""
    import torch

    from multifi.data.neighbors import NeighborCache
    from multifi.models.elements import outside_geometry

    if not (potential.head.contact.any() or potential.head.reach.any()) or len(pool) == 0:
        return np.zeros(len(pool), bool)
    nl = NeighborCache(pool, potential.cutoff, progress=False)
    structures = np.arange(len(pool))
    i, j, shifts, counts = nl.edges(structures)
    offsets = np.asarray(pool.offsets)
    owner = np.repeat(structures, counts)
    gi, gj = offsets[owner] + i, offsets[owner] + j
    vec = (
        pool.positions[gj] - pool.positions[gi] + np.einsum("ea,eab->eb", shifts.astype(np.float64), pool.cells[owner])
    )
    numbers = torch.as_tensor(np.asarray(pool.numbers, dtype=np.int64))
    close, far, _ = outside_geometry(
        potential, numbers, torch.as_tensor(gi), torch.as_tensor(gj), torch.as_tensor(np.linalg.norm(vec, axis=1))
    )
    out = np.zeros(len(pool), bool)
    out[owner[close.cpu().numpy()]] = True
    out[np.repeat(structures, pool.n_atoms)[far.cpu().numpy()]] = True
    return out


#: Å: structures whose atoms lie this close to another's, after translation, are one structure for selection:
#: coordinates rounded to 1e-4 Å move an atom by up to 0.87e-4 Å and a distance by up to 1.7e-4 Å
SAME_GEOMETRY_TOL = 3e-4
#: Å: a molecule is one of the known (e.g. the run's) molecules when its sorted distances agree this well (up to
#: rotation and atom order; an index by composition and size keeps this fast): coordinates printed to 3 decimals
#: move a distance by up to 1.7e-3 Å (dataset.GEOMETRY_TOLERANCE, which structures merged by key must meet)
MOLECULE_COPY_TOL = GEOMETRY_TOLERANCE


def labelled_mask(pool, fidelity: str, exclude=(), first: np.ndarray | None = None) -> np.ndarray:
    """[S] True for pool structures not to pick: with an energy at `fidelity`, a key in `exclude`, the same
    structure as such a one (under another key), or a later copy of a structure earlier in the pool (copies:
    `first_copies`, computed here unless given)."""
    mask = (
        np.isin(pool.keys.astype(str), np.asarray(list(exclude), dtype=str))
        if len(exclude)
        else np.zeros(len(pool), bool)
    )
    if fidelity in pool.fidelities:
        mask |= ~np.isnan(pool.energy[:, pool.fidelities.index(fidelity)])
    if len(pool) < 2:
        return mask
    first = first_copies(pool) if first is None else first
    done = np.zeros(len(pool), bool)
    np.logical_or.at(done, first, mask)  # a structure labelled under any of its copies' keys
    return mask | done[first] | (np.arange(len(pool)) != first)


def copies_of(known, pool, tol: float = SAME_GEOMETRY_TOL) -> np.ndarray:
    """[len(pool)] bool: pool structures that are a structure of `known` themselves (within `tol` Å up to a
    translation, periodic ones modulo their lattice; molecules also up to rotation, reflection and atom order)."""
    from multifi.data.same_geometry import same_geometry_pairs

    periodic_known = np.flatnonzero(known.pbc.any(1))
    periodic_pool = np.flatnonzero(pool.pbc.any(1))
    out = same_molecules(pool, known, max(tol, MOLECULE_COPY_TOL))
    if len(periodic_known) and len(periodic_pool):
        both = _joined(known.subset(periodic_known), pool.subset(periodic_pool))
        a, b, alias = same_geometry_pairs(*both, tol, shift=True)
        k = len(periodic_known)
        known_like = np.zeros(k + len(periodic_pool), bool)
        known_like[:k] = True
        for x, y in ((a, b), (b, a)):  # a pool structure paired with a known one is one of them
            direct = ~alias & (x < k)
            known_like[y[direct]] = True
        known_like[b[alias]] |= known_like[a[alias]]  # identical to one that is (alias: b is whatever a is)
        known_like[a[alias]] |= known_like[b[alias]] & (b[alias] < k)
        out[periodic_pool[known_like[k:]]] = True
    return out


def _joined(a, b) -> tuple:
    """numbers, positions, offsets, cells, pbc of two datasets one after the other."""
    return (
        np.concatenate([np.asarray(a.numbers), np.asarray(b.numbers)]),
        np.concatenate([np.asarray(a.positions), np.asarray(b.positions)]),
        np.concatenate([a.offsets, np.asarray(b.offsets[1:]) + a.offsets[-1]]),
        np.concatenate([np.asarray(a.cells), np.asarray(b.cells)]),
        np.concatenate([np.asarray(a.pbc), np.asarray(b.pbc)]),
    )


def first_copies(pool, tol: float = SAME_GEOMETRY_TOL) -> np.ndarray:
    """[S] for each pool structure the first one (lowest index, itself a first) that it is a copy of: the same
    geometry within `tol` Å up to a translation (periodic structures, modulo their lattice), molecules also up to
    rotation, reflection and atom order (MoleculeTable); itself when none. Picking two copies buys one calculation
    twice. No chains: near-copies each within `tol` of the next stay apart beyond it."""
    from multifi.data.same_geometry import first_of_same_geometry

    first = np.arange(len(pool), dtype=np.int64)
    periodic = np.flatnonzero(pool.pbc.any(1))
    if len(periodic) > 1:
        crystals = pool.subset(periodic)
        got = first_of_same_geometry(
            crystals.numbers, crystals.positions, crystals.offsets, crystals.cells, crystals.pbc, tol, shift=True
        )
        first[periodic] = periodic[got]
    table = MoleculeTable(pool, tol, cache=True)  # a first is compared with each of its copies
    is_first = np.ones(len(pool), bool)
    for s in np.flatnonzero(~pool.pbc.any(1)).tolist():  # in order: a copy of an earlier first, or a first
        t = table.find(pool, s, allowed=is_first, below=s)
        if t is not None:
            first[s], is_first[s] = t, False
    return first


def greedy_variance(
    f: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator, first: np.ndarray | None = None
) -> np.ndarray:
    """Greedy batch by LLPR posterior variance: positions into f [m, H+1] in pick order.

    Each pick has the largest variance fᵀΣf under the current Σ; Σ is then updated by the rank-one
    formula as if the pick were a training structure, which lowers the variance of similar ones. `first`:
    positions picked before all others whatever their variance (n includes them)."""
    fs = f @ np.linalg.cholesky(_psd(cov))  # fᵀΣf = |fs|²; rank-one updates act on the whitened features
    var = (fs**2).sum(1)
    taken = np.zeros(len(f), bool)
    tie = rng.permutation(len(f))
    forced = [] if first is None else [int(x) for x in first][:n]
    picks = []
    for step in range(n):
        v = np.where(taken, -np.inf, var)
        best = forced[step] if step < len(forced) else int(np.lexsort((tie, -v))[0])
        picks.append(best)
        taken[best] = True
        g = fs[best]
        proj = fs @ g  # fᵢᵀ Σ f_best
        var = var - proj**2 / (1.0 + g @ g)
        # Σ' = L (I − g gᵀ / (1 + gᵀg)) Lᵀ: whitened features follow through the square root of that factor
        fs = fs - np.outer(proj, g) * (1.0 - 1.0 / np.sqrt(1.0 + g @ g)) / max(g @ g, 1e-300)
    return np.asarray(picks, dtype=np.int64)


def undetermined_first(
    potential, pool, fidelity: str, candidates: np.ndarray, score: np.ndarray, n: int | None = None
) -> np.ndarray:
    """Positions in `candidates` to pick before all others (at most n), best `score` first: for every element
    whose reference energy at `fidelity` the training labels leave undetermined (estimated from the other
    fidelities, or split within a composition seen only in fixed proportions), the highest-scoring candidate
    that holds it, until each such element is covered. Their energies can be off by eV through the estimate,
    which the LLPR σ does not see, and one label of each fixes it."""
    import torch

    k = potential.fidelity_index(fidelity)
    head = potential.head
    structure = np.repeat(np.arange(len(pool)), pool.n_atoms)
    numbers = torch.as_tensor(np.asarray(pool.numbers, dtype=np.int64))
    column = torch.full((len(pool),), k, dtype=torch.long)
    determined = head.determined_structures(numbers, torch.as_tensor(structure), column, len(pool)).cpu().numpy()
    open_z = set(head.open_elements(0 if head.shared_baseline else k))
    fitted = head.fitted[:, 0 if head.shared_baseline else k].cpu().numpy()
    todo = np.flatnonzero(~determined[candidates])
    if not len(todo):
        return todo
    order = todo[np.argsort(-score[todo], kind="stable")]
    covered: set[int] = set()
    picks = []
    for c in order.tolist():
        if n is not None and len(picks) >= n:
            break
        atoms = slice(pool.offsets[candidates[c]], pool.offsets[candidates[c]] + pool.n_atoms[candidates[c]])
        elements = {z for z in np.unique(pool.numbers[atoms]).tolist() if not fitted[z] or z in open_z}
        if elements - covered:
            picks.append(c)
            covered |= elements
    if not picks:
        return np.zeros(0, np.int64)
    from ase.data import chemical_symbols

    log.info(
        "%s: %d structure(s) picked first: they hold %s, whose %s reference energies the training labels leave "
        "undetermined (their predictions can be off by eV, which the LLPR σ does not see; one label of each "
        "fixes it)",
        pool.source or "pool",
        len(picks),
        ", ".join(chemical_symbols[z] for z in sorted(covered)),
        fidelity,
    )
    return np.asarray(picks, dtype=np.int64)


def _psd(cov: np.ndarray) -> np.ndarray:
    """cov, made symmetric and strictly positive definite for a Cholesky factor."""
    c = (cov + cov.T) / 2
    return c + np.eye(len(c)) * max(np.abs(np.diag(c)).max(initial=0.0), 1e-300) * 1e-12


def _check_pool_elements(potential, pool, fidelity: str, strategy: str) -> None:
    """Strategies that rank by the model's features refuse a pool with elements the model never saw (their
    features and σ would come from untrained embeddings), as `predict` does; estimated references warn."""
    from multifi.models.elements import check_elements

    try:
        check_elements(
            potential, pool.numbers, pool.n_atoms, potential.fidelity_index(fidelity), pool.source, keys=pool.keys
        )
    except MultifiError as exc:
        raise MultifiError(
            f"{exc}; strategy {strategy} ranks by the model's features, which are meaningless for it: "
            "remove such structures from the pool, or pick with --strategy random"
        ) from None


def farthest_points(
    x: np.ndarray,
    candidates: np.ndarray,
    labelled: np.ndarray,
    n: int,
    rng: np.random.Generator,
    anchors: np.ndarray | None = None,
) -> np.ndarray:
    """Farthest-point sampling on rows of x [S, D]: n of `candidates`, each the farthest (Euclidean) from
    the labelled rows, the `anchors` [m, D] (labelled points outside x) and the already picked ones; the
    first is a seeded random one if there is nothing labelled."""
    if n == 0:
        return np.zeros(0, np.int64)
    xc = x[candidates]
    dist = np.full(len(candidates), np.inf)
    sq = (xc**2).sum(1)
    seen = x[labelled] if anchors is None or not len(anchors) else np.concatenate([x[labelled], anchors])
    for start in range(0, len(seen), 512):  # |a − b|² = |a|² + |b|² − 2a·b, 512 labelled at a time
        lab = seen[start : start + 512]
        d = sq[:, None] + (lab**2).sum(1)[None, :] - 2.0 * xc @ lab.T
        dist = np.minimum(dist, np.maximum(d, 0.0).min(1))
    picks = []
    tie = rng.permutation(len(candidates))
    for _ in range(n):
        best = int(tie[0]) if not np.isfinite(dist).any() and not picks else int(np.lexsort((tie, -dist))[0])
        picks.append(best)
        dist = np.minimum(dist, ((xc - xc[best]) ** 2).sum(1))
        dist[best] = -np.inf
    return candidates[np.asarray(picks, dtype=np.int64)]


def read_pool(path: str):
    """Candidate structures as a FidelityDataset: a labelled data file, or any file ASE reads without labels
    (keys: info['key'], else a geometry hash). Frames of one structure (same key) are merged, as for training:
    a structure whose frame at another fidelity comes first in the file is still labelled at `fidelity`."""
    from pathlib import Path

    from multifi.config import SourceConfig
    from multifi.data.dataset import FidelityDataset
    from multifi.data.sources import guess_format, merge_parts, read_sources

    p = Path(path)
    if not p.exists():
        from multifi.data.sources import is_qm9_text

        if is_qm9_text(str(path)):  # a training source's form: a pool is a structure file (or a saved dataset)
            raise MultifiError(
                f"{path}: a pool is a structure file or a saved dataset, not a QM9 source; convert the molecules "
                "first (`multifi data convert … --out pool.extxyz`)"
            )
        raise MultifiError(f"{p}: no such file")
    if p.is_file() and p.stat().st_size == 0:
        raise MultifiError(f"{p}: empty file")
    try:
        return read_sources([SourceConfig(path=str(p))], skip_invalid=True)  # a NaN label: not labelled (warned)
    except MultifiError:
        if guess_format(p) != "ase":
            raise
    from multifi.data.readers.ase_files import read_frames

    records, n_labelled = [], 0
    for i, atoms in enumerate(read_frames(p, ":", stress_key="stress")):
        rec = _pool_record(atoms, f"{p}: frame {i} (0-based)")
        n_labelled += bool(rec["labels"])
        records.append(rec)
    if n_labelled:
        log.info("%s: %d of %d frames labelled (they are not picked at their fidelity)", p, n_labelled, len(records))
    _key_moved_frames(records, p)
    return merge_parts([FidelityDataset.from_records(records, source=str(p))])  # says how many frames merged


def _key_moved_frames(records: list[dict], path) -> None:
    """Unlabelled frames that repeat a key with another geometry than the key's first frame (an MD trajectory
    started from a dataset structure copies its info['key'] into every frame) are other structures: keyed
    '<key>#<frame>'. Frames of one geometry under one key stay one structure (merged); labelled frames keep their
    key (another geometry under it is the merge's error)."""
    from multifi.data.dataset import GEOMETRY_TOLERANCE, FidelityDataset
    from multifi.data.same_geometry import first_of_same_geometry

    by_key: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec["key"] is not None:
            by_key.setdefault(rec["key"], []).append(i)
    moved = 0
    for key, frames in by_key.items():
        if len(frames) < 2 or all(records[i]["labels"] for i in frames):
            continue
        sub = FidelityDataset.from_records([{**records[i], "key": f"{i}", "labels": {}} for i in frames])
        first = first_of_same_geometry(  # the rule by which frames under one key merge (a rigid shift allowed)
            sub.numbers, sub.positions, sub.offsets, sub.cells, sub.pbc, GEOMETRY_TOLERANCE, shift=True
        )
        for i, f in zip(frames, first.tolist()):
            if f != 0 and not records[i]["labels"]:  # another geometry than the key's first frame
                records[i]["key"] = f"{key}#{frames[f]}"
                moved += 1
    if moved:
        log.info(
            "%s: %d unlabelled frames repeat another frame's key with another geometry (e.g. an MD trajectory "
            "keeps its start's info['key']): read as other structures, keyed '<key>#<frame>' (0-based)",
            path,
            moved,
        )


def _pool_record(atoms, where: str) -> dict:
    """A from_records record of one pool frame: its labels when it names a fidelity and carries one (so a
    structure labelled at the target fidelity is never picked), else none."""
    from multifi.data.readers.ase_files import PREDICTION_MARK, _record, from_multifi_calculator

    keys = None  # a `multifi predict` output: its input's labels, not its predictions
    if PREDICTION_MARK in atoms.info:
        keys = {"energy": "ref_energy", "forces": "ref_forces", "stress": "ref_stress"}
    try:
        if not from_multifi_calculator(atoms):  # a multifi MD trajectory's results are no labels
            return _record(atoms, None, where, keys)
    except MultifiError:  # no fidelity or no label: a candidate without labels
        pass
    return {
        "numbers": atoms.numbers,
        "positions": atoms.positions,
        "cell": atoms.cell.array if atoms.pbc.any() else None,
        "pbc": atoms.pbc,
        "key": None if atoms.info.get("key") is None else str(atoms.info["key"]),
        "labels": {},
    }
