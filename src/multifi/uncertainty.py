"""Uncertainty of predicted energies: last-layer prediction rigidity (LLPR) and deep ensembles.

The energy is a sum over atoms of the readout MLP, whose last layer is linear:
E = scale_k · Σ_i (w · h_i + b) + Σ_i ref[Z_i, k], with h_i [H] the last hidden activations of atom i
at fidelity k (the fidelity vector enters them where it is concatenated to the atom features, and
through the representation in input mode; in heads mode h_i comes from fidelity k's own MLP). So the
energy is linear in the last layer's parameters (w, b) with the structure feature
f = [Σ_i h_i, N_atoms]  [H+1]. LLPR (Bigi et al., 2024) treats these parameters as Gaussian:

    Σ_k = (Σ_train f fᵀ + λ I)⁻¹          over the training structures labelled at fidelity k
    σ_k(structure) = α_k · sqrt(fᵀ Σ_k f)  eV

λ and α are chosen on validation structures of fidelity k by maximum Gaussian likelihood of the
errors (α in closed form for every λ of a grid). σ is large where a structure's features lie in
directions the training structures did not span. Σ, α and λ of each fidelity are stored in a side
file next to the model, `<model stem>.llpr.npz` (see `llpr_path`), with a fingerprint of the weights:
a model retrained after calibration is an error, not a silently wrong σ.

A deep ensemble (models trained from different seeds) is the reference: σ = the standard deviation
of its members' energies (uncalibrated).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multifi.errors import MultifiError

log = logging.getLogger("multifi")

#: ridge strengths λ tried, relative to the mean diagonal of Σ_train f fᵀ; beyond the largest, further decades up to
#: RIDGE_LIMIT while the validation likelihood still improves (as λ grows, σ tends to α·|f| / √λ: features' norm alone)
RIDGE_GRID = tuple(10.0**e for e in range(-8, 2))
RIDGE_LIMIT = 1e8


# ---------------------------------------------------------------------------------------------- features
def readout_features(potential, graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden activations of the readout, summed per structure, and the energies.

    graph: a Graph whose `fidelity` [B] says at which fidelity each structure is read out.
    Returns f [B, H+1] float64 (Σ_i h_i, then the atom count: the bias column) and energy [B] eV.
    """
    from multifi.nn import scatter_sum

    pot, head = potential, potential.head
    B = graph.num_graphs
    i, j = graph.edge_index
    shift = torch.einsum("ea,eab->eb", graph.shifts, graph.cell[graph.batch[i]])
    vec = graph.positions[j] - graph.positions[i] + shift
    fid_atom = graph.fidelity[graph.batch]
    with torch.no_grad():
        geometry = pot.representation.geometry(graph.edge_index, vec)
        s = pot.representation(
            graph.numbers, graph.edge_index, vec, pot.conditioning.input_condition(fid_atom), geometry
        )
        cond = pot.conditioning.readout_condition(fid_atom)
        x = s if cond is None else torch.cat([s, cond], dim=-1)
        if head.heads:  # every head's hidden layer, then each atom's own fidelity's
            hs = torch.stack([_hidden(mlp, x) for mlp in head.mlps], dim=1)  # [N, K, H]
            h = hs[torch.arange(len(x)), fid_atom]
        else:
            h = _hidden(head.mlps[0], x)
        atom_e = head(s, cond, graph.numbers, fid_atom)
    f = scatter_sum(h.double(), graph.batch, B)
    f = torch.cat([f, graph.n_atoms.double().unsqueeze(-1)], dim=-1)
    return f, scatter_sum(atom_e, graph.batch, B)


def _hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    """Activations entering the MLP's last (linear) layer."""
    for layer in list(mlp)[:-1]:
        x = layer(x)
    return x


def dataset_features(
    potential, dataset, structures: np.ndarray, fidelity: str, batch_size: int = 64, neighbors=None
) -> tuple[np.ndarray, np.ndarray]:
    """Readout features f [n, H+1] and predicted energies [n] eV of dataset structures at `fidelity` (a name)."""
    from multifi.data.batch import GraphCollator
    from multifi.data.fidelity import FidelityTable
    from multifi.data.neighbors import make_neighbors

    k = potential.fidelity_index(fidelity)
    if len(dataset.fidelities) == 0:  # unlabelled structures: a label column for the collator to read
        dataset = dataset.with_fidelities(FidelityTable(["unlabelled"]))
    structures = np.asarray(structures, dtype=np.int64)
    neighbors = neighbors or make_neighbors(dataset, potential.cutoff, progress=False)
    collate = GraphCollator(dataset, neighbors)
    dtype = next(potential.parameters()).dtype
    potential.eval()
    feats, energies = [], []
    for start in range(0, len(structures), batch_size):
        s = structures[start : start + batch_size]
        g = collate(np.stack([s, np.zeros_like(s)], axis=1)).to("cpu", dtype)
        g.fidelity = torch.full_like(g.fidelity, k)
        f, e = readout_features(potential, g)
        feats.append(f.numpy())
        energies.append(e.numpy())
    H = potential.head.mlps[0][-1].in_features + 1
    return (np.concatenate(feats) if feats else np.zeros((0, H)), np.concatenate(energies) if energies else np.zeros(0))


# ---------------------------------------------------------------------------------------------- LLPR
@dataclass
class LLPRFidelity:
    """LLPR of one fidelity: cov [H+1, H+1] = (FᵀF + λI)⁻¹, alpha (σ = alpha·sqrt(fᵀ cov f), eV)."""

    cov: np.ndarray
    alpha: float
    ridge: float
    n_train: int
    n_val: int
    ridge_at_limit: bool = False  # λ at RIDGE_LIMIT, the likelihood still improving (saved: σ's users say it)

    def sigma(self, f: np.ndarray) -> np.ndarray:
        """f [n, H+1] → σ [n] eV."""
        return self.alpha * np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", f, self.cov, f), 0.0))


def fit_llpr_fidelity(
    f_train: np.ndarray, f_val: np.ndarray, err_val: np.ndarray, ridge: float | None = None
) -> LLPRFidelity:
    """LLPR of one fidelity from training features [n, H+1], validation features [m, H+1] and errors [m] eV.

    λ: `ridge` (absolute) if given, else the grid value (RIDGE_GRID × mean diagonal of FᵀF) with the
    best validation likelihood; α² = mean(err² / fᵀΣf) maximises the likelihood for a given λ."""
    if len(f_train) == 0:
        raise MultifiError("LLPR: no training structures at this fidelity")
    A = f_train.T @ f_train
    d, V = np.linalg.eigh(A)
    d = np.maximum(d, 0.0)
    scale = max(float(np.trace(A)) / len(A), 1e-12)
    grid = [ridge] if ridge is not None else [r * scale for r in RIDGE_GRID]
    proj = (f_val @ V) ** 2  # [m, H+1]

    def likelihood(lam: float) -> tuple[float, float, float]:
        """(mean negative log-likelihood of the validation errors, λ, α²) at λ, with α² at its optimum."""
        u2 = np.maximum(proj @ (1.0 / (d + lam)), 1e-300)
        alpha2 = max(float(np.mean(err_val**2 / u2)) if len(err_val) else 1.0, 1e-300)
        nll = float(np.mean(np.log(alpha2 * u2) + err_val**2 / (alpha2 * u2))) if len(err_val) else 0.0
        return nll, lam, alpha2

    best = min((likelihood(lam) for lam in grid), key=lambda t: t[0])
    decade = round(np.log10(RIDGE_GRID[-1]))
    while ridge is None and best[1] == grid[-1] and 10.0**decade < RIDGE_LIMIT:  # the grid's top: go on
        decade += 1
        grid.append(10.0**decade * scale)
        best = min(best, likelihood(grid[-1]), key=lambda t: t[0])
    _, lam, alpha2 = best
    cov = (V / (d + lam)) @ V.T
    return LLPRFidelity(
        cov=cov,
        alpha=float(np.sqrt(alpha2)),
        ridge=float(lam),
        n_train=len(f_train),
        n_val=len(err_val),
        ridge_at_limit=ridge is None and lam == RIDGE_LIMIT * scale,
    )


@dataclass
class LLPR:
    """LLPR of several fidelities of one model (keyed by fidelity name)."""

    fidelities: dict[str, LLPRFidelity]
    fingerprint: str
    said: set = field(default_factory=set, compare=False, repr=False)  # fidelities whose ridge at the limit was said

    def of(self, fidelity: str, where: str = "") -> LLPRFidelity:
        """The calibration of `fidelity`; one calibrated at the largest ridge is said once (its σ ranks little)."""
        if fidelity not in self.fidelities:
            known = ", ".join(self.fidelities) or "none"
            raise MultifiError(
                f"{where}: no LLPR calibration for fidelity {fidelity!r} (calibrated: {known}); "
                f"run `multifi calibrate` with labels of that fidelity"
            )
        p = self.fidelities[fidelity]
        if p.ridge_at_limit and fidelity not in self.said:
            self.said.add(fidelity)
            log.warning(
                "%s: σ calibrated at the largest ridge (λ → ∞; `multifi calibrate` said so): about proportional to "
                "the norm of a structure's readout features, its ranking of structures means little",
                fidelity,
            )
        return p

    def save(self, path: Path) -> Path:
        from multifi.data.dataset import atomic_write

        arrays = {"fingerprint": np.array(self.fingerprint), "names": np.array(list(self.fidelities))}
        for i, p in enumerate(self.fidelities.values()):
            arrays[f"cov{i}"] = p.cov
            arrays[f"meta{i}"] = np.array([p.alpha, p.ridge, p.n_train, p.n_val, p.ridge_at_limit], np.float64)
        atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))
        return Path(path)

    @classmethod
    def load(cls, path: Path, potential=None) -> LLPR:
        """Read a side file; with `potential`, check that it was calibrated for these weights."""
        path = Path(path)
        if not path.exists():
            raise MultifiError(f"{path}: no LLPR calibration next to the model; run `multifi calibrate` first")
        try:
            z = np.load(path, allow_pickle=False)
            fps = {}
            for i, name in enumerate(z["names"].tolist()):
                meta = z[f"meta{i}"]  # files written before the ridge flag was saved: four numbers
                alpha, ridge, n_train, n_val = meta[:4]
                at_limit = bool(meta[4]) if len(meta) > 4 else False
                fps[str(name)] = LLPRFidelity(
                    z[f"cov{i}"], float(alpha), float(ridge), int(n_train), int(n_val), at_limit
                )
            out = cls(fps, str(z["fingerprint"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # also a cut file
            raise MultifiError(f"{path}: not an LLPR calibration file ({type(exc).__name__})") from None
        if potential is not None and out.fingerprint != weights_fingerprint(potential):
            raise MultifiError(
                f"{path}: calibrated for other model weights (the model changed since); run `multifi calibrate` again"
            )
        return out


def llpr_path(model_path: str | Path) -> Path:
    """The LLPR side file of a model file: runs/x/model.pt → runs/x/model.llpr.npz (also for runs/x)."""
    from multifi.models.registry import model_file

    p = model_file(model_path)
    return p.with_name(p.stem + ".llpr.npz")


def weights_fingerprint(potential) -> str:
    """A hash of the potential's weights and buffers (which calibration file belongs to which model); not of
    head.spread (the error of estimated references) nor of the atomic-energy records (head.atomic, atomic_shift, given:
    how the references were made, which head.ref holds), recorded since later versions: older calibrations stay valid."""
    h = hashlib.sha1()
    for name, t in sorted(potential.state_dict().items()):
        if name in ("head.spread", "head.atomic", "head.atomic_shift", "head.given"):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def fit_llpr(
    potential,
    dataset,
    train_pairs: np.ndarray,
    val_pairs: np.ndarray,
    batch_size: int = 64,
    fidelities: list[str] | None = None,
) -> LLPR:
    """LLPR per fidelity from (structure, dataset fidelity index) pairs: Σ from the training pairs, λ and α
    from the validation pairs (their energy labels). Fidelities without training pairs are left out."""
    from multifi.data.neighbors import make_neighbors
    from multifi.train.evaluate import pairs_with_estimated_references

    neighbors = make_neighbors(dataset, potential.cutoff, progress=False)
    out = {}
    names = fidelities or [n for n in dataset.fidelities.names if n in potential.fidelities]
    for name in names:
        k = dataset.fidelities.index(name, where="calibration data")
        tr = train_pairs[train_pairs[:, 1] == k, 0]
        va = val_pairs[val_pairs[:, 1] == k, 0]
        va = va[~np.isnan(dataset.energy[va, k])]
        if len(tr) == 0:
            if len(va):  # its validation labels calibrate nothing without training structures (Σ)
                log.warning("%s: %d validation labels but no training structures: not calibrated", name, len(va))
            continue
        # an element without labels at this fidelity (estimated reference energy) errs by the reference's error,
        # which the features cannot know: such structures would inflate α for every structure (as validation
        # during training, they are left out)
        estimated = pairs_with_estimated_references(potential, dataset, np.stack([va, np.full(len(va), k)], 1))
        if estimated.any():
            log.warning(
                "%s: %d of %d validation structures contain elements whose reference energy was estimated: "
                "left out of the calibration (their errors are not what σ describes)",
                name,
                int(estimated.sum()),
                len(va),
            )
            va = va[~estimated]
        if len(va) == 0:  # α and λ come from held-out labels: without them σ would be uncalibrated
            log.warning("%s: no validation energy labels: not calibrated (α and λ need held-out labels)", name)
            continue
        f_tr, _ = dataset_features(potential, dataset, tr, name, batch_size, neighbors)
        f_va, e_va = dataset_features(potential, dataset, va, name, batch_size, neighbors)
        out[name] = fit_llpr_fidelity(f_tr, f_va, e_va - dataset.energy[va, k])
    if not out:
        raise MultifiError(
            "calibration data: no fidelity of the model with both training structures and validation energy labels"
        )
    return LLPR(out, weights_fingerprint(potential))


# ---------------------------------------------------------------------------------------------- ensembles
def ensemble_energies(
    potentials: list, dataset, structures: np.ndarray, fidelity: str, batch_size: int = 64, recorded=None
) -> np.ndarray:
    """[M, n] energies (eV) of M models at `fidelity`; σ_ensemble = their std over models (ddof 1).
    `recorded` (EnsembleMean.recorded of these models on `dataset`): taken from there when it holds every
    structure at this fidelity, instead of running the models again."""
    from multifi.data.neighbors import make_neighbors

    if not potentials:
        raise MultifiError("an ensemble needs at least one model")
    if recorded:
        k = potentials[0].fidelity_index(fidelity)
        found = [recorded.get((int(s), k)) for s in structures]
        if all(e is not None and len(e) == len(potentials) for e in found):
            return np.stack(found, axis=1) if found else np.zeros((len(potentials), 0))
    neighbors = make_neighbors(dataset, max(p.cutoff for p in potentials), progress=False)
    return np.stack([dataset_features(p, dataset, structures, fidelity, batch_size, neighbors)[1] for p in potentials])


# ---------------------------------------------------------------------------------------------- calibration
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 2 values or a constant input."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return float("nan")
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    uniq, inv = np.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # ties share their mean rank
        ranks = np.bincount(inv, weights=ranks)[inv] / np.bincount(inv)[inv]
    return ranks


def miscalibration_area(errors: np.ndarray, sigma: np.ndarray, n_levels: int = 99) -> float:
    """Area between the observed and the expected coverage of Gaussian central intervals (0 = calibrated).

    For expected proportions p in (0, 1), the observed proportion is the fraction of |error| ≤ z_p·σ
    with z_p = Φ⁻¹((1 + p)/2); the area is the mean |observed − p| over the levels (0 … 0.5)."""
    from statistics import NormalDist

    errors, sigma = np.abs(np.asarray(errors, float)), np.asarray(sigma, float)
    if len(errors) == 0:
        return float("nan")
    p = np.linspace(0.0, 1.0, n_levels + 2)[1:-1]
    z = np.array([NormalDist().inv_cdf((1 + q) / 2) for q in p])
    observed = (errors[None, :] <= z[:, None] * np.maximum(sigma, 1e-300)[None, :]).mean(1)
    return float(np.abs(observed - p).mean())


def calibration_metrics(errors: np.ndarray, sigma: np.ndarray) -> dict:
    """{"n", "spearman" (|error| vs σ), "miscalibration_area", "mean_sigma_meV", "rmse_meV"}: errors and σ in eV."""
    errors, sigma = np.asarray(errors, float), np.asarray(sigma, float)
    return {
        "n": len(errors),
        "spearman": spearman(np.abs(errors), sigma),
        "miscalibration_area": miscalibration_area(errors, sigma),
        "mean_sigma_meV": float(sigma.mean() * 1000) if len(sigma) else float("nan"),
        "rmse_meV": float(np.sqrt((errors**2).mean()) * 1000) if len(errors) else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- workflows
def calibrate_run(run_dir: str | Path, model: str | Path | None = None, batch_size: int = 64) -> tuple[LLPR, Path]:
    """Fit the LLPR of a run's model on its own training and validation splits; writes the side file.

    The data are those of the run's config.yaml (its dataset.npz when cached), split as in training."""
    from multifi.models.registry import load_potential

    run_dir = Path(run_dir)
    model = Path(model) if model else run_dir / "model.pt"
    if not (run_dir / "config.yaml").exists():
        raise MultifiError(f"{run_dir}: not a run directory (no config.yaml)")
    potential = load_potential(model)
    dataset, pairs = _run_data(run_dir)
    if not len(pairs["val"]):
        raise MultifiError(
            f"{run_dir}: the run has no validation split; α of LLPR is calibrated on validation "
            f"labels (use `multifi calibrate MODEL --train … --val …`)"
        )
    llpr = fit_llpr(potential, dataset, pairs["train"], pairs["val"], batch_size)
    return llpr, save_calibration(llpr, llpr_path(model))


def _run_data(run_dir: Path):
    """A run's dataset and its training and validation pairs, as it trained (an extension run: its pairs.npz)."""
    from multifi.data.dataset import FidelityDataset
    from multifi.data.split import TRAIN_LABELS, read_train_labels
    from multifi.train.extension_data import PAIRS, load_old_run
    from multifi.train.prepare import prepare_data
    from multifi.train.run_config import load_run_config

    if (run_dir / PAIRS).exists():
        run = load_old_run(run_dir)
        return run.dataset, {"train": run.train, "val": run.val}
    cfg = load_run_config(run_dir / "config.yaml")
    cached = run_dir / "dataset.npz"
    prep = prepare_data(cfg, FidelityDataset.load(cached) if cached.exists() else None, str(run_dir / "config.yaml"))
    if (run_dir / TRAIN_LABELS).exists():  # the labels data.train_limits kept, as recorded
        prep.pairs["train"] = read_train_labels(run_dir / TRAIN_LABELS, prep.dataset)
    return prep.dataset, prep.pairs


def calibrate_files(
    model: str | Path, train_files: list[str], val_files: list[str], fidelity: str | None = None, batch_size: int = 64
) -> tuple[LLPR, Path]:
    """Fit the LLPR of a model from labelled training and validation files; writes the side file."""
    from multifi.data.dataset import FidelityDataset
    from multifi.data.sources import check_given_fidelity, read_labelled
    from multifi.data.split import labelled_pairs
    from multifi.models.registry import load_potential

    potential = load_potential(model)
    if fidelity:
        potential.fidelities.index(fidelity, where=str(model))
    train = FidelityDataset.merge([read_labelled(p, fidelity) for p in train_files])
    val = FidelityDataset.merge([read_labelled(p, fidelity) for p in val_files])
    ds = FidelityDataset.merge([train, val])
    if fidelity:
        check_given_fidelity(ds.fidelities.names, fidelity, [*train_files, *val_files], "calibrate at theirs")
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    # a label in both files (same key, same fidelity) is a training label; a structure trained at another
    # fidelity only still validates this one (its label here was never trained on)
    trained = _labels(train)
    is_train = np.array([(str(ds.keys[s]), ds.fidelities.names[k]) in trained for s, k in pairs], bool)
    copies = _copies_of_training_molecules(ds, pairs, ~is_train, train)  # the same molecule under another key
    in_val = _labels(val)
    shared = len(in_val & trained) + int(copies.sum())
    where = ", ".join(str(p) for p in val_files)
    if shared == len(in_val):
        raise MultifiError(
            f"{where}: every validation label is also in --train (same structure, same fidelity); calibrate on "
            "held-out labels"
        )
    if shared:
        log.warning(
            "%s: %d of %d validation labels are also in --train (same structure, same fidelity; by key, or as a "
            "molecule by geometry): used as training only",
            where,
            shared,
            len(in_val),
        )
    validation = ~is_train & ~copies
    validation &= ~_fitted_by_the_model(model, ds, pairs, validation, where)
    known = np.isin(
        np.asarray(ds.fidelities.names, dtype=object)[pairs[:, 1]],
        [fidelity] if fidelity else list(potential.fidelities.names),
    )
    _check_plausible_labels(potential, ds, pairs[validation & known], batch_size, where)  # the pairs fit_llpr uses
    llpr = fit_llpr(
        potential, ds, pairs[is_train], pairs[validation], batch_size, fidelities=[fidelity] if fidelity else None
    )
    return llpr, save_calibration(llpr, llpr_path(model))


def _copies_of_training_molecules(ds, pairs: np.ndarray, candidates: np.ndarray, train) -> np.ndarray:
    """[P] bool: the `candidates` (mask [P]) that are, at their fidelity, a molecule of `train` labelled there under
    another key (a file written without keys pairs structures by geometry only: same_molecules, within the
    tolerance of coordinates printed to 3 decimals, up to rotation and atom order). Crystals: by key only."""
    from multifi.data.dataset import GEOMETRY_TOLERANCE
    from multifi.data.same_geometry import same_molecules

    out = np.zeros(len(pairs), bool)
    for k, name in enumerate(ds.fidelities.names):
        rows = np.flatnonzero(candidates & (pairs[:, 1] == k))
        if not len(rows) or name not in train.fidelities.names:
            continue
        kt = train.fidelities.index(name)
        theirs = np.flatnonzero(~np.isnan(train.energy[:, kt]))
        if len(theirs):
            out[rows] = same_molecules(ds.subset(pairs[rows, 0]), train.subset(theirs), GEOMETRY_TOLERANCE)
    return out


def _fitted_by_the_model(model, ds, pairs: np.ndarray, validation: np.ndarray, where: str) -> np.ndarray:
    """[P] bool: the `validation` pairs (mask [P]) whose labels the model trained on, as its run beside it records
    (trained_on.trained_labels: by key and fidelity, or by geometry): left out, said; all of them: an error (α
    calibrated on labels the model fitted comes out too small, and σ with it). A run that kept only its split's
    keys cannot tell at which fidelity a structure trained: its structures' labels stay, said."""
    from multifi.trained_on import records_training, trained_labels

    out = np.zeros(len(pairs), bool)
    if not validation.any():
        return out
    if not records_training(model):
        log.warning(
            "%s: %s has no run beside it recording what it trained on: validation labels it trained on cannot be "
            "recognised (they make σ too small); calibrate on labels held out from its training",
            where,
            model,
        )
    same, unsure = trained_labels(model, ds, pairs[validation])
    if unsure:
        log.warning(
            "%s: %d validation label(s) belong to structures in the model's training split, at fidelities its run "
            "does not record (no copy of its data): kept, though any the model trained on make σ too small",
            where,
            len(unsure),
        )
    if not same:
        return out
    names = ds.fidelities.names
    out[validation] = [(str(ds.keys[s]), names[k]) in same for s, k in pairs[validation].tolist()]
    n, total = int(out.sum()), int(validation.sum())
    if n == total:
        raise MultifiError(
            f"{where}: every validation label is one the model trained on (its run's training split): σ calibrated "
            "on them comes out too small; calibrate on held-out labels"
        )
    log.warning(
        "%s: %d of %d validation labels are ones the model trained on (its run's training split): left out (σ "
        "calibrated on them comes out too small)",
        where,
        n,
        total,
    )
    return out


def _check_plausible_labels(potential, ds, pairs: np.ndarray, batch_size: int, where: str) -> None:
    """An error before anything is written when the model's energies miss the validation labels of a fidelity by
    more than IMPLAUSIBLE_MEV_PER_ATOM (MAE, structures with estimated references aside): labels in another unit or
    of another method would calibrate α to nonsense and replace a good calibration."""
    from multifi.keys import ENERGY_MAE_PER_ATOM, FITTED_ONLY
    from multifi.train.evaluate import IMPLAUSIBLE_MEV_PER_ATOM, evaluate_pairs

    for name, m in evaluate_pairs(potential, ds, None, pairs, batch_size).items():
        err = (m.get(FITTED_ONLY) or m).get(ENERGY_MAE_PER_ATOM)
        if err is not None and err > IMPLAUSIBLE_MEV_PER_ATOM:
            raise MultifiError(
                f"{where}: the model's energies miss the validation labels at {name!r} by {err:.0f} meV/atom (MAE): "
                "labels in another unit (Hartree? kcal/mol?) or of another method; no calibration written"
            )


def _labels(ds) -> set[tuple[str, str]]:
    """(structure key, fidelity name) of every labelled pair of `ds`."""
    from multifi.data.split import labelled_pairs

    return {(str(ds.keys[s]), ds.fidelities.names[k]) for s, k in labelled_pairs(ds, np.arange(len(ds)))}


def save_calibration(llpr: LLPR, path: Path) -> Path:
    """Write `llpr` to `path`, keeping an earlier calibration of the same weights for the fidelities `llpr`
    lacks (calibrating one fidelity does not drop the others); replaced fidelities are named in the log."""
    path = Path(path)
    if path.exists():
        try:
            old = LLPR.load(path)
        except MultifiError:
            old = None
        if old is not None and old.fingerprint == llpr.fingerprint:
            kept = {n: p for n, p in old.fidelities.items() if n not in llpr.fidelities}
            replaced = [n for n in old.fidelities if n in llpr.fidelities]
            if kept:
                log.info("%s: kept the earlier calibration of %s", path, ", ".join(kept))
            if replaced:
                log.info("%s: replaced the earlier calibration of %s", path, ", ".join(replaced))
            llpr = LLPR({**llpr.fidelities, **kept}, llpr.fingerprint)
    return llpr.save(path)


def reference_sigma(potential, dataset, structures: np.ndarray, fidelity: str) -> np.ndarray:
    """[n] eV: the expected error of each structure's reference energy sum at `fidelity` (head.reference_error): 0
    where the model's training labels at that fidelity determine it, NaN where the estimate's error is unknown (a
    model saved before multifi recorded it). A structure with an estimated reference errs by it whatever its
    geometry, which no σ from the model's features can know."""
    structures = np.asarray(structures, dtype=np.int64)
    if not len(structures):
        return np.zeros(0)
    head = potential.head
    offsets = np.asarray(dataset.offsets)
    n_atoms = offsets[structures + 1] - offsets[structures]
    atoms = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in structures])
    device = head.ref.device
    numbers = torch.as_tensor(np.asarray(dataset.numbers)[atoms].astype(np.int64), device=device)
    structure = torch.as_tensor(np.repeat(np.arange(len(structures)), n_atoms), device=device)
    k = potential.fidelities.index(fidelity)
    fid = torch.full((len(structures),), k, dtype=torch.long, device=device)
    with torch.no_grad():
        return head.reference_error(numbers, structure, fid, len(structures)).cpu().numpy()


def with_reference_sigma(sigma: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """σ [n] and the references' expected error [n] (eV, reference_sigma) combined as independent errors."""
    return np.sqrt(np.square(sigma) + np.square(reference))


def sigma_for(
    models: list,
    dataset,
    structures: np.ndarray,
    fidelity: str,
    batch_size: int = 64,
    llpr: LLPR | None = None,
    recorded=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Energy [n] and σ [n] (eV) at `fidelity`: with one model its LLPR σ (llpr needed), with several the
    ensemble mean and standard deviation (the members' energies from `recorded` where it has them); σ includes the
    expected error of estimated reference energies (reference_sigma, the largest of the members')."""
    reference = np.fmax.reduce([reference_sigma(m, dataset, structures, fidelity) for m in models])
    if len(models) > 1:
        e = ensemble_energies(models, dataset, structures, fidelity, batch_size, recorded)
        check_members_differ(e, fidelity)
        return e.mean(0), with_reference_sigma(e.std(0, ddof=1), reference)
    if llpr is None:
        raise MultifiError("σ from one model needs its LLPR calibration (run `multifi calibrate`)")
    f, e = dataset_features(models[0], dataset, structures, fidelity, batch_size)
    return e, with_reference_sigma(llpr.of(fidelity, "model").sigma(f), reference)


def check_members_differ(e: np.ndarray, fidelity: str) -> None:
    """e [M, n]: members with identical energies (the same model twice, or an extension that left this
    fidelity unchanged) are not independent: all alike is an error (σ ≡ 0), some alike a warning."""
    groups = {e[m].tobytes(): [] for m in range(len(e))}
    for m in range(len(e)):
        groups[e[m].tobytes()].append(m + 1)
    if len(groups) == 1 and e.shape[1]:
        raise MultifiError(
            f"the {len(e)} ensemble models give identical {fidelity} energies (the same model, or extensions that "
            "left this fidelity unchanged): their spread is no uncertainty"
        )
    same = [g for g in groups.values() if len(g) > 1]
    if same and e.shape[1]:
        log.warning(
            "ensemble models %s give identical %s energies: counted as independent, they make σ too small",
            "; ".join(" = ".join(f"#{m}" for m in g) for g in same),
            fidelity,
        )


def evaluate_uncertainty(
    models: list, dataset, pairs: np.ndarray, batch_size: int = 64, llpr: LLPR | None = None, recorded=None
) -> dict:
    """Calibration per fidelity on labelled (structure, dataset fidelity) pairs: calibration_metrics();
    `recorded`: see ensemble_energies."""
    out = {}
    for k in np.unique(pairs[:, 1]):
        name = dataset.fidelities.names[int(k)]
        s = pairs[pairs[:, 1] == k, 0]
        s = s[~np.isnan(dataset.energy[s, k])]
        if not len(s):
            continue
        e, sigma = sigma_for(models, dataset, s, name, batch_size, llpr, recorded)
        out[name] = calibration_metrics(e - dataset.energy[s, k], sigma)
    return out


def load_ensemble(paths, fidelities, device="cpu") -> list:
    """The further models of an ensemble (`--ensemble`), on `device`; each must have every fidelity in
    `fidelities` (names): one that lacks one is an error naming that model file, before any prediction."""
    from multifi.models.registry import load_potential

    models = []
    for path in paths:
        member = load_potential(path)
        for name in fidelities:
            member.fidelities.index(name, where=f"{path} (ensemble member)")
        models.append(member.to(device))
    return models


class EnsembleMean(torch.nn.Module):
    """A deep ensemble as one potential: energies, forces and stress the means of its members' (what `predict
    --ensemble` writes), for evaluation. Fidelity indices, references (which elements are seen or estimated) and the
    fidelity table are the first member's; each member gets the fidelity of the same name (its own index) and the
    edges within its own cutoff (the graph's are those of the largest). With `recorded` set to a dict, each call adds
    {(graph.structure, fidelity index): the members' energies [M] eV} to it (ensemble_energies reads them back)."""

    def __init__(self, members: list):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        first = members[0]
        self.fidelities, self.head, self.cutoff = first.fidelities, first.head, max(m.cutoff for m in members)
        names = first.fidelities.names
        # per member: the first member's fidelity index → this member's (-1: it has none of that name)
        self.to_member = [
            torch.tensor([m.fidelities.index(n) if n in m.fidelities else -1 for n in names]) for m in members
        ]
        self.recorded: dict | None = None

    def forward(self, graph, forces: bool = False, stress: bool = False) -> dict[str, torch.Tensor]:
        """The members' mean energy [B] (eV), forces [N, 3] and stress [B, 3, 3] as asked (see Potential.forward)."""
        from dataclasses import replace

        from multifi.models.potential import Potential

        length = torch.linalg.norm(Potential.edge_vectors(graph).double(), dim=-1)  # [E] Å
        outs = []
        for k, (m, to_member) in enumerate(zip(self.members, self.to_member)):
            fidelity = to_member.to(graph.fidelity.device)[graph.fidelity]
            if bool((fidelity < 0).any()):
                missing = sorted({self.fidelities.names[int(f)] for f in graph.fidelity[fidelity < 0]})
                raise MultifiError(f"ensemble member {k + 1} has no fidelity {', '.join(map(repr, missing))}")
            keep = length < m.cutoff if m.cutoff < self.cutoff else slice(None)
            param = next(m.parameters())  # members may differ in precision (and the graph is the first one's)
            own = replace(graph, edge_index=graph.edge_index[:, keep], shifts=graph.shifts[keep], fidelity=fidelity)
            out = m(own.to(param.device, param.dtype), forces=forces, stress=stress)
            outs.append({key: v.to(graph.positions.device, torch.float64) for key, v in out.items()})
        stacked = {key: torch.stack([o[key] for o in outs]) for key in outs[0]}
        if self.recorded is not None:
            energies = stacked["energy"].detach().cpu().numpy()  # [M, B]
            for b, key in enumerate(zip(graph.structure.tolist(), graph.fidelity.tolist())):
                self.recorded[key] = energies[:, b]
        return {key: v.mean(0) for key, v in stacked.items()}


def check_no_copies(models: list, paths: list) -> None:
    """No two members of an ensemble have the same weights (a copied file): a copy counts one model twice in the
    mean and its spread is no uncertainty; an error naming both."""
    for i, j in itertools.combinations(range(len(models)), 2):
        if _same_weights(models[i], models[j]):
            raise MultifiError(f"{paths[j]}: the same weights as {paths[i]}: an ensemble of copies has no spread")


def check_members_alike(models: list, paths: list, fidelities: list[str], elements) -> None:
    """The models of an ensemble whose mean is evaluated are not copies of one another, saw the same of the data's
    `elements` (atomic numbers) and fitted reference energies for the same of them at each of `fidelities` (as
    members trained on one dataset do), so that the structures left out (unseen elements) or set apart (estimated
    references) are the same for each. Otherwise an error naming the member, before any evaluation: the mean's errors
    would mix one member's eV-scale guesses into the table (or its spread be no uncertainty)."""
    z = np.asarray(elements, dtype=np.int64)
    for m, path in zip(models[1:], paths[1:]):
        if _same_weights(models[0], m):
            raise MultifiError(f"{path}: the same weights as {paths[0]}: an ensemble of copies has no spread")
        difference = _label_difference(models[0], m, fidelities, z)
        if difference:
            raise MultifiError(
                f"{path}: ensemble member trained on other labels than {paths[0]} ({difference}); the mean of models "
                "that know different elements is not evaluated: evaluate each model alone"
            )


def _same_weights(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(pa, pb))


def _label_difference(a, b, fidelities: list[str], z: np.ndarray) -> str:
    """Where two models' references differ for the elements z: those one saw and the other did not, or those fitted
    at one of `fidelities` in one model only ('' when none)."""
    seen = np.zeros(len(a.head.known()), bool)
    seen[z] = (a.head.known() != b.head.known()).cpu().numpy()[z]
    if seen.any():
        return f"{_symbols(seen)} seen by one only"
    for name in fidelities:
        fitted = [m.head.fitted[:, 0 if m.head.shared_baseline else m.fidelities.index(name)] for m in (a, b)]
        differ = np.zeros_like(seen)
        differ[z] = (fitted[0] != fitted[1]).cpu().numpy()[z]
        if differ.any():
            return f"the reference energies of {_symbols(differ)} at {name!r} fitted by one only"
    return ""


def _symbols(mask: np.ndarray) -> str:
    from ase.data import chemical_symbols

    z = np.flatnonzero(mask)
    return ", ".join(chemical_symbols[k] for k in z[:6]) + (", …" if len(z) > 6 else "")


def uncertainty_models(checkpoint, potential, ensemble: list, fidelities: list[str]) -> tuple[list, LLPR | None, str]:
    """(models, llpr, method) of an uncertainty estimate, loaded and checked before any work is done: the model and
    its LLPR calibration (an error when it has none or one of other weights), or the model and the further members
    of a deep ensemble (`ensemble`, model files that must know `fidelities`)."""
    if ensemble:
        device = next(potential.parameters()).device
        models = [potential] + load_ensemble(ensemble, fidelities, device)
        check_no_copies(models, [str(checkpoint), *map(str, ensemble)])
        return models, None, f"ensemble of {len(ensemble) + 1}"
    llpr = LLPR.load(llpr_path(checkpoint), potential)
    for name in fidelities:  # a fidelity calibrated by none: refused now, not after the evaluation
        llpr.of(name, where=str(llpr_path(checkpoint)))
    return [potential], llpr, "llpr"


def uncertainty_report(
    estimate: tuple[list, LLPR | None, str], dataset, pairs: np.ndarray, batch_size: int = 64, recorded=None
) -> dict:
    """Calibration per fidelity (evaluate_uncertainty) of an estimate of uncertainty_models():
    {"method", "fidelities": {name: metrics}}; an ensemble's energies from `recorded` (EnsembleMean.recorded on
    `dataset`) where it has them. Structures with an element whose reference energy at the pair's
    fidelity was estimated are left out (said so), as calibration leaves them out: they err by the estimate's
    error, which σ does not describe."""
    from multifi.train.evaluate import pairs_with_estimated_references

    models, llpr, method = estimate
    estimated = pairs_with_estimated_references(models[0], dataset, pairs)
    for k in np.unique(pairs[estimated, 1]):
        log.warning(
            "%s: %d of %d structures contain elements whose reference energy was estimated: left out of the "
            "uncertainty statistics, as calibration leaves them out (their errors are the estimate's)",
            dataset.fidelities.names[int(k)],
            int((estimated & (pairs[:, 1] == k)).sum()),
            int((pairs[:, 1] == k).sum()),
        )
    pairs = pairs[~estimated]
    return {"method": method, "fidelities": evaluate_uncertainty(models, dataset, pairs, batch_size, llpr, recorded)}


def uncertainty_table(report: dict) -> str:
    """uncertainty_report() as a plain-text table."""
    result = report["fidelities"]
    width = max([len("fidelity")] + [len(n) for n in result]) + 2
    lines = [
        f"uncertainty ({report['method']})",
        "fidelity".ljust(width)
        + "".join(h.rjust(14) for h in ("n", "Spearman", "miscal. area", "mean σ meV", "RMSE meV")),
    ]
    for name, m in result.items():
        lines.append(
            name.ljust(width) + f"{m['n']:>14d}{m['spearman']:>14.3f}{m['miscalibration_area']:>14.3f}"
            f"{m['mean_sigma_meV']:>14.1f}{m['rmse_meV']:>14.1f}"
        )
    return "\n".join(lines)
