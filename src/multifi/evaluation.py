"""Evaluation of a saved model on labelled files: per-fidelity (and per-group) errors, the uncertainty statistics,
and the diagnostics that tell a label problem from a model error (another unit, method or sign, the model's own
results, structures it trained on). `multifi evaluate` prints and writes what evaluate_files returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("multifi")


@dataclass
class Evaluation:
    """What evaluate_files found. payload: the JSON `evaluate --out` writes ({"fidelities": {name: metrics}}, with
    "evaluated" for an ensemble, "groups" with group_by, "uncertainty" when asked); evaluated_by: the model, or
    "the mean of …" an ensemble; dataset and pairs [P, 2]: the (structure, fidelity) pairs evaluated; predicted [P]
    eV; scored [P] bool: False for structures with an element the model never saw (left out of the errors)."""

    payload: dict
    evaluated_by: str
    potential: object
    dataset: object
    pairs: np.ndarray
    predicted: np.ndarray
    scored: np.ndarray
    where: str
    checkpoint: str
    batch_size: int = 64
    members: list = field(default_factory=list)  # an ensemble's model files, the first one's included
    recorded: dict | None = None  # an ensemble's members' energies (EnsembleMean.recorded)

    @property
    def metrics(self) -> dict:
        return self.payload["fidelities"]

    def diagnose(self) -> None:
        """warn_about_labels, then warn_about_uncertainty."""
        self.warn_about_labels()
        self.warn_about_uncertainty()

    def warn_about_labels(self) -> None:
        """The warnings about labels that errors of this size mean: another unit (named), one energy per element
        off, the model's own results, another fidelity's labels."""
        from multifi.train.evaluate import pairs_with_estimated_references

        ds, pairs, predicted, scored = self.dataset, self.pairs, self.predicted, self.scored
        in_units = warn_implausible_errors(self.metrics, self.where, label_slopes(ds, pairs[scored], predicted[scored]))
        fitted = scored & ~pairs_with_estimated_references(self.potential, ds, pairs)  # estimated: warned before
        warn_per_element_errors(
            ds, pairs[fitted], predicted[fitted], self.where, in_units, run_test_errors(self.checkpoint)
        )
        warn_own_predictions(ds, pairs[scored], predicted[scored], self.where)
        if self.recorded is not None:  # labels that are one member's own predictions differ from the mean
            _warn_members_own_predictions(self.recorded, self.members, self.potential, ds, pairs[scored], self.where)
        names = np.asarray(ds.fidelities.names, dtype=object)
        other = fitted & ~np.isin(names[pairs[:, 1]], list(in_units))  # a unit named explains the labels already
        warn_labels_of_another_fidelity(self.potential, ds, pairs[other], self.where, self.batch_size)

    def warn_about_uncertainty(self) -> None:
        """Uncertainty statistics over too few structures to mean much."""
        for name, m in self.payload.get("uncertainty", {}).get("fidelities", {}).items():
            if m["n"] < MIN_UNCERTAINTY_N:  # rank statistics of a handful of structures say little about σ
                log.warning(
                    "%s: the uncertainty statistics of %s come from only %d structure(s), too few for a rank "
                    "correlation or a calibration curve to mean much; evaluate on at least %d",
                    self.where,
                    name,
                    m["n"],
                    MIN_UNCERTAINTY_N,
                )

    def parity(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fidelity names [n], reference [n], predicted [n], estimated [n] bool) per scored pair: energies per atom
        (eV/atom) less the model's per-element reference energies (total energies span eV/atom: what the model
        learns is the rest), for a parity plot."""
        from multifi.train.evaluate import pairs_with_estimated_references

        ds, shown = self.dataset, self.pairs[self.scored]
        n_atoms = ds.n_atoms[shown[:, 0]]
        base = reference_energies(self.potential, ds, shown)
        reference = (ds.energy[shown[:, 0], shown[:, 1]] - base) / n_atoms
        names = np.array(ds.fidelities.names, dtype=object)[shown[:, 1]]
        predicted = (self.predicted[self.scored] - base) / n_atoms
        return names, reference, predicted, pairs_with_estimated_references(self.potential, ds, shown)


def evaluate_files(
    checkpoint,
    data: str | Path | list,
    fidelity: str | None = None,
    *,
    batch_size: int = 64,
    index: str = ":",
    device: str = "cpu",
    keys: dict | None = None,
    stress_order: str | None = None,
    uncertainty: bool = False,
    ensemble: list = (),
    skip_invalid: bool = False,
    group_by: str | None = None,
    diagnose: bool = True,
) -> Evaluation:
    """Errors of the model `checkpoint` (model.pt, a .ckpt or a run directory) on labelled `data` (files, or
    qm9[:LABELS.csv], as `multifi evaluate` takes them). `fidelity`: for structures naming none, and then only labels
    at it are evaluated; `index`: frames of files ASE reads; `keys`: label keys (energy_key, forces_key, stress_key);
    `uncertainty`: calibration statistics of σ (LLPR, or the ensemble's spread); `ensemble`: further model files,
    whose mean is evaluated; `group_by`: an info key of the frames, the errors per value too. The errors leave out
    structures with an element the model never saw (counted); `diagnose` warns about labels the errors suggest are
    another unit, method or the model's own (Evaluation.diagnose; `multifi evaluate` calls it after its table)."""
    from multifi.data.checks import check_force_units, check_placeholders, check_stress_units
    from multifi.data.sources import check_given_fidelity, merge_parts, read_labelled
    from multifi.data.split import labelled_pairs
    from multifi.models.registry import load_potential, run_dir_of
    from multifi.train.evaluate import evaluate_pairs, pairs_with_estimated_references
    from multifi.train.run_config import warn_other_stress_order

    data = [data] if isinstance(data, (str, Path)) else data  # one file
    ensemble = [ensemble] if isinstance(ensemble, (str, Path)) else ensemble
    data, ensemble, where = [str(d) for d in data], [str(m) for m in ensemble], ", ".join(str(d) for d in data)
    if group_by:
        from multifi.data.groups import check_groupable

        check_groupable(data, group_by)
    potential = load_potential(checkpoint).to(device)
    parts = [read_labelled(path, fidelity, skip_invalid, index, **(keys or {})) for path in data]
    ds = merge_parts(parts)  # joins structures repeated within one source (same key); says what it dropped
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    if fidelity:
        potential.fidelities.index(fidelity, where=str(checkpoint))
        check_given_fidelity(ds.fidelities.names, fidelity, data, "evaluate them at theirs")
        pairs = pairs[pairs[:, 1] == ds.fidelities.index(fidelity)]
    pairs = _without_reference_atoms(potential, ds, pairs, where)
    groups = None  # [S] each structure's value of the group_by key: read (and refused) before any work
    if group_by:
        from multifi.data.groups import structure_groups

        groups = structure_groups(ds, data, index, group_by)
    warn_trained_on(checkpoint, ds, pairs)
    has_stress = ds.stress_mask is not None and bool(ds.stress_mask.any())
    warn_other_stress_order(run_dir_of(checkpoint), data, stress_order, has_stress)
    scored = check_elements(potential, ds, pairs)  # [P] False: an element the model never saw (left out)
    check_placeholders(ds, pairs)  # forces or stresses of exactly 0 where no calculation gives them
    check_force_units(ds, pairs)  # forces in meV/Å, stress in kBar or of the other sign: errors of thousands
    check_stress_units(ds, pairs)
    estimated = pairs_with_estimated_references(potential, ds, pairs)  # [P]: their errors are the estimate's
    estimate = None  # the LLPR calibration or ensemble members: loaded (and refused) before the evaluation runs
    if uncertainty or ensemble:
        from multifi.uncertainty import uncertainty_models

        # the fidelities the uncertainty statistics will cover (uncertainty_report leaves out the same structures);
        # an ensemble's members predict every evaluated structure (its mean is the evaluated prediction)
        covered = pairs[:, 1] if ensemble else pairs[scored & ~estimated, 1]
        names = [ds.fidelities.names[int(k)] for k in np.unique(covered)]
        estimate = uncertainty_models(checkpoint, potential, ensemble, names)
    evaluated, evaluated_by = potential, str(checkpoint)
    if ensemble:  # the ensemble's prediction, as predict --ensemble makes it: the mean of its members'
        from multifi.uncertainty import EnsembleMean, check_members_alike

        check_members_alike(estimate[0], [str(checkpoint), *ensemble], names, ds.elements)
        evaluated = EnsembleMean(estimate[0])
        evaluated.recorded = {}  # the members' energies, for the uncertainty statistics (not run twice)
        evaluated_by = "the mean of " + " + ".join([str(checkpoint), *ensemble])
    neighbors = None  # built once for the groups' evaluations too (else by evaluate_pairs, checked there)
    if groups is not None:
        from multifi.data.checks import check_overlaps
        from multifi.data.neighbors import make_neighbors

        neighbors = make_neighbors(ds, evaluated.cutoff, progress=False)
        check_overlaps(ds, neighbors)
    if groups is None:
        metrics, predicted = evaluate_pairs(evaluated, ds, neighbors, pairs, batch_size, return_predictions=True)
    else:
        from multifi.data.groups import group_codes

        codes, order = group_codes(groups[pairs[:, 0]])
        metrics, predicted, by_group = evaluate_pairs(evaluated, ds, neighbors, pairs, batch_size, True, codes)
    payload = {"fidelities": metrics} if not ensemble else {"evaluated": evaluated_by, "fidelities": metrics}
    if groups is not None:
        values = [
            {"value": value, "structures": len(np.unique(pairs[codes == i, 0])), "fidelities": by_group[i]}
            for i, value in enumerate(order)
        ]
        payload["groups"] = {"by": group_by, "values": values}
    if uncertainty or ensemble:  # it may refuse (an ensemble of copies)
        from multifi.uncertainty import uncertainty_report

        recorded = evaluated.recorded if ensemble else None
        payload["uncertainty"] = uncertainty_report(estimate, ds, pairs[scored], batch_size, recorded)
    result = Evaluation(
        payload,
        evaluated_by,
        potential,
        ds,
        pairs,
        predicted,
        scored,
        where,
        str(checkpoint),
        batch_size,
        members=[str(checkpoint), *ensemble] if ensemble else [],
        recorded=evaluated.recorded if ensemble else None,
    )
    if diagnose:
        result.diagnose()
    return result


def _without_reference_atoms(potential, ds, pairs: np.ndarray, where: str) -> np.ndarray:
    """`pairs` without free atoms (one-atom frames, data.isolated) at fidelities whose references are atomic
    energies (head.atomic): those energies are the references, never trained on (MACE's E0 frames, which MACE's
    evaluation leaves out too); said with their count."""
    from multifi.data.isolated import isolated_atoms
    from multifi.train.evaluate import model_fidelities

    atomic = potential.head.atomic.detach().cpu().numpy()
    if not atomic.any() or not len(pairs):
        return pairs
    k = model_fidelities(potential, ds, pairs)[pairs[:, 1]]
    free = isolated_atoms(ds)[pairs[:, 0]] & atomic[k]
    if free.any():
        log.warning(
            "%s: %d free atom(s) (one-atom frames) at fidelities whose references are atomic energies left out of "
            "the errors: those energies are the model's references (data.atomic_energies), not trained on",
            where,
            int(free.sum()),
        )
    return pairs[~free]


def reference_energies(potential, dataset, pairs):
    """[P] eV: Σ over each pair's atoms of the model's per-element reference energy at the pair's fidelity (by
    name; a fidelity-blind model's shared one)."""
    from multifi.data.dataset import ranges
    from multifi.train.evaluate import model_fidelities

    ref = potential.head.ref.detach().cpu().double().numpy()  # [119, K]
    column = np.zeros(len(pairs), np.int64)
    if not potential.head.shared_baseline:
        column = model_fidelities(potential, dataset, pairs)[pairs[:, 1]]
    n = dataset.n_atoms[pairs[:, 0]]
    atoms = ranges(dataset.offsets[pairs[:, 0]], n)
    per_atom = ref[np.asarray(dataset.numbers)[atoms], np.repeat(column, n)]
    return np.add.reduceat(per_atom, np.concatenate([[0], np.cumsum(n)[:-1]])) if len(n) else np.zeros(0)


#: structures below which uncertainty statistics (Spearman, miscalibration area) are said to mean little
MIN_UNCERTAINTY_N = 20
#: a cosine of the force labels with the predictions below this: labels of the opposite sign (whatever their unit:
#: the slope then says the unit too). A model whose forces do not follow the labels yet scatters around 0 and, over
#: few components, reached −0.7 (two untrained models' mean); their slope can be anything (−267 there)
REVERSED_FORCES_COSINE = -0.8


#: label units per eV that energy labels read as eV may be in (a least-squares slope of labels on predictions)
ENERGY_UNITS = {"kJ/mol": 96.485, "kcal/mol": 23.061, "meV": 1000.0, "Hartree": 1 / 27.2114, "Rydberg": 1 / 13.6057}
#: label units per eV/Å that force labels read as eV/Å may be in (the least-squares slope of labels on predictions)
FORCE_UNITS = {
    "kJ/mol/Å": 96.485,
    "kcal/mol/Å": 23.061,
    "meV/Å": 1000.0,
    "Hartree/Bohr": 1 / 51.4221,
    "Rydberg/Bohr": 1 / 25.7110,
}
#: force labels this aligned with the predictions (cosine) whose size matches a unit's factor within 5 % are named
ALIGNED_FORCES_COSINE = 0.9


#: a cosine this far from 0 suffices where the slope itself says what the labels are: −1 (gradients as forces, the
#: model's size) or a unit's factor, each within 3 % (an untrained model's tiny forces give slopes in the hundreds)
WEAK_FORCES_COSINE = 0.5


def _reversed_forces(slope: float, cosine: float) -> bool:
    """Force labels pointing against the model's forces: a cosine near −1, or below −WEAK_FORCES_COSINE with
    a slope of −1 or of minus a unit's factor."""
    if cosine < REVERSED_FORCES_COSINE:
        return True
    return cosine < -WEAK_FORCES_COSINE and (abs(slope + 1) < 0.03 or bool(_unit_of(-slope, FORCE_UNITS)))


def _force_unit(slope: float | None, cosine: float) -> str:
    """The unit force labels aligned with the model's forces are in (see WEAK_FORCES_COSINE), or ''."""
    if cosine > ALIGNED_FORCES_COSINE:
        return _unit_of(slope, FORCE_UNITS, 0.05)
    return _unit_of(slope, FORCE_UNITS) if cosine > WEAK_FORCES_COSINE else ""


def label_slopes(ds, pairs, predicted) -> dict[str, float]:
    """Per fidelity name: the least-squares slope (through 0) of the energy labels on the predicted energies (eV)."""
    out = {}
    for k in np.unique(pairs[:, 1]):
        at = pairs[:, 1] == k
        labels, pred = ds.energy[pairs[at, 0], k], predicted[at]
        labelled = np.isfinite(labels)
        labels, pred = labels[labelled], pred[labelled]
        if float(pred @ pred) > 0:
            out[ds.fidelities.names[int(k)]] = float(labels @ pred / (pred @ pred))
    return out


def _unit_of(slope: float | None, units: dict = ENERGY_UNITS, within: float = 0.03) -> str:
    """The unit (of `units`) whose factor the slope matches within `within` (relative), or ''."""
    for unit, factor in units.items():
        if slope is not None and abs(slope / factor - 1) < within:
            return unit
    return ""


def _conversion(factor: float) -> str:
    """How to bring numbers in a unit `factor` per eV (or eV/Å) to eV: 'multiply by 27.2114' rather than 'divide by
    0.0367'."""
    return f"multiply by {1 / factor:.6g}" if factor < 1 else f"divide by {factor:.6g}"


def warn_implausible_errors(metrics: dict, where: str, slopes: dict[str, float] | None = None) -> set[str]:
    """Errors of more than 1 eV/atom mean labels of another level of theory or unit, not a model error (the unit
    named when the labels are a known unit's factor times the predictions: `slopes`, label_slopes); force labels
    pointing against the model's forces (a cosine of labels and predictions near −1) mean gradients given as
    forces. Returns the fidelities whose energy unit was named."""
    named = set()
    from multifi.keys import ENERGY_MAE_PER_ATOM, ESTIMATED, FITTED_ONLY, FORCES_COSINE, FORCES_SLOPE
    from multifi.train.evaluate import IMPLAUSIBLE_MEV_PER_ATOM

    for name, m in metrics.items():
        slope, cosine = m.get(FORCES_SLOPE), m.get(FORCES_COSINE)
        if slope is not None and cosine is not None and _reversed_forces(slope, cosine):
            unit = _unit_of(-slope, FORCE_UNITS, 0.05)
            log.warning(
                "%s: %s force labels point against the model's forces (least-squares slope %.4g of the labels on the "
                "predictions, cosine %.2f; about +1 both for labels the model learned): gradients (dE/dx) given as "
                "forces (−dE/dx)?%s",
                where,
                name,
                slope,
                cosine,
                f" In {unit}, too (negate and convert them: {_conversion(FORCE_UNITS[unit])})" if unit else "",
            )
        elif cosine is not None and (unit := _force_unit(slope, cosine)):
            log.warning(
                "%s: %s force labels are %.4g × the model's forces (cosine %.2f): forces in %s read as eV/Å? "
                "(convert them to eV/Å: %s)",
                where,
                name,
                slope,
                cosine,
                unit,
                _conversion(FORCE_UNITS[unit]),
            )
        err = m.get(ENERGY_MAE_PER_ATOM)
        if err is None or err <= IMPLAUSIBLE_MEV_PER_ATOM:
            continue
        fitted = (m.get(FITTED_ONLY) or {}).get(ENERGY_MAE_PER_ATOM)
        if unit := _unit_of((slopes or {}).get(name)):
            named.add(name)
            log.warning(
                "%s: %s energy MAE %.0f meV/atom, and the labels are %.4g × the predictions: energies in %s read "
                "as eV? (convert them to eV: %s)",
                where,
                name,
                err,
                slopes[name],
                unit,
                _conversion(ENERGY_UNITS[unit]),
            )
        elif m.get(ESTIMATED):  # the estimated references may be the cause, not the labels
            log.warning(
                "%s: %s energy MAE %.0f meV/atom over all structures, %s over the %d without an estimated "
                "reference: the estimated per-element references (warned above) are a likely cause%s",
                where,
                name,
                err,
                "—" if fitted is None else f"{fitted:.0f} meV/atom",
                m[FITTED_ONLY].get("n", 0) if m.get(FITTED_ONLY) else 0,
                ""
                if fitted is None or fitted <= IMPLAUSIBLE_MEV_PER_ATOM
                else "; the others' errors are implausible too: "
                f"are these labels at {name}, in eV, total energies of the same kind?",
            )
        else:
            log.warning(
                "%s: %s energy MAE %.0f meV/atom: are these labels at %s, in eV, total energies of the same kind "
                "(check the structures' fidelity, --fidelity, --energy-key)?",
                where,
                name,
                err,
                name,
            )
    return named


#: meV/atom: energy errors below this are not looked into (a model's own errors)
OFFSET_CHECK_MEV_PER_ATOM = 20.0
#: errors this many times smaller once one energy per element is fitted to them: the labels' convention differs
OFFSET_SHRINK = 3.0


def warn_per_element_errors(
    dataset, pairs, predicted, where: str, skip: set[str] = frozenset(), as_tested: dict | None = None
) -> list[str]:
    """Warn for fidelities whose energy errors are mostly one constant energy per element: labels of another method
    or reference convention (atomization vs total energies, another code's pseudopotentials) than the model's
    fidelity of that name. Such errors shrink `OFFSET_SHRINK`-fold once an energy per element is fitted to them
    (least squares over the structures; only with at least 5 structures per element and 10 more, and compositions
    that fix each element's energy, so that the fit cannot absorb a model's ordinary errors or a mean offset).
    Fidelities in `skip` (their unit named already) are not looked at, nor those whose MAE is within AS_TESTED× of
    the model's own test error there (`as_tested`, meV/atom, the run's metrics.json: an undertrained model's errors
    can follow the elements on its own test labels too). Returns the names warned about."""
    from multifi.data.stats import composition_matrix

    warned = []
    for k, name in enumerate(dataset.fidelities.names):
        if name in skip:
            continue
        mine = (pairs[:, 1] == k) & ~np.isnan(dataset.energy[pairs[:, 0], k])  # energy labels (not forces only)
        s = pairs[mine, 0]
        if not len(s):
            continue
        elements, counts = composition_matrix(dataset.subset(s))
        distinct = len(np.unique(counts, axis=0))
        if (
            len(s) < 5 * len(elements) + 10
            or distinct < len(elements) + 2
            or np.linalg.matrix_rank(counts) < len(elements)
        ):  # one composition (an MD run): a mean offset would pass for a per-element one
            continue
        n = dataset.n_atoms[s].astype(np.float64)
        error = predicted[mine] - dataset.energy[s, k]  # eV
        offsets = np.linalg.lstsq(counts.astype(np.float64), error, rcond=None)[0]
        before = 1000 * np.mean(np.abs(error) / n)
        after = 1000 * np.mean(np.abs(error - counts @ offsets) / n)
        tested = (as_tested or {}).get(name)
        like_its_test = tested is not None and before <= AS_TESTED * tested
        if before > OFFSET_CHECK_MEV_PER_ATOM and after * OFFSET_SHRINK < before and not like_its_test:
            warned.append(name)
            log.warning(
                "%s: %s energy errors are mostly one energy per element (MAE %.0f → %.0f meV/atom once an offset per "
                "element is fitted to them): are these labels of the method the model knows as %s, with the same "
                "kind of energies (total, not atomization or formation energies)?",
                where,
                name,
                before,
                after,
                name,
            )
    return warned


#: a fidelity's labels are taken for another's when the model's predictions at that one match them this many times
#: better (energy MAE per atom) than at their own, and their own MAE is above ANOTHER_FIDELITY_MIN_MEV (meV/atom):
#: labels of a fidelity trained on a handful of structures can be matched 2-4× better by a well-trained neighbour
#: (formation energies of two close functionals), labels under another fidelity's name 20-1 000×
ANOTHER_FIDELITY_FACTOR = 10.0
ANOTHER_FIDELITY_MIN_MEV = 10.0
ANOTHER_FIDELITY_SAMPLE = 500  # structures compared per fidelity at most (seeded sample): passes without forces


def warn_labels_of_another_fidelity(potential, dataset, pairs, where: str, batch_size: int = 64) -> dict:
    """Warn for each evaluated fidelity whose energy labels match the model's predictions at another of its fidelities
    far better than at their own: labels of another level of theory under this name (a --fidelity or an
    info['fidelity'] mixed up), whose table otherwise reads as a poor model. `pairs`: the evaluated (structure,
    fidelity) pairs with fitted references; every prediction compared is `potential`'s own. Returns {name: the
    fidelity its labels match}."""
    from multifi.train.evaluate import energies_at

    names = list(potential.fidelities.names)
    found = {}
    if len(names) < 2:
        return found
    for k, name in enumerate(dataset.fidelities.names):
        rows = np.flatnonzero((pairs[:, 1] == k) & ~np.isnan(dataset.energy[pairs[:, 0], k]))
        if len(rows) == 0 or name not in names:
            continue
        if len(rows) > ANOTHER_FIDELITY_SAMPLE:
            rows = np.sort(np.random.default_rng(0).choice(rows, ANOTHER_FIDELITY_SAMPLE, replace=False))
        s = pairs[rows, 0]
        energies = energies_at(potential, dataset, s, range(len(names)), batch_size)  # [F, n]
        mae = 1e3 * np.mean(np.abs(energies - dataset.energy[s, k]) / dataset.n_atoms[s], axis=1)  # meV/atom
        own = float(mae[names.index(name)])
        best = min((j for j in range(len(names)) if names[j] != name), key=lambda j: mae[j])
        if own > ANOTHER_FIDELITY_MIN_MEV and mae[best] * ANOTHER_FIDELITY_FACTOR < own:
            found[name] = names[best]
            log.warning(
                "%s: its %s energy labels match the model's %s predictions far better than its %s ones (MAE %.1f "
                "against %.1f meV/atom on %d structures): are they %s labels? (a structure's fidelity is its "
                "info['fidelity'] or a MatPES record's 'functional', else --fidelity)",
                where,
                name,
                names[best],
                name,
                mae[best],
                own,
                len(rows),
                names[best],
            )
    return found


def _warn_members_own_predictions(recorded: dict, members: list, potential, dataset, pairs, where: str) -> None:
    """warn_own_predictions for each member of an ensemble, from its energies of the evaluation (EnsembleMean.recorded,
    keyed by structure and the first member's fidelity index)."""
    from multifi.train.evaluate import model_fidelities

    to_model = model_fidelities(potential, dataset, pairs)
    for m, path in enumerate(members):
        energies = np.array([recorded[(int(s), int(to_model[k]))][m] for s, k in pairs])
        warn_own_predictions(dataset, pairs, energies, f"{where} (against ensemble member {m + 1}, {path})")


def warn_own_predictions(dataset, pairs, predicted, where: str) -> list[str]:
    """Warn for fidelities whose every energy label equals the model's prediction (to float32 rounding): a file of
    the model's own results (an MD trajectory written as extxyz with multifi.Calculator keeps no calculator name),
    whose errors of zero say nothing. Returns the names warned about."""
    warned = []
    for k, name in enumerate(dataset.fidelities.names):
        mine = pairs[:, 1] == k
        labels = dataset.energy[pairs[mine, 0], k]
        if mine.any() and (np.abs(predicted[mine] - labels) <= 1e-5 + 1e-6 * np.abs(labels)).all():
            warned.append(name)
            log.warning(
                "%s: every %s energy label equals this model's prediction: the file holds the model's own results "
                "(e.g. a trajectory written with multifi.Calculator), not reference labels; its errors of zero say "
                "nothing",
                where,
                name,
            )
    return warned


def check_elements(potential, dataset, pairs):
    """Elements of the labelled (structure, fidelity) pairs against the model (models.elements). Structures
    with an element the model never saw are left out of the errors with a warning (train/evaluate.py), as in
    a training run's test report, and of plots and calibration (the returned [P] bool mask of the others);
    only if every structure has one is it an error."""
    from multifi.data.dataset import ranges
    from multifi.models import elements
    from multifi.train.evaluate import structures_with_unseen_elements

    where = dataset.source or "data"
    names = [dataset.structure_name(s).removeprefix("structure ") for s in range(len(dataset))]
    scored = np.ones(len(pairs), bool)
    if len(pairs):
        scored = ~structures_with_unseen_elements(potential, dataset, pairs[:, 0])
        if not scored.any():  # nothing to evaluate: the error names a structure and the element
            elements.check_elements(potential, dataset.numbers, dataset.n_atoms, None, where, keys=names)
        pairs = pairs[scored]
    to_model = [
        potential.fidelities.names.index(n) if n in potential.fidelities else -1 for n in dataset.fidelities.names
    ]
    pairs = pairs[np.asarray(to_model, dtype=np.int64)[pairs[:, 1]] >= 0] if len(pairs) else pairs
    n = dataset.n_atoms[pairs[:, 0]]
    numbers = dataset.numbers[ranges(dataset.offsets[pairs[:, 0]], n)]
    keys = [names[s] for s in pairs[:, 0]]  # warnings name the structure, not the pair's index
    elements.check_elements(potential, numbers, n, np.asarray(to_model, dtype=np.int64)[pairs[:, 1]], where, keys=keys)
    return scored


def warn_trained_on(checkpoint, ds, pairs) -> None:
    """Say how many (structure, fidelity) pairs evaluated the model trained on (trained_on.trained_pairs): they are
    scored as if held out otherwise (e.g. the run's dataset.npz, or a whole label table); and how many structures it
    trained on at other fidelities only (held-out labels on seen geometries)."""
    from multifi.trained_on import trained_pairs

    same, elsewhere, evaluated = trained_pairs(checkpoint, ds, pairs)
    if same:
        log.warning(
            "%d of the %d (structure, fidelity) pairs evaluated were trained on: their errors are not held-out errors",
            len(same),
            evaluated,
        )
    if elsewhere:
        log.info(
            "%d structure(s) evaluated were trained on at other fidelities only: their labels here are held out, "
            "their geometries are not",
            len(elsewhere),
        )


#: evaluation errors up to this many times the model's own test error (meV/atom) are the model's, not the labels'
AS_TESTED = 2.0


def run_test_errors(checkpoint) -> dict[str, float]:
    """{fidelity: test energy MAE meV/atom} from the metrics.json of the model's run (beside it); {} without one."""
    import json

    from multifi.keys import ENERGY_MAE_PER_ATOM
    from multifi.models.registry import run_dir_of

    run = run_dir_of(checkpoint)
    try:
        fidelities = json.loads((run / "metrics.json").read_text()).get("fidelities", {})
        return {
            name: float(m[ENERGY_MAE_PER_ATOM])
            for name, m in fidelities.items()
            if isinstance(m, dict) and isinstance(m.get(ENERGY_MAE_PER_ATOM), (int, float))
        }
    except (OSError, ValueError, AttributeError):  # none, or not ours: nothing to compare with
        return {}
