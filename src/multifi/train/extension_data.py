"""The data of an extension: the extended model's own run read back (its dataset, split and training labels, for
replay and the forgetting report), the new fidelity's data read and split as that run split its structures, and
the two combined under one fidelity table."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from multifi.config import RunConfig
from multifi.data.atomic_energies import ISOLATED
from multifi.data.checks import without_pulay_stress
from multifi.data.dataset import GEOMETRY_KEY_PREFIX, GEOMETRY_TOLERANCE, FidelityDataset, atomic_write
from multifi.data.fidelity import FidelityTable
from multifi.data.isolated import isolated_atoms
from multifi.data.sources import read_sources
from multifi.data.split import (
    TRAIN_LABELS,
    Split,
    labelled_pairs,
    limit_pairs,
    random_split,
    read_train_labels,
    split_from_files,
)
from multifi.errors import MultifiError, NoFidelityError
from multifi.train.run_config import load_run_config

log = logging.getLogger("multifi")


@dataclass
class OldRun:
    """The training data of the model being extended: dataset, train pairs and evaluation pairs."""

    path: Path
    dataset: FidelityDataset
    train: np.ndarray  # [P, 2] (structure, fidelity) as trained on
    val: np.ndarray
    test: np.ndarray


def find_old_run(x) -> Path | None:
    """extend.old_run (a training run: config.yaml and splits.json; an extension run: config.yaml and
    pairs.npz), else the model's folder if it is one."""
    if x.old_run is not None:
        run = Path(x.old_run)
        if not (run / "config.yaml").exists():
            raise MultifiError(f"{run}: not a run directory of the model (no config.yaml)")
        if not has_split(run):
            raise MultifiError(
                f"{run}: not a run directory of the model (no splits.json, nor an extension's pairs.npz)"
            )
        return run
    from multifi.models.registry import model_file

    run = model_file(x.model).parent  # a run directory stands for its model.pt
    if run.name == "checkpoints" and (run.parent / "config.yaml").exists():  # a checkpoint of a run: that run
        run = run.parent
    return run if (run / "config.yaml").exists() and has_split(run) else None


def check_run_of_model(run: Path, x, old) -> None:
    """An error when extend.old_run names another model's run: the model file lies outside it, no extension in
    the model's history started from it, and its model.pt holds other weights (its split, test errors and replay
    data would be another model's)."""
    from multifi.models.registry import load_potential, model_file

    model = model_file(x.model).resolve()
    if run.resolve() in model.parents or not (run / "model.pt").is_file():
        return
    for event in old.spec.get("history", []):  # an ancestor: the run an earlier extension started from
        start = Path(event["from"])
        start = start if start.is_dir() else start.parent
        if start.exists() and run.resolve() in (start.resolve(), *start.resolve().parents[:1]):
            return
    theirs = load_potential(run / "model.pt", compile=False).state_dict()
    ours = old.state_dict()
    if theirs.keys() != ours.keys() or not all(torch.equal(theirs[k], ours[k]) for k in ours):
        raise MultifiError(
            f"{run}: not the run of {x.model} (its model.pt holds other weights); extend.old_run (--old-run) must "
            "name the run that trained the model, whose split and data the extension keeps"
        )


def has_split(run: Path) -> bool:
    return any((run / name).exists() for name in ("splits.json", "splits.npz", PAIRS))


#: an extension run's (structure, fidelity) pairs of every fidelity its model knows, as trained and tested
PAIRS = "pairs.npz"


def load_old_run(run: Path) -> OldRun:
    """Dataset (the run's dataset.npz, or its single saved-dataset source) and its split pairs; an extension
    run's dataset.npz and pairs.npz (every fidelity of its model, written by `save_run_data`)."""
    if (run / PAIRS).exists():
        return _load_extension_run(run)
    cfg = load_run_config(run / "config.yaml")
    from multifi.data.sources import _is_saved_dataset

    if (run / "dataset.npz").exists():
        ds = FidelityDataset.load(run / "dataset.npz")
    elif len(cfg.data.sources) == 1 and _is_saved_dataset(cfg.data.sources[0]):
        ds = FidelityDataset.load(cfg.data.sources[0].path).drop_fidelities_without_labels()
        if cfg.data.fidelities is not None:
            ds = ds.select_fidelities(cfg.data.fidelities, where=f"{run}/config.yaml: data.fidelities")
    else:
        ds = read_data_again(run, cfg)
    if not (run / "dataset.npz").exists():  # the labels as the run trained on them (dataset.npz holds them so)
        ds = without_pulay_stress(ds, cfg.data.pulay_stress)
    split = _read_splits(run / "splits.json", ds)
    pairs = {name: labelled_pairs(ds, split[name]) for name in ("train", "val", "test")}
    if cfg.data.atomic_energies == ISOLATED:  # its one-atom frames were references, not data, in every split
        pairs = {name: p[~np.isin(p[:, 0], np.flatnonzero(isolated_atoms(ds)))] for name, p in pairs.items()}
    if (run / TRAIN_LABELS).exists():  # the labels data.train_limits kept, as recorded
        pairs["train"] = read_train_labels(run / TRAIN_LABELS, ds)
    else:
        limits = ds.fidelities.per_index(cfg.data.train_limits, np.nan, "data.train_limits")
        pairs["train"] = limit_pairs(pairs["train"], limits, ds, cfg.data.split.seed, cfg.data.split.order)
    return OldRun(run, ds, pairs["train"], pairs["val"], pairs["test"])


def _load_extension_run(run: Path) -> OldRun:
    if not (run / "dataset.npz").exists():
        raise MultifiError(f"{run}: {PAIRS} without the dataset.npz it indexes; replay and forgetting need both")
    ds = FidelityDataset.load(run / "dataset.npz")
    try:
        with np.load(run / PAIRS) as z:
            pairs = {name: np.asarray(z[name], dtype=np.int64).reshape(-1, 2) for name in ("train", "val", "test")}
    except (OSError, ValueError, KeyError) as exc:
        raise MultifiError(f"{run / PAIRS}: not an extension run's pairs file ({exc})") from None
    for name, p in pairs.items():
        if len(p) and (p.min() < 0 or p[:, 0].max() >= len(ds) or p[:, 1].max() >= len(ds.fidelities)):
            raise MultifiError(f"{run / PAIRS}: {name} pairs outside {run / 'dataset.npz'}")
    return OldRun(run, ds, pairs["train"], pairs["val"], pairs["test"])


def merged_run_data(
    table: FidelityTable, new: FidelityDataset, new_pairs: dict, old: OldRun, where: str
) -> tuple[FidelityDataset, dict[str, np.ndarray]]:
    """The data an extension run keeps: the old run's structures and pairs (as that model was trained and
    tested) and the new fidelity's, laid out as `table`, so that the extended model can be extended again
    with replay of, and forgetting measured on, every fidelity it knows. Built before training (a key
    clash between the two is an error then, not after the model is written)."""
    named = new if new.source else replace(new, source=where)
    merged, (old_at, new_at) = FidelityDataset.merge_with_index([old.dataset, named])  # errors name both files
    ds = merged.with_fidelities(table)
    pairs = {
        name: np.concatenate(
            [_reindex(old_at, table, old.dataset, getattr(old, name)), _reindex(new_at, table, new, p)]
        )
        for name, p in new_pairs.items()
    }
    return ds, pairs


def save_run_data(run_dir: Path, ds: FidelityDataset, pairs: dict[str, np.ndarray]) -> None:
    """dataset.npz and pairs.npz of an extension run (from merged_run_data)."""
    ds.save(run_dir / "dataset.npz")
    atomic_write(run_dir / PAIRS, lambda f: np.savez(f, **pairs))


def _reindex(at: np.ndarray, table: FidelityTable, src: FidelityDataset, pairs: np.ndarray) -> np.ndarray:
    """(structure, fidelity) pairs of `src` as pairs of the merged dataset in which src's structure i is at[i]
    (FidelityDataset.merge_with_index), with fidelities laid out as `table`."""
    s = np.asarray(at, dtype=np.int64)[pairs[:, 0]]
    k = np.asarray(table.indices(src.fidelities.names), dtype=np.int64)[pairs[:, 1]]
    return np.stack([s, k], 1).reshape(-1, 2)


def read_data_again(run: Path, cfg: RunConfig) -> FidelityDataset:
    """The old run's dataset read again from its config's data sources: dataset.npz is a cache (a run trained
    with data.cache: false, or copied without it, has none); splits.json then checks every structure is there."""
    from multifi.train.prepare import prepare_data

    log.info("%s: no dataset.npz; reading the run's data sources again", run)
    try:
        return prepare_data(cfg).dataset
    except (MultifiError, OSError) as exc:
        raise MultifiError(
            f"{run}: no dataset.npz, and its config's data sources cannot be read again ({exc}); "
            "replay and forgetting need the run's data"
        ) from None


def _read_splits(path: Path, ds: FidelityDataset) -> Split:
    if not path.exists() and path.with_suffix(".npz").exists():
        z = np.load(path.with_suffix(".npz"))
        return Split(train=z["train"], val=z["val"], test=z["test"])
    try:
        keys = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultifiError(f"{path}: not a readable split file ({type(exc).__name__})") from None
    valid = isinstance(keys, dict) and all(isinstance(v, list) for v in keys.values())
    if not valid or not all(isinstance(k, str) for v in keys.values() for k in v):
        raise MultifiError(f"{path}: not a split file (a mapping of train, val, test to lists of structure keys)")
    index = {k: i for i, k in enumerate(ds.keys.tolist())}
    missing = [k for name in keys for k in keys[name] if k not in index]
    if missing:
        raise MultifiError(f"{path}: structure {missing[0]!r} is not in the run's dataset")
    return Split(
        **{
            name: np.asarray([index[k] for k in keys.get(name, [])], dtype=np.int64)
            for name in ("train", "val", "test")
        }
    )


def sample_pairs(pairs: np.ndarray, fraction: float, fidelities: list[int], seed: int) -> np.ndarray:
    """A seeded random `fraction` (at least one) of the pairs of each fidelity in `fidelities`."""
    out = []
    for k in fidelities:
        rows = np.flatnonzero(pairs[:, 1] == k)
        n = min(len(rows), max(1, int(round(fraction * len(rows))))) if fraction > 0 and len(rows) else 0
        out.append(pairs[np.sort(np.random.default_rng([seed, k]).permutation(rows)[:n])])
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def read_new_data(
    cfg: RunConfig, name: str, old: OldRun | None = None
) -> tuple[FidelityDataset, dict[str, np.ndarray]]:
    """The new fidelity's labels from data.sources and their split (data.split, data.train_limits); without
    split files, structures the model's run `old` also holds keep their split there (follow_split)."""
    d = cfg.data
    free_atoms = d.atomic_energies == ISOLATED  # MACE's E0 frames, weighted 0, are read
    try:
        ds = read_sources(d.sources, d.skip_invalid, free_atoms)
    except NoFidelityError:  # structures naming none in a source naming none: the new fidelity's (as --data does)
        sources = [s.model_copy(update={"fidelity": name}) if _names_no_fidelity(s) else s for s in d.sources]
        ds = read_sources(sources, d.skip_invalid, free_atoms)
    ds = without_pulay_stress(ds, d.pulay_stress)
    where = ", ".join(str(s.path or "qm9") for s in d.sources)
    if name not in ds.fidelities:
        raise MultifiError(
            f"{where}: no labels at fidelity {name!r} (the data has: {', '.join(ds.fidelities)}); "
            "set the source's fidelity"
        )
    ds = ds.select_fidelities([name])
    try:
        split = (
            split_from_files(d.split.files, ds)
            if d.split.files
            else random_split(ds.keys, d.split.val, d.split.test, d.split.seed, d.split.order)
        )
    except MultifiError as exc:
        raise MultifiError(exc if d.split.files else f"{where}: {exc}") from None
    if old is not None and not d.split.files:
        split = follow_split(split, ds, old)
    pairs = {s: labelled_pairs(ds, split[s]) for s in ("train", "val", "test")}
    limits = ds.fidelities.per_index(d.train_limits, np.nan, "data.train_limits")
    pairs["train"] = limit_pairs(pairs["train"], limits, ds, d.split.seed, d.split.order)
    return ds, pairs


def _names_no_fidelity(source) -> bool:
    return source.fidelity is None and (source.qm9 is None or source.qm9.fidelity is None)


def follow_split(split: Split, ds: FidelityDataset, old: OldRun) -> Split:
    """`split` of `ds`, with every structure the old run also holds (same key) moved to its split there: the
    new fidelity is tested on none of the geometries the model trained on, and trained on none of those the
    forgetting table tests."""
    assigned = old_split_of(ds, old)
    if not (assigned != "").any():
        return split
    parts = {}
    for name in ("train", "val", "test"):
        own = split[name][assigned[split[name]] == ""]
        parts[name] = np.sort(np.concatenate([own, np.flatnonzero(assigned == name)])).astype(np.int64)
    return Split(**parts)


def old_split_of(ds: FidelityDataset, old: OldRun) -> np.ndarray:
    """[len(ds)] str: the split ("train", "val", "test") of each structure of `ds` in the old run (the same key, or
    without keys the same geometry: one structure once merged; a molecule without a key also when it is one of
    the old run's up to translation, rotation and atom order), "" for structures the old run does not hold."""
    _, (old_at, new_at) = FidelityDataset.merge_with_index([old.dataset, ds])
    split_of_old = np.full(len(old.dataset), "", dtype=object)
    for name in ("train", "val", "test"):
        split_of_old[np.unique(getattr(old, name)[:, 0])] = name
    old_of_merged = np.full(len(old.dataset) + len(ds), -1, np.int64)
    old_of_merged[old_at] = np.arange(len(old.dataset))
    j = old_of_merged[new_at]
    unkeyed = (j < 0) & ~ds.pbc.any(1) & np.char.startswith(ds.keys.astype(str), GEOMETRY_KEY_PREFIX)
    if unkeyed.any() and (~old.dataset.pbc.any(1)).any():  # a keyed run's molecules moved or reordered
        from multifi.data.same_geometry import MoleculeTable

        table = MoleculeTable(old.dataset, GEOMETRY_TOLERANCE)  # the merge's: coordinates printed to 3 decimals
        for s in np.flatnonzero(unkeyed).tolist():
            found = table.find(ds, s)
            j[s] = -1 if found is None else found
    return np.where(j >= 0, split_of_old[np.maximum(j, 0)], "").astype(str)


def log_followed_split(ds: FidelityDataset, old: OldRun) -> None:
    assigned = old_split_of(ds, old)
    if (assigned != "").any():
        log.info(
            "%d of the %d new structures are in the model's run (same key, or same geometry): they keep its split (%s)",
            int((assigned != "").sum()),
            len(ds),
            ", ".join(f"{n} {int((assigned == n).sum())}" for n in ("train", "val", "test")),
        )


def combine(
    table: FidelityTable, new: FidelityDataset, new_pairs: dict, old: OldRun | None, replay: dict
) -> tuple[FidelityDataset, dict[str, np.ndarray]]:
    """One dataset laid out as the model's fidelity table: the new data plus the replayed old structures;
    pairs re-indexed into it (replayed training samples join train, replayed validation samples join val)."""
    used = np.zeros(0, np.int64)
    if old is not None and any(len(p) for p in replay.values()):
        used = np.unique(np.concatenate([p[:, 0] for p in replay.values()]))
        merged, (old_at, new_at) = FidelityDataset.merge_with_index([old.dataset.subset(used), new])
    else:
        merged, (new_at,) = FidelityDataset.merge_with_index([new])
    ds = merged.with_fidelities(table)
    out = {s: _reindex(new_at, table, new, p) for s, p in new_pairs.items()}
    if len(used):
        at = np.full(len(old.dataset), -1, np.int64)
        at[used] = old_at  # replayed structures of the old dataset → their place in the merged one
        for s, p in replay.items():
            out[s] = np.concatenate([out[s], _reindex(at, table, old.dataset, p)])
    return ds, out
