"""Which (structure, fidelity) pairs of some data a saved model trained on, from its run directory: by key and
fidelity name (the run's copy of its data with its split, train_limits applied), by key alone (splits.json), and by
geometry where keys cannot tell. For `evaluate` (held-out errors) and `calibrate` (held-out validation labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def trained_pairs(checkpoint, ds, pairs: np.ndarray) -> tuple[set[tuple[str, str]], set[str], int]:
    """(same, elsewhere, n): the (key, fidelity name) of `pairs` [P, 2] of `ds` that the model of `checkpoint`
    trained on (trained_labels, both kinds); the keys of structures among the rest that it trained on at other
    fidelities only; and the number of distinct pairs looked at. Empty sets when its run tells nothing."""
    names = ds.fidelities.names
    evaluated = {(str(ds.keys[s]), names[k]) for s, k in np.asarray(pairs).tolist()}
    known, by_key_only, keys_trained = _trained(checkpoint, ds, pairs)
    same = known | by_key_only
    return same, {key for key, _ in evaluated - same if key in keys_trained}, len(evaluated)


def trained_labels(checkpoint, ds, pairs: np.ndarray) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(known, by_key_only): the (key, fidelity name) of `pairs` that the model of `checkpoint` trained on at that
    fidelity (its run's copy of its data and split: by key and fidelity, or by geometry), and those of structures
    in its training split whose fidelity the run does not record (no copy of its data: splits.json's keys only)."""
    known, by_key_only, _ = _trained(checkpoint, ds, pairs)
    return known, by_key_only


def _trained(checkpoint, ds, pairs: np.ndarray):
    """(known, by_key_only, keys trained): trained_labels and the keys of every training structure; the run read
    once."""
    names = ds.fidelities.names
    evaluated = {(str(ds.keys[s]), names[k]) for s, k in np.asarray(pairs).tolist()}
    trained, old = trained_keys(checkpoint)
    if not trained:
        return set(), set(), set()
    known = {p for p in evaluated if p in trained}
    if old is not None:
        known |= _trained_by_geometry(old, ds, pairs, known)
    by_key_only = {p for p in evaluated - known if (p[0], None) in trained}
    return known, by_key_only, {key for key, _ in trained}


def records_training(checkpoint) -> bool:
    """Whether the model of `checkpoint` has its run beside it with a record of what it trained on (splits.json,
    splits.npz or an extension's pairs file): else no training label can be recognised as such."""
    from multifi.models.registry import run_dir_of
    from multifi.train.extension_data import PAIRS

    path, run = Path(checkpoint), run_dir_of(checkpoint)
    if path.is_file() and path.name != "model.pt" and path.suffix != ".ckpt":
        return False  # another model file in a run's folder: not that run's (trained_keys)
    return any((run / name).exists() for name in ("splits.json", "splits.npz", PAIRS))


def trained_keys(checkpoint) -> tuple[set[tuple[str, str | None]], object]:
    """(key, fidelity name) of every training pair; (key, None) where only the split's keys are known; and the run
    as load_old_run reads it (None without a copy of its data)."""
    import json

    from multifi.errors import MultifiError
    from multifi.models.registry import run_dir_of
    from multifi.train.extension_data import PAIRS, load_old_run

    run = run_dir_of(checkpoint)
    if Path(checkpoint).is_file() and Path(checkpoint).name != "model.pt" and Path(checkpoint).suffix != ".ckpt":
        return set(), None  # another model file in a run's folder (a copy, a fine-tuned model): not that run's
    split_files = [run / name for name in ("splits.json", "splits.npz", PAIRS)]
    # the data as trained: the run's copy, or (indices in splits.npz) the saved dataset it indexes; not re-read
    copied = (run / "dataset.npz").exists() or (run / "splits.npz").exists()
    if (run / "config.yaml").exists() and copied and any(f.exists() for f in split_files):
        try:
            old = load_old_run(run)
        except (
            MultifiError,
            OSError,
            ValueError,
            KeyError,
            TypeError,
        ):  # unreadable: no warning rather than no evaluation
            return set(), None
        names = old.dataset.fidelities.names
        return {(str(old.dataset.keys[s]), names[k]) for s, k in old.train.tolist()}, old
    try:  # no copy of the data: the split's keys (before train_limits)
        return {(str(k), None) for k in json.loads((run / "splits.json").read_text()).get("train", [])}, None
    except (OSError, ValueError, AttributeError):
        return set(), None


def _trained_by_geometry(old, ds, pairs, known: set) -> set[tuple[str, str]]:
    """(key, fidelity name) of the evaluated pairs, not in `known`, whose molecule is a training molecule of the run
    `old` at that fidelity by geometry (same_molecules: distances within 2e-3 Å, coordinates printed to 3
    decimals; up to rotation and atom order): where a key was made from the geometry on either side (a file
    without keys, or a run trained without them), and whatever the keys (a training molecule under another key)
    up to MOLECULE_SEARCH_LIMIT molecules on both sides together. Crystals are not searched (a pairwise search over
    near-identical cells grows with the square of the training set)."""
    from multifi.data.checks import MOLECULE_SEARCH_LIMIT
    from multifi.data.dataset import GEOMETRY_KEY_PREFIX, GEOMETRY_TOLERANCE
    from multifi.data.same_geometry import same_molecules

    names, old_names = ds.fidelities.names, old.dataset.fidelities.names
    hashed = np.char.startswith(np.asarray(ds.keys, dtype=str), GEOMETRY_KEY_PREFIX)
    run_hashed = np.char.startswith(np.asarray(old.dataset.keys, dtype=str), GEOMETRY_KEY_PREFIX)
    out = set()
    for k, name in enumerate(names):
        if name not in old_names:
            continue
        mine = pairs[(pairs[:, 1] == k)][:, 0]
        mine = np.array([s for s in mine.tolist() if (str(ds.keys[s]), name) not in known], dtype=np.int64)
        theirs = np.unique(old.train[old.train[:, 1] == old_names.index(name), 0])
        small = len(mine) + len(theirs) <= MOLECULE_SEARCH_LIMIT
        if not len(mine) or not len(theirs) or not (small or hashed[mine].any() or run_hashed[theirs].any()):
            continue
        copies = same_molecules(ds.subset(mine), old.dataset.subset(theirs), GEOMETRY_TOLERANCE)
        out |= {(str(ds.keys[s]), name) for s in mine[copies].tolist()}
    return out
