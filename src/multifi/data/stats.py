"""Data statistics: element tables, composition matrices, per-fidelity reference energies and scales.

Reference energies (eV per atom of each element, per fidelity) are fitted per fidelity by least
squares on the compositions of its energy labels, then completed jointly over fidelities where the
labels leave them open, with the model

    ref[Z, f] = a[Z] + φ(Z)·β[f] + η[Z, f]

a shared per-element reference a, a per-fidelity shift that is a smooth function of the atomic number
(φ(Z) = 1, then Z, then Z^(7/3): differences between levels of theory grow with the number of
electrons — valence and correlation terms about ∝ Z, core terms ∝ Z^(7/3) as the Thomas–Fermi atomic
energy), and per-element deviations η that the prior sets to zero where a fidelity has no labels. How
many terms of φ the data support is chosen by leave-one-out over the references that are fitted at two
or more fidelities; that leave-one-out error is reported as the expected error of an estimate.
Where a fidelity's labels determine ref[:, f] it is that fidelity's own least-squares fit, unchanged;
elements without labels at f, and compositions its labels do not determine (e.g. Ga and As only as
GaAs), take the model's values. `References.fitted[Z, f]` records which came from f's own labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_Z = 118  # largest atomic number
N_ELEMENTS = MAX_Z + 1  # rows of per-element tables, indexed by atomic number (row 0 unused)


@dataclass
class References:
    """Fitted per-fidelity reference energies and scales.

    ref [N_ELEMENTS, K] eV/atom; scale [K] eV; fitted [N_ELEMENTS, K] bool: True where ref[Z, f] is
    determined by fidelity f's own energy labels; spread [K] eV/atom: scatter (RMS) of the per-element
    shifts η at f around the shared model (how far an estimated reference may be off; NaN: unknown).
    null [K]: per fidelity [d, N_ELEMENTS], an orthonormal basis of the compositions its labels leave open
    (d = 0 mostly; Ga and As only as GaAs: one row ∝ Ga − As). A structure whose composition c has c·null ≠ 0
    gets an estimated split of those references; c·null = 0 (GaAs itself) is fitted.
    """

    ref: np.ndarray
    scale: np.ndarray
    fitted: np.ndarray
    spread: np.ndarray
    null: list[np.ndarray] = field(default_factory=list)
    borrowed_scale: np.ndarray | None = None  # [K] bool: scale taken from the other fidelities (own undetermined)
    # atomic energies (data/atomic_energies.py): [K] eV/atom, the shift added to them (NaN: a least-squares fit);
    # [N_ELEMENTS, K] bool: references given as an atomic energy to elements without labels at that fidelity
    atomic_shift: np.ndarray | None = None
    given: np.ndarray | None = None
    # [N_ELEMENTS, K] bool: elements whose only labels at a fidelity are free atoms, estimated there (_free_atoms_only)
    free_only: np.ndarray | None = None

    def open(self, k: int) -> list[int]:
        """Elements fidelity k's labels contain only in fixed proportions (their split is estimated)."""
        if not self.null:
            return []
        return [int(z) for z in np.flatnonzero(np.abs(self.null[k]).max(0, initial=0.0) > 1e-8)]

    @property
    def elements(self) -> np.ndarray:
        """Atomic numbers with a reference at some fidelity [n]."""
        return np.flatnonzero(self.fitted.any(1))

    def estimated(self, k: int) -> list[int]:
        """Elements whose reference at fidelity k was estimated from the other fidelities."""
        return [int(z) for z in self.elements if not self.fitted[z, k]]


# ---------------------------------------------------------------------------------------------- compositions
def composition_matrix(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Elements present [n_el] (atomic numbers) and element counts per structure [S, n_el] (int32)."""
    S = len(dataset)
    numbers = np.asarray(dataset.numbers)
    elements = np.unique(numbers).astype(np.int64)
    struct = np.repeat(np.arange(S, dtype=np.int32 if S < 2**31 else np.int64), dataset.n_atoms)
    out = np.zeros((S, len(elements)), np.int32)
    for c, z in enumerate(elements):  # one bincount per element: far faster than np.add.at
        out[:, c] = np.bincount(struct[numbers == z], minlength=S)
    return elements, out


def force_rms(dataset, pairs: np.ndarray, ks) -> float:
    """RMS of the force labels [eV/Å] of the (structure, fidelity) pairs at fidelities ks (1.0 if none)."""
    if dataset.forces is None:
        return 1.0
    sel = pairs[np.isin(pairs[:, 1], ks)]
    sel = sel[dataset.forces_mask[sel[:, 0], sel[:, 1]]]
    if len(sel) == 0:
        return 1.0
    n = dataset.n_atoms[sel[:, 0]]
    first = np.asarray(dataset.offsets)[sel[:, 0]]
    atoms = np.repeat(first - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))  # atoms of each pair, in order
    f = dataset.forces[atoms, np.repeat(sel[:, 1], n)]
    return float(np.sqrt((f.astype(np.float64) ** 2).mean())) or 1.0


# ---------------------------------------------------------------------------------------------- references
def fit_references(
    dataset,
    pairs: np.ndarray,
    ridge: float = 1e-8,
    pooled: bool = False,
    shared_scale: bool = False,
    atomic: np.ndarray | None = None,
) -> References:
    """Per-fidelity reference energies (joint fit, see the module docstring) and residual scales.

    dataset: FidelityDataset; pairs [P, 2] (structure, fidelity) training samples.
    scale [K] eV: standard deviation of the per-atom residual of each fidelity's own fit; where that fit leaves
    fewer than MIN_SCALE_DOF residual degrees of freedom (or fits exactly), the median scale of the fidelities
    whose fit determines one (borrowed_scale), else the RMS of the force labels, then 1 eV. `pooled`: the labels of all fidelities fitted as one (every
    column holds that fit; for fidelity-blind models). `shared_scale`: one scale for every fidelity,
    from the residuals of all fidelities together. `ridge` (relative) regularises each least-squares fit.
    `atomic` [N_ELEMENTS, K] eV (NaN: not given): atomic energies (data/atomic_energies.py); a fidelity with
    them takes them plus its fitted shift per atom (_atomic_fit) for every element given, labelled or not.
    """
    K = len(dataset.fidelities)
    elements, counts = composition_matrix(dataset)  # [n_el], [S, n_el]
    ref, scale = np.zeros((N_ELEMENTS, K)), np.ones(K)
    fitted, spread = np.zeros((N_ELEMENTS, K), bool), np.full(K, np.nan)
    shift, given = np.full(K, np.nan), np.zeros((N_ELEMENTS, K), bool)
    systems, residuals = [], []
    for ks in [list(range(K))] if pooled else [[k] for k in range(K)]:
        if atomic is not None and not pooled and not np.isnan(atomic[:, ks[0]]).all():
            own, shift[ks[0]] = _atomic_fit(dataset, pairs, ks[0], elements, counts, atomic[:, ks[0]])
            given[:, ks[0]] = own.fitted & ~_labelled_elements(elements, counts, dataset, pairs, ks[0])
        else:
            own = _own_fit(dataset, pairs, ks, elements, counts, ridge)
        ref[:, ks], fitted[:, ks], scale[ks] = own.ref[:, None], own.fitted[:, None], own.scale
        systems.append(own.system)
        if own.resid is not None:
            residuals.append(own.resid)
    if shared_scale and not pooled and residuals:
        resid = np.concatenate(residuals)
        scale[:] = float(resid.std()) if len(resid) > 1 and resid.std() > 1e-4 else np.nan
    borrowed = np.isnan(scale)
    if borrowed.all():
        scale[:], borrowed[:] = force_rms(dataset, pairs, list(range(K))), False
    elif borrowed.any():
        scale[borrowed] = float(np.median(scale[~borrowed]))
    null = [np.zeros((0, N_ELEMENTS)) for _ in range(K)]
    if atomic is not None and not pooled:  # an element no label holds stays unknown
        unlabelled = ~np.any([_labelled_elements(elements, counts, dataset, pairs, k) for k in range(K)], axis=0)
        ref[unlabelled], fitted[unlabelled], given[unlabelled] = 0.0, False, False
    free_only = np.zeros((N_ELEMENTS, K), bool)
    if not pooled and atomic is None:  # a free atom's energy fits its reference and says nothing of its bonding
        only_free, bonded = _free_atoms_only(dataset, pairs, elements, counts, range(K))
        free_only = only_free & bonded[:, None] & fitted
        fitted &= ~free_only
    if not pooled:
        null = _fill_from_shared(ref, fitted, spread, systems)
    return References(ref, scale, fitted, spread, null, borrowed, shift, given, free_only)


def fit_baseline(
    dataset, pairs: np.ndarray, ridge: float = 1e-8, pooled: bool = False, shared_scale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(ref [N_ELEMENTS, K] eV, scale [K] eV) of fit_references."""
    r = fit_references(dataset, pairs, ridge, pooled, shared_scale)
    return r.ref, r.scale


def fit_new_fidelity(
    dataset,
    pairs: np.ndarray,
    k: int,
    ref: np.ndarray,
    fitted: np.ndarray,
    ridge: float = 1e-8,
    atomic: np.ndarray | None = None,
) -> References:
    """References of fidelity k of `dataset` (its labelled pairs in `pairs`) next to known fidelities'.

    ref, fitted [N_ELEMENTS, K0]: known references (e.g. a trained model's head.ref, head.fitted); each
    fitted one counts as one observation of a[Z] + φ(Z)·β[g] + η[Z, g].
    Fidelity k gets its own least-squares fit where its labels determine it, the shared estimate
    elsewhere. Returns References of one column (ref [N_ELEMENTS, 1], scale [1] (NaN when its labels do not
    determine one: MIN_SCALE_DOF), fitted, spread, atomic_shift, given). `atomic` [N_ELEMENTS] eV (NaN: not given):
    fidelity k's atomic energies, its references then those plus its fitted shift (_atomic_fit)."""
    K0 = ref.shape[1]
    elements, counts = composition_matrix(dataset)
    shift, given = np.full(1, np.nan), np.zeros((N_ELEMENTS, 1), bool)
    if atomic is not None:
        own, shift[0] = _atomic_fit(dataset, pairs, k, elements, counts, atomic)
        labelled = _labelled_elements(elements, counts, dataset, pairs, k)
        unknown = ~labelled & ~fitted.any(1)  # in no label of k and unknown to the model: stays unknown
        own.ref[unknown], own.fitted[unknown] = 0.0, False
        given[:, 0] = own.fitted & ~labelled
    else:
        own = _own_fit(dataset, pairs, [k], elements, counts, ridge)
    only_free, bonded = _free_atoms_only(dataset, pairs, elements, counts, [k])
    free_only = only_free[:, 0] & (bonded | fitted.any(1)) & own.fitted  # bonded here or known from the others
    if atomic is not None:  # references from atomic energies: a free atom's is its own
        free_only[:] = False
    all_ref = np.concatenate([np.where(fitted, ref, 0.0), own.ref[:, None]], axis=1)
    all_fitted = np.concatenate([fitted, (own.fitted & ~free_only)[:, None]], axis=1)
    spread = np.full(K0 + 1, np.nan)
    null = _fill_from_shared(all_ref, all_fitted, spread, [None] * K0 + [own.system], only=K0)
    return References(
        all_ref[:, [K0]],
        np.array([own.scale]),
        all_fitted[:, [K0]],
        spread[[K0]],
        [null[K0]],
        None,
        shift,
        given,
        free_only[:, None],
    )


@dataclass
class _OwnFit:
    ref: np.ndarray  # [N_ELEMENTS] eV/atom (0 where no labels)
    fitted: np.ndarray  # [N_ELEMENTS] bool
    scale: float
    resid: np.ndarray | None  # per-atom residuals [n] eV
    system: tuple | None  # normal equations (XᵀX [N_ELEMENTS, N_ELEMENTS], Xᵀy [N_ELEMENTS], n samples)


#: residual degrees of freedom (labelled structures − fitted elements) below which a fidelity's own fit
#: does not determine its energy scale: 4 structures of 4 elements fit exactly, a residual std of ~0
MIN_SCALE_DOF = 3


def _own_fit(dataset, pairs, ks, elements, counts, ridge) -> _OwnFit:
    """Least squares of the energy labels at fidelities ks (pooled when several) on compositions."""
    sel = pairs[np.isin(pairs[:, 1], ks)]
    sel = sel[~np.isnan(dataset.energy[sel[:, 0], sel[:, 1]])]
    s, k = sel[:, 0], sel[:, 1]
    ref, fitted = np.zeros(N_ELEMENTS), np.zeros(N_ELEMENTS, bool)
    if len(s) == 0:
        return _OwnFit(ref, fitted, np.nan, None, None)
    y = np.asarray(dataset.energy)[s, k]
    coef, cols, resid, ata, aty = _least_squares(counts, s, y, ridge)
    ref[elements[cols]], fitted[elements[cols]] = coef, True
    determined = len(s) - len(cols) >= MIN_SCALE_DOF and resid.std() > 1e-4
    scale = float(resid.std()) if determined else np.nan  # NaN: its labels do not determine a scale
    G, h = np.zeros((N_ELEMENTS, N_ELEMENTS)), np.zeros(N_ELEMENTS)
    G[np.ix_(elements, elements)], h[elements] = ata, aty
    return _OwnFit(ref, fitted, scale, resid, (G, h, len(s)))


def _atomic_fit(dataset, pairs, k, elements, counts, atomic) -> tuple[_OwnFit, float]:
    """(fit, μ eV/atom): fidelity k's references from atomic energies atomic [N_ELEMENTS] (NaN: not given), every
    element of its labels given: atomic + μ, with μ the one energy per atom that fits by least squares what its
    energy labels hold beyond their atomic energies (the mean binding energy per atom, MACE's shift); every given
    element's reference is known (fitted), labelled at k or not. μ NaN without labels (references 0: estimated)."""
    sel = pairs[pairs[:, 1] == k]
    s = sel[~np.isnan(dataset.energy[sel[:, 0], k]), 0]
    ref, fitted = np.zeros(N_ELEMENTS), np.zeros(N_ELEMENTS, bool)
    if len(s) == 0:
        return _OwnFit(ref, fitted, np.nan, None, None), np.nan
    X = counts[s].astype(np.float64)  # [n, n_el]
    if np.isnan(atomic[elements[X.sum(0) > 0]]).any():  # checked before (atomic_energies.check_atomic_coverage)
        raise ValueError(f"fidelity {k}: labelled elements without an atomic energy")
    n = X.sum(1)
    beyond = np.asarray(dataset.energy)[s, k] - X @ np.nan_to_num(atomic[elements])  # eV
    mu = float(n @ beyond / (n @ n))
    resid = (beyond - n * mu) / n
    given = ~np.isnan(atomic)
    ref[given], fitted[given] = atomic[given] + mu, True
    determined = len(s) - 1 >= MIN_SCALE_DOF and resid.std() > 1e-4
    return _OwnFit(ref, fitted, float(resid.std()) if determined else np.nan, resid, None), mu


def _free_atoms_only(dataset, pairs, elements, counts, ks) -> tuple[np.ndarray, np.ndarray]:
    """(only_free [N_ELEMENTS, len(ks)] bool: elements whose every energy label at fidelity ks[i] in `pairs` is of a
    free atom (a one-atom structure, data.checks.isolated_atoms); bonded [N_ELEMENTS] bool: elements in a labelled
    structure that is no free atom at one of ks)."""
    from multifi.data.isolated import isolated_atoms

    free = isolated_atoms(dataset)
    energy = np.asarray(dataset.energy)
    sel = pairs[~np.isnan(energy[pairs[:, 0], pairs[:, 1]])]
    present, in_bonded = np.zeros((N_ELEMENTS, len(ks)), bool), np.zeros((N_ELEMENTS, len(ks)), bool)
    for i, k in enumerate(ks):
        s = sel[sel[:, 1] == k, 0]
        present[elements[counts[s].sum(0) > 0], i] = True
        in_bonded[elements[counts[s[~free[s]]].sum(0) > 0], i] = True
    return present & ~in_bonded, in_bonded.any(1)


def _labelled_elements(elements, counts, dataset, pairs, k) -> np.ndarray:
    """[N_ELEMENTS] bool: elements of the structures with an energy label at fidelity k in `pairs`."""
    sel = pairs[pairs[:, 1] == k]
    s = sel[~np.isnan(dataset.energy[sel[:, 0], k]), 0]
    out = np.zeros(N_ELEMENTS, bool)
    out[elements[counts[s].sum(0) > 0]] = True
    return out


def _least_squares(counts: np.ndarray, rows: np.ndarray, y: np.ndarray, ridge: float, chunk: int = 262144):
    """Ridge least squares y ≈ counts[rows] @ coef, in chunks (bounded memory for millions of rows).

    Returns coef [n_cols], the used columns (elements present in rows), per-atom residuals [n] and the
    normal equations XᵀX [n_el, n_el], Xᵀy [n_el] over all columns."""
    n_el = counts.shape[1]
    ata, aty = np.zeros((n_el, n_el)), np.zeros(n_el)
    for a in range(0, len(rows), chunk):
        X = counts[rows[a : a + chunk]].astype(np.float64)
        ata += X.T @ X
        aty += X.T @ y[a : a + chunk]
    cols = np.flatnonzero(np.diag(ata) > 0)
    coef = np.linalg.solve(ata[np.ix_(cols, cols)] + ridge * len(rows) * np.eye(len(cols)), aty[cols])
    resid = np.empty(len(rows))
    for a in range(0, len(rows), chunk):
        X = counts[rows[a : a + chunk]][:, cols].astype(np.float64)
        resid[a : a + chunk] = (y[a : a + chunk] - X @ coef) / X.sum(1)
    return coef, cols, resid, ata, aty


def least_squares_references(elements: np.ndarray, counts: np.ndarray, rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N_ELEMENTS] eV: per-element energies that fit energies y [n] of structures `rows` by least squares
    (elements, counts from composition_matrix; 0 for elements absent from them)."""
    coef, cols, *_ = _least_squares(counts, rows, y, ridge=1e-8)
    ref = np.zeros(N_ELEMENTS)
    ref[elements[cols]] = coef
    return ref


def shared_estimates(ref: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """[N_ELEMENTS, K] eV: the shift model a[Z] + φ(Z)·β[f] (module docstring) fitted to the references ref
    [N_ELEMENTS, K] marked in fitted; its value where fitted is False is the estimate fit_references uses."""
    return shared_estimates_with_error(ref, fitted)[0]


def shared_estimates_with_error(ref: np.ndarray, fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shared_estimates and the leave-one-out RMS error [K] eV/atom of an estimate at each fidelity (over the
    elements fitted there and at another fidelity; NaN where nothing is left out)."""
    prior, loo, _ = _shift_model(ref, fitted, fitted, with_base=True)
    return prior, loo


def _fill_from_shared(ref, fitted, spread, systems, only: int | None = None) -> list[np.ndarray]:
    """In place: what the labels leave undetermined ← the shift model a[Z] + φ(Z)·β[f] (module docstring).

    ref, fitted [N_ELEMENTS, K], spread [K] (← leave-one-out RMS error of the model at f, eV/atom);
    systems[f]: (XᵀX, Xᵀy, n) of fidelity f's own fit, or None (no labels, or references known as
    they are). `only`: change only this fidelity's column. Returns per fidelity the open compositions
    [d, N_ELEMENTS] (References.null)."""
    K = ref.shape[1]
    identified, nulls = fitted.copy(), [None] * K
    for f, system in enumerate(systems):
        cols = np.flatnonzero(fitted[:, f])
        if system is None or len(cols) == 0:
            continue
        null = _null_space(system[0][np.ix_(cols, cols)])  # [n_cols, d]: compositions the labels leave free
        if null.shape[1]:
            nulls[f] = (cols, null)
            identified[cols[np.abs(null).max(1) > 1e-8], f] = False
    open_ = [np.zeros((0, N_ELEMENTS)) for _ in range(K)]
    for f, entry in enumerate(nulls):
        if entry is not None:
            open_[f] = np.zeros((entry[1].shape[1], N_ELEMENTS))
            open_[f][:, entry[0]] = entry[1].T
    if not fitted.any():
        return open_
    prior, loo, own_shift = _shift_model(ref, fitted, identified, with_base=True)  # loo of every fidelity
    for f in range(K) if only is None else [only]:
        estimate = prior[:, f]
        if nulls[f] is not None:
            cols, null = nulls[f]
            if not own_shift[f]:
                others = [g for g in range(K) if g != f and identified[cols, g].all()]
                # another fidelity's shape: its own references where they are identified, its prior elsewhere
                # (never an unfilled column entry: the estimate would depend on the order of the fidelities)
                shapes = [np.where(identified[:, g], ref[:, g], prior[:, g]) for g in others]
                estimate = _shift_to_fit([estimate, *shapes], ref[:, f], cols, null)
            ref[cols, f] += null @ (null.T @ (estimate[cols] - ref[cols, f]))
        missing = fitted.any(1) & ~fitted[:, f]
        ref[missing, f] = estimate[missing]
        spread[f] = loo[f]
    return open_


def estimate_errors(ref: np.ndarray, fitted: np.ndarray, null: np.ndarray) -> np.ndarray:
    """[K] eV/atom: the leave-one-out error of an estimated reference at each fidelity (References.spread; NaN where
    nothing is left out), from a model's recorded references ref [N_ELEMENTS, K], fitted [N_ELEMENTS, K] and open
    compositions null [N_ELEMENTS, K, d] (EnergyHead's buffers): for models saved before the spread was recorded."""
    ref, fitted = np.asarray(ref, dtype=np.float64), np.asarray(fitted, dtype=bool)
    if not fitted.any():
        return np.full(ref.shape[1], np.nan)
    identified = fitted & ~(np.abs(np.asarray(null)) > 1e-8).any(-1)
    return _shift_model(np.where(fitted, ref, 0.0), fitted, identified, with_base=True)[1]


def _shift_to_fit(priors: list, ref: np.ndarray, cols: np.ndarray, null: np.ndarray) -> np.ndarray:
    """The estimate [N_ELEMENTS] for a fidelity none of whose references its labels identify alone (e.g. 4 labels
    of 5 elements): the shift model could not fit its β, so its prior sits at another fidelity's scale
    (hundreds of eV per atom between all-electron and semi-empirical energies). For each candidate shape in
    `priors` (the model's prior, then other fidelities' references known on `cols`), β (≤ 3 terms of φ, fewer
    than the equations leave) and the open compositions' coordinates t are fitted jointly so that ref + null·t,
    which matches every label, is as close as possible to shape + φ·β over the fitted elements `cols`; the
    closest shape wins (GFN1-xTB labels then take GFN2-xTB's shape, not a DFT one). ref [N_ELEMENTS]: the
    fidelity's own least-squares references, null [len(cols), d]."""
    q = min(3, len(cols) - null.shape[1] - 1)
    if q < 1:
        return priors[0]
    phi = _features(np.arange(N_ELEMENTS), q)
    A = np.concatenate([null, -phi[cols]], axis=1)  # unknowns: t [d], β [q]
    best = None
    for shape in priors:
        x = np.linalg.lstsq(A, shape[cols] - ref[cols], rcond=None)[0]
        miss = float(np.linalg.norm(A @ x - (shape[cols] - ref[cols])))
        if best is None or miss < best[0] - 1e-9:
            best = (miss, shape + phi @ x[null.shape[1] :])
    return best[1]


def _features(z: np.ndarray, p: int) -> np.ndarray:
    """φ(Z) [n, p]: 1, Z/10, (Z/10)^(7/3) (the first p)."""
    x = np.asarray(z, dtype=np.float64) / 10
    return np.stack([np.ones_like(x), x, x ** (7 / 3)], axis=1)[:, :p]


def _shift_model(ref, fitted, identified, with_base: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prior references [N_ELEMENTS, K] of the model a[Z] + φ(Z)·β[f] fitted to the known references,
    the leave-one-out RMS error [K] (eV/atom; NaN where nothing to leave out) of the chosen φ, and [K] bool:
    whether f's prior is at f's own scale (β[f] fitted to its references, or f the gauge fidelity).

    Cells (Z, f): identified references (weight 1); for an element identified nowhere (e.g. only ever
    in one ratio with another), its fitted ones (weight 1e-3: they place a[Z] and nothing else). β = 0 for the fidelity with
    most identified references (gauge). Informative cells: identified, of an element identified at ≥ 2
    fidelities; the number of terms p ∈ {1, 2, 3} minimises their leave-one-out error."""
    K = ref.shape[1]
    elements = np.flatnonzero(fitted.any(1))
    n_ident = identified[elements].sum(1)
    use = identified[elements] | (fitted[elements] & (n_ident == 0)[:, None])
    cells = np.argwhere(use)  # [c, 2] (position in elements, fidelity)
    weight = np.where(identified[elements[cells[:, 0]], cells[:, 1]], 1.0, 1e-3)
    y = ref[elements[cells[:, 0]], cells[:, 1]]
    informative = (weight == 1.0) & (n_ident[cells[:, 0]] >= 2)
    base = int(np.argmax(identified.sum(0)))
    per_fid = np.bincount(cells[informative, 1], minlength=K)
    best = None
    for p in (1, 2, 3):
        terms = np.where(np.arange(K) == base, 0, np.minimum(p, np.maximum(per_fid - 1, 0)))
        if p > 1 and not (terms >= p).any():
            break
        errors = np.full(len(cells), np.nan)
        for i in np.flatnonzero(informative):
            keep = np.arange(len(cells)) != i
            theta = _fit_cells(cells[keep], y[keep], weight[keep], elements, terms)
            errors[i] = _predict(theta, cells[[i]], elements, terms)[0] - y[i]
        score = np.sqrt(np.nanmean(errors**2)) if informative.any() else 0.0
        if best is None or score < best[0]:
            best = (score, terms, errors)
    _, terms, errors = best
    theta = _fit_cells(cells, y, weight, elements, terms)
    grid = np.array([(e, f) for e in range(len(elements)) for f in range(K)])
    prior = np.zeros((N_ELEMENTS, K))
    prior[elements[grid[:, 0]], grid[:, 1]] = _predict(theta, grid, elements, terms)
    loo = np.full(K, np.nan)
    for f in range(K):
        e = errors[(cells[:, 1] == f) & informative]
        if len(e) and (f != base or with_base):  # with_base: the gauge fidelity's too (for reports)
            loo[f] = float(np.sqrt(np.mean(e**2)))
    return prior, loo, (terms > 0) | (np.arange(K) == base)


def _design(cells, elements, terms) -> np.ndarray:
    """Rows [c, n_el + Σ terms]: one-hot element (a) and φ(Z) in the block of the cell's fidelity (β)."""
    starts = np.concatenate([[0], np.cumsum(terms)]) + len(elements)
    X = np.zeros((len(cells), starts[-1]))
    X[np.arange(len(cells)), cells[:, 0]] = 1.0
    for f in np.flatnonzero(terms):
        rows = np.flatnonzero(cells[:, 1] == f)
        X[np.ix_(rows, np.arange(starts[f], starts[f + 1]))] = _features(elements[cells[rows, 0]], terms[f])
    return X


def _fit_cells(cells, y, weight, elements, terms) -> np.ndarray:
    X = _design(cells, elements, terms)
    w = np.sqrt(weight)[:, None]
    return np.linalg.lstsq(X * w, y * w[:, 0], rcond=None)[0]


def _predict(theta, cells, elements, terms) -> np.ndarray:
    return _design(cells, elements, terms) @ theta


def _null_space(G: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis [n, d] of the null space of a symmetric positive semi-definite matrix [n, n]."""
    w, v = np.linalg.eigh(G)
    return v[:, w <= rtol * max(float(w.max()), 1e-300) * len(w)]


# ---------------------------------------------------------------------------------------------- contacts
def edge_lengths(dataset, neighbors, structures: np.ndarray, chunk: int = 20000):
    """Per chunk of `structures`: (atoms [n] their atoms' indices in `dataset`, gi [E], gj [E] each edge's atoms
    (indices in `dataset`), d [E] its length Å, centre [E] its first atom's position in `atoms`), from the cached
    neighbour lists (data.neighbors.NeighborCache)."""
    structures = np.asarray(structures, dtype=np.int64)
    offsets = np.asarray(dataset.offsets)
    pos, cells = np.asarray(dataset.positions), np.asarray(dataset.cells)
    for a in range(0, len(structures), chunk):
        s = structures[a : a + chunk]
        n = np.diff(offsets)[s]
        atoms = np.repeat(offsets[s] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))  # the chunk's atoms
        i, j, shifts, counts = neighbors.edges(s)
        owner = np.repeat(s, counts)
        gi, gj = offsets[owner] + i, offsets[owner] + j
        vec = pos[gj] - pos[gi] + np.einsum("ea,eab->eb", shifts.astype(np.float64), cells[owner])
        yield atoms, gi, gj, np.linalg.norm(vec, axis=1), np.repeat(np.cumsum(n) - n, counts) + i


def shortest_contacts(dataset, neighbors, structures: np.ndarray, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """(contact [N_ELEMENTS, N_ELEMENTS] Å: the shortest distance of each element pair within the neighbour lists
    (cached ones, data.neighbors.NeighborCache) of `structures`, 0 where a pair never occurs, symmetric;
    reach [N_ELEMENTS] Å: the farthest any atom of each element lies from its nearest neighbour, inf when one has
    none within the cutoff, 0 for elements absent)."""
    out = np.full((N_ELEMENTS, N_ELEMENTS), np.inf)
    reach = np.zeros(N_ELEMENTS)
    if not hasattr(neighbors, "edges") or not hasattr(neighbors, "edge_offsets"):
        return np.zeros((N_ELEMENTS, N_ELEMENTS)), reach  # on-the-fly lists: not computed (large data)
    numbers = np.asarray(dataset.numbers, dtype=np.int64)
    for atoms, gi, gj, d, centre in edge_lengths(dataset, neighbors, structures, chunk):
        nearest = np.full(len(atoms), np.inf)
        np.minimum.at(out, (numbers[gi], numbers[gj]), d)
        np.minimum.at(nearest, centre, d)
        np.maximum.at(reach, numbers[atoms], nearest)
    out = np.minimum(out, out.T)
    out[~np.isfinite(out)] = 0.0
    return out, reach
