"""A run directory's config.yaml, read as the run was made: settings that later versions added take the value that
reproduces what the run did before they existed; and the unit doubts its metrics.json recorded."""

from __future__ import annotations

import json
from pathlib import Path

from multifi.config import RunConfig, load_config
from multifi.data.sources import guess_format


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
