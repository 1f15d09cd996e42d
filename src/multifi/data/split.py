"""Splits by structure, per-fidelity label limits, and (structure, fidelity) training samples."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset
from multifi.data.stats import composition_matrix
from multifi.errors import MultifiError
from multifi.files import atomic_write

SPLITS = ("train", "val", "test")
log = logging.getLogger("multifi")


@dataclass
class Split:
    """Structure indices [n] of each split (disjoint)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def save(self, path: Path, dataset: FidelityDataset) -> Path:
        """The structure keys of each split (stable across re-reading the sources) as JSON; for more than
        200,000 structures, an .npz of structure indices into the (saved, fixed-order) dataset instead,
        same name with suffix .npz. Returns the path written."""
        path = Path(path)
        if len(dataset) > 200_000:
            path = path.with_suffix(".npz")
            atomic_write(path, lambda f: np.savez(f, **{n: self[n] for n in SPLITS}))
            return path
        data = {name: dataset.keys[self[name]].tolist() for name in SPLITS}
        atomic_write(path, lambda f: f.write(json.dumps(data).encode()))
        return path


def changed_split(path: Path, split: Split, dataset: FidelityDataset) -> tuple[Path, str] | None:
    """(saved file, first split name) where `split` holds other structures than the split saved at `path` by
    Split.save (keys in JSON, or indices in the .npz beside it); None when equal or when nothing is saved."""
    path = Path(path)
    npz = path.with_suffix(".npz")
    if path.exists():
        saved = json.loads(path.read_text())
        now = {name: dataset.keys[split[name]].tolist() for name in SPLITS}
        same = lambda name: sorted(map(str, saved.get(name, []))) == sorted(map(str, now[name]))  # noqa: E731
    elif npz.exists():
        path = npz
        with np.load(npz) as f:
            saved = {name: np.sort(f[name]) for name in SPLITS}
        same = lambda name: np.array_equal(saved[name], np.sort(split[name]))  # noqa: E731
    else:
        return None
    return next(((path, name) for name in SPLITS if not same(name)), None)


ORDER = "key"  # random_split and limit_pairs order structures by key; "position": as runs of earlier versions did
_U64 = np.uint64


def key_order(keys: np.ndarray, *seed: int) -> np.ndarray:
    """Positions [S] of `keys` (unique structure keys) in a random order fixed by `seed` and by each key alone: the
    same keys get the same relative order whatever the order or company they come in (a structure's rank among
    others depends on their keys, not on where a source put them)."""
    return np.argsort(key_hashes(keys, *seed), kind="stable")


def key_hashes(keys: np.ndarray, *seed: int) -> np.ndarray:
    """[S] uint64: a seeded hash of each key (FNV-1a over its characters, then splitmix64's finaliser); a key's
    hash depends on the key and the seed only (not on the other keys, nor on the array's width or byte order).
    Time: the keys' characters in all (each column updates only the keys that long)."""
    text = np.asarray(keys, dtype=str)
    width = text.dtype.itemsize // 4
    text = np.ascontiguousarray(text.astype(f"<U{max(width, 1)}", copy=False))  # characters as little-endian u4
    n = len(text)
    start = np.uint64(0xCBF29CE484222325)
    for s in seed:
        start = _mix(np.array([start ^ np.uint64(int(s) & 0xFFFFFFFFFFFFFFFF)], dtype=_U64))[0]
    h = np.full(n, start, dtype=_U64)
    if n == 0 or width == 0:
        return _mix(h)
    codes = text.view("<u4").reshape(n, width)
    length = np.char.str_len(text)
    longest_first = np.argsort(-length, kind="stable")
    count = np.searchsorted(-length[longest_first], -np.arange(width), side="left")  # [c]: keys longer than c
    prime = _U64(0x100000001B3)
    for c in range(int(length.max())):
        rows = longest_first[: count[c]]
        h[rows] = (h[rows] ^ codes[rows, c].astype(_U64)) * prime
    return _mix(h)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping)."""
    h = (h ^ (h >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> _U64(27))) * _U64(0x94D049BB133111EB)
    return h ^ (h >> _U64(31))


def random_split(keys: np.ndarray, val: float, test: float, seed: int, order: str = ORDER) -> Split:
    """Structures [S] (their keys) in a seeded random order (`key_order`: independent of the sources' order); the
    first `test` fraction is test, the next `val` fraction val, the rest train. order="position" shuffles positions
    instead (how runs split before key order; kept for resuming those runs)."""
    n = len(keys)
    perm = key_order(keys, seed) if order == "key" else np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    if n - n_test - n_val < 1:
        raise MultifiError(f"data.split: val={val}, test={test} leave no training structures of the {n}")
    return Split(
        train=np.sort(perm[n_test + n_val :]), val=np.sort(perm[n_test : n_test + n_val]), test=np.sort(perm[:n_test])
    )


def split_from_files(files: dict[str, str], dataset: FidelityDataset) -> Split:
    """Splits from files listing structure keys (e.g. qm9:17) or integers, one per line (or a JSON list). An
    integer is a QM9 index (key qm9:<i>) when every structure is a QM9 molecule, as everywhere else in QM9
    data (`qm9.indices`, label tables), else a 0-based position in the data."""
    keys = dataset.keys.tolist()
    key_to_index = {k: i for i, k in enumerate(keys)}
    qm9 = bool(keys) and all(str(k).startswith("qm9:") for k in keys)
    out = {}
    for name in SPLITS:
        if name not in files:
            out[name] = np.zeros(0, np.int64)
            continue
        out[name] = _read_split_file(Path(files[name]), key_to_index, len(dataset), qm9)
    split = Split(**out)
    try:
        check_disjoint(split, dataset)
    except MultifiError as exc:
        raise MultifiError(f"{', '.join(str(files[n]) for n in SPLITS if n in files)}: {exc}") from None
    unused = np.setdiff1d(np.arange(len(dataset)), np.concatenate([split[name] for name in SPLITS]))
    if len(unused):
        log.warning(
            "%s: %d of %d structures are in none of these split files (e.g. %s): they are not used",
            ", ".join(str(files[name]) for name in SPLITS if name in files),
            len(unused),
            len(dataset),
            ", ".join(str(k) for k in dataset.keys[unused[:3]].tolist()),
        )
    return split


_COMMENT = re.compile(r"(^|\s)#.*$")  # a # inside a key (mol#3) is part of the key


def _read_split_file(path: Path, key_to_index: dict, n: int, qm9: bool = False) -> np.ndarray:
    if not path.exists():
        raise MultifiError(f"{path}: no such split file")
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise MultifiError(f"{path}: not a readable split file ({type(exc).__name__}: {exc})") from None
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MultifiError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    else:  # one key or index per line (or separated by spaces); a # at a line's start or after a space comments
        items = [w for line in text.splitlines() for w in _COMMENT.sub("", line).split()]
    idx, number_as_key, as_position = [], None, None  # the first number read as a key, and as a position
    for it in items:  # a structure listed twice counts once
        s = str(it)
        if s in key_to_index:
            idx.append(key_to_index[s])
            if s.lstrip("-").isdigit():
                number_as_key = number_as_key or s
        elif qm9 and s.isdigit():
            if f"qm9:{s}" not in key_to_index:
                raise MultifiError(
                    f"{path}: QM9 index {s} is not a molecule of the data (integers here are QM9 indices)"
                )
            idx.append(key_to_index[f"qm9:{s}"])
        elif s.lstrip("-").isdigit() and 0 <= int(s) < n:
            idx.append(int(s))
            as_position = as_position or s
        else:
            raise MultifiError(
                f"{path}: {s!r} is neither a structure key nor an index below {n}{_key_hint(s, key_to_index)}"
            )
        if number_as_key is not None and as_position is not None:
            raise MultifiError(
                f"{path}: {number_as_key!r} is a structure key and {as_position!r} a position: the structures' keys are "
                "integers too, so a number is ambiguous; list the keys only (every item a key) or name the split "
                "by keys that are not numbers"
            )
    return np.asarray(sorted(set(idx)), dtype=np.int64)


def _key_hint(item: str, key_to_index: dict) -> str:
    """'; did you mean …' when the item is a key without its prefix (a bare MatPES id for 'matpes:<id>')."""
    prefixed = [k for k in (f"{prefix}:{item}" for prefix in ("matpes", "qm9")) if k in key_to_index]
    return f"; did you mean {prefixed[0]!r}? (keys carry their source's prefix)" if prefixed else ""


def check_disjoint(split: Split, dataset: FidelityDataset) -> None:
    """A structure must never be in two splits (also not as a duplicate with another key)."""
    seen = {}
    for name in SPLITS:
        for i in split[name].tolist():
            if i in seen and seen[i] != name:
                raise MultifiError(f"structure {dataset.keys[i]} is in both the {seen[i]} and {name} splits")
            seen[i] = name


def labelled_pairs(dataset: FidelityDataset, structures: np.ndarray) -> np.ndarray:
    """[P, 2] (structure, fidelity) pairs with any label, structures in the given set."""
    has = dataset.energy_mask | dataset.has_forces() | dataset.has_stress()
    sub = has[structures]
    r, k = np.nonzero(sub)
    return np.stack([structures[r], k], axis=1).astype(np.int64)


def limit_pairs(
    pairs: np.ndarray, limits: np.ndarray, dataset: FidelityDataset, seed: int, order: str = ORDER
) -> np.ndarray:
    """Keep at most limits[k] samples of each fidelity index k (random, seeded; nested for growing limits; by key
    order, so the same structures whatever the sources' order; order="position" as random_split's);
    limits [K] as FidelityTable.per_index gives them, NaN: no limit.

    Within the random order, the first structure containing each element moves to the front, so that
    any limit ≥ the number of elements keeps every element (and so its reference energy) represented."""
    limited = np.flatnonzero(~np.isnan(limits))
    if len(limited) == 0:
        return pairs
    keep = np.ones(len(pairs), bool)
    for k in limited.tolist():
        rows = np.flatnonzero(pairs[:, 1] == k)
        if len(rows) == 0:
            continue
        if order == "key":
            name = int(key_hashes(np.array([dataset.fidelities.names[k]]))[0])  # not k: the table's order varies
            ranked = key_order(dataset.keys[pairs[rows, 0]], seed, name)
        else:
            ranked = np.random.default_rng([seed, k]).permutation(len(rows))
        ranked = _elements_first(ranked, pairs[rows, 0], dataset)
        keep[rows[ranked[int(limits[k]) :]]] = False
    return pairs[keep]


def _elements_first(order: np.ndarray, structures: np.ndarray, dataset: FidelityDataset) -> np.ndarray:
    """`order` (positions into `structures`) with, for each element, its first structure moved up front."""
    _, comp = composition_matrix(dataset.subset(structures[order]))  # [n, n_el] in order
    first = np.unique(np.argmax(comp > 0, axis=0))  # first position holding each element
    front = np.zeros(len(order), bool)
    front[first] = True
    return np.concatenate([order[front], order[~front]])


TRAIN_LABELS = "train_labels.json"  # a run's training labels once data.train_limits chose among them


def save_train_labels(path: Path, dataset: FidelityDataset, pairs: np.ndarray) -> Path:
    """The training labels `pairs` [P, 2] as {fidelity: [structure keys]} JSON: which labels data.train_limits kept,
    recorded (reading a run back then does not depend on how a version draws them)."""
    names = dataset.fidelities.names
    data = {name: dataset.keys[pairs[pairs[:, 1] == k, 0]].tolist() for k, name in enumerate(names)}
    return atomic_write(Path(path), lambda f: f.write(json.dumps(data).encode()))


def read_train_labels(path: Path, dataset: FidelityDataset) -> np.ndarray:
    """[P, 2] (structure, fidelity) training pairs of `dataset` from save_train_labels' file, in labelled_pairs'
    order; a damaged file, or a key or fidelity the dataset lacks, is a one-line error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MultifiError(f"{path}: not a readable training-labels file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(k, str) for k in v) for v in data.values()
    ):
        raise MultifiError(f"{path}: not a training-labels file (a mapping of fidelities to lists of structure keys)")
    index = {k: i for i, k in enumerate(dataset.keys.tolist())}
    out = []
    for name, keys in data.items():
        k = dataset.fidelities.index(name, where=str(path))
        missing = [key for key in keys if key not in index]
        if missing:
            raise MultifiError(f"{path}: structure {missing[0]!r} is not in the run's dataset")
        out += [(index[key], k) for key in keys]
    pairs = np.asarray(sorted(out), dtype=np.int64).reshape(-1, 2)
    return pairs
