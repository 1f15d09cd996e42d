"""experiments/extend_solids.py reuses a finished run only when it was made with the same settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "extend_solids.py"


def _script():
    spec = importlib.util.spec_from_file_location("extend_solids", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
    es = _script()
    cfg = {"data": {"sources": [{"path": "PBE.jsonl.gz"}]}, "train": {**es.TRAIN, "max_steps": 1500}}
    made = {  # as a run's config.yaml holds it: validated, with every default written out
        "data": {"sources": [{"path": "PBE.jsonl.gz", "fidelity": None, "format": "auto"}], "train_limits": {}},
        "train": {**es.TRAIN, "max_steps": 1500, "seed": 0},
    }
    run = tmp_path / "pbe"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(made))
    (run / "metrics.json").write_text(json.dumps({"fidelities": {}}))
    (run / "cpu_seconds.txt").write_text("1.0\n")
    calls = []
    assert es.run_once(run, lambda: calls.append(1), cfg)["cpu_seconds"] == 1.0 and calls == []
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 3000}}
    with pytest.raises(SystemExit, match=r"pbe: finished with other settings \(train.max_steps = 1500 there, 3000"):
        es.run_once(run, lambda: calls.append(1), longer)
    other = {**cfg, "data": {"sources": [{"path": "R2SCAN.jsonl.gz"}]}}
    assert "data.sources.0.path" in es.first_difference(other, made) and calls == []
