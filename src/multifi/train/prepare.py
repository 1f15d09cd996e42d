"""From a RunConfig's data section to the dataset and the (structure, fidelity) samples of each split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multifi.config import RunConfig
from multifi.data.dataset import FidelityDataset
from multifi.data.sources import read_sources
from multifi.data.split import Split, labelled_pairs, limit_pairs, random_split, split_from_files


@dataclass
class PreparedData:
    dataset: FidelityDataset  # only the structures used in some split
    split: Split  # structure indices into `dataset`
    pairs: dict[str, np.ndarray]  # split name → [P, 2] (structure, fidelity)


def prepare_data(cfg: RunConfig, dataset: FidelityDataset | None = None, config_source: str = "") -> PreparedData:
    """`config_source` (the config file) prefixes errors about the config's fidelity names."""
    d = cfg.data
    ds = dataset if dataset is not None else read_sources(d.sources, d.skip_invalid)
    if d.fidelities is not None:
        ds = ds.select_fidelities(d.fidelities, where="data.fidelities")
    check_config_fidelities(cfg, ds, config_source)
    if d.split.files:
        split = split_from_files(d.split.files, ds)
    else:
        split = random_split(len(ds), d.split.val, d.split.test, d.split.seed)
    used = np.concatenate([split.train, split.val, split.test])
    ds, split = _compact(ds, split, used)
    pairs = {name: labelled_pairs(ds, split[name]) for name in ("train", "val", "test")}
    pairs["train"] = limit_pairs(pairs["train"], d.train_limits, ds, d.split.seed)
    return PreparedData(ds, split, pairs)


#: config settings keyed by fidelity name
FIDELITY_KEYED = (("data", "train_limits"), ("train", "fidelity_sampling"), ("loss", "fidelity_weights"))


def check_config_fidelities(cfg: RunConfig, ds: FidelityDataset, config_source: str = "") -> None:
    """Every fidelity the config names must be one of the data's (checked before a run writes anything)."""
    prefix = f"{config_source}: " if config_source else ""
    for section, key in FIDELITY_KEYED:
        for name in getattr(getattr(cfg, section), key):
            ds.fidelities.index(name, where=f"{prefix}{section}.{key}")


def _compact(ds: FidelityDataset, split: Split, used: np.ndarray):
    """Drop structures in no split; renumber split indices."""
    if len(used) == len(ds):
        return ds, split
    order = np.sort(used)
    new = np.full(len(ds), -1, np.int64)
    new[order] = np.arange(len(order))
    return ds.subset(order), Split(train=new[split.train], val=new[split.val], test=new[split.test])
