"""Metric keys: the one home of the names that metrics.json, metrics.csv, the training log, the plots and
the terminal tables share. Everything that writes or reads a metric imports its name from here."""

from __future__ import annotations

from typing import Literal

#: per-fidelity errors (FidelityMetrics.compute; metrics.json "fidelities" and "val_fidelities" entries)
COUNT = "n"  # structures with an energy label
FORCES_COUNT = "n_forces"  # structures with force labels (present when forces were evaluated)
ENERGY_MAE = "energy_mae_meV"  # mean |ΔE| per structure, meV
ENERGY_RMSE = "energy_rmse_meV"  # root mean square ΔE per structure, meV
ENERGY_MAE_PER_ATOM = "energy_mae_meV_per_atom"  # mean |ΔE| / atoms, meV/atom
ENERGY_RMSE_PER_ATOM = "energy_rmse_meV_per_atom"  # root mean square ΔE / atoms, meV/atom (MACE's RMSE_E_per_atom)
FORCES_MAE = "forces_mae_meV_per_A"  # mean |ΔF| per Cartesian component, meV/Å
FORCES_RMSE = "forces_rmse_meV_per_A"  # root mean square ΔF per Cartesian component, meV/Å (MACE's RMSE_F)
STRESS_MAE = "stress_mae_GPa"  # mean |Δσ| over the 9 components of the 3×3 tensor, GPa
METRIC_KEYS = (ENERGY_MAE, ENERGY_RMSE, ENERGY_MAE_PER_ATOM, ENERGY_RMSE_PER_ATOM, FORCES_MAE, FORCES_RMSE, STRESS_MAE)
#: least-squares slope of the force labels on the predicted forces, Σ F_label·F_pred / Σ F_pred² (about 1 for a
#: model that learned them; negative: labels pointing against the model's forces, e.g. gradients given as forces)
FORCES_SLOPE = "forces_label_slope"
#: their cosine, Σ F_label·F_pred / √(Σ F_label² Σ F_pred²) (about 1 for a model that learned them, about −1 for labels
#: of the opposite sign; near 0 for a model whose forces do not yet follow the labels)
FORCES_COSINE = "forces_label_cosine"
#: structures of the evaluated samples left out of a fidelity's errors: they contain an element no training
#: label of any fidelity contained (no reference energy, no learned interactions; present only when > 0)
UNSEEN = "n_unseen_elements"
#: structures of a fidelity's errors with an element whose reference energy at that fidelity was estimated from the
#: other fidelities (no label of it contained the element), and the errors without them (present only when > 0)
ESTIMATED = "n_estimated_references"
FITTED_ONLY = "fitted_references"

#: each metric with its unit, for plot axes
METRIC_LABELS = {
    ENERGY_MAE: "energy MAE (meV)",
    ENERGY_RMSE: "energy RMSE (meV)",
    ENERGY_MAE_PER_ATOM: "energy MAE (meV/atom)",
    ENERGY_RMSE_PER_ATOM: "energy RMSE (meV/atom)",
    FORCES_MAE: "force MAE (meV/Å)",
    FORCES_RMSE: "force RMSE (meV/Å)",
    STRESS_MAE: "stress MAE (GPa)",
}

#: the metrics that can pick the best checkpoint (train.monitor_metric)
MonitorMetric = Literal[ENERGY_MAE, ENERGY_MAE_PER_ATOM, FORCES_MAE, STRESS_MAE]

#: logged during training (metrics.csv columns, Lightning's callback metrics)
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
TRAIN_LOSS_EPOCH = f"{TRAIN_LOSS}_epoch"  # Lightning's name of its mean over an epoch
TRAIN_SAMPLES = "train_samples"  # (structure, fidelity) samples an epoch's training means cover (fewer when cut short)
_VAL = "val/"


def val_key(fidelity: str, metric: str) -> str:
    """The logged validation metric of one fidelity: val/<fidelity>/<metric>."""
    return f"{_VAL}{fidelity}/{metric}"


def is_val_key(key: str, metric: str) -> bool:
    """Whether `key` is a val/<fidelity>/<metric> key of this metric."""
    return key.startswith(_VAL) and key.endswith(f"/{metric}")


def val_key_fidelity(key: str) -> str:
    """The fidelity of a val/<fidelity>/<metric> key (fidelity names may contain "/", e.g. B3LYP/6-31G(2df,p))."""
    if not key.startswith(_VAL) or key.count("/") < 2:
        raise ValueError(f"not a val/<fidelity>/<metric> key: {key!r}")
    return key[len(_VAL) : key.rindex("/")]
