"""Data statistics: element tables, composition matrices, per-fidelity reference energies and scales.

Reference energies (eV per atom of each element, per fidelity) are fitted jointly over fidelities:

    E[s, f] ≈ Σ_Z n[s, Z] · ref[Z, f],     ref[Z, f] = a[Z] + b[f] + η[Z, f]

a shared per-element reference a, one shift b per fidelity, and per-element shifts η with a ridge
(Gaussian) prior that shrinks them to zero where a fidelity's labels say nothing. Where a fidelity's
labels determine ref[:, f] (its training compositions span the element's direction) the fit is that
fidelity's own least squares, unchanged; elements without labels at f (or only in fixed ratios with
others, e.g. Ga and As only as GaAs) get the shared estimate a[Z] + b[f] (+ the part of η the labels
fix). `References.fitted[Z, f]` records which references were fitted from f's own labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_Z = 118  # largest atomic number
N_ELEMENTS = MAX_Z + 1  # rows of per-element tables, indexed by atomic number (row 0 unused)


@dataclass
class References:
    """Fitted per-fidelity reference energies and scales.

    ref [N_ELEMENTS, K] eV/atom; scale [K] eV; fitted [N_ELEMENTS, K] bool: True where ref[Z, f] is
    determined by fidelity f's own energy labels; spread [K] eV/atom: scatter (RMS) of the per-element
    shifts η at f around the shared model (how far an estimated reference may be off; NaN: unknown).
    """

    ref: np.ndarray
    scale: np.ndarray
    fitted: np.ndarray
    spread: np.ndarray

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
def fit_references(dataset, pairs: np.ndarray, ridge: float = 1e-8, pooled: bool = False,
                   shared_scale: bool = False, shift_ridge: float = 1e-6) -> References:
    """Per-fidelity reference energies (joint fit, see the module docstring) and residual scales.

    dataset: FidelityDataset; pairs [P, 2] (structure, fidelity) training samples.
    scale [K] eV: standard deviation of the per-atom residual of each fidelity's own fit (fallback: RMS
    of its force labels, then 1 eV). `pooled`: the labels of all fidelities fitted as one (every
    column holds that fit; for fidelity-blind models). `shared_scale`: one scale for every fidelity,
    from the residuals of all fidelities together. `ridge` (relative) regularises each least-squares
    fit; `shift_ridge` (relative) is the prior on the per-element shifts η (small: a and b follow the
    fitted references, every element and fidelity weighted alike).
    """
    K = len(dataset.fidelities)
    elements, counts = composition_matrix(dataset)  # [n_el], [S, n_el]
    ref, scale = np.zeros((N_ELEMENTS, K)), np.ones(K)
    fitted, spread = np.zeros((N_ELEMENTS, K), bool), np.full(K, np.nan)
    systems, residuals = [], []
    for ks in ([list(range(K))] if pooled else [[k] for k in range(K)]):
        own = _own_fit(dataset, pairs, ks, elements, counts, ridge)
        ref[:, ks], fitted[:, ks], scale[ks] = own.ref[:, None], own.fitted[:, None], own.scale
        systems.append(own.system)
        if own.resid is not None:
            residuals.append(own.resid)
    if shared_scale and not pooled and residuals:
        resid = np.concatenate(residuals)
        scale[:] = float(resid.std()) if len(resid) > 1 and resid.std() > 1e-4 else force_rms(dataset, pairs, list(range(K)))
    if not pooled:
        _fill_from_shared(ref, fitted, spread, systems, shift_ridge)
    return References(ref, scale, fitted, spread)


def fit_baseline(dataset, pairs: np.ndarray, ridge: float = 1e-8, pooled: bool = False,
                 shared_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ref [N_ELEMENTS, K] eV, scale [K] eV) of fit_references."""
    r = fit_references(dataset, pairs, ridge, pooled, shared_scale)
    return r.ref, r.scale


def fit_new_fidelity(dataset, pairs: np.ndarray, k: int, ref: np.ndarray, fitted: np.ndarray,
                     ridge: float = 1e-8, shift_ridge: float = 1e-6) -> References:
    """References of fidelity k of `dataset` (its labelled pairs in `pairs`) next to known fidelities'.

    ref, fitted [N_ELEMENTS, K0]: known references (e.g. a trained model's head.ref) and which of them
    were fitted from labels; each fitted one counts as one observation of a[Z] + b[g] + η[Z, g].
    Fidelity k gets its own least-squares fit where its labels determine it, the shared estimate
    elsewhere. Returns References of one column (ref [N_ELEMENTS, 1], scale [1], fitted, spread)."""
    K0 = ref.shape[1]
    elements, counts = composition_matrix(dataset)
    own = _own_fit(dataset, pairs, [k], elements, counts, ridge)
    known = [(np.diag(fitted[:, g].astype(float)), np.where(fitted[:, g], ref[:, g], 0.0), int(fitted[:, g].sum()))
             for g in range(K0)]
    all_ref = np.concatenate([np.where(fitted, ref, 0.0), own.ref[:, None]], axis=1)
    all_fitted = np.concatenate([fitted, own.fitted[:, None]], axis=1)
    spread = np.full(K0 + 1, np.nan)
    _fill_from_shared(all_ref, all_fitted, spread, known + [own.system], shift_ridge, only=K0)
    return References(all_ref[:, [K0]], np.array([own.scale]), all_fitted[:, [K0]], spread[[K0]])


@dataclass
class _OwnFit:
    ref: np.ndarray  # [N_ELEMENTS] eV/atom (0 where no labels)
    fitted: np.ndarray  # [N_ELEMENTS] bool
    scale: float
    resid: np.ndarray | None  # per-atom residuals [n] eV
    system: tuple | None  # normal equations (XᵀX [N_ELEMENTS, N_ELEMENTS], Xᵀy [N_ELEMENTS], n samples)


def _own_fit(dataset, pairs, ks, elements, counts, ridge) -> _OwnFit:
    """Least squares of the energy labels at fidelities ks (pooled when several) on compositions."""
    sel = pairs[np.isin(pairs[:, 1], ks)]
    sel = sel[~np.isnan(dataset.energy[sel[:, 0], sel[:, 1]])]
    s, k = sel[:, 0], sel[:, 1]
    ref, fitted = np.zeros(N_ELEMENTS), np.zeros(N_ELEMENTS, bool)
    if len(s) == 0:
        return _OwnFit(ref, fitted, force_rms(dataset, pairs, ks), None, None)
    y = np.asarray(dataset.energy)[s, k]
    coef, cols, resid, ata, aty = _least_squares(counts, s, y, ridge)
    ref[elements[cols]], fitted[elements[cols]] = coef, True
    scale = float(resid.std()) if len(s) > 1 and resid.std() > 1e-4 else force_rms(dataset, pairs, ks)
    G, h = np.zeros((N_ELEMENTS, N_ELEMENTS)), np.zeros(N_ELEMENTS)
    G[np.ix_(elements, elements)], h[elements] = ata, aty
    return _OwnFit(ref, fitted, scale, resid, (G, h, len(s)))


def _least_squares(counts: np.ndarray, rows: np.ndarray, y: np.ndarray, ridge: float, chunk: int = 262144):
    """Ridge least squares y ≈ counts[rows] @ coef, in chunks (bounded memory for millions of rows).

    Returns coef [n_cols], the used columns (elements present in rows), per-atom residuals [n] and the
    normal equations XᵀX [n_el, n_el], Xᵀy [n_el] over all columns."""
    n_el = counts.shape[1]
    ata, aty = np.zeros((n_el, n_el)), np.zeros(n_el)
    for a in range(0, len(rows), chunk):
        X = counts[rows[a:a + chunk]].astype(np.float64)
        ata += X.T @ X
        aty += X.T @ y[a:a + chunk]
    cols = np.flatnonzero(np.diag(ata) > 0)
    coef = np.linalg.solve(ata[np.ix_(cols, cols)] + ridge * len(rows) * np.eye(len(cols)), aty[cols])
    resid = np.empty(len(rows))
    for a in range(0, len(rows), chunk):
        X = counts[rows[a:a + chunk]][:, cols].astype(np.float64)
        resid[a:a + chunk] = (y[a:a + chunk] - X @ coef) / X.sum(1)
    return coef, cols, resid, ata, aty


def _fill_from_shared(ref, fitted, spread, systems, shift_ridge: float, only: int | None = None) -> None:
    """In place: what the labels leave undetermined ← the shared model a[Z] + b[f].

    ref, fitted [N_ELEMENTS, K], spread [K]; systems[f]: fidelity f's normal equations or None (no
    energy labels). Elements without labels at f take a[Z] + b[f]; among elements with labels, the
    compositions f's labels do not determine (e.g. Ga and As only as GaAs) take the shared model's
    values, the determined ones keep f's own fit (bit for bit when it determines all). `only`: change
    only this fidelity's column."""
    present = np.flatnonzero(fitted.any(1))
    if len(present) == 0 or all(s is None for s in systems):
        return
    a, b = _shared_model(systems, present, shift_ridge)
    prior = np.zeros((N_ELEMENTS, len(systems)))
    prior[present] = a[:, None] + b[None, :]
    for f, system in enumerate(systems):
        if only is not None and f != only:
            continue
        cols = np.flatnonzero(fitted[:, f])
        if system is not None and len(cols):
            null = _null_space(system[0][np.ix_(cols, cols)])  # [n_cols, d]: compositions the labels leave free
            if null.shape[1]:
                ref[cols, f] += null @ (null.T @ (prior[cols, f] - ref[cols, f]))
        missing = np.setdiff1d(present, cols)
        ref[missing, f] = prior[missing, f]
        informative = fitted[cols].sum(1) > 1  # η says something only for elements fitted at 2+ fidelities
        eta = (ref[cols, f] - prior[cols, f])[informative]
        spread[f] = float(np.sqrt((eta ** 2).mean())) if len(eta) > 1 else np.nan


def _shared_model(systems, present: np.ndarray, shift_ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Shared references a [n] (over `present`) and fidelity shifts b [K] of the joint ridge fit.

    Unknowns a[Z]; b[f], with b = 0 for the fidelity with most samples (gauge) and for fidelities
    without energy labels; η[Z, f] for each element with labels at f, penalised by
    shift_ridge · mean diag(XᵀX_f). Each fidelity's normal equations enter through the map P from
    element counts to its unknowns (a, b[f], η[:, f]): Pᵀ G P, Pᵀ h."""
    n, K = len(present), len(systems)
    labelled = [f for f, s in enumerate(systems) if s is not None]
    base = max(labelled, key=lambda f: systems[f][2])
    shifts = [f for f in labelled if f != base]
    blocks = {f: np.flatnonzero(np.diag(systems[f][0])[present] > 0) for f in labelled}
    size = n + len(shifts) + sum(len(c) for c in blocks.values())
    M, r = np.zeros((size, size)), np.zeros(size)
    start = n + len(shifts)
    for f in labelled:
        G, h, cols = systems[f][0][np.ix_(present, present)], systems[f][1][present], blocks[f]
        eta = start + np.arange(len(cols))
        idx = np.concatenate([np.arange(n), [n + shifts.index(f)] if f in shifts else [], eta]).astype(int)
        P = np.zeros((len(idx), n))
        P[:n] = np.eye(n)
        if f in shifts:
            P[n] = 1.0
        P[len(idx) - len(cols) + np.arange(len(cols)), cols] = 1.0
        M[np.ix_(idx, idx)] += P @ G @ P.T
        r[idx] += P @ h
        if len(cols):
            M[eta, eta] += shift_ridge * float(np.diag(G)[cols].mean())
        start += len(cols)
    d = np.sqrt(np.maximum(np.diag(M), 1e-300))  # equilibrate: counts² of different sizes per block
    theta = np.linalg.lstsq(M / np.outer(d, d), r / d, rcond=1e-12)[0] / d
    b = np.zeros(K)
    b[shifts] = theta[n:n + len(shifts)]
    return theta[:n], b


def _null_space(G: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis [n, d] of the null space of a symmetric positive semi-definite matrix [n, n]."""
    w, v = np.linalg.eigh(G)
    return v[:, w <= rtol * max(float(w.max()), 1e-300) * len(w)]
