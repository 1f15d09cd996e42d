"""From a RunConfig's data section to the dataset and the (structure, fidelity) samples of each split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from multifi.config import RunConfig
from multifi.data.atomic_energies import (
    ISOLATED,
    AtomicEnergies,
    check_atomic_coverage,
    resolve_atomic_energies,
    without_frames,
)
from multifi.data.checks import without_pulay_stress
from multifi.data.dataset import FidelityDataset
from multifi.data.fidelity import FidelityTable
from multifi.data.sources import read_sources
from multifi.data.split import Split, labelled_pairs, limit_pairs, random_split, split_from_files
from multifi.errors import MultifiError

log = logging.getLogger("multifi")


@dataclass(frozen=True)
class FidelitySettings:
    """The config's per-fidelity settings as arrays indexed like the dataset's FidelityTable: the names in
    the config are resolved once, here, and nothing downstream looks a name up again."""

    train_limits: np.ndarray  # [K] float64: at most this many training samples (data.train_limits); NaN: all
    sampling: np.ndarray  # [K] float64: relative sampling weight (train.fidelity_sampling); NaN: natural share
    loss_weights: np.ndarray  # [K] float64: loss weight (loss.fidelity_weights); 1 unless configured
    units_known: np.ndarray  # [K] bool: labels known to be in eV, eV/Å, eV/Å³ (data.units_known): no unit guesses

    def known_units(self, table: FidelityTable) -> list[str]:
        """The names of the fidelities with units_known."""
        return [name for name, known in zip(table.names, self.units_known) if known]

    @classmethod
    def resolve(
        cls, cfg: RunConfig, table: FidelityTable, config_source: str = "", dropped: frozenset = frozenset()
    ) -> FidelitySettings:
        """Every fidelity the config names must be one of `table`'s (checked before a run writes anything);
        `config_source` (the config file) prefixes the error, which names the key and the known fidelities.
        Settings of `dropped` fidelities (in the data, left out by data.fidelities) are ignored, with a warning."""
        prefix = f"{config_source}: " if config_source else ""

        def kept(key: str, mapping: dict) -> dict:
            left_out = sorted(set(mapping) & set(dropped))
            if left_out:
                log.warning("%s: %s left out by data.fidelities; its setting is ignored", key, ", ".join(left_out))
            return {name: v for name, v in mapping.items() if name not in dropped}

        limits = kept("data.train_limits", cfg.data.train_limits)
        sampling = kept("train.fidelity_sampling", cfg.train.fidelity_sampling)
        weights = kept("loss.fidelity_weights", cfg.loss.fidelity_weights)
        known = kept("data.units_known", dict.fromkeys(cfg.data.units_known, 1.0))
        loss_weights = table.per_index(weights, 1.0, f"{prefix}loss.fidelity_weights")
        if not (loss_weights > 0).any():
            raise MultifiError(
                f"{prefix}loss.fidelity_weights: every fidelity has weight 0, so nothing would be trained"
            )
        for name in np.asarray(table.names)[loss_weights == 0]:
            log.warning(
                "loss.fidelity_weights: %s has weight 0: its labels fit its reference energies and are validated, "
                "but do not train the model",
                name,
            )
        return cls(
            train_limits=table.per_index(limits, np.nan, f"{prefix}data.train_limits"),
            sampling=table.per_index(sampling, np.nan, f"{prefix}train.fidelity_sampling"),
            loss_weights=loss_weights,
            units_known=table.per_index(known, 0.0, f"{prefix}data.units_known") > 0,
        )


@dataclass
class PreparedData:
    dataset: FidelityDataset  # only the structures used in some split
    split: Split  # structure indices into `dataset`
    pairs: dict[str, np.ndarray]  # split name → [P, 2] (structure, fidelity)
    settings: FidelitySettings  # per-fidelity settings indexed like dataset.fidelities
    atomic: AtomicEnergies | None = None  # data.atomic_energies resolved on `dataset`


def prepare_data(cfg: RunConfig, dataset: FidelityDataset | None = None, config_source: str = "") -> PreparedData:
    """`config_source` (the config file) prefixes errors about the config's fidelity names."""
    d = cfg.data
    free_atoms = d.atomic_energies == ISOLATED  # MACE's E0 frames, weighted 0, are read
    ds = dataset if dataset is not None else read_sources(d.sources, d.skip_invalid, free_atoms)
    if not d.sources:
        raise MultifiError(f"{config_source or 'config'}: data.sources: empty; name the labelled data to train on")
    names = frozenset(ds.fidelities.names)
    if d.atomic_energies is not None and cfg.model.fidelity_embedding.inject == "single":
        raise MultifiError(
            f"{config_source or 'config'}: data.atomic_energies are per fidelity, and model.fidelity_embedding.inject: "
            "single fits one reference energy per element to all fidelities pooled; leave one of them out"
        )
    if d.fidelities is not None:
        if not d.fidelities:
            raise MultifiError(f"{config_source or 'config'}: data.fidelities: empty, so it selects no labels")
        ds = ds.select_fidelities(d.fidelities, where="data.fidelities")
    settings = FidelitySettings.resolve(cfg, ds.fidelities, config_source, names - set(ds.fidelities.names))
    if d.split.files:
        split = split_from_files(d.split.files, ds)
    else:
        try:
            split = random_split(ds.keys, d.split.val, d.split.test, d.split.seed, d.split.order)
        except MultifiError as exc:
            raise MultifiError(f"{config_source or 'config'}: {exc}") from None
    used = np.concatenate([split.train, split.val, split.test])
    ds, split = _compact(ds, split, used)
    pairs = {name: labelled_pairs(ds, split[name]) for name in ("train", "val", "test")}
    atomic = resolve_atomic_energies(d.atomic_energies, ds, config_source or "config", names - set(ds.fidelities.names))
    pairs = without_frames(pairs, atomic)
    unlimited = len(pairs["train"])
    _warn_limits_above_labels(pairs["train"], settings.train_limits, ds, config_source)
    pairs["train"] = limit_pairs(pairs["train"], settings.train_limits, ds, d.split.seed, d.split.order)
    if len(pairs["train"]) == 0 and unlimited:
        raise MultifiError(
            f"{config_source or 'config'}: data.train_limits: the limits leave no training label ({unlimited} without them)"
        )
    if len(pairs["train"]) == 0:
        where = (
            f"data.split.files.train: {d.split.files['train']}"
            if "train" in d.split.files
            else "data.split: the train split"
        )
        raise MultifiError(
            f"{config_source or 'config'}: {where} holds {len(split.train)} structure(s) and no label at the "
            "fidelities used: nothing to train on"
        )
    _check_energies_to_train_on(ds, pairs["train"], config_source)
    ds = without_pulay_stress(ds, d.pulay_stress)  # the labels' own consistency, as the warning checks it
    if atomic is not None:
        check_atomic_coverage(atomic, ds, pairs["train"], config_source or "config")
    return PreparedData(ds, split, pairs, settings, atomic)


def _check_energies_to_train_on(ds: FidelityDataset, train: np.ndarray, config_source: str) -> None:
    """At least one training label with an energy: the per-element reference energies are fitted to energies and
    tell which elements the model knows, so forces alone would train a model that predicts for no element."""
    if np.isnan(ds.energy[train[:, 0], train[:, 1]]).all():
        raise MultifiError(
            f"{config_source or 'config'}: none of the {len(train)} training labels has an energy (forces or stress "
            "only): multifi fits per-element reference energies to energies and learns forces as their gradient, "
            "so it needs energy labels; if the data names them otherwise, give the source's energy_key"
        )


def _compact(ds: FidelityDataset, split: Split, used: np.ndarray):
    """Drop structures in no split; renumber split indices."""
    if len(used) == len(ds):
        return ds, split
    order = np.sort(used)
    new = np.full(len(ds), -1, np.int64)
    new[order] = np.arange(len(order))
    return ds.subset(order), Split(train=new[split.train], val=new[split.val], test=new[split.test])


def _warn_limits_above_labels(train: np.ndarray, limits: np.ndarray, ds, config_source) -> None:
    """A limit above the training labels a fidelity has uses them all: say so (a learning-curve point at such a
    limit would be labelled with more data than it had)."""
    have = np.bincount(train[:, 1], minlength=len(limits))
    for k in np.flatnonzero(~np.isnan(limits) & (limits > have)).tolist():
        log.warning(
            "%s: data.train_limits: %s limited to %d labels, but the training split holds %d at it: all %d are used",
            config_source or "config",
            ds.fidelities.names[k],
            int(limits[k]),
            have[k],
            have[k],
        )
