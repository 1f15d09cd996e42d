"""Structures grouped by a per-frame value of ASE-readable files (MACE's `config_type`, a `system` tag…): the
groups `multifi evaluate --group-by` reports errors for."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset
from multifi.data.readers.ase_files import frame_key, read_frames
from multifi.data.sources import guess_format, is_qm9_text
from multifi.errors import MultifiError

log = logging.getLogger("multifi")


#: distinct values a grouping may have: a key naming kinds of structures (bulk, surface, …), not each frame
MAX_GROUPS = 100


def check_groupable(paths: list[str], name: str) -> None:
    """A source that is not a file ASE reads (MatPES records, a saved dataset, QM9) has no info to group by: an
    error before anything is read."""
    for path in paths:
        if is_qm9_text(path) or guess_format(Path(path)) != "ase":
            kind = "QM9" if is_qm9_text(path) else f"a {guess_format(Path(path))} file"
            raise MultifiError(
                f"{path}: grouping by {name} (--group-by) reads info[{name!r}] of files ASE reads (extxyz, ASE db, …); "
                f"this is {kind}"
            )


def structure_groups(dataset: FidelityDataset, paths: list[str], index: str, name: str) -> np.ndarray:
    """[S] object: info[name] of each structure of `dataset` (read from the ASE-readable files `paths` with frame
    index `index`, structures merged by key) as text, None where its frame has no such key. Frames that are one
    structure (the same key) with different values count under the first one's, and a warning says so; more than
    MAX_GROUPS values are an error (one evaluation per value). The files were read for `dataset` already: what
    reading them warns about is not said again."""
    check_groupable(paths, name)  # (already checked by evaluate_files, before anything was read)
    values: dict[str, str | None] = {}
    for path in paths:
        differing: list[str] = []
        for i, atoms in enumerate(_quietly(read_frames(Path(path), index))):
            key, value = frame_key(atoms), _as_text(atoms.info.get(name))
            if values.get(key) is None:  # a frame of the structure without the key does not decide its group
                values[key] = value
            elif value is not None and values[key] != value:
                differing.append(f"frame {i} ({value} vs {values[key]})")
        if differing:
            log.warning(
                "%s: %d frame(s) repeat a structure with another %s, counted under the first one's: %s",
                path,
                len(differing),
                name,
                ", ".join(differing[:3]) + (", …" if len(differing) > 3 else ""),
            )
    groups = np.array([values.get(str(k)) for k in dataset.keys], dtype=object)
    distinct = {g for g in groups.tolist() if g is not None}
    if not distinct:
        log.warning("%s: no frame has info[%r]: one group, every structure without it", ", ".join(paths), name)
    if len(distinct) > MAX_GROUPS:
        raise MultifiError(
            f"{', '.join(paths)}: info[{name!r}] takes {len(distinct)} distinct values (at most {MAX_GROUPS}): "
            "grouping (--group-by) is for kinds of structures (bulk, surface, …), not a value per frame"
        )
    return groups


def _quietly(frames):
    """The frames, with multifi's warnings about the file held back while each is read (said when it was read)."""
    log_ = logging.getLogger("multifi")
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield from frames
    finally:
        log_.setLevel(level)


def _as_text(value) -> str | None:
    """An info value as the group's name (ASE reads `config_type=1` as an integer): None stays None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return " ".join(map(str, value.ravel()))
    return str(value)


def group_order(groups: np.ndarray) -> list[str | None]:
    """The distinct values of `groups` [S] in the order they first occur, None (no value) last."""
    seen = dict.fromkeys(groups.tolist())
    return [g for g in seen if g is not None] + ([None] if None in seen else [])


def group_codes(groups: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """([n] int each entry's group number, the values in that numbering: group_order) of `groups` [n] object."""
    order = group_order(groups)
    number = {value: i for i, value in enumerate(order)}
    return np.array([number[g] for g in groups.tolist()], dtype=np.int64), order
