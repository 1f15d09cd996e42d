"""Evaluation of a potential on (structure, fidelity) samples: per-fidelity metrics and predictions."""

from __future__ import annotations

import logging

import numpy as np
import torch

from multifi.data.batch import GraphCollator
from multifi.data.checks import check_overlaps
from multifi.data.dataset import FidelityDataset, ranges
from multifi.data.fidelity import alike_names
from multifi.data.neighbors import NeighborCache, make_neighbors
from multifi.data.sources import fidelity_field
from multifi.errors import MultifiError
from multifi.keys import COUNT, ESTIMATED, FITTED_ONLY, UNSEEN
from multifi.models.elements import open_compositions
from multifi.train.metrics import FidelityMetrics

log = logging.getLogger("multifi")


#: meV/atom: no trained potential errs by 1 eV/atom on its own level of theory (another unit or method's labels)
IMPLAUSIBLE_MEV_PER_ATOM = 1000.0


def evaluate_pairs(
    potential,
    dataset: FidelityDataset,
    neighbors: NeighborCache | None,
    pairs: np.ndarray,
    batch_size: int = 64,
    return_predictions: bool = False,
    groups: np.ndarray | None = None,
):
    """Per-fidelity metrics of `potential` on `pairs` (fidelity indices of `dataset`, mapped to the model's by name).

    A structure with an element that no training label of the model contained (its reference energy is
    undefined: errors of electronvolts) is left out of the metrics, counted under keys.UNSEEN of its fidelity
    and warned about; its prediction (return_predictions: [P] eV, in the order of `pairs`) is still made.
    Structures with an element whose reference at the evaluated fidelity was estimated from other fidelities
    stay in the metrics; their count (keys.ESTIMATED) and the metrics without them (keys.FITTED_ONLY, the
    structures a model trained on that fidelity alone could predict) are added when there are any.

    `groups` [P] int 0…G−1: the metrics of each group of pairs too, from the same predictions, returned last as a
    list of G (the warnings about unseen elements said once, for all pairs)."""
    potential.eval()
    model_fidelities(potential, dataset, pairs)  # a fidelity the model lacks: an error before any work
    if neighbors is None:  # new data: the overlap check training did on its own
        neighbors = make_neighbors(dataset, potential.cutoff, progress=False)
        check_overlaps(dataset, neighbors)
    codes = np.zeros(len(pairs), np.int64) if groups is None else np.asarray(groups, np.int64)
    n_groups = int(codes.max()) + 1 if len(codes) else 1
    unseen = structures_with_unseen_elements(potential, dataset, pairs[:, 0])
    estimated = ~unseen & pairs_with_estimated_references(potential, dataset, pairs)
    kinds = {"fitted": ~unseen & ~estimated, "estimated": estimated, "unseen": unseen}
    metrics, energy = {}, np.empty(len(pairs))
    for name, mask in kinds.items():
        if mask.any() and (name != "unseen" or return_predictions):
            preds = []
            metrics[name] = _predict(
                potential, dataset, neighbors, pairs[mask], batch_size, preds, codes[mask], n_groups
            )
            energy[mask] = np.concatenate(preds)

    def result_of(at: np.ndarray, group: int | None, warn: bool) -> dict:
        """The metrics of the pairs `at` [P] bool, from the accumulators of `group` (None: all)."""
        part = {n: m[group] if group is not None else sum(m[1:], m[0]) for n, m in metrics.items()}
        total = FidelityMetrics(list(potential.fidelities.names))
        for name in ("fitted", "estimated"):
            if name in part:
                total.acc += part[name].acc
        result = total.compute()
        if (estimated & at).any():
            _add_fitted_only(potential, dataset, pairs[estimated & at], result, part.get("fitted"))
        if (unseen & at).any():
            _report_unseen(potential, dataset, pairs[unseen & at], result, warn)
        return result

    result = result_of(np.ones(len(pairs), bool), None, warn=True)
    if groups is None:
        return (result, energy) if return_predictions else result
    by_group = [result_of(codes == g, g, warn=False) for g in range(n_groups)]
    return (result, energy, by_group) if return_predictions else (result, by_group)


def pairs_with_estimated_references(potential, dataset: FidelityDataset, pairs: np.ndarray) -> np.ndarray:
    """[P] bool: the structure has an element whose reference energy at the pair's fidelity (mapped to the
    model's by name) was estimated, not fitted to labels of that fidelity, or a composition those labels fix
    only in part (models.elements)."""
    fitted = potential.head.fitted.detach().cpu().numpy()  # [119, K]
    if potential.head.shared_baseline:
        fitted = fitted[:, :1]
    to_model = model_fidelities(potential, dataset, pairs)
    column = np.zeros(len(pairs), np.int64) if fitted.shape[1] == 1 else to_model[pairs[:, 1]]
    n = dataset.n_atoms[pairs[:, 0]]
    atoms = ranges(dataset.offsets[pairs[:, 0]], n)
    numbers = np.clip(dataset.numbers[atoms], 0, len(fitted) - 1)
    missing = (~fitted[numbers, np.repeat(column, n)]).astype(np.int64)
    if not len(n):
        return np.zeros(0, bool)
    estimated = np.add.reduceat(missing, np.concatenate([[0], np.cumsum(n)[:-1]])) > 0
    return estimated | open_compositions(potential, numbers, n, column)


def _add_fitted_only(potential, dataset, pairs: np.ndarray, result: dict, fitted) -> None:
    """keys.ESTIMATED counts (structures with an energy label: the estimate moves energies only) and
    keys.FITTED_ONLY metrics per fidelity that had estimated references."""
    only = fitted.compute() if fitted is not None else {}
    names = model_fidelities(potential, dataset, pairs)
    labelled = dataset.energy_mask[pairs[:, 0], pairs[:, 1]]
    for k in np.unique(pairs[:, 1]):
        name = potential.fidelities.names[int(names[int(k)])]
        n = int((labelled & (pairs[:, 1] == k)).sum())
        if name in result and n:
            result[name][ESTIMATED] = n
            result[name][FITTED_ONLY] = only.get(name, {COUNT: 0})


def _predict(
    potential, dataset, neighbors, pairs: np.ndarray, batch_size: int, preds: list, codes: np.ndarray, n_groups: int
) -> list[FidelityMetrics]:
    """Metrics accumulated over `pairs`, one accumulator per group (`codes` [P] 0…n_groups−1); the predicted
    energies [eV] appended to `preds` batch by batch."""
    collate = GraphCollator(dataset, neighbors)
    to_model = model_fidelities(potential, dataset, pairs)
    names = list(potential.fidelities.names)
    metrics = FidelityMetrics.in_groups(names, n_groups)
    forces_on = dataset.forces is not None
    stress_on = dataset.stress is not None
    param = next(potential.parameters())
    for start in range(0, len(pairs), batch_size):
        g = collate(pairs[start : start + batch_size]).to("cpu", param.dtype)
        g.fidelity = torch.as_tensor(to_model[g.fidelity.numpy()])
        want_f = forces_on and bool(g.forces_mask.any())
        out = potential(g.to(param.device), forces=want_f, stress=stress_on and bool(g.stress_mask.any()))
        out = {k: v.detach().cpu() for k, v in out.items()}
        slots = torch.as_tensor(codes[start : start + batch_size]) * len(names) + g.fidelity
        metrics.update(out, g, slots)
        preds.append(out["energy"].numpy())
    return metrics.split(n_groups)


def energies_at(potential, dataset: FidelityDataset, structures: np.ndarray, fidelities, batch_size: int = 64):
    """[F, n] eV: the model's energies of `structures` (indices into `dataset`) at each of its fidelity indices
    `fidelities`, whatever fidelity their labels have (no forces; neighbour lists built once)."""
    chosen = dataset.subset(structures)
    collate = GraphCollator(chosen, make_neighbors(chosen, potential.cutoff, progress=False))
    sub = np.stack([np.arange(len(chosen)), np.zeros(len(chosen), np.int64)], 1)  # the label column is not used
    param = next(potential.parameters())
    out = np.zeros((len(fidelities), len(chosen)))
    with torch.no_grad():
        for start in range(0, len(sub), batch_size):
            g = collate(sub[start : start + batch_size]).to("cpu", param.dtype).to(param.device)
            for row, k in enumerate(fidelities):
                g.fidelity = torch.full_like(g.fidelity, int(k))
                out[row, start : start + len(g.n_atoms)] = potential(g, forces=False)["energy"].cpu().numpy()
    return out


def model_fidelities(potential, dataset: FidelityDataset, pairs: np.ndarray) -> np.ndarray:
    """[K_data] int64: the model's index of each dataset fidelity that `pairs` evaluate (by name), -1 for the
    others. A fidelity of `pairs` the model lacks is an error naming the data and the model's fidelities;
    fidelities of the data that are not evaluated (e.g. `evaluate --fidelity` picked one) may be unknown."""
    used = np.zeros(len(dataset.fidelities), bool)
    used[np.asarray(pairs, dtype=np.int64).reshape(-1, 2)[:, 1]] = True
    where = f"{dataset.source or 'data'} (the model's fidelities)"
    for name in np.asarray(dataset.fidelities.names, dtype=object)[used]:
        alike = [m for a, m in alike_names([name, *potential.fidelities.names]) if a == name]
        if name not in potential.fidelities and alike:
            raise MultifiError(
                f"{dataset.source or 'data'}: its structures name fidelity {name!r}, which the model does not know; "
                f"it has {alike[0]!r}, equal up to case or spaces, but a name the data gives is used as written "
                "(two such names are two fidelities): write the model's name into " + fidelity_field(dataset.source)
            )
    shared = [n for n in dataset.fidelities.names if n in potential.fidelities]
    unknown = [n for n, u in zip(dataset.fidelities.names, used) if u and n not in potential.fidelities]
    if unknown and shared:  # the data holds labels at the model's fidelities too: only those can be evaluated
        raise MultifiError(
            f"{dataset.source or 'data'}: holds labels at {', '.join(map(repr, unknown))}, which the model does not "
            f"know (its fidelities: {', '.join(potential.fidelities.names)}); to evaluate only the labels at "
            f"{shared[0]!r}, pass --fidelity {shared[0]!r}"
        )
    return np.array(
        [potential.fidelities.index(n, where=where) if u else -1 for n, u in zip(dataset.fidelities.names, used)],
        dtype=np.int64,
    )


def structures_with_unseen_elements(potential, dataset: FidelityDataset, structures: np.ndarray) -> np.ndarray:
    """[len(structures)] bool: the structure contains an element no training label of `potential` contained."""
    return holds_unknown(potential.head.known().detach().cpu().numpy(), dataset, structures)


def holds_unknown(known: np.ndarray, dataset: FidelityDataset, structures: np.ndarray) -> np.ndarray:
    """[len(structures)] bool: the structure holds an element z with not known[z] (known: [119] bool)."""
    numbers = np.clip(dataset.numbers, 0, len(known) - 1)
    return dataset.sum_over_atoms(~known[numbers], structures) > 0


def unknown_symbols(known: np.ndarray, dataset: FidelityDataset, structures: np.ndarray) -> str:
    """The elements (comma-separated symbols) not `known` ([119] bool) that `structures` hold."""
    from ase.data import chemical_symbols

    atoms = dataset.numbers[ranges(dataset.offsets[structures], dataset.n_atoms[structures])]
    return ", ".join(chemical_symbols[z] for z in np.unique(atoms) if z >= len(known) or not known[z])


def _report_unseen(potential, dataset: FidelityDataset, pairs: np.ndarray, result: dict, warn: bool = True) -> None:
    known = potential.head.known().detach().cpu().numpy()
    for k in np.unique(pairs[:, 1]):
        rows = pairs[pairs[:, 1] == k, 0]
        elements = unknown_symbols(known, dataset, rows)
        name = dataset.fidelities.names[int(k)]
        result.setdefault(name, {COUNT: 0})[UNSEEN] = int(len(rows))
        if not warn:
            continue
        log.warning(
            "%s: %d evaluated structure(s) contain %s, which no training label contained: left out of the "
            "errors (the model cannot predict them)",
            name,
            len(rows),
            elements,
        )
