"""A run directory's config.yaml, read as the run was made: settings that later versions added take the value that
reproduces what the run did before they existed; what it read (the stress order of its MatPES sources) and the unit
doubts its metrics.json recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from multifi.config import RunConfig, load_config
from multifi.data.sources import guess_format
from multifi.errors import MultifiError

log = logging.getLogger("multifi")


def is_run_config(path: str | Path) -> bool:
    """Whether `path` is a run directory's config.yaml (a split or an extension's pairs beside it)."""
    folder = Path(path).parent
    return Path(path).name == "config.yaml" and any(
        (folder / name).exists() for name in ("splits.json", "splits.npz", "pairs.npz")
    )


def load_any_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A run's config.yaml as load_run_config reads it; any other config as load_config does."""
    return load_run_config(path, overrides) if is_run_config(path) else load_config(path, overrides)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """load_config of a run's config.yaml (which writes out every setting), with the settings it lacks taken as
    the version that wrote it used them: data.split.order "position" (random splits and train_limits by position,
    before the key order) and, for MatPES sources, stress_order "vasp" (6-component stresses read in VASP's order
    before the setting)."""
    cfg = load_config(path, overrides)
    if "order" not in cfg.data.split.model_fields_set:
        cfg.data.split.order = "position"
    for source in cfg.data.sources:
        if "stress_order" in source.model_fields_set or source.path is None:
            continue
        fmt = source.format if source.format != "auto" else guess_format(Path(source.path))
        if fmt == "matpes":
            source.stress_order = "vasp"
    return cfg


def doubtful_units_of_run(run: Path) -> dict:
    """The labels the unit checks doubted when the model's run read them (its metrics.json), {label: [fidelity]}:
    a model trained on them predicts in their units, whatever those are."""
    try:
        payload = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    doubtful = payload.get("doubtful_units") if isinstance(payload, dict) else None
    if not isinstance(doubtful, dict):
        return {}
    return {  # as training writes it, {label: [fidelity names]}; anything else is left out
        str(label): [str(n) for n in names]
        for label, names in doubtful.items()
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    }


def warn_other_stress_order(run: Path, data: list[str], order: str | None, has_stress: bool = True) -> None:
    """Warn when a MatPES file of `data` is read in another stress order than the run directory `run` read its
    MatPES sources in (shear stresses compared or kept in another order than trained): the same file read with
    another order, or (`order` None: the default, MatPES's own) any MatPES file while the run read every one of
    its MatPES sources in VASP's order. Nothing to say when the data holds no stress label (`has_stress`)."""
    if not has_stress or not is_run_config(run / "config.yaml"):
        return
    try:
        sources = load_run_config(run / "config.yaml").data.sources
    except (MultifiError, OSError, ValueError):  # an unreadable config: the other checks say so where it matters
        return
    trained = {
        Path(s.path).resolve(): s.stress_order
        for s in sources
        if s.path and Path(s.path).exists() and guess_format(Path(s.path)) == "matpes"
    }
    orders = set(trained.values())
    for path in data:
        if not Path(path).is_file() or guess_format(Path(path)) != "matpes":
            continue
        was = trained.get(Path(path).resolve())
        if was is not None and was != (order or "voigt"):
            log.warning(
                "%s: the model's run read this file's stresses in %s order (stress_order: %s), read here in %s "
                "order: give --stress-order %s to compare them as trained",
                path,
                was,
                was,
                order or "voigt",
                was,
            )
        elif was is None and order is None and orders == {"vasp"}:
            log.warning(
                "%s: read in MatPES's own stress order (xx yy zz yz xz xy, the default), while the model's run read "
                "its MatPES sources (%s) in VASP's (xx yy zz xy yz zx): if this file is written like them, give "
                "--stress-order vasp, or its shear stresses are mixed up",
                path,
                ", ".join(sorted(p.name for p in trained)),
            )
